//! The MMIO-bus face of a `readonly=on` pmem window.
//!
//! The VMM registers a read-only region as a KVM_MEM_READONLY memslot: guest reads are plain memory accesses,
//! guest writes exit to the VMM as MMIO writes. This device claims the window on the MMIO bus so those writes
//! are dropped and counted (in the device's [`PmemMetrics`]) rather than logged as unclaimed, and the guest
//! continues after the write as if it had landed nowhere.

use std::sync::Arc;

use super::metrics::PmemMetrics;
use crate::bus::BusDevice;

/// Claims a read-only pmem window on the MMIO bus: writes are dropped and counted, reads answer zeros.
pub struct ReadonlyWindow {
    id: String,
    metrics: Arc<PmemMetrics>,
}

impl ReadonlyWindow {
    /// `id` is the pmem device's id, for logs; `metrics` are the device's, where dropped writes are counted.
    pub fn new(id: &str, metrics: Arc<PmemMetrics>) -> Self {
        ReadonlyWindow {
            id: id.to_owned(),
            metrics,
        }
    }
}

impl BusDevice for ReadonlyWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Reads of a read-only memslot never exit; if one does (a slot being replaced), answer zeros rather
        // than touch the file mapping from a VMM thread.
        tracing::debug!(id = %self.id, offset, "unexpected read exit in a read-only pmem window");
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.metrics.add_readonly_write_dropped();
        let dropped = self.metrics.snapshot().readonly_writes_dropped;
        if dropped == 1 {
            tracing::warn!(id = %self.id, offset, len = data.len(), "guest wrote to a read-only pmem region; dropped (further drops are counted, logged at debug)");
        } else {
            tracing::debug!(id = %self.id, offset, len = data.len(), "read-only pmem write dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_dropped_and_counted() {
        let m = Arc::new(PmemMetrics::default());
        let mut w = ReadonlyWindow::new("ro", m.clone());
        w.write(0x1000, &[1, 2, 3, 4]);
        w.write(0x2000, &[5]);
        assert_eq!(m.snapshot().readonly_writes_dropped, 2);
        let mut d = [0xffu8; 8];
        w.read(0, &mut d);
        assert_eq!(d, [0; 8]);
    }
}
