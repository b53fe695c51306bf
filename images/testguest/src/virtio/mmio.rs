//! The virtio-mmio register window (virtio 1.x, section 4.2.2) and the device probe.

use core::ptr::{read_volatile, write_volatile};

use daxvisor_proto::boot::MmioDeviceInfo;

use super::pci::{self, PciRegs};

pub use daxvisor_proto::virtio_mmio::{MAGIC_VALUE, VERSION_MODERN};
pub const DEVICE_ID_PMEM: u32 = 27;
/// The registers up to and including the start of the config space must be inside the window.
pub const MIN_WINDOW: u64 = 0x200;

pub use daxvisor_proto::virtio_mmio::reg;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the second feature word.
pub const F_VERSION_1_HIGH: u32 = 1;

/// One device's register window. Every access is a single aligned 32-bit volatile load or store (a plain `mov`,
/// which the hypervisor decodes on the MMIO exit).
///
/// A virtio-pci function ([`Mmio::new_pci`]) is driven through the same virtio-mmio register offsets: each one
/// is translated to its field of the virtio-pci common configuration (with that field's width), the ISR, the
/// device configuration or the queue's notify address, so the drivers are the same for both transports.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
    pci: Option<PciRegs>,
}

impl Mmio {
    /// # Safety
    /// `base..base + MIN_WINDOW` must be a mapped virtio-mmio window (MMIO, not RAM the guest uses otherwise).
    pub unsafe fn new(base: u64) -> Self {
        Mmio { base, pci: None }
    }

    /// # Safety
    /// `regs` must be the virtio structures of a virtio-pci function the enumeration found in a mapped BAR.
    pub unsafe fn new_pci(regs: PciRegs) -> Self {
        Mmio {
            base: regs.common,
            pci: Some(regs),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// The virtio-pci structures, for a PCI function.
    pub fn pci(&self) -> Option<PciRegs> {
        self.pci
    }

    pub fn read(&self, offset: u64) -> u32 {
        if let Some(p) = self.pci {
            return pci_read(&p, offset);
        }
        // SAFETY: `new`'s contract: the window is mapped; offsets used are register offsets below MIN_WINDOW
        // or config offsets of the device.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    pub fn write(&self, offset: u64, value: u32) {
        if let Some(p) = self.pci {
            pci_write(&p, offset, value);
            return;
        }
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }
}

/// virtio-pci common configuration fields (virtio 1.2, 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
}

fn pci_read(p: &PciRegs, offset: u64) -> u32 {
    let c = p.common;
    match offset {
        reg::MAGIC => MAGIC_VALUE,
        reg::VERSION => VERSION_MODERN,
        reg::DEVICE_ID => p.device_id,
        reg::VENDOR_ID => u32::from(pci::VIRTIO_VENDOR),
        reg::DEVICE_FEATURES => pci::r32(c + common::DEVICE_FEATURE),
        // Right after a reset queue_size holds the maximum, which is when drivers read it.
        reg::QUEUE_NUM_MAX | reg::QUEUE_NUM => u32::from(pci::r16(c + common::QUEUE_SIZE)),
        reg::QUEUE_READY => u32::from(pci::r16(c + common::QUEUE_ENABLE)),
        reg::INTERRUPT_STATUS => u32::from(pci::r8(p.isr)),
        reg::STATUS => u32::from(pci::r8(c + common::DEVICE_STATUS)),
        reg::CONFIG_GENERATION => u32::from(pci::r8(c + common::CONFIG_GENERATION)),
        o if (reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH).contains(&o) && o & 0xf < 8 => {
            pci::r32(c + common::QUEUE_DESC + queue_address_offset(o))
        }
        o if o >= reg::CONFIG => pci::r32(p.device + (o - reg::CONFIG)),
        _ => 0,
    }
}

/// virtio-mmio's queue address registers (desc at 0x80, driver at 0x90, device at 0xa0, low then high) to
/// the offset from virtio-pci's queue_desc (desc, driver, device: 8 bytes each).
fn queue_address_offset(mmio_offset: u64) -> u64 {
    let field = (mmio_offset - reg::QUEUE_DESC_LOW) / 0x10;
    field * 8 + (mmio_offset & 4)
}

fn pci_write(p: &PciRegs, offset: u64, value: u32) {
    let c = p.common;
    match offset {
        reg::DEVICE_FEATURES_SEL => pci::w32(c + common::DEVICE_FEATURE_SELECT, value),
        reg::DRIVER_FEATURES_SEL => pci::w32(c + common::DRIVER_FEATURE_SELECT, value),
        reg::DRIVER_FEATURES => pci::w32(c + common::DRIVER_FEATURE, value),
        reg::QUEUE_SEL => pci::w16(c + common::QUEUE_SELECT, value as u16),
        reg::QUEUE_NUM => pci::w16(c + common::QUEUE_SIZE, value as u16),
        reg::QUEUE_READY => {
            // Before enabling: queue n raises MSI-X entry n, configuration changes the entry after the last
            // queue (the guest programmed one entry per queue plus one).
            let queue = pci::r16(c + common::QUEUE_SELECT);
            let queues = pci::r16(c + common::NUM_QUEUES);
            pci::w16(c + common::QUEUE_MSIX_VECTOR, queue);
            pci::w16(c + common::CONFIG_MSIX_VECTOR, queues);
            pci::w16(c + common::QUEUE_ENABLE, value as u16);
        }
        reg::QUEUE_NOTIFY => {
            let selected = pci::r16(c + common::QUEUE_SELECT);
            pci::w16(c + common::QUEUE_SELECT, value as u16);
            let off = u64::from(pci::r16(c + common::QUEUE_NOTIFY_OFF));
            pci::w16(c + common::QUEUE_SELECT, selected);
            pci::w16(
                p.notify + off * u64::from(p.notify_multiplier),
                value as u16,
            );
        }
        reg::STATUS => pci::w8(c + common::DEVICE_STATUS, value as u8),
        o if (reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH).contains(&o) && o & 0xf < 8 => {
            pci::w32(c + common::QUEUE_DESC + queue_address_offset(o), value)
        }
        o if o >= reg::CONFIG => pci::w32(p.device + (o - reg::CONFIG), value),
        // INTERRUPT_ACK: reading the ISR clears it on PCI; nothing else maps.
        _ => {}
    }
}

/// What the registers of a window say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probed {
    pub version: u32,
    pub device_id: u32,
    pub vendor_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// The window is too small or not in the mapped space; not touched.
    BadWindow {
        base: u64,
        size: u64,
    },
    BadMagic(u32),
    BadVersion(u32),
    /// The device id register differs from the BootInfo entry.
    WrongDevice {
        found: u32,
        listed: u32,
    },
}

impl core::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ProbeError::BadWindow { base, size } => {
                write!(f, "window {base:#x} size {size:#x} is unusable")
            }
            ProbeError::BadMagic(m) => write!(f, "magic {m:#x} (expected {MAGIC_VALUE:#x})"),
            ProbeError::BadVersion(v) => write!(f, "version {v} (expected {VERSION_MODERN})"),
            ProbeError::WrongDevice { found, listed } => {
                write!(f, "device id {found}, BootInfo lists {listed}")
            }
        }
    }
}

/// Read magic, version, device id and vendor of a window and check them against the BootInfo entry.
///
/// # Safety
/// If `is_mapped(info.base, info.size)` holds, the window must be MMIO (reads have no side effects on RAM).
pub unsafe fn probe(
    info: &MmioDeviceInfo,
    is_mapped: impl Fn(u64, u64) -> bool,
) -> Result<Probed, ProbeError> {
    if info.size < MIN_WINDOW || !info.base.is_multiple_of(4) || !is_mapped(info.base, info.size) {
        return Err(ProbeError::BadWindow {
            base: info.base,
            size: info.size,
        });
    }
    // SAFETY: checked above that the window is large enough and mapped; caller vouches it is MMIO.
    let mmio = unsafe { Mmio::new(info.base) };
    let magic = mmio.read(reg::MAGIC);
    if magic != MAGIC_VALUE {
        return Err(ProbeError::BadMagic(magic));
    }
    let version = mmio.read(reg::VERSION);
    if version != VERSION_MODERN {
        return Err(ProbeError::BadVersion(version));
    }
    let device_id = mmio.read(reg::DEVICE_ID);
    if device_id != info.device_id {
        return Err(ProbeError::WrongDevice {
            found: device_id,
            listed: info.device_id,
        });
    }
    let vendor_id = mmio.read(reg::VENDOR_ID);
    Ok(Probed {
        version,
        device_id,
        vendor_id,
    })
}

/// Device type names (virtio 1.x, section 5).
pub fn device_name(id: u32) -> &'static str {
    match id {
        0 => "none",
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "entropy",
        5 => "balloon",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        26 => "fs",
        DEVICE_ID_PMEM => "pmem",
        _ => "other",
    }
}
