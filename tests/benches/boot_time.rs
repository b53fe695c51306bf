//! Benchmark: wall time from `daxvisor run` start to the test guest's first serial byte and to VM exit,
//! medians (and spread) over repeated runs of the real binary. Run: `cargo bench -p daxvisor-tests --bench boot_time`.

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let runs: usize = std::env::var("BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let bin = daxvisor_tests::daxvisor_bin();
    let mut first_byte = Vec::with_capacity(runs);
    let mut exit = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(bin)
            .args(["run", "--memory", "128"])
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
    let (fb, ex) = (stats(&mut first_byte), stats(&mut exit));
    println!("boot_time runs={runs}");
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
}

fn stats(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: usize| v[(v.len() - 1) * p / 100];
    (at(50), at(10), at(90))
}
