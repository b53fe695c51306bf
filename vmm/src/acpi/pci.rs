//! PCI in ACPI (`--transport pci`): the MCFG table locating ECAM, and in the DSDT the host bridge
//! `\_SB.PCI0` and a motherboard-resources device reserving the ECAM window.
//!
//! - MCFG: one allocation, segment 0, buses `0..=bus_end` at the ECAM base.
//! - `\_SB.PCI0`: `_HID PNP0A08` (PCI Express root bridge), `_CID PNP0A03` (PCI bus), segment and base bus
//!   0, `_CCA` (coherent DMA), and a `_CRS` with the bus range, the 0xCF8 configuration ports, the 32-bit
//!   window (DWordMemory) and the 64-bit window (QWordMemory). Linux assigns nothing outside `_CRS`; our BARs
//!   are placed by the VMM inside the 32-bit window and Linux keeps them.
//! - `\_SB.MRES`: `_HID PNP0C02` with the ECAM window as Memory32Fixed. Linux uses ECAM only when the MCFG
//!   area is reserved by firmware (in e820 or by a motherboard resource like this one); otherwise it falls back
//!   to the 0xCF8 ports, which reach only the first 256 bytes of each function.
//! - With `--pmem-hotplug`: the slot devices under `\_SB.PCI0`, the hotplug controller and the generic event
//!   device (see [`super::hotplug`]).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name,
    ResourceTemplate, IO,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_REVISION};
use crate::pci::PciLayout;

/// The MCFG table for `pci`.
pub(super) fn mcfg(pci: &PciLayout) -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, *b"DAXVMCFG", OEM_REVISION);
    t.add_ecam(pci.ecam_base, 0, 0, pci.bus_end);
    super::aml_bytes(&t)
}

/// `\_SB.PCI0` and `\_SB.MRES` for `pci`.
pub(super) fn dsdt_devices(pci: &PciLayout, sink: &mut Vec<u8>) {
    let bus = AddressSpace::new_bus_number(0u16, u16::from(pci.bus_end));
    let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let (m32, m32_len) = pci.mmio32;
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32 as u32,
        (m32 + m32_len - 1) as u32,
        None,
    );
    let (m64, m64_len) = pci.mmio64;
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m64,
        m64 + m64_len - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config_ports, &mmio32, &mmio64]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let seg = Name::new("_SEG".into(), &aml::ZERO);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let bbn = Name::new("_BBN".into(), &aml::ZERO);
    let cca = Name::new("_CCA".into(), &aml::ONE);
    let crs = Name::new("_CRS".into(), &crs);
    let slots = super::hotplug::PciSlots;
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &uid, &bbn, &cca, &crs];
    if pci.hotplug_irq.is_some() {
        children.push(&slots);
    }
    Device::new("_SB_.PCI0".into(), children).to_aml_bytes(sink);
    if let Some(irq) = pci.hotplug_irq {
        super::hotplug::platform_devices(irq, sink);
    }

    let ecam = Memory32Fixed::new(false, pci.ecam_base as u32, pci.ecam_size as u32);
    let crs = ResourceTemplate::new(vec![&ecam]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &aml::ONE);
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}
