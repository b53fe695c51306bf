//! `pci=hostile` (over virtio-pci only): garbage into the configuration space of every PCI function except
//! the virtio-pmem ones (the host bridge, the virtio-console, empty slots, through ECAM and the 0xCF8/0xCFC
//! ports), into the whole of those functions' BAR 0 (common configuration, ISR, device configuration,
//! notifications, MSI-X table and PBA), and into their MSI-X tables wherever the garbage moved them. The pmem
//! modes that follow must still work on the untouched pmem devices: the VMM serves on.
//!
//! Prints `pci hostile: C config writes, B BAR writes, T MSI-X table writes to N functions`.

use crate::port::outl;
use crate::say;
use crate::virtio::mmio::DEVICE_ID_PMEM;
use crate::virtio::pci::{self, Ecam};

use super::probe::Found;

const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
const CONFIG_DATA_PORT: u16 = 0xcfc;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run the garbage pass. `ecam_base` is the BootInfo's PCI ECAM range; `devices` what the enumeration found.
pub fn run(ecam_base: u64, devices: &[Found], seed: u32) {
    // SAFETY: the BootInfo lists this range as ECAM below 4 GiB (statically mapped).
    let ecam = unsafe { Ecam::new(ecam_base) };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(seed));
    let spared: [bool; 32] = core::array::from_fn(|dev| {
        devices.iter().any(|d| {
            d.pci.is_some()
                && d.slot == dev
                && d.probed.is_some_and(|p| p.device_id == DEVICE_ID_PMEM)
        })
    });
    // Every non-pmem function's BAR 0 as it was before the garbage (the garbage may move it).
    let mut bars = [0u64; 32];
    for d in devices
        .iter()
        .filter(|d| d.pci.is_some() && !spared[d.slot])
    {
        bars[d.slot] = d.info.base;
    }
    let (mut config_writes, mut bar_writes, mut table_writes, mut functions) =
        (0u64, 0u64, 0u64, 0u64);
    for dev in (0..32u8).filter(|&d| !spared[usize::from(d)]) {
        let present = ecam.read16(dev, 0) != 0xffff;
        if present {
            functions += 1;
        }
        if !present && dev > 3 {
            continue;
        }
        // Configuration space: every dword of the 4 KiB, widths 1, 2 and 4, then the header again through the
        // legacy ports.
        for off in (0..0x1000u16).step_by(4) {
            let v = rng.next();
            match v % 3 {
                0 => ecam.write32(dev, off, v as u32),
                1 => ecam.write16(dev, off + 2 * ((v >> 8) as u16 & 1), (v >> 16) as u16),
                _ => {
                    let b = off + ((v >> 8) as u16 & 3);
                    // SAFETY: ECAM window of bus 0, mapped MMIO.
                    unsafe {
                        core::ptr::write_volatile(
                            (ecam_base + (u64::from(dev) << 15) + u64::from(b)) as *mut u8,
                            (v >> 24) as u8,
                        )
                    }
                }
            }
            config_writes += 1;
        }
        for reg in (0..0x100u32).step_by(4) {
            outl(
                CONFIG_ADDRESS_PORT,
                0x8000_0000 | (u32::from(dev) << 11) | reg,
            );
            outl(CONFIG_DATA_PORT, rng.next() as u32);
            config_writes += 1;
        }
        // BAR 0 where the enumeration found it, and where the garbage left it (if it still decodes in the PCI
        // window): every dword, including the MSI-X table and PBA.
        let moved = {
            let low = ecam.read32(dev, 0x10) & !0xf;
            u64::from(low) | (u64::from(ecam.read32(dev, 0x14)) << 32)
        };
        for base in [bars[usize::from(dev)], moved] {
            if !(0xc000_0000..0xd000_0000).contains(&base) || base % 0x8000 != 0 {
                continue;
            }
            if spared
                .iter()
                .enumerate()
                .any(|(i, &s)| s && devices.iter().any(|d| d.slot == i && d.info.base == base))
            {
                continue;
            }
            for off in (0..0x8000u64).step_by(4) {
                let v = rng.next() as u32;
                if (0x4000..0x6000).contains(&off) {
                    table_writes += 1;
                } else {
                    bar_writes += 1;
                }
                pci::w32(base + off, v);
            }
        }
    }
    say!(
        "pci hostile: {config_writes} config writes, {bar_writes} BAR writes, {table_writes} MSI-X table writes to {functions} functions"
    );
}
