//! Ranges as the API writes them.

use daxvisor_mapper::{ByteRange, OPEN_END};

/// The length the API reports for a range: 0 for an open end ("to the end", as requests say it).
pub fn range_len(r: &ByteRange) -> u64 {
    if r.end == OPEN_END {
        0
    } else {
        r.end - r.start
    }
}
