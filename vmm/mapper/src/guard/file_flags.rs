//! A file's inode flags (FS_IOC_GETFLAGS / FS_IOC_SETFLAGS, what `lsattr` and `chattr` use): the guard reads
//! them to find an immutable or append-only flag set on a backing file and clears it again. Clearing either
//! needs CAP_LINUX_IMMUTABLE (EPERM without).

use std::io;
use std::os::fd::RawFd;

/// FS_IMMUTABLE_FL (uapi/linux/fs.h): no write, no write fault, no truncate, no punch.
pub(crate) const IMMUTABLE: libc::c_int = 0x0000_0010;
/// FS_APPEND_FL: writes only at the end; no punch, no truncate, no open for writing without O_APPEND.
pub(crate) const APPEND: libc::c_int = 0x0000_0020;

/// _IOR('f', 1, long): read a file's flags (the kernel writes an int).
pub const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
/// _IOW('f', 2, long): set a file's flags (the kernel reads an int).
pub const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;

pub(crate) fn get(fd: RawFd) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer.
    if unsafe { libc::ioctl(fd, FS_IOC_GETFLAGS, &mut flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

pub(crate) fn set(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer.
    if unsafe { libc::ioctl(fd, FS_IOC_SETFLAGS, &flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `immutable`, `append-only`, or both joined by `+`.
pub(crate) fn names(flags: libc::c_int) -> String {
    let mut v = Vec::new();
    if flags & IMMUTABLE != 0 {
        v.push("immutable");
    }
    if flags & APPEND != 0 {
        v.push("append-only");
    }
    v.join("+")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// On a real file: set append-only, read it back, clear it (the tests run as root, with
    /// CAP_LINUX_IMMUTABLE; a file system without the flags answers ENOTTY/EOPNOTSUPP and is said so).
    #[test]
    fn append_only_is_read_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let fd = f.as_raw_fd();
        let before = get(fd).unwrap();
        if let Err(e) = set(fd, before | APPEND) {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot set append-only here: {e}"
            );
            return;
        }
        assert_ne!(get(fd).unwrap() & APPEND, 0);
        set(fd, before).unwrap();
        assert_eq!(get(fd).unwrap() & (APPEND | IMMUTABLE), 0);
        assert_eq!(names(APPEND | IMMUTABLE), "immutable+append-only");
    }
}
