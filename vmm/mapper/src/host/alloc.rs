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
