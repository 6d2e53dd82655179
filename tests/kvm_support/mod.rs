// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Support for the KVM tests: a one-vCPU VM running tiny 32-bit guest
//! programs, a small device backend, and the vCPU loop that plays the VMM's
//! MMIO bus.
//!
//! The guest runs in flat 32-bit protected mode without paging (CS/DS from a
//! GDT in guest memory, an IDT whose every vector but the device's ends the
//! run), so it can reach a virtio-mmio window at 0xd000_0000. Programs are
//! emitted by [`Asm`], a handful of x86 encodings, and report to the host
//! with `out DONE_PORT, al` (AL = the phase that finished).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::vm_memory::{Bytes, FileOffset, GuestAddress};
use virtio_backend_kit::{BackendError, DeviceBackend, GuestMemoryLog, Vring, VringOwned};

/// Guest RAM: 1 MiB at guest physical address 0, in KVM slot 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// The GDT (null, code 0x08, data 0x10).
pub const GDT_ADDR: u64 = 0x1000;
/// The IDT (256 interrupt gates).
pub const IDT_ADDR: u64 = 0x2000;
/// Handler for the device's interrupt vector.
pub const IRQ_HANDLER_ADDR: u64 = 0x3000;
/// Handler for every other vector: ends the run on [`FAULT_PORT`].
pub const FAULT_HANDLER_ADDR: u64 = 0x3800;
/// The guest program.
pub const CODE_ADDR: u64 = 0x4000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x8000;
/// Where guest programs store values they read from the device.
pub const MAILBOX: u64 = 0x9000;
/// Where the device's interrupt handler continues (a 32-bit address).
pub const RESUME_PTR: u64 = 0x9800;
/// The split virtqueue: descriptor table.
pub const DESC_ADDR: u64 = 0x1_0000;
/// Available ring.
pub const AVAIL_ADDR: u64 = 0x1_1000;
/// Used ring.
pub const USED_ADDR: u64 = 0x1_2000;
/// The one data buffer the device writes.
pub const BUF_ADDR: u64 = 0x2_0000;
/// Its length.
pub const BUF_LEN: u32 = 64;
/// Queue size the driver picks.
pub const QSIZE: u16 = 16;
/// The virtio-mmio window (no memory slot there: every access exits).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// `out` to this port ends a phase of the guest program.
pub const DONE_PORT: u16 = 0xf4;
/// `out` to this port: the guest took an unexpected exception or interrupt.
pub const FAULT_PORT: u16 = 0xf5;
/// The master PIC's vector base the guest programs.
pub const PIC_VECTOR_BASE: u8 = 0x20;
/// The device's interrupt line (a master PIC input).
pub const GSI: u32 = 5;

/// Code and data selectors of the flat GDT.
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;

/// A VM with guest memory, an in-kernel irqchip and one vCPU in protected
/// mode. `None` from [`TestVm::new`] means `/dev/kvm` is absent.
pub struct TestVm {
    /// The VM (shared with the wiring).
    pub vm: Arc<VmFd>,
    /// The only vCPU.
    pub vcpu: VcpuFd,
    /// Guest RAM, memfd-backed, shared by KVM and the device.
    pub memory: GuestMemoryLog,
    /// Guest RAM as a KVM memory slot.
    pub slots: KvmMemorySlots,
    _kvm: Kvm,
}

/// Whether the machine has KVM at all.
pub fn kvm_present() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is NUL-terminated and outlives the call; the returned
    // descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

fn flat_segment(selector: u16, type_: u8) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// An 8-byte 32-bit interrupt gate to `handler` in the flat code segment.
fn idt_gate(handler: u64) -> [u8; 8] {
    let h = handler as u32;
    let mut g = [0u8; 8];
    g[0..2].copy_from_slice(&(h as u16).to_le_bytes());
    g[2..4].copy_from_slice(&CODE_SEL.to_le_bytes());
    g[5] = 0x8e; // present, DPL 0, 32-bit interrupt gate
    g[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
    g
}

impl TestVm {
    /// Create the VM, or `None` without `/dev/kvm`.
    pub fn new() -> Option<TestVm> {
        if !kvm_present() {
            return None;
        }
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let file = memfd("vbk-kvm-guest", MEM_SIZE);
        let memory = GuestMemoryLog::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let slots = KvmMemorySlots::register(vm.clone(), &memory, 0).expect("memory slot");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let t = TestVm {
            vm,
            vcpu,
            memory,
            slots,
            _kvm: kvm,
        };
        t.setup_protected_mode();
        Some(t)
    }

    fn setup_protected_mode(&self) {
        // GDT: null, flat 32-bit code, flat data.
        let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        for (i, d) in gdt.iter().enumerate() {
            self.write_obj(GDT_ADDR + 8 * i as u64, *d);
        }
        for v in 0..256u64 {
            let handler = if v == u64::from(PIC_VECTOR_BASE) + u64::from(GSI) {
                IRQ_HANDLER_ADDR
            } else {
                FAULT_HANDLER_ADDR
            };
            self.write(IDT_ADDR + 8 * v, &idt_gate(handler));
        }
        // Unexpected vector: report on FAULT_PORT and stop.
        let mut fault = Asm::new(FAULT_HANDLER_ADDR);
        fault.out(FAULT_PORT, 0xff);
        fault.raw(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
        self.write(FAULT_HANDLER_ADDR, &fault.code);
        // The device's interrupt: EOI to the master PIC, drop the interrupt
        // frame and continue at the address the program stored at
        // RESUME_PTR (interrupts stay off). No `iretd`: under PVM, KVM
        // emulates it and its emulator handles `iret` only in real mode
        // (KVM_INTERNAL_ERROR_EMULATION on protected-mode `iretd`).
        let mut irq = Asm::new(IRQ_HANDLER_ADDR);
        irq.out(0x20, 0x20); // non-specific EOI
        irq.raw(&[0xbc]).raw(&(STACK_TOP as u32).to_le_bytes()); // mov esp, STACK_TOP
        irq.raw(&[0xff, 0x25])
            .raw(&(RESUME_PTR as u32).to_le_bytes()); // jmp [RESUME_PTR]
        self.write(IRQ_HANDLER_ADDR, &irq.code);

        let mut sregs = self.vcpu.get_sregs().unwrap();
        sregs.cs = flat_segment(CODE_SEL, 0xb);
        let data = flat_segment(DATA_SEL, 0x3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 256 * 8 - 1;
        sregs.cr0 |= 1; // PE, no paging
        self.vcpu.set_sregs(&sregs).unwrap();
    }

    /// Load `program` (built at [`CODE_ADDR`]) and point the vCPU at it with
    /// interrupts disabled.
    pub fn load(&mut self, program: &Asm) {
        assert_eq!(program.base, CODE_ADDR);
        self.write(CODE_ADDR, &program.code);
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2;
        self.vcpu.set_regs(&regs).unwrap();
    }

    /// Write guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.memory.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    /// Write a value to guest memory.
    pub fn write_obj<T: virtio_backend_kit::vm_memory::ByteValued>(&self, gpa: u64, v: T) {
        self.memory.write_obj(v, GuestAddress(gpa)).unwrap();
    }

    /// Read a value from guest memory.
    pub fn read_obj<T: virtio_backend_kit::vm_memory::ByteValued>(&self, gpa: u64) -> T {
        self.memory.read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Read guest memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.memory.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    /// Lay out one queue of [`QSIZE`] entries: descriptor 0 is a
    /// device-writable buffer of [`BUF_LEN`] bytes and every available-ring
    /// slot names it, so a guest publishes a request by incrementing the
    /// available index alone.
    pub fn setup_queue(&self) {
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&BUF_ADDR.to_le_bytes());
        desc[8..12].copy_from_slice(&BUF_LEN.to_le_bytes());
        desc[12..14].copy_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
        self.write(DESC_ADDR, &desc);
        self.write(AVAIL_ADDR, &[0u8; 4]); // flags, idx
        for i in 0..u64::from(QSIZE) {
            self.write_obj(AVAIL_ADDR + 4 + 2 * i, 0u16);
        }
        self.write(USED_ADDR, &[0u8; 4]);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.read_obj(USED_ADDR + 2)
    }

    /// Used-ring element `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = USED_ADDR + 4 + 8 * u64::from(i % QSIZE);
        (self.read_obj(at), self.read_obj(at + 4))
    }
}

/// A tiny x86 (32-bit protected mode) code emitter.
pub struct Asm {
    /// Guest physical address the code is built for.
    pub base: u64,
    /// The machine code.
    pub code: Vec<u8>,
}

impl Asm {
    /// Empty program at `base`.
    pub fn new(base: u64) -> Asm {
        Asm {
            base,
            code: Vec::new(),
        }
    }

    /// The address of the next instruction.
    pub fn here(&self) -> u64 {
        self.base + self.code.len() as u64
    }

    /// Raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn addr32(&mut self, addr: u64) {
        let a = u32::try_from(addr).expect("32-bit address");
        self.code.extend_from_slice(&a.to_le_bytes());
    }

    /// `mov eax, imm32`.
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.code.push(0xb8);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov [addr], eax` (a 4-byte store).
    pub fn store_eax(&mut self, addr: u64) -> &mut Self {
        self.code.push(0xa3);
        self.addr32(addr);
        self
    }

    /// `mov eax, [addr]` (a 4-byte load).
    pub fn load_eax(&mut self, addr: u64) -> &mut Self {
        self.code.push(0xa1);
        self.addr32(addr);
        self
    }

    /// A 4-byte write of `value` to register `offset` of the device window.
    pub fn mmio_write(&mut self, offset: u64, value: u32) -> &mut Self {
        self.mov_eax(value).store_eax(MMIO_BASE + offset)
    }

    /// A 4-byte read of register `offset`, stored at `MAILBOX + slot * 4`.
    pub fn mmio_read(&mut self, offset: u64, slot: u64) -> &mut Self {
        self.load_eax(MMIO_BASE + offset)
            .store_eax(MAILBOX + 4 * slot)
    }

    /// `mov dword [RESUME_PTR], imm32` with the address patched later by
    /// [`Asm::patch_resume`]; returns the patch position.
    pub fn set_resume(&mut self) -> usize {
        self.raw(&[0xc7, 0x05]);
        self.addr32(RESUME_PTR);
        let at = self.code.len();
        self.code.extend_from_slice(&[0; 4]);
        at
    }

    /// Make the `set_resume` at `at` store `target`.
    pub fn patch_resume(&mut self, at: usize, target: u64) {
        let t = u32::try_from(target).expect("32-bit address");
        self.code[at..at + 4].copy_from_slice(&t.to_le_bytes());
    }

    /// `inc word [addr]`.
    pub fn inc_word(&mut self, addr: u64) -> &mut Self {
        self.raw(&[0x66, 0xff, 0x05]);
        self.addr32(addr);
        self
    }

    /// `mov al, value; out port, al` (port below 0x100).
    pub fn out(&mut self, port: u16, value: u8) -> &mut Self {
        let port = u8::try_from(port).expect("8-bit port");
        self.raw(&[0xb0, value, 0xe6, port])
    }

    /// End phase `phase`: the vCPU loop returns it.
    pub fn done(&mut self, phase: u8) -> &mut Self {
        self.out(DONE_PORT, phase)
    }

    /// A short conditional or unconditional jump (`opcode` 0xeb, 0x74, ...)
    /// back to `target`.
    pub fn jump_back(&mut self, opcode: u8, target: u64) -> &mut Self {
        let rel = target as i64 - (self.here() as i64 + 2);
        let rel = i8::try_from(rel).expect("short jump");
        self.raw(&[opcode, rel as u8])
    }

    /// A near `jne` (0f 85 rel32) back to `target`.
    pub fn jne_near_back(&mut self, target: u64) -> &mut Self {
        let rel = target as i64 - (self.here() as i64 + 6);
        let rel = i32::try_from(rel).expect("near jump");
        self.raw(&[0x0f, 0x85]);
        self.code.extend_from_slice(&rel.to_le_bytes());
        self
    }
}

/// What the vCPU loop saw until the phase ended.
#[derive(Debug, Default)]
pub struct ExitLog {
    /// MMIO write exits, by offset in the device window.
    pub mmio_writes: BTreeMap<u64, usize>,
    /// MMIO read exits, by offset.
    pub mmio_reads: BTreeMap<u64, usize>,
    /// Every exit to user space.
    pub exits: usize,
}

impl ExitLog {
    /// MMIO write exits at `offset`.
    pub fn writes_at(&self, offset: u64) -> usize {
        self.mmio_writes.get(&offset).copied().unwrap_or(0)
    }
}

/// An MMIO access to the device window, as the vCPU loop hands it on.
pub enum Access<'a> {
    /// A guest read; fill the slice.
    Read(u64, &'a mut [u8]),
    /// A guest write.
    Write(u64, &'a [u8]),
}

/// Run the vCPU until the guest ends a phase (`out DONE_PORT`), handing
/// every access to the device window to `bus`. Returns the phase number and
/// what exited on the way. Panics on anything unexpected.
pub fn run_phase(vcpu: &mut VcpuFd, log: &mut ExitLog, mut bus: impl FnMut(Access)) -> u8 {
    loop {
        let exit = vcpu.run().unwrap_or_else(|e| panic!("KVM_RUN: {e}"));
        log.exits += 1;
        match exit {
            VcpuExit::IoOut(DONE_PORT, data) => return data[0],
            VcpuExit::MmioWrite(addr, data) if in_window(addr) => {
                let off = addr - MMIO_BASE;
                *log.mmio_writes.entry(off).or_default() += 1;
                bus(Access::Write(off, data));
            }
            VcpuExit::MmioRead(addr, data) if in_window(addr) => {
                let off = addr - MMIO_BASE;
                *log.mmio_reads.entry(off).or_default() += 1;
                bus(Access::Read(off, data));
            }
            VcpuExit::InternalError => {
                let run = vcpu.get_kvm_run();
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union (plain integers).
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let regs = vcpu.get_regs().unwrap();
                panic!(
                    "KVM internal error (suberror {}, data {:x?}) at rip {:#x} (rsi {:#x})",
                    internal.suberror,
                    &internal.data[..n],
                    regs.rip,
                    regs.rsi
                );
            }
            other => {
                let desc = format!("{other:?}");
                let regs = vcpu.get_regs().unwrap();
                panic!(
                    "unexpected vCPU exit {desc} at rip {:#x} (rax {:#x}, rsi {:#x})",
                    regs.rip, regs.rax, regs.rsi
                );
            }
        }
    }
}

fn in_window(addr: u64) -> bool {
    (MMIO_BASE..MMIO_BASE + 0x1000).contains(&addr)
}

/// Aborts the test process if not disarmed in time: a guest stuck in `hlt`
/// blocks `KVM_RUN` in the kernel, and a hung test is worse than a failed one.
pub struct Watchdog(Option<mpsc::Sender<()>>);

impl Watchdog {
    /// Arm for `limit`.
    pub fn arm(what: &'static str, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("WATCHDOG: {what} still running after {limit:?}; aborting");
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Wait until `cond` holds, up to 5 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Device ID of [`PatternDevice`] (outside the assigned range).
pub const PATTERN_DEVICE_ID: u32 = 0xfff1;
pub use virtio_backend_kit::features::VIRTIO_F_VERSION_1;

/// The byte [`PatternDevice`] writes at `offset` of the `n`-th chain (from 1).
pub fn pattern(n: u64, offset: usize) -> u8 {
    (n as u8).wrapping_mul(31) ^ (offset as u8)
}

/// A one-queue device that fills every device-writable buffer of a chain
/// with [`pattern`], returns the chain and signals the driver if it wants.
#[derive(Default)]
pub struct PatternDevice {
    /// `DeviceEvent::Queue` events seen (kicks plus one per queue start).
    pub queue_events: AtomicU64,
    /// Chains completed.
    pub chains: AtomicU64,
    /// Queue starts.
    pub starts: AtomicU64,
}

impl DeviceBackend for PatternDevice {
    type Vring = VringOwned;

    fn device_type(&self) -> u32 {
        PATTERN_DEVICE_ID
    }

    fn max_queue_size(&self) -> u16 {
        QSIZE
    }

    fn queue_started(&self, _index: u16) {
        self.starts.fetch_add(1, Ordering::SeqCst);
    }

    fn process_queue(&self, _index: u16, vring: &mut Vring) -> Result<(), BackendError> {
        self.queue_events.fetch_add(1, Ordering::SeqCst);
        let mut completed = 0;
        while let Some(chain) = vring.pop_chain()? {
            let n = self.chains.load(Ordering::SeqCst) + 1;
            let head = chain.head_index();
            let mem = chain.memory();
            let mut written = 0u32;
            for desc in chain.clone().filter(|d| d.is_write_only()) {
                let bytes: Vec<u8> = (0..desc.len() as usize)
                    .map(|i| pattern(n, written as usize + i))
                    .collect();
                mem.write_slice(&bytes, desc.addr())?;
                written += desc.len();
            }
            vring.add_used(head, written)?;
            self.chains.store(n, Ordering::SeqCst);
            completed += 1;
        }
        if completed > 0 {
            vring.notify_if_needed()?;
        }
        Ok(())
    }
}
