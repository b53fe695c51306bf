//! Whether the host can still provide every page of a window of a file: the one check behind a flush's "the
//! file shrank under the VM", a failed populate's "the file system is full", and the explanation of a guest
//! access that KVM could not serve (EFAULT).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Why the host may fail to provide a page of a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowHealth {
    /// The file covers the window and its file system has room.
    Intact,
    /// The file is shorter than the window: pages past `len` do not exist.
    Shrunk {
        /// The file's length now.
        len: u64,
    },
    /// Less than a page is free on the file system: a write into a hole cannot allocate.
    FsFull {
        /// Bytes free for unprivileged users.
        free: u64,
    },
    /// The file is immutable (`chattr +i`): no write fault is served.
    Immutable {
        /// The flags set, in words (`immutable`, `immutable+append-only`).
        flags: String,
    },
}

/// The file's immutable flag, its length against `window_end` (file offset), then its file system's free space.
pub fn window_health(file: &File, window_end: u64) -> io::Result<WindowHealth> {
    use crate::guard::file_flags;
    // A file system without inode flags answers ENOTTY: it cannot be immutable either.
    if let Ok(flags) = file_flags::get(file.as_raw_fd()) {
        if flags & file_flags::IMMUTABLE != 0 {
            return Ok(WindowHealth::Immutable {
                flags: file_flags::names(flags & (file_flags::IMMUTABLE | file_flags::APPEND)),
            });
        }
    }
    if let Some(len) = shrunk_below(file, window_end)? {
        return Ok(WindowHealth::Shrunk { len });
    }
    let free = free_bytes(file)?;
    Ok(if free < crate::range::page_size() {
        WindowHealth::FsFull { free }
    } else {
        WindowHealth::Intact
    })
}

/// The file's length when it is shorter than `window_end` (someone truncated it under its user).
pub fn shrunk_below(file: &File, window_end: u64) -> io::Result<Option<u64>> {
    let len = file.metadata()?.len();
    Ok((len < window_end).then_some(len))
}

/// Bytes an unprivileged writer can still allocate on the file's file system.
pub fn free_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: statvfs is plain old data; fstatvfs only writes into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor (borrowed for the call) and a valid out-pointer.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The first offset below `end` with no block behind it, if any.
pub fn first_hole(file: &File, end: u64) -> Option<u64> {
    super::holes(file, end, 1)
        .0
        .first()
        .map(|&(off, _)| off)
        .filter(|&o| o < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrunk_file_and_a_hole_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        assert_eq!(window_health(&f, 1 << 20).unwrap(), WindowHealth::Intact);
        assert_eq!(
            window_health(&f, 2 << 20).unwrap(),
            WindowHealth::Shrunk { len: 1 << 20 }
        );
        assert_eq!(first_hole(&f, 1 << 20), Some(0));
        assert!(free_bytes(&f).unwrap() > 0);
    }
}
