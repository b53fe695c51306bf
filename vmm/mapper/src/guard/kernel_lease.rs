//! The kernel write lease's primitives (F_SETLEASE, F_SETSIG, F_SETOWN_EX, the blocked signal): the calls the
//! guard makes on a backing file to be told, through a signalfd, when someone opens or truncates it. The policy
//! that decides what a break means lives in the guard itself (`mod.rs`).

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::error::{MapperError, Result};

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
pub(super) const F_SETSIG: i32 = 10;
pub(super) const F_SETOWN_EX: i32 = 15;
pub(super) const F_OWNER_TID: i32 = 0;

#[repr(C)]
pub(super) struct FOwnerEx {
    pub type_: i32,
    pub pid: libc::pid_t,
}

pub(super) fn fcntl(fd: RawFd, cmd: i32, arg: libc::c_long) -> io::Result<i32> {
    // SAFETY: the lease fcntls used here take integer arguments.
    let r = unsafe { libc::fcntl(fd, cmd, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

pub(super) fn block_signal(signo: i32) -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer; signo is a signal number (checked by sigaddset).
    unsafe {
        libc::sigemptyset(&mut set);
        if libc::sigaddset(&mut set, signo) < 0 {
            return Err(MapperError::BadSignal(signo));
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(MapperError::last_os("pthread_sigmask"));
        }
    }
    Ok(set)
}

pub(super) fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// What moves when a file's size or attributes change: ctime (s, ns) and size.
pub(super) fn change_stamp(file: &File) -> Option<(i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    Some((m.ctime(), m.ctime_nsec(), m.size()))
}
