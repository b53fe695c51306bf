//! Flush throughput and latency: daxvisor's coalescing worker against the ideal and against each peer VMM's
//! strategy, all measured in one run on the same file system.
//!
//! `depth` requester threads each loop: dirty 4 KiB of a real file (pwrite), submit a flush request, wait for its
//! answer: a guest with `depth` flushes in flight. Answers reach them through a [`Doorbell`], as a virtio
//! device's reach a guest. Strategies:
//! - `daxvisor`: the device's [`FlushWorker`] with [`FlushPolicy::Coalesce`] and fdatasync;
//! - `per-request`: the same worker, one fdatasync per request (the baseline of earlier runs);
//! - `cloud-hv`: one fsync per request on one thread (Cloud Hypervisor's virtio-pmem);
//! - `firecracker`: Firecracker's event thread, an msync(MS_SYNC) of the whole mapping per queue notification
//!   answering the requests queued when it started (see [`event_thread`]);
//! - `fc-shipped`: the same as Firecracker's code does it, answering requests that arrived during the msync too;
//!   not durable for them, so shown but not counted as a peer;
//! - `qemu`: one fsync per request on a thread pool (QEMU's virtio-pmem; its pool has up to 64 threads).
//!
//! The ideal: a closed loop of depth d completes at most d requests per fdatasync of what those d requests
//! dirtied. So each round also times bare fdatasyncs after dirtying d x 4 KiB, and ideal req/s = d / their mean
//! time (the mean, as a strategy's req/s is an average over its slot too).
//!
//! The disk's weather changes by the second on a shared host (an fdatasync takes 0.08 ms to 4 ms, and stalls for
//! 100 ms happen), so the cases run in many short rounds: each round runs the ideal and every strategy once, in
//! an order that rotates, and the tables give medians over the rounds (a stall in one round moves no median).
//! For daxvisor it also prints what its worker did: a latency histogram, how many requests each flush answered,
//! how long its fdatasyncs took against the bare ones, and the time between two flushes split into answering
//! the requests (waking their requesters) and the requesters coming back.
//!
//! A host that is itself a VM wakes a halted vCPU late (on some days an fdatasync took ~4 ms with both CPUs idle
//! and ~0.1 ms with one busy), so every figure depends on what else the machine runs. FLUSH_BENCH_BUSY=1 keeps
//! one CPU busy with a spinning thread for the whole run, the same for every case.
//!
//! cargo bench -p daxvisor-devices --bench flush [-- SECONDS_PER_CASE_PER_ROUND] (default 0.25; env
//! FLUSH_BENCH_ROUNDS, default 12; FLUSH_BENCH_DEPTHS, default 1,8,32; FLUSH_BENCH_DIR picks the file system)

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use daxvisor_devices::virtio::pmem::{Flush, FlushPolicy, FlushWorker};

const FILE_LEN: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// Rounds per case; strategies and the ideal alternate round by round.
const ROUNDS: usize = 12;
/// QEMU's thread pool has at most 64 workers.
const QEMU_POOL_MAX: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Daxvisor,
    PerRequest,
    CloudHypervisor,
    Firecracker,
    FirecrackerShipped,
    Qemu,
}

impl Strategy {
    const ALL: [Strategy; 6] = [
        Strategy::Daxvisor,
        Strategy::PerRequest,
        Strategy::CloudHypervisor,
        Strategy::Firecracker,
        Strategy::FirecrackerShipped,
        Strategy::Qemu,
    ];
    const PEERS: [Strategy; 3] = [
        Strategy::CloudHypervisor,
        Strategy::Firecracker,
        Strategy::Qemu,
    ];

    fn name(self) -> &'static str {
        match self {
            Strategy::Daxvisor => "daxvisor",
            Strategy::PerRequest => "per-request",
            Strategy::CloudHypervisor => "cloud-hv",
            Strategy::Firecracker => "firecracker",
            Strategy::FirecrackerShipped => "fc-shipped",
            Strategy::Qemu => "qemu",
        }
    }
}

struct Stats {
    requests: usize,
    syncs: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// A shared writable mapping of the whole file (Firecracker's flush target).
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only passed to msync and munmap, never dereferenced; any thread may do that.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File) -> Mapping {
        let len = FILE_LEN as usize;
        // SAFETY: a fresh shared mapping of a file we own, at a kernel-chosen address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        Mapping { addr, len }
    }

    fn msync(&self) -> std::io::Result<()> {
        // SAFETY: msync over exactly our live mapping.
        if unsafe { libc::msync(self.addr, self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// What daxvisor's worker did in a run: when each flush ran and how many requests it answered.
#[derive(Default)]
struct Trace {
    syncs: Mutex<Vec<(Instant, Instant)>>,
    batches: Mutex<Vec<usize>>,
    /// When each flush's answers were all sent.
    answered: Mutex<Vec<Instant>>,
}

/// Accepts `who`'s flush request; the answer arrives through the [`Doorbell`].
type Submit = Box<dyn Fn(usize) + Send + Sync>;

const FUTEX_WAKE: i32 = libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG;
/// futex_waitv's flags for a private 32-bit futex.
const FUTEX2_U32_PRIVATE: u32 = 0x02 | 128;

/// One entry of futex_waitv(2) (not in the libc crate).
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// How answers reach the requesters, as a virtio device's reach a guest: the answers are written first (the
/// used ring), then one notification tells the waiters (the interrupt, whose handler wakes each waiter in one
/// pass in the guest's kernel). A batch of one wakes its requester alone; a larger batch wakes every waiting
/// requester with one futex call, and one whose request is not in the batch goes back to sleep. Each requester
/// waits on its own word and the shared one together (futex_waitv).
///
/// Per-requester channels (one futex wake, so one inter-processor interrupt, per answer) made answering a batch
/// of 32 cost about 180 us here, more than half a bare fdatasync: the bench measured its own harness.
struct Doorbell {
    /// Requests answered so far, per requester.
    answered: Vec<std::sync::atomic::AtomicU32>,
    /// Bumped once per answered batch of more than one.
    batch: std::sync::atomic::AtomicU32,
}

impl Doorbell {
    fn new(depth: usize) -> Doorbell {
        Doorbell {
            answered: (0..depth).map(|_| Default::default()).collect(),
            batch: Default::default(),
        }
    }

    fn answer(&self, batch: &[usize]) {
        for &who in batch {
            self.answered[who].fetch_add(1, Ordering::Release);
        }
        match batch {
            [] => {}
            [who] => futex_wake(&self.answered[*who], 1),
            _ => {
                self.batch.fetch_add(1, Ordering::Release);
                futex_wake(&self.batch, i32::MAX);
            }
        }
    }

    /// Wait until requester `who` has had `count` answers.
    fn wait(&self, who: usize, count: u32) {
        let mine = &self.answered[who];
        loop {
            let shared = self.batch.load(Ordering::Acquire);
            let seen = mine.load(Ordering::Acquire);
            if seen >= count {
                return;
            }
            let waiters = [
                FutexWaitv {
                    val: u64::from(seen),
                    uaddr: mine.as_ptr() as u64,
                    flags: FUTEX2_U32_PRIVATE,
                    reserved: 0,
                },
                FutexWaitv {
                    val: u64::from(shared),
                    uaddr: self.batch.as_ptr() as u64,
                    flags: FUTEX2_U32_PRIVATE,
                    reserved: 0,
                },
            ];
            // SAFETY: two valid futex_waitv entries on words that outlive the call; no timeout. It returns when
            // either word changes or at once if one already differs from the value read above (then loop).
            unsafe {
                libc::syscall(
                    libc::SYS_futex_waitv,
                    waiters.as_ptr(),
                    waiters.len() as u32,
                    0u32,
                    std::ptr::null::<libc::timespec>(),
                    libc::CLOCK_MONOTONIC,
                )
            };
        }
    }
}

fn futex_wake(word: &std::sync::atomic::AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live word touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), FUTEX_WAKE, n) };
}

/// Start `strategy`'s flush server for `depth` requesters; returns its submit function (dropping it stops the
/// server after answering what was queued).
fn server(
    strategy: Strategy,
    file: &File,
    depth: usize,
    answers: Arc<Doorbell>,
    syncs: Arc<AtomicU64>,
    trace: Arc<Trace>,
) -> Submit {
    let fd = file.try_clone().expect("dup");
    let count = syncs.clone();
    let fdatasync = move || {
        count.fetch_add(1, Ordering::Relaxed);
        fd.sync_data()
    };
    let fd = Arc::new(file.try_clone().expect("dup"));
    let count = syncs.clone();
    let fsync = move || {
        count.fetch_add(1, Ordering::Relaxed);
        fd.sync_all()
    };
    let msync = || {
        let map = Mapping::new(file);
        let count = syncs.clone();
        move || {
            count.fetch_add(1, Ordering::Relaxed);
            map.msync()
        }
    };
    match strategy {
        Strategy::Daxvisor => {
            let t = trace.clone();
            let timed = move || {
                let start = Instant::now();
                let r = fdatasync();
                t.syncs.lock().expect("trace").push((start, Instant::now()));
                r
            };
            let t = trace;
            let answer = move |batch: Vec<usize>| {
                t.batches.lock().expect("trace").push(batch.len());
                answers.answer(&batch);
                t.answered.lock().expect("trace").push(Instant::now());
            };
            worker(Arc::new(timed), FlushPolicy::Coalesce, Box::new(answer))
        }
        Strategy::PerRequest => worker(
            Arc::new(fdatasync),
            FlushPolicy::PerRequest,
            Box::new(move |b: Vec<usize>| answers.answer(&b)),
        ),
        Strategy::CloudHypervisor => worker(
            Arc::new(fsync),
            FlushPolicy::PerRequest,
            Box::new(move |b: Vec<usize>| answers.answer(&b)),
        ),
        Strategy::Firecracker => event_thread(Box::new(msync()), answers, false),
        Strategy::FirecrackerShipped => event_thread(Box::new(msync()), answers, true),
        Strategy::Qemu => {
            let (tx, rx) = mpsc::channel::<usize>();
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..depth.min(QEMU_POOL_MAX) {
                let rx = rx.clone();
                let answers = answers.clone();
                let fsync = fsync.clone();
                std::thread::spawn(move || loop {
                    let next = rx.lock().expect("queue").recv();
                    let Ok(who) = next else { break };
                    fsync().expect("fsync");
                    answers.answer(&[who]);
                });
            }
            let tx = Mutex::new(tx);
            Box::new(move |who| tx.lock().expect("queue").send(who).expect("pool"))
        }
    }
}

/// A [`FlushWorker`] handing each answered batch to `answer`.
fn worker(
    flush: Arc<dyn Flush>,
    policy: FlushPolicy,
    mut answer: Box<dyn FnMut(Vec<usize>) + Send>,
) -> Submit {
    let w = FlushWorker::spawn(
        "bench-flush",
        flush,
        policy,
        Box::new(move |batch: Vec<usize>, res: &std::io::Result<()>| {
            res.as_ref().expect("flush failed");
            answer(batch);
        }),
    )
    .expect("worker");
    Box::new(move |who| w.submit([who]))
}

/// The queue of a device served on one event thread, and whether that thread is to stop.
type EventQueue = (Mutex<(Vec<usize>, bool)>, std::sync::Condvar);

/// Firecracker's virtio-pmem on its event thread: a queue notification wakes the thread, which takes the
/// requests queued, msyncs the whole mapping once and answers them. Requests that arrive during the msync wait
/// for the next round. `shipped` copies what Firecracker's code does instead: it takes the first request, msyncs,
/// then answers with that result every request it finds queued after the msync too, including ones that arrived
/// while the msync ran (their data not covered by it).
fn event_thread(
    msync: Box<dyn Fn() -> std::io::Result<()> + Send>,
    answers: Arc<Doorbell>,
    shipped: bool,
) -> Submit {
    let queue: Arc<EventQueue> = Arc::new(Default::default());
    let q = queue.clone();
    let thread = std::thread::spawn(move || {
        let take_all = |st: &mut (Vec<usize>, bool)| std::mem::take(&mut st.0);
        loop {
            let mut st = q.0.lock().expect("queue");
            while st.0.is_empty() && !st.1 {
                st = q.1.wait(st).expect("queue");
            }
            if st.0.is_empty() {
                return;
            }
            let mut batch = if shipped {
                vec![st.0.remove(0)]
            } else {
                take_all(&mut st)
            };
            drop(st);
            msync().expect("msync");
            if shipped {
                batch.extend(take_all(&mut q.0.lock().expect("queue")));
            }
            answers.answer(&batch);
        }
    });
    struct Stop(Arc<EventQueue>, Option<std::thread::JoinHandle<()>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0 .0.lock().expect("queue").1 = true;
            self.0 .1.notify_one();
            if let Some(t) = self.1.take() {
                t.join().expect("event thread");
            }
        }
    }
    let stop = Stop(queue, Some(thread));
    Box::new(move |who| {
        let mut st = stop.0 .0.lock().expect("queue");
        st.0.push(who);
        // An eventfd write: wakes the thread if it sleeps; while it msyncs, it looks again before sleeping.
        if st.0.len() == 1 {
            stop.0 .1.notify_one();
        }
    })
}

/// The page requester `who` dirties on its `i`th request.
fn page_of(who: usize, i: u64) -> u64 {
    ((who as u64 * 1024 + i) % (FILE_LEN / PAGE)) * PAGE
}

/// The backing file every case uses: written through once and synced, so a flush writes data and never
/// allocates blocks (as for a pmem file made with create=on and used before).
fn backing_file(dir: &std::path::Path) -> File {
    let file = tempfile::tempfile_in(dir).expect("temp file");
    let chunk = vec![0x11u8; 1 << 20];
    for i in 0..FILE_LEN / (1 << 20) {
        file.write_all_at(&chunk, i << 20).expect("write");
    }
    file.sync_all().expect("fsync");
    file
}

fn run(
    file: &File,
    strategy: Strategy,
    depth: usize,
    duration: Duration,
    trace: &Arc<Trace>,
) -> Stats {
    let syncs = Arc::new(AtomicU64::new(0));
    let answers = Arc::new(Doorbell::new(depth));
    let submit = Arc::new(server(
        strategy,
        file,
        depth,
        answers.clone(),
        syncs.clone(),
        trace.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..depth)
        .map(|who| {
            let answers = answers.clone();
            let submit = submit.clone();
            let stop = stop.clone();
            let file = file.try_clone().expect("dup");
            std::thread::spawn(move || {
                let page = vec![who as u8; PAGE as usize];
                let mut lat = Vec::new();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    file.write_all_at(&page, page_of(who, i.into()))
                        .expect("pwrite");
                    let t = Instant::now();
                    submit(who);
                    i += 1;
                    answers.wait(who, i);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("requester"))
        .collect();
    let elapsed = start.elapsed();
    Stats {
        requests: latencies.len(),
        syncs: syncs.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
}

/// Bare fdatasyncs, each after dirtying `depth` x 4 KiB (as `depth` requesters would), for about `duration`.
fn bare_syncs(file: &File, depth: usize, duration: Duration) -> Vec<Duration> {
    let page = vec![7u8; PAGE as usize];
    let mut out = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < duration || out.len() < 3 {
        for who in 0..depth {
            file.write_all_at(&page, page_of(who, i)).expect("pwrite");
        }
        let t = Instant::now();
        file.sync_data().expect("fdatasync");
        out.push(t.elapsed());
        i += 1;
    }
    out
}

fn median<T: PartialOrd + Copy>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Latency bounds of the histogram's buckets, in microseconds (the last bucket is everything above).
const BUCKETS_US: [u64; 8] = [250, 500, 1000, 2000, 4000, 8000, 16000, 32000];

/// Share of `lat` in each bucket of [`BUCKETS_US`], as percent, on one line.
fn histogram(lat: &[Duration]) -> String {
    let mut counts = [0usize; BUCKETS_US.len() + 1];
    for l in lat {
        let us = l.as_micros() as u64;
        let b = BUCKETS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(BUCKETS_US.len());
        counts[b] += 1;
    }
    counts
        .iter()
        .map(|&c| format!("{:>6.2}", 100.0 * c as f64 / lat.len().max(1) as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One round of one strategy, against the round's ideal.
struct RoundResult {
    req_s: f64,
    of_ideal: f64,
    /// Against the ideal at the median fdatasync time instead of the mean (a stall-free disk).
    of_ideal_p50: f64,
    req_per_sync: f64,
    p50: Duration,
    p99: Duration,
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(0.25);
    let rounds: usize = std::env::var("FLUSH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let depths: Vec<usize> = std::env::var("FLUSH_BENCH_DEPTHS")
        .ok()
        .map(|d| d.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    let dir = std::env::var("FLUSH_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let slot = Duration::from_secs_f64(secs);
    println!(
        "flush benchmark: 64 MiB file (written and synced once) in {dir}, 4 KiB dirtied per request; {rounds} rounds, \
         each running every case for {secs} s in turn (ideal and strategies interleaved, the order rotating); \
         figures are medians over the rounds; ratios (of ideal, x peer) are taken within each round, then the median"
    );
    let busy = std::env::var("FLUSH_BENCH_BUSY").is_ok_and(|v| v == "1");
    let spinning = Arc::new(AtomicBool::new(busy));
    if busy {
        let spinning = spinning.clone();
        std::thread::spawn(move || {
            while spinning.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        println!("FLUSH_BENCH_BUSY=1: one CPU kept busy by a spinning thread for the whole run");
    }
    let file = backing_file(dir.as_ref());
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut summary = Vec::new();
    for &depth in &depths {
        let cases = Strategy::ALL.len() + 1;
        let mut results: Vec<Vec<RoundResult>> = Strategy::ALL.iter().map(|_| Vec::new()).collect();
        let mut latencies: Vec<Vec<Duration>> = Strategy::ALL.iter().map(|_| Vec::new()).collect();
        let mut ideal_syncs = Vec::new();
        let mut ideals = Vec::new();
        let trace = Arc::new(Trace::default());
        for round in 0..rounds {
            // Each round starts with another case, so no case always follows the same one.
            let order: Vec<usize> = (0..cases).map(|c| (c + round) % cases).collect();
            let mut stats: Vec<Option<Stats>> = Strategy::ALL.iter().map(|_| None).collect();
            let mut ideal = 0.0;
            let mut ideal_p50 = 0.0;
            for case in order {
                match Strategy::ALL.get(case) {
                    Some(s) => stats[case] = Some(run(&file, *s, depth, slot, &trace)),
                    None => {
                        let bare = bare_syncs(&file, depth, slot);
                        // d requests per fdatasync, at the mean fdatasync time: the same average over the
                        // slot that a strategy's requests per second are.
                        let total: Duration = bare.iter().sum();
                        ideal = depth as f64 * bare.len() as f64 / total.as_secs_f64();
                        ideal_p50 = depth as f64 / median(&bare).as_secs_f64();
                        ideal_syncs.extend(bare);
                    }
                }
            }
            ideals.push(ideal);
            for (i, st) in stats.into_iter().enumerate() {
                let Some(st) = st else { continue };
                results[i].push(RoundResult {
                    req_s: st.throughput(),
                    of_ideal: st.throughput() / ideal,
                    of_ideal_p50: st.throughput() / ideal_p50,
                    req_per_sync: st.requests as f64 / st.syncs.max(1) as f64,
                    p50: st.percentile(0.5),
                    p99: st.percentile(0.99),
                });
                latencies[i].extend(st.latencies);
            }
        }
        println!(
            "\ndepth {depth}: {:>12} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "strategy", "req/s", "req/sync", "p50 us", "p99 us", "of ideal"
        );
        println!(
            "depth {depth}: {:>12} {:>10.0} {depth:>9} {:>9.0} {:>9.0} {:>9}",
            "ideal",
            median(&ideals),
            us(percentile(&ideal_syncs, 0.5)),
            us(percentile(&ideal_syncs, 0.99)),
            "1.00"
        );
        let med = |rs: &[RoundResult], f: &dyn Fn(&RoundResult) -> f64| {
            median(&rs.iter().map(f).collect::<Vec<f64>>())
        };
        for (s, rs) in Strategy::ALL.iter().zip(&results) {
            println!(
                "depth {depth}: {:>12} {:>10.0} {:>9.2} {:>9.0} {:>9.0} {:>9.2}",
                s.name(),
                med(rs, &|r| r.req_s),
                med(rs, &|r| r.req_per_sync),
                med(rs, &|r| us(r.p50)),
                med(rs, &|r| us(r.p99)),
                med(rs, &|r| r.of_ideal),
            );
        }
        println!(
            "depth {depth}: latency histogram, % of requests below (us): {}",
            BUCKETS_US
                .iter()
                .map(|b| format!("{b:>6}"))
                .chain(std::iter::once(" above".to_owned()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (s, lat) in Strategy::ALL.iter().zip(&latencies) {
            println!("depth {depth}: {:>12}   {}", s.name(), histogram(lat));
        }
        println!(
            "depth {depth}: {:>12}   {}  (bare fdatasync times)",
            "ideal",
            histogram(&ideal_syncs)
        );
        // What the worker did: how many requests each flush answered, how long flushes took, how long the
        // worker sat between the end of one flush and the start of the next (waiting for requesters).
        let batches = trace.batches.lock().expect("trace").clone();
        let syncs = trace.syncs.lock().expect("trace").clone();
        let mut sizes = vec![0usize; depth + 1];
        for b in &batches {
            sizes[(*b).min(depth)] += 1;
        }
        let took: Vec<Duration> = syncs.iter().map(|(s, e)| *e - *s).collect();
        let answered = trace.answered.lock().expect("trace").clone();
        // Between flushes: the worker answering the requests (waking their requesters), then the requesters
        // coming back (dirty, submit) while the worker waits for them.
        let mut answering = Vec::new();
        let mut returning = Vec::new();
        for (w, a) in syncs.windows(2).zip(&answered) {
            if let (Some(ans), Some(ret)) = (
                a.checked_duration_since(w[0].1),
                w[1].0.checked_duration_since(*a),
            ) {
                if ans + ret < slot {
                    answering.push(ans);
                    returning.push(ret);
                }
            }
        }
        let shown: Vec<String> = sizes
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(n, c)| {
                format!(
                    "{n}:{:.1}%",
                    100.0 * *c as f64 / batches.len().max(1) as f64
                )
            })
            .collect();
        println!(
            "depth {depth}: daxvisor requests per flush (size:share of flushes): {}",
            shown.join(" ")
        );
        println!(
            "depth {depth}: daxvisor fdatasync p50/p99/max {:.0}/{:.0}/{:.0} us (bare: {:.0}/{:.0}/{:.0}); \
             between flushes p50/p99: answering {:.0}/{:.0} us, then requesters back {:.0}/{:.0} us",
            us(percentile(&took, 0.5)),
            us(percentile(&took, 0.99)),
            us(percentile(&took, 1.0)),
            us(percentile(&ideal_syncs, 0.5)),
            us(percentile(&ideal_syncs, 0.99)),
            us(percentile(&ideal_syncs, 1.0)),
            us(percentile(&answering, 0.5)),
            us(percentile(&answering, 0.99)),
            us(percentile(&returning, 0.5)),
            us(percentile(&returning, 0.99)),
        );
        let pooled: Vec<Duration> = latencies.iter().map(|l| percentile(l, 0.99)).collect();
        summary.push((depth, results, pooled));
    }

    println!(
        "\nsame run, daxvisor against the ideal and each strategy (medians over {rounds} rounds):"
    );
    println!(
        "{:>5} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}   p99: daxvisor vs best peer",
        "depth",
        "of ideal",
        "of ideal@p50",
        "x per-req",
        "x cloud-hv",
        "x firecrack",
        "x qemu",
        "x fc-shipped"
    );
    let mut pooled_lines = Vec::new();
    for (depth, results, pooled) in &summary {
        let index = |s: Strategy| Strategy::ALL.iter().position(|x| *x == s).unwrap_or(0);
        let of = |s: Strategy| &results[index(s)];
        let d = of(Strategy::Daxvisor);
        // Ratios per round (same disk weather), then the median.
        let x = |s: Strategy| {
            median(
                &d.iter()
                    .zip(of(s))
                    .map(|(a, b)| a.req_s / b.req_s.max(1e-9))
                    .collect::<Vec<f64>>(),
            )
        };
        let p99 = |rs: &[RoundResult]| median(&rs.iter().map(|r| r.p99).collect::<Vec<_>>());
        let best_peer = Strategy::PEERS
            .iter()
            .map(|s| (s.name(), p99(of(*s))))
            .min_by_key(|(_, p)| *p)
            .unwrap_or(("none", Duration::ZERO));
        let dp99 = p99(d);
        println!(
            "{depth:>5} {:>9.2} {:>12.2} {:>11.2}x {:>11.2}x {:>11.2}x {:>11.2}x {:>11.2}x   {:.0} us vs {:.0} us ({}): {}",
            median(&d.iter().map(|r| r.of_ideal).collect::<Vec<f64>>()),
            median(&d.iter().map(|r| r.of_ideal_p50).collect::<Vec<f64>>()),
            x(Strategy::PerRequest),
            x(Strategy::CloudHypervisor),
            x(Strategy::Firecracker),
            x(Strategy::Qemu),
            x(Strategy::FirecrackerShipped),
            us(dp99),
            us(best_peer.1),
            best_peer.0,
            if dp99 <= best_peer.1 { "no worse" } else { "WORSE" }
        );
        // The same over every request of every round: a stall is then weighed by how many requests it held.
        let (peer, peer_p99) = Strategy::PEERS
            .iter()
            .map(|s| (s.name(), pooled[index(*s)]))
            .min_by_key(|(_, p)| *p)
            .unwrap_or(("none", Duration::ZERO));
        let mine = pooled[index(Strategy::Daxvisor)];
        pooled_lines.push(format!(
            "{depth:>5} p99 over all rounds' requests: {:.0} us vs {:.0} us ({peer}): {}",
            us(mine),
            us(peer_p99),
            if mine <= peer_p99 {
                "no worse"
            } else {
                "WORSE"
            }
        ));
    }
    for line in pooled_lines {
        println!("{line}");
    }
    println!(
        "of ideal: against d / the mean bare fdatasync of the round; of ideal@p50: against d / its median (a disk \
         without stalls); p99 above: the median of the rounds' p99s"
    );
    println!(
        "fc-shipped is Firecracker's code as it is: it also answers requests that arrived while its msync ran, \
         whose data that msync may not cover, so it is no peer for a flush that must be durable"
    );
    println!("targets at depth 32: of ideal >= 0.50, p99 no worse than the best peer");
    spinning.store(false, Ordering::Relaxed);
}
