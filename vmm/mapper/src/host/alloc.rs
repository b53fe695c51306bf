//! Block allocation of a file range: punch (deallocate, reads back as zeros), zero (zeros, kept allocated),
//! allocate (reserve blocks so a later write cannot hit ENOSPC). File offsets, never past what the caller
//! checked.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: plain syscall on a valid fd; the offsets fit off_t.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The holes of `[0, len)` (SEEK_HOLE/SEEK_DATA), at most `max` of them, and whether that is all of them. A
/// file system without hole reporting shows none (all data), as the kernel's fallback does.
pub fn holes(file: &File, len: u64, max: usize) -> (Vec<(u64, u64)>, bool) {
    let seek = |off: u64, whence| -> Option<u64> {
        let off = libc::off_t::try_from(off).ok()?;
        // SAFETY: lseek on a valid fd; it moves only the descriptor's offset, which no caller relies on (all
        // file I/O here is positional).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        u64::try_from(r).ok()
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        // ENXIO: nothing but a hole to EOF, or past EOF; both end the walk.
        let Some(hole) = seek(pos, libc::SEEK_HOLE).filter(|h| *h < len) else {
            break;
        };
        if out.len() == max {
            return (out, false);
        }
        let data = seek(hole, libc::SEEK_DATA).unwrap_or(len).min(len);
        out.push((hole, data - hole));
        pos = data;
    }
    (out, true)
}

/// Deallocates `[off, off+len)` keeping the file size.
pub fn punch(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// Zeroes `[off, off+len)` keeping it allocated and the file size as it is.
pub fn zero(file: &File, off: u64, len: u64) -> io::Result<()> {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | keep, off, len) {
        // tmpfs has no ZERO_RANGE: punching and re-allocating has the same result (zeros, allocated).
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            punch(file, off, len).and_then(|()| fallocate(file, keep, off, len))
        }
        r => r,
    }
}

/// Allocates `[off, off+len)` without changing data or the file size.
pub fn allocate(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_KEEP_SIZE, off, len)
}

/// Grows a file from `old_len` to `new_len` with its new blocks allocated (no holes a guest write could find
/// full). On failure the length is put back (fallocate may have allocated part of the range before ENOSPC).
pub fn extend(file: &File, old_len: u64, new_len: u64) -> io::Result<()> {
    let len = new_len
        .checked_sub(old_len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    match fallocate(file, 0, old_len, len) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => file.set_len(new_len),
        Err(e) => {
            let _ = file.set_len(old_len);
            Err(e)
        }
    }
}

/// Gives `[from, to)` blocks of its own: FALLOC_FL_UNSHARE_RANGE, else rewrite the same bytes (copy on write).
pub fn unshare(file: &File, from: u64, to: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_UNSHARE_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        from,
        to.saturating_sub(from),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        r => return r,
    }
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut p = from;
    while p < to {
        let n = ((to - p) as usize).min(CHUNK);
        file.read_exact_at(&mut buf[..n], p)?;
        file.write_all_at(&buf[..n], p)?;
        p += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_by_seek_and_bounded() {
        const MIB: u64 = 1 << 20;
        // tmpfs reports holes without an extent map.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let f = File::create(dir.path().join("sparse")).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 2 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 4 * MIB).unwrap();
        let (h, all) = holes(&f, 8 * MIB, 16);
        assert!(all);
        assert_eq!(
            h,
            vec![
                (0, 2 * MIB),
                (2 * MIB + 4096, 2 * MIB - 4096),
                (4 * MIB + 4096, 4 * MIB - 4096)
            ]
        );
        assert_eq!(holes(&f, 8 * MIB, 2), (h[..2].to_vec(), false));
        assert_eq!(holes(&f, 2 * MIB, 16), (vec![(0, 2 * MIB)], true));
        punch(&f, 2 * MIB, 4096).unwrap();
        assert_eq!(holes(&f, 4 * MIB, 16).0, vec![(0, 4 * MIB)]);
    }
}
