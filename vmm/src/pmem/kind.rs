//! The kinds of host backing a pmem region can have (DESIGN.md, "backing kind"). The mapper reads this to decide
//! what a layout change means (device-DAX is exempt: its layout never changes).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// Ordinary file in the page cache; guest flush = fdatasync.
    Regular,
    /// File on a DAX filesystem (statx STATX_ATTR_DAX); mapped MAP_SHARED_VALIDATE|MAP_SYNC when the kernel
    /// allows it.
    FsDax,
    /// Device-DAX character device (/dev/daxX.Y); its layout never changes.
    DevDax,
    /// memfd or tmpfs file: RAM-backed, nothing to make durable.
    Memfd,
}

impl BackingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackingKind::Regular => "regular",
            BackingKind::FsDax => "fsdax",
            BackingKind::DevDax => "devdax",
            BackingKind::Memfd => "memfd",
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
