//! Benchmark of the agent channel, with the real binary, this machine's KVM and the ring-3 test guest:
//!
//! - break round trip: a host process opens the backing file for writing -> the host guard's whole-file break ->
//!   notice on the agent port -> the guest releases -> the change is done -> the kernel lets the open proceed
//!   (the time the open took); median and p99 over `AGENT_BENCH_BREAKS` breaks (default 1000; before each the
//!   benchmark waits for the guest to hold its lease again and for the guard to have re-armed);
//! - lease acquire+release round trips per second over the channel (`AGENT_BENCH_ROUNDS`, default 2000);
//! - the host-only floor: a punch through the mapper in this process with an in-process holder that releases on
//!   the notice, median and p99 over 1000 breaks.
//!
//! Run: `cargo bench -p daxvisor-tests --bench agent`. Ratios are printed, nothing is asserted.

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daxvisor_mapper::{BreakEvent, ChannelNotifier, LeaseMode, Mapper, RegionDesc};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lines of a child's output with the time each arrived.
type Lines = Receiver<(Instant, String)>;

fn lines_of(r: impl std::io::Read + Send + 'static) -> Lines {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &Lines, what: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok((t, l)) = rx.recv_timeout(Duration::from_millis(100)) {
            assert!(!l.contains("FAIL"), "{l}");
            if l.contains(what) {
                return t;
            }
        }
    }
    panic!("no line containing {what:?}");
}

fn vm(img: &Path, cmdline: &str) -> (Child, Lines, Lines) {
    // hold: the host's open for writing is held for the whole-file break (deny, the default, would refuse it).
    let pmem = format!("file={},size=2M,create=on,guard=hold", img.display());
    let mut child = Command::new(daxvisor_tests::daxvisor_bin())
        .args(["run", "--pmem", &pmem, "--cmdline", cmdline])
        .env("DAXVISOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    (child, out, err)
}

fn percentiles(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.99))
}

fn guest_break_round_trips(dir: &Path, breaks: usize) -> Vec<Duration> {
    let img = dir.join("breaks.img");
    let (mut child, out, err) = vm(&img, &format!("agent=shared breaks={breaks}"));
    let mut times = Vec::with_capacity(breaks);
    for i in 0..breaks {
        if i == 0 {
            wait_line(&out, "agent waiting for a break");
        } else {
            wait_line(&out, &format!("agent ready {i}"));
            wait_line(&err, "host guard re-armed");
        }
        let t0 = Instant::now();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        times.push(t0.elapsed());
        drop(f);
    }
    wait_line(&out, "agent answered");
    assert!(child.wait().unwrap().success());
    times
}

fn acquire_release_rate(dir: &Path, rounds: usize) -> f64 {
    let img = dir.join("rounds.img");
    let (mut child, out, _err) = vm(&img, &format!("agent=bench rounds={rounds}"));
    let t0 = wait_line(&out, "agent owner ");
    let t1 = wait_line(&out, "agent bench acquire_release");
    assert!(child.wait().unwrap().success());
    rounds as f64 / (t1 - t0).as_secs_f64()
}

fn host_floor(dir: &Path, breaks: usize) -> Vec<Duration> {
    let path = dir.join("floor.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(2 << 20).unwrap();
    let (notifier, notices) = ChannelNotifier::new();
    let mapper = Mapper::new(Arc::new(notifier), None);
    let region = mapper
        .add_region(RegionDesc::new(
            Arc::new(file),
            0,
            2 << 20,
            daxvisor_mapper::BackingKind::Regular,
        ))
        .unwrap();
    let holder = mapper.add_owner("in-process holder");
    let (ready_tx, ready) = channel();
    let m = mapper.clone();
    std::thread::spawn(move || loop {
        // EAGAIN until the change that broke the last lease has applied.
        let lease = loop {
            match m.acquire(holder, region, 0, 0, LeaseMode::Shared) {
                Ok(l) => break l,
                Err(e) if e.errno() == libc::EAGAIN => std::thread::yield_now(),
                Err(e) => panic!("in-process holder: acquire: {e}"),
            }
        };
        if ready_tx.send(()).is_err() {
            return;
        }
        match notices.recv() {
            Ok(BreakEvent::Notice(_)) => m.release(holder, lease).unwrap(),
            other => panic!("in-process holder: {other:?}"),
        }
    });
    let mut times = Vec::with_capacity(breaks);
    for _ in 0..breaks {
        ready.recv().unwrap();
        let t0 = Instant::now();
        mapper.punch(None, region, 0, 4096).unwrap();
        times.push(t0.elapsed());
    }
    times
}

fn main() {
    let breaks = env_num("AGENT_BENCH_BREAKS", 1000);
    let rounds = env_num("AGENT_BENCH_ROUNDS", 2000);
    let dir = tempfile::tempdir().unwrap();

    let mut floor = host_floor(dir.path(), 1000);
    let (f50, f99) = percentiles(&mut floor);
    let mut guest = guest_break_round_trips(dir.path(), breaks);
    let (g50, g99) = percentiles(&mut guest);
    let rate = acquire_release_rate(dir.path(), rounds);

    println!("agent channel (ring-3 test guest, nested KVM)");
    println!("  break round trip, foreign open -> notice -> release -> open proceeds: breaks={breaks} median {g50:>9.2?}  p99 {g99:>9.2?}");
    println!("  host-only floor, mapper punch with an in-process holder:            breaks=1000 median {f50:>9.2?}  p99 {f99:>9.2?}");
    println!(
        "  guest round trip / host floor (median): {:.1}x",
        g50.as_secs_f64() / f50.as_secs_f64()
    );
    println!("  lease acquire+release round trips over the channel: rounds={rounds} {rate:.0}/s ({:.1?} each)", Duration::from_secs_f64(1.0 / rate));
}
