//! Byte ranges and the rounding rules: every range is rounded outward to pages (a check must cover every page
//! the request touches; regions round requests in `Region::request`), an open end means "to the end of the
//! file however it grows" (file-level requests only), shrink covers [new size, end) and grow covers from the
//! page holding the old last byte.

use std::fmt;

/// `end == OPEN_END` is the open end: the range follows the file however far it grows.
pub const OPEN_END: u64 = u64::MAX;

/// Half-open `[start, end)` in region offsets. Never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte, or [`OPEN_END`].
    pub end: u64,
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; _SC_PAGESIZE is always supported on Linux.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

impl ByteRange {
    /// A range as given; callers make sure `start < end`.
    pub const fn new(start: u64, end: u64) -> Self {
        ByteRange { start, end }
    }

    /// What a shrink to `new_size` must check: every page from the one holding `new_size` to the open end
    /// (the partial page at the new end gets zeroed, so it counts).
    pub fn for_shrink(new_size: u64) -> Self {
        ByteRange::new(new_size & !(page_size() - 1), OPEN_END)
    }

    /// What a grow from `old_size` must check: the old last block (tail zeroing, COW of a shared tail,
    /// delalloc) up to the open end, as Chinner asked for truncate-up.
    pub fn for_grow(old_size: u64) -> Self {
        let page = page_size();
        let last_block = old_size.saturating_sub(1) & !(page - 1);
        ByteRange::new(last_block, OPEN_END)
    }

    /// Whether the range runs to the end of the file however it grows.
    pub fn is_open(&self) -> bool {
        self.end == OPEN_END
    }

    /// Bytes in the range (huge for an open range).
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether the two share a byte.
    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether `other` lies inside.
    pub fn contains(&self, other: &ByteRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// The common part, if any.
    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let r = ByteRange::new(self.start.max(other.start), self.end.min(other.end));
        (!r.is_empty()).then_some(r)
    }

    /// The range with its open end cut at `limit` (for operations that need a finite length).
    pub fn clamp_end(&self, limit: u64) -> ByteRange {
        ByteRange::new(self.start, self.end.min(limit))
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_open() {
            write!(f, "[{:#x}, EOF)", self.start)
        } else {
            write!(f, "[{:#x}, {:#x})", self.start, self.end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn shrink_and_grow_ranges() {
        let p = page_size();
        assert_eq!(
            ByteRange::for_shrink(3 * p + 5),
            ByteRange::new(3 * p, OPEN_END)
        );
        assert_eq!(
            ByteRange::for_shrink(3 * p),
            ByteRange::new(3 * p, OPEN_END)
        );
        // Grow from a size ending mid-page checks that page; from a page-aligned size, the last full page.
        assert_eq!(
            ByteRange::for_grow(3 * p + 5),
            ByteRange::new(3 * p, OPEN_END)
        );
        assert_eq!(ByteRange::for_grow(3 * p), ByteRange::new(2 * p, OPEN_END));
        assert_eq!(ByteRange::for_grow(0), ByteRange::new(0, OPEN_END));
    }

    #[test]
    fn intersections() {
        let a = ByteRange::new(0, 8192);
        let b = ByteRange::new(4096, OPEN_END);
        assert_eq!(a.intersect(&b), Some(ByteRange::new(4096, 8192)));
        assert_eq!(a.intersect(&ByteRange::new(8192, 9000)), None);
        assert!(b.contains(&ByteRange::new(1 << 40, 1 << 41)));
    }
}
