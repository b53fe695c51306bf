//! End-to-end: nothing a host process does to a running VM's backing file loses the guest's data silently. A VM
//! runs the test guest in `write-loop` (it writes its pattern over the whole region and flushes, again and
//! again) on a file under `guard=deny`; on the host the usual tools go at that file: `chattr +i` and `chattr +a`,
//! a `truncate(2)` by path while a reader holds the file open, `rm`, and `mv` of another file over it. The test
//! checks the VM's state, the file's bytes and size, and the VMM's log line for each.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daxvisor_tests::api::ApiVm;
use daxvisor_tests::{missing_prerequisite, pattern_mismatches};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const SEED: u32 = 23;

fn fanotify_here() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_LINUX_IMMUTABLE: u32 = 9;
    if eff & (1 << CAP_SYS_ADMIN) == 0 || eff & (1 << CAP_LINUX_IMMUTABLE) == 0 {
        missing_prerequisite("CAP_SYS_ADMIN (fanotify) and CAP_LINUX_IMMUTABLE (chattr)");
        return false;
    }
    true
}

/// A VM whose guest writes and flushes its pattern over `img` in a loop, with the operator API.
fn writing(dir: &Path, img: &Path) -> ApiVm {
    let pmem = format!(
        "file={},size=4M,create=on,id=data,guard=deny",
        img.display()
    );
    ApiVm::start(
        dir,
        &[
            "--pmem",
            &pmem,
            "--cmdline",
            &format!("pmem=write-loop seed={SEED}"),
        ],
        "pass 1 flushed",
    )
}

/// The guest's flushes so far (the device's request counter).
fn flushes(vm: &ApiVm) -> u64 {
    let (code, body) = vm.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find(|l| l.starts_with("daxvisor_pmem_flush_requests") && l.contains("\"data\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no flush counter in:\n{body}"))
}

/// Waits until the guest has flushed `n` more times (each flush follows a write pass over every page): the VM
/// went on writing. Panics if it stopped instead.
fn guest_writes_on(vm: &mut ApiVm, n: u64) {
    let start = flushes(vm);
    let deadline = Instant::now() + Duration::from_secs(60);
    while flushes(vm) < start + n {
        assert!(Instant::now() < deadline, "the guest stopped flushing");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then the exit code and the log.
fn stop(vm: ApiVm) -> String {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    assert_eq!(code, Some(143), "{stderr}");
    stderr
}

/// Runs a host tool, returns its pid and whether it succeeded.
fn host(argv: &[&str], img: &Path) -> (u32, bool) {
    let mut c = Command::new(argv[0])
        .args(&argv[1..])
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", argv[0]));
    (c.id(), c.wait().unwrap().success())
}

/// The one log line that contains every one of `want`.
fn line_with<'a>(log: &'a str, want: &[&str]) -> &'a str {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "lines with {want:?}:\n{}\n--- log:\n{log}",
        lines.join("\n")
    );
    lines[0]
}

/// The line names the tool's pid, and its command unless the tool had ended before the guard read it (an unlink
/// is reported after the fact, and `rm` ends at once).
fn exited_or_named(l: &str, pid: u32, tool: &str) {
    assert!(l.contains(&format!("pid={pid} ")), "not pid {pid}: {l}");
    assert!(
        l.contains(&format!("command={tool} "))
            || l.contains("command=? (ended before it could be read)"),
        "{l}"
    );
}

fn holds_the_pattern(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() as u64, SIZE, "{}: size", path.display());
    assert_eq!(
        pattern_mismatches(&bytes, SEED, SIZE as usize),
        0,
        "{}: the guest's pattern is not all there",
        path.display()
    );
}

fn lsattr(img: &Path) -> String {
    let out = Command::new("lsattr").arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn chattr_plus_i_and_plus_a_are_cleared_at_once_and_the_guest_writes_on() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let mut vm = writing(dir.path(), &img);
    let (plus_i, ok) = host(&["chattr", "+i"], &img);
    assert!(ok, "chattr +i failed");
    guest_writes_on(&mut vm, 3);
    let (plus_a, ok) = host(&["chattr", "+a"], &img);
    assert!(ok, "chattr +a failed");
    guest_writes_on(&mut vm, 3);
    let attrs = lsattr(&img);
    assert!(
        !attrs.contains('i') && !attrs.contains('a'),
        "flags left: {attrs}"
    );
    let log = stop(vm);
    for (pid, flag) in [(plus_i, "immutable"), (plus_a, "append-only")] {
        let l = line_with(&log, &[&format!("the {flag} flag was set"), "access=flags"]);
        for want in [
            "cleared again".to_owned(),
            format!("pid={pid} "),
            "command=chattr".to_owned(),
            "id=data".to_owned(),
            "outcome=undone".to_owned(),
        ] {
            assert!(l.contains(&want), "no {want:?} in {l}");
        }
    }
    assert!(!log.contains("EFAULT"), "{log}");
    holds_the_pattern(&img);
}

#[test]
fn a_truncate_by_path_after_a_read_only_open_is_refused_and_logged_with_its_pid() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let mut vm = writing(dir.path(), &img);
    let truncate = ["perl", "-e", "truncate($ARGV[0], 1048576) or die \"$!\\n\""];
    // First with nothing else holding the file (the kernel lease held), then after a read-only open.
    let (first, ok) = host(&truncate, &img);
    assert!(!ok, "the truncate got through");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), SIZE);
    // A reader holds the file open (so the kernel lease is gone), then truncate(2) by path.
    let mut reader = Command::new("sh")
        .args(["-c", "exec 3<\"$0\"; echo opened; exec sleep 60"])
        .arg(&img)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut opened = [0u8; 7];
    reader
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut opened)
        .unwrap();
    let (pid, ok) = host(&truncate, &img);
    assert!(!ok, "the truncate got through");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), SIZE);
    guest_writes_on(&mut vm, 2);
    reader.kill().unwrap();
    reader.wait().unwrap();
    let log = stop(vm);
    for pid in [first, pid] {
        let l = line_with(&log, &["foreign truncate by path", &format!("pid={pid} ")]);
        for want in [
            "denied (EPERM)",
            "command=perl",
            "access=truncate",
            "outcome=denied",
        ] {
            assert!(l.contains(want), "no {want:?} in {l}");
        }
    }
    assert!(
        !log.contains("kernel lease"),
        "a second line for the same truncate:\n{log}"
    );
    holds_the_pattern(&img);
}

/// `rm` while the guest writes: logged when it happens, and at stop every flushed byte is in the recovery file.
#[test]
fn rm_of_the_file_then_a_stop_leaves_every_flushed_byte_in_the_recovery_file() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let mut vm = writing(dir.path(), &img);
    let (pid, ok) = host(&["rm"], &img);
    assert!(ok);
    guest_writes_on(&mut vm, 2);
    let log = stop(vm);
    let l = line_with(&log, &["lost its last name (rm, or mv over it)"]);
    exited_or_named(l, pid, "rm");
    let recovered = dir.path().join("vm.img.recovered");
    let l = line_with(&log, &["copied to the recovery file"]);
    assert!(l.contains(&recovered.display().to_string()), "{l}");
    assert!(!img.exists());
    holds_the_pattern(&recovered);
}

/// `mv other FILE`: the name now holds the other file, untouched; the VM's data goes to the recovery file.
#[test]
fn mv_over_the_file_then_a_stop_leaves_every_flushed_byte_in_the_recovery_file() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let other = dir.path().join("other");
    std::fs::write(&other, b"someone else's file\n").unwrap();
    let mut vm = writing(dir.path(), &img);
    let mut mv = Command::new("mv").arg(&other).arg(&img).spawn().unwrap();
    let pid = mv.id();
    assert!(mv.wait().unwrap().success());
    guest_writes_on(&mut vm, 2);
    let log = stop(vm);
    let l = line_with(&log, &["lost its last name (rm, or mv over it)"]);
    exited_or_named(l, pid, "mv");
    assert_eq!(std::fs::read(&img).unwrap(), b"someone else's file\n");
    holds_the_pattern(&dir.path().join("vm.img.recovered"));
}

/// A thousand read-only opens of the file (a thousand `head` processes): a line per burst, not per open, and
/// the lines' counts add up to a thousand; the metrics count every one.
#[test]
fn a_thousand_reads_are_a_line_per_burst_and_counted_exactly() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let vm = writing(dir.path(), &img);
    let (_, ok) = host(
        &[
            "sh",
            "-c",
            "for i in $(seq 1000); do head -c1 \"$0\" >/dev/null || exit 1; done",
        ],
        &img,
    );
    assert!(ok);
    let (_, m) = vm.http("GET", "/metrics", None);
    let events: f64 = m
        .lines()
        .find(|l| l.starts_with("daxvisor_guard_events") && l.contains("\"data\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no guard event counter:\n{m}"));
    assert_eq!(events, 1000.0);
    let log = stop(vm);
    assert!(
        !log.contains("outcome=denied"),
        "a read-only open was refused:\n{log}"
    );
    let number_after = |l: &str, key: &str| -> u64 {
        l.split(key)
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut total = 0;
    let mut lines = 0;
    for l in log.lines().filter(|l| {
        l.contains("host guard: foreign open of a backing file") && l.contains("command=head")
    }) {
        lines += 1;
        total += 1 + number_after(l, "(");
    }
    for l in log
        .lines()
        .filter(|l| l.contains("allowed since the last line") && l.contains("command=head"))
    {
        lines += 1;
        total += number_after(l, "folded=");
    }
    assert!(lines <= 10, "{lines} lines for a thousand reads:\n{log}");
    // And no other line repeats them (the event log's record is not a second log line).
    let naming = log.lines().filter(|l| l.contains("head -c1")).count();
    assert_eq!(naming, lines, "{log}");
    assert_eq!(total, 1000, "{log}");
}

/// Whether `pid` blocks SIGTERM yet (its main thread's `SigBlk`): `daxvisor run` does so before it creates
/// anything.
fn blocks_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
}

/// SIGTERM at a hundred moments of a `create=on` start, from the first instant daxvisor runs to well after the
/// guest started: never a death by the default action (always exit 143); a start the signal interrupted says
/// so and leaves no file; a VM that had started stops cleanly.
#[test]
fn sigterm_at_any_moment_of_a_create_on_start_leaves_no_file_and_no_default_action_death() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut interrupted, mut stopped) = (0, 0);
    for round in 0..100u64 {
        let img = dir.path().join(format!("vm{round}.img"));
        let pmem = format!("file={},size=4M,create=on,id=data", img.display());
        let child = Command::new(daxvisor_tests::daxvisor_bin())
            .args(["run", "--pmem", &pmem, "--cmdline", "pmem=write-flush-spin"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !blocks_sigterm(pid) {
            assert!(Instant::now() < deadline, "daxvisor never blocked SIGTERM");
            std::thread::sleep(Duration::from_micros(100));
        }
        // From 0 to 40 ms into the start, evenly over the rounds.
        std::thread::sleep(Duration::from_micros(round * 400));
        // SAFETY: kill(2) on our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            (out.status.signal(), out.status.code()),
            (None, Some(143)),
            "round {round}: {log}"
        );
        if log.contains("SIGTERM: start interrupted; everything it had created was undone") {
            assert!(!img.exists(), "round {round}: the file was left: {log}");
            interrupted += 1;
        } else {
            assert!(
                log.contains("SIGTERM: stopping the VM"),
                "round {round}: {log}"
            );
            stopped += 1;
        }
    }
    eprintln!("{interrupted} starts interrupted, {stopped} VMs stopped");
    assert!(interrupted > 0, "no round interrupted a start");
}

/// A refused start: exit 2 and one `daxvisor:` line with every one of `want`.
fn refused(args: &[&str], want: &[&str]) {
    let r = daxvisor_tests::daxvisor(args);
    assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("daxvisor: "))
        .unwrap_or_else(|| panic!("{args:?}: no daxvisor: line in {}", r.stderr));
    for w in want {
        assert!(line.contains(w), "{args:?}: no {w:?} in {line}");
    }
}

/// What a file is now: size and modification time, or `None` if it does not exist.
fn state_of(p: &Path) -> Option<(u64, std::time::SystemTime)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.len(), m.modified().unwrap()))
}

/// Each start refused with a message naming the real cause, and no file created, extended or touched.
#[test]
fn refused_starts_name_the_real_cause_and_touch_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let pmem = |name: &str, extra: &str| format!("file={}{extra}", d(name).display());
    // Seven pmem regions for the test guest: a limit of its boot block, not of the kernel command line.
    let seven: Vec<String> = (0..7)
        .map(|i| pmem(&format!("p{i}.img"), ",size=2M,create=on"))
        .collect();
    let mut args = vec!["run"];
    for p in &seven {
        args.extend(["--pmem", p.as_str()]);
    }
    refused(
        &args,
        &[
            "7 --pmem regions",
            "the built-in test guest takes at most 6",
        ],
    );
    assert!((0..7).all(|i| !d(&format!("p{i}.img")).exists()));
    // 15 TiB: larger than any KVM memory slot (KVM would say only "Invalid argument").
    refused(
        &["run", "--pmem", &pmem("big.img", ",size=15T,create=on")],
        &[
            "size 16492674416640",
            "larger than a KVM memory slot",
            "split it",
        ],
    );
    assert!(!d("big.img").exists());
    // A dangling symlink with create=on: not "File exists".
    std::os::unix::fs::symlink(d("nowhere/target.img"), d("link.img")).unwrap();
    refused(
        &["run", "--pmem", &pmem("link.img", ",size=2M,create=on")],
        &[
            "is a symbolic link to",
            "nowhere/target.img",
            "which does not exist",
        ],
    );
    // A later region's missing file is found before an earlier create=on file is created or extended.
    std::fs::write(d("short.img"), vec![7u8; 4096]).unwrap();
    let before = state_of(&d("short.img"));
    refused(
        &[
            "run",
            "--pmem",
            &pmem("new.img", ",size=2M,create=on"),
            "--pmem",
            &pmem("short.img", ",size=2M,create=on"),
            "--pmem",
            &pmem("missing.img", ""),
        ],
        &["missing.img: no such file"],
    );
    assert!(!d("new.img").exists());
    assert_eq!(state_of(&d("short.img")), before);
}

/// A process holding the file open for writing at start is named with its pid and command; under guard=deny
/// the start is refused unless the operator says the file may be shared (shared=on), which starts with a
/// warning naming it.
#[test]
fn a_writer_holding_the_file_at_start_is_named_and_refused_unless_shared() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    std::fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    let mut writer = Command::new("sh")
        .args(["-c", "exec 3<>\"$0\"; echo ready; exec sleep 60"])
        .arg(&img)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    writer
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    let who = format!("pid {} (sleep)", writer.id());
    let before = state_of(&img);
    refused(
        &["run", "--pmem", &format!("file={},id=data", img.display())],
        &["open for writing by", &who, "guard=deny", "shared=on"],
    );
    assert_eq!(state_of(&img), before);
    let pmem = format!("file={},id=data,shared=on", img.display());
    let r = daxvisor_tests::daxvisor(&["run", "--pmem", &pmem, "--cmdline", "pmem=write exit=0"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let warned = r
        .stderr
        .lines()
        .any(|l| l.contains("open for writing by") && l.contains(&who));
    assert!(warned, "{}", r.stderr);
    writer.kill().unwrap();
    writer.wait().unwrap();
}

/// A daxvisor without CAP_LINUX_IMMUTABLE cannot clear `chattr +i`: the VM is stopped cleanly with a message
/// naming the region, the flag and who set it, instead of an anonymous EFAULT; the flushed data is all there.
#[test]
fn an_immutable_flag_that_cannot_be_cleared_stops_the_vm_naming_it() {
    if !fanotify_here() {
        return;
    }
    let probe = Command::new("setpriv")
        .args(["--bounding-set", "-linux_immutable", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        missing_prerequisite("setpriv cannot drop CAP_LINUX_IMMUTABLE here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let pmem = format!("file={},size=4M,create=on,id=data", img.display());
    let mut vm = daxvisor_tests::RunningVm::spawn_with(
        Command::new("setpriv")
            .args(["--bounding-set", "-linux_immutable"])
            .arg(daxvisor_tests::daxvisor_bin())
            .args([
                "run",
                "--pmem",
                &pmem,
                "--cmdline",
                &format!("pmem=write-loop seed={SEED}"),
            ]),
    );
    vm.wait_for_line("pass 1 flushed");
    let (pid, ok) = host(&["chattr", "+i"], &img);
    assert!(ok);
    let r = vm.finish(Duration::from_secs(60));
    let _ = Command::new("chattr").arg("-i").arg(&img).status();
    assert_eq!(r.code, Some(1), "{r:?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    for want in [
        format!(
            "daxvisor: VM failed: pmem data: the immutable flag was set on its backing file {}",
            img.display()
        ),
        format!("by pid {pid} (chattr +i "),
        "cannot be cleared (EPERM".to_owned(),
    ] {
        assert!(last.contains(&want), "no {want:?} in {last}\n{}", r.stderr);
    }
    assert!(!r.stderr.contains("EFAULT"), "{}", r.stderr);
    holds_the_pattern(&img);
}

/// `mv FILE elsewhere`: logged with the new name when it happens; the data stays under that name (nothing to
/// recover), every flushed byte in it.
#[test]
fn mv_of_the_file_is_logged_with_its_new_name_and_nothing_is_lost() {
    if !fanotify_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let moved = dir.path().join("moved.img");
    let mut vm = writing(dir.path(), &img);
    let mut mv = Command::new("mv").arg(&img).arg(&moved).spawn().unwrap();
    let pid = mv.id();
    assert!(mv.wait().unwrap().success());
    guest_writes_on(&mut vm, 2);
    let log = stop(vm);
    let l = line_with(&log, &["the backing file was renamed to"]);
    assert!(l.contains(&moved.display().to_string()), "{l}");
    exited_or_named(l, pid, "mv");
    assert!(!log.contains("recovery file"), "{log}");
    assert!(!dir.path().join("vm.img.recovered").exists());
    holds_the_pattern(&moved);
}
