//! The virtio-pci transport, modern (virtio 1.2, 4.1): a PCI function whose BAR 0 holds the common
//! configuration, ISR, device configuration and notification regions and the MSI-X table, each announced by a
//! vendor capability in configuration space.
//!
//! ```text
//! BAR 0 (64-bit, 32 KiB)
//! 0x0000  common configuration (virtio_pci_common_cfg)
//! 0x1000  ISR status (read to clear)
//! 0x2000  device configuration (the device model's config space)
//! 0x3000  notifications: queue n at 0x3000 + 4 n (notify_off_multiplier 4)
//! 0x4000  MSI-X table: one vector per queue plus one for configuration changes
//! 0x6000  MSI-X pending-bit array
//! ```
//!
//! Queue notifications do not exit to the VMM: each queue's `EventFd` is registered by the VMM as an ioeventfd on
//! its notify address ([`VirtioPciDevice::queue_notify_fds`]) and polled on the event loop through
//! [`VirtioPciSubscriber`], as with virtio-mmio. Interrupts go out as MSI-X through an
//! [`crate::pci::MsiSink`]; there is no INTx. The device model is any [`crate::virtio::VirtioDevice`], unchanged.
//!
//! Everything the driver writes is checked as in [`super::mmio`]: a bad value is ignored, reads back as "no
//! vector", or is answered with DEVICE_NEEDS_RESET; never a panic.

mod transport;

#[cfg(test)]
mod pci_proptest;

pub use transport::{
    lock, VirtioPciDevice, VirtioPciSubscriber, BAR_SIZE, COMMON_CFG, DEVICE_CFG, ISR_CFG,
    MSIX_PBA, MSIX_TABLE, NOTIFY_CFG, NOTIFY_OFF_MULTIPLIER, NO_VECTOR, VIRTIO_PCI_VENDOR_ID,
};

/// Fields of the common configuration structure (virtio 1.2, 4.1.4.3): offsets into it.
pub mod common {
    /// le32, RW: which 32 feature bits `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// le32, RO.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// le32, RW: which 32 feature bits `DRIVER_FEATURE` takes.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// le32, RW.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// le16, RW: MSI-X vector for configuration changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// le16, RO.
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8, RW.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8, RO.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// le16, RW.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// le16, RW.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// le16, RW.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// le16, RW.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// le16, RO.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// le64, RW.
    pub const QUEUE_DESC: u64 = 0x20;
    /// le64, RW.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// le64, RW.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Bytes of the structure.
    pub const SIZE: u64 = 0x38;
}

/// Capability `cfg_type` values (virtio 1.2, 4.1.4).
pub mod cap_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// Access to the BARs through configuration space.
    pub const PCI_CFG: u8 = 5;
}
