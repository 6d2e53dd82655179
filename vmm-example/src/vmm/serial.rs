// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest's console: a 16550 UART (vm-superio) on COM1 whose output goes
//! to our stdout and whose interrupt is an irqfd.

use std::io::{self, Stdout, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's interrupt by writing its irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Guest output on stdout, flushed at each line end so the console reads
/// well when interleaved with our logs.
#[derive(Debug)]
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
#[derive(Debug)]
pub struct SerialConsole(Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>);

/// The UART's registers and receive buffer, for a VM snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// IIR bit 0 clear: an interrupt is pending.
const IIR_NO_INTERRUPT: u8 = 1;

impl SerialConsole {
    /// A UART that interrupts through `irq` and writes to stdout.
    pub fn new(irq: EventFd) -> Self {
        SerialConsole(Serial::new(IrqTrigger(irq), ConsoleOut(io::stdout())))
    }

    /// A UART in the state `snapshot` recorded. An interrupt that was
    /// pending is raised again: its edge may have been lost at the cut.
    pub fn restore(irq: EventFd, snapshot: &SerialSnapshot) -> io::Result<Self> {
        let state = SerialState {
            baud_divisor_low: snapshot.divisor[0],
            baud_divisor_high: snapshot.divisor[1],
            interrupt_enable: snapshot.interrupt_enable,
            interrupt_identification: snapshot.interrupt_identification,
            line_control: snapshot.line_control,
            line_status: snapshot.line_status,
            modem_control: snapshot.modem_control,
            modem_status: snapshot.modem_status,
            scratch: snapshot.scratch,
            in_buffer: snapshot.in_buffer.clone(),
        };
        let pending = snapshot.interrupt_identification & IIR_NO_INTERRUPT == 0;
        let trigger = IrqTrigger(irq);
        if pending {
            trigger.trigger()?;
        }
        let serial = Serial::from_state(
            &state,
            trigger,
            vm_superio::serial::NoEvents,
            ConsoleOut(io::stdout()),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
        Ok(SerialConsole(serial))
    }

    /// The UART's current state.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
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
