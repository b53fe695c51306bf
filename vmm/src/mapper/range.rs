//! Byte ranges of a region and the rounding rules of DESIGN.md: every range is rounded outward to pages (a
//! check must cover every page the request touches), length 0 means "to the end of the file however it grows"
//! (an open end), shrink covers [new size, end) and grow covers from the page holding the old last byte.

use std::fmt;

use super::error::{MapperError, Result};

/// `end == OPEN_END` is the open end: the range follows the file however far it grows.
pub const OPEN_END: u64 = u64::MAX;

/// Half-open `[start, end)` in region offsets. Never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

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

    /// `(off, len)` from a request, rounded outward to pages; `len == 0` is open-ended. ERANGE on overflow.
    pub fn from_request(off: u64, len: u64) -> Result<Self> {
        let page = page_size();
        let start = off & !(page - 1);
        if len == 0 {
            return Ok(ByteRange::new(start, OPEN_END));
        }
        let end = off.checked_add(len).ok_or_else(|| {
            MapperError::OutOfRange(format!("offset {off:#x} + length {len:#x} overflows"))
        })?;
        let end = match end.checked_add(page - 1) {
            Some(e) => e & !(page - 1),
            None => OPEN_END,
        };
        Ok(ByteRange::new(start, end))
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

    pub fn is_open(&self) -> bool {
        self.end == OPEN_END
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    pub fn contains(&self, other: &ByteRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let r = ByteRange::new(self.start.max(other.start), self.end.min(other.end));
        (!r.is_empty()).then_some(r)
    }

    /// A range for operations confined to a region of `size` bytes: the open end becomes `size`, anything else
    /// must lie inside (ERANGE).
    pub fn within(off: u64, len: u64, size: u64) -> Result<Self> {
        let r = ByteRange::from_request(off, len)?;
        let r = if r.is_open() { r.clamp_end(size) } else { r };
        if r.is_empty() || r.end > size {
            return Err(MapperError::OutOfRange(format!(
                "{r} outside a region of {size:#x} bytes"
            )));
        }
        Ok(r)
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

    #[test]
    fn requests_round_outward_to_pages() {
        let p = page_size();
        assert_eq!(ByteRange::from_request(1, 1).unwrap(), ByteRange::new(0, p));
        assert_eq!(
            ByteRange::from_request(p - 1, 2).unwrap(),
            ByteRange::new(0, 2 * p)
        );
        assert_eq!(
            ByteRange::from_request(p, p).unwrap(),
            ByteRange::new(p, 2 * p)
        );
    }

    #[test]
    fn zero_length_is_open_ended() {
        let r = ByteRange::from_request(5000, 0).unwrap();
        assert_eq!(r.start, 4096);
        assert!(r.is_open());
        // An open range overlaps anything at or past its start, however far the file grows.
        assert!(r.overlaps(&ByteRange::new(1 << 50, (1 << 50) + 4096)));
        assert!(!r.overlaps(&ByteRange::new(0, 4096)));
        assert_eq!(r.to_string(), "[0x1000, EOF)");
    }

    #[test]
    fn overflow_is_erange() {
        let e = ByteRange::from_request(u64::MAX - 10, 100).unwrap_err();
        assert_eq!(e.errno(), libc::ERANGE);
        // Rounding the end past u64::MAX becomes the open end rather than wrapping.
        assert!(ByteRange::from_request(u64::MAX - 10, 5).unwrap().is_open());
    }

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
