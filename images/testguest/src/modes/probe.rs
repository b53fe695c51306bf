//! Probe every virtio-mmio window the BootInfo lists; one line per device.

use daxvisor_proto::boot::{BootInfo, MmioDeviceInfo, MAX_DEVICES};

use crate::bootinfo::is_mapped;
use crate::exit::code;
use crate::say;
use crate::virtio::mmio::{device_name, probe, Probed};

#[derive(Clone, Copy, Debug, Default)]
pub struct Found {
    /// Position in the BootInfo device list.
    pub slot: usize,
    pub info: MmioDeviceInfo,
    pub probed: Option<Probed>,
}

/// Probe all listed devices. Prints `virtio-mmio N base=0x.. irq=I: version 2 device D (name) vendor 0x..` per
/// device, or `FAIL virtio-mmio N base=0x..: <why>`; any failure makes the result `Err(PROBE_MISMATCH)` after
/// every device was tried.
pub fn probe_all(info: &BootInfo) -> Result<([Found; MAX_DEVICES], usize), u32> {
    let mut found = [Found::default(); MAX_DEVICES];
    let mut failed = false;
    let devices = info.devices();
    for (slot, dev) in devices.iter().enumerate() {
        // SAFETY: the VMM lists virtio-mmio windows; a window that is not mapped or too small is not touched.
        match unsafe { probe(dev, |b, s| is_mapped(info.mem_ranges(), b, s)) } {
            Ok(p) => {
                say!(
                    "virtio-mmio {slot} base={:#x} irq={}: version {} device {} ({}) vendor {:#x}",
                    dev.base,
                    dev.irq,
                    p.version,
                    p.device_id,
                    device_name(p.device_id),
                    p.vendor_id
                );
                found[slot] = Found {
                    slot,
                    info: *dev,
                    probed: Some(p),
                };
            }
            Err(e) => {
                say!("FAIL virtio-mmio {slot} base={:#x}: {e}", dev.base);
                found[slot] = Found {
                    slot,
                    info: *dev,
                    probed: None,
                };
                failed = true;
            }
        }
    }
    if failed {
        return Err(code::PROBE_MISMATCH);
    }
    say!("probed {} virtio-mmio devices", devices.len());
    Ok((found, devices.len()))
}
