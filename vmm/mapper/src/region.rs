//! Regions: windows `[file_offset, file_offset + size)` of a backing file that one device maps. A region turns
//! the region-relative ranges callers name into file ranges (the hold tables are per file) and back.

use std::fs::File;
use std::sync::Arc;

use crate::error::{MapperError, Result};
use crate::host::{BackingKind, FileKey, HostMapping};
use crate::ids::RegionId;
use crate::introspect::RegionView;
use crate::range::{page_size, ByteRange};
use crate::Mapper;

/// What a VMM hands the mapper for each region.
#[derive(Clone, Debug)]
pub struct RegionDesc {
    pub(crate) file: Arc<File>,
    pub(crate) file_offset: u64,
    pub(crate) size: u64,
    pub(crate) kind: BackingKind,
    pub(crate) mapping: Option<Arc<HostMapping>>,
    pub(crate) iova: u64,
    pub(crate) name: String,
}

impl RegionDesc {
    /// The window `[file_offset, file_offset + size)` of `file` (both page-aligned), of backing `kind` (from
    /// [`crate::probe`]). The file must stay open as long as the region exists (the `Arc` sees to that).
    pub fn new(file: Arc<File>, file_offset: u64, size: u64, kind: BackingKind) -> Self {
        RegionDesc {
            file,
            file_offset,
            size,
            kind,
            mapping: None,
            iova: 0,
            name: String::new(),
        }
    }

    /// The host mapping of exactly this window; pins need it (populate, mlock, the DMA mapper's vaddr).
    pub fn with_mapping(mut self, mapping: Arc<HostMapping>) -> Self {
        self.mapping = Some(mapping);
        self
    }

    /// The IOVA of region offset 0 for the DMA mapper (a VMM uses the window's guest physical address).
    pub fn with_iova(mut self, iova: u64) -> Self {
        self.iova = iova;
        self
    }

    /// The name logs and introspection show (the operator's device id).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }
}

#[derive(Debug)]
pub(crate) struct Region {
    pub id: RegionId,
    pub desc: RegionDesc,
    pub key: FileKey,
}

impl Region {
    /// Checks a new region's window: page-aligned, inside the largest file offset, covered by its mapping.
    pub fn new(id: RegionId, desc: RegionDesc) -> Result<Self> {
        let page = page_size();
        if desc.size == 0 || desc.size % page != 0 || desc.file_offset % page != 0 {
            return Err(MapperError::BadRegion(
                "window offset and size must be nonzero multiples of the page size",
            ));
        }
        desc.file_offset
            .checked_add(desc.size)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(MapperError::Overflow {
                off: desc.file_offset,
                len: desc.size,
            })?;
        if desc
            .mapping
            .as_ref()
            .is_some_and(|m| (m.len() as u64) != desc.size)
        {
            return Err(MapperError::BadRegion(
                "the host mapping must cover exactly the window",
            ));
        }
        let key = FileKey::of(&desc.file).map_err(|e| MapperError::io("fstat backing file", e))?;
        Ok(Region { id, desc, key })
    }

    /// Device-DAX has no file layout: leases and layout changes are refused.
    pub fn require_layout(&self) -> Result<()> {
        if self.desc.kind.has_layout() {
            Ok(())
        } else {
            Err(MapperError::NoLayout {
                kind: self.desc.kind,
            })
        }
    }

    /// The region-relative range a request names: page-rounded outward, inside the window (ERANGE), `len == 0`
    /// to the end of the window.
    pub fn request(&self, off: u64, len: u64) -> Result<ByteRange> {
        let size = self.desc.size;
        let out = MapperError::OutOfWindow {
            region: self.id,
            off,
            len,
            size,
        };
        let end = if len == 0 {
            size
        } else {
            off.checked_add(len)
                .ok_or(MapperError::Overflow { off, len })?
        };
        if off >= size || end > size {
            return Err(out);
        }
        let page = page_size();
        // size is a page multiple, so rounding the end up stays inside the window.
        Ok(ByteRange::new(off & !(page - 1), end.div_ceil(page) * page))
    }

    /// A region-relative range as file offsets.
    pub fn to_file(&self, r: ByteRange) -> ByteRange {
        let base = self.desc.file_offset;
        ByteRange::new(base + r.start, r.end.saturating_add(base))
    }

    /// The part of a file range inside this window, region-relative (None if it misses the window).
    pub fn to_region(&self, r: ByteRange) -> Option<ByteRange> {
        let base = self.desc.file_offset;
        let w = ByteRange::new(base, base + self.desc.size);
        r.intersect(&w)
            .map(|x| ByteRange::new(x.start - base, x.end - base))
    }

    /// The window as file offsets.
    pub fn window(&self) -> ByteRange {
        self.to_file(ByteRange::new(0, self.desc.size))
    }

    /// Current size of the backing file.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self
            .desc
            .file
            .metadata()
            .map_err(|e| MapperError::io("fstat backing file", e))?
            .len())
    }

    /// How the region is named in logs: the operator's name, else its id.
    pub fn label(&self) -> String {
        if self.desc.name.is_empty() {
            self.id.to_string()
        } else {
            self.desc.name.clone()
        }
    }
}

impl Mapper {
    /// Adds a region: a page-aligned window of a file, with the host mapping of exactly that window if pins are
    /// to populate and lock it. EINVAL for a bad window or mapping, ERANGE past the largest file offset.
    pub fn add_region(&self, desc: RegionDesc) -> Result<RegionId> {
        let mut st = self.lock();
        let id = RegionId::from_raw(st.next_id());
        let region = Region::new(id, desc)?;
        tracing::debug!(region = %region.label(), kind = %region.desc.kind, file_offset = region.desc.file_offset, size = region.desc.size, "region added");
        st.insert_region(region);
        Ok(id)
    }

    /// Removes a region that has no leases, pins or transient pins left on it (EBUSY otherwise).
    pub fn remove_region(&self, region: RegionId) -> Result<()> {
        let mut st = self.lock();
        st.region(region)?;
        let leases = st.leases.values().filter(|l| l.region == region).count();
        let pins = st.pins.values().filter(|p| p.region == region).count();
        let reg = st.region(region)?;
        let window = reg.window();
        let transients = st
            .transients
            .values()
            .filter(|(k, r)| *k == reg.key && r.overlaps(&window))
            .count();
        if leases + pins + transients > 0 {
            return Err(MapperError::RegionBusy {
                region,
                leases,
                pins,
                transients,
            });
        }
        st.remove_region(region);
        Ok(())
    }

    /// Every region, by id.
    pub fn regions(&self) -> Vec<RegionView> {
        let st = self.lock();
        let mut v: Vec<RegionView> = st.regions.values().map(Region::view).collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// One region's description.
    pub fn region(&self, region: RegionId) -> Result<RegionView> {
        Ok(self.lock().region(region)?.view())
    }
}
