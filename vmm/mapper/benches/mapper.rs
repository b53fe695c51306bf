//! Mapper benchmarks (harness = false; `cargo bench -p daxvisor-mapper --bench mapper`):
//! 1. lease table: acquire, lookup and break fan-out cost at 1k, 100k and 1M leases on one region, with the
//!    growth ratios against 1k printed next to the log2 ratio an O(log n + k) structure should show;
//! 2. pin of a 1 GiB range (FIEMAP validate + MADV_POPULATE_WRITE + mlock) against bare MADV_POPULATE_WRITE on
//!    the same range, as a ratio (target: within 1.2x).
//!
//! Env: DAXVISOR_BENCH_DIR (where the 1 GiB file goes, default /tmp), DAXVISOR_BENCH_PIN_MIB (default 1024),
//! DAXVISOR_BENCH_SKIP_PIN=1, DAXVISOR_BENCH_MAX_LEASES (default 1000000).

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use daxvisor_mapper::{
    BackingKind, BreakNotice, BreakNotifier, HostMapping, LeaseMode, MapOptions, Mapper, OwnerId,
    RegionDesc, RegionId, RevokeNotice,
};

/// Answers every break at once by releasing the leases, from inside the notifier (the mapper calls notifiers
/// with its lock released, so this is allowed): the benchmark then measures the mapper's fan-out, not a holder.
#[derive(Default)]
struct InstantRelease {
    mapper: OnceLock<Mapper>,
    notices: Mutex<u64>,
}

impl BreakNotifier for InstantRelease {
    fn break_notice(&self, n: &BreakNotice) {
        *self.notices.lock().unwrap() += 1;
        if let Some(m) = self.mapper.get() {
            for (l, _) in &n.leases {
                m.release(n.owner, *l).unwrap();
            }
        }
    }
    fn revoked(&self, _: &RevokeNotice) {}
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const SPACE: u64 = 1 << 40; // leases spread over 1 TiB of region offsets
const PAGE: u64 = 4096;
const FANOUT: usize = 16;

struct Figures {
    acquire_ns: f64,
    lookup_ns: f64,
    fanout_us: f64,
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn lease_table(n: usize, file: &Arc<File>) -> Figures {
    let notifier = Arc::new(InstantRelease::default());
    let m = Mapper::new(notifier.clone(), None);
    let _ = notifier.mapper.set(m.clone());
    let region: RegionId = m
        .add_region(RegionDesc::new(
            file.clone(),
            0,
            SPACE,
            BackingKind::Regular,
        ))
        .unwrap();
    let owners: Vec<OwnerId> = (0..64).map(|i| m.add_owner(&format!("o{i}"))).collect();
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ n as u64);
    // Fill to n, leaving the window [0, 1 MiB) for the fan-out breaks.
    for i in 0..n {
        let off = (1 << 20) + rng.next() % (SPACE - (2 << 20));
        let len = PAGE * (1 + rng.next() % 16);
        m.acquire(
            owners[i % owners.len()],
            region,
            off & !(PAGE - 1),
            len,
            LeaseMode::Shared,
        )
        .unwrap();
    }
    // acquire: a batch more (a tenth of n, at least 100, at most 10k: the tables must not grow several times
    // over while they are timed, as 10k more would make a 1k table do), timed, then released so n stays n;
    // best of 5 batches.
    let batch = (n / 10).clamp(100, 10_000);
    let mut acquire = f64::MAX;
    for _ in 0..5 {
        let mut extra = Vec::with_capacity(batch);
        let t0 = Instant::now();
        for i in 0..batch {
            let off = (1 << 20) + rng.next() % (SPACE - (2 << 20));
            let o = owners[i % owners.len()];
            extra.push((
                o,
                m.acquire(o, region, off & !(PAGE - 1), PAGE, LeaseMode::Shared)
                    .unwrap(),
            ));
        }
        acquire = acquire.min(per_op(t0.elapsed(), batch));
        for (o, l) in extra {
            m.release(o, l).unwrap();
        }
    }
    // lookup: who holds a random page.
    let queries = 100_000;
    let mut hits = 0usize;
    let mut lookup = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..queries {
            let off = rng.next() % SPACE;
            hits += m.lease_holders(region, off, PAGE).unwrap().len();
        }
        lookup = lookup.min(per_op(t0.elapsed(), queries));
    }
    black_box(hits);
    // break fan-out: a punch over FANOUT shared leases of FANOUT owners (file is empty: fallocate is a no-op).
    let rounds = 200;
    let mut spent = Duration::ZERO;
    for _ in 0..rounds {
        for (i, o) in owners.iter().take(FANOUT).enumerate() {
            m.acquire(*o, region, i as u64 * PAGE, PAGE, LeaseMode::Shared)
                .unwrap();
        }
        let t0 = Instant::now();
        let r = m.punch(None, region, 0, FANOUT as u64 * PAGE).unwrap();
        spent += t0.elapsed();
        assert_eq!(r.notified.len(), FANOUT);
    }
    assert_eq!(*notifier.notices.lock().unwrap(), (rounds * FANOUT) as u64);
    Figures {
        acquire_ns: acquire,
        lookup_ns: lookup,
        fanout_us: spent.as_nanos() as f64 / rounds as f64 / 1000.0,
    }
}

/// The interval index alone (no lock, no tables): insert and overlap query per op (best of 3 passes), and the
/// average query work in memory locations touched (`IntervalIndex::query_work`).
fn raw_index(n: usize) -> (f64, f64, f64) {
    use daxvisor_mapper::{ByteRange, IntervalIndex};
    let mut ix = IntervalIndex::new();
    let mut rng = Rng(0xfeed_beef ^ n as u64);
    let t0 = Instant::now();
    for i in 0..n {
        let off = (rng.next() % SPACE) & !(PAGE - 1);
        ix.insert(
            ByteRange::new(off, off + PAGE * (1 + rng.next() % 16)),
            i as u64,
        );
    }
    let insert = per_op(t0.elapsed(), n);
    let queries = 200_000;
    let mut hits = 0;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..queries {
            let off = rng.next() % SPACE;
            hits += ix.overlapping(ByteRange::new(off, off + PAGE)).len();
        }
        best = best.min(per_op(t0.elapsed(), queries));
    }
    black_box(hits);
    let mut work = 0;
    for _ in 0..queries {
        let off = rng.next() % SPACE;
        work += ix.query_work(ByteRange::new(off, off + PAGE));
    }
    (insert, best, work as f64 / queries as f64)
}

/// Latency of one dependent random load with a working set of `bytes` (pointer chase over a random cycle):
/// the hardware ratio that separates a table that fits in cache (1k leases) from one that does not (1M).
fn load_latency_ns(bytes: usize) -> f64 {
    let n = bytes / 8;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng(0xabcdef);
    for i in (1..n).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let mut next = vec![0usize; n];
    for w in 0..n {
        next[order[w]] = order[(w + 1) % n];
    }
    let loads = 2_000_000;
    let mut p = 0;
    let t0 = Instant::now();
    for _ in 0..loads {
        p = next[p];
    }
    black_box(p);
    per_op(t0.elapsed(), loads)
}

fn pin_vs_populate(dir: &str, mib: u64) {
    let size = mib << 20;
    let path = format!("{dir}/daxvisor-bench-pin.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0x5au8; 8 << 20];
    let mut off = 0;
    while off < size {
        file.write_all_at(&chunk, off).unwrap();
        off += chunk.len() as u64;
    }
    file.sync_all().unwrap();
    let file = Arc::new(file);
    let m = Mapper::new(Arc::new(daxvisor_mapper::ChannelNotifier::new().0), None);
    let owner = m.add_owner("bench");
    let rounds = 3;
    let (mut bare, mut pin) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        // Fresh mappings each time: both start with no page tables and a warm page cache.
        let map = HostMapping::map(&file, 0, size, MapOptions::default()).unwrap();
        let t0 = Instant::now();
        map.populate(0, size as usize).unwrap();
        bare = bare.min(t0.elapsed());
        drop(map);

        let map = Arc::new(HostMapping::map(&file, 0, size, MapOptions::default()).unwrap());
        let region = m
            .add_region(
                RegionDesc::new(file.clone(), 0, size, BackingKind::Regular)
                    .with_mapping(map.clone()),
            )
            .unwrap();
        let l = m
            .acquire(owner, region, 0, 0, LeaseMode::Exclusive)
            .unwrap();
        let t0 = Instant::now();
        let p = m.pin(owner, region, 0, 0).unwrap();
        pin = pin.min(t0.elapsed());
        m.unpin(owner, p).unwrap();
        m.release(owner, l).unwrap();
        m.remove_region(region).unwrap();
        drop(map);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    println!(
        "pin {mib} MiB on {dir}: pin (validate+populate+mlock) {:.1} ms, bare MADV_POPULATE_WRITE {:.1} ms, ratio {:.2}x (target <= 1.2x; best of {rounds})",
        pin.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        pin.as_secs_f64() / bare.as_secs_f64()
    );
}

fn main() {
    let dir = std::env::var("DAXVISOR_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let max: usize = std::env::var("DAXVISOR_BENCH_MAX_LEASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let file = Arc::new(File::create(tmp.path().join("empty.img")).unwrap());
    let sizes: Vec<usize> = [1_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|n| *n <= max)
        .collect();
    let mut figs = Vec::new();
    // Warm up (allocator, page faults, CPU frequency) so the 1k row is not the cold one.
    lease_table(1_000, &file);
    raw_index(1_000);
    println!(
        "lease table (one region, shared leases over 1 TiB, fan-out = {FANOUT} holders per break)"
    );
    println!(
        "{:>9} {:>12} {:>12} {:>14}",
        "leases", "acquire ns", "lookup ns", "fan-out us"
    );
    for &n in &sizes {
        let f = lease_table(n, &file);
        println!(
            "{n:>9} {:>12.0} {:>12.0} {:>14.1}",
            f.acquire_ns, f.lookup_ns, f.fanout_us
        );
        figs.push((n, f));
    }
    println!("interval index alone (work = memory locations a query touches)");
    let raw: Vec<(usize, (f64, f64, f64))> = sizes.iter().map(|&n| (n, raw_index(n))).collect();
    for (n, (ins, q, w)) in &raw {
        println!("{n:>9} insert {ins:>8.0} ns  query {q:>8.0} ns  query work {w:>6.1}");
    }
    let (n0, base) = &figs[0];
    for (n, f) in &figs[1..] {
        let log_ratio = (*n as f64).log2() / (*n0 as f64).log2();
        println!(
            "growth {n0} -> {n} leases ({}x more): acquire {:.2}x, lookup {:.2}x, fan-out {:.2}x; log2 ratio {:.2}x",
            n / n0,
            f.acquire_ns / base.acquire_ns,
            f.lookup_ns / base.lookup_ns,
            f.fanout_us / base.fanout_us,
            log_ratio
        );
    }
    let (_, (_, _, w0)) = raw[0];
    for (n, (_, _, w)) in &raw[1..] {
        println!(
            "index query work {n0} -> {n}: {:.2}x; log2 ratio {:.2}x (time ratios above also include cache misses)",
            w / w0,
            (*n as f64).log2() / (*n0 as f64).log2()
        );
    }
    let (small, big) = (load_latency_ns(16 << 10), load_latency_ns(64 << 20));
    println!(
        "memory: a dependent random load costs {small:.1} ns in a 16 KiB working set and {big:.1} ns in 64 MiB \
         ({:.0}x): a 1M-lease table lives in DRAM, a 1k one in L1/L2",
        big / small
    );
    if std::env::var("DAXVISOR_BENCH_SKIP_PIN").is_err() {
        let mib = std::env::var("DAXVISOR_BENCH_PIN_MIB")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1024);
        pin_vs_populate(&dir, mib);
    }
}
