//! Benchmark: wall time from `daxvisor run` start to the test guest's first serial byte and to VM exit,
//! medians (and spread) over repeated runs of the real binary; then the memory daxvisor itself uses while a VM
//! with one pmem device runs: its resident set less the guest's RAM and pmem mappings (per-mapping accounting
//! from /proc/PID/smaps). Both for `--transport mmio` and `--transport pci`, then the pci/mmio ratios. Run:
//! `cargo bench -p daxvisor-tests --bench boot_time`.

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest RAM of the VM whose memory is measured, MiB.
const RSS_GUEST_MIB: u64 = 128;
/// Its pmem region, MiB.
const RSS_PMEM_MIB: u64 = 64;

const TRANSPORTS: [&str; 2] = ["mmio", "pci"];

fn main() {
    let runs: usize = std::env::var("BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let bin = daxvisor_tests::daxvisor_bin();
    let mut results = Vec::new();
    for transport in TRANSPORTS {
        let (fb, ex) = boot_times(bin, transport, runs);
        println!("boot_time transport={transport} runs={runs}");
        println!(
            "  start -> first serial byte: median {:>8.2?}  p10 {:>8.2?}  p90 {:>8.2?}",
            fb.0, fb.1, fb.2
        );
        println!(
            "  start -> VM exit:           median {:>8.2?}  p10 {:>8.2?}  p90 {:>8.2?}",
            ex.0, ex.1, ex.2
        );
        println!(
            "  first byte / exit (median ratio): {:.2}",
            fb.0.as_secs_f64() / ex.0.as_secs_f64()
        );
        let own = vmm_rss(bin, transport);
        results.push((fb.0, ex.0, own));
    }
    let (m, p) = (results[0], results[1]);
    println!(
        "pci / mmio (one run each): first byte {:.2}, exit {:.2}, daxvisor's own RSS {:.2} ({} KiB vs {} KiB)",
        p.0.as_secs_f64() / m.0.as_secs_f64(),
        p.1.as_secs_f64() / m.1.as_secs_f64(),
        p.2 as f64 / m.2.max(1) as f64,
        p.2,
        m.2
    );
}

/// Start to first serial byte and start to exit of `runs` test-guest boots over `transport`: (median, p10, p90).
fn boot_times(
    bin: &Path,
    transport: &str,
    runs: usize,
) -> (
    (Duration, Duration, Duration),
    (Duration, Duration, Duration),
) {
    let mut first_byte = Vec::with_capacity(runs);
    let mut exit = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(bin)
            .args(["run", "--memory", "128", "--transport", transport])
            .env("DAXVISOR_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn daxvisor");
        let mut out = child.stdout.take().expect("stdout");
        let mut byte = [0u8; 1];
        let got = out.read(&mut byte).unwrap_or(0);
        let t_first = start.elapsed();
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        let status = child.wait().expect("wait");
        let t_exit = start.elapsed();
        assert!(
            got == 1 && status.success(),
            "test guest run failed: {status:?}"
        );
        first_byte.push(t_first);
        exit.push(t_exit);
    }
    (stats(&mut first_byte), stats(&mut exit))
}

/// One smaps entry: where, what, how much of it is resident.
struct Mapping {
    size_kib: u64,
    rss_kib: u64,
    name: String,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push(Mapping {
                    size_kib: (b - a) / 1024,
                    rss_kib: 0,
                    name: words.nth(4).unwrap_or("").to_owned(),
                });
                continue;
            }
        }
        if let (Some(m), Some(v)) = (out.last_mut(), line.strip_prefix("Rss:")) {
            m.rss_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    out
}

/// Start a VM with one pmem device whose guest writes 4 KiB, flushes and spins; measure daxvisor's own memory
/// (returned, KiB).
fn vmm_rss(bin: &Path, transport: &str) -> u64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("rss.img");
    let mut child = Command::new(bin)
        .args(["run", "--transport", transport])
        .args(["--memory", &RSS_GUEST_MIB.to_string(), "--pmem"])
        .arg(format!(
            "file={},size={RSS_PMEM_MIB}M,create=on",
            img.display()
        ))
        .args(["--cmdline", "pmem=write-flush-spin size=4K"])
        .env("DAXVISOR_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn daxvisor");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let spinning = out
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("spinning until killed"));
    let maps = smaps(child.id());
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(spinning, "the guest never reached its spin loop");

    let pmem = img.to_string_lossy();
    let is_guest_ram = |m: &Mapping| m.name.is_empty() && m.size_kib == RSS_GUEST_MIB * 1024;
    let sum =
        |f: &dyn Fn(&Mapping) -> bool| maps.iter().filter(|m| f(m)).map(|m| m.rss_kib).sum::<u64>();
    let total = sum(&|_| true);
    let guest = sum(&is_guest_ram);
    let region = sum(&|m| m.name == pmem);
    let own = total - guest - region;
    println!(
        "vmm_rss transport={transport} (one VM: {RSS_GUEST_MIB} MiB RAM, one {RSS_PMEM_MIB} MiB pmem device, guest spinning)"
    );
    println!(
        "  resident: total {total} KiB = guest RAM {guest} KiB + pmem {region} KiB + daxvisor itself {own} KiB \
         ({:.1} MiB; goal < 10 MiB)",
        own as f64 / 1024.0
    );
    // What daxvisor's own share is made of, largest first.
    let mut by_name: Vec<(String, u64)> = Vec::new();
    for m in maps.iter().filter(|m| !is_guest_ram(m) && m.name != pmem) {
        let name = if m.name.is_empty() { "[anon]" } else { &m.name };
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, kib)) => *kib += m.rss_kib,
            None => by_name.push((name.to_owned(), m.rss_kib)),
        }
    }
    by_name.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    for (name, kib) in by_name.iter().take(6) {
        println!("    {kib:>6} KiB  {name}");
    }
    own
}

fn stats(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: usize| v[(v.len() - 1) * p / 100];
    (at(50), at(10), at(90))
}
