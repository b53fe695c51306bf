//! Everything daxvisor knows about host files, in one place: the probe (backing kind, filesystem, identity),
//! FIEMAP, block allocation, residency (populate, mlock), mapping with MAP_SYNC, and the exclusive-use lock.

mod alloc;
mod extents;
mod kind;
mod lock;
mod mapping;
mod memory;
mod probe;
mod space;

pub use alloc::{allocate, extend, holes, punch, unshare, zero};
pub use extents::{first_problem, read_extents, Extent, ExtentFlags, ExtentProblem};
pub use kind::{BackingKind, FsKind};
pub use lock::{lock_file, openers_of, refuse_if_locked, FileLockError, Holder};
pub use mapping::{HostMapping, MapOptions};
pub(crate) use memory::advise_huge_pages;
pub use probe::{dev_dax_info, fs_kind, probe, DevDaxInfo, FileKey, Probe, ProbeError};
pub use space::{first_hole, free_bytes, shrunk_below, window_health, WindowHealth};
