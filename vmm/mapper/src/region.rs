//! Regions: windows `[file_offset, file_offset + size)` of a backing file that one device maps. A region turns
//! the region-relative ranges callers name into file ranges (the hold tables are per file) and back.

use std::fs::File;
use std::sync::Arc;

use crate::error::{MapperError, Result};
use crate::host::{BackingKind, FileKey, HostMapping};
use crate::ids::RegionId;
use crate::introspect::RegionView;
use crate::pinnability::{DmaRule, KernelVersion};
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
    /// Whether the kernel lets a DMA mapper pin it, and why: classified when the region is added, replaced by
    /// the kernel's own answer when that differs.
    pub dma_rule: DmaRule,
    /// Being removed: no new leases or pins (see [`Mapper::set_closing`]).
    pub closing: bool,
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
        let private = desc.mapping.as_ref().is_some_and(|m| m.is_private());
        let dma_rule = DmaRule::classify(desc.kind, private, KernelVersion::running());
        Ok(Region {
            id,
            desc,
            key,
            dma_rule,
            closing: false,
        })
    }

    /// A region being removed takes no new leases or pins (ENODEV).
    pub fn require_open(&self) -> Result<()> {
        if self.closing {
            Err(MapperError::RegionClosing {
                region: self.id,
                name: self.label(),
            })
        } else {
            Ok(())
        }
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
        let out = || MapperError::OutOfWindow {
            region: self.id,
            name: self.label(),
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
            return Err(out());
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
        tracing::debug!(region = %region.label(), kind = %region.desc.kind, file_offset = region.desc.file_offset, size = region.desc.size, dma = region.dma_rule.name(), "region added");
        st.insert_region(region);
        Ok(id)
    }

    /// Removes a region that has no leases, pins or transient pins left on it (EBUSY otherwise).
    pub fn remove_region(&self, region: RegionId) -> Result<()> {
        let mut st = self.lock();
        st.region(region)?;
        let leases = st.leases.values().filter(|l| l.region == region).count();
        let pins = st.pins.values().filter(|p| p.region == region).count();
        let transients = st.region(region)?.view(&st).in_flight_io;
        if leases + pins + transients > 0 {
            return Err(MapperError::RegionBusy {
                region,
                name: st.region(region)?.label(),
                leases,
                pins,
                transients,
            });
        }
        st.remove_region(region);
        Ok(())
    }

    /// Marks a region as being removed (`true`) or no longer (`false`, a removal that failed). While it is,
    /// new leases and pins on it are refused with ENODEV; those already held, layout changes and the VMM's own
    /// transient pins go on. A removal sets it before it breaks the region's leases, so that nothing new can be
    /// taken between the break and the end of the removal.
    pub fn set_closing(&self, region: RegionId, closing: bool) -> Result<()> {
        let mut st = self.lock();
        st.region(region)?;
        if let Some(r) = st.regions.get_mut(&region) {
            r.closing = closing;
        }
        Ok(())
    }

    /// How `region` is named in messages: the operator's name, else its id.
    pub(crate) fn label_of(&self, region: RegionId) -> String {
        self.lock()
            .region(region)
            .map_or_else(|_| region.to_string(), Region::label)
    }

    /// Every region, by id.
    pub fn regions(&self) -> Vec<RegionView> {
        let st = self.lock();
        let mut v: Vec<RegionView> = st.regions.values().map(|r| r.view(&st)).collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// One region's description.
    pub fn region(&self, region: RegionId) -> Result<RegionView> {
        let st = self.lock();
        Ok(st.region(region)?.view(&st))
    }
}

#[cfg(test)]
mod tests {
    use crate::test_files::TestRegion;
    use crate::*;

    /// A region being removed refuses new leases and pins with ENODEV naming it; what is held stays, the VMM's
    /// own I/O and layout changes go on, and a removal that failed opens it again.
    #[test]
    fn a_closing_region_takes_no_new_leases_or_pins() {
        let t = TestRegion::on_tmp(16);
        let p = t.page;
        let r = t.add_window(0, 16);
        let m = &t.mapper;
        let (a, b) = (m.add_owner("a"), m.add_owner("b"));
        let held = m.acquire(a, r, 0, 4 * p, LeaseMode::Exclusive).unwrap();
        m.set_closing(r, true).unwrap();
        let e = m.acquire(b, r, 8 * p, p, LeaseMode::Shared).unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV);
        assert_eq!(e.errno_name(), "ENODEV");
        assert!(e.to_string().contains("is being removed"), "{e}");
        assert_eq!(m.pin(a, r, 0, p).unwrap_err().errno(), libc::ENODEV);
        assert_eq!(m.lease_count(a), 1);
        drop(m.transient(r, 8 * p, p).unwrap());
        m.punch(None, r, 12 * p, p).unwrap();
        m.release(a, held).unwrap();
        m.set_closing(r, false).unwrap();
        m.acquire(b, r, 8 * p, p, LeaseMode::Shared).unwrap();
        let gone = RegionId::from_raw(9999);
        assert_eq!(m.set_closing(gone, true).unwrap_err().errno(), libc::ENOENT);
    }

    /// Every operation that names a range refuses one outside the window with ERANGE and changes nothing, on
    /// a region at a nonzero file offset; inside, len 0 runs to the end of the window.
    #[test]
    fn every_operation_refuses_ranges_outside_the_window_with_erange() {
        let t = TestRegion::on_tmp(16);
        let p = t.page;
        // Pages [4, 10) of the file.
        let r = t.add_window(4, 6);
        let m = &t.mapper;
        let o = m.add_owner("o");
        let outside = [
            (6 * p, 1),
            (5 * p, 2 * p),
            (7 * p, 0),
            (u64::MAX - 1, 4),
            (0, 7 * p),
        ];
        for (off, len) in outside {
            let what = format!("[{off:#x}, +{len:#x})");
            let errs: Vec<(&str, i32)> = vec![
                (
                    "acquire",
                    m.acquire(o, r, off, len, LeaseMode::Shared)
                        .unwrap_err()
                        .errno(),
                ),
                ("pin", m.pin(o, r, off, len).unwrap_err().errno()),
                (
                    "prepare",
                    m.prepare(o, r, off, len, &mut |_| {}).unwrap_err().errno(),
                ),
                ("punch", m.punch(None, r, off, len).unwrap_err().errno()),
                ("zero", m.zero(None, r, off, len).unwrap_err().errno()),
                ("transient", m.transient(r, off, len).unwrap_err().errno()),
                (
                    "lease_holders",
                    m.lease_holders(r, off, len).unwrap_err().errno(),
                ),
                (
                    "pin_holders",
                    m.pin_holders(r, off, len).unwrap_err().errno(),
                ),
            ];
            for (op, errno) in errs {
                assert_eq!(errname(errno), "ERANGE", "{op} {what}");
            }
        }
        // Grow past the window would change bytes outside it.
        m.shrink(None, r, 5 * p).unwrap_err(); // not the file's tail
        let tail = t.add_window(10, 6);
        assert_eq!(m.grow(None, tail, 7 * p).unwrap_err().errno(), libc::ERANGE);
        // Nothing was taken or changed.
        assert!(m
            .snapshot()
            .owners
            .iter()
            .all(|o| o.leases.is_empty() && o.pins.is_empty()));
        for page in 0..16 {
            assert_eq!(t.read_file(page * p, 1)[0], t.fill_byte(page * p));
        }
        assert_eq!(t.file_size(), 16 * p);
        // Inside the window, len 0 means to its end, and ranges come back region-relative.
        let l = m.acquire(o, r, 2 * p, 0, LeaseMode::Shared).unwrap();
        let view = m.snapshot().leases();
        assert_eq!(view[0].1.id, l);
        assert_eq!(view[0].1.range, ByteRange::new(2 * p, 6 * p));
        // The whole file sees it: the first region (the whole file's first 16 pages) lists it at file page 6.
        assert_eq!(m.lease_holders(t.region, 6 * p, p).unwrap().len(), 1);
        assert!(m.lease_holders(t.region, 3 * p, p).unwrap().is_empty());
    }

    fn errname(e: i32) -> &'static str {
        errno_name(e)
    }

    #[test]
    fn regions_must_be_page_aligned_and_mapped_exactly() {
        let t = TestRegion::on_tmp(4);
        let m = &t.mapper;
        let f = t.file.clone();
        for (off, size) in [(1, t.page), (0, t.page + 1), (0, 0)] {
            let e = m
                .add_region(RegionDesc::new(f.clone(), off, size, BackingKind::Regular))
                .unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{off} {size}");
        }
        let e = m
            .add_region(
                RegionDesc::new(f.clone(), 0, 2 * t.page, BackingKind::Regular)
                    .with_mapping(t.map.clone()),
            )
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "mapping larger than the window");
        let e = m
            .add_region(RegionDesc::new(
                f,
                i64::MAX as u64 & !(t.page - 1),
                4 * t.page,
                BackingKind::Regular,
            ))
            .unwrap_err();
        assert_eq!(e.errno(), libc::ERANGE);
        let listed = m.regions();
        assert_eq!(listed.len(), 1, "refused regions are not added");
        assert_eq!(m.region(t.region).unwrap().size, 4 * t.page);
    }
}
