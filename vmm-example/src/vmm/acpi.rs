// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ACPI tables: how a stock x86 Linux learns about our CPUs, our virtio-mmio
//! devices and how to power the machine off.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 event blocks, no SCI, no
//! PM timer. What the kernel needs from us is:
//!
//! - RSDP → XSDT → FADT, MADT; FADT → DSDT;
//! - a MADT with one local APIC per vCPU and the I/O APIC (Debian kernels
//!   are built without MP-table parsing, so without a MADT a guest sees one
//!   CPU);
//! - a DSDT with one `LNRO0005` device per virtio-mmio window (`_CRS`: the
//!   window and its interrupt), and an `_S5_` package;
//! - the FADT's sleep control and status registers, two I/O ports that
//!   [`super::bus::PowerDevice`] serves: writing `SLP_EN` with the `_S5_`
//!   type there is the guest's `poweroff`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::GuestMemoryLog;

use super::layout;

const OEM_ID: [u8; 6] = *b"VBKVMM";
const OEM_TABLE: [u8; 8] = *b"VBKEXAMP";

/// The sleep type the DSDT's `_S5_` announces (and the power device expects).
pub const S5_SLEEP_TYPE: u8 = 5;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the area reserved for them.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooBig(u64),
    /// Guest memory refused the write.
    #[error("cannot write ACPI tables to guest memory")]
    Write(#[source] virtio_backend_kit::vm_memory::GuestMemoryError),
    /// More CPUs than a MADT with 8-bit APIC IDs can describe.
    #[error("{0} vCPUs cannot be described (at most 254)")]
    TooManyCpus(u8),
}

/// A virtio-mmio window as the guest should see it.
#[derive(Clone, Copy, Debug)]
pub struct MmioWindow {
    /// Guest physical base.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Interrupt (GSI) of the device.
    pub gsi: u32,
}

fn serialize(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(devices: &[MmioWindow]) -> Vec<u8> {
    let mut body = Vec::new();
    // Per-device objects are built first so the AML tree can borrow them.
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<aml::Name> = (0..devices.len())
        .map(|i| aml::Name::new("_UID".into(), &i))
        .collect();
    let mems: Vec<aml::Memory32Fixed> = devices
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.size as u32))
        .collect();
    let irqs: Vec<aml::Interrupt> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.gsi))
        .collect();
    let templates: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m as &dyn Aml, i]))
        .collect();
    let crs: Vec<aml::Name> = templates
        .iter()
        .map(|t| aml::Name::new("_CRS".into(), t))
        .collect();
    let nodes: Vec<aml::Device> = (0..devices.len())
        .map(|i| {
            aml::Device::new(
                format!("VR{i:02X}").as_str().into(),
                vec![&hid, &uids[i], &crs[i]],
            )
        })
        .collect();
    // COM1, so the kernel routes its interrupt through the I/O APIC (a
    // hardware-reduced platform has no legacy PIC to fall back on).
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0usize);
    let com1_io = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_GSI);
    let com1_res = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(nodes.iter().map(|n| n as &dyn Aml));
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    let port = |addr: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            addr.into(),
        )
    };
    builder.sleep_control_reg = port(layout::SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = port(layout::SLEEP_STATUS_PORT);
    builder.reset_reg = port(layout::RESET_PORT);
    builder.reset_value = layout::RESET_VALUE;
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5); the
    // kernel then skips probing for them.
    builder.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    serialize(&builder.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    serialize(&madt)
}

/// Write RSDP, XSDT, FADT, MADT and DSDT into the reserved ACPI area and
/// return the RSDP's address (for `boot_params.acpi_rsdp_addr`).
pub fn write_tables(
    mem: &GuestMemoryLog,
    vcpus: u8,
    devices: &[MmioWindow],
) -> Result<GuestAddress, AcpiError> {
    if vcpus > 254 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let rsdp_addr = layout::ACPI_START;
    // Tables after the RSDP, each 8-byte aligned.
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut place = |len: usize| {
        next = next.next_multiple_of(8);
        let at = next;
        next += len as u64;
        at
    };
    let dsdt = dsdt(devices);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(vcpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = serialize(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = serialize(&Rsdp::new(OEM_ID, xsdt_addr));
    let end = place(0);
    if end > layout::ACPI_END {
        return Err(AcpiError::TooBig(end - layout::ACPI_START));
    }
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_checksummed_and_name_the_devices() {
        let windows = [
            MmioWindow {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            MmioWindow {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let d = dsdt(&windows);
        assert!(checksum_ok(&d));
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize,
            d.len()
        );
        let text = String::from_utf8_lossy(&d);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        assert!(text.contains("VR00") && text.contains("VR01") && text.contains("_S5_"));
        assert!(checksum_ok(&fadt(0x1000)));
        let m = madt(2);
        assert!(checksum_ok(&m));
        assert_eq!(&m[0..4], b"APIC");
    }
}
