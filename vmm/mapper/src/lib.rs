//! # daxvisor-mapper
//!
//! The layout-lease manager for files that back guest memory: layout leases, extent pins, range-limited breaks
//! and layout changes, the host guard, and everything daxvisor knows about host files (probing, FIEMAP,
//! fallocate, populate/mlock, mapping with MAP_SYNC). It knows nothing of KVM, virtio or guest memory: any VMM,
//! or any program that hands out ranges of a file, can use it.
//!
//! Terms (the project's `docs/mapper.md` has the full semantics):
//! - a **file** is the unit of layout: every hold (lease, pin, transient pin, break) is indexed per file
//!   (device, inode), so two regions on one file see each other's holds;
//! - a **region** ([`Mapper::add_region`]) is a window `[file_offset, file_offset + size)` of a file. Ranges a
//!   caller names on a region are region-relative, must lie inside the window (ERANGE), and a length of 0 means
//!   "to the end of the window". A change named on a region never touches a byte outside its window;
//! - an **owner** ([`Mapper::add_owner`]) holds leases and pins; [`Mapper::owner_exit`] releases all it held;
//! - a **lease** ([`Mapper::acquire`]) is `Shared` (breakable: the holder gets a [`BreakNotice`] and releases)
//!   or `Exclusive` (unbreakable: conflicting changes fail at once with ETXTBSY naming the holder);
//! - a **pin** ([`Mapper::pin`]) needs the owner's exclusive lease and stable extents; it populates, mlocks and
//!   hands the range to the [`DmaMapper`]. [`Mapper::prepare`] makes a range pinnable. Every region carries a
//!   [`DmaRule`]: a DMA pin the kernel will not allow (FS-DAX, a shared page-cache file on Linux >= 6.5) fails
//!   up front with EOPNOTSUPP naming it;
//! - a **layout change** ([`Mapper::change`], [`Mapper::punch`], ...) checks pins, then exclusive leases, breaks
//!   shared leases and waits, waits for in-flight [`TransientPin`]s (the VMM's own I/O), then applies;
//! - the **host guard** ([`HostGuard`]) sees foreign opens of backing files before they complete (fanotify) and
//!   refuses, holds (a whole-file break) or logs them per [`GuardPolicy`]; a kernel lease catches truncate by path.
//!
//! ```no_run
//! use std::sync::Arc;
//! use daxvisor_mapper::{
//!     probe, ChannelNotifier, HostMapping, LeaseMode, MapOptions, Mapper, MapperError, RegionDesc,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let file = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open("/data/vm1.img")?);
//! let kind = probe(&file, std::path::Path::new("/sys"))?.kind;
//! let window = (2 << 20, 4 << 20); // file offset, size
//! let mapping = HostMapping::map(&file, window.0, window.1, MapOptions::default())?;
//! let (notifier, _notices) = ChannelNotifier::new();
//! let mapper = Mapper::new(Arc::new(notifier), None);
//! let region = mapper.add_region(RegionDesc::new(file, window.0, window.1, kind).with_mapping(Arc::new(mapping)))?;
//! let dma = mapper.add_owner("dma-ctx");
//! mapper.acquire(dma, region, 0, 1 << 20, LeaseMode::Exclusive)?;
//! mapper.prepare(dma, region, 0, 1 << 20, &mut |_| {})?;
//! mapper.pin(dma, region, 0, 1 << 20)?;
//! match mapper.punch(None, region, 0, 4096) {
//!     Err(MapperError::TextBusy { holder_name, .. }) => println!("refused: held by {holder_name}"),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Concurrency: one mutex over the tables and one condvar that every release, unpin, owner exit, break end and
//! transient-pin drop signals. Nothing waits while holding the mutex (breaks wait on the condvar, notices are
//! delivered with the mutex released), and slow work (FIEMAP, populate of gigabytes, prepare) runs unlocked with
//! the range already claimed, so several threads (an agent channel, an operator API) can call in at once.

#![deny(missing_docs)]

mod breaks;
mod dma;
mod error;
mod guard;
mod host;
mod ids;
mod interval;
mod introspect;
mod layout_change;
mod lease;
mod lease_table;
mod owner;
mod pin;
mod pinnability;
mod prepare;
mod range;
mod region;
mod state;
mod transient;
#[cfg(feature = "vfio")]
mod vfio;

#[cfg(test)]
mod concurrency_test;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod test_files;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use breaks::{
    BreakEvent, BreakNotice, BreakNotifier, BreakPolicy, BreakStarted, ChannelNotifier,
    HolderReleased, RevokeNotice,
};
#[cfg(any(test, feature = "test-util"))]
pub use dma::RecordingDma;
pub use dma::{DmaMapper, DmaRange};
pub use error::{errno_name, Held, HoldKind, MapperError, Missing, Result};
pub use guard::{
    guard_signal, lease_break_time, Access, GuardCounts, GuardEvent, GuardOutcome, GuardPolicy,
    HostGuard, OpenMode, SeenBy, FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, GUARD_HISTORY,
};
pub use host::{
    allocate, dev_dax_info, extend, first_hole, first_problem, free_bytes, fs_kind, holes, probe,
    punch, read_extents, shrunk_below, unshare, window_health, zero, BackingKind, DevDaxInfo,
    Extent, ExtentFlags, ExtentProblem, FileKey, FsKind, HostMapping, MapOptions, Probe,
    ProbeError, WindowHealth,
};
pub use host::{lock_file, openers_of, refuse_if_locked, FileLockError, Holder};
pub use ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
pub use interval::IntervalIndex;
pub use introspect::{BreakView, LeaseView, OwnerView, PinView, RegionView, Snapshot};
pub use layout_change::{
    ChangeReport, ChangeRequest, LayoutChange, DEFAULT_DEADLINE, MAX_DEADLINE,
};
pub use lease::LeaseMode;
pub use pinnability::{DmaRule, KernelVersion, PINNABLE_BACKINGS};
pub use prepare::{PrepareProgress, PrepareReport};
pub use range::{page_size, ByteRange, OPEN_END};
pub use region::RegionDesc;
pub use transient::TransientPin;
#[cfg(feature = "vfio")]
pub use vfio::VfioContainer;

use state::State;

/// The layout-lease manager. Cheap to clone; clones share the same tables.
#[derive(Clone)]
pub struct Mapper {
    state: Arc<Mutex<State>>,
    changed: Arc<Condvar>,
    notifier: Arc<dyn BreakNotifier>,
    dma: Option<Arc<dyn DmaMapper>>,
}

impl std::fmt::Debug for Mapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapper").finish_non_exhaustive()
    }
}

impl Mapper {
    /// `notifier` delivers break and revoke notices to holders; `dma` maps pinned ranges for devices (None when
    /// nothing does DMA).
    pub fn new(notifier: Arc<dyn BreakNotifier>, dma: Option<Arc<dyn DmaMapper>>) -> Self {
        Mapper {
            state: Arc::default(),
            changed: Arc::new(Condvar::new()),
            notifier,
            dma,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the tables consistent (every mutation is a single step), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the next release, unpin, exit, break end or transient-pin drop.
    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(st).unwrap_or_else(|e| e.into_inner())
    }
}
