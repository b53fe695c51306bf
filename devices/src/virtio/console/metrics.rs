//! What a console device counts. Updated lock-free; read as a plain [`ConsoleMetricsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one console device.
#[derive(Default)]
pub struct ConsoleMetrics {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped_messages: AtomicU64,
    rx_dropped_bytes: AtomicU64,
    tx_truncated_bytes: AtomicU64,
    bad_control: AtomicU64,
}

/// A point-in-time copy of [`ConsoleMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleMetricsSnapshot {
    /// Bytes the guest wrote to its ports and the device handed to their backends.
    pub tx_bytes: u64,
    /// Bytes delivered into the guest's receive buffers.
    pub rx_bytes: u64,
    /// Messages for the guest dropped because its port's buffer was full (it did not drain its queue) or
    /// closed.
    pub rx_dropped_messages: u64,
    /// Their bytes.
    pub rx_dropped_bytes: u64,
    /// Bytes past [`super::MAX_TX_CHAIN`] in one transmit chain, dropped.
    pub tx_truncated_bytes: u64,
    /// Control messages that were malformed, named a port that does not exist, or had an unknown event.
    pub bad_control: u64,
}

impl ConsoleMetrics {
    pub(crate) fn add_tx(&self, n: usize) {
        self.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_rx(&self, n: usize) {
        self.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_rx_dropped(&self, bytes: usize) {
        self.rx_dropped_messages.fetch_add(1, Ordering::Relaxed);
        self.rx_dropped_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_tx_truncated(&self, n: usize) {
        self.tx_truncated_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_bad_control(&self) {
        self.bad_control.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ConsoleMetricsSnapshot {
        ConsoleMetricsSnapshot {
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            rx_dropped_messages: self.rx_dropped_messages.load(Ordering::Relaxed),
            rx_dropped_bytes: self.rx_dropped_bytes.load(Ordering::Relaxed),
            tx_truncated_bytes: self.tx_truncated_bytes.load(Ordering::Relaxed),
            bad_control: self.bad_control.load(Ordering::Relaxed),
        }
    }
}
