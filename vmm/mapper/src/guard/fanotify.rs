//! fanotify permission events on the backing files: a foreign open is seen before it completes and answered
//! with allow or deny (EPERM for the opener). Written over the libc crate's bindings, as the rest of the
//! mapper's kernel interfaces are (leases, fallocate, FIEMAP): a wrapper crate would add a dependency tree for
//! three calls and a fixed-layout record.
//!
//! The group reports the opening thread (FAN_REPORT_TID), so `/proc/TID/syscall` is that of the thread held
//! in the open. Every event carries a new descriptor of the file (made by the kernel without events of its
//! own); it is always closed, after the answer for a permission event.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{MapperError, Result};

/// What the kernel reports about one access.
#[derive(Debug)]
pub(crate) struct FanEvent {
    pub mask: u64,
    /// The thread that opened or closed (FAN_REPORT_TID); 0 if the kernel gave none.
    pub tid: u32,
    /// The file, or `None` for a queue overflow.
    pub fd: Option<OwnedFd>,
}

impl FanEvent {
    pub fn is_open_perm(&self) -> bool {
        self.mask & libc::FAN_OPEN_PERM != 0
    }
    pub fn is_close(&self) -> bool {
        self.mask & libc::FAN_CLOSE != 0
    }
}

/// A fanotify group of class FAN_CLASS_CONTENT.
#[derive(Debug)]
pub(crate) struct Fanotify {
    fd: OwnedFd,
}

/// What is watched on every guarded file: opens (held for an answer) and closes (the count of opens).
pub(crate) const WATCH: u64 = libc::FAN_OPEN_PERM | libc::FAN_CLOSE_WRITE | libc::FAN_CLOSE_NOWRITE;

/// Events read per read(2): the buffer is bounded, the rest stay queued for the next read.
const READ_BUF: usize = 4096;
const METADATA_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
/// FANOTIFY_METADATA_VERSION (uapi/linux/fanotify.h).
const METADATA_VERSION: u8 = 3;

impl Fanotify {
    /// A new group. EPERM without CAP_SYS_ADMIN: the caller falls back to the kernel lease alone.
    pub fn new() -> io::Result<Fanotify> {
        // SAFETY: fanotify_init takes flags only and returns a new descriptor or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT
                    | libc::FAN_CLOEXEC
                    | libc::FAN_REPORT_TID
                    | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Fanotify { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Adds (or with `remove`, takes away) `mask` on the inode of the open file `file`.
    pub fn mark(&self, file: RawFd, mask: u64, remove: bool) -> Result<()> {
        let op = if remove {
            libc::FAN_MARK_REMOVE
        } else {
            libc::FAN_MARK_ADD
        };
        // SAFETY: a null path marks the object `file` refers to; both descriptors are open.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd(),
                op | libc::FAN_MARK_INODE,
                mask,
                file,
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(MapperError::last_os("fanotify_mark"));
        }
        Ok(())
    }

    /// Every event queued now (the group is non-blocking), read in bounded chunks.
    pub fn read(&self) -> Vec<FanEvent> {
        let mut out = Vec::new();
        // u64 elements keep the records 8-byte aligned as the kernel writes them.
        let mut buf = [0u64; READ_BUF / 8];
        loop {
            // SAFETY: reads at most the buffer's size into it.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), READ_BUF) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            // SAFETY: the buffer is READ_BUF bytes of plain data.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), READ_BUF) };
            let mut off = 0;
            while off + METADATA_LEN <= n {
                // SAFETY: METADATA_LEN bytes at `off` are within what the kernel wrote; read unaligned.
                let m: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
                let len = m.event_len as usize;
                if m.vers != METADATA_VERSION || len < METADATA_LEN || off + len > n {
                    tracing::error!(
                        version = m.vers,
                        len,
                        "fanotify: malformed event record; dropping the rest of this read"
                    );
                    break;
                }
                let fd = (m.fd >= 0).then(|| {
                    // SAFETY: the kernel opened this descriptor for us; we own it from here.
                    unsafe { OwnedFd::from_raw_fd(m.fd) }
                });
                out.push(FanEvent {
                    mask: m.mask,
                    tid: m.pid.max(0) as u32,
                    fd,
                });
                off += len;
            }
        }
        out
    }

    /// Answers a permission event: allow, or deny (the opener gets EPERM).
    pub fn respond(&self, event_fd: RawFd, allow: bool) {
        let r = libc::fanotify_response {
            fd: event_fd,
            response: if allow {
                libc::FAN_ALLOW
            } else {
                libc::FAN_DENY
            },
        };
        // SAFETY: writes one fanotify_response from a live struct.
        let n = unsafe {
            libc::write(
                self.fd(),
                (&r as *const libc::fanotify_response).cast(),
                std::mem::size_of::<libc::fanotify_response>(),
            )
        };
        if n < 0 {
            tracing::error!(
                error = %io::Error::last_os_error(),
                "fanotify: cannot answer a held open (the kernel allows it when the guard ends)"
            );
        }
    }
}
