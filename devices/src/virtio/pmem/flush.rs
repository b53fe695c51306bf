//! Durable flushes off the vCPU and event-loop threads, coalesced.
//!
//! One worker thread per device. Requests queue up while a flush runs; when it ends, the worker takes every
//! request queued so far and serves all of them with ONE new flush. So each request is answered by a flush that
//! started after the request arrived (its data is covered), and N requests arriving during one fdatasync cost
//! one more fdatasync, not N. [`FlushPolicy::PerRequest`] (one flush per request, what other VMMs do) exists
//! for the benchmark's comparison.
//!
//! Group commit: a guest with d flushes in flight answers each one by dirtying more and flushing again, so the d
//! requests a flush answered come back right after it. Left alone they would trickle in while the next flush
//! already runs, split the d requesters into two groups that alternate, and halve what one flush answers. So
//! after a flush answered n requests, the worker gives them a short while (half the shortest of the last
//! [`FLUSH_TIMES`] flushes, bounded by [`MAX_LINGER`]) to come back before it starts the next one; it starts at
//! once when n are queued. A lone request therefore waits at most that while longer, and a requester at depth 1
//! not at all. The shortest, not the last: one flush that stalled (a disk hiccup, a completion that waited for a
//! timer tick on an idle host CPU) must not make the requests queued after it wait longer too.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest the worker waits for the requesters of its last flush to come back (see the module docs).
pub const MAX_LINGER: Duration = Duration::from_millis(2);
/// The wait is this fraction of a recent flush's duration: a fast disk gets a short one.
const LINGER_DIVISOR: u32 = 2;
/// How many recent flush durations the wait is taken from (the shortest of them).
pub const FLUSH_TIMES: usize = 4;

use super::rate_limit::{Admission, FlushRateLimit};

/// Makes the guest's writes to a region durable. Implemented by the VMM for each backing kind (the device knows
/// nothing of files): fdatasync for page-cache files, a no-op where stores are already durable (MAP_SYNC on
/// fs-dax, device-DAX) or nothing can be (memfd, discard_writes).
pub trait Flush: Send + Sync {
    /// Return only once everything written to the region before the call is durable.
    fn flush(&self) -> io::Result<()>;

    /// Called first thing on the worker thread, before any request (the VMM installs the thread's seccomp
    /// filter here). An error fails every flush of this worker.
    fn on_worker_start(&self) -> io::Result<()> {
        Ok(())
    }

    /// Flush on the caller's thread (the device's queue path) when that costs nothing and cannot block: there is
    /// nothing to write back (MAP_SYNC fs-dax, device-DAX, RAM) and nothing to wait for. `Some(result)` is the
    /// flush's answer, with the same meaning as [`Flush::flush`]'s; `None` sends the request the usual way, to
    /// the worker. The default never answers inline.
    fn try_now(&self) -> Option<io::Result<()>> {
        None
    }
}

impl<F: Fn() -> io::Result<()> + Send + Sync> Flush for F {
    fn flush(&self) -> io::Result<()> {
        self()
    }
}

/// How the worker groups queued requests into flushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// One flush answers every request queued before it started.
    Coalesce,
    /// One flush per request, in arrival order.
    PerRequest,
}

/// A rate limiter in front of the flushes and what to do with each admission (count it).
pub type Limiter = (
    Arc<FlushRateLimit>,
    Box<dyn Fn(u64, Admission) + Send + Sync>,
);

/// Called on the worker thread with the requests one flush answered and its result.
pub type Completion<R> = Box<dyn FnMut(Vec<R>, &io::Result<()>) + Send>;

struct State<R> {
    pending: VecDeque<R>,
    shutdown: bool,
    /// Only a submit that brings the queue to this many requests wakes the worker: the worker waits for that
    /// many (a wake below it would be a context switch per returning requester for nothing, the first one
    /// included), and while it flushes nobody waits (it checks the queue before it sleeps again).
    wanted: usize,
    /// When the oldest queued request arrived: the group-commit wait counts from it.
    first_at: Option<Instant>,
    /// How many times the worker woke from a wait (tests count them).
    #[cfg(test)]
    wakes: u64,
}

struct Shared<R> {
    state: Mutex<State<R>>,
    wake: Condvar,
}

impl<R> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, State<R>> {
        // The state is a queue and a flag, consistent at every instant; survive a poisoned lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The per-device flush thread: runs the [`Flush`] and hands each batch of requests to the completion.
pub struct FlushWorker<R: Send + 'static> {
    shared: Arc<Shared<R>>,
    /// Lifted at shutdown so queued requests are answered at once.
    limit: Option<Arc<FlushRateLimit>>,
    thread: Option<JoinHandle<()>>,
}

impl<R: Send + 'static> FlushWorker<R> {
    /// Start the worker thread `name`. `complete` answers the requests of each flush.
    pub fn spawn(
        name: &str,
        flush: Arc<dyn Flush>,
        policy: FlushPolicy,
        complete: Completion<R>,
    ) -> io::Result<Self> {
        Self::spawn_inner(name, flush, policy, None, complete, MAX_LINGER)
    }

    /// As [`FlushWorker::spawn`], with each batch admitted by `limit` before its flush: a throttled batch waits
    /// (requests arriving meanwhile join the next batch) and the limiter's callback hears what each admission
    /// cost.
    pub fn spawn_limited(
        name: &str,
        flush: Arc<dyn Flush>,
        policy: FlushPolicy,
        limit: Option<Limiter>,
        complete: Completion<R>,
    ) -> io::Result<Self> {
        Self::spawn_inner(name, flush, policy, limit, complete, MAX_LINGER)
    }

    /// As [`FlushWorker::spawn`], waiting at most `max_linger` for returning requesters (tests use a long one,
    /// so what they show does not depend on the machine's load).
    #[cfg(test)]
    fn spawn_with_linger(
        name: &str,
        flush: Arc<dyn Flush>,
        policy: FlushPolicy,
        complete: Completion<R>,
        max_linger: Duration,
    ) -> io::Result<Self> {
        Self::spawn_inner(name, flush, policy, None, complete, max_linger)
    }

    fn spawn_inner(
        name: &str,
        flush: Arc<dyn Flush>,
        policy: FlushPolicy,
        limit: Option<Limiter>,
        mut complete: Completion<R>,
        max_linger: Duration,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                shutdown: false,
                wanted: 1,
                first_at: None,
                #[cfg(test)]
                wakes: 0,
            }),
            wake: Condvar::new(),
        });
        let worker_shared = shared.clone();
        let limit_handle = limit.as_ref().map(|(l, _)| l.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let ready = flush.on_worker_start();
                let mut group = Group::default();
                let mut recent = VecDeque::with_capacity(FLUSH_TIMES);
                while let Some(batch) = next_batch(&worker_shared, policy, group) {
                    if let Some((limit, on_admit)) = &limit {
                        on_admit(batch.len() as u64, limit.admit(batch.len() as u64));
                    }
                    let size = batch.len();
                    let started = Instant::now();
                    let result = match &ready {
                        Ok(()) => flush.flush(),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    if recent.len() == FLUSH_TIMES {
                        recent.pop_front();
                    }
                    recent.push_back(started.elapsed());
                    complete(batch, &result);
                    group = Group {
                        size,
                        linger: linger_after(&recent, max_linger),
                    };
                }
            })?;
        Ok(FlushWorker {
            shared,
            limit: limit_handle,
            thread: Some(thread),
        })
    }

    /// Queue requests for the next flush. Never blocks on a flush in progress.
    pub fn submit(&self, requests: impl IntoIterator<Item = R>) {
        let mut st = self.shared.lock();
        let before = st.pending.len();
        st.pending.extend(requests);
        if before == 0 && !st.pending.is_empty() {
            st.first_at = Some(Instant::now());
        }
        if st.pending.len() != before && st.pending.len() >= st.wanted {
            self.shared.wake.notify_one();
        }
    }
}

/// The requests the last flush answered: how many, and how long to wait for them to come back.
#[derive(Clone, Copy, Default)]
struct Group {
    size: usize,
    linger: Duration,
}

/// How long to wait for a group to come back after the flushes that took `recent`: a fraction of the fastest of
/// them, so one stalled flush (a disk hiccup) does not hold the requests after it.
fn linger_after(recent: &VecDeque<Duration>, max_linger: Duration) -> Duration {
    let typical = recent.iter().min().copied().unwrap_or_default();
    (typical / LINGER_DIVISOR).min(max_linger)
}

/// Wait for work; `None` once shut down and drained.
///
/// After a flush that answered a group, the worker sleeps until the whole group is queued again (one wake, by
/// the submit that completes it) or until the linger has passed since the first of them came back (or since the
/// worker came back to wait, when requesters returned while it was still answering the others). While none
/// has come back it wakes once after a linger and then sleeps until the first arrives, so an idle device costs
/// no periodic wake-ups.
fn next_batch<R>(shared: &Shared<R>, policy: FlushPolicy, last: Group) -> Option<Vec<R>> {
    let group = match policy {
        FlushPolicy::Coalesce => last.size.max(1),
        FlushPolicy::PerRequest => 1,
    };
    let back = Instant::now();
    let mut st = shared.lock();
    st.wanted = group;
    let mut idle = false;
    while st.pending.len() < group && !st.shutdown {
        let wait = match st.first_at {
            // Nobody queued yet: wait a linger for the group, then for anyone.
            None if group > 1 && !idle => Some(last.linger),
            None => {
                st.wanted = 1;
                None
            }
            Some(first) => {
                st.wanted = group;
                let left =
                    (first.max(back) + last.linger).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                Some(left)
            }
        };
        st = match wait {
            Some(left) => {
                let (g, timeout) = shared
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner());
                idle |= timeout.timed_out() && g.pending.is_empty();
                g
            }
            None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
        #[cfg(test)]
        {
            st.wakes += 1;
        }
    }
    if st.pending.is_empty() {
        return None;
    }
    // Flushing now: nobody waits on the condvar until the worker comes back (and looks at the queue first).
    st.wanted = usize::MAX;
    let batch = match policy {
        FlushPolicy::Coalesce => st.pending.drain(..).collect(),
        FlushPolicy::PerRequest => st.pending.pop_front().into_iter().collect(),
    };
    st.first_at = (!st.pending.is_empty()).then(Instant::now);
    Some(batch)
}

impl<R: Send + 'static> Drop for FlushWorker<R> {
    /// Requests already queued are still flushed and answered (rate limits are lifted: shutdown never waits on
    /// a throttle); then the thread ends.
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(l) = &self.limit {
            l.set(super::rate_limit::FlushLimits::default());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("pmem flush worker panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;

    /// A real file and a real fdatasync, instrumented: a logical clock orders request arrivals against sync
    /// starts, and an optional gate holds the first sync so requests provably arrive while it runs.
    struct FileSync {
        file: File,
        clock: Arc<AtomicU64>,
        last_start: AtomicU64,
        syncs: AtomicU64,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
        started: mpsc::SyncSender<()>,
        /// Extra time each sync takes, in microseconds (a slow disk: the worker's wait scales with it).
        slow_us: AtomicU64,
    }

    impl Flush for FileSync {
        fn flush(&self) -> io::Result<()> {
            let stamp = self.clock.fetch_add(1, Ordering::SeqCst);
            self.last_start.store(stamp, Ordering::SeqCst);
            let _ = self.started.try_send(());
            if let Some(gate) = self.gate.lock().unwrap().take() {
                let _ = gate.recv();
            }
            self.file.sync_data()?;
            std::thread::sleep(Duration::from_micros(self.slow_us.load(Ordering::SeqCst)));
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The submitting side, shared by requester threads.
    struct Submitter {
        worker: FlushWorker<(usize, u64)>,
        clock: Arc<AtomicU64>,
        file: File,
    }

    struct Rig {
        sub: Submitter,
        sync: Arc<FileSync>,
        answers: mpsc::Receiver<(usize, u64, u64)>,
        started: mpsc::Receiver<()>,
        release: Option<mpsc::Sender<()>>,
    }

    /// The worker's longest wait in tests: far longer than a test thread takes to submit a few requests.
    const TEST_LINGER: Duration = Duration::from_millis(50);

    fn rig(policy: FlushPolicy, gated: bool) -> Rig {
        rig_lingering(policy, gated, TEST_LINGER)
    }

    /// As [`rig`], the worker waiting at most `max_linger` for returning requesters.
    fn rig_lingering(policy: FlushPolicy, gated: bool, max_linger: Duration) -> Rig {
        let dir = std::env::temp_dir();
        let mut file = tempfile::tempfile_in(dir).unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        let clock = Arc::new(AtomicU64::new(1));
        let (release, gate) = mpsc::channel();
        let (started_tx, started) = mpsc::sync_channel(1024);
        let sync = Arc::new(FileSync {
            file: file.try_clone().unwrap(),
            clock: clock.clone(),
            last_start: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            gate: Mutex::new(gated.then_some(gate)),
            started: started_tx,
            slow_us: AtomicU64::new(0),
        });
        let (tx, answers) = mpsc::channel();
        let s2 = sync.clone();
        let worker = FlushWorker::spawn_with_linger(
            "test-flush",
            sync.clone(),
            policy,
            Box::new(move |batch: Vec<(usize, u64)>, res: &io::Result<()>| {
                assert!(res.is_ok());
                let start = s2.last_start.load(Ordering::SeqCst);
                for (id, arrived) in batch {
                    tx.send((id, arrived, start)).unwrap();
                }
            }),
            max_linger,
        )
        .unwrap();
        Rig {
            sub: Submitter {
                worker,
                clock,
                file,
            },
            sync,
            answers,
            started,
            release: Some(release),
        }
    }

    impl Submitter {
        /// Dirty the file (so the fdatasync has work) and queue request `id`, stamped with its arrival.
        fn request(&self, id: usize) {
            self.file
                .write_all_at(&(id as u64).to_le_bytes(), (id % 512) as u64 * 8)
                .unwrap();
            let arrived = self.clock.fetch_add(1, Ordering::SeqCst);
            self.worker.submit([(id, arrived)]);
        }
    }

    #[test]
    fn requests_arriving_during_a_sync_share_the_next_single_sync() {
        let mut r = rig(FlushPolicy::Coalesce, true);
        r.sub.request(0);
        r.started.recv().unwrap(); // sync 1 is running (held at the gate)
        for id in 1..=8 {
            r.sub.request(id);
        }
        drop(r.release.take()); // let sync 1 finish
        let mut answers: Vec<_> = (0..9).map(|_| r.answers.recv().unwrap()).collect();
        answers.sort();
        for &(id, arrived, sync_start) in &answers {
            assert!(
                sync_start > arrived,
                "request {id} (t={arrived}) answered by a sync that started at t={sync_start}"
            );
        }
        // Request 0 by the first sync; requests 1..=8 all by the one sync after it.
        let second = answers[1].2;
        assert!(answers[1..].iter().all(|a| a.2 == second));
        assert_ne!(answers[0].2, second);
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn per_request_policy_syncs_once_per_request() {
        let mut r = rig(FlushPolicy::PerRequest, true);
        r.sub.request(0);
        r.started.recv().unwrap();
        for id in 1..=4 {
            r.sub.request(id);
        }
        drop(r.release.take());
        for _ in 0..5 {
            let (_, arrived, start) = r.answers.recv().unwrap();
            assert!(start > arrived);
        }
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn concurrent_requesters_during_a_sync_cost_one_more_sync() {
        let mut r = rig(FlushPolicy::Coalesce, true);
        r.sub.request(usize::MAX >> 1);
        r.started.recv().unwrap();
        let threads = 8;
        let per_thread = 25;
        std::thread::scope(|s| {
            for t in 0..threads {
                let sub = &r.sub;
                s.spawn(move || {
                    for i in 0..per_thread {
                        sub.request(t * per_thread + i);
                    }
                });
            }
        });
        drop(r.release.take());
        let total = threads * per_thread;
        let mut seen = vec![false; total];
        for _ in 0..=total {
            let (id, arrived, start) = r.answers.recv().unwrap();
            assert!(start > arrived, "request {id} covered by an older sync");
            if id < total {
                assert!(!seen[id], "request {id} answered twice");
                seen[id] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        // 201 requests, 2 fdatasyncs: the first, and one for everything that arrived while it ran.
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 2);
    }

    /// Eight requests arrive during a held first sync and are answered together by the second; later syncs
    /// take `slow_us` longer.
    fn eight_answered_together(slow_us: u64) -> Rig {
        eight_answered_together_lingering(slow_us, TEST_LINGER)
    }

    fn eight_answered_together_lingering(slow_us: u64, max_linger: Duration) -> Rig {
        let mut r = rig_lingering(FlushPolicy::Coalesce, true, max_linger);
        r.sub.request(100);
        r.started.recv().unwrap();
        for id in 0..8 {
            r.sub.request(id);
        }
        r.sync.slow_us.store(slow_us, Ordering::SeqCst);
        drop(r.release.take());
        for _ in 0..9 {
            r.answers.recv().unwrap();
        }
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 2);
        r
    }

    #[test]
    fn requesters_that_come_back_after_their_answer_share_one_sync() {
        // 100 ms syncs earn the worker its longest wait for returning requesters.
        let r = eight_answered_together(100_000);
        // The eight answered together come back one by one, a little apart (as a guest at depth 8 does): one
        // sync for all.
        for id in 0..8 {
            r.sub.request(id);
            std::thread::sleep(Duration::from_micros(20));
        }
        for _ in 0..8 {
            let (id, arrived, start) = r.answers.recv().unwrap();
            assert!(start > arrived, "request {id} covered by an older sync");
        }
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_returning_group_wakes_the_worker_once_and_an_idle_one_sleeps() {
        // 400 ms syncs: the worker waits up to 200 ms for the eight to come back, far longer than they take.
        let r = eight_answered_together_lingering(400_000, Duration::from_secs(60));
        let waiting_for_eight = || r.sub.worker.shared.lock().wanted == 8;
        while !waiting_for_eight() {
            std::thread::sleep(Duration::from_micros(100));
        }
        let wakes = || r.sub.worker.shared.lock().wakes;
        let before = wakes();
        for id in 0..8 {
            r.sub.request(id);
        }
        for _ in 0..8 {
            r.answers.recv().unwrap();
        }
        // Only the submit that completed the group woke the worker, not the first of the eight too.
        assert_eq!(wakes() - before, 1);
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 3);
        // Nobody comes back: the worker wakes once (its wait for the group ends) and then sleeps.
        let idle = wakes();
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(wakes() - idle, 1);
        r.sync.slow_us.store(0, Ordering::SeqCst);
        r.sub.request(0);
        r.answers.recv().unwrap();
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_request_that_comes_back_alone_is_not_held_for_the_others() {
        let r = eight_answered_together(0);
        // Only one of the eight comes back: it is answered once the short wait for the others is over.
        r.sub.request(0);
        let answer = r.answers.recv_timeout(Duration::from_secs(10));
        assert!(answer.is_ok(), "a lone request was never answered");
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_stalled_flush_does_not_hold_the_requests_after_it() {
        // The worker may wait up to a minute here, so only its rule decides how long it waits.
        let r = eight_answered_together_lingering(0, Duration::from_secs(60));
        // The eight come back together and their flush stalls for 4 s (a disk hiccup).
        r.sync.slow_us.store(4_000_000, Ordering::SeqCst);
        let batch: Vec<_> = (0..8)
            .map(|id| (id, r.sub.clock.fetch_add(1, Ordering::SeqCst)))
            .collect();
        r.sub.worker.submit(batch);
        for _ in 0..8 {
            r.answers.recv().unwrap();
        }
        r.sync.slow_us.store(0, Ordering::SeqCst);
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 3);
        // One of them comes back alone: it is answered (after the short wait the flushes before the stall set).
        r.sub.request(0);
        let (_, arrived, start) = r.answers.recv().unwrap();
        assert!(start > arrived);
        assert_eq!(r.sync.syncs.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn the_wait_for_a_group_follows_the_fastest_recent_flush_not_a_stall() {
        let ms = Duration::from_millis;
        let recent: VecDeque<_> = [ms(2), ms(3), ms(4000)].into_iter().collect();
        assert_eq!(linger_after(&recent, ms(60_000)), ms(2) / LINGER_DIVISOR);
        // Never longer than the bound, and nothing to go on means no wait.
        let slow: VecDeque<_> = [ms(900), ms(800)].into_iter().collect();
        assert_eq!(linger_after(&slow, ms(100)), ms(100));
        assert_eq!(linger_after(&VecDeque::new(), ms(100)), Duration::ZERO);
    }

    #[test]
    fn shutdown_answers_what_was_queued() {
        let mut r = rig(FlushPolicy::Coalesce, true);
        r.sub.request(0);
        r.started.recv().unwrap();
        r.sub.request(1);
        drop(r.release.take());
        let Rig { sub, answers, .. } = r;
        drop(sub);
        let got: Vec<_> = answers.try_iter().map(|a| a.0).collect();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn throttled_requests_wait_are_counted_and_shutdown_lifts_the_limit() {
        use super::super::rate_limit::{BucketConfig, FlushLimits};
        let dir = std::env::temp_dir();
        let file = Arc::new(tempfile::tempfile_in(dir).unwrap());
        let f2 = file.clone();
        let flush: Arc<dyn Flush> = Arc::new(move || f2.sync_data());
        let limit = Arc::new(FlushRateLimit::new(4096));
        // One flush request per hour after a burst of 2.
        limit.set(FlushLimits {
            ops: Some(BucketConfig {
                size: 2,
                refill: Duration::from_secs(7200),
            }),
            bytes: None,
        });
        let throttled = Arc::new(AtomicU64::new(0));
        let t2 = throttled.clone();
        let (tx, answers) = mpsc::channel();
        let worker = FlushWorker::spawn_limited(
            "test-flush-limited",
            flush,
            FlushPolicy::PerRequest,
            Some((
                limit,
                Box::new(move |n, a: Admission| {
                    if a.throttled {
                        t2.fetch_add(n, Ordering::SeqCst);
                    }
                }),
            )),
            Box::new(move |batch: Vec<u32>, res: &io::Result<()>| {
                assert!(res.is_ok());
                for id in batch {
                    tx.send(id).unwrap();
                }
            }),
        )
        .unwrap();
        worker.submit([1, 2, 3]);
        assert_eq!(answers.recv().unwrap(), 1);
        assert_eq!(answers.recv().unwrap(), 2);
        // The third waits for a token an hour away: never failed, still pending.
        assert!(answers.recv_timeout(Duration::from_millis(300)).is_err());
        // Dropping the worker lifts the limit (it would otherwise wait the hour) and answers the third.
        drop(worker);
        assert_eq!(answers.try_recv().unwrap(), 3);
        assert_eq!(throttled.load(Ordering::SeqCst), 1);
    }
}
