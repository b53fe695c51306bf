//! End-to-end: the host guard as an operator meets it. A VM runs with its backing file guarded under `guard=deny`,
//! `hold` or `log`; on the host, the usual tools go at the running VM's file: `fallocate --punch-hole`, a `dd`
//! that writes into it (`conv=notrunc`), coreutils `truncate -s`, and a `cat`. Afterwards the file holds what the
//! policy promises, and the VMM's log has exactly one line per tool, with its pid, its mode and the outcome.
//! Without CAP_SYS_ADMIN (no fanotify) daxvisor warns what is then not protected and still runs.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use daxvisor_tests::{missing_prerequisite, pattern_word, RunOutcome, RunningVm};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const SEED: u32 = 11;
/// Where the host's `dd` writes one page of zeros.
const DD_AT: u64 = 2 * MIB;

/// What a host tool did to the VM's file.
struct Done {
    what: &'static str,
    pid: u32,
    mode: &'static str,
    ok: bool,
    stderr: String,
}

/// Runs one host tool against the file; its pid is what the guard must name.
fn host(what: &'static str, mode: &'static str, argv: &[&str], img: &Path) -> Done {
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", argv[0]));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    Done {
        what,
        pid,
        mode,
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The four accesses, in order: a punch, a write through dd, a shrink, a read.
fn go_at_the_file(img: &Path) -> Vec<Done> {
    let dd_seek = format!("seek={}", DD_AT / 4096);
    vec![
        host(
            "punch",
            "write",
            &[
                "fallocate",
                "--punch-hole",
                "--offset",
                "0",
                "--length",
                "1MiB",
            ],
            img,
        ),
        // One open, by the shell (dd's own `of=` would try O_RDWR, then O_WRONLY: two opens); dd writes
        // through the descriptor at its offset.
        host(
            "dd",
            "write",
            &[
                "sh",
                "-c",
                &format!(
                    "exec 3<>\"$0\" && exec dd if=/dev/zero bs=4096 count=1 {dd_seek} conv=notrunc status=none >&3"
                ),
            ],
            img,
        ),
        host("truncate", "write", &["truncate", "-s", "3M"], img),
        host("cat", "read", &["sh", "-c", "exec cat \"$0\""], img),
    ]
}

fn start(img: &Path, policy: &str, cmdline: &str, ready: &str) -> RunningVm {
    let pmem = format!(
        "file={},size=4M,create=on,id=data,guard={policy}",
        img.display()
    );
    let mut vm = RunningVm::spawn(&["run", "--pmem", &pmem, "--cmdline", cmdline]);
    vm.wait_for_line(ready);
    vm
}

/// A VM whose guest wrote its pattern over the whole region, flushed, and spins.
fn spinning(img: &Path, policy: &str) -> RunningVm {
    start(
        img,
        policy,
        &format!("pmem=write-flush-spin seed={SEED}"),
        "spinning until killed",
    )
}

/// The three writes were refused with EPERM, the read let through.
fn writes_refused_read_allowed(done: &[Done]) {
    for d in &done[..3] {
        assert!(
            !d.ok && d.stderr.contains("Operation not permitted"),
            "{}: {}",
            d.what,
            d.stderr
        );
    }
    assert!(done[3].ok, "cat: {}", done[3].stderr);
}

/// Every access got through.
fn all_allowed(done: &[Done]) {
    for d in done {
        assert!(d.ok, "{}: {}", d.what, d.stderr);
    }
}

/// What a write's line says, a read's being `allowed` under every policy.
fn write_outcome(write: &'static str) -> impl Fn(&Done) -> &'static str {
    move |d| if d.mode == "read" { "allowed" } else { write }
}

fn stop(vm: RunningVm) -> RunOutcome {
    vm.signal(libc::SIGTERM);
    let r = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code, Some(143), "{r:?}");
    r
}

/// The guard's event lines in the VMM's log.
fn guard_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("host guard: ") && l.contains(" outcome="))
        .collect()
}

/// Each tool's access is one line naming the region, its pid, its mode and `outcome`, and nothing else is.
fn logged_once_each(r: &RunOutcome, done: &[Done], outcome: impl Fn(&Done) -> &'static str) {
    // This test's own reads of the file (checksums) are foreign reads too: allowed and logged.
    let me = format!("pid={} ", std::process::id());
    let (own, lines): (Vec<&str>, Vec<&str>) = guard_lines(&r.stderr)
        .into_iter()
        .partition(|l| l.contains(&me));
    for l in own {
        assert!(l.contains("mode=read outcome=allowed "), "{l}");
    }
    assert_eq!(
        lines.len(),
        done.len(),
        "one line per access, no second line for the kernel lease:\n{}",
        lines.join("\n")
    );
    for d in done {
        let pid = format!("pid={} ", d.pid);
        let mine: Vec<&&str> = lines.iter().filter(|l| l.contains(&pid)).collect();
        assert_eq!(mine.len(), 1, "{}: {pid}in:\n{}", d.what, lines.join("\n"));
        for want in [
            "id=data".to_owned(),
            format!("mode={}", d.mode),
            format!("outcome={} ", outcome(d)),
        ] {
            assert!(
                mine[0].contains(&want),
                "{}: no {want:?} in {}",
                d.what,
                mine[0]
            );
        }
    }
}

fn is_pattern(bytes: &[u8], from: u64, to: u64) -> bool {
    (from..to).step_by(8).all(|o| {
        let w = u64::from_le_bytes(bytes[o as usize..o as usize + 8].try_into().unwrap());
        w == pattern_word(SEED, o)
    })
}

fn is_zero(bytes: &[u8], from: u64, to: u64) -> bool {
    bytes[from as usize..to as usize].iter().all(|&b| b == 0)
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

fn fanotify_or_skip() -> bool {
    // The tests run as root here; without CAP_SYS_ADMIN the guard is the fallback, tested below.
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u32 = 21;
    if eff & (1 << CAP_SYS_ADMIN) == 0 {
        missing_prerequisite("CAP_SYS_ADMIN for fanotify permission events");
        return false;
    }
    true
}

#[test]
fn deny_refuses_every_write_and_lets_cat_read() {
    if !fanotify_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let vm = spinning(&img, "deny");
    let done = go_at_the_file(&img);
    writes_refused_read_allowed(&done);
    let r = stop(vm);
    logged_once_each(&r, &done, write_outcome("denied"));
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, SIZE, "the file's size changed");
    assert!(is_pattern(&bytes, 0, SIZE), "the guest's data changed");
}

#[test]
fn hold_breaks_first_then_lets_the_change_happen() {
    if !fanotify_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let vm = spinning(&img, "hold");
    let done = go_at_the_file(&img);
    all_allowed(&done);
    let r = stop(vm);
    logged_once_each(&r, &done, write_outcome("held+allowed"));
    assert!(r.stderr.contains("whole-file break done"), "{}", r.stderr);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, 3 * MIB, "truncate -s 3M did not happen");
    assert!(is_zero(&bytes, 0, MIB), "the punch did not happen");
    assert!(is_pattern(&bytes, MIB, DD_AT));
    assert!(
        is_zero(&bytes, DD_AT, DD_AT + 4096),
        "dd's write did not happen"
    );
    assert!(is_pattern(&bytes, DD_AT + 4096, 3 * MIB));
}

#[test]
fn hold_refuses_while_the_guest_holds_a_pin_and_names_the_holder() {
    if !fanotify_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let vm = start(&img, "hold", "agent=exclusive-pin hold=60", "agent holding");
    let before = std::fs::read(&img).unwrap();
    let done = go_at_the_file(&img);
    writes_refused_read_allowed(&done);
    let r = stop(vm);
    logged_once_each(&r, &done, write_outcome("held+denied"));
    for line in guard_lines(&r.stderr)
        .iter()
        .filter(|l| l.contains("held+denied"))
    {
        assert!(
            line.contains("ETXTBSY") && line.contains("(agent:testguest-dma) with a pin"),
            "the holder is not named: {line}"
        );
    }
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(
        checksum(&after),
        checksum(&before),
        "the pinned file changed"
    );
}

#[test]
fn log_lets_every_access_through_and_logs_each_once() {
    if !fanotify_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let vm = spinning(&img, "log");
    let done = go_at_the_file(&img);
    all_allowed(&done);
    let r = stop(vm);
    logged_once_each(&r, &done, write_outcome("allowed"));
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, 3 * MIB);
    assert!(is_zero(&bytes, 0, MIB) && is_zero(&bytes, DD_AT, DD_AT + 4096));
    assert!(is_pattern(&bytes, MIB, DD_AT));
}

#[test]
fn without_cap_sys_admin_daxvisor_warns_what_is_not_protected_and_still_runs() {
    let probe = Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        missing_prerequisite("setpriv cannot drop CAP_SYS_ADMIN here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let pmem = format!("file={},size=4M,create=on,id=data", img.display());
    let mut vm = RunningVm::spawn_with(
        Command::new("setpriv")
            .args(["--bounding-set", "-sys_admin"])
            .arg(daxvisor_tests::daxvisor_bin())
            .args([
                "run",
                "--pmem",
                &pmem,
                "--cmdline",
                &format!("pmem=write-flush-spin seed={SEED}"),
            ]),
    );
    vm.wait_for_line("spinning until killed");
    // What is not protected then: a write-open under the default deny is only delayed, and not named.
    let d = host("write-open", "write", &["sh", "-c", "exec 3>>\"$0\""], &img);
    assert!(d.ok, "{}", d.stderr);
    let r = stop(vm);
    assert!(
        r.stderr
            .contains("fanotify permission events are not available")
            && r.stderr.contains("never refused"),
        "{}",
        r.stderr
    );
    let lines = guard_lines(&r.stderr);
    assert_eq!(lines.len(), 1, "{}", lines.join("\n"));
    assert!(
        lines[0].contains("kernel lease") && lines[0].contains("outcome=delayed"),
        "{}",
        lines[0]
    );
}
