//! Probe every virtio-mmio window the BootInfo lists, or with a PCI ECAM range enumerate PCI bus 0; one line
//! per device.

use daxvisor_proto::boot::{BootInfo, MemKind, MmioDeviceInfo, MAX_DEVICES};

use crate::bootinfo::is_mapped;
use crate::exit::code;
use crate::say;
use crate::virtio::mmio::{device_name, probe, Mmio, Probed, VERSION_MODERN};
use crate::virtio::pci::{self, Ecam, PciRegs, MSI_VECTOR_BASE, VIRTIO_VENDOR};

#[derive(Clone, Copy, Debug, Default)]
pub struct Found {
    /// Position in the BootInfo device list (virtio-mmio) or the PCI device number.
    pub slot: usize,
    pub info: MmioDeviceInfo,
    pub probed: Option<Probed>,
    /// The virtio-pci structures when the device is a PCI function.
    pub pci: Option<PciRegs>,
}

impl Found {
    /// The device's registers, over virtio-mmio or virtio-pci.
    ///
    /// # Safety
    /// The device must have probed successfully (its window or BAR is mapped MMIO).
    pub unsafe fn registers(&self) -> Mmio {
        match self.pci {
            // SAFETY: the enumeration found these structures in BAR 0 of a virtio function.
            Some(regs) => unsafe { Mmio::new_pci(regs) },
            // SAFETY: the probe found a virtio-mmio device in this mapped window.
            None => unsafe { Mmio::new(self.info.base) },
        }
    }

    /// Which transport, for log lines.
    pub fn transport(&self) -> &'static str {
        if self.pci.is_some() {
            "virtio-pci"
        } else {
            "virtio-mmio"
        }
    }
}

/// Enumerate PCI bus 0 through the ECAM window at `ecam_base`: `pci 00:DD.0 vendor 0x1af4 device 0x10XX
/// bar0=0x.. size=0x.. msix=N vectors from 0x..: virtio device D (name)` per virtio function, then `probed N
/// virtio-pci devices`. A virtio function that does not set up is `FAIL pci 00:DD.0: <why>`.
pub fn probe_pci(ecam_base: u64) -> Result<([Found; MAX_DEVICES], usize), u32> {
    let mut found = [Found::default(); MAX_DEVICES];
    let mut n = 0;
    // SAFETY: the VMM lists ECAM as a PciEcam range below 4 GiB, which the static page tables map.
    let ecam = unsafe { Ecam::new(ecam_base) };
    pci::enable_lapic();
    let mut next_vector = MSI_VECTOR_BASE;
    for dev in 0..32u8 {
        match pci::probe_function(&ecam, dev, &mut next_vector) {
            Ok(None) => {}
            Ok(Some(f)) => {
                say!(
                    "pci 00:{dev:02x}.0 vendor {VIRTIO_VENDOR:#06x} device {:#06x} bar0={:#x} size={:#x} msix={} vectors from {:#x}: virtio device {} ({})",
                    0x1040 + f.regs.device_id,
                    f.bar0,
                    f.bar0_size,
                    f.msix_vectors,
                    f.regs.first_vector,
                    f.regs.device_id,
                    device_name(f.regs.device_id)
                );
                if n < MAX_DEVICES {
                    found[n] = Found {
                        slot: usize::from(dev),
                        info: MmioDeviceInfo {
                            base: f.bar0,
                            size: f.bar0_size,
                            irq: 0,
                            device_id: f.regs.device_id,
                        },
                        probed: Some(Probed {
                            version: VERSION_MODERN,
                            device_id: f.regs.device_id,
                            vendor_id: u32::from(VIRTIO_VENDOR),
                        }),
                        pci: Some(f.regs),
                    };
                    n += 1;
                }
            }
            Err(e) => {
                say!("FAIL pci 00:{dev:02x}.0: {e}");
                return Err(code::PROBE_MISMATCH);
            }
        }
    }
    say!("probed {n} virtio-pci devices");
    Ok((found, n))
}

/// Probe all listed devices. Prints `virtio-mmio N base=0x.. irq=I: version 2 device D (name) vendor 0x..` per
/// device, or `FAIL virtio-mmio N base=0x..: <why>`; any failure makes the result `Err(PROBE_MISMATCH)` after
/// every device was tried.
pub fn probe_all(info: &BootInfo) -> Result<([Found; MAX_DEVICES], usize), u32> {
    if let Some(ecam) = info
        .mem_ranges()
        .iter()
        .find(|r| r.kind == MemKind::PciEcam as u32)
    {
        return probe_pci(ecam.base);
    }
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
                    pci: None,
                };
            }
            Err(e) => {
                say!("FAIL virtio-mmio {slot} base={:#x}: {e}", dev.base);
                found[slot] = Found {
                    slot,
                    info: *dev,
                    probed: None,
                    pci: None,
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
