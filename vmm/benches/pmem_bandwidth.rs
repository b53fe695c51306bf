//! Guest write bandwidth into a pmem region against a host memcpy into the same kind of mapping of the same
//! file (the physical limit), from one run.
//!
//! The guest side is the test guest's `pmem=bench` mode under the real `daxvisor` binary on KVM: `rep stosq` over
//! the region twice (cold: first touch, the host populates each page; warm: steady state), timed with the TSC.
//! The host side maps the same file through the same code (`pmem::Backing`, MAP_SHARED) and memcpys into it
//! cold and warm, timed with the same TSC. The file is in the page cache for both.
//!
//! cargo bench -p daxvisor --bench pmem_bandwidth [-- MIB [RUNS]]
//! env DAXVISOR_TESTGUEST=ELF boots that test guest instead of the one embedded in daxvisor.

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daxvisor::pmem::{Backing, PmemConfig};

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

struct GuestRun {
    bytes: u64,
    cold: u64,
    warm: u64,
    flush: u64,
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn guest_run(file: &Path, mib: u64) -> GuestRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_daxvisor"));
    cmd.arg("run");
    if let Ok(k) = std::env::var("DAXVISOR_TESTGUEST") {
        cmd.args(["--kernel", &k]);
    }
    let out = cmd
        .arg("--pmem")
        .arg(format!("file={}", file.display()))
        .args(["--cmdline", &format!("pmem=bench mib={mib}")])
        .args(["--serial", "stdout"])
        .env("DAXVISOR_LOG", "warn")
        .output()
        .expect("run daxvisor");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("pmem0 bench "))
        .unwrap_or_else(|| {
            panic!(
                "no bench line from the guest (exit {:?}):\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let get = |k| field(line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
    GuestRun {
        bytes: get("bytes"),
        cold: get("cold_cycles"),
        warm: get("warm_cycles"),
        flush: get("flush_cycles"),
    }
}

/// Host memcpy into a fresh mapping of the file: (cold cycles, warm cycles).
fn host_run(file: &Path, bytes: u64) -> (u64, u64) {
    let cfg: PmemConfig = format!("file={}", file.display()).parse().expect("config");
    let b = Backing::open(&cfg, "bench").expect("map");
    let src = vec![0x5au8; 1 << 20];
    let copy = || {
        let t0 = rdtsc();
        let mut off = 0;
        while off < bytes {
            let n = (bytes - off).min(src.len() as u64) as usize;
            // SAFETY: [off, off + n) lies inside the live writable mapping of `b` (bytes <= b.size()).
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (b.host_addr() + off) as *mut u8, n)
            };
            off += n as u64;
        }
        rdtsc() - t0
    };
    assert!(bytes <= b.size());
    (copy(), copy())
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = args.first().copied().unwrap_or(64);
    let runs = args.get(1).copied().unwrap_or(5).max(1);
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let file = dir.path().join("bw.img");
    std::fs::write(&file, vec![0u8; (mib << 20) as usize]).expect("create file");
    let hz = tsc_hz();
    println!(
        "pmem write bandwidth: {mib} MiB region on {} (page cache), {runs} runs, TSC {:.0} MHz",
        dir.path().display(),
        hz / 1e6
    );
    let mibps = |bytes: u64, cycles: u64| bytes as f64 / (1 << 20) as f64 / (cycles as f64 / hz);
    let (mut gc, mut gw, mut hc, mut hw, mut fl) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let g = guest_run(&file, mib);
        let (c, w) = host_run(&file, g.bytes);
        gc.push(mibps(g.bytes, g.cold));
        gw.push(mibps(g.bytes, g.warm));
        hc.push(mibps(g.bytes, c));
        hw.push(mibps(g.bytes, w));
        fl.push(g.flush as f64 / hz * 1e6);
    }
    let (gc, gw, hc, hw) = (median(gc), median(gw), median(hc), median(hw));
    println!("{:>22} {:>12} {:>12}", "", "cold MiB/s", "warm MiB/s");
    println!("{:>22} {gc:>12.0} {gw:>12.0}", "guest rep stosq");
    println!("{:>22} {hc:>12.0} {hw:>12.0}", "host memcpy");
    println!(
        "{:>22} {:>11.2}x {:>11.2}x",
        "guest / host",
        gc / hc,
        gw / hw
    );
    println!(
        "guest flush after {mib} MiB written (fdatasync, seen from the guest): median {:.0} us",
        median(fl)
    );
}
