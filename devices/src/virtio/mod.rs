//! Virtio devices over the virtio-mmio and virtio-pci transports (virtio 1.x, modern only).
//!
//! - [`device`]: the [`VirtioDevice`] trait every device model implements.
//! - `device_state`: what both transports share (status, features, queue setup rules, activation, reset).
//! - [`interrupt`]: how a device raises used-buffer and config-change interrupts ([`VirtioInterrupt`]).
//! - [`mmio`]: the virtio-mmio register block ([`MmioTransport`]) and its event-loop subscriber.
//! - [`pci`]: the virtio-pci transport ([`pci::VirtioPciDevice`]): a PCI function with MSI-X, same devices.
//! - [`console`]: virtio-console with multiport (device id 3): the guest console and the agent channel.
//! - [`pmem`]: virtio-pmem (device id 27).
//! - [`iommu`]: virtio-iommu (device id 23): maps and unmaps for the passthrough devices behind it.
//!
//! Adding a device is a new model implementing [`VirtioDevice`]; the transport, ioeventfd/irqfd plumbing and
//! event-loop registration are shared.
//!
//! # Registering a device (what `DeviceManager::add_virtio_device` in the VMM does)
//! 1. `let t = MmioTransport::new(guest_ram.clone(), Box::new(device))?;` (guest RAM only, no pmem windows).
//! 2. Take a virtio-mmio window `(base, irq)` and `vm.register_irqfd(t.irqfd(), irq)`.
//! 3. For each `q` in `t.queue_notify_fds()`:
//!    `vm.register_ioevent(q.fd, &IoEventAddress::Mmio(base + q.offset), q.datamatch)` (datamatch is a `u32`,
//!    so KVM matches 4-byte writes of the queue index).
//! 4. `let t = Arc::new(Mutex::new(t));` insert `t.clone()` on the MMIO bus at `[base, base + window)`.
//! 5. Add `MmioSubscriber::new(t)` to the event loop's `EventManager`; its `init` registers the queue EventFds
//!    (and any host-side fds of the device). This is done once at VM build time; nothing is re-registered when
//!    the driver activates or resets the device.

pub mod console;
pub mod device;
mod device_state;
pub mod interrupt;
pub mod iommu;
pub mod mmio;
pub mod pci;
pub mod pmem;

#[cfg(test)]
mod hostile_guest;
#[cfg(test)]
mod mmio_proptest;

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
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for the device.
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The driver has finished feature negotiation.
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}
