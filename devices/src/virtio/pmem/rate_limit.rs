//! Flush rate limits: two token buckets in front of the flush worker, as Firecracker limits block devices.
//!
//! - `ops`: one token per flush request the guest sent.
//! - `bytes`: each sync costs the region's window size (the most one sync can have to write back).
//!
//! A bucket holds at most `size` tokens (the burst) and refills completely every `refill`. The worker asks for
//! a batch's tokens before it syncs; when a bucket is short it waits (the requests wait with it and are counted
//! as throttled), it never fails them. A batch larger than a bucket may take the bucket into debt, so any batch
//! eventually goes through, and the debt is paid before the next one. Limits can be changed while the VM runs:
//! a waiting worker sees the new limits at once.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One bucket's configuration: `size` tokens, refilled in full every `refill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    /// Burst: the most tokens the bucket holds (must be > 0).
    pub size: u64,
    /// Time to refill an empty bucket (must be > 0).
    pub refill: Duration,
}

/// The limits of one region's flushes; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushLimits {
    /// Flush requests.
    pub ops: Option<BucketConfig>,
    /// Bytes: every sync costs the window size.
    pub bytes: Option<BucketConfig>,
}

/// A token bucket with debt (tokens go negative once a batch bigger than what is left took them).
#[derive(Debug)]
struct Bucket {
    config: BucketConfig,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(config: BucketConfig, now: Instant) -> Self {
        Bucket {
            config,
            tokens: config.size as f64,
            last: now,
        }
    }

    /// Tokens per second.
    fn rate(&self) -> f64 {
        self.config.size as f64 / self.config.refill.as_secs_f64().max(1e-9)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate()).min(self.config.size as f64);
        self.last = now;
    }

    /// How long until `n` tokens may be taken (zero = now). A batch bigger than the bucket only needs it full.
    fn wait_for(&self, n: u64) -> Duration {
        let need = n.min(self.config.size) as f64;
        if self.tokens >= need {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((need - self.tokens) / self.rate()).min(86_400.0))
            + Duration::from_micros(1)
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

#[derive(Debug, Default)]
struct State {
    limits: FlushLimits,
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// A region's flush rate limiter. Shared by the flush worker (which waits in [`FlushRateLimit::admit`]) and
/// the VMM's control plane (which changes it with [`FlushRateLimit::set`]).
#[derive(Debug)]
pub struct FlushRateLimit {
    state: Mutex<State>,
    changed: Condvar,
    sync_bytes: u64,
}

/// What one [`FlushRateLimit::admit`] cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// The batch had to wait for tokens.
    pub throttled: bool,
    /// How long it waited.
    pub waited: Duration,
}

impl FlushRateLimit {
    /// An unlimited limiter for a region whose syncs cost `sync_bytes` each.
    pub fn new(sync_bytes: u64) -> Self {
        FlushRateLimit {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            sync_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Buckets are plain numbers, consistent at every instant.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace the limits; buckets start full. A worker waiting under the old limits re-checks at once.
    pub fn set(&self, limits: FlushLimits) {
        let now = Instant::now();
        let mut st = self.lock();
        st.limits = limits;
        st.ops = limits.ops.map(|c| Bucket::new(c, now));
        st.bytes = limits.bytes.map(|c| Bucket::new(c, now));
        drop(st);
        self.changed.notify_all();
    }

    /// The limits in force.
    pub fn limits(&self) -> FlushLimits {
        self.lock().limits
    }

    /// The cost of one sync in the bytes bucket.
    pub fn sync_bytes(&self) -> u64 {
        self.sync_bytes
    }

    /// Block until a batch of `requests` flush requests (served by one sync) may go, then take its tokens.
    pub fn admit(&self, requests: u64) -> Admission {
        let start = Instant::now();
        let mut throttled = false;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let st_ref = &mut *st;
            let mut wait = Duration::ZERO;
            for (bucket, n) in [
                (st_ref.ops.as_mut(), requests),
                (st_ref.bytes.as_mut(), self.sync_bytes),
            ] {
                if let Some(b) = bucket {
                    b.refill(now);
                    wait = wait.max(b.wait_for(n));
                }
            }
            if wait.is_zero() {
                if let Some(b) = st_ref.ops.as_mut() {
                    b.take(requests);
                }
                if let Some(b) = st_ref.bytes.as_mut() {
                    b.take(self.sync_bytes);
                }
                return Admission {
                    throttled,
                    waited: start.elapsed(),
                };
            }
            throttled = true;
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(size: u64, refill_ms: u64) -> FlushLimits {
        FlushLimits {
            ops: Some(BucketConfig {
                size,
                refill: Duration::from_millis(refill_ms),
            }),
            bytes: None,
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let l = FlushRateLimit::new(1 << 20);
        for _ in 0..1000 {
            assert!(!l.admit(10).throttled);
        }
    }

    /// `a` is `b` to within the microsecond `wait_for` adds and float rounding.
    fn about(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(5)
    }

    // The bucket's arithmetic is checked at instants the test chooses, not by sleeping: what it asserts is how
    // long the limiter says to wait, never how long anything took.
    #[test]
    fn the_burst_goes_at_once_then_each_token_waits_its_share_of_the_refill() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            BucketConfig {
                size: 10,
                refill: Duration::from_millis(200),
            },
            t0,
        );
        for _ in 0..10 {
            assert_eq!(b.wait_for(1), Duration::ZERO);
            b.take(1);
        }
        // Empty: one token is 200 ms / 10 of refill away, and so is each of the twenty after it.
        let mut now = t0;
        for _ in 0..21 {
            let w = b.wait_for(1);
            assert!(about(w, Duration::from_millis(20)), "{w:?}");
            now += w;
            b.refill(now);
            assert_eq!(b.wait_for(1), Duration::ZERO);
            b.take(1);
        }
        // 31 requests: the burst of 10 and 21 at the refill rate.
        assert!(
            about(now - t0, Duration::from_millis(420)),
            "{:?}",
            now - t0
        );
        // A long idle spell refills to the burst, never beyond it.
        b.refill(now + Duration::from_secs(60));
        for _ in 0..10 {
            assert_eq!(b.wait_for(1), Duration::ZERO);
            b.take(1);
        }
        assert!(b.wait_for(1) > Duration::ZERO);
    }

    #[test]
    fn a_batch_bigger_than_the_bucket_goes_through_and_its_debt_is_paid() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            BucketConfig {
                size: 4,
                refill: Duration::from_millis(100),
            },
            t0,
        );
        // Ten when the bucket holds four: it only needs to be full, and goes into debt.
        assert_eq!(b.wait_for(10), Duration::ZERO);
        b.take(10);
        // Six tokens of debt and one more, at 40 per second.
        let w = b.wait_for(1);
        assert!(about(w, Duration::from_millis(175)), "{w:?}");
        b.refill(t0 + w);
        assert_eq!(b.wait_for(1), Duration::ZERO);
    }

    #[test]
    fn admit_takes_tokens_and_reports_a_short_bucket_as_throttled() {
        let l = FlushRateLimit::new(4096);
        // A token a second: the third waits for one (unless a whole second passed between two calls).
        l.set(ops(2, 2000));
        assert!(!l.admit(1).throttled);
        assert!(!l.admit(1).throttled);
        assert!(l.admit(1).throttled, "the third had no token left");
    }

    #[test]
    fn bytes_bucket_charges_the_window_per_sync_and_limits_change_at_runtime() {
        let l = std::sync::Arc::new(FlushRateLimit::new(1 << 20));
        l.set(FlushLimits {
            ops: None,
            bytes: Some(BucketConfig {
                size: 1 << 20,
                refill: Duration::from_secs(3600),
            }),
        });
        assert!(!l.admit(1).throttled);
        // The bucket is empty for an hour: a waiting worker is freed by lifting the limit.
        let l2 = l.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(l2.admit(1)));
        std::thread::sleep(Duration::from_millis(50));
        l.set(FlushLimits::default());
        // Without the lift it would wait the hour: not answered by then is a hang, not a slow machine.
        let a = rx
            .recv_timeout(Duration::from_secs(600))
            .expect("lifting the limit freed the waiting worker");
        assert!(a.throttled);
        assert_eq!(l.limits(), FlushLimits::default());
    }
}
