//! What a virtio-iommu device counts. Updated lock-free; read as a plain [`IommuMetricsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::status;

/// Counters of one virtio-iommu device.
#[derive(Default)]
pub struct IommuMetrics {
    requests: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    mapped_bytes: AtomicU64,
    fences: AtomicU64,
    fenced_bytes: AtomicU64,
    faults_reported: AtomicU64,
    faults_dropped: AtomicU64,
    by_status: [AtomicU64; status::COUNT],
    unanswerable: AtomicU64,
}

/// A point-in-time copy of [`IommuMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuMetricsSnapshot {
    /// Chains taken from the request queue (well-formed or not).
    pub requests: u64,
    /// Mappings made (one per MAP answered OK).
    pub maps: u64,
    /// Mappings removed by the guest (UNMAP, DETACH, re-ATTACH, reset).
    pub unmaps: u64,
    /// Bytes mapped right now, summed over domains.
    pub mapped_bytes: u64,
    /// Mappings the VMM removed itself (a recall whose deadline passed).
    pub fences: u64,
    /// Their bytes.
    pub fenced_bytes: u64,
    /// Fault events written to the event queue.
    pub faults_reported: u64,
    /// Fault events dropped: the driver had no event buffer and the backlog was full.
    pub faults_dropped: u64,
    /// Requests answered, by status code (index = `VIRTIO_IOMMU_S_*`).
    pub by_status: [u64; status::COUNT],
    /// Chains with no room for a status: returned with length 0.
    pub unanswerable: u64,
}

impl IommuMetricsSnapshot {
    /// Requests answered with a status other than OK.
    pub fn refused(&self) -> u64 {
        self.by_status.iter().skip(1).sum::<u64>() + self.unanswerable
    }
}

impl IommuMetrics {
    pub(crate) fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_status(&self, s: u8) {
        if let Some(c) = self.by_status.get(usize::from(s)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(crate) fn add_unanswerable(&self) {
        self.unanswerable.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_map(&self, bytes: u64) {
        self.maps.fetch_add(1, Ordering::Relaxed);
        self.mapped_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn add_unmap(&self, bytes: u64) {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        self.mapped_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
    pub(crate) fn add_fence(&self, bytes: u64) {
        self.fences.fetch_add(1, Ordering::Relaxed);
        self.fenced_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.mapped_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
    pub(crate) fn add_fault(&self, delivered: bool) {
        if delivered {
            self.faults_reported.fetch_add(1, Ordering::Relaxed);
        } else {
            self.faults_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A consistent-enough copy (each counter read once).
    pub fn snapshot(&self) -> IommuMetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IommuMetricsSnapshot {
            requests: r(&self.requests),
            maps: r(&self.maps),
            unmaps: r(&self.unmaps),
            mapped_bytes: r(&self.mapped_bytes),
            fences: r(&self.fences),
            fenced_bytes: r(&self.fenced_bytes),
            faults_reported: r(&self.faults_reported),
            faults_dropped: r(&self.faults_dropped),
            by_status: std::array::from_fn(|i| r(&self.by_status[i])),
            unanswerable: r(&self.unanswerable),
        }
    }
}
