//! fanotify permission events on the backing files: a foreign open is seen before it completes and answered
//! with allow or deny (EPERM for the opener). Written over the libc crate's bindings, as the rest of the
//! mapper's kernel interfaces are (leases, fallocate, FIEMAP): a wrapper crate would add a dependency tree for
//! three calls and a fixed-layout record.
//!
//! Three groups, because the kernel will not mix their classes and reporting modes:
//!
//! - [`Group::Permissions`] (FAN_CLASS_CONTENT): opens held for an answer, and closes.
//! - [`Group::Changes`] (FAN_CLASS_NOTIF | FAN_REPORT_FID): attribute changes (which include a change of the
//!   link count: `rm`, or `mv` over the file), renames of the file itself and its deletion. The kernel reports
//!   these only to a group that names files by handle, and refuses FAN_REPORT_FID on a permission class
//!   (EINVAL), hence a group of its own. Its events carry the file's handle instead of a descriptor.
//! - [`Group::PreContent`] (FAN_CLASS_PRE_CONTENT): FAN_PRE_ACCESS, which the kernel raises, and holds for an
//!   answer, before a truncate(2) by path as well as before reads and writes. It is marked only on a file that
//!   a foreign process holds open (then the kernel lease is gone and would not see the truncate), so that the
//!   VMM's own descriptors, opened before any such mark, never raise it.
//!
//! Every group reports the acting thread (FAN_REPORT_TID), so `/proc/TID/syscall` is that of the thread held
//! in its call. An event of a descriptor group carries a new descriptor of the file (made by the kernel without
//! events of its own); it is always closed, after the answer for a permission event.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{MapperError, Result};

/// What the kernel reports about one access.
#[derive(Debug)]
pub(crate) struct FanEvent {
    pub mask: u64,
    /// The thread that opened or closed (FAN_REPORT_TID); 0 if the kernel gave none.
    pub tid: u32,
    /// The file, or `None` for a queue overflow or a [`Group::Changes`] event.
    pub fd: Option<OwnedFd>,
    /// A [`Group::Changes`] event's file: its file system id and handle, as [`handle_of`] gives them.
    pub handle: Option<Vec<u8>>,
}

impl FanEvent {
    pub fn is_open_perm(&self) -> bool {
        self.mask & libc::FAN_OPEN_PERM != 0
    }
    pub fn is_close(&self) -> bool {
        self.mask & libc::FAN_CLOSE != 0
    }
}

/// The kinds of group the guard opens (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    Permissions,
    Changes,
    PreContent,
}

/// A fanotify group.
#[derive(Debug)]
pub(crate) struct Fanotify {
    fd: OwnedFd,
}

/// uapi/linux/fanotify.h (Linux 6.14); the libc crate does not export it yet.
pub(crate) const FAN_PRE_ACCESS: u64 = 0x0010_0000;

/// What the changes group watches on every guarded file.
pub(crate) const CHANGES: u64 = libc::FAN_ATTRIB | libc::FAN_MOVE_SELF | libc::FAN_DELETE_SELF;

/// What is watched on every guarded file: opens (held for an answer) and closes (the count of opens).
pub(crate) const WATCH: u64 = libc::FAN_OPEN_PERM | libc::FAN_CLOSE_WRITE | libc::FAN_CLOSE_NOWRITE;

/// Events read per read(2): the buffer is bounded, the rest stay queued for the next read.
const READ_BUF: usize = 4096;
const METADATA_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
/// FANOTIFY_METADATA_VERSION (uapi/linux/fanotify.h).
const METADATA_VERSION: u8 = 3;

impl Fanotify {
    /// A new group. EPERM without CAP_SYS_ADMIN: the caller falls back to the kernel lease alone. EINVAL for
    /// a class or mode the kernel does not know (FAN_CLASS_PRE_CONTENT before Linux 6.14).
    pub fn new(group: Group) -> io::Result<Fanotify> {
        let class = match group {
            Group::Permissions => libc::FAN_CLASS_CONTENT,
            Group::Changes => libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_FID,
            Group::PreContent => libc::FAN_CLASS_PRE_CONTENT,
        };
        // SAFETY: fanotify_init takes flags only and returns a new descriptor or -1.
        let fd = unsafe {
            libc::fanotify_init(
                class | libc::FAN_CLOEXEC | libc::FAN_REPORT_TID | libc::FAN_NONBLOCK,
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
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    // The kernel could not make the event's descriptor; a permission event is then refused
                    // by the kernel itself (the accessor gets EPERM) and the next read goes on.
                    tracing::warn!(error = %e, "fanotify: an event could not be read");
                    continue;
                }
            }
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
                let info = &bytes[off + usize::from(m.metadata_len).min(len)..off + len];
                out.push(FanEvent {
                    mask: m.mask,
                    tid: m.pid.max(0) as u32,
                    fd,
                    handle: fid_of(info),
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

/// The first file-id record among an event's info records: its fsid and file handle (type and bytes), laid out
/// as [`handle_of`] lays out a file's.
fn fid_of(mut info: &[u8]) -> Option<Vec<u8>> {
    // struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }, then for a FID record the fsid
    // (8 bytes) and a struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }.
    while info.len() >= 4 {
        let kind = info[0];
        let len = usize::from(u16::from_ne_bytes([info[2], info[3]]));
        if len < 4 || len > info.len() {
            return None;
        }
        if kind == libc::FAN_EVENT_INFO_TYPE_FID && len >= 4 + 8 + 8 {
            let rec = &info[4..len];
            let bytes = u32::from_ne_bytes(rec[8..12].try_into().ok()?) as usize;
            let end = (16 + bytes).min(rec.len());
            let mut key = rec[..8].to_vec();
            key.extend_from_slice(&rec[12..end]);
            return Some(key);
        }
        info = &info[len..];
    }
    None
}

/// MAX_HANDLE_SZ (linux/exportfs.h).
const MAX_HANDLE_SZ: usize = 128;

/// A file's fsid and handle (type and bytes), as a [`Group::Changes`] event names it.
pub(crate) fn handle_of(file: RawFd) -> io::Result<Vec<u8>> {
    // struct file_handle: handle_bytes (in: room, out: used), handle_type, then the bytes.
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the buffer is a struct file_handle with MAX_HANDLE_SZ bytes of room; an empty path with
    // AT_EMPTY_PATH names `file` itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            file,
            c"".as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs is plain data filled by the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a live struct.
    if unsafe { libc::fstatfs(file, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two ints (its fields are private in the libc crate); read it as bytes.
    let fsid: [u8; 8] = unsafe { std::mem::transmute_copy(&st.f_fsid) };
    let used = (buf[0] as usize).min(MAX_HANDLE_SZ);
    let mut key = fsid.to_vec();
    // SAFETY: the buffer is plain u32s; view its bytes.
    let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), 8 + MAX_HANDLE_SZ) };
    key.extend_from_slice(&raw[4..8 + used]);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsafe_gettid() -> libc::pid_t {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    /// A real changes group on a real file: `rm` of a second name shows as an attribute change (the link count)
    /// naming the file by the same handle [`handle_of`] gives.
    #[test]
    fn an_unlink_is_an_attribute_change_of_the_same_handle() {
        let Ok(group) = Fanotify::new(Group::Changes) else {
            // Without CAP_SYS_ADMIN there is no group to test (the guard then runs on the kernel lease).
            assert!(
                std::env::var_os("CI").is_none(),
                "fanotify needs CAP_SYS_ADMIN under CI"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let f = std::fs::File::create(&a).unwrap();
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        group.mark(f.as_raw_fd(), CHANGES, false).unwrap();
        std::fs::remove_file(dir.path().join("b")).unwrap();
        let evs = group.read();
        let want = handle_of(f.as_raw_fd()).unwrap();
        assert!(
            evs.iter().any(|e| e.mask & libc::FAN_ATTRIB != 0
                && e.handle.as_ref() == Some(&want)
                && i64::from(e.tid) == i64::from(unsafe_gettid())
                && e.fd.is_none()),
            "{evs:?}"
        );
    }
}
