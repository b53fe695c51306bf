//! The guest side of virtio over MMIO (virtio 1.x, modern only), polled: no interrupts are used.
//!
//! - [`mmio`]: the register window and the probe (and the same registers over a virtio-pci function).
//! - [`pci`]: PCI enumeration through ECAM, BAR sizing, virtio capabilities and MSI-X.
//! - [`queue`]: a split virtqueue in memory the guest owns.
//! - [`pmem`]: the virtio-pmem driver (device id 27).
//! - [`console`]: the virtio-console driver with multiport (device id 3): console and agent port.

pub mod console;
pub mod mmio;
pub mod pci;
pub mod pmem;
pub mod queue;
