//! The host guard: backing files stay the VMM's. Two kernel mechanisms, on one thread:
//!
//! - **fanotify permission events** ([`fanotify`]), where the VMM may use them (CAP_SYS_ADMIN): every open of a
//!   guarded file is held until the guard answers. The VMM's own opens pass silently. A foreign open is read
//!   from /proc ([`opener`]: pid, command line, open mode) and answered by the region's [`GuardPolicy`]:
//!   read-only opens pass (logged); an open for writing, or of a mode that cannot be told, is refused (`deny`,
//!   EPERM for the opener), held while a whole-file break runs and then allowed unless pins or exclusive leases
//!   exist (`hold`), or allowed (`log`). Several regions on one file: the strictest policy wins.
//! - **a kernel write lease** (F_SETLEASE F_WRLCK) on every file the VMM opened alone: it sees what fanotify
//!   cannot (truncate(2) by path before Linux 6.14, opens without events), and can only delay them: a lease break with no open
//!   before it becomes a whole-file break in the mapper ([`LayoutChange::HostOpen`]), answered within
//!   /proc/sys/fs/lease-break-time, after which the kernel breaks the lease on its own. An open fanotify allowed
//!   breaks the lease too: that is the same access, so the lease is given up without a second event. The
//!   lease is taken again when the last open of the file closes (FAN_CLOSE events count the opens), or after
//!   a bare lease break once the file shows the change done (its ctime moved; fanotify reports nothing for
//!   truncate(2)). Reading a fanotify event opens the file, which would break the guard's own lease: leases
//!   are paused while events are read and answered. Without fanotify the lease is all there is, re-armed by
//!   polling as soon as the opener closed.
//!
//! - **changes to the file itself** ([`fanotify`]'s changes group, FAN_ATTRIB / FAN_MOVE_SELF): `rm` of the file,
//!   or `mv` of another over it, drops its last name (its link count, an attribute, reaches 0) and the guest
//!   would go on writing to an inode no name reaches: logged when it happens, and the VMM copies the data to a
//!   recovery file at stop. A rename of the file is logged with its new name. `chattr +i` / `+a` (an ioctl
//!   through a read-only open) raises no event at all, so the flags are read when a foreign descriptor closes
//!   and on every attribute change; an immutable or append-only flag is cleared at once (a page fault on an
//!   immutable file fails, so would the VMM's own hole punches on an append-only one), which needs
//!   CAP_LINUX_IMMUTABLE; without it the event says so and names who set it.
//! - **truncate(2) by path** ([`fanotify`]'s pre-content group, Linux 6.14+): the file is marked for
//!   FAN_PRE_ACCESS, which the kernel raises before a truncate by path (before it breaks any lease) and holds
//!   for the guard's answer: the truncate is refused, held or allowed by the policy like an open for writing,
//!   with the truncating process named, whether or not a foreign process holds the file open (an open breaks
//!   the kernel lease, which would otherwise miss it). Reads and writes through descriptors opened after the
//!   mark raise it too and pass silently; the VMM's own descriptors, opened before, never do.
//!
//! Every event is recorded in introspection and handed to the caller's report (one log line each).
//!
//! Threading: the lease-break signal (F_SETSIG, a realtime signal so breaks of several files queue instead of
//! merging) is blocked and read through a signalfd by the guard's thread ([`HostGuard::set_thread`], then
//! [`HostGuard::run`]). The kernel resets the signal's owner to the process while setting a lease, so the guard
//! re-targets it right after; for the few instructions in between a break would be process-directed, which is
//! why the VMM blocks the guard signal in all threads at start-up ([`HostGuard::new`] on the first thread).

mod fanotify;
pub(crate) mod file_flags;
mod kernel_lease;
mod opener;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::breaks::BreakPolicy;
use crate::error::{MapperError, Result};
use crate::host::FileKey;
use crate::ids::{OwnerId, RegionId};
use crate::layout_change::{ChangeRequest, LayoutChange};
use crate::Mapper;

use fanotify::{handle_of, FanEvent, Fanotify, Group, CHANGES, FAN_PRE_ACCESS};
pub use file_flags::{FS_IOC_GETFLAGS, FS_IOC_SETFLAGS};
use kernel_lease::{
    block_signal, change_stamp, fcntl, gettid, FOwnerEx, F_OWNER_TID, F_SETOWN_EX, F_SETSIG,
};
pub use kernel_lease::{guard_signal, lease_break_time};
pub use opener::OpenMode;

/// What the guard does with a foreign open for writing of a region's file (`--pmem ...,guard=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GuardPolicy {
    /// Allow it and log it.
    Log,
    /// Hold it while a whole-file break runs; then allow it, or refuse it if pins or exclusive leases exist.
    Hold,
    /// Refuse it (the opener gets EPERM).
    #[default]
    Deny,
}

impl GuardPolicy {
    /// Every policy, for parsers that look one up by its name.
    pub const ALL: [GuardPolicy; 3] = [GuardPolicy::Deny, GuardPolicy::Hold, GuardPolicy::Log];

    /// `deny`, `hold` or `log`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardPolicy::Log => "log",
            GuardPolicy::Hold => "hold",
            GuardPolicy::Deny => "deny",
        }
    }
}

impl std::fmt::Display for GuardPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a foreign access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// Let through at once.
    Allowed,
    /// Refused: the opener got EPERM.
    Denied,
    /// Held while a whole-file break ran, then let through.
    HeldAllowed,
    /// Held while a whole-file break was tried; a pin or exclusive lease refused it, and so was the open.
    HeldDenied,
    /// Seen only by the kernel lease (truncate by path, or no fanotify): delayed while a whole-file break ran,
    /// then let through (the lease cannot refuse).
    Delayed,
    /// An immutable or append-only flag was set and the guard cleared it again.
    Undone,
    /// An immutable or append-only flag was set and could not be cleared (`refused_by` says why): the guest's
    /// next write fault on the file fails.
    NotUndone,
    /// Logged, nothing to answer: an unlink (the data is copied to a recovery file at stop) or a rename.
    Noted,
}

impl GuardOutcome {
    /// `allowed`, `denied`, `held+allowed`, `held+denied` or `delayed`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardOutcome::Allowed => "allowed",
            GuardOutcome::Denied => "denied",
            GuardOutcome::HeldAllowed => "held+allowed",
            GuardOutcome::HeldDenied => "held+denied",
            GuardOutcome::Delayed => "delayed",
            GuardOutcome::Undone => "undone",
            GuardOutcome::NotUndone => "not-undone",
            GuardOutcome::Noted => "noted",
        }
    }
}

impl std::fmt::Display for GuardOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a foreign process did to a guarded file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Opened it (the mode says how), or something the kernel lease alone saw.
    #[default]
    Open,
    /// truncate(2) by path, seen before it happened (the pre-content group).
    Truncate,
    /// Removed its last name: `rm`, or `mv` of another file over it.
    Unlink,
    /// Renamed it.
    Rename,
    /// Set the immutable or append-only flag (`chattr +i`, `chattr +a`).
    Flags,
}

impl Access {
    /// `open`, `truncate`, `unlink`, `rename` or `flags`.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Truncate => "truncate",
            Access::Unlink => "unlink",
            Access::Rename => "rename",
            Access::Flags => "flags",
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which mechanism saw the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenBy {
    /// A fanotify permission event: an open, seen before it completed.
    Fanotify,
    /// A kernel lease break with no open seen before it: truncate by path, or an open fanotify cannot see.
    KernelLease,
}

/// What the host guard saw and did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardEvent {
    /// The region whose file was accessed (the first one armed on that file).
    pub region: RegionId,
    /// Every region armed on that file.
    pub regions: Vec<RegionId>,
    /// When.
    pub at: SystemTime,
    /// Which mechanism saw it.
    pub seen_by: SeenBy,
    /// The opening process, when it could be read.
    pub pid: Option<u32>,
    /// Its command line (bounded), or `?`.
    pub command: String,
    /// How it opened the file (`Unknown` for a kernel-lease event and every access but an open).
    pub mode: OpenMode,
    /// What it did.
    pub access: Access,
    /// For a rename, the file's new path; for a flag change, which flags (`immutable`, `append-only`).
    pub detail: Option<String>,
    /// The file's policy (the strictest of its regions').
    pub policy: GuardPolicy,
    /// What became of the access.
    pub outcome: GuardOutcome,
    /// Why the whole-file break failed: the errno name and message (ETXTBSY names the pin or lease holder).
    pub refused_by: Option<String>,
    /// Shared holders that got a whole-file break notice.
    pub notified: Vec<OwnerId>,
    /// Holders whose leases were revoked at the deadline.
    pub revoked: Vec<OwnerId>,
    /// From the event to the answer.
    pub answered_in: Duration,
}

/// How many events introspection keeps (a process that opens a guarded file in a loop must not grow the VMM
/// without bound); [`GuardCounts`] count them all.
pub const GUARD_HISTORY: usize = 1024;

/// Host guard events on one region, since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounts {
    /// Every foreign access seen.
    pub events: u64,
    /// Opens refused (`denied`, `held+denied`).
    pub denied: u64,
}

/// A file's change stamp: ctime (s, ns) and size ([`kernel_lease::change_stamp`]).
type Stamp = (i64, i64, u64);

/// The regions armed on one file, with their policies.
type Regions = Vec<(RegionId, GuardPolicy)>;

struct Guarded {
    /// Regions armed on this file, in order; events are recorded under the first.
    regions: Regions,
    key: FileKey,
    file: Arc<File>,
    /// The kernel lease is held.
    armed: bool,
    /// Opens fanotify let through (the VMM's own included) whose close has not been seen.
    opens: u32,
    /// The file's fsid and handle, as the changes group names it.
    handle: Option<Vec<u8>>,
    /// Its last name is gone (logged once).
    unlinked: bool,
    /// When a truncate by path was let through (the pre-content group), and the file's change stamp before it:
    /// the lease break it causes next is that same access, not a second one, and the lease is taken again once
    /// the change shows.
    truncate_allowed: Option<(Instant, Option<Stamp>)>,
    /// The last foreign process let in: who set a flag, when the closer is gone before it can be read.
    last_foreign: Option<(Option<u32>, String)>,
}

impl Guarded {
    fn policy(&self) -> GuardPolicy {
        self.regions
            .iter()
            .map(|(_, p)| *p)
            .max()
            .unwrap_or_default()
    }
}

/// Watches backing files for foreign opens (see the module docs).
pub struct HostGuard {
    mapper: Mapper,
    sfd: OwnedFd,
    signo: i32,
    tid: AtomicI32,
    fan: Option<Fanotify>,
    fan_error: Option<io::Error>,
    /// Attribute changes, renames, deletes (see [`fanotify::Group::Changes`]); with `fan` only.
    changes: Option<Fanotify>,
    /// FAN_PRE_ACCESS for truncate by path (see [`fanotify::Group::PreContent`]); with `fan`, on Linux 6.14+.
    pre: Option<Fanotify>,
    files: Mutex<HashMap<RawFd, Guarded>>,
    /// Held while fanotify events are read and answered (leases paused) and while a file is armed, so a lease
    /// taken by `arm` is never held while the guard reads an event of that file (which would wait on it).
    serving: Mutex<()>,
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
            .field("fanotify", &self.fan.is_some())
            .finish_non_exhaustive()
    }
}

/// Who else has `file` open, for a log line: `pid 42 (sleep) for writing, pid 43 (cat)`, or `?`.
pub(crate) fn openers_named(file: &File) -> String {
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let v: Vec<String> = crate::host::openers_of(&path)
        .into_iter()
        .map(|(h, w)| {
            if w {
                format!("{h} for writing")
            } else {
                h.to_string()
            }
        })
        .collect();
    if v.is_empty() {
        "?".to_owned()
    } else {
        v.join(", ")
    }
}

/// How long the fallback (kernel lease only) waits between re-arm attempts once the fast ones are over.
const LEASE_ONLY_REARM: Duration = Duration::from_secs(1);

impl HostGuard {
    /// Blocks `signo` in the calling thread, opens a signalfd for it, and a fanotify group where the process
    /// may (without CAP_SYS_ADMIN: the kernel lease alone; [`HostGuard::fanotify_unavailable`] says why).
    pub fn new(mapper: Mapper, signo: i32) -> Result<Self> {
        Self::build(mapper, signo, true)
    }

    /// As [`HostGuard::new`] without fanotify: the kernel lease alone.
    pub fn lease_only(mapper: Mapper, signo: i32) -> Result<Self> {
        Self::build(mapper, signo, false)
    }

    fn build(mapper: Mapper, signo: i32, use_fanotify: bool) -> Result<Self> {
        let set = block_signal(signo)?;
        // SAFETY: `set` was initialised above.
        let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if sfd < 0 {
            return Err(MapperError::last_os("signalfd"));
        }
        // SAFETY: signalfd returned a fresh fd that we own.
        let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
        let (fan, fan_error) = if use_fanotify {
            match Fanotify::new(Group::Permissions) {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (
                None,
                Some(io::Error::other("fanotify not asked for (lease only)")),
            )
        };
        let deadline = lease_break_time()
            .saturating_sub(Duration::from_secs(1))
            .min(Duration::from_secs(10));
        let extra = |g: Group| {
            let f = fan.as_ref().map(|_| Fanotify::new(g));
            if let Some(Err(e)) = &f {
                tracing::warn!(group = ?g, error = %e, "host guard: a fanotify group is not available; what it sees is not guarded");
            }
            f.and_then(io::Result::ok)
        };
        let (changes, pre) = (extra(Group::Changes), extra(Group::PreContent));
        Ok(HostGuard {
            mapper,
            sfd,
            signo,
            tid: AtomicI32::new(gettid()),
            fan,
            fan_error,
            changes,
            pre,
            files: Mutex::new(HashMap::new()),
            serving: Mutex::new(()),
            deadline,
            policy: BreakPolicy::Revoke,
        })
    }

    /// `None` when fanotify permission events are in use; otherwise why not (fanotify_init's error).
    pub fn fanotify_unavailable(&self) -> Option<&io::Error> {
        self.fan_error.as_ref()
    }

    /// The signalfd, readable when a kernel lease is being broken.
    pub fn fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Guarded>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the calling thread the guard's: blocks the signal here and sends every lease break to it. Call
    /// it first on the thread that will [`run`](HostGuard::run).
    pub fn set_thread(&self) -> Result<()> {
        block_signal(self.signo)?;
        let tid = gettid();
        self.tid.store(tid, Ordering::SeqCst);
        for (fd, g) in self.files().iter() {
            if g.armed {
                self.set_owner(*fd)?;
            }
        }
        Ok(())
    }

    fn set_owner(&self, fd: RawFd) -> Result<()> {
        let own = FOwnerEx {
            type_: F_OWNER_TID,
            pid: self.tid.load(Ordering::SeqCst),
        };
        // SAFETY: F_SETOWN_EX reads a struct f_owner_ex.
        if unsafe { libc::fcntl(fd, F_SETOWN_EX, &own) } < 0 {
            return Err(MapperError::last_os("F_SETOWN_EX"));
        }
        Ok(())
    }

    /// Guards the region's backing file under `policy`: a fanotify mark (once per file) and the kernel write
    /// lease. The lease needs the VMM to be the file's only opener (EAGAIN otherwise): without fanotify that
    /// is an error (the file cannot be guarded); with it, a warning (truncate by path is not seen).
    pub fn arm(&self, region: RegionId, policy: GuardPolicy) -> Result<()> {
        let (file, key, name) = {
            let st = self.mapper.lock();
            let reg = st.region(region)?;
            (reg.desc.file.clone(), reg.key, reg.desc.name.clone())
        };
        let _serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = self.files().values_mut().find(|g| g.key == key) {
            g.regions.push((region, policy));
            tracing::info!(id = %name, %region, %policy, "host guard armed (file already guarded)");
            return Ok(());
        }
        if let Some(fan) = &self.fan {
            fan.mark(file.as_raw_fd(), fanotify::WATCH, false)?;
        }
        // Marked after the VMM's own opens of the file: those never raise FAN_PRE_ACCESS (the kernel decides at
        // open whether a descriptor reports pre-content events).
        // Each is best effort: a file system may not offer pre-content events (they need the file system's
        // support: ext4, XFS, btrfs, not tmpfs) or file handles; what it lacks is said, the rest guards.
        let pre = self
            .pre
            .as_ref()
            .map(|pre| pre.mark(file.as_raw_fd(), FAN_PRE_ACCESS, false));
        if let Some(Err(e)) = &pre {
            tracing::warn!(id = %name, %region, error = %e,
                "host guard: no pre-content events on this file system; a truncate by path is only delayed by the kernel lease, without its pid");
        }
        let handle = self.changes.as_ref().and_then(|changes| {
            let marked = changes
                .mark(file.as_raw_fd(), CHANGES, false)
                .and_then(|()| handle_of(file.as_raw_fd()).map_err(|e| MapperError::io("name_to_handle_at", e)));
            marked
                .map_err(|e| tracing::warn!(id = %name, %region, error = %e,
                    "host guard: attribute changes of this file are not seen (chattr is still found at a foreign close); an unlink is found at stop only"))
                .ok()
        });
        let changes_seen = handle.is_some();
        let leased = match self.take_lease(&file) {
            Ok(()) => true,
            Err(e) if self.fan.is_some() => {
                let by = openers_named(&file);
                tracing::warn!(id = %name, %region, error = %e,
                    "host guard: no kernel lease on the backing file (it is open elsewhere: {by}); opens are guarded, and a truncate by path is seen only while the guard knows of a foreign open");
                false
            }
            Err(e) => return Err(e),
        };
        self.files().insert(
            file.as_raw_fd(),
            Guarded {
                regions: vec![(region, policy)],
                key,
                file,
                armed: leased,
                opens: 0,
                handle,
                unlinked: false,
                truncate_allowed: None,
                last_foreign: None,
            },
        );
        tracing::info!(id = %name, %region, %policy, fanotify = self.fan.is_some(), changes = changes_seen,
            truncate_by_path = matches!(pre, Some(Ok(()))), kernel_lease = leased, "host guard armed");
        Ok(())
    }

    /// Stops guarding `region` (it is leaving the VM). The last region of a file gives up the file: its
    /// fanotify mark and kernel lease are removed and the guard's descriptor is closed, so the file's lock can
    /// be released by whoever opened it.
    pub fn disarm(&self, region: RegionId) {
        let _serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        let mut files = self.files();
        let Some(fd) = files
            .iter_mut()
            .find(|(_, g)| g.regions.iter().any(|(r, _)| *r == region))
            .map(|(fd, g)| {
                g.regions.retain(|(r, _)| *r != region);
                (*fd, g.regions.is_empty())
            })
        else {
            return;
        };
        let (fd, last) = fd;
        if !last {
            return;
        }
        if let Some(g) = files.remove(&fd) {
            if let Some(fan) = &self.fan {
                if let Err(e) = fan.mark(fd, fanotify::WATCH, true) {
                    tracing::debug!(%region, error = %e, "host guard: removing the fanotify mark");
                }
            }
            if g.armed {
                // SAFETY: F_SETLEASE with F_UNLCK on a descriptor this guard owns.
                let _ = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
            }
            tracing::info!(%region, "host guard disarmed");
        }
    }

    fn take_lease(&self, file: &File) -> Result<()> {
        let fd = file.as_raw_fd();
        fcntl(fd, F_SETSIG, self.signo as libc::c_long)
            .map_err(|e| MapperError::io("F_SETSIG", e))?;
        fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK as libc::c_long)
            .map_err(|e| MapperError::io("F_SETLEASE", e))?;
        // Setting a lease made the process the signal's owner; send it to the guard's (blocking) thread.
        self.set_owner(fd)
    }

    /// Tries to take the lease again on files whose lease was given up (succeeds once the foreign opener
    /// closed). Returns how many files are armed afterwards. The fallback's re-arm; with fanotify, closes do it.
    pub fn rearm(&self) -> usize {
        let mut files = self.files();
        let mut armed = 0;
        for g in files.values_mut() {
            if !g.armed && self.take_lease(&g.file).is_ok() {
                g.armed = true;
                tracing::info!(region = %g.regions[0].0, "host guard re-armed");
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

    /// The whole-file break for a foreign access of `region`'s file: holders told and waited for (at most the
    /// capped deadline); pins and exclusive leases refuse it.
    fn whole_file_break(
        &self,
        region: RegionId,
    ) -> std::result::Result<(Vec<OwnerId>, Vec<OwnerId>), String> {
        let deadline = self
            .deadline
            .min(lease_break_time().saturating_sub(Duration::from_secs(1)));
        let req = ChangeRequest {
            deadline,
            policy: self.policy,
            ..ChangeRequest::new(region, LayoutChange::HostOpen)
        };
        self.mapper
            .change(req)
            .map(|r| (r.notified, r.revoked))
            .map_err(|e| format!("{}: {e}", e.errno_name()))
    }

    fn record(&self, ev: GuardEvent) -> GuardEvent {
        let mut st = self.mapper.lock();
        let denied = matches!(ev.outcome, GuardOutcome::Denied | GuardOutcome::HeldDenied);
        for r in &ev.regions {
            let c = st.guard_counts.entry(*r).or_default();
            c.events += 1;
            c.denied += u64::from(denied);
        }
        if st.guard_events.len() >= GUARD_HISTORY {
            st.guard_events.pop_front();
        }
        st.guard_events.push_back(ev.clone());
        ev
    }

    fn give_up_lease(&self, fd: RawFd) {
        if let Err(e) = fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK as libc::c_long) {
            tracing::error!(error = %e, "giving up the host lease failed");
        }
        if let Some(g) = self.files().get_mut(&fd) {
            g.armed = false;
        }
    }

    /// Handles every pending lease break. A break that follows an open fanotify let through is that open: the
    /// lease is given up, no event. Any other is a foreign access fanotify did not see (truncate by path, or
    /// no fanotify at all): a whole-file break in the mapper, then the lease is given up so the access
    /// proceeds. Blocks while holders are asked (at most the capped deadline).
    pub fn service(&self) -> Vec<GuardEvent> {
        let mut out = Vec::new();
        for fd in self.breaking_files() {
            let t0 = Instant::now();
            let Some((regions, policy, opens)) = self
                .files()
                .get(&fd)
                .filter(|g| g.armed)
                .map(|g| (g.regions.clone(), g.policy(), g.opens))
            else {
                continue;
            };
            let region = regions[0].0;
            if self.fan.is_some() && opens > 0 {
                self.give_up_lease(fd);
                tracing::debug!(%region, opens, "kernel lease given up for an open the guard already answered");
                continue;
            }
            let truncate = self
                .files()
                .get_mut(&fd)
                .and_then(|g| g.truncate_allowed.take())
                .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
            if truncate {
                let before = self.files().get(&fd).and_then(|g| change_stamp(&g.file));
                self.give_up_lease(fd);
                self.rearm_after_change(fd, before);
                tracing::debug!(%region, "kernel lease given up for a truncate the guard already answered");
                continue;
            }
            let res = self.whole_file_break(region);
            let before = self.files().get(&fd).and_then(|g| change_stamp(&g.file));
            self.give_up_lease(fd);
            if self.fan.is_some() {
                self.rearm_after_change(fd, before);
            }
            let (notified, revoked, refused_by) = match res {
                Ok((n, r)) => (n, r, None),
                Err(why) => (Vec::new(), Vec::new(), Some(why)),
            };
            out.push(self.record(GuardEvent {
                region,
                regions: regions.iter().map(|(r, _)| *r).collect(),
                at: SystemTime::now(),
                seen_by: SeenBy::KernelLease,
                pid: None,
                command: "?".to_owned(),
                mode: OpenMode::Unknown,
                access: Access::Open,
                detail: None,
                policy,
                outcome: GuardOutcome::Delayed,
                refused_by,
                notified,
                revoked,
                answered_in: t0.elapsed(),
            }));
        }
        out
    }

    /// After a bare lease break (truncate by path) the accessor re-checks for leases once it is woken: a lease
    /// taken before that would be broken again by the same access. fanotify reports nothing for truncate(2),
    /// so the end of the change is read from the file itself (its ctime and size move), for at most a second;
    /// after an access that changed nothing the lease is taken again after the next fanotify event.
    fn rearm_after_change(&self, fd: RawFd, before: Option<(i64, i64, u64)>) {
        const TRIES: u32 = 200;
        const EVERY: Duration = Duration::from_millis(5);
        for _ in 0..TRIES {
            let mut files = self.files();
            let Some(g) = files.get_mut(&fd) else {
                return;
            };
            if change_stamp(&g.file) != before {
                if g.armed || g.opens > 0 {
                    return;
                }
                // The truncating process lets go of the file a moment after the change shows (EAGAIN until then).
                let mut res = self.take_lease(&g.file);
                for _ in 0..TRIES {
                    if !matches!(&res, Err(e) if e.errno() == libc::EAGAIN) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    res = self.take_lease(&g.file);
                }
                if res.is_ok() {
                    g.armed = true;
                    tracing::info!(region = %g.regions[0].0, "host guard re-armed");
                }
                return;
            }
            drop(files);
            std::thread::sleep(EVERY);
        }
    }

    /// Handles every queued fanotify event (nothing without fanotify). The kernel opens a descriptor of the file
    /// for each event as the guard reads it, and that open would break the guard's own write lease and wait for
    /// it: so pending lease breaks are answered first, then the leases are paused while the events are read and
    /// answered, and taken again once every event descriptor is closed (on files with no open left).
    pub fn service_fanotify(&self) -> Vec<GuardEvent> {
        let Some(fan) = &self.fan else {
            return Vec::new();
        };
        let _serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = self.service();
        let paused: Vec<RawFd> = {
            let mut files = self.files();
            files
                .iter_mut()
                .filter(|(_, g)| g.armed)
                .filter_map(|(fd, g)| {
                    fcntl(*fd, libc::F_SETLEASE, libc::F_UNLCK as libc::c_long).ok()?;
                    g.armed = false;
                    Some(*fd)
                })
                .collect()
        };
        let mut closed = Vec::new();
        for ev in fan.read() {
            if ev.is_open_perm() {
                out.extend(self.on_open(fan, ev));
            } else if ev.is_close() {
                let (fd, flags) = self.on_close(ev);
                closed.extend(fd);
                out.extend(flags);
            } else if ev.fd.is_none() {
                tracing::error!(
                    "fanotify queue overflow: closes may have been missed; the kernel lease is re-armed at the next close"
                );
            }
        }
        if let Some(pre) = &self.pre {
            for ev in pre.read() {
                out.extend(self.on_pre_access(pre, ev));
            }
        }
        if let Some(changes) = &self.changes {
            for ev in changes.read() {
                out.extend(self.on_change(ev));
            }
        }
        self.resume_leases(&paused, &closed);
        // A truncate let through while the leases were paused never breaks one: take the lease again once it
        // is done (while it runs, the kernel refuses the lease).
        let truncated: Vec<(RawFd, Option<Stamp>)> = self
            .files()
            .iter_mut()
            .filter(|(_, g)| !g.armed && g.opens == 0)
            .filter_map(|(fd, g)| g.truncate_allowed.take().map(|(_, before)| (*fd, before)))
            .collect();
        for (fd, before) in truncated {
            self.rearm_after_change(fd, before);
        }
        out
    }

    /// Takes the kernel lease again on every file with no open left. The kernel reports a close before the
    /// closer has let go of the file (its open count drops a moment later), so on a file just closed a refusal
    /// (EAGAIN) is retried for a short while.
    fn resume_leases(&self, paused: &[RawFd], closed: &[RawFd]) {
        const TRIES: u32 = 200;
        const EVERY: Duration = Duration::from_millis(1);
        let mut files = self.files();
        for (fd, g) in files.iter_mut() {
            if g.armed || g.opens > 0 {
                continue;
            }
            let mut res = self.take_lease(&g.file);
            if closed.contains(fd) {
                for _ in 0..TRIES {
                    if !matches!(&res, Err(e) if e.errno() == libc::EAGAIN) {
                        break;
                    }
                    std::thread::sleep(EVERY);
                    res = self.take_lease(&g.file);
                }
            }
            match res {
                Ok(()) => {
                    g.armed = true;
                    // Debug: a file read in a loop would write one of these per read.
                    if !paused.contains(fd) {
                        tracing::debug!(region = %g.regions[0].0, "host guard re-armed");
                    }
                }
                Err(e) => {
                    tracing::debug!(region = %g.regions[0].0, error = %e, "kernel lease not re-armed yet")
                }
            }
        }
    }

    /// The guarded file an event's descriptor refers to: (lease fd, regions, policy).
    fn lookup(&self, file: &File) -> Option<(RawFd, Regions, GuardPolicy)> {
        let key = FileKey::of(file).ok()?;
        self.files()
            .iter()
            .find(|(_, g)| g.key == key)
            .map(|(fd, g)| (*fd, g.regions.clone(), g.policy()))
    }

    fn on_open(&self, fan: &Fanotify, ev: FanEvent) -> Option<GuardEvent> {
        let t0 = Instant::now();
        let file = File::from(ev.fd?);
        let Some((lease_fd, regions, policy)) = self.lookup(&file) else {
            fan.respond(file.as_raw_fd(), true);
            return None;
        };
        let count_open = |g: &mut Guarded| g.opens = g.opens.saturating_add(1);
        if opener::is_own_thread(ev.tid) {
            self.files().get_mut(&lease_fd).map(count_open);
            fan.respond(file.as_raw_fd(), true);
            return None;
        }
        let who = opener::read_opener(ev.tid);
        let region = regions[0].0;
        let mut notified = Vec::new();
        let mut revoked = Vec::new();
        let mut refused_by = None;
        let outcome = match (who.mode, policy) {
            (OpenMode::Read, _) | (_, GuardPolicy::Log) => GuardOutcome::Allowed,
            (_, GuardPolicy::Deny) => GuardOutcome::Denied,
            (_, GuardPolicy::Hold) => match self.whole_file_break(region) {
                Ok((n, r)) => {
                    (notified, revoked) = (n, r);
                    GuardOutcome::HeldAllowed
                }
                Err(why) => {
                    refused_by = Some(why);
                    GuardOutcome::HeldDenied
                }
            },
        };
        let allow = matches!(outcome, GuardOutcome::Allowed | GuardOutcome::HeldAllowed);
        if allow {
            // Counted before the answer: the lease break this open causes finds it.
            let mut files = self.files();
            if let Some(g) = files.get_mut(&lease_fd) {
                count_open(g);
                g.last_foreign = Some((who.pid, who.command.clone()));
            }
        }
        fan.respond(file.as_raw_fd(), allow);
        drop(file);
        Some(self.record(GuardEvent {
            region,
            regions: regions.iter().map(|(r, _)| *r).collect(),
            at: SystemTime::now(),
            seen_by: SeenBy::Fanotify,
            pid: who.pid,
            command: who.command,
            mode: who.mode,
            access: Access::Open,
            detail: None,
            policy,
            outcome,
            refused_by,
            notified,
            revoked,
            answered_in: t0.elapsed(),
        }))
    }

    /// A close ends one counted open (the lease is taken again once none is left, see
    /// [`HostGuard::service_fanotify`]). A foreign close is also when a flag set through that descriptor
    /// (`chattr`) is found. Returns the file's lease descriptor, and the flag event if any.
    fn on_close(&self, ev: FanEvent) -> (Option<RawFd>, Option<GuardEvent>) {
        let Some(file) = ev.fd.map(File::from) else {
            return (None, None);
        };
        let Some((lease_fd, _, _)) = self.lookup(&file) else {
            return (None, None);
        };
        drop(file);
        {
            let mut files = self.files();
            let Some(g) = files.get_mut(&lease_fd) else {
                return (None, None);
            };
            g.opens = g.opens.saturating_sub(1);
        }
        let flags = if opener::is_own_thread(ev.tid) {
            None
        } else {
            self.check_flags(lease_fd, ev.tid)
        };
        (Some(lease_fd), flags)
    }

    /// Who a change event names: the acting thread's process; when it is gone already, the last foreign process
    /// let in if that was the same, else the thread's id (its process's, for a single-threaded tool such as `rm`).
    fn actor(&self, fd: RawFd, tid: u32) -> (Option<u32>, String) {
        let who = opener::read_opener(tid);
        let last = self.files().get(&fd).and_then(|g| g.last_foreign.clone());
        match (who.pid, last) {
            // The command line read at its open: an ended process not yet reaped has only its name left.
            (Some(pid), Some((Some(seen), command))) if pid == seen => (Some(pid), command),
            (Some(pid), _) if who.command == "?" => {
                (Some(pid), "? (ended before it could be read)".to_owned())
            }
            (Some(pid), _) => (Some(pid), who.command),
            (None, Some((Some(seen), command))) if seen == tid => (Some(seen), command),
            (None, _) if tid > 0 => (Some(tid), "? (ended before it could be read)".to_owned()),
            (None, _) => (None, "?".to_owned()),
        }
    }

    /// Reads the file's flags and clears an immutable or append-only flag (see the module docs).
    fn check_flags(&self, fd: RawFd, tid: u32) -> Option<GuardEvent> {
        let t0 = Instant::now();
        let flags = file_flags::get(fd).ok()?;
        let bad = flags & (file_flags::IMMUTABLE | file_flags::APPEND);
        if bad == 0 {
            return None;
        }
        let undo = file_flags::set(fd, flags & !bad);
        let (pid, command) = self.actor(fd, tid);
        let (regions, policy) = self
            .files()
            .get(&fd)
            .map(|g| (g.regions.clone(), g.policy()))?;
        Some(self.record(GuardEvent {
            region: regions[0].0,
            regions: regions.iter().map(|(r, _)| *r).collect(),
            at: SystemTime::now(),
            seen_by: SeenBy::Fanotify,
            pid,
            command,
            mode: OpenMode::Unknown,
            access: Access::Flags,
            detail: Some(file_flags::names(bad)),
            policy,
            outcome: if undo.is_ok() {
                GuardOutcome::Undone
            } else {
                GuardOutcome::NotUndone
            },
            refused_by: undo.err().map(|e| {
                format!(
                    "{}: {e}",
                    crate::error::errno_name(e.raw_os_error().unwrap_or(0))
                )
            }),
            notified: Vec::new(),
            revoked: Vec::new(),
            answered_in: t0.elapsed(),
        }))
    }

    /// An event of the changes group: the file lost its last name, was renamed, or its attributes changed
    /// (which is also when its flags are read).
    fn on_change(&self, ev: FanEvent) -> Vec<GuardEvent> {
        let t0 = Instant::now();
        let Some(handle) = ev.handle.as_ref() else {
            if ev.mask & libc::FAN_Q_OVERFLOW != 0 {
                tracing::error!(
                    "fanotify changes queue overflow: an unlink or rename may have been missed"
                );
            }
            return Vec::new();
        };
        let found = self
            .files()
            .iter()
            .find(|(_, g)| g.handle.as_ref() == Some(handle))
            .map(|(fd, g)| {
                (
                    *fd,
                    g.regions.clone(),
                    g.policy(),
                    g.unlinked,
                    g.file.clone(),
                )
            });
        let Some((fd, regions, policy, was_unlinked, file)) = found else {
            return Vec::new();
        };
        let own = opener::is_own_thread(ev.tid);
        let mut out = Vec::new();
        let mut event = |access, detail, outcome| {
            let (pid, command) = self.actor(fd, ev.tid);
            out.push(self.record(GuardEvent {
                region: regions[0].0,
                regions: regions.iter().map(|(r, _)| *r).collect(),
                at: SystemTime::now(),
                seen_by: SeenBy::Fanotify,
                pid,
                command,
                mode: OpenMode::Unknown,
                access,
                detail,
                policy,
                outcome,
                refused_by: None,
                notified: Vec::new(),
                revoked: Vec::new(),
                answered_in: t0.elapsed(),
            }));
        };
        if ev.mask & libc::FAN_MOVE_SELF != 0 && !own {
            let now = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_or_else(|_| "?".to_owned(), |p| p.display().to_string());
            event(Access::Rename, Some(now), GuardOutcome::Noted);
        }
        if ev.mask & libc::FAN_ATTRIB != 0 {
            use std::os::unix::fs::MetadataExt;
            let nameless = file.metadata().is_ok_and(|m| m.nlink() == 0);
            if nameless && !was_unlinked {
                if let Some(g) = self.files().get_mut(&fd) {
                    g.unlinked = true;
                }
                event(Access::Unlink, None, GuardOutcome::Noted);
            }
        }
        if ev.mask & libc::FAN_ATTRIB != 0 && !own {
            out.extend(self.check_flags(fd, ev.tid));
        }
        out
    }

    /// A FAN_PRE_ACCESS on a file a foreign process holds open: a truncate by path is answered by the policy
    /// as an open for writing would be; every other access (a read or write through a descriptor the guard
    /// already answered, the VMM's own) passes silently.
    fn on_pre_access(&self, pre: &Fanotify, ev: FanEvent) -> Option<GuardEvent> {
        let t0 = Instant::now();
        let file = File::from(ev.fd?);
        let Some((lease_fd, regions, policy)) = self.lookup(&file) else {
            pre.respond(file.as_raw_fd(), true);
            return None;
        };
        if opener::is_own_thread(ev.tid) || opener::syscall_of(ev.tid) != Some(opener::SYS_TRUNCATE)
        {
            pre.respond(file.as_raw_fd(), true);
            return None;
        }
        let who = opener::read_opener(ev.tid);
        let region = regions[0].0;
        let (mut notified, mut revoked, mut refused_by) = (Vec::new(), Vec::new(), None);
        let outcome = match policy {
            GuardPolicy::Deny => GuardOutcome::Denied,
            GuardPolicy::Hold | GuardPolicy::Log => match self.whole_file_break(region) {
                Ok((n, r)) => {
                    (notified, revoked) = (n, r);
                    GuardOutcome::HeldAllowed
                }
                Err(why) => {
                    refused_by = Some(why);
                    if policy == GuardPolicy::Hold {
                        GuardOutcome::HeldDenied
                    } else {
                        GuardOutcome::Delayed
                    }
                }
            },
        };
        let allow = !matches!(outcome, GuardOutcome::Denied | GuardOutcome::HeldDenied);
        if allow {
            if let Some(g) = self.files().get_mut(&lease_fd) {
                g.truncate_allowed = Some((Instant::now(), change_stamp(&g.file)));
            }
        }
        pre.respond(file.as_raw_fd(), allow);
        drop(file);
        Some(self.record(GuardEvent {
            region,
            regions: regions.iter().map(|(r, _)| *r).collect(),
            at: SystemTime::now(),
            seen_by: SeenBy::Fanotify,
            pid: who.pid,
            command: who.command,
            mode: OpenMode::Unknown,
            access: Access::Truncate,
            detail: None,
            policy,
            outcome,
            refused_by,
            notified,
            revoked,
            answered_in: t0.elapsed(),
        }))
    }

    /// The guard's loop, on the thread that called [`HostGuard::set_thread`]: waits for fanotify events and
    /// lease breaks, answers them, hands each event to `report`. Returns when `stop` becomes readable.
    pub fn run(&self, stop: RawFd, mut report: impl FnMut(&GuardEvent)) {
        let fan_fd = self.fan.as_ref().map_or(-1, Fanotify::fd);
        let changes_fd = self.changes.as_ref().map_or(-1, Fanotify::fd);
        let pre_fd = self.pre.as_ref().map_or(-1, Fanotify::fd);
        let timeout = if self.fan.is_some() {
            -1
        } else {
            LEASE_ONLY_REARM.as_millis() as i32
        };
        loop {
            let mut fds = [stop, fan_fd, self.fd(), changes_fd, pre_fd].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: five valid pollfds (a negative fd is ignored by poll).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "host guard: poll failed; the guard stops");
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 || fds[3].revents != 0 || fds[4].revents != 0 {
                self.service_fanotify().iter().for_each(&mut report);
            }
            if fds[2].revents != 0 || self.fan.is_none() {
                let armed = self.files().values().filter(|g| g.armed).count();
                let events = self.service();
                events.iter().for_each(&mut report);
                if self.fan.is_none() {
                    self.rearm_soon(armed);
                }
            }
        }
    }

    /// Without fanotify nothing says when a foreign opener closed: most are short (a backup reading a block, a
    /// tool checking a header), so try every few milliseconds for a while before leaving it to the loop's
    /// one-second wake-up.
    fn rearm_soon(&self, armed_before: usize) {
        const TRIES: u32 = 100;
        const EVERY: Duration = Duration::from_millis(10);
        for _ in 0..TRIES {
            if self.rearm() >= armed_before {
                return;
            }
            std::thread::sleep(EVERY);
        }
    }
}

#[cfg(test)]
mod tests;
