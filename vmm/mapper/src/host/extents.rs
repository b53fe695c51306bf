//! FIEMAP: which blocks back a file range, and whether they are stable enough to pin (no hole, unwritten,
//! shared, delalloc, inline, encoded or unknown extent).

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// FIEMAP extent flags (linux/fiemap.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtentFlags(pub u32);

impl ExtentFlags {
    /// The last extent of the file.
    pub const LAST: u32 = 0x1;
    /// Location not known yet.
    pub const UNKNOWN: u32 = 0x2;
    /// Delayed allocation: no blocks yet.
    pub const DELALLOC: u32 = 0x4;
    /// Data is encoded (compressed...).
    pub const ENCODED: u32 = 0x8;
    /// Data is encrypted.
    pub const DATA_ENCRYPTED: u32 = 0x80;
    /// Not block-aligned.
    pub const NOT_ALIGNED: u32 = 0x100;
    /// Data is inline in metadata.
    pub const DATA_INLINE: u32 = 0x200;
    /// Data shares a block with other files (tail packing).
    pub const DATA_TAIL: u32 = 0x400;
    /// Allocated but unwritten (reads as zeros).
    pub const UNWRITTEN: u32 = 0x800;
    /// Merged from several extents for the report.
    pub const MERGED: u32 = 0x1000;
    /// Blocks shared with another file (reflink).
    pub const SHARED: u32 = 0x2000;

    /// Flags that make an extent unpinnable: its blocks may move, be shared, or not exist yet.
    pub const REFUSED: u32 = Self::UNKNOWN
        | Self::DELALLOC
        | Self::ENCODED
        | Self::DATA_ENCRYPTED
        | Self::NOT_ALIGNED
        | Self::DATA_INLINE
        | Self::DATA_TAIL
        | Self::UNWRITTEN
        | Self::SHARED;

    const NAMES: [(u32, &'static str); 11] = [
        (Self::LAST, "LAST"),
        (Self::UNKNOWN, "UNKNOWN"),
        (Self::DELALLOC, "DELALLOC"),
        (Self::ENCODED, "ENCODED"),
        (Self::DATA_ENCRYPTED, "DATA_ENCRYPTED"),
        (Self::NOT_ALIGNED, "NOT_ALIGNED"),
        (Self::DATA_INLINE, "DATA_INLINE"),
        (Self::DATA_TAIL, "DATA_TAIL"),
        (Self::UNWRITTEN, "UNWRITTEN"),
        (Self::MERGED, "MERGED"),
        (Self::SHARED, "SHARED"),
    ];

    /// Whether `flag` is set.
    pub fn contains(&self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

impl fmt::Display for ExtentFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut rest = self.0;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 || first {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// Why an extent cannot be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentProblem {
    /// No extent: a gap between extents, or past the last one.
    Hole,
    /// An extent whose flags include a refused one.
    Flags(ExtentFlags),
}

impl fmt::Display for ExtentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtentProblem::Hole => f.write_str("hole"),
            ExtentProblem::Flags(fl) => write!(f, "flags {fl}"),
        }
    }
}

/// One FIEMAP extent, file offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// File offset.
    pub logical: u64,
    /// Disk offset.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// FIEMAP flags.
    pub flags: ExtentFlags,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct FiemapBuf {
    hdr: FiemapHeader,
    ext: [FiemapExtent; EXTENTS_PER_CALL],
}

const EXTENTS_PER_CALL: usize = 128;
/// _IOWR('f', 11, struct fiemap): struct fiemap is 32 bytes.
pub const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

/// The extents FIEMAP reports for `[start, end)` of the file (not syncing first: delalloc shows as such).
pub fn read_extents(fd: RawFd, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let mut buf = Box::new(FiemapBuf {
            hdr: FiemapHeader {
                fm_start: pos,
                fm_length: end - pos,
                fm_extent_count: EXTENTS_PER_CALL as u32,
                ..Default::default()
            },
            ext: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most fm_extent_count extents into `buf`, which
        // has room for exactly that many.
        let rc = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut *buf as *mut FiemapBuf) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (buf.hdr.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.ext[..n] {
            let ext = Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: ExtentFlags(e.fe_flags),
            };
            last |= ext.flags.contains(ExtentFlags::LAST);
            pos = pos.max(ext.logical.saturating_add(ext.length));
            out.push(ext);
        }
        if last {
            break;
        }
    }
    Ok(out)
}

/// The first reason `[start, end)` of the file cannot be pinned: `(file offset, length, problem)`.
pub fn first_problem(
    fd: RawFd,
    start: u64,
    end: u64,
) -> io::Result<Option<(u64, u64, ExtentProblem)>> {
    let mut pos = start;
    for e in read_extents(fd, start, end)? {
        let e_end = e.logical.saturating_add(e.length);
        if e_end <= pos {
            continue;
        }
        if e.logical > pos {
            return Ok(Some((pos, e.logical.min(end) - pos, ExtentProblem::Hole)));
        }
        if e.flags.0 & ExtentFlags::REFUSED != 0 {
            return Ok(Some((
                pos,
                e_end.min(end) - pos,
                ExtentProblem::Flags(e.flags),
            )));
        }
        pos = e_end;
        if pos >= end {
            return Ok(None);
        }
    }
    Ok((pos < end).then_some((pos, end - pos, ExtentProblem::Hole)))
}
