//! The mapper's one error type. Every refusal maps to an errno (`MapperError::errno`) so the agent channel and the
//! operator API can answer with the same code the F_LAYOUT RFC used, and every ETXTBSY/EDEADLK names the holder.

use std::fmt;
use std::io;

use super::lease::LeaseId;
use super::owner::OwnerId;
use super::pin::{ExtentProblem, PinId};
use super::range::ByteRange;

/// What holds a range against a layout change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    Pin,
    ExclusiveLease,
}

impl fmt::Display for HoldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HoldKind::Pin => "pin",
            HoldKind::ExclusiveLease => "exclusive lease",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    /// Pin without an exclusive lease of the same owner covering the range (RFC: EPERM).
    #[error("{owner} holds no exclusive lease covering {range}")]
    NoExclusiveLease { owner: OwnerId, range: ByteRange },
    /// The owner may not act on another owner's lease or pin.
    #[error("{owner} does not own {what}")]
    NotOwner { owner: OwnerId, what: String },
    /// Pin (or any request) without an owner (RFC: EINVAL).
    #[error("request has no owner")]
    NoOwner,
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The range cannot be pinned as it is; `prepare` fixes holes, unwritten and shared extents.
    #[error("extent at file offset {file_offset:#x} (+{len:#x}) cannot be pinned: {problem}")]
    Unpinnable {
        file_offset: u64,
        len: u64,
        problem: ExtentProblem,
    },
    /// A lease with pins under it cannot be released.
    #[error("{lease} still has {pins} pin(s) under it")]
    LeaseBusy { lease: LeaseId, pins: usize },
    /// Two DMA mappings cannot overlap in one IOMMU address space (VFIO type1 refuses it, and refuses partial
    /// unmaps, so they cannot be shared either).
    #[error("{range} is already DMA-mapped by {pin} of {owner}")]
    DmaOverlap {
        pin: PinId,
        owner: OwnerId,
        range: ByteRange,
    },
    /// A region that still has leases or pins cannot be removed.
    #[error("region still has {leases} lease(s) and {pins} pin(s)")]
    RegionBusy { leases: usize, pins: usize },
    /// A layout change over a range another owner pinned or leased exclusively.
    #[error("{range} is held by {holder} ({holder_name}) with a {kind}")]
    TextBusy {
        holder: OwnerId,
        holder_name: String,
        kind: HoldKind,
        range: ByteRange,
    },
    /// A layout change over a range the requester itself pinned or leased exclusively (wins over ETXTBSY).
    #[error("{range} is held by the requester {holder} itself with a {kind}")]
    Deadlock {
        holder: OwnerId,
        kind: HoldKind,
        range: ByteRange,
    },
    /// A break is in progress on an overlapping range; no new leases there until it ends.
    #[error("a break is in progress on {range}")]
    BreakInProgress { range: ByteRange },
    /// The break deadline passed with policy `fail`: nothing changed, leases kept.
    #[error("break of {range} timed out; not released by {holders:?}")]
    TimedOut {
        range: ByteRange,
        holders: Vec<OwnerId>,
    },
    #[error("range out of bounds: {0}")]
    OutOfRange(String),
    /// Device-DAX regions have no file layout: leases, pins-with-leases and layout changes do not apply.
    #[error("{0}")]
    NotSupported(String),
    #[error("no such {0}")]
    NotFound(String),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, MapperError>;

impl MapperError {
    /// The errno the agent channel and the operator API answer with.
    pub fn errno(&self) -> i32 {
        match self {
            MapperError::NoExclusiveLease { .. } | MapperError::NotOwner { .. } => libc::EPERM,
            MapperError::NoOwner | MapperError::Invalid(_) | MapperError::Unpinnable { .. } => {
                libc::EINVAL
            }
            MapperError::LeaseBusy { .. }
            | MapperError::RegionBusy { .. }
            | MapperError::DmaOverlap { .. } => libc::EBUSY,
            MapperError::TextBusy { .. } => libc::ETXTBSY,
            MapperError::Deadlock { .. } => libc::EDEADLK,
            MapperError::BreakInProgress { .. } => libc::EAGAIN,
            MapperError::TimedOut { .. } => libc::ETIMEDOUT,
            MapperError::OutOfRange(_) => libc::ERANGE,
            MapperError::NotSupported(_) => libc::EOPNOTSUPP,
            MapperError::NotFound(_) => libc::ENOENT,
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
        libc::ENOMEM => "ENOMEM",
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        _ => "EUNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_rfc_errno() {
        let r = ByteRange::new(0, 4096);
        let o = OwnerId(1);
        let cases: Vec<(MapperError, i32, &str)> = vec![
            (
                MapperError::NoExclusiveLease { owner: o, range: r },
                libc::EPERM,
                "EPERM",
            ),
            (MapperError::NoOwner, libc::EINVAL, "EINVAL"),
            (
                MapperError::LeaseBusy {
                    lease: LeaseId(3),
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
            (MapperError::OutOfRange("x".into()), libc::ERANGE, "ERANGE"),
            (
                MapperError::NotSupported("x".into()),
                libc::EOPNOTSUPP,
                "EOPNOTSUPP",
            ),
            (MapperError::NotFound("x".into()), libc::ENOENT, "ENOENT"),
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
            holder: OwnerId(7),
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
