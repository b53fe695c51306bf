//! The mapper's ids and ranges as the API writes them: plain integers on the wire, one place that knows how.

use crate::mapper::{BreakId, ByteRange, LeaseId, OwnerId, PinId, RegionId, OPEN_END};

pub fn owner_raw(id: OwnerId) -> u64 {
    id.0
}

pub fn owner_from_raw(raw: u64) -> OwnerId {
    OwnerId(raw)
}

pub fn lease_raw(id: LeaseId) -> u64 {
    id.0
}

pub fn lease_from_raw(raw: u64) -> LeaseId {
    LeaseId(raw)
}

pub fn pin_raw(id: PinId) -> u64 {
    id.0
}

pub fn break_raw(id: BreakId) -> u64 {
    id.0
}

pub fn region_raw(id: RegionId) -> u64 {
    id.0
}

/// The length the API reports for a range: 0 for an open end ("to the end", as requests say it).
pub fn range_len(r: &ByteRange) -> u64 {
    if r.end == OPEN_END {
        0
    } else {
        r.end - r.start
    }
}
