//! What backs a region (DESIGN.md, "backing kind") and which filesystem a file lives on. The kind decides how a
//! flush is made durable, how the file is mapped, and whether layout leases apply at all (device-DAX: no).

use std::fmt;

/// The kind of host backing a region has; detected once, by [`crate::probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// Ordinary file in the page cache; a flush is an fdatasync.
    Regular,
    /// File on a DAX filesystem (statx STATX_ATTR_DAX); mapped MAP_SHARED_VALIDATE|MAP_SYNC when the kernel
    /// allows it.
    FsDax,
    /// Device-DAX character device (/dev/daxX.Y); it has no file layout, so layout leases do not apply.
    DevDax,
    /// A file on a RAM filesystem (tmpfs, memfd, hugetlbfs): nothing to make durable, no extent map.
    Ram,
}

impl BackingKind {
    /// The kind's name as logs, the API and the CLI show it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackingKind::Regular => "regular",
            BackingKind::FsDax => "fsdax",
            BackingKind::DevDax => "devdax",
            BackingKind::Ram => "ram",
        }
    }

    /// Whether layout leases and layout changes apply to this kind at all.
    pub fn has_layout(self) -> bool {
        !matches!(self, BackingKind::DevDax)
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The filesystem a file lives on (fstatfs `f_type`), for what depends on it: extent maps, reflink, RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FsKind {
    /// tmpfs, /dev/shm and memfd files.
    Tmpfs,
    /// hugetlbfs (memfd with MFD_HUGETLB too).
    Hugetlbfs,
    /// ext2/3/4 (one magic number).
    Ext4,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// Anything else, by its magic number.
    Other(i64),
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683E;

impl FsKind {
    /// The filesystem with statfs magic `f_type`.
    pub fn from_magic(f_type: i64) -> FsKind {
        match f_type {
            TMPFS_MAGIC => FsKind::Tmpfs,
            HUGETLBFS_MAGIC => FsKind::Hugetlbfs,
            EXT4_MAGIC => FsKind::Ext4,
            XFS_MAGIC => FsKind::Xfs,
            BTRFS_MAGIC => FsKind::Btrfs,
            m => FsKind::Other(m),
        }
    }

    /// RAM filesystems: no extent map, nothing to make durable.
    pub fn is_ram(self) -> bool {
        matches!(self, FsKind::Tmpfs | FsKind::Hugetlbfs)
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsKind::Tmpfs => f.write_str("tmpfs"),
            FsKind::Hugetlbfs => f.write_str("hugetlbfs"),
            FsKind::Ext4 => f.write_str("ext4"),
            FsKind::Xfs => f.write_str("xfs"),
            FsKind::Btrfs => f.write_str("btrfs"),
            FsKind::Other(m) => write!(f, "fs:{m:#x}"),
        }
    }
}
