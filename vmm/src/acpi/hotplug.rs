//! ACPI PCI hotplug (`--pmem-hotplug`), the way QEMU's and Cloud Hypervisor's firmware tables do it, so the
//! stock Linux `acpiphp` driver acts on it:
//!
//! - `\_SB.GED_` (`ACPI0013`, the generic event device): its interrupt (edge, active high; the VMM pulses it
//!   through an irqfd) runs `_EVT`, which calls `\_SB.PCI0.PCNT`.
//! - `\_SB.PHPR` (`PNP0A06`): the register block ([`crate::hotplug::registers`]) as a SystemIO operation region
//!   with the fields PCIU, PCID, B0EJ, a mutex, and `PCEJ(slot)` writing the slot's bit to B0EJ.
//! - Under `\_SB.PCI0`: one `Snnn` device per slot 1..31 (`_ADR` = slot << 16, `_SUN`, `_EJ0` calling PCEJ), and
//!   `PCNT`: read PCIU and PCID (each read clears them) and `Notify` each slot with 1 (device check: `acpiphp`
//!   rescans the slot and binds the new function) or 3 (eject request: `acpiphp` unbinds the driver, then calls
//!   the slot's `_EJ0`, which is the guest's acknowledgement the VMM waits for).
//!
//! Why ACPI hotplug and not native PCIe hotplug on a root port: bus 0 is a conventional PCI bus with the
//! functions on it directly (no root ports or bridges to put a slot capability on), every x86 Linux with ACPI has
//! `acpiphp` built in, and the eject acknowledgement is one port write the test guest can make from ring 3 too.

use acpi_tables::aml::{
    self, Acquire, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Method, MethodCall, Mutex, Name, Notify, OpRegion,
    OpRegionSpace, Path, Release, ResourceTemplate, Return, ShiftLeft, IO,
};
use acpi_tables::Aml;

use crate::hotplug::registers;

/// Highest slot number on bus 0 (0 is the host bridge).
const SLOTS: u8 = 31;

/// `\_SB.GED_` on `irq` and `\_SB.PHPR`.
pub(super) fn platform_devices(irq: u32, sink: &mut Vec<u8>) {
    let port = registers::PORT as u16;
    let len = registers::LEN as u8;
    let io = IO::new(port, port, 1, len);
    let crs = ResourceTemplate::new(vec![&io]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A06"));
    let uid = Name::new("_UID".into(), &"PCI Hotplug Controller");
    let sta = Name::new("_STA".into(), &0x0bu8);
    let crs = Name::new("_CRS".into(), &crs);
    let mutex = Mutex::new("BLCK".into(), 0);
    let base = registers::PORT as usize;
    let region_len = registers::LEN as usize;
    let region = OpRegion::new("PCST".into(), OpRegionSpace::SystemIO, &base, &region_len);
    let fields = Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let acquire = Acquire::new("BLCK".into(), 0xffff);
    let b0ej = Path::new("B0EJ");
    let shift = ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
    let release = Release::new("BLCK".into());
    let ret = Return::new(&aml::ZERO);
    let pcej = Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![&acquire, &shift, &release, &ret],
    );
    Device::new(
        "_SB_.PHPR".into(),
        vec![&hid, &uid, &sta, &crs, &mutex, &region, &fields, &pcej],
    )
    .to_aml_bytes(sink);

    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let irq = Interrupt::new(true, true, false, false, irq);
    let crs = ResourceTemplate::new(vec![&irq]);
    let crs = Name::new("_CRS".into(), &crs);
    let call = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&call]);
    Device::new("_SB_.GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);
}

struct Slot(u8);

impl Aml for Slot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let sun = Name::new("_SUN".into(), &u32::from(self.0));
        let adr = Name::new("_ADR".into(), &(u32::from(self.0) << 16));
        let sun_path = Path::new("_SUN");
        let call = MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun_path]);
        let ej0 = Method::new("_EJ0".into(), 1, true, vec![&call]);
        Device::new(slot_name(self.0).as_str().into(), vec![&sun, &adr, &ej0]).to_aml_bytes(sink)
    }
}

/// `If ((Arg0 & (1 << slot)) == (1 << slot)) { Notify (Snnn, Arg1) }`
struct SlotNotify(u8);

impl Aml for SlotNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let mask = 1u32 << self.0;
        aml::And::new(&aml::Local(0), &aml::Arg(0), &mask).to_aml_bytes(sink);
        let path = Path::new(&slot_name(self.0));
        let notify = Notify::new(&path, &aml::Arg(1));
        If::new(&Equal::new(&aml::Local(0), &mask), vec![&notify]).to_aml_bytes(sink);
    }
}

fn slot_name(slot: u8) -> String {
    format!("S{slot:03}")
}

/// The slot devices and `DVNT` / `PCNT`, as children of `\_SB.PCI0`.
pub(super) struct PciSlots;

impl Aml for PciSlots {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for s in 1..=SLOTS {
            Slot(s).to_aml_bytes(sink);
        }
        let notifies: Vec<SlotNotify> = (1..=SLOTS).map(SlotNotify).collect();
        let refs: Vec<&dyn Aml> = notifies.iter().map(|n| n as &dyn Aml).collect();
        Method::new("DVNT".into(), 2, true, refs).to_aml_bytes(sink);
        let acquire = Acquire::new("\\_SB_.PHPR.BLCK".into(), 0xffff);
        let pciu = Path::new("\\_SB_.PHPR.PCIU");
        let pcid = Path::new("\\_SB_.PHPR.PCID");
        let up = MethodCall::new("DVNT".into(), vec![&pciu, &aml::ONE]);
        let three = 3u8;
        let down = MethodCall::new("DVNT".into(), vec![&pcid, &three]);
        let release = Release::new("\\_SB_.PHPR.BLCK".into());
        Method::new("PCNT".into(), 0, true, vec![&acquire, &up, &down, &release])
            .to_aml_bytes(sink);
    }
}
