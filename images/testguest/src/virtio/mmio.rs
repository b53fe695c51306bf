//! The virtio-mmio register window (virtio 1.x, section 4.2.2) and the device probe.

use core::ptr::{read_volatile, write_volatile};

use daxvisor_proto::boot::MmioDeviceInfo;

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
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// # Safety
    /// `base..base + MIN_WINDOW` must be a mapped virtio-mmio window (MMIO, not RAM the guest uses otherwise).
    pub unsafe fn new(base: u64) -> Self {
        Mmio { base }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped; offsets used are register offsets below MIN_WINDOW
        // or config offsets of the device.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
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
