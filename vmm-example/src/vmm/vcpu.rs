// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vCPUs: CPUID, MSRs and local APIC setup, the boot CPU's 64-bit entry
//! state, and the run loop that sends port and MMIO exits to the buses.
//!
//! Only the boot CPU (vCPU 0) gets register state. The others start, as
//! on real hardware, waiting for the INIT/SIPI sequence the guest kernel
//! sends through the in-kernel local APIC.
//!
//! A running vCPU can be stopped for a snapshot through a [`PauseGate`]: it
//! finishes the exit it is handling, lets KVM complete any pending port or
//! MMIO access, hands over its [`VcpuState`] and stays parked. A vCPU
//! restored from a [`VcpuState`] carries on from there.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};

use super::boot::{BootEntry, GDT};
use super::bus::Bus;
use super::layout;
pub use super::pause::PauseGate;
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
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// vCPUs did not stop in time.
    #[error("{stopped} of {expected} vCPUs stopped within {timeout:?}")]
    PauseTimeout {
        /// vCPUs that handed over their state.
        stopped: usize,
        /// vCPUs asked to stop.
        expected: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// The saved state does not fit this host's KVM.
    #[error("vCPU {cpu}: saved state unusable: {why}")]
    State {
        /// The vCPU.
        cpu: u8,
        /// What is wrong.
        why: String,
    },
}

/// The buses a vCPU dispatches its exits to.
#[derive(Debug)]
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

/// Everything KVM holds for one vCPU that a snapshot must carry, in the
/// kernel's own layouts (serialized as their bytes by kvm-bindings).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub id: u8,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, `rip` and `rflags`.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets us read, by index.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

/// One configured vCPU, ready to run.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    msr_indices: Arc<Vec<u32>>,
}

/// The MSRs KVM can save and restore on this host.
pub fn msr_indices(kvm: &Kvm) -> Result<Arc<Vec<u32>>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_error(0, "KVM_GET_MSR_INDEX_LIST"))?;
    Ok(Arc::new(list.as_slice().to_vec()))
}

impl Vcpu {
    /// Create vCPU `id` of `count` with its CPUID set.
    fn create(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let err = |what| kvm_error(id, what);
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        patch_cpuid(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        Ok(Vcpu {
            fd,
            id,
            msr_indices,
        })
    }

    /// Create vCPU `id` of `count` and set its CPUID, MSRs and LAPIC; the
    /// boot CPU also gets `entry`'s register state.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        entry: BootEntry,
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let err = |what| kvm_error(id, what);
        let vcpu = Self::create(kvm, vm, id, count, msr_indices)?;
        let fd = &vcpu.fd;
        let msrs = msr_list(
            id,
            &[
                msr(MSR_IA32_MISC_ENABLE, 1),          // fast string operations
                msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
            ],
        )?;
        fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        if id == 0 {
            set_boot_state(fd, entry).map_err(err("setting boot registers"))?;
        }
        Ok(vcpu)
    }

    /// Create a vCPU of `count` that resumes from `state`.
    pub fn restore(
        kvm: &Kvm,
        vm: &VmFd,
        count: u8,
        state: &VcpuState,
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let id = state.id;
        let err = |what| kvm_error(id, what);
        // KVM_SET_XSAVE reads as many bytes as the vCPU's enabled XSAVE
        // features need; refuse hosts where that exceeds `kvm_xsave`.
        let needed = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if usize::try_from(needed).unwrap_or(0) > std::mem::size_of::<kvm_xsave>() {
            return Err(VcpuError::State {
                cpu: id,
                why: format!("this host's XSAVE area needs {needed} bytes"),
            });
        }
        let vcpu = Self::create(kvm, vm, id, count, msr_indices)?;
        let fd = &vcpu.fd;
        // Control state first (modes, APIC base), then what depends on it.
        fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave`, and the check above
        // makes sure KVM reads no more than that from it.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
        write_msrs(fd, id, &state.msrs)?;
        fd.set_mp_state(state.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&state.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        Ok(vcpu)
    }

    /// Read this vCPU's state. Call it only while the vCPU is not running
    /// and after KVM has completed its last exit (see [`Vcpu::settle`]).
    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let err = |what| kvm_error(id, what);
        let fd = &self.fd;
        Ok(VcpuState {
            id,
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, id, &self.msr_indices)?,
            events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Let KVM finish the port or MMIO access of the last exit (it does so
    /// on the next `KVM_RUN`) without running guest code: enter once with
    /// `immediate_exit` set.
    fn settle(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(kvm_error(self.id, "KVM_RUN (immediate exit)")(source)),
        }
    }

    /// Run on a thread of its own until the guest stops or fails; either
    /// way `exit` learns why.
    /// If `gate` closes, the vCPU stops, hands its state to the gate and
    /// parks until the gate opens again (or for good).
    pub fn spawn(
        self,
        buses: Arc<Buses>,
        exit: Arc<ExitSignal>,
        gate: Arc<PauseGate>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                let mut vcpu = self;
                loop {
                    match vcpu.run(&buses, &gate) {
                        Ok(reason) => return exit.signal(reason),
                        Err(mut stopped) => {
                            let state = stopped.settle().and_then(|()| stopped.save_state());
                            gate.hand_over(state);
                            // Parked until the gate opens again (a migration
                            // that did not happen), then the guest goes on.
                            gate.wait_until_open();
                            vcpu = stopped;
                        }
                    }
                }
            })
            .map_err(VcpuError::Spawn)
    }

    /// Run until the guest stops (`Ok`) or the gate closes (`Err(self)`).
    fn run(mut self, buses: &Buses, gate: &PauseGate) -> Result<ExitReason, Self> {
        loop {
            if gate.is_closed() {
                return Err(self);
            }
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
                Ok(VcpuExit::Shutdown) => return Ok(ExitReason::Reset),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Ok(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                        _ => ExitReason::Reset,
                    });
                }
                Ok(other) => {
                    error!("vCPU {}: unexpected exit {other:?}", self.id);
                    return Ok(ExitReason::Failure);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    error!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    return Ok(ExitReason::Failure);
                }
            }
        }
    }
}

fn msr_list(cpu: u8, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(entries)
        .map_err(|_| kvm_error(cpu, "building MSR list")(kvm_ioctls::Error::new(libc::EINVAL)))
}

/// Read every MSR in `indices` that KVM will give. KVM stops a batch at
/// the first MSR it refuses; that one is skipped and the rest retried.
fn read_msrs(fd: &VcpuFd, cpu: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    in_msr_batches(
        indices,
        |batch| {
            let entries: Vec<_> = batch.iter().map(|&i| msr(i, 0)).collect();
            let mut msrs = msr_list(cpu, &entries)?;
            let read = fd
                .get_msrs(&mut msrs)
                .map_err(kvm_error(cpu, "KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..read]);
            Ok(read)
        },
        |index| debug!("vCPU {cpu}: MSR {index:#x} is not readable; not saved"),
    )?;
    Ok(out)
}

/// Write `entries`, skipping (and reporting) any this host's KVM refuses.
fn write_msrs(fd: &VcpuFd, cpu: u8, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
    in_msr_batches(
        entries,
        |batch| {
            fd.set_msrs(&msr_list(cpu, batch)?)
                .map_err(kvm_error(cpu, "KVM_SET_MSRS"))
        },
        |entry| warn!("vCPU {cpu}: MSR {:#x} was refused on restore", entry.index),
    )
}

/// Hand `items` to `op` in batches of at most [`KVM_MAX_MSR_ENTRIES`].
/// `op` says how many of its batch KVM took; KVM stops at the first MSR
/// it refuses, which goes to `refused` and is skipped before the rest is
/// retried.
fn in_msr_batches<T>(
    items: &[T],
    mut op: impl FnMut(&[T]) -> Result<usize, VcpuError>,
    mut refused: impl FnMut(&T),
) -> Result<(), VcpuError> {
    let mut rest = items;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let done = op(batch)?;
        match batch.get(done) {
            Some(item) => {
                refused(item);
                rest = &rest[done + 1..];
            }
            None => rest = &rest[done..],
        }
    }
    Ok(())
}

/// Maps a failed KVM ioctl `what` on vCPU `cpu` to a [`VcpuError`].
fn kvm_error(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { cpu, what, source }
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
