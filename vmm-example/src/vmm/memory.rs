// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM and the guest physical address map.
//!
//! RAM is one memfd mapped shared, so that a vhost-user backend in another
//! process can map the very same pages (the fd travels in
//! `SET_MEM_TABLE`). It starts at 0 and stays below [`layout::MMIO_START`],
//! which caps it at 3 GiB: enough for an example VMM, and there is no
//! hole to describe.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use virtio_backend_kit::memory::{DirtyLogBitmap, GuestRegionLog};
use virtio_backend_kit::vm_memory::mmap::MmapRegionBuilder;
use virtio_backend_kit::vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
};
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};

/// The guest physical address map.
pub mod layout {
    /// GDT of the boot CPU.
    pub const GDT_ADDR: u64 = 0x500;
    /// (Empty) IDT of the boot CPU.
    pub const IDT_ADDR: u64 = 0x520;
    /// The Linux zero page (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer of the boot CPU.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// Boot page tables: PML4, PDPT, then four page directories.
    pub const PML4_ADDR: u64 = 0x9000;
    /// The kernel command line.
    pub const CMDLINE_ADDR: u64 = 0x2_0000;
    /// Largest command line we pass (Linux's x86 limit is 2048).
    pub const CMDLINE_MAX: usize = 2048;
    /// End of low usable RAM (the EBDA and BIOS area start here).
    pub const LOW_RAM_END: u64 = 0x9_fc00;
    /// ACPI tables live in the BIOS area, where the kernel also looks for
    /// the RSDP when the zero page does not name it.
    pub const ACPI_START: u64 = 0xe_0000;
    /// End of the ACPI area.
    pub const ACPI_END: u64 = 0x10_0000;
    /// Start of high memory: the kernel is loaded here.
    pub const HIGH_RAM_START: u64 = 0x10_0000;
    /// First virtio-mmio window; guest RAM ends below it.
    pub const MMIO_START: u64 = 0xd000_0000;
    /// Size of one virtio-mmio window.
    pub const MMIO_WINDOW: u64 = 0x1000;
    /// The I/O APIC (emulated by KVM).
    pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
    /// The local APICs (emulated by KVM).
    pub const LAPIC_ADDR: u32 = 0xfee0_0000;
    /// KVM's TSS (three pages below the I/O APIC, never RAM).
    pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
    /// Largest guest RAM, in MiB.
    pub const MAX_MEM_MIB: u64 = MMIO_START >> 20;

    /// COM1.
    pub const SERIAL_PORT: u16 = 0x3f8;
    /// COM1's interrupt.
    pub const SERIAL_GSI: u32 = 4;
    /// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`).
    pub const SLEEP_CONTROL_PORT: u16 = 0x600;
    /// ACPI sleep status register (FADT `SLEEP_STATUS_REG`).
    pub const SLEEP_STATUS_PORT: u16 = 0x601;
    /// ACPI reset register (FADT `RESET_REG`), the conventional 0xcf9.
    pub const RESET_PORT: u16 = 0xcf9;
    /// Value the guest writes to [`RESET_PORT`] to reset.
    pub const RESET_VALUE: u8 = 0x6;
    /// The i8042 command port (0xfe there pulses the reset line).
    pub const I8042_COMMAND_PORT: u16 = 0x64;
    /// GSIs handed to virtio-mmio devices, in order: free ISA lines first
    /// (edge-triggered by default), then I/O APIC-only lines.
    pub const DEVICE_GSIS: [u32; 17] = [
        5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
    ];
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is out of range.
    #[error("guest memory of {0} MiB is not supported (64 to {max} MiB)", max = layout::MAX_MEM_MIB)]
    Size(u64),
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// Mapping the memory failed.
    #[error("cannot map guest memory")]
    Map(#[source] virtio_backend_kit::vm_memory::mmap::MmapRegionError),
    /// The region does not fit the address space.
    #[error("guest memory of {0} MiB does not fit the guest address space")]
    Region(u64),
    /// The dirty log for a migration could not be created.
    #[error("cannot create the dirty log")]
    DirtyLog(#[source] virtio_backend_kit::data_plane::SharedLogError),
}

/// Guest RAM and the dirty log its in-process writers log into.
#[derive(Debug)]
pub struct GuestRam {
    /// The memory, one memfd-backed region at 0.
    pub memory: GuestMemoryLog,
    /// Every write through `memory` is logged here while logging is on
    /// (a live migration), and vhost-user backends get the same file.
    pub log: std::sync::Arc<SharedDirtyLog>,
}

/// Create `mib` MiB of memfd-backed guest RAM at guest physical address 0,
/// with its dirty log (logging off).
pub fn create(mib: u64) -> Result<GuestRam, MemoryError> {
    if !(64..=layout::MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let size = mib << 20;
    let name = CString::from(c"vmm-example-ram");
    // SAFETY: `name` is a valid NUL-terminated string; the call has no
    // other memory effects and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let log = std::sync::Arc::new(SharedDirtyLog::new(size).map_err(MemoryError::DirtyLog)?);
    let mapping = MmapRegionBuilder::new_with_bitmap(
        size as usize,
        DirtyLogBitmap::new(log.log().clone(), 0),
    )
    .with_file_offset(FileOffset::new(file, 0))
    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
    .with_mmap_flags(libc::MAP_SHARED)
    .build()
    .map_err(MemoryError::Map)?;
    let region = GuestRegionLog::new(mapping, GuestAddress(0)).ok_or(MemoryError::Region(mib))?;
    let memory =
        GuestMemoryLog::from_regions(vec![region]).map_err(|_| MemoryError::Region(mib))?;
    Ok(GuestRam { memory, log })
}

/// The memfd behind guest RAM made by [`create`].
pub fn ram_file(memory: &GuestMemoryLog) -> Option<&File> {
    memory.iter().next()?.file_offset().map(FileOffset::file)
}
