//! ACPI tables for the guest: RSDP, XSDT, FADT, MADT, a DSDT describing the platform devices, and with
//! `--transport pci` an MCFG and the PCI host bridge (module `pci`).
//!
//! A stock distribution kernel has no `virtio_mmio.device=` on its command line and no device tree on x86, so
//! ACPI is how it finds our virtio-mmio windows (DSDT devices with `_HID "LNRO0005"`, matched by the
//! `virtio_mmio` driver's ACPI table), the COM1 UART and the i8042.
//!
//! Placement: everything lives in `[layout::RSDP_ADDR, layout::ACPI_TABLES_END)`, i.e. 0xE0000..0x100000. Linux
//! scans that BIOS area for the "RSD PTR " signature on 16-byte boundaries when the boot protocol does not hand
//! it the RSDP address, so the RSDP sits at its start and the tables follow. The whole area is assembled in a
//! host buffer first and written with one copy, so an error (too many devices, tables too large, memory not
//! mapped) leaves guest memory untouched.
//!
//! Layout of the area: RSDP, DSDT, FADT, MADT, (MCFG), XSDT, each 16-byte aligned.

mod dsdt;
mod fadt;
mod hotplug;
mod madt;
mod pci;
pub mod viot;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout;

/// OEM ID in every table header (6 bytes, padded).
const OEM_ID: [u8; 6] = *b"DAXVSR";
/// OEM revision of our tables; bump when a table's content changes meaning.
const OEM_REVISION: u32 = 1;
/// Tables are placed on 16-byte boundaries: the RSDP must be (the legacy scan only looks there), the others
/// only need natural alignment, and one rule is simpler to check.
const TABLE_ALIGN: u64 = 16;

/// One virtio-mmio device as the DSDT describes it: its register window and its IOAPIC line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioAcpi {
    /// Guest physical base of the register window (must be below 4 GiB: Memory32Fixed).
    pub base: u64,
    /// Length of the window in bytes.
    pub size: u64,
    /// IOAPIC input (GSI) the device interrupts on.
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe {count} virtio-mmio devices in ACPI: at most {max}")]
    TooManyDevices { count: usize, max: usize },
    #[error(
        "virtio-mmio device {index}: window {base:#x}+{size:#x} is empty or not entirely below 4 GiB"
    )]
    DeviceWindow { index: usize, base: u64, size: u64 },
    #[error("virtio-mmio devices {first} and {second}: windows overlap")]
    DeviceWindowsOverlap { first: usize, second: usize },
    #[error(
        "virtio-mmio device {index}: IRQ {irq} is not a free IOAPIC line (0..{pins}, without the legacy lines {reserved:?})",
        pins = madt::IOAPIC_PINS,
        reserved = dsdt::RESERVED_IRQS
    )]
    DeviceIrq { index: usize, irq: u32 },
    #[error("virtio-mmio devices {first} and {second} both use IRQ {irq}")]
    DeviceIrqShared {
        first: usize,
        second: usize,
        irq: u32,
    },
    #[error("cannot describe {0} vCPUs in the MADT: 1..={max} (xAPIC IDs)", max = madt::MAX_CPUS)]
    CpuCount(u8),
    #[error(
        "ACPI tables need {needed} bytes from {start:#x} but only {available} fit below {end:#x}",
        start = layout::RSDP_ADDR,
        end = layout::ACPI_TABLES_END
    )]
    TablesTooLarge { needed: u64, available: u64 },
    #[error("guest memory does not cover the ACPI area {start:#x}..{end:#x}")]
    AreaNotMapped { start: u64, end: u64 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the ACPI tables for `num_cpus` vCPUs (APIC IDs 0..num_cpus) and the given virtio-mmio devices, writes
/// them into guest memory and returns the RSDP address.
///
/// What the caller owes the guest:
/// - Guest RAM must be mapped over the tables (0xE0000 up to at most 0x100000); otherwise `AreaNotMapped`.
/// - The e820 map must not offer 0xA0000..0x100000 as usable RAM (RAM is `[0, 0x9fc00)` and from 1 MiB). Linux
///   trims 640K..1M itself, but the tables must never be handed out as free memory; marking
///   `[RSDP_ADDR, ACPI_TABLES_END)` as E820 reserved is the explicit form.
/// - For a Linux guest, also put the returned address in `boot_params.acpi_rsdp_addr` (boot protocol 2.14+);
///   older kernels and the fallback path find it by scanning 0xE0000..0xFFFFF.
/// - `virtio_devices[n]` becomes `\_SB.VRnn` with `_UID n`; pass every virtio-mmio device that is registered on
///   the bus, with the window and GSI it really uses (edge-triggered irqfd).
/// - vCPU n must have APIC ID n (KVM's default for vCPU id n).
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio_devices: &[VirtioMmioAcpi],
) -> Result<GuestAddress, AcpiError> {
    create_acpi_tables_with_pci(mem, num_cpus, virtio_devices, None)
}

/// As [`create_acpi_tables`], and with `pci` also an MCFG table, the PCI host bridge `\_SB.PCI0` and the ECAM
/// reservation `\_SB.MRES` (module `acpi::pci`).
pub fn create_acpi_tables_with_pci(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio_devices: &[VirtioMmioAcpi],
    pci: Option<&crate::pci::PciLayout>,
) -> Result<GuestAddress, AcpiError> {
    let area = build_acpi_area(num_cpus, virtio_devices, pci)?;
    let start = GuestAddress(layout::RSDP_ADDR);
    if !mem.check_range(start, area.bytes.len()) {
        return Err(AcpiError::AreaNotMapped {
            start: layout::RSDP_ADDR,
            end: layout::RSDP_ADDR + area.bytes.len() as u64,
        });
    }
    mem.write_slice(&area.bytes, start)?;
    tracing::debug!(
        rsdp = format_args!("{:#x}", layout::RSDP_ADDR),
        xsdt = format_args!("{:#x}", area.xsdt),
        fadt = format_args!("{:#x}", area.fadt),
        madt = format_args!("{:#x}", area.madt),
        dsdt = format_args!("{:#x}", area.dsdt),
        mcfg = ?area.mcfg,
        bytes = area.bytes.len(),
        cpus = num_cpus,
        virtio_devices = virtio_devices.len(),
        "ACPI tables written"
    );
    Ok(start)
}

/// The ACPI area as it will appear in guest memory from `layout::RSDP_ADDR`, with where each table landed.
struct AcpiArea {
    bytes: Vec<u8>,
    dsdt: u64,
    fadt: u64,
    madt: u64,
    xsdt: u64,
    mcfg: Option<u64>,
}

/// Places the tables one after another, 16-byte aligned, into a buffer that starts at `RSDP_ADDR`.
struct AreaBuilder {
    bytes: Vec<u8>,
}

impl AreaBuilder {
    /// Guest address the next table will get.
    fn next_addr(&self) -> u64 {
        layout::RSDP_ADDR + layout::align_up(self.bytes.len() as u64, TABLE_ALIGN)
    }

    fn push(&mut self, table: &[u8]) -> u64 {
        let addr = self.next_addr();
        self.bytes.resize((addr - layout::RSDP_ADDR) as usize, 0);
        self.bytes.extend_from_slice(table);
        addr
    }
}

fn build_acpi_area(
    num_cpus: u8,
    devices: &[VirtioMmioAcpi],
    pci: Option<&crate::pci::PciLayout>,
) -> Result<AcpiArea, AcpiError> {
    dsdt::validate_devices(devices)?;
    let dsdt = dsdt::build(devices, pci);
    let madt = madt::build(num_cpus)?;

    let mut area = AreaBuilder { bytes: Vec::new() };
    // The RSDP points at the XSDT, which comes last; reserve its room now and fill it in at the end.
    area.push(&vec![0u8; Rsdp::len()]);
    let dsdt_addr = area.push(dsdt.as_slice());
    let fadt_addr = area.push(&fadt::build(dsdt_addr, pci.is_some()));
    let madt_addr = area.push(madt.as_slice());
    let mcfg_addr = pci.map(|p| area.push(&pci::mcfg(p)));
    let viot_addr = pci
        .and_then(|p| p.viot.as_ref())
        .map(|t| area.push(&viot::build(t)));
    let mut xsdt = XSDT::new(OEM_ID, *b"DAXVXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(a) = mcfg_addr {
        xsdt.add_entry(a);
    }
    if let Some(a) = viot_addr {
        xsdt.add_entry(a);
    }
    let xsdt_addr = area.push(&aml_bytes(&xsdt));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    area.bytes[..rsdp.len()].copy_from_slice(&rsdp);

    check_fits(area.bytes.len())?;
    Ok(AcpiArea {
        bytes: area.bytes,
        dsdt: dsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        xsdt: xsdt_addr,
        mcfg: mcfg_addr,
    })
}

/// The tables must end below `ACPI_TABLES_END`: above it is the kernel's load address.
fn check_fits(len: usize) -> Result<(), AcpiError> {
    let needed = len as u64;
    let available = layout::ACPI_TABLES_END - layout::RSDP_ADDR;
    if needed > available {
        return Err(AcpiError::TablesTooLarge { needed, available });
    }
    Ok(())
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests;
