//! The mapper's one error type. Every refusal maps to an errno (`MapperError::errno`) so the agent channel and the
//! operator API can answer with the same code the F_LAYOUT RFC used, and every ETXTBSY/EDEADLK names the holder.

use std::fmt;
use std::io;

use crate::host::{BackingKind, ExtentProblem, FsKind};
use crate::ids::{LeaseId, OwnerId, PinId, RegionId};
use crate::pinnability::{DmaRule, PINNABLE_BACKINGS};
use crate::range::ByteRange;

/// What holds a range against a layout change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    /// A pin.
    Pin,
    /// An exclusive (unbreakable) lease.
    ExclusiveLease,
}

impl HoldKind {
    /// "a pin", "an exclusive lease": for messages that say "held ... with {}".
    pub fn with_article(self) -> &'static str {
        match self {
            HoldKind::Pin => "a pin",
            HoldKind::ExclusiveLease => "an exclusive lease",
        }
    }
}

impl fmt::Display for HoldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HoldKind::Pin => "pin",
            HoldKind::ExclusiveLease => "exclusive lease",
        })
    }
}

/// What a request named that does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// An owner never added, or gone.
    Owner(OwnerId),
    /// A region never added, or removed.
    Region(RegionId),
    /// A lease never taken, or released.
    Lease(LeaseId),
    /// A pin never taken, unpinned, or still being set up.
    Pin(PinId),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Owner(o) => o.fmt(f),
            Missing::Region(r) => r.fmt(f),
            Missing::Lease(l) => l.fmt(f),
            Missing::Pin(p) => p.fmt(f),
        }
    }
}

/// A lease or pin, as the subject of an ownership check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Held {
    /// A lease.
    Lease(LeaseId),
    /// A pin.
    Pin(PinId),
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::Lease(l) => l.fmt(f),
            Held::Pin(p) => p.fmt(f),
        }
    }
}

/// Every refusal and failure of the mapper. Ranges are region-relative for requests named on a region and
/// file-relative for file-level ones (the host guard's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapperError {
    /// Pin or prepare without an exclusive lease of the same owner covering the range (EPERM).
    #[error("{owner} holds no exclusive lease covering {range}")]
    NoExclusiveLease {
        /// The requester.
        owner: OwnerId,
        /// The range it asked for.
        range: ByteRange,
    },
    /// The owner may not act on another owner's lease or pin (EPERM).
    #[error("{owner} does not own {what}")]
    NotOwner {
        /// The requester.
        owner: OwnerId,
        /// What it named.
        what: Held,
    },
    /// A request without an owner (EINVAL).
    #[error("request has no owner")]
    NoOwner,
    /// The range cannot be pinned as it is; `prepare` fixes holes, unwritten and shared extents (EINVAL).
    #[error("extent at file offset {file_offset:#x} (+{len:#x}) cannot be pinned: {problem}")]
    Unpinnable {
        /// File offset of the first problem.
        file_offset: u64,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        problem: ExtentProblem,
    },
    /// A lease with pins under it cannot be released (EBUSY).
    #[error("{lease} still has {pins} pin(s) under it")]
    LeaseBusy {
        /// The lease.
        lease: LeaseId,
        /// How many pins it has.
        pins: usize,
    },
    /// Two DMA mappings cannot overlap in one IOMMU address space (VFIO type1 refuses it, and refuses partial
    /// unmaps, so they cannot be shared either) (EBUSY).
    #[error("{range} is already DMA-mapped by {pin} of {owner}")]
    DmaOverlap {
        /// The pin that maps it.
        pin: PinId,
        /// Its owner.
        owner: OwnerId,
        /// The overlap.
        range: ByteRange,
    },
    /// A region that still has leases, pins or transient pins cannot be removed (EBUSY).
    #[error("{name} still has {leases} lease(s), {pins} pin(s) and {transients} transient pin(s)")]
    RegionBusy {
        /// The region.
        region: RegionId,
        /// Its name (the operator's, else its id), for the message.
        name: String,
        /// Leases taken on it.
        leases: usize,
        /// Pins taken on it.
        pins: usize,
        /// Transient pins in flight on it.
        transients: usize,
    },
    /// A layout change over a range another owner pinned or leased exclusively (ETXTBSY).
    #[error("{range} is held by {holder} ({holder_name}) with {}", kind.with_article())]
    TextBusy {
        /// Who holds it.
        holder: OwnerId,
        /// The holder's name, as it registered.
        holder_name: String,
        /// With what.
        kind: HoldKind,
        /// The part of the change's range it holds.
        range: ByteRange,
    },
    /// A layout change over a range the requester itself pinned or leased exclusively; wins over ETXTBSY
    /// (EDEADLK).
    #[error("{range} is held by the requester {holder} itself with {}", kind.with_article())]
    Deadlock {
        /// The requester.
        holder: OwnerId,
        /// With what.
        kind: HoldKind,
        /// The part of the change's range it holds.
        range: ByteRange,
    },
    /// A break or a change is in progress on an overlapping range; no new leases there until it ends (EAGAIN).
    #[error("a break is in progress on {range}")]
    BreakInProgress {
        /// The range being broken or changed.
        range: ByteRange,
    },
    /// The break deadline passed with policy `fail`: nothing changed, leases kept (ETIMEDOUT).
    #[error(
        "break of {range} timed out; not released by {}",
        crate::error::list(holders)
    )]
    TimedOut {
        /// The range of the break.
        range: ByteRange,
        /// Who still held leases there.
        holders: Vec<OwnerId>,
    },
    /// A range outside the region's window (ERANGE).
    #[error("[{off:#x}, +{len:#x}) is outside {name}'s window of {size:#x} bytes")]
    OutOfWindow {
        /// The region.
        region: RegionId,
        /// Its name (the operator's, else its id), for the message.
        name: String,
        /// The offset asked for (region-relative).
        off: u64,
        /// The length asked for (0 = to the end of the window).
        len: u64,
        /// The window's size.
        size: u64,
    },
    /// An offset and length whose sum overflows, or a file range past the largest file offset (ERANGE).
    #[error("offset {off:#x} + length {len:#x} overflows")]
    Overflow {
        /// The offset.
        off: u64,
        /// The length.
        len: u64,
    },
    /// The table of `what` has no slot left (ENOSPC; 2^32 - 1 held at once).
    #[error("no room for another {what}")]
    TableFull {
        /// What could not be stored.
        what: &'static str,
    },
    /// A new region whose window is not page-aligned, or larger than its mapping (EINVAL).
    #[error("bad region: {0}")]
    BadRegion(&'static str),
    /// Shrink and grow belong to a region whose window is its file's whole tail (EINVAL).
    #[error("{name} does not reach the end of its file (window ends at file offset {window_end:#x}, the file is {file_size:#x} bytes): shrink and grow belong to the region holding the file's tail")]
    NotFileTail {
        /// The region.
        region: RegionId,
        /// Its name (the operator's, else its id), for the message.
        name: String,
        /// File offset of its window's end.
        window_end: u64,
        /// The file's size now.
        file_size: u64,
    },
    /// A shrink to a larger size or a grow to a smaller one (EINVAL).
    #[error("{change} to {new_size:#x}: the file is {size:#x} bytes from the window's start")]
    WrongDirection {
        /// "shrink" or "grow".
        change: &'static str,
        /// The size asked for (region-relative).
        new_size: u64,
        /// The current size (region-relative).
        size: u64,
    },
    /// A break deadline above the maximum (EINVAL).
    #[error("break deadline {asked:?} above the maximum {max:?}")]
    DeadlineTooLong {
        /// What was asked for.
        asked: std::time::Duration,
        /// The maximum.
        max: std::time::Duration,
    },
    /// A pin on a region that has no host mapping (EINVAL).
    #[error("{0} has no host mapping to pin")]
    NoMapping(RegionId),
    /// A signal number the host guard cannot use (EINVAL).
    #[error("signal {0} cannot be used by the host guard")]
    BadSignal(i32),
    /// Device-DAX regions have no file layout: leases and layout changes do not apply (EOPNOTSUPP).
    #[error("{kind} backing has no file layout: layout leases and layout changes do not apply")]
    NoLayout {
        /// The region's backing kind.
        kind: BackingKind,
    },
    /// A DMA pin on a region whose pages the kernel will not pin long-term (EOPNOTSUPP): refused up front, naming
    /// the rule and the backings that work. `rule` is [`DmaRule::KernelRefused`] when the kernel itself refused a
    /// pin the rules allow (its answer wins from then on).
    #[error(
        "{name} ({kind}) cannot be pinned for DMA: {rule}; DMA pins work on {}",
        PINNABLE_BACKINGS
    )]
    DmaNotPinnable {
        /// The region.
        region: RegionId,
        /// Its name (the operator's, else its id), for the message.
        name: String,
        /// Its backing kind.
        kind: BackingKind,
        /// The rule that refuses it.
        rule: DmaRule,
    },
    /// The filesystem has no FIEMAP, so a pin's extents cannot be validated (EOPNOTSUPP).
    #[error("the backing filesystem ({fs}) has no FIEMAP: extents cannot be validated for a pin")]
    NoExtentMap {
        /// The filesystem.
        fs: FsKind,
    },
    /// A new lease or pin on a region being removed (ENODEV).
    #[error("{name} is being removed: it takes no new leases or pins")]
    RegionClosing {
        /// The region.
        region: RegionId,
        /// Its name (the operator's, else its id), for the message.
        name: String,
    },
    /// The request named something that does not exist (ENOENT).
    #[error("no such {0}")]
    NotFound(Missing),
    /// A host call failed.
    #[error("{op}: {source}")]
    Io {
        /// The call.
        op: &'static str,
        /// The error it returned.
        #[source]
        source: io::Error,
    },
}

/// The mapper's result type.
pub type Result<T> = std::result::Result<T, MapperError>;

impl MapperError {
    /// The errno the agent channel and the operator API answer with.
    pub fn errno(&self) -> i32 {
        match self {
            MapperError::NoExclusiveLease { .. } | MapperError::NotOwner { .. } => libc::EPERM,
            MapperError::NoOwner
            | MapperError::Unpinnable { .. }
            | MapperError::BadRegion(_)
            | MapperError::NotFileTail { .. }
            | MapperError::WrongDirection { .. }
            | MapperError::DeadlineTooLong { .. }
            | MapperError::NoMapping(_)
            | MapperError::BadSignal(_) => libc::EINVAL,
            MapperError::LeaseBusy { .. }
            | MapperError::RegionBusy { .. }
            | MapperError::DmaOverlap { .. } => libc::EBUSY,
            MapperError::TextBusy { .. } => libc::ETXTBSY,
            MapperError::Deadlock { .. } => libc::EDEADLK,
            MapperError::BreakInProgress { .. } => libc::EAGAIN,
            MapperError::TimedOut { .. } => libc::ETIMEDOUT,
            MapperError::OutOfWindow { .. } | MapperError::Overflow { .. } => libc::ERANGE,
            MapperError::NoLayout { .. }
            | MapperError::NoExtentMap { .. }
            | MapperError::DmaNotPinnable { .. } => libc::EOPNOTSUPP,
            MapperError::NotFound(_) => libc::ENOENT,
            MapperError::RegionClosing { .. } => libc::ENODEV,
            MapperError::TableFull { .. } => libc::ENOSPC,
            MapperError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The errno's symbolic name, as the operator CLI prints it.
    pub fn errno_name(&self) -> &'static str {
        errno_name(self.errno())
    }

    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        MapperError::Io { op, source }
    }

    pub(crate) fn last_os(op: &'static str) -> Self {
        MapperError::Io {
            op,
            source: io::Error::last_os_error(),
        }
    }
}

/// The symbolic name of an errno the mapper answers with ("EUNKNOWN" for others).
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::ETXTBSY => "ETXTBSY",
        libc::EDEADLK => "EDEADLK",
        libc::EAGAIN => "EAGAIN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ERANGE => "ERANGE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOENT => "ENOENT",
        libc::ENODEV => "ENODEV",
        libc::ENOMEM => "ENOMEM",
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        _ => "EUNKNOWN",
    }
}

/// Ids as a person reads them in a message: `owner:2, owner:5`.
pub(crate) fn list<T: std::fmt::Display>(ids: &[T]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn every_refusal_has_its_rfc_errno() {
        let r = ByteRange::new(0, 4096);
        let o = OwnerId::from_raw(1);
        let cases: Vec<(MapperError, i32, &str)> = vec![
            (
                MapperError::NoExclusiveLease { owner: o, range: r },
                libc::EPERM,
                "EPERM",
            ),
            (MapperError::NoOwner, libc::EINVAL, "EINVAL"),
            (
                MapperError::LeaseBusy {
                    lease: LeaseId::from_raw(3),
                    pins: 1,
                },
                libc::EBUSY,
                "EBUSY",
            ),
            (
                MapperError::TextBusy {
                    holder: o,
                    holder_name: "a".into(),
                    kind: HoldKind::Pin,
                    range: r,
                },
                libc::ETXTBSY,
                "ETXTBSY",
            ),
            (
                MapperError::Deadlock {
                    holder: o,
                    kind: HoldKind::Pin,
                    range: r,
                },
                libc::EDEADLK,
                "EDEADLK",
            ),
            (
                MapperError::BreakInProgress { range: r },
                libc::EAGAIN,
                "EAGAIN",
            ),
            (
                MapperError::TimedOut {
                    range: r,
                    holders: vec![o],
                },
                libc::ETIMEDOUT,
                "ETIMEDOUT",
            ),
            (
                MapperError::OutOfWindow {
                    region: RegionId::from_raw(1),
                    name: "pm0".into(),
                    off: 0,
                    len: 1,
                    size: 0,
                },
                libc::ERANGE,
                "ERANGE",
            ),
            (
                MapperError::NoLayout {
                    kind: BackingKind::DevDax,
                },
                libc::EOPNOTSUPP,
                "EOPNOTSUPP",
            ),
            (
                MapperError::DmaNotPinnable {
                    region: RegionId::from_raw(1),
                    name: "pm0".into(),
                    kind: BackingKind::FsDax,
                    rule: DmaRule::FsDax,
                },
                libc::EOPNOTSUPP,
                "EOPNOTSUPP",
            ),
            (
                MapperError::NotFound(Missing::Owner(o)),
                libc::ENOENT,
                "ENOENT",
            ),
            (
                MapperError::TableFull { what: "lease" },
                libc::ENOSPC,
                "ENOSPC",
            ),
            (
                MapperError::io("x", io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
                "ENOSPC",
            ),
        ];
        for (e, errno, name) in cases {
            assert_eq!(e.errno(), errno, "{e}");
            assert_eq!(e.errno_name(), name, "{e}");
        }
    }

    #[test]
    fn text_busy_names_the_holder() {
        let e = MapperError::TextBusy {
            holder: OwnerId::from_raw(7),
            holder_name: "dma-ctx".into(),
            kind: HoldKind::Pin,
            range: ByteRange::new(0x1000, 0x3000),
        };
        assert_eq!(
            e.to_string(),
            "[0x1000, 0x3000) is held by owner:7 (dma-ctx) with a pin"
        );
    }
}
