// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Loading Linux: the bzImage, the initramfs, the command line and the zero
//! page (`boot_params` with the e820 map), plus the page tables and GDT the
//! 64-bit boot protocol expects to find when the boot CPU starts.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Cmdline, KernelLoader};
use virtio_backend_kit::vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
};
use virtio_backend_kit::GuestMemoryLog;

use super::layout;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": the setup header magic.
const HDR_MAGIC: u32 = 0x5372_6448;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// "Undefined" boot loader ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 1;

/// Errors loading the guest's software.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .0.display())]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The kernel file is not a bzImage we can boot.
    #[error("{} is not a bootable x86-64 bzImage: {}", .0.display(), .1)]
    BadKernel(PathBuf, String),
    /// The initramfs cannot be read.
    #[error("cannot open initramfs {}", .0.display())]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit in guest memory.
    #[error("initramfs {} ({} bytes) does not fit in guest memory", .0.display(), .1)]
    InitrdTooBig(PathBuf, u64),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be put in guest memory.
    #[error("cannot load the kernel command line")]
    LoadCmdline(#[source] loader::Error),
    /// Writing guest memory failed.
    #[error("cannot write boot data to guest memory")]
    Memory(#[source] GuestMemoryError),
}

/// Where the boot CPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// 64-bit entry point of the kernel.
    pub entry: GuestAddress,
    /// Address of the zero page (goes in `rsi`).
    pub zero_page: GuestAddress,
}

/// Load everything and fill the zero page. `rsdp` is where the ACPI tables
/// begin.
pub fn load_linux(
    mem: &GuestMemoryLog,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let bad = |why: String| BootError::BadKernel(kernel.to_path_buf(), why);
    let mut file = File::open(kernel).map_err(|e| BootError::OpenKernel(kernel.into(), e))?;
    let loaded = BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| bad("no setup header".into()))?;
    if hdr.header != HDR_MAGIC || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("no 64-bit boot protocol entry point".into()));
    }

    let mut params = boot_params::default();
    let mut line = Cmdline::new(layout::CMDLINE_MAX).map_err(BootError::Cmdline)?;
    line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &line)
        .map_err(BootError::LoadCmdline)?;
    hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH;
    hdr.boot_flag = 0xaa55;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, hdr.initrd_addr_max, loaded.kernel_end)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp.raw_value();

    let ram_end = mem.last_addr().raw_value() + 1;
    let e820 = [
        (0, layout::LOW_RAM_END, E820_RAM),
        (
            layout::LOW_RAM_END,
            layout::HIGH_RAM_START - layout::LOW_RAM_END,
            E820_RESERVED,
        ),
        (
            layout::HIGH_RAM_START,
            ram_end - layout::HIGH_RAM_START,
            E820_RAM,
        ),
    ];
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;

    let zero_page = GuestAddress(layout::ZERO_PAGE);
    mem.write_obj(params, zero_page)
        .map_err(BootError::Memory)?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootEntry {
        entry: loaded.kernel_load.unchecked_add(0x200),
        zero_page,
    })
}

/// Put the initramfs as high as the kernel allows, page aligned. Returns its
/// address and size.
fn load_initrd(
    mem: &GuestMemoryLog,
    path: &Path,
    addr_max: u32,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::OpenInitrd(path.into(), e))?
        .len();
    let too_big = || BootError::InitrdTooBig(path.into(), size);
    let ram_end = mem.last_addr().raw_value() + 1;
    let top = ram_end.min(u64::from(addr_max) + 1);
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(layout::HIGH_RAM_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            GuestMemoryError::IOError(io) => BootError::OpenInitrd(path.into(), io),
            other => BootError::Memory(other),
        })?;
    Ok((addr, size))
}

/// Identity-map the first 4 GiB with 2 MiB pages: PML4 → one PDPT → four
/// page directories.
fn write_page_tables(mem: &GuestMemoryLog) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pml4 = layout::PML4_ADDR;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    let w = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(BootError::Memory)
    };
    w(pdpt | PRESENT_RW, pml4)?;
    for dir in 0..4u64 {
        w((pd + dir * 0x1000) | PRESENT_RW, pdpt + dir * 8)?;
        for entry in 0..512u64 {
            let phys = ((dir << 9) | entry) << 21;
            w(phys | PRESENT_RW | HUGE, pd + dir * 0x1000 + entry * 8)?;
        }
    }
    Ok(())
}

/// GDT entries of the boot CPU: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryLog) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(BootError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(BootError::Memory)
}
