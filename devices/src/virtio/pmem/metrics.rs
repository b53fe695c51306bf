//! What a pmem device counts. Updated lock-free from the event loop and the flush worker; read as a plain
//! [`PmemMetricsSnapshot`] (the operator API can export it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets: bucket `i` counts requests answered in `[2^i, 2^(i+1))` microseconds (bucket 0 also takes
/// everything under 1 us); the last bucket takes everything slower (>= ~8.4 s).
pub const LATENCY_BUCKETS: usize = 24;

/// The live counters of one pmem device, updated with relaxed atomics.
#[derive(Default)]
pub struct PmemMetrics {
    requests: AtomicU64,
    syncs: AtomicU64,
    errors: AtomicU64,
    readonly_writes_dropped: AtomicU64,
    throttled: AtomicU64,
    throttle_wait_us: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_us_log2: [AtomicU64; LATENCY_BUCKETS],
}

/// A point-in-time copy of [`PmemMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PmemMetricsSnapshot {
    /// Descriptor chains taken from the request queue (well-formed or not).
    pub requests: u64,
    /// Calls to the backing's flush (one answers a whole batch).
    pub syncs: u64,
    /// Requests answered with an error or not answerable: malformed chains, unknown types, failed flushes.
    pub errors: u64,
    /// Guest writes to a read-only region, dropped by the VMM.
    pub readonly_writes_dropped: u64,
    /// Flush requests that waited for the rate limiter (never failed by it).
    pub throttled: u64,
    /// Total time batches waited for the rate limiter, microseconds.
    pub throttle_wait_us: u64,
    /// Sum of the arrival-to-answer latencies, microseconds (the histogram's sum).
    pub latency_sum_us: u64,
    /// Arrival-to-answer latency of flush requests, log2 microsecond buckets (see [`LATENCY_BUCKETS`]).
    pub latency_us_log2: [u64; LATENCY_BUCKETS],
}

impl PmemMetrics {
    /// Count `n` descriptor chains taken from the request queue.
    pub fn add_requests(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one call to the backing's flush.
    pub fn add_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Count `n` requests answered with an error or not answerable.
    pub fn add_errors(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one guest write dropped in a read-only window.
    pub fn add_readonly_write_dropped(&self) {
        self.readonly_writes_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `requests` waited `waited` for the rate limiter.
    pub fn add_throttled(&self, requests: u64, waited: Duration) {
        self.throttled.fetch_add(requests, Ordering::Relaxed);
        self.throttle_wait_us
            .fetch_add(duration_us(waited), Ordering::Relaxed);
    }

    /// Add one flush request's arrival-to-answer latency to the histogram.
    pub fn record_latency(&self, latency: Duration) {
        self.latency_sum_us
            .fetch_add(duration_us(latency), Ordering::Relaxed);
        self.latency_us_log2[latency_bucket(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Copy the counters (each read on its own, so not one atomic instant).
    pub fn snapshot(&self) -> PmemMetricsSnapshot {
        PmemMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            readonly_writes_dropped: self.readonly_writes_dropped.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            throttle_wait_us: self.throttle_wait_us.load(Ordering::Relaxed),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            latency_us_log2: std::array::from_fn(|i| {
                self.latency_us_log2[i].load(Ordering::Relaxed)
            }),
        }
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The histogram bucket for `latency`.
pub fn latency_bucket(latency: Duration) -> usize {
    let us = duration_us(latency);
    let log2 = us.checked_ilog2().unwrap_or(0) as usize;
    log2.min(LATENCY_BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(latency_bucket(Duration::from_nanos(10)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(1)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(2)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(3)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(1024)), 10);
        assert_eq!(
            latency_bucket(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );

        let m = PmemMetrics::default();
        m.add_requests(3);
        m.add_sync();
        m.add_errors(1);
        m.record_latency(Duration::from_micros(5));
        let s = m.snapshot();
        assert_eq!((s.requests, s.syncs, s.errors), (3, 1, 1));
        assert_eq!(s.latency_us_log2[2], 1);
        assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 1);
        assert_eq!(s.latency_sum_us, 5);
        m.add_throttled(4, Duration::from_millis(2));
        let s = m.snapshot();
        assert_eq!((s.throttled, s.throttle_wait_us), (4, 2000));
    }
}
