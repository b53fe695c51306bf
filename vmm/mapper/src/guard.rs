//! The host guard: a kernel write lease (F_SETLEASE F_WRLCK) on every backing file the VMM opened alone, so a
//! foreign open or truncate of it is seen at once. The lease-break signal (F_SETSIG, a realtime signal so breaks
//! of several files queue instead of merging) is blocked and read through a signalfd, which the VMM's event loop
//! polls. Each break becomes a whole-file break in the mapper ([`LayoutChange::HostOpen`]): shared holders are
//! told and waited for, pins and exclusive leases are reported, and then the kernel lease is given up so the
//! opener proceeds; all of it within /proc/sys/fs/lease-break-time, after which the kernel would break the lease
//! on its own. Every event is recorded in introspection.
//!
//! Threading: the kernel sends the signal to the thread that created the guard (F_SETOWN_EX F_OWNER_TID), which
//! blocked it; create the guard on the thread that will poll it. The kernel resets the owner to the process
//! while setting a lease, so the guard re-targets it right after; for the few instructions in between a break
//! would be process-directed, which is why the VMM blocks the guard signal in all threads at start-up.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::breaks::BreakPolicy;
use crate::error::{MapperError, Result};
use crate::host::FileKey;
use crate::ids::{OwnerId, RegionId};
use crate::layout_change::{ChangeRequest, LayoutChange};
use crate::Mapper;

/// What the host guard saw and did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardEvent {
    /// The region whose file was opened (the first one armed on that file).
    pub region: RegionId,
    /// When.
    pub at: SystemTime,
    /// Shared holders that got a whole-file break notice.
    pub notified: Vec<OwnerId>,
    /// Holders whose leases were revoked at the deadline.
    pub revoked: Vec<OwnerId>,
    /// `Ok` when every holder answered; otherwise the errno name and message (ETXTBSY names the pin holder).
    pub outcome: std::result::Result<(), String>,
    /// From the signal to giving the kernel lease up.
    pub answered_in: Duration,
}

struct Guarded {
    region: RegionId,
    key: FileKey,
    file: Arc<File>,
    armed: bool,
}

/// Watches backing files for foreign opens (see the module docs).
pub struct HostGuard {
    mapper: Mapper,
    sfd: OwnedFd,
    signo: i32,
    tid: libc::pid_t,
    files: Mutex<HashMap<RawFd, Guarded>>,
    /// Deadline and policy for the whole-file break (the deadline is capped below lease-break-time).
    pub deadline: Duration,
    /// What happens to holders that do not answer in time.
    pub policy: BreakPolicy,
}

impl std::fmt::Debug for HostGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGuard")
            .field("signo", &self.signo)
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

/// The realtime signal the guard uses by default.
pub fn guard_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

/// /proc/sys/fs/lease-break-time: how long the kernel waits for a lease holder before breaking it itself.
pub fn lease_break_time() -> Duration {
    std::fs::read_to_string("/proc/sys/fs/lease-break-time")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(45))
}

// asm-generic/fcntl.h; the libc crate does not export these.
const F_SETSIG: i32 = 10;
const F_SETOWN_EX: i32 = 15;
const F_OWNER_TID: i32 = 0;

#[repr(C)]
struct FOwnerEx {
    type_: i32,
    pid: libc::pid_t,
}

fn fcntl(fd: RawFd, cmd: i32, arg: libc::c_long) -> io::Result<i32> {
    // SAFETY: the lease fcntls used here take integer arguments.
    let r = unsafe { libc::fcntl(fd, cmd, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

impl HostGuard {
    /// Blocks `signo` in the calling thread and opens a signalfd for it.
    pub fn new(mapper: Mapper, signo: i32) -> Result<Self> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer; signo is a signal number (checked by sigaddset).
        let sfd = unsafe {
            libc::sigemptyset(&mut set);
            if libc::sigaddset(&mut set, signo) < 0 {
                return Err(MapperError::BadSignal(signo));
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(MapperError::last_os("pthread_sigmask"));
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if sfd < 0 {
            return Err(MapperError::last_os("signalfd"));
        }
        // SAFETY: signalfd returned a fresh fd that we own.
        let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let deadline = lease_break_time()
            .saturating_sub(Duration::from_secs(1))
            .min(Duration::from_secs(10));
        Ok(HostGuard {
            mapper,
            sfd,
            signo,
            tid,
            files: Mutex::new(HashMap::new()),
            deadline,
            policy: BreakPolicy::Revoke,
        })
    }

    /// The fd the event loop polls for readability.
    pub fn fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Guarded>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the kernel write lease on the region's backing file (once per file). EAGAIN if another open
    /// exists (the VMM did not open it alone): the guard cannot protect that file.
    pub fn arm(&self, region: RegionId) -> Result<()> {
        let (file, key) = {
            let st = self.mapper.lock();
            let reg = st.region(region)?;
            (reg.desc.file.clone(), reg.key)
        };
        if self.files().values().any(|g| g.key == key) {
            return Ok(());
        }
        self.take_lease(&file)?;
        self.files().insert(
            file.as_raw_fd(),
            Guarded {
                region,
                key,
                file,
                armed: true,
            },
        );
        tracing::info!(%region, "host guard armed");
        Ok(())
    }

    fn take_lease(&self, file: &File) -> Result<()> {
        let fd = file.as_raw_fd();
        fcntl(fd, F_SETSIG, self.signo as libc::c_long)
            .map_err(|e| MapperError::io("F_SETSIG", e))?;
        fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK as libc::c_long)
            .map_err(|e| MapperError::io("F_SETLEASE", e))?;
        // Setting a lease made the process the signal's owner; send it to this (blocking) thread instead.
        let own = FOwnerEx {
            type_: F_OWNER_TID,
            pid: self.tid,
        };
        // SAFETY: F_SETOWN_EX reads a struct f_owner_ex.
        if unsafe { libc::fcntl(fd, F_SETOWN_EX, &own) } < 0 {
            return Err(MapperError::last_os("F_SETOWN_EX"));
        }
        Ok(())
    }

    /// Tries to take the lease again on files whose lease was given up (succeeds once the foreign opener closed).
    /// Returns how many files are armed afterwards.
    pub fn rearm(&self) -> usize {
        let mut files = self.files();
        let mut armed = 0;
        for g in files.values_mut() {
            if !g.armed && self.take_lease(&g.file).is_ok() {
                g.armed = true;
                tracing::info!(region = %g.region, "host guard re-armed");
            }
            armed += g.armed as usize;
        }
        armed
    }

    /// Waits up to `timeout` for the signalfd to become readable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) > 0 }
    }

    /// Files whose lease the kernel is breaking: from queued signals, and from F_GETLEASE on every armed file
    /// in case signals were lost.
    fn breaking_files(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        loop {
            // SAFETY: reads one signalfd_siginfo into a buffer of exactly its size.
            let n = unsafe {
                libc::read(
                    self.fd(),
                    info.as_mut_ptr() as *mut libc::c_void,
                    info.len(),
                )
            };
            if n != info.len() as isize {
                break;
            }
            // SAFETY: the kernel wrote a whole signalfd_siginfo; read it unaligned from the byte buffer.
            let si: libc::signalfd_siginfo =
                unsafe { std::ptr::read_unaligned(info.as_ptr() as *const _) };
            fds.push(si.ssi_fd);
        }
        for (fd, g) in self.files().iter() {
            if g.armed && fcntl(*fd, libc::F_GETLEASE, 0).is_ok_and(|t| t != libc::F_WRLCK) {
                fds.push(*fd);
            }
        }
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Handles every pending lease break: a whole-file break in the mapper, then the kernel lease is given up so
    /// the opener proceeds. Blocks while holders are asked (at most the capped deadline).
    pub fn service(&self) -> Vec<GuardEvent> {
        let mut out = Vec::new();
        for fd in self.breaking_files() {
            let t0 = Instant::now();
            let Some(region) = self.files().get(&fd).filter(|g| g.armed).map(|g| g.region) else {
                continue;
            };
            let deadline = self
                .deadline
                .min(lease_break_time().saturating_sub(Duration::from_secs(1)));
            let req = ChangeRequest {
                deadline,
                policy: self.policy,
                ..ChangeRequest::new(region, LayoutChange::HostOpen)
            };
            let res = self.mapper.change(req);
            if let Err(e) = fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK as libc::c_long) {
                tracing::error!(%region, error = %e, "giving up the host lease failed");
            }
            if let Some(g) = self.files().get_mut(&fd) {
                g.armed = false;
            }
            let (notified, revoked, outcome) = match res {
                Ok(r) => (r.notified, r.revoked, Ok(())),
                Err(e) => (
                    Vec::new(),
                    Vec::new(),
                    Err(format!("{}: {e}", e.errno_name())),
                ),
            };
            let ev = GuardEvent {
                region,
                at: SystemTime::now(),
                notified,
                revoked,
                outcome,
                answered_in: t0.elapsed(),
            };
            tracing::warn!(%region, ?ev.outcome, "foreign open of a backing file: whole-file break");
            self.mapper.lock().guard_events.push(ev.clone());
            out.push(ev);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::TestRegion;
    #[allow(unused_imports)]
    use crate::*;
    use crate::{BreakEvent, LeaseMode};
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
        let guard = HostGuard::new(m.clone(), guard_signal()).unwrap();
        guard.arm(t.region).unwrap();
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
        assert_eq!(evs[0].outcome, Ok(()));
        assert_eq!(evs[0].notified, vec![holder]);
        assert!(
            evs[0].answered_in >= Duration::from_millis(300)
                && evs[0].answered_in < lease_break_time()
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
        let guard = HostGuard::new(m.clone(), guard_signal()).unwrap();
        guard.arm(t.region).unwrap();
        let dma = m.add_owner("dma-ctx");
        m.acquire(dma, t.region, 0, t.page, LeaseMode::Exclusive)
            .unwrap();
        m.pin(dma, t.region, 0, t.page).unwrap();
        let mut child = spawn_opener("exec 3<\"$0\"; echo opened", &t.path);
        assert!(guard.wait(Duration::from_secs(10)));
        let evs = guard.service();
        // Pins are checked first: the whole-file break is ETXTBSY naming the pin's owner. The kernel lets the
        // opener in regardless (it would break our lease itself), so the guard answers at once and reports it.
        let outcome = evs[0].outcome.as_ref().unwrap_err();
        assert!(
            outcome.starts_with("ETXTBSY") && outcome.contains(&format!("{dma} (dma-ctx)")),
            "{outcome}"
        );
        assert!(child.wait().unwrap().success());
        assert_eq!(m.snapshot().guard_events[0].outcome, evs[0].outcome);
        assert_eq!(m.snapshot().pins().len(), 1, "the pin stays");
    }

    #[test]
    fn the_mappers_own_changes_do_not_trip_the_guard() {
        let t = TestRegion::on_tmp(8);
        let m = &t.mapper;
        let guard = HostGuard::new(m.clone(), guard_signal()).unwrap();
        guard.arm(t.region).unwrap();
        let t0 = Instant::now();
        m.punch(None, t.region, 0, t.page).unwrap();
        m.zero(None, t.region, t.page, t.page).unwrap();
        m.shrink(None, t.region, 4 * t.page).unwrap();
        m.grow(None, t.region, 8 * t.page).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a change waited on our own lease"
        );
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
        let guard = HostGuard::new(t.mapper.clone(), guard_signal()).unwrap();
        assert_eq!(guard.arm(t.region).unwrap_err().errno(), libc::EAGAIN);
        drop(other);
        guard.arm(t.region).unwrap();
    }
}
