//! DSDT: the platform devices Linux enumerates through ACPI.
//!
//! - `\_SB.VRnn` per virtio-mmio device, `_HID "LNRO0005"`: the ID the Linux `virtio_mmio` driver lists in
//!   its ACPI match table (the same ID QEMU, Firecracker and Cloud Hypervisor use). `_CRS` is the register window
//!   (Memory32Fixed) and the interrupt. The interrupt is edge-triggered, active high, exclusive, as Firecracker
//!   declares it: the VMM signals it through a plain KVM irqfd, which pulses the IOAPIC line (assert, deassert)
//!   rather than holding a level until the guest acknowledges (a level line would stay blocked on the IOAPIC's
//!   remote-IRR and drop a second pulse that arrives before the EOI). Edge/high is also the ISA convention for
//!   lines below 16, so an OS that assumes ISA defaults there sees the same thing.
//! - `\_SB.COM1` (`PNP0501`, IO 0x3f8-0x3ff, IRQ 4): the 8250 PNP driver binds it, so the console port is a
//!   described device rather than a guessed legacy port.
//! - `\_SB.PS2_` (`PNP0303`, IO 0x60 and 0x64, IRQ 1): the i8042 driver finds the controller through PNP. Only the
//!   reset line is emulated (no keyboard interrupt is ever raised), but describing the controller is what real
//!   firmware does and keeps Linux from probing blindly; the reboot path (`reboot=k`, or the FADT reset register)
//!   writes 0xFE to port 0x64.
//!
//! - With `--transport pci`: the host bridge `\_SB.PCI0` and `\_SB.MRES` (see [`super::pci`]).
//!
//! No `_STA` methods: an absent `_STA` means present, enabled and functioning.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{madt, AcpiError, VirtioMmioAcpi, OEM_ID, OEM_REVISION};
use crate::layout;

/// COM1 register block: 8 ports from the base.
const COM1_PORT: u16 = daxvisor_proto::boot::SERIAL_PORT;
const COM1_PORTS: u8 = 8;
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_KBD_IRQ: u32 = 1;

/// Legacy lines a virtio-mmio device may not take: 0 (PIT), 1 (i8042 keyboard), 2 (PIC cascade on real PCs),
/// 4 (COM1).
pub(super) const RESERVED_IRQS: [u32; 4] = [0, I8042_KBD_IRQ, 2, layout::SERIAL_IRQ];

/// DSDT revision 2: integers are 64 bits wide (revision 1 would truncate them to 32).
const DSDT_REVISION: u8 = 2;

/// Rejects device lists the DSDT cannot describe truthfully.
pub(super) fn validate_devices(devices: &[VirtioMmioAcpi]) -> Result<(), AcpiError> {
    // One IOAPIC line each, and the names VR00..VR99 must stay 4 characters.
    if devices.len() > layout::MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices {
            count: devices.len(),
            max: layout::MAX_VIRTIO_DEVICES,
        });
    }
    for (index, d) in devices.iter().enumerate() {
        let end = d.base.checked_add(d.size);
        if d.size == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(AcpiError::DeviceWindow {
                index,
                base: d.base,
                size: d.size,
            });
        }
        if d.irq >= madt::IOAPIC_PINS || RESERVED_IRQS.contains(&d.irq) {
            return Err(AcpiError::DeviceIrq { index, irq: d.irq });
        }
        for (first, other) in devices[..index].iter().enumerate() {
            if other.irq == d.irq {
                return Err(AcpiError::DeviceIrqShared {
                    first,
                    second: index,
                    irq: d.irq,
                });
            }
            if other.base < d.base + d.size && d.base < other.base + other.size {
                return Err(AcpiError::DeviceWindowsOverlap {
                    first,
                    second: index,
                });
            }
        }
    }
    Ok(())
}

/// Builds the DSDT; `devices` must have passed [`validate_devices`].
pub(super) fn build(devices: &[VirtioMmioAcpi], pci: Option<&crate::pci::PciLayout>) -> Sdt {
    let mut body = Vec::new();
    s5(&mut body);
    com1(&mut body);
    i8042(&mut body);
    for (index, d) in devices.iter().enumerate() {
        virtio_mmio(index, d, &mut body);
    }
    if let Some(pci) = pci {
        super::pci::dsdt_devices(pci, &mut body);
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"DAXVDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt
}

/// `\_SB.VRnn`; the `_UID` is the device's index so the names and IDs match.
fn virtio_mmio(index: usize, d: &VirtioMmioAcpi, sink: &mut Vec<u8>) {
    // validate_devices guarantees the window is below 4 GiB and index < 100.
    let (base, size) = (d.base as u32, d.size as u32);
    let uid = index as u32;
    let window = Memory32Fixed::new(true, base, size);
    let irq = edge_high_exclusive(d.irq);
    let crs = ResourceTemplate::new(vec![&window, &irq]);
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &uid);
    // _CCA: DMA is cache coherent. x86 Linux assumes it anyway; stating it keeps the device honest for any
    // OS that reads it (QEMU and Firecracker declare it too).
    let cca = Name::new("_CCA".into(), &aml::ONE);
    let crs = Name::new("_CRS".into(), &crs);
    let path = format!("_SB_.VR{index:02}");
    Device::new(path.as_str().into(), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(sink);
}

/// `\_S5_`: soft-off, with the sleep type the sleep control register (devices::legacy::acpi_sleep) acts on.
fn s5(sink: &mut Vec<u8>) {
    let typ = daxvisor_devices::legacy::acpi_sleep::S5_SLEEP_TYPE;
    let package = aml::Package::new(vec![&typ]);
    Name::new("_S5_".into(), &package).to_aml_bytes(sink);
}

/// `\_SB.COM1`: the 16550 at 0x3f8 on IRQ 4.
fn com1(sink: &mut Vec<u8>) {
    let ports = IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORTS);
    let irq = edge_high_exclusive(layout::SERIAL_IRQ);
    let crs = ResourceTemplate::new(vec![&ports, &irq]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// `\_SB.PS2_`: the i8042 data (0x60) and command/status (0x64) ports, keyboard IRQ 1.
fn i8042(sink: &mut Vec<u8>) {
    let data = IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let command = IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let irq = edge_high_exclusive(I8042_KBD_IRQ);
    let crs = ResourceTemplate::new(vec![&data, &command, &irq]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0303"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("_SB_.PS2_".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// Extended interrupt descriptor: consumer, edge-triggered, active high, exclusive.
fn edge_high_exclusive(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}
