//! Residency of a host mapping: populate (fault pages in without touching data), mlock, and the page size it
//! is faulted in with (MADV_HUGEPAGE). Crate-private on raw
//! addresses; the public face is [`HostMapping`](super::HostMapping)'s bounds-checked methods, so no safe call
//! outside the crate can aim these at an address that is not a live mapping.

use std::io;

/// Faults every page of `[addr, addr+len)` in readable without allocating (read-only mappings).
pub(crate) fn populate_read(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise on a range of a mapping the caller owns; MADV_POPULATE_READ does not change contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_READ) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Faults every page of `[addr, addr+len)` in writable (allocating backing pages) without touching the data.
pub(crate) fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise on a range of a mapping the caller owns; MADV_POPULATE_WRITE does not change contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for transparent huge pages on `[addr, addr+len)`.
pub(crate) fn advise_huge_pages(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise on a range of a mapping the caller owns; MADV_HUGEPAGE changes no contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Locks `[addr, addr+len)` in memory.
pub(crate) fn mlock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock only changes residency of the caller's mapping.
    if unsafe { libc::mlock(addr as *const libc::c_void, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// MLOCK_ONFAULT (linux/mman.h); the libc crate exports it for Android only.
const MLOCK_ONFAULT: libc::c_uint = 1;

/// Locks `[addr, addr+len)` and faults it in writable in one pass: mlock2(MLOCK_ONFAULT) marks the range locked
/// without walking it, and MADV_POPULATE_WRITE then faults every page, each locked as it is mapped. A plain
/// mlock after populate would walk a gigabyte of pages a second time. Falls back to populate + mlock.
pub(crate) fn populate_and_lock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 only changes residency flags of the caller's mapping.
    if unsafe { libc::mlock2(addr as *const libc::c_void, len, MLOCK_ONFAULT) } < 0 {
        populate_write(addr, len)?;
        return mlock(addr, len);
    }
    if let Err(e) = populate_write(addr, len) {
        munlock(addr, len);
        return Err(e);
    }
    Ok(())
}

/// Unlocks `[addr, addr+len)`.
pub(crate) fn munlock(addr: usize, len: usize) {
    // SAFETY: as mlock; failure (range already unmapped) leaves nothing to undo.
    unsafe { libc::munlock(addr as *const libc::c_void, len) };
}
