//! Flush throughput and latency: the coalescing worker against one fdatasync per request.
//!
//! `depth` requester threads each loop: dirty 4 KiB of a real file (pwrite), submit a flush request, wait for
//! its answer. That is a guest with `depth` flushes in flight. Both policies run in the same process, on the
//! same file system, back to back, and the ratios are printed from this one run.
//!
//! cargo bench -p daxvisor-devices --bench flush [-- SECONDS_PER_CASE] (env FLUSH_BENCH_DIR picks the file system)

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use daxvisor_devices::virtio::pmem::{Flush, FlushPolicy, FlushWorker};

struct FileSync(File);

impl Flush for FileSync {
    fn flush(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

struct Result {
    requests: usize,
    syncs: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Rounds per case; the policies alternate round by round.
const ROUNDS: u32 = 4;

impl Result {
    fn empty() -> Self {
        Result {
            requests: 0,
            syncs: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        }
    }
    fn merge(&mut self, o: Result) {
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

fn run(dir: &std::path::Path, policy: FlushPolicy, depth: usize, duration: Duration) -> Result {
    let file = tempfile::tempfile_in(dir).expect("temp file");
    file.set_len(64 << 20).expect("size file");
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flush = {
        let f = FileSync(file.try_clone().expect("dup"));
        let syncs = syncs.clone();
        Arc::new(move || {
            syncs.fetch_add(1, Ordering::Relaxed);
            f.flush()
        })
    };
    // One answer channel per requester.
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..depth).map(|_| mpsc::channel::<()>()).unzip();
    let worker = Arc::new(
        FlushWorker::spawn(
            "bench-flush",
            flush,
            policy,
            Box::new(move |batch: Vec<usize>, res: &std::io::Result<()>| {
                res.as_ref().expect("fdatasync failed");
                for who in batch {
                    let _ = txs[who].send(());
                }
            }),
        )
        .expect("worker"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(who, rx)| {
            let worker = worker.clone();
            let stop = stop.clone();
            let file = file.try_clone().expect("dup");
            std::thread::spawn(move || {
                let page = vec![who as u8; 4096];
                let mut lat = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = ((who as u64 * 1024 + i) % 16384) * 4096;
                    file.write_all_at(&page, off).expect("pwrite");
                    let t = Instant::now();
                    worker.submit([who]);
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
    Result {
        requests: latencies.len(),
        syncs: syncs.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
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
        "flush benchmark: fdatasync on a 64 MiB file in {dir}, {secs} s per case in {ROUNDS} alternating rounds, 4 KiB dirtied per request"
    );
    println!(
        "{:>5} {:>12} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "depth", "policy", "req/s", "syncs", "req/sync", "p50 us", "p99 us"
    );
    let mut rows = Vec::new();
    for depth in [1usize, 8, 32] {
        // Alternate the two policies in short rounds so drift in the disk's speed (other tenants) hits both.
        let mut c = Result::empty();
        let mut p = Result::empty();
        for _ in 0..ROUNDS {
            c.merge(run(
                dir.as_ref(),
                FlushPolicy::Coalesce,
                depth,
                duration / ROUNDS,
            ));
            p.merge(run(
                dir.as_ref(),
                FlushPolicy::PerRequest,
                depth,
                duration / ROUNDS,
            ));
        }
        for (name, r) in [("coalesce", &c), ("per-request", &p)] {
            println!(
                "{:>5} {:>12} {:>10.0} {:>8} {:>10.2} {:>10} {:>10}",
                depth,
                name,
                r.throughput(),
                r.syncs,
                r.requests as f64 / r.syncs.max(1) as f64,
                r.percentile(0.5).as_micros(),
                r.percentile(0.99).as_micros()
            );
        }
        rows.push((depth, c, p));
    }
    println!("\nratios coalescing / one-sync-per-request (same run):");
    println!(
        "{:>5} {:>12} {:>14} {:>14}",
        "depth", "throughput", "p50 latency", "p99 latency"
    );
    for (depth, c, p) in &rows {
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "{:>5} {:>11.2}x {:>13.2}x {:>13.2}x",
            depth,
            c.throughput() / p.throughput().max(1e-9),
            ratio(c.percentile(0.5), p.percentile(0.5)),
            ratio(c.percentile(0.99), p.percentile(0.99))
        );
    }
}
