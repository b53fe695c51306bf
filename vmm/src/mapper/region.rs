//! Regions as the mapper sees them: a backing file (+ offset), a size, the backing kind, the host mapping the
//! VMM made of it (for populate/mlock when pinning) and the IOVA base the DMA mapper should use (the guest
//! physical address of the region, as VFIO does for guests). Leases, pins, transient pins and breaks of a
//! region each live in their own interval index.

use std::fmt;
use std::fs::File;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::pmem::BackingKind;

use super::error::{MapperError, Result};
use super::host_mapping::HostMapping;
use super::interval::IntervalIndex;
use super::range::ByteRange;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region:{}", self.0)
    }
}

/// What the VMM hands the mapper for each pmem region.
#[derive(Clone, Debug)]
pub struct RegionDesc {
    pub file: Arc<File>,
    /// Where region offset 0 lies in the file.
    pub file_offset: u64,
    pub size: u64,
    pub kind: BackingKind,
    /// The host mapping of `[file_offset, file_offset + size)`; pins need it (populate, mlock, DMA vaddr).
    pub mapping: Option<HostMapping>,
    /// IOVA of region offset 0 for the DMA mapper.
    pub iova: u64,
}

#[derive(Debug)]
pub(super) struct Region {
    pub desc: RegionDesc,
    pub leases: IntervalIndex,
    pub pins: IntervalIndex,
    pub transients: IntervalIndex,
    pub breaks: IntervalIndex,
}

impl Region {
    pub fn new(desc: RegionDesc) -> Self {
        Region {
            desc,
            leases: IntervalIndex::new(),
            pins: IntervalIndex::new(),
            transients: IntervalIndex::new(),
            breaks: IntervalIndex::new(),
        }
    }

    /// Device-DAX has no file layout: leases and layout changes are refused (requirement 14).
    pub fn require_layout(&self) -> Result<()> {
        if self.desc.kind.has_layout() {
            Ok(())
        } else {
            Err(MapperError::NotSupported(format!(
                "{} backing has no file layout: layout leases and layout changes do not apply",
                self.desc.kind
            )))
        }
    }

    /// The range of a break in progress that overlaps `range`, if any.
    pub fn breaking(&self, range: ByteRange) -> Option<ByteRange> {
        let mut found = None;
        self.breaks.for_each_overlap(range, |r, _| {
            found = Some(r);
            ControlFlow::Break(())
        });
        found
    }

    /// Current size of the backing file in region offsets (0 if the file ends before the region starts).
    pub fn file_size(&self) -> Result<u64> {
        let len = self
            .desc
            .file
            .metadata()
            .map_err(|e| MapperError::io("fstat backing file", e))?
            .len();
        Ok(len.saturating_sub(self.desc.file_offset))
    }
}
