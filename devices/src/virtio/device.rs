//! The contract between a virtio device model and the transport.
//!
//! The transport ([`super::MmioTransport`]) owns the register block, feature negotiation, the queues' guest
//! configuration and their notify `EventFd`s; the device owns what the queues carry. The transport hands the
//! queues over at DRIVER_OK ([`VirtioDevice::activate`]) and calls [`VirtioDevice::process_queue`] from the VMM's
//! event loop each time the driver notifies a queue.

use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueT};

use super::{GuestMemory, VirtioInterrupt};

/// Why a device could not start with the queues the driver configured. The transport answers it by setting
/// DEVICE_NEEDS_RESET: the guest must reset the device, and nothing else is affected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The queue with this index was not marked ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The queue with this index is outside guest memory, misaligned or otherwise unusable.
    #[error("queue {0} lies outside guest memory or is misaligned")]
    QueueInvalid(usize),
    /// The device was handed a different number of queues than it needs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
}

/// A driver-visible fault in a queue (not in a single request) after which the device cannot go on without a
/// reset, e.g. an available index that jumps by more than the queue size.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {reason}")]
pub struct QueueError {
    /// Index of the broken queue.
    pub queue: usize,
    /// What was wrong with it.
    pub reason: String,
}

/// A virtio device model, driven by a transport ([`super::MmioTransport`]).
pub trait VirtioDevice: Send {
    /// Virtio device id (virtio 1.2, 5): 27 for pmem.
    fn device_type(&self) -> u32;

    /// One entry per queue: its maximum size (a power of two).
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered to the driver. The transport adds VIRTIO_F_VERSION_1 itself.
    fn device_features(&self) -> u64;

    /// The features the driver accepted at FEATURES_OK (already checked to be a subset of what was offered).
    fn ack_features(&mut self, features: u64);

    /// Read from the device configuration space. Bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write to the device configuration space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start the device at DRIVER_OK with the queues as the driver configured them (in queue order).
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// The driver notified queue `index` (called on the VMM's event loop). Errors in single requests are
    /// answered in the used ring; an `Err` here means the queue itself is broken and the transport will set
    /// DEVICE_NEEDS_RESET.
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError>;

    /// Back to the state before activation. Work still in flight must not touch guest memory afterwards.
    fn reset(&mut self);

    /// Register host-side event sources (sockets, timers) on the event loop. Queue notifications are the
    /// transport's; most devices need nothing here.
    fn init_host_events(&mut self, _ops: &mut EventOps) {}

    /// A host-side event registered by [`VirtioDevice::init_host_events`] fired.
    fn process_host_event(&mut self, _events: Events, _ops: &mut EventOps) {}
}

/// Copies `data.len()` bytes of a device's config space `cfg` from `offset` into `data`; bytes past its end read
/// as zero (a guest may read any width at any offset).
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// The `N` queues a device runs on, each marked ready by the driver: the check a device's
/// [`VirtioDevice::activate`] starts with.
pub fn ready_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    let queues = <[Queue; N]>::try_from(queues)
        .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
    if let Some(i) = queues.iter().position(|q| !q.ready()) {
        return Err(ActivateError::QueueNotReady(i));
    }
    Ok(queues)
}
