//! Flush throughput and latency: daxvisor's coalescing worker against the ideal and against each peer VMM's
//! strategy, all measured in one run on the same file system.
//!
//! `depth` requester threads each loop: dirty 4 KiB of a real file (pwrite), submit a flush request, wait for its
//! answer: a guest with `depth` flushes in flight. Strategies:
//! - `daxvisor`: the device's [`FlushWorker`] with [`FlushPolicy::Coalesce`] and fdatasync;
//! - `per-request`: the same worker, one fdatasync per request (the baseline of earlier runs);
//! - `cloud-hv`: one fsync per request on one thread (Cloud Hypervisor's virtio-pmem);
//! - `firecracker`: an msync(MS_SYNC) of the whole mapping per queue notification, on one (event) thread, which
//!   answers every request the notification found;
//! - `qemu`: one fsync per request on a thread pool (QEMU's virtio-pmem; its pool has up to 64 threads).
//!
//! The ideal: a closed loop of depth d completes at most d requests per fdatasync of what those d requests
//! dirtied. So each round also times bare fdatasyncs after dirtying d x 4 KiB, and ideal req/s = d / that time.
//! The strategies and the ideal alternate in short rounds so drift in the disk (other tenants) hits all alike.
//!
//! A host that is itself a VM may take a disk's completion interrupt on an idle vCPU only at its next timer tick
//! (this one: an fdatasync takes ~4 ms with both CPUs idle, ~0.1 ms with one busy), so every figure would depend
//! on what else the machine runs. FLUSH_BENCH_BUSY=1 keeps one CPU busy with a spinning thread for the whole run,
//! the same for every case.
//!
//! cargo bench -p daxvisor-devices --bench flush [-- SECONDS_PER_CASE] (env FLUSH_BENCH_DIR picks the file system)

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
const ROUNDS: u32 = 4;
/// QEMU's thread pool has at most 64 workers.
const QEMU_POOL_MAX: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Daxvisor,
    PerRequest,
    CloudHypervisor,
    Firecracker,
    Qemu,
}

impl Strategy {
    const ALL: [Strategy; 5] = [
        Strategy::Daxvisor,
        Strategy::PerRequest,
        Strategy::CloudHypervisor,
        Strategy::Firecracker,
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
    fn empty() -> Self {
        Stats {
            requests: 0,
            syncs: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        }
    }
    fn merge(&mut self, o: Stats) {
        self.requests += o.requests;
        self.syncs += o.syncs;
        self.elapsed += o.elapsed;
        self.latencies.extend(o.latencies);
    }
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
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

/// Accepts `who`'s flush request; the answer arrives on `who`'s channel.
type Submit = Box<dyn Fn(usize) + Send + Sync>;

/// Start `strategy`'s flush server for `depth` requesters; returns its submit function (dropping it stops the
/// server after answering what was queued).
fn server(
    strategy: Strategy,
    file: &File,
    depth: usize,
    answers: Vec<mpsc::Sender<()>>,
    syncs: Arc<AtomicU64>,
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
    match strategy {
        Strategy::Daxvisor => worker(Arc::new(fdatasync), FlushPolicy::Coalesce, answers),
        Strategy::PerRequest => worker(Arc::new(fdatasync), FlushPolicy::PerRequest, answers),
        Strategy::CloudHypervisor => worker(Arc::new(fsync), FlushPolicy::PerRequest, answers),
        Strategy::Firecracker => {
            // One event thread: a notification drains the queue and one msync answers all it found.
            let map = Mapping::new(file);
            let count = syncs;
            let msync = move || {
                count.fetch_add(1, Ordering::Relaxed);
                map.msync()
            };
            worker(Arc::new(msync), FlushPolicy::Coalesce, answers)
        }
        Strategy::Qemu => {
            let (tx, rx) = mpsc::channel::<usize>();
            let rx = Arc::new(Mutex::new(rx));
            let answers = Arc::new(answers);
            for _ in 0..depth.min(QEMU_POOL_MAX) {
                let rx = rx.clone();
                let answers = answers.clone();
                let fsync = fsync.clone();
                std::thread::spawn(move || loop {
                    let next = rx.lock().expect("queue").recv();
                    let Ok(who) = next else { break };
                    fsync().expect("fsync");
                    let _ = answers[who].send(());
                });
            }
            let tx = Mutex::new(tx);
            Box::new(move |who| tx.lock().expect("queue").send(who).expect("pool"))
        }
    }
}

/// A [`FlushWorker`] answering each request on its requester's channel.
fn worker(flush: Arc<dyn Flush>, policy: FlushPolicy, answers: Vec<mpsc::Sender<()>>) -> Submit {
    let w = FlushWorker::spawn(
        "bench-flush",
        flush,
        policy,
        Box::new(move |batch: Vec<usize>, res: &std::io::Result<()>| {
            res.as_ref().expect("flush failed");
            for who in batch {
                let _ = answers[who].send(());
            }
        }),
    )
    .expect("worker");
    Box::new(move |who| w.submit([who]))
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

fn run(file: &File, strategy: Strategy, depth: usize, duration: Duration) -> Stats {
    let syncs = Arc::new(AtomicU64::new(0));
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..depth).map(|_| mpsc::channel::<()>()).unzip();
    let submit = Arc::new(server(strategy, file, depth, txs, syncs.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(who, rx)| {
            let submit = submit.clone();
            let stop = stop.clone();
            let file = file.try_clone().expect("dup");
            std::thread::spawn(move || {
                let page = vec![who as u8; PAGE as usize];
                let mut lat = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    file.write_all_at(&page, page_of(who, i)).expect("pwrite");
                    let t = Instant::now();
                    submit(who);
                    rx.recv().expect("answer");
                    lat.push(t.elapsed());
                    i += 1;
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    let dir = std::env::var("FLUSH_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let duration = Duration::from_secs_f64(secs);
    println!(
        "flush benchmark: 64 MiB file (written and synced once) in {dir}, {secs} s per case in {ROUNDS} alternating rounds, 4 KiB dirtied per request"
    );
    println!(
        "{:>5} {:>12} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "depth", "strategy", "req/s", "syncs", "req/sync", "p50 us", "p99 us", "of ideal"
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
    for depth in [1usize, 8, 32] {
        let mut stats: Vec<Stats> = Strategy::ALL.iter().map(|_| Stats::empty()).collect();
        let mut bare = Vec::new();
        for round in 0..ROUNDS as usize {
            // Each round starts with another case, so no case always follows the same one.
            let cases = Strategy::ALL.len() + 1;
            for case in (0..cases).map(|c| (c + round) % cases) {
                match Strategy::ALL.get(case) {
                    Some(s) => stats[case].merge(run(&file, *s, depth, duration / ROUNDS)),
                    None => bare.extend(bare_syncs(&file, depth, duration / ROUNDS)),
                }
            }
        }
        let sync = median(bare);
        let ideal = depth as f64 / sync.as_secs_f64();
        println!(
            "{depth:>5} {:>12} {ideal:>10.0} {:>8} {depth:>9} {:>9.0} {:>9} {:>9}",
            "ideal",
            "",
            us(sync),
            "",
            "1.00"
        );
        for (s, r) in Strategy::ALL.iter().zip(&stats) {
            println!(
                "{depth:>5} {:>12} {:>10.0} {:>8} {:>9.2} {:>9.0} {:>9.0} {:>9.2}",
                s.name(),
                r.throughput(),
                r.syncs,
                r.requests as f64 / r.syncs.max(1) as f64,
                us(r.percentile(0.5)),
                us(r.percentile(0.99)),
                r.throughput() / ideal
            );
        }
        summary.push((depth, ideal, stats));
    }

    println!("\nsame run, daxvisor against the ideal and each strategy:");
    println!(
        "{:>5} {:>9} {:>12} {:>12} {:>12} {:>12}   p99: daxvisor vs best peer",
        "depth", "of ideal", "x per-req", "x cloud-hv", "x firecrack", "x qemu"
    );
    for (depth, ideal, stats) in &summary {
        let of = |s: Strategy| &stats[Strategy::ALL.iter().position(|x| *x == s).unwrap_or(0)];
        let d = of(Strategy::Daxvisor);
        let x = |s: Strategy| d.throughput() / of(s).throughput().max(1e-9);
        let best_peer = Strategy::PEERS
            .iter()
            .map(|s| (s.name(), of(*s).percentile(0.99)))
            .min_by_key(|(_, p)| *p)
            .unwrap_or(("none", Duration::ZERO));
        let p99 = d.percentile(0.99);
        println!(
            "{depth:>5} {:>9.2} {:>11.2}x {:>11.2}x {:>11.2}x {:>11.2}x   {:.0} us vs {:.0} us ({}): {}",
            d.throughput() / ideal,
            x(Strategy::PerRequest),
            x(Strategy::CloudHypervisor),
            x(Strategy::Firecracker),
            x(Strategy::Qemu),
            us(p99),
            us(best_peer.1),
            best_peer.0,
            if p99 <= best_peer.1 { "no worse" } else { "WORSE" }
        );
    }
    println!("targets at depth 32: of ideal >= 0.50, p99 no worse than the best peer");
    spinning.store(false, Ordering::Relaxed);
}
