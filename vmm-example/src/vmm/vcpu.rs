//! vCPUs: CPUID, MSRs and local APIC setup, the boot CPU's 64-bit entry
//! state, and the run loop that sends port and MMIO exits to the buses.
//!
//! Only the boot CPU (vCPU 0) gets register state. The others start, as
//! on real hardware, waiting for the INIT/SIPI sequence the guest kernel
//! sends through the in-kernel local APIC.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{error, warn};

use super::boot::{BootEntry, GDT};
use super::bus::Bus;
use super::layout;
use super::{ExitReason, ExitSignal};

/// Errors setting up or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {cpu}: {what} failed")]
    Kvm {
        /// The vCPU.
        cpu: u8,
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The thread could not be spawned.
    #[error("cannot spawn vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// The buses a vCPU dispatches its exits to.
pub struct Buses {
    /// Memory-mapped devices.
    pub mmio: Bus,
    /// Port I/O devices.
    pub pio: Bus,
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// One configured vCPU, ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

impl Vcpu {
    /// Create vCPU `id` of `count` and set its CPUID, MSRs and LAPIC; the
    /// boot CPU also gets `entry`'s register state.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        entry: BootEntry,
    ) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Kvm {
                cpu: id,
                what,
                source,
            }
        };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        patch_cpuid(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&[
            msr(MSR_IA32_MISC_ENABLE, 1),          // fast string operations
            msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
        ])
        .map_err(|_| VcpuError::Kvm {
            cpu: id,
            what: "building MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        if id == 0 {
            set_boot_state(&fd, entry).map_err(err("setting boot registers"))?;
        }
        Ok(Vcpu { fd, id })
    }

    /// Run on a thread of its own until the guest stops or fails; either
    /// way `exit` learns why.
    pub fn spawn(
        self,
        buses: Arc<Buses>,
        exit: Arc<ExitSignal>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                let reason = self.run(&buses);
                exit.signal(reason);
            })
            .map_err(VcpuError::Spawn)
    }

    fn run(mut self, buses: &Buses) -> ExitReason {
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    buses.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    buses.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !buses.mmio.read(addr, data) {
                        warn!("vCPU {}: read of unmapped MMIO {addr:#x}", self.id);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !buses.mmio.write(addr, data) {
                        warn!("vCPU {}: write to unmapped MMIO {addr:#x}", self.id);
                    }
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => return ExitReason::Reset,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                        _ => ExitReason::Reset,
                    };
                }
                Ok(other) => {
                    error!("vCPU {}: unexpected exit {other:?}", self.id);
                    return ExitReason::Failure;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    error!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    return ExitReason::Failure;
                }
            }
        }
    }
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Tell the guest which CPU it runs on (APIC IDs in leaves 1, 0xb, 0x1f)
/// and that it runs under a hypervisor.
fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= 1 << 31; // hypervisor present
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

fn segment(selector: u16) -> kvm_segment {
    let index = usize::from(selector >> 3);
    let d = GDT[index];
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g: ((d >> 55) & 1) as u8,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging on with the identity map, flat segments from the GDT,
/// `rip` at the kernel's 64-bit entry and `rsi` at the zero page.
fn set_boot_state(fd: &VcpuFd, entry: BootEntry) -> Result<(), kvm_ioctls::Error> {
    const CR0_PE: u64 = 1;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut sregs = fd.get_sregs()?;
    sregs.cs = segment(0x8);
    let data = segment(0x10);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(0x18);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)?;

    let mut regs = fd.get_regs()?;
    regs.rflags = 0x2;
    regs.rip = entry.entry.0;
    regs.rsp = layout::BOOT_STACK;
    regs.rbp = layout::BOOT_STACK;
    regs.rsi = entry.zero_page.0;
    fd.set_regs(&regs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu)
}
