//! The guest's console: a 16550 UART (vm-superio) on COM1 whose output goes
//! to our stdout and whose interrupt is an irqfd.

use std::io::{self, Stdout, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Guest output on stdout, flushed at each line end so the console reads
/// well when interleaved with our logs.
pub struct ConsoleOut(Stdout);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// COM1 as a bus device.
pub struct SerialConsole(Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>);

impl SerialConsole {
    /// A UART that interrupts through `irq` and writes to stdout.
    pub fn new(irq: EventFd) -> Self {
        SerialConsole(Serial::new(IrqTrigger(irq), ConsoleOut(io::stdout())))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.0.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            // A console write error (stdout closed) must not stop the guest.
            let _ = self.0.write(offset, value);
        }
    }
}
