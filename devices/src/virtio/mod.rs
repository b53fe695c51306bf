//! Virtio devices over the virtio-mmio transport (virtio 1.x, modern only).
//!
//! - [`device`]: the [`VirtioDevice`] trait every device model implements.
//! - [`interrupt`]: how a device raises used-buffer and config-change interrupts ([`VirtioInterrupt`]).
//! - [`mmio`]: the virtio-mmio register block ([`MmioTransport`]) and its event-loop subscriber.
//! - [`pmem`]: virtio-pmem (device id 27).
//!
//! Adding a device is a new model implementing [`VirtioDevice`]; the transport, ioeventfd/irqfd plumbing and
//! event-loop registration are shared.

pub mod device;
pub mod interrupt;
pub mod mmio;
pub mod pmem;

pub use device::{ActivateError, QueueError, VirtioDevice};
pub use interrupt::{InterruptKind, IrqfdInterrupt, VirtioInterrupt};
pub use mmio::{MmioSubscriber, MmioTransport, QueueNotifyFd};

/// Guest memory as devices see it. The VMM should give devices only the RAM regions (not pmem windows): the
/// VMM then never dereferences a pmem mapping on a guest's behalf, so a backing file that shrinks under the VM
/// cannot SIGBUS the VMM through a descriptor pointing into it.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// Feature bit: the device complies with virtio 1.x. This transport is modern-only and requires it.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}
