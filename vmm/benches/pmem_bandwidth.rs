//! Guest bandwidth over a pmem region against the host's over the same file, like for like, from one run.
//!
//! Both sides run the same kernels (the test guest's `kernels.rs`, included below): `rep stosq` over the region
//! twice (cold: the first touch of every page; warm: steady state), then a read pass. The guest side is the test
//! guest's `pmem=bench` mode under the real `daxvisor` binary on KVM; the host side maps the same file through
//! the same code (`pmem::Backing`, MAP_SHARED). Both with and without `prefault=on` (the host side then calls
//! the same `pmem::prefault::prefault` first). The file is made as `create=on` makes one (sized and
//! allocated); the first run's faults fill the page cache and every later run finds it there; every figure is
//! timed with the TSC, and the ratios compare the same pass.
//!
//! Two backings in one run: a regular file (PMEM_BENCH_DIR, default /var/tmp) and a backing that can use 2 MiB
//! pages (PMEM_BENCH_HUGE_DIR, default /dev/shm; a tmpfs mounted with huge=always, or one where the host's
//! shmem_enabled allows MADV_HUGEPAGE). Each prints how much of the host mapping the kernel mapped with 2 MiB
//! entries, which decides how many KVM faults the guest's first pass takes.
//!
//! cargo bench -p daxvisor --bench pmem_bandwidth [-- MIB [RUNS]]
//! env DAXVISOR_TESTGUEST=ELF boots that test guest instead of the one embedded in daxvisor.

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daxvisor::pmem::prefault::prefault;
use daxvisor::pmem::{Backing, PmemConfig};

#[allow(dead_code)] // the guest's module; the host uses what it needs
#[path = "../../images/testguest/src/modes/kernels.rs"]
mod kernels;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per second, measured against the monotonic clock.
fn tsc_hz() -> f64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(300));
    let (c1, t1) = (rdtsc(), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Cycles of one side's passes over `bytes`.
#[derive(Default)]
struct Passes {
    bytes: u64,
    cold: u64,
    warm: u64,
    read: u64,
    /// Host side: bytes of the mapping the kernel mapped with 2 MiB entries after the passes.
    huge: u64,
}

struct GuestRun {
    passes: Passes,
    flush: u64,
    /// Milliseconds daxvisor logged for the prefault (prefault=on only).
    prefault_ms: Option<f64>,
}

fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn guest_run(file: &Path, mib: u64, prefault: bool) -> GuestRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_daxvisor"));
    cmd.arg("run");
    if let Ok(k) = std::env::var("DAXVISOR_TESTGUEST") {
        cmd.args(["--kernel", &k]);
    }
    let out = cmd
        .arg("--pmem")
        .arg(format!(
            "file={},prefault={}",
            file.display(),
            on_off(prefault)
        ))
        .args(["--cmdline", &format!("pmem=bench mib={mib}")])
        .args(["--serial", "stdout"])
        .env("DAXVISOR_LOG", "warn,daxvisor::pmem::prefault=info")
        .output()
        .expect("run daxvisor");
    let text = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("pmem0 bench "))
        .unwrap_or_else(|| {
            panic!(
                "no bench line from the guest (exit {:?}):\n{text}\n{log}",
                out.status
            )
        });
    let get = |k| field(line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
    GuestRun {
        passes: Passes {
            bytes: get("bytes"),
            cold: get("cold_cycles"),
            warm: get("warm_cycles"),
            read: get("read_cycles"),
            huge: 0,
        },
        flush: get("flush_cycles"),
        prefault_ms: log
            .lines()
            .find(|l| l.contains("pmem region prefaulted"))
            .and_then(|l| field(l, "ms")),
    }
}

/// The same passes on the host, over a fresh mapping of the same file.
fn host_run(file: &Path, bytes: u64, with_prefault: bool) -> Passes {
    let cfg: PmemConfig = format!("file={}", file.display()).parse().expect("config");
    let b = Backing::open(&cfg, "bench").expect("map");
    assert!(bytes <= b.size());
    if with_prefault {
        prefault(&b).expect("prefault");
    }
    let addr = b.host_addr();
    let t0 = rdtsc();
    // SAFETY: [addr, addr + bytes) lies inside the live writable mapping of `b`, which nothing else references.
    unsafe { kernels::fill(addr, bytes, 0x5a5a_5a5a_5a5a_5a5a) };
    let t1 = rdtsc();
    // SAFETY: as above.
    unsafe { kernels::fill(addr, bytes, 0xa5a5_a5a5_a5a5_a5a5) };
    let t2 = rdtsc();
    // SAFETY: as above (read only).
    let total = unsafe { kernels::sum(addr, bytes) };
    let t3 = rdtsc();
    assert_eq!(
        total,
        0xa5a5_a5a5_a5a5_a5a5u64.wrapping_mul((bytes & !31) / 8)
    );
    Passes {
        bytes,
        cold: t1 - t0,
        warm: t2 - t1,
        read: t3 - t2,
        huge: pmd_mapped(addr),
    }
}

/// Bytes of the mapping at `addr` the kernel maps with 2 MiB page-table entries (file or shmem THP), from
/// /proc/self/smaps: what KVM can map with one entry per 2 MiB.
fn pmd_mapped(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let range = line.split(' ').next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range.and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) {
            inside = (a..b).contains(&addr);
        } else if inside
            && (line.starts_with("FilePmdMapped:") || line.starts_with("ShmemPmdMapped:"))
        {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib << 10
}

/// Median MiB/s of each pass over several runs.
#[derive(Clone, Copy)]
struct Bandwidth {
    cold: f64,
    warm: f64,
    read: f64,
}

fn medians(runs: &[Passes], hz: f64) -> Bandwidth {
    let mibps = |bytes: u64, cycles: u64| bytes as f64 / f64::from(1 << 20) / (cycles as f64 / hz);
    let of = |f: fn(&Passes) -> u64| median(runs.iter().map(|p| mibps(p.bytes, f(p))).collect());
    Bandwidth {
        cold: of(|p| p.cold),
        warm: of(|p| p.warm),
        read: of(|p| p.read),
    }
}

/// One backing's rows: guest and host, without and with prefault.
struct Backed {
    label: String,
    rows: Vec<(bool, Bandwidth, Bandwidth)>,
    /// Median share of the host mapping mapped with 2 MiB entries.
    huge_share: f64,
    flush_us: Vec<f64>,
    prefault_ms: Vec<f64>,
}

/// The file system type of `dir`, in words.
fn fs_name(dir: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if out.is_empty() {
        "?".into()
    } else {
        out
    }
}

fn bench_backing(base: &str, what: &str, mib: u64, runs: u64, hz: f64) -> Backed {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let file = dir.path().join("bw.img");
    // Sized and allocated, not written: the page cache (or shmem) is filled by the first run's faults, with
    // the page size the mapping asks for, as for a region made with create=on.
    let f = std::fs::File::create(&file).expect("create file");
    f.set_len(mib << 20).expect("size file");
    // SAFETY: fallocate on a file we own; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            (mib << 20) as i64,
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    drop(f);
    let label = format!("{what}: {} ({})", dir.path().display(), fs_name(dir.path()));
    let mut rows = Vec::new();
    let (mut flush_us, mut prefault_ms, mut huge) = (Vec::new(), Vec::new(), Vec::new());
    for with_prefault in [false, true] {
        let (mut guest, mut host) = (Vec::new(), Vec::new());
        // Guest and host alternate so drift on a shared machine hits both.
        for _ in 0..runs {
            let g = guest_run(&file, mib, with_prefault);
            let h = host_run(&file, g.passes.bytes, with_prefault);
            huge.push(h.huge as f64 / h.bytes as f64);
            host.push(h);
            flush_us.push(g.flush as f64 / hz * 1e6);
            prefault_ms.extend(g.prefault_ms);
            guest.push(g.passes);
        }
        rows.push((with_prefault, medians(&guest, hz), medians(&host, hz)));
    }
    Backed {
        label,
        rows,
        huge_share: median(huge),
        flush_us,
        prefault_ms,
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = args.first().copied().unwrap_or(64);
    let runs = args.get(1).copied().unwrap_or(5).max(1);
    let regular = std::env::var("PMEM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let huge = std::env::var("PMEM_BENCH_HUGE_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let hz = tsc_hz();
    println!(
        "pmem bandwidth: {mib} MiB region, {runs} runs per row, TSC {:.0} MHz, KVM_CAP_PRE_FAULT_MEMORY: {}",
        hz / 1e6,
        if daxvisor::vstate::kvm_page_tables::offered() { "offered" } else { "not offered (shadow paging)" }
    );
    println!("same kernels on both sides: rep stosq (cold = first pass, warm = second pass), then a read pass");
    let backings = [
        bench_backing(&regular, "regular file", mib, runs, hz),
        bench_backing(&huge, "huge-page-capable backing", mib, runs, hz),
    ];
    for b in &backings {
        println!("\n{}", b.label);
        println!(
            "  host mapping with 2 MiB entries after the passes: {:.0}% of the region",
            b.huge_share * 100.0
        );
        println!(
            "{:>24} {:>12} {:>12} {:>12}",
            "MiB/s (medians)", "write cold", "write warm", "read"
        );
        for (p, g, h) in &b.rows {
            for (side, bw) in [("guest", g), ("host", h)] {
                println!(
                    "{:>24} {:>12.0} {:>12.0} {:>12.0}",
                    format!("{side}, prefault={}", on_off(*p)),
                    bw.cold,
                    bw.warm,
                    bw.read
                );
            }
        }
        println!("guest / host, same pass:");
        for (p, g, h) in &b.rows {
            println!(
                "{:>24} {:>11.2}x {:>11.2}x {:>11.2}x",
                format!("prefault={}", on_off(*p)),
                g.cold / h.cold,
                g.warm / h.warm,
                g.read / h.read
            );
        }
        let (_, g_off, _) = b.rows[0];
        let (_, g_on, h_on) = b.rows[1];
        println!(
            "guest first pass with prefault / host warm pass: {:.2}x (target >= 0.8); without prefault: {:.2}x",
            g_on.cold / h_on.warm,
            g_off.cold / h_on.warm
        );
        println!(
            "prefault of {mib} MiB in daxvisor: median {:.1} ms; guest flush after the passes (seen from the \
             guest): median {:.0} us",
            if b.prefault_ms.is_empty() {
                f64::NAN
            } else {
                median(b.prefault_ms.clone())
            },
            median(b.flush_us.clone())
        );
    }
    println!(
        "\nWhy the backings differ: the guest's first touch of a guest page is a KVM fault whether or not the \
         host side is populated (prefault=on fills the host page tables; KVM's own tables fill on the guest's \
         touch unless KVM_PRE_FAULT_MEMORY is offered, which needs two-dimensional paging). With the host \
         mapping in 2 MiB entries and the guest using 2 MiB pages, KVM maps 2 MiB per fault; in 4 KiB entries, \
         one fault per 4 KiB."
    );
}
