//! The host guard against real files, real foreign processes and the real kernel lease and fanotify group.

use super::*;
use crate::test_files::TestRegion;
#[allow(unused_imports)]
use crate::*;
use crate::{BreakEvent, LeaseMode, RegionDesc};
use std::io::Read;
use std::process::{Command, Stdio};

fn spawn_opener(script: &str, path: &std::path::Path) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_foreign_open_is_a_whole_file_break_and_the_opener_waits_for_it() {
    let mut t = TestRegion::on_tmp(8);
    let m = t.mapper.clone();
    let guard = HostGuard::lease_only(m.clone(), guard_signal()).unwrap();
    guard.arm(t.region, GuardPolicy::Hold).unwrap();
    let holder = m.add_owner("guest-agent");
    let l = m
        .acquire(holder, t.region, 4 * t.page, t.page, LeaseMode::Shared)
        .unwrap();

    // A real foreign process opens the backing file for reading and reports when open() returned.
    let mut child = spawn_opener("exec 3<\"$0\"; echo opened", &t.path);
    assert!(
        guard.wait(Duration::from_secs(10)),
        "no lease-break signal within 10 s"
    );
    // The opener is held in open() while the break is being resolved.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "opener got through before the break resolved"
    );

    // The scripted holder gets a whole-file break for exactly its lease's range and releases it late.
    let events = t.events.take().unwrap();
    let (m2, page) = (m.clone(), t.page);
    let h = std::thread::spawn(move || {
        let ev = events.recv_timeout(Duration::from_secs(10)).unwrap();
        let BreakEvent::Notice(n) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(n.reason, "host-open");
        assert_eq!(
            n.leases,
            vec![(l, crate::ByteRange::new(4 * page, 5 * page))]
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            m2.snapshot().breaks.len(),
            1,
            "break not visible while in progress"
        );
        m2.release(n.owner, l).unwrap();
    });
    let evs = guard.service();
    h.join().unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].outcome, GuardOutcome::Delayed);
    assert_eq!(evs[0].refused_by, None);
    assert_eq!(evs[0].seen_by, SeenBy::KernelLease);
    assert_eq!(evs[0].notified, vec![holder]);
    assert!(
        evs[0].answered_in >= Duration::from_millis(300) && evs[0].answered_in < lease_break_time()
    );

    let status = child.wait().unwrap();
    assert!(status.success());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out.trim(), "opened");
    assert_eq!(m.snapshot().guard_events, evs, "event not in introspection");
    // The opener closed its fd: the guard can take the lease again, and sees the next open too.
    assert_eq!(guard.rearm(), 1);
    let mut child = spawn_opener("exec 3<\"$0\"", &t.path);
    assert!(
        guard.wait(Duration::from_secs(10)),
        "re-armed guard missed the second open"
    );
    assert_eq!(guard.service().len(), 1);
    assert!(child.wait().unwrap().success());
    assert_eq!(m.snapshot().guard_events.len(), 2);
}

#[test]
fn a_foreign_open_of_a_pinned_file_is_recorded_with_the_holder() {
    let t = TestRegion::on_tmp(8);
    let m = &t.mapper;
    let guard = HostGuard::lease_only(m.clone(), guard_signal()).unwrap();
    guard.arm(t.region, GuardPolicy::Hold).unwrap();
    let dma = m.add_owner("dma-ctx");
    m.acquire(dma, t.region, 0, t.page, LeaseMode::Exclusive)
        .unwrap();
    m.pin(dma, t.region, 0, t.page).unwrap();
    let mut child = spawn_opener("exec 3<\"$0\"; echo opened", &t.path);
    assert!(guard.wait(Duration::from_secs(10)));
    let evs = guard.service();
    // Pins are checked first: the whole-file break is ETXTBSY naming the pin's owner. The kernel lets the
    // opener in regardless (it would break our lease itself), so the guard answers at once and reports it.
    let outcome = evs[0].refused_by.as_ref().unwrap();
    assert!(
        outcome.starts_with("ETXTBSY") && outcome.contains(&format!("{dma} (dma-ctx)")),
        "{outcome}"
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(m.snapshot().guard_events[0], evs[0]);
    assert_eq!(m.snapshot().pins().len(), 1, "the pin stays");
}

#[test]
fn the_mappers_own_changes_do_not_trip_the_guard() {
    let t = TestRegion::on_tmp(8);
    let m = &t.mapper;
    let guard = HostGuard::lease_only(m.clone(), guard_signal()).unwrap();
    guard.arm(t.region, GuardPolicy::Hold).unwrap();
    m.punch(None, t.region, 0, t.page).unwrap();
    m.zero(None, t.region, t.page, t.page).unwrap();
    m.shrink(None, t.region, 4 * t.page).unwrap();
    m.grow(None, t.region, 8 * t.page).unwrap();
    assert!(
        !guard.wait(Duration::from_millis(100)),
        "our own change broke our lease"
    );
    assert!(guard.service().is_empty());
}

#[test]
fn arming_a_file_someone_else_has_open_is_refused() {
    let t = TestRegion::on_tmp(2);
    let other = File::open(&t.path).unwrap();
    let guard = HostGuard::lease_only(t.mapper.clone(), guard_signal()).unwrap();
    assert_eq!(
        guard.arm(t.region, GuardPolicy::Deny).unwrap_err().errno(),
        libc::EAGAIN
    );
    drop(other);
    guard.arm(t.region, GuardPolicy::Deny).unwrap();
}

/// A guard with fanotify running on its own thread, as the VMM runs it; its events arrive on a channel.
struct Running {
    guard: Arc<HostGuard>,
    stop: std::os::unix::net::UnixStream,
    events: std::sync::mpsc::Receiver<GuardEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(t: &TestRegion, policies: &[(RegionId, GuardPolicy)]) -> Option<Running> {
        let guard = Arc::new(HostGuard::new(t.mapper.clone(), guard_signal()).unwrap());
        if let Some(e) = guard.fanotify_unavailable() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "fanotify unavailable under CI=true: {e}"
            );
            eprintln!("SKIP: fanotify unavailable here: {e}");
            return None;
        }
        for (r, p) in policies {
            guard.arm(*r, *p).unwrap();
        }
        let (stop, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let g = guard.clone();
        let thread = std::thread::spawn(move || {
            g.set_thread().unwrap();
            ready_tx.send(()).unwrap();
            g.run(theirs.as_raw_fd(), |ev| {
                let _ = tx.send(ev.clone());
            });
        });
        ready.recv().unwrap();
        Some(Running {
            guard,
            stop,
            events,
            thread: Some(thread),
        })
    }

    fn next(&self) -> GuardEvent {
        self.events.recv_timeout(Duration::from_secs(20)).unwrap()
    }

    fn none_within(&self, d: Duration) {
        if let Ok(ev) = self.events.recv_timeout(d) {
            panic!("unexpected second event: {ev:?}");
        }
    }

    fn armed(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.guard.files().values().all(|g| g.armed) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.stop.write_all(b"x");
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn run_sh(script: &str, path: &std::path::Path) -> (u32, bool) {
    let mut c = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(path)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (c.id(), c.wait().unwrap().success())
}

#[test]
fn deny_refuses_a_write_open_with_eperm_and_lets_a_read_through_each_logged_once() {
    let t = TestRegion::on_tmp(4);
    let before = std::fs::read(&t.path).unwrap();
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    let (pid, ok) = run_sh("exec 3>>\"$0\"; echo x >&3", &t.path);
    assert!(!ok, "the write-open got through");
    let ev = g.next();
    assert_eq!(
        (ev.pid, ev.mode, ev.outcome, ev.seen_by, ev.policy),
        (
            Some(pid),
            OpenMode::Write,
            GuardOutcome::Denied,
            SeenBy::Fanotify,
            GuardPolicy::Deny
        )
    );
    assert!(ev.command.starts_with("sh -c exec 3>>"), "{}", ev.command);
    let (pid, ok) = run_sh("exec 3<\"$0\"; head -c1 <&3 >/dev/null", &t.path);
    assert!(ok, "a read-only open was refused");
    let ev = g.next();
    assert_eq!(
        (ev.pid, ev.mode, ev.outcome),
        (Some(pid), OpenMode::Read, GuardOutcome::Allowed)
    );
    // The read broke the kernel lease: the same access, not a second event; re-armed at its close.
    g.none_within(Duration::from_millis(300));
    assert!(
        g.armed(),
        "the kernel lease was not taken back after the close"
    );
    assert_eq!(std::fs::read(&t.path).unwrap(), before);
    assert_eq!(t.mapper.snapshot().guard_events.len(), 2);
    // Our own opens pass silently.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t.path)
        .unwrap();
    g.none_within(Duration::from_millis(200));
}

#[test]
fn hold_breaks_the_whole_file_first_and_refuses_when_a_pin_is_in_the_way() {
    let mut t = TestRegion::on_tmp(4);
    let m = t.mapper.clone();
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Hold)]) else {
        return;
    };
    // A shared holder: told, releases, then the open proceeds.
    let holder = m.add_owner("guest-agent");
    let l = m
        .acquire(holder, t.region, 0, t.page, LeaseMode::Shared)
        .unwrap();
    let events = t.events.take().unwrap();
    let m2 = m.clone();
    let answer = std::thread::spawn(move || {
        let BreakEvent::Notice(n) = events.recv_timeout(Duration::from_secs(10)).unwrap() else {
            panic!("no notice")
        };
        assert_eq!(n.reason, "host-open");
        m2.release(n.owner, l).unwrap();
    });
    let (pid, ok) = run_sh("exec 3>>\"$0\"", &t.path);
    answer.join().unwrap();
    assert!(ok);
    let ev = g.next();
    assert_eq!(
        (ev.pid, ev.outcome, ev.notified.clone()),
        (Some(pid), GuardOutcome::HeldAllowed, vec![holder])
    );
    g.none_within(Duration::from_millis(300));
    assert!(g.armed());
    // A pin: the break is refused naming the holder, and so is the open.
    let dma = m.add_owner("dma-ctx");
    m.acquire(dma, t.region, 0, t.page, LeaseMode::Exclusive)
        .unwrap();
    m.pin(dma, t.region, 0, t.page).unwrap();
    let (pid, ok) = run_sh("exec 3>>\"$0\"", &t.path);
    assert!(!ok, "a write-open got past a pin");
    let ev = g.next();
    assert_eq!((ev.pid, ev.outcome), (Some(pid), GuardOutcome::HeldDenied));
    let why = ev.refused_by.unwrap();
    assert!(
        why.starts_with("ETXTBSY") && why.contains(&format!("{dma} (dma-ctx)")),
        "{why}"
    );
    assert_eq!(m.snapshot().pins().len(), 1, "the pin stays");
}

#[test]
fn the_strictest_policy_of_a_files_regions_wins_and_log_lets_writes_through() {
    let t = TestRegion::on_tmp(4);
    let kind = t.mapper.snapshot().regions[0].kind;
    let second = t
        .mapper
        .add_region(RegionDesc::new(t.file.clone(), 0, 2 * t.page, kind))
        .unwrap();
    {
        let Some(g) = Running::start(
            &t,
            &[(t.region, GuardPolicy::Log), (second, GuardPolicy::Deny)],
        ) else {
            return;
        };
        let (pid, ok) = run_sh("exec 3>>\"$0\"", &t.path);
        assert!(!ok);
        let ev = g.next();
        assert_eq!(
            (ev.pid, ev.policy, ev.outcome, ev.regions.clone()),
            (
                Some(pid),
                GuardPolicy::Deny,
                GuardOutcome::Denied,
                vec![t.region, second]
            )
        );
    }
    let Some(g) = Running::start(
        &t,
        &[(t.region, GuardPolicy::Log), (second, GuardPolicy::Log)],
    ) else {
        return;
    };
    let (pid, ok) = run_sh("exec 3>>\"$0\"; printf x >&3", &t.path);
    assert!(ok);
    let ev = g.next();
    assert_eq!((ev.pid, ev.outcome), (Some(pid), GuardOutcome::Allowed));
    g.none_within(Duration::from_millis(300));
    assert!(g.armed());
    assert_eq!(
        std::fs::metadata(&t.path).unwrap().len(),
        4 * t.page + 1,
        "log lets the write through"
    );
}

#[test]
fn a_truncate_by_path_is_seen_by_the_kernel_lease_once_and_re_armed_after() {
    let t = TestRegion::on_tmp(4);
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    if g.guard.pre.is_some() {
        // Linux 6.14+: the pre-content group sees it first (the next tests).
        return;
    }
    // truncate(2) by path opens nothing: fanotify cannot see it; the lease delays it for a whole-file break.
    let mut child = Command::new("perl")
        .args(["-e", "truncate($ARGV[0], $ARGV[1]) or die \"truncate: $!\""])
        .arg(&t.path)
        .arg((8 * t.page).to_string())
        .spawn()
        .unwrap();
    let ev = g.next();
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::metadata(&t.path).unwrap().len(), 8 * t.page);
    assert_eq!(
        (ev.seen_by, ev.outcome, ev.pid, ev.mode),
        (
            SeenBy::KernelLease,
            GuardOutcome::Delayed,
            None,
            OpenMode::Unknown
        )
    );
    g.none_within(Duration::from_millis(300));
    assert!(g.armed(), "not re-armed after the truncate");
}

#[test]
fn the_event_history_is_bounded_and_the_counts_are_not() {
    let t = TestRegion::on_tmp(2);
    let guard = HostGuard::lease_only(t.mapper.clone(), guard_signal()).unwrap();
    let ev = |i: u32, outcome| GuardEvent {
        region: t.region,
        regions: vec![t.region],
        at: SystemTime::now(),
        seen_by: SeenBy::Fanotify,
        pid: Some(i),
        command: "loop".into(),
        mode: OpenMode::Write,
        access: Access::Open,
        detail: None,
        policy: GuardPolicy::Deny,
        outcome,
        refused_by: None,
        notified: Vec::new(),
        revoked: Vec::new(),
        answered_in: Duration::ZERO,
    };
    let n = GUARD_HISTORY as u32 + 10;
    for i in 0..n {
        guard.record(ev(
            i,
            if i % 2 == 0 {
                GuardOutcome::Denied
            } else {
                GuardOutcome::Allowed
            },
        ));
    }
    let snap = t.mapper.snapshot();
    assert_eq!(snap.guard_events.len(), GUARD_HISTORY);
    assert_eq!(snap.guard_events[0].pid, Some(10), "the oldest go first");
    assert_eq!(
        snap.guard_counts[&t.region],
        GuardCounts {
            events: u64::from(n),
            denied: u64::from(n / 2)
        }
    );
}

/// `chattr +a` and `chattr +i` (an ioctl through a read-only open, no fanotify event of its own): found at the
/// close, cleared at once, one event each naming chattr and the flag, after the read-only opens' own events.
#[test]
fn chattr_flags_are_found_at_the_close_and_cleared() {
    let t = TestRegion::on_tmp(4);
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    for (flag, name) in [("+a", "append-only"), ("+i", "immutable")] {
        let c = Command::new("chattr")
            .arg(flag)
            .arg(&t.path)
            .status()
            .unwrap();
        assert!(c.success(), "chattr {flag}");
        // chattr opens the file read-only (once to read the flags, once to set them): each open allowed.
        let ev = loop {
            let ev = g.next();
            if ev.access != Access::Open {
                break ev;
            }
            assert_eq!(
                (ev.mode, ev.outcome),
                (OpenMode::Read, GuardOutcome::Allowed)
            );
        };
        assert_eq!(
            (ev.access, ev.outcome, ev.detail.as_deref()),
            (Access::Flags, GuardOutcome::Undone, Some(name)),
            "{ev:?}"
        );
        assert!(ev.command.starts_with("chattr"), "{}", ev.command);
        let f = File::open(&t.path).unwrap();
        assert_eq!(
            file_flags::get(f.as_raw_fd()).unwrap() & (file_flags::IMMUTABLE | file_flags::APPEND),
            0
        );
    }
}

/// While a foreign reader holds the file open (no kernel lease), a truncate(2) by path is seen before it
/// happens, with its pid: refused under deny, the size unchanged.
#[test]
fn a_truncate_by_path_after_a_read_only_open_is_seen_and_refused_under_deny() {
    let t = TestRegion::on_tmp(4);
    let size = std::fs::metadata(&t.path).unwrap().len();
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    if g.guard.pre.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no FAN_PRE_ACCESS (Linux 6.14+) under CI"
        );
        return;
    }
    let mut reader = spawn_opener("exec 3<\"$0\"; echo opened; exec sleep 30", &t.path);
    let mut line = [0u8; 7];
    reader
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let open = g.next();
    assert_eq!(
        (open.mode, open.outcome),
        (OpenMode::Read, GuardOutcome::Allowed)
    );
    let mut p = Command::new("perl")
        .args(["-e", "truncate($ARGV[0], 4096) or exit 1"])
        .arg(&t.path)
        .spawn()
        .unwrap();
    let pid = p.id();
    assert!(!p.wait().unwrap().success(), "the truncate got through");
    let ev = g.next();
    assert_eq!(
        (ev.access, ev.pid, ev.outcome),
        (Access::Truncate, Some(pid), GuardOutcome::Denied),
        "{ev:?}"
    );
    assert!(ev.command.starts_with("perl"), "{}", ev.command);
    assert_eq!(std::fs::metadata(&t.path).unwrap().len(), size);
    reader.kill().unwrap();
    reader.wait().unwrap();
}

/// `rm` of the file and a rename of it: each one event with the remover's pid; nothing else.
#[test]
fn a_rename_and_an_unlink_are_each_logged_once() {
    let t = TestRegion::on_tmp(4);
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    let moved = t.path.with_extension("moved");
    let mut mv = Command::new("mv").arg(&t.path).arg(&moved).spawn().unwrap();
    let mv_pid = mv.id();
    assert!(mv.wait().unwrap().success());
    let ev = g.next();
    assert_eq!(
        (ev.access, ev.outcome, ev.detail.as_deref()),
        (Access::Rename, GuardOutcome::Noted, moved.to_str())
    );
    assert_eq!(ev.pid, Some(mv_pid));
    let mut rm = Command::new("rm").arg(&moved).spawn().unwrap();
    let rm_pid = rm.id();
    assert!(rm.wait().unwrap().success());
    let ev = g.next();
    assert_eq!(
        (ev.access, ev.outcome, ev.pid),
        (Access::Unlink, GuardOutcome::Noted, Some(rm_pid))
    );
    g.none_within(Duration::from_millis(300));
}

/// A truncate by path with no foreign open (the kernel lease held): the pre-content group sees it first, with
/// its pid. Under deny it is refused; under hold it is held for a whole-file break and let through, one event
/// (the lease break it then causes is the same access), and the lease is taken again after it.
#[test]
fn a_truncate_by_path_is_seen_before_it_happens_with_its_pid() {
    for (policy, outcome, ok) in [
        (GuardPolicy::Deny, GuardOutcome::Denied, false),
        (GuardPolicy::Hold, GuardOutcome::HeldAllowed, true),
    ] {
        let t = TestRegion::on_tmp(4);
        let size = std::fs::metadata(&t.path).unwrap().len();
        let Some(g) = Running::start(&t, &[(t.region, policy)]) else {
            return;
        };
        if g.guard.pre.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "no FAN_PRE_ACCESS (Linux 6.14+) under CI"
            );
            return;
        }
        assert!(g.armed());
        let mut p = Command::new("perl")
            .args(["-e", "truncate($ARGV[0], 4096) or exit 1"])
            .arg(&t.path)
            .spawn()
            .unwrap();
        let pid = p.id();
        assert_eq!(p.wait().unwrap().success(), ok, "{policy}");
        let ev = g.next();
        assert_eq!(
            (ev.access, ev.pid, ev.outcome, ev.seen_by),
            (Access::Truncate, Some(pid), outcome, SeenBy::Fanotify),
            "{ev:?}"
        );
        let len = std::fs::metadata(&t.path).unwrap().len();
        assert_eq!(len, if ok { 4096 } else { size }, "{policy}");
        g.none_within(Duration::from_millis(300));
        assert!(g.armed(), "{policy}: not re-armed after the truncate");
    }
}

/// On tmpfs (no pre-content events there: EOPNOTSUPP) the file is still guarded: a write-open is refused and an
/// unlink is seen; only a truncate by path falls back to the kernel lease.
#[test]
fn a_file_system_without_pre_content_events_is_still_guarded() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        assert!(std::env::var_os("CI").is_none(), "no /dev/shm under CI");
        return;
    }
    let t = TestRegion::create(shm, 4);
    let Some(g) = Running::start(&t, &[(t.region, GuardPolicy::Deny)]) else {
        return;
    };
    let (pid, ok) = run_sh("exec 3>>\"$0\"", &t.path);
    assert!(!ok, "the write-open got through");
    let ev = g.next();
    assert_eq!((ev.pid, ev.outcome), (Some(pid), GuardOutcome::Denied));
    std::fs::remove_file(&t.path).unwrap();
    let ev = g.next();
    assert_eq!(
        (ev.access, ev.outcome),
        (Access::Unlink, GuardOutcome::Noted)
    );
}
