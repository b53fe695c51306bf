//! virtio-pci for the test guest (virtio 1.x, section 4.1): enumerate bus 0 through ECAM, size BAR 0, find the
//! virtio capabilities and the MSI-X table, program one MSI-X vector per queue plus one for configuration
//! changes, and hand the function to the drivers through the same register interface as a virtio-mmio window
//! ([`super::mmio::Mmio`] translates each virtio-mmio register to its place in the common configuration).
//!
//! The MSI-X messages target the boot CPU's local APIC (0xfee0_0000) with vectors from [`MSI_VECTOR_BASE`] up.
//! The guest keeps interrupts disabled (it has no IDT), so a delivered interrupt stays pending in the local
//! APIC's IRR, where [`lapic_irr_has`] sees it: proof that the VMM's GSI route and irqfd delivered the vector.

use core::ptr::{read_volatile, write_volatile};

/// The virtio PCI vendor id.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// First interrupt vector the guest gives MSI-X entries (above the exceptions and legacy IRQ vectors).
pub const MSI_VECTOR_BASE: u8 = 0x40;
/// Last usable vector.
const MSI_VECTOR_LAST: u8 = 0xef;
/// The boot CPU's local APIC.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_IRR: u64 = 0x200;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;

/// Where a function's virtio structures are (absolute guest-physical addresses in BAR 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciRegs {
    pub common: u64,
    pub isr: u64,
    pub device: u64,
    pub notify: u64,
    pub notify_multiplier: u32,
    /// Virtio device id (PCI device id - 0x1040).
    pub device_id: u32,
    /// Interrupt vector of MSI-X entry 0; entry n is `first_vector + n`.
    pub first_vector: u8,
    /// The MSI-X table and pending-bit array.
    pub msix_table: u64,
    pub msix_pba: u64,
}

/// A virtio function found on the bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciFunction {
    pub device: u8,
    pub bar0: u64,
    pub bar0_size: u64,
    pub msix_vectors: u16,
    pub regs: PciRegs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// BAR 0 is not a 64-bit memory BAR, or sizes to nothing.
    BadBar { low: u32, size: u64 },
    /// A virtio structure is missing, in another BAR, or outside BAR 0.
    BadCapability(&'static str),
    /// No MSI-X capability, or its table is not in BAR 0.
    NoMsix,
    /// Not enough interrupt vectors left.
    OutOfVectors,
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PciError::BadBar { low, size } => write!(f, "BAR 0 {low:#x} sizes to {size:#x}"),
            PciError::BadCapability(what) => {
                write!(f, "virtio {what} capability missing or outside BAR 0")
            }
            PciError::NoMsix => write!(f, "no MSI-X capability with its table in BAR 0"),
            PciError::OutOfVectors => write!(f, "out of interrupt vectors"),
        }
    }
}

/// Configuration space of bus 0 through ECAM.
#[derive(Clone, Copy)]
pub struct Ecam {
    base: u64,
}

impl Ecam {
    /// # Safety
    /// `base..base + 1 MiB` must be the ECAM window of bus 0 (MMIO, mapped).
    pub unsafe fn new(base: u64) -> Self {
        Ecam { base }
    }

    fn addr(&self, device: u8, offset: u16) -> u64 {
        self.base + (u64::from(device & 0x1f) << 15) + u64::from(offset & 0xfff)
    }

    pub fn read32(&self, device: u8, offset: u16) -> u32 {
        // SAFETY: `new`'s contract; the address is inside bus 0's window and aligned by the callers.
        unsafe { read_volatile(self.addr(device, offset & !3) as *const u32) }
    }

    pub fn read16(&self, device: u8, offset: u16) -> u16 {
        // SAFETY: as for `read32`.
        unsafe { read_volatile(self.addr(device, offset & !1) as *const u16) }
    }

    pub fn read8(&self, device: u8, offset: u16) -> u8 {
        // SAFETY: as for `read32`.
        unsafe { read_volatile(self.addr(device, offset) as *const u8) }
    }

    pub fn write32(&self, device: u8, offset: u16, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { write_volatile(self.addr(device, offset & !3) as *mut u32, value) }
    }

    pub fn write16(&self, device: u8, offset: u16, value: u16) {
        // SAFETY: as for `read32`.
        unsafe { write_volatile(self.addr(device, offset & !1) as *mut u16, value) }
    }
}

/// Volatile access to BAR memory at an absolute address.
pub fn r8(addr: u64) -> u8 {
    // SAFETY: callers pass addresses inside a BAR the enumeration found (MMIO below 4 GiB, identity mapped).
    unsafe { read_volatile(addr as *const u8) }
}
pub fn r16(addr: u64) -> u16 {
    // SAFETY: as for `r8`.
    unsafe { read_volatile(addr as *const u16) }
}
pub fn r32(addr: u64) -> u32 {
    // SAFETY: as for `r8`.
    unsafe { read_volatile(addr as *const u32) }
}
pub fn w8(addr: u64, v: u8) {
    // SAFETY: as for `r8`.
    unsafe { write_volatile(addr as *mut u8, v) }
}
pub fn w16(addr: u64, v: u16) {
    // SAFETY: as for `r8`.
    unsafe { write_volatile(addr as *mut u16, v) }
}
pub fn w32(addr: u64, v: u32) {
    // SAFETY: as for `r8`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Size BAR 0 the standard way: memory decoding off, write all ones, read the mask back, restore.
fn size_bar0(ecam: &Ecam, dev: u8) -> Result<(u64, u64), PciError> {
    let command = ecam.read16(dev, 0x04);
    ecam.write16(dev, 0x04, command & !0x2);
    let low = ecam.read32(dev, 0x10);
    let high = ecam.read32(dev, 0x14);
    ecam.write32(dev, 0x10, u32::MAX);
    ecam.write32(dev, 0x14, u32::MAX);
    let mask = (u64::from(ecam.read32(dev, 0x14)) << 32) | u64::from(ecam.read32(dev, 0x10) & !0xf);
    ecam.write32(dev, 0x10, low);
    ecam.write32(dev, 0x14, high);
    ecam.write16(dev, 0x04, command | 0x6);
    let size = (!mask).wrapping_add(1);
    // Memory BAR, 64-bit type.
    if low & 0x7 != 0x4 || size == 0 || !size.is_power_of_two() {
        return Err(PciError::BadBar { low, size });
    }
    let base = (u64::from(high) << 32) | u64::from(low & !0xf);
    Ok((base, size))
}

/// Probe device `dev` of bus 0: `Ok(None)` if it is absent or not a modern virtio device.
/// `next_vector` is the first free interrupt vector; it advances past the vectors this function takes.
pub fn probe_function(
    ecam: &Ecam,
    dev: u8,
    next_vector: &mut u8,
) -> Result<Option<PciFunction>, PciError> {
    let vendor = ecam.read16(dev, 0);
    let device_id = ecam.read16(dev, 2);
    if vendor != VIRTIO_VENDOR || !(0x1040..=0x107f).contains(&device_id) {
        return Ok(None);
    }
    let (bar0, bar0_size) = size_bar0(ecam, dev)?;
    let mut regs = PciRegs {
        device_id: u32::from(device_id - 0x1040),
        ..Default::default()
    };
    let mut msix: Option<(u16, u16, u32, u32)> = None;
    let in_bar = |offset: u32, len: u32| u64::from(offset) + u64::from(len) <= bar0_size;
    let mut at = if ecam.read16(dev, 0x06) & 0x10 != 0 {
        ecam.read8(dev, 0x34) & 0xfc
    } else {
        0
    };
    let mut steps = 0;
    while at != 0 && steps < 48 {
        steps += 1;
        let at16 = u16::from(at);
        match ecam.read8(dev, at16) {
            CAP_VENDOR => {
                let cfg_type = ecam.read8(dev, at16 + 3);
                let bar = ecam.read8(dev, at16 + 4);
                let offset = ecam.read32(dev, at16 + 8);
                let len = ecam.read32(dev, at16 + 12);
                if bar == 0 && in_bar(offset, len) {
                    let addr = bar0 + u64::from(offset);
                    match cfg_type {
                        1 => regs.common = addr,
                        2 => {
                            regs.notify = addr;
                            regs.notify_multiplier = ecam.read32(dev, at16 + 16);
                        }
                        3 => regs.isr = addr,
                        4 => regs.device = addr,
                        _ => {}
                    }
                }
            }
            CAP_MSIX => {
                let control = ecam.read16(dev, at16 + 2);
                let table = ecam.read32(dev, at16 + 4);
                let pba = ecam.read32(dev, at16 + 8);
                msix = Some((at16, (control & 0x7ff) + 1, table, pba));
            }
            _ => {}
        }
        at = ecam.read8(dev, at16 + 1) & 0xfc;
    }
    for (addr, what) in [
        (regs.common, "common"),
        (regs.isr, "ISR"),
        (regs.device, "device"),
        (regs.notify, "notify"),
    ] {
        if addr == 0 {
            return Err(PciError::BadCapability(what));
        }
    }
    let Some((cap, vectors, table, pba)) = msix else {
        return Err(PciError::NoMsix);
    };
    if table & 7 != 0
        || pba & 7 != 0
        || !in_bar(table & !7, u32::from(vectors) * 16)
        || !in_bar(pba & !7, u32::from(vectors).div_ceil(64) * 8)
    {
        return Err(PciError::NoMsix);
    }
    regs.msix_table = bar0 + u64::from(table);
    regs.msix_pba = bar0 + u64::from(pba);
    let last = u16::from(*next_vector) + vectors - 1;
    if last > u16::from(MSI_VECTOR_LAST) {
        return Err(PciError::OutOfVectors);
    }
    regs.first_vector = *next_vector;
    *next_vector = (last + 1) as u8;
    // Program every entry (boot CPU, fixed delivery, edge) unmasked, then turn MSI-X on.
    let table = bar0 + u64::from(table & !7);
    for v in 0..u64::from(vectors) {
        let entry = table + v * 16;
        w32(entry, LAPIC_BASE as u32);
        w32(entry + 4, 0);
        w32(entry + 8, u32::from(regs.first_vector) + v as u32);
        w32(entry + 12, 0);
    }
    ecam.write16(dev, cap + 2, 1 << 15);
    Ok(Some(PciFunction {
        device: dev,
        bar0,
        bar0_size,
        msix_vectors: vectors,
        regs,
    }))
}

/// Mask or unmask MSI-X entry `entry` of a function.
pub fn msix_mask(regs: &PciRegs, entry: u16, masked: bool) {
    w32(
        regs.msix_table + u64::from(entry) * 16 + 12,
        u32::from(masked),
    );
}

/// Point MSI-X entry `entry` at interrupt vector `vector` (of the boot CPU).
pub fn msix_set_vector(regs: &PciRegs, entry: u16, vector: u8) {
    w32(
        regs.msix_table + u64::from(entry) * 16 + 8,
        u32::from(vector),
    );
}

/// Whether MSI-X entry `entry`'s pending bit is set.
pub fn msix_pending(regs: &PciRegs, entry: u16) -> bool {
    let word = r32(regs.msix_pba + u64::from(entry / 32) * 4);
    word & (1 << (entry % 32)) != 0
}

/// Software-enable the local APIC (spurious vector 0xff), so MSI-X messages are accepted into its IRR.
pub fn enable_lapic() {
    w32(LAPIC_BASE + LAPIC_SVR, 0x1ff);
}

/// Whether `vector` is pending in the local APIC's interrupt request register.
pub fn lapic_irr_has(vector: u8) -> bool {
    let reg = LAPIC_BASE + LAPIC_IRR + u64::from(vector / 32) * 0x10;
    r32(reg) & (1 << (vector % 32)) != 0
}
