//! A filesystem's free space as byte ranges of its block device, read with `FS_IOC_GETFSMAP` (ext4 and XFS have
//! it; others answer `EOPNOTSUPP` or `ENOTTY`).
//!
//! GETFSMAP lists every extent of the filesystem's devices with its owner; free space comes as records with the
//! special owner `FMR_OWN_FREE`. Only the data device's records count (an external log or realtime device is
//! not the pmem device).

use std::os::fd::{AsRawFd, BorrowedFd};

/// `_IOWR('X', 59, struct fsmap_head)`: 192-byte head.
const FS_IOC_GETFSMAP: libc::c_ulong = 0xC0C0_583B;
/// Record flag: the owner is a special value.
const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
/// Record flag: the last record of the dataset.
const FMR_OF_LAST: u32 = 0x20;
/// `FMR_OWNER(0, 1)`: free space (ext4 and XFS both report it so).
const FMR_OWN_FREE: u64 = 1;
/// Records asked for per call.
const BATCH: usize = 128;

/// `struct fsmap` (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Fsmap {
    device: u32,
    flags: u32,
    physical: u64,
    owner: u64,
    offset: u64,
    length: u64,
    reserved: [u64; 3],
}

/// `struct fsmap_head` followed by its records.
#[repr(C)]
struct FsmapHead {
    iflags: u32,
    oflags: u32,
    count: u32,
    entries: u32,
    reserved: [u64; 6],
    keys: [Fsmap; 2],
    recs: [Fsmap; BATCH],
}

/// One free extent: a byte offset on the block device and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

/// Why the free space could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FsmapError {
    /// The filesystem has no GETFSMAP.
    #[error("the filesystem cannot list its free space (no FS_IOC_GETFSMAP: {0})")]
    Unsupported(std::io::Error),
    #[error("FS_IOC_GETFSMAP: {0}")]
    Ioctl(std::io::Error),
    #[error("FS_IOC_GETFSMAP did not advance (a record of length 0 at {0:#x})")]
    Stuck(u64),
}

/// The free extents on the filesystem's data device `dev` (its `st_dev`), sorted and merged.
pub fn free_extents(fs: BorrowedFd<'_>, dev: u64) -> Result<Vec<Extent>, FsmapError> {
    let mut head = Box::new(FsmapHead {
        iflags: 0,
        oflags: 0,
        count: BATCH as u32,
        entries: 0,
        reserved: [0; 6],
        keys: [Fsmap::default(); 2],
        recs: [Fsmap::default(); BATCH],
    });
    // The high key: everything.
    head.keys[1] = Fsmap {
        device: u32::MAX,
        flags: u32::MAX,
        physical: u64::MAX,
        owner: u64::MAX,
        offset: u64::MAX,
        length: 0,
        reserved: [0; 3],
    };
    let mut out: Vec<Extent> = Vec::new();
    loop {
        head.entries = 0;
        head.count = BATCH as u32;
        // SAFETY: `head` is a live, writable fsmap_head with room for `count` records right after it, the
        // layout the ioctl reads and fills; the fd is open for the call's duration.
        let rc = unsafe {
            libc::ioctl(
                fs.as_raw_fd(),
                FS_IOC_GETFSMAP,
                std::ptr::from_mut::<FsmapHead>(&mut head),
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) if out.is_empty() => {
                    FsmapError::Unsupported(e)
                }
                _ => FsmapError::Ioctl(e),
            });
        }
        let n = (head.entries as usize).min(BATCH);
        if n == 0 {
            break;
        }
        for r in &head.recs[..n] {
            if u64::from(r.device) == dev
                && r.flags & FMR_OF_SPECIAL_OWNER != 0
                && r.owner == FMR_OWN_FREE
                && r.length > 0
            {
                push_merged(&mut out, r.physical, r.length);
            }
        }
        let last = head.recs[n - 1];
        if last.flags & FMR_OF_LAST != 0 {
            break;
        }
        if last.length == 0 {
            return Err(FsmapError::Stuck(last.physical));
        }
        // The next batch starts after the last record returned.
        head.keys[0] = last;
    }
    out.sort_by_key(|e| e.start);
    Ok(out)
}

fn push_merged(out: &mut Vec<Extent>, start: u64, len: u64) {
    if let Some(prev) = out.last_mut() {
        if prev.start + prev.len == start {
            prev.len += len;
            return;
        }
    }
    out.push(Extent { start, len });
}
