//! Pins: a range handed to a device for DMA. A pin needs an owner (EINVAL), an exclusive lease of the same owner
//! covering the range (EPERM), and extents that cannot move: FIEMAP over the whole range must show no hole (a
//! gap between extents), and no extent flagged UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED,
//! DATA_INLINE, DATA_TAIL, UNWRITTEN or SHARED (LAST and MERGED are harmless). Then the range is populated
//! (MADV_POPULATE_WRITE), mlocked (both in one pass) and DMA-mapped.
//!
//! The pin is recorded (pending) before the slow part runs unlocked, so a layout change racing with it already
//! sees ETXTBSY and a release of its lease sees EBUSY.
//!
//! RAM filesystems (tmpfs, hugetlbfs) have no extent map: their pages are RAM, allocated by populate and kept
//! resident by mlock, so the FIEMAP step is skipped there. Device-DAX has no file layout at all: pins there need
//! no lease and no FIEMAP.

use std::fs::File;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::dma::{DmaMapper, DmaRange};
use crate::error::{Held, MapperError, Missing, Result};
use crate::host::{first_problem, fs_kind, BackingKind, FileKey, FsKind, HostMapping};
use crate::ids::{LeaseId, OwnerId, PinId, RegionId};
use crate::lease::LeaseMode;
use crate::pinnability::DmaRule;
use crate::range::ByteRange;
use crate::Mapper;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PinState {
    /// Recorded, validation/populate/mlock/DMA map in progress.
    Pending,
    Active,
}

/// The resident, locked part of a mapping a pin keeps (the mapping stays alive as long as the pin).
#[derive(Debug)]
pub(crate) struct Locked {
    mapping: Arc<HostMapping>,
    off: usize,
    len: usize,
}

#[derive(Debug)]
pub(crate) struct Pin {
    pub owner: OwnerId,
    pub region: RegionId,
    pub key: FileKey,
    /// File offsets.
    pub range: ByteRange,
    /// The exclusive lease covering it (none on device-DAX).
    pub lease: Option<LeaseId>,
    pub state: PinState,
    pub locked: Option<Locked>,
    /// DMA mapping (iova, len).
    pub dma: Option<(u64, u64)>,
    /// Set when a revoke tore the DMA mapping down while the pin stayed.
    pub dma_revoked: bool,
}

impl Pin {
    /// DMA unmap first, then munlock.
    pub fn teardown(&self, dma: Option<&dyn DmaMapper>) {
        if let (Some((iova, len)), Some(d)) = (self.dma, dma) {
            if let Err(e) = d.unmap(iova, len) {
                tracing::error!(iova, len, error = %e, "DMA unmap failed");
            }
        }
        if let Some(l) = &self.locked {
            l.mapping.unlock(l.off, l.len);
        }
    }
}

struct PinPlan {
    region: RegionId,
    kind: BackingKind,
    file: Arc<File>,
    fs: Option<FsKind>,
    file_range: ByteRange,
    mapping: Arc<HostMapping>,
    /// Offset and length in the mapping.
    off: usize,
    len: usize,
    iova: u64,
}

impl Mapper {
    /// Pins `[off, off+len)` of `region` (rounded out to pages; `len == 0`: to the end of the window), handing
    /// it to the DMA mapper when the mapper has one.
    pub fn pin(&self, owner: OwnerId, region: RegionId, off: u64, len: u64) -> Result<PinId> {
        self.pin_with(owner, region, off, len, self.dma.is_some())
    }

    /// As [`Mapper::pin`], saying whether the pin is for DMA: a VMM with a passthrough device pins for layout
    /// stability alone (`dma == false`, every backing) as well as for its device (`dma == true`: mapped at the
    /// region's IOVA plus the offset, under the kernel's pinning rules). `dma` without a DMA mapper is `EINVAL`.
    pub fn pin_with(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        dma: bool,
    ) -> Result<PinId> {
        self.pin_inner(owner, region, off, len, dma, None)
    }

    /// A DMA pin of `[off, off+len)` of `region` mapped at `iova` instead of the region's own IOVA plus the
    /// offset: a virtual IOMMU's MAP, where the guest chooses the I/O address. The pin records the IOVA, so its
    /// unpin, a revoke or a fence unmaps exactly what was mapped. Overlapping DMA pins are refused as for
    /// [`Mapper::pin_with`] (`EBUSY`): one guest physical page is mapped at most once.
    pub fn pin_dma_at(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        iova: u64,
    ) -> Result<PinId> {
        self.pin_inner(owner, region, off, len, true, Some(iova))
    }

    fn pin_inner(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        dma: bool,
        iova: Option<u64>,
    ) -> Result<PinId> {
        let dma = match (dma, &self.dma) {
            (false, _) => None,
            (true, Some(d)) => Some(d.clone()),
            (true, None) => {
                // EINVAL: no device does DMA in this VM.
                return Err(MapperError::io(
                    "DMA pin without a DMA mapper",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
        };
        let dma = dma.as_deref();
        let (id, plan) = self.claim_pin(owner, region, off, len, dma, iova)?;
        match self.pin_unlocked(&plan, dma) {
            Ok(mapped) => {
                let locked = Locked {
                    mapping: plan.mapping.clone(),
                    off: plan.off,
                    len: plan.len,
                };
                let mut st = self.lock();
                match st.pins.get_mut(&id) {
                    Some(p) => {
                        p.state = PinState::Active;
                        p.locked = Some(locked);
                        p.dma = mapped;
                        tracing::debug!(%owner, %id, range = %p.range, "pinned");
                        Ok(id)
                    }
                    None => {
                        // The owner exited while we were pinning: undo and report it gone.
                        drop(st);
                        if let (Some((iova, len)), Some(d)) = (mapped, dma) {
                            if let Err(e) = d.unmap(iova, len) {
                                tracing::error!(iova, len, error = %e, "DMA unmap failed");
                            }
                        }
                        plan.mapping.unlock(plan.off, plan.len);
                        Err(MapperError::NotFound(Missing::Owner(owner)))
                    }
                }
            }
            Err(e) => {
                let mut st = self.lock();
                if let MapperError::DmaNotPinnable { rule, .. } = &e {
                    // The kernel refused what the rules allow: its answer stands for the region from now on.
                    if let Some(reg) = st.regions.get_mut(&region) {
                        tracing::warn!(region = %reg.label(), kind = %reg.desc.kind, classified = reg.dma_rule.name(), %rule, "the kernel refused a DMA pin the rules allow");
                        reg.dma_rule = *rule;
                    }
                }
                // Nothing of the pin was set up yet (its own steps undid themselves): just forget it.
                st.drop_pin(id, None);
                drop(st);
                self.changed.notify_all();
                Err(e)
            }
        }
    }

    /// Checks the request and records a pending pin so that changes and releases see it from now on.
    fn claim_pin(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        dma: Option<&dyn DmaMapper>,
        iova: Option<u64>,
    ) -> Result<(PinId, PinPlan)> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let reg = st.region(region)?;
        reg.require_open()?;
        let holds = st.holds(reg)?;
        let desc = &reg.desc;
        let mapping = desc.mapping.clone().ok_or(MapperError::NoMapping(region))?;
        let range = reg.request(off, len)?;
        // A DMA pin the kernel will refuse fails here, before anything is locked or mapped.
        if dma.is_some_and(|d| d.long_term_pins()) && !reg.dma_rule.pinnable() {
            return Err(MapperError::DmaNotPinnable {
                region,
                name: reg.label(),
                kind: desc.kind,
                rule: reg.dma_rule,
            });
        }
        let file_range = reg.to_file(range);
        if dma.is_some() {
            let mut clash = None;
            holds.pins.for_each_overlap(file_range, |r, id| {
                let id = PinId::from_raw(id);
                clash = st.pins.get(&id).map(|p| (id, p.owner, r));
                ControlFlow::Break(())
            });
            if let Some((pin, owner, r)) = clash {
                return Err(MapperError::DmaOverlap {
                    pin,
                    owner,
                    range: reg.to_region(r).unwrap_or(range),
                });
            }
        }
        let devdax = desc.kind == BackingKind::DevDax;
        let lease = if devdax {
            None
        } else {
            let mut covering = None;
            holds.leases.for_each_overlap(file_range, |r, id| {
                let id = LeaseId::from_raw(id);
                if r.contains(&file_range) {
                    if let Some(l) = st.leases.get(&id) {
                        if l.owner == owner && l.mode == LeaseMode::Exclusive {
                            covering = Some(id);
                            return ControlFlow::Break(());
                        }
                    }
                }
                ControlFlow::Continue(())
            });
            Some(covering.ok_or(MapperError::NoExclusiveLease { owner, range })?)
        };
        let fs = if devdax {
            None
        } else {
            Some(fs_kind(desc.file.as_ref()).map_err(|e| MapperError::io("fstatfs", e))?)
        };
        let plan = PinPlan {
            region,
            kind: desc.kind,
            file: desc.file.clone(),
            fs,
            file_range,
            mapping,
            off: range.start as usize,
            len: range.len() as usize,
            iova: iova.unwrap_or(desc.iova + range.start),
        };
        let key = reg.key;
        let id = PinId::from_raw(st.next_id());
        st.insert_pin(
            id,
            Pin {
                owner,
                region,
                key,
                range: file_range,
                lease,
                state: PinState::Pending,
                locked: None,
                dma: None,
                dma_revoked: false,
            },
        );
        Ok((id, plan))
    }

    /// Validate extents, populate, mlock, DMA map; undoes its own steps on failure.
    fn pin_unlocked(
        &self,
        plan: &PinPlan,
        dma: Option<&dyn DmaMapper>,
    ) -> Result<Option<(u64, u64)>> {
        if let Some(fs) = plan.fs.filter(|fs| !fs.is_ram()) {
            let r = plan.file_range;
            match first_problem(plan.file.as_raw_fd(), r.start, r.end) {
                Ok(None) => {}
                Ok(Some((file_offset, len, problem))) => {
                    return Err(MapperError::Unpinnable {
                        file_offset,
                        len,
                        problem,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(MapperError::NoExtentMap { fs })
                }
                Err(e) => return Err(MapperError::io("FIEMAP", e)),
            }
        }
        plan.mapping
            .lock(plan.off, plan.len)
            .map_err(|e| MapperError::io("MADV_POPULATE_WRITE + mlock", e))?;
        if let Some(d) = dma {
            let range = DmaRange::new(&plan.mapping, plan.off, plan.len);
            if let Err(e) = d.map(plan.iova, range) {
                plan.mapping.unlock(plan.off, plan.len);
                // EOPNOTSUPP and EFAULT are the kernel's long-term pinning refusing these pages (the range is
                // a live mapping of the region, so EFAULT cannot be a bad address).
                return Err(match e.raw_os_error() {
                    Some(errno @ (libc::EOPNOTSUPP | libc::EFAULT)) if d.long_term_pins() => {
                        MapperError::DmaNotPinnable {
                            region: plan.region,
                            name: self.label_of(plan.region),
                            kind: plan.kind,
                            rule: DmaRule::KernelRefused(errno),
                        }
                    }
                    _ => MapperError::io("DMA map", e),
                });
            }
            return Ok(Some((plan.iova, plan.len as u64)));
        }
        Ok(None)
    }

    /// Unpins: DMA unmap, munlock, forget. EPERM for another owner's pin.
    pub fn unpin(&self, owner: OwnerId, pin: PinId) -> Result<()> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let p = st
            .pins
            .get(&pin)
            .ok_or(MapperError::NotFound(Missing::Pin(pin)))?;
        if p.owner != owner {
            return Err(MapperError::NotOwner {
                owner,
                what: Held::Pin(pin),
            });
        }
        if p.state == PinState::Pending {
            return Err(MapperError::NotFound(Missing::Pin(pin)));
        }
        st.drop_pin(pin, self.dma.as_deref());
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// Who pins `[off, off+len)` of `region`, from any region of the same file.
    pub fn pin_holders(
        &self,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<Vec<(PinId, OwnerId)>> {
        let st = self.lock();
        let reg = st.region(region)?;
        let range = reg.to_file(reg.request(off, len)?);
        let mut out = Vec::new();
        st.holds(reg)?.pins.for_each_overlap(range, |_, id| {
            let id = PinId::from_raw(id);
            if let Some(p) = st.pins.get(&id) {
                out.push((id, p.owner));
            }
            ControlFlow::Continue(())
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::{mincore_resident, TestRegion};
    #[allow(unused_imports)]
    use crate::*;

    /// VmLck of this process, in KiB.
    fn locked_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn populate_and_lock_locks_and_faults_every_page() {
        let t = TestRegion::on_tmp(64);
        let before = locked_kib();
        t.map.lock(0, 64 * t.page as usize).unwrap();
        assert!(mincore_resident(t.map.addr(), 64 * t.page as usize));
        assert!(
            locked_kib() >= before + 64 * t.page / 1024,
            "VmLck did not grow by the range"
        );
        t.map.unlock(0, 64 * t.page as usize);
    }

    #[test]
    fn flags_print_by_name() {
        assert_eq!(
            ExtentFlags(ExtentFlags::UNWRITTEN | ExtentFlags::LAST).to_string(),
            "LAST|UNWRITTEN"
        );
        assert_eq!(
            ExtentFlags(ExtentFlags::SHARED | 0x4000_0000).to_string(),
            "SHARED|0x40000000"
        );
        assert_eq!(ExtentFlags(0).to_string(), "0x0");
        assert_eq!(
            ExtentFlags::REFUSED & (ExtentFlags::LAST | ExtentFlags::MERGED),
            0
        );
    }

    #[test]
    fn pin_needs_owner_and_own_exclusive_lease() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let b = m.add_owner("b");
            assert_eq!(
                m.pin(OwnerId::NONE, t.region, 0, t.page)
                    .unwrap_err()
                    .errno(),
                libc::EINVAL
            );
            // No lease at all, a shared lease, another owner's exclusive lease: EPERM, nothing recorded.
            assert_eq!(
                m.pin(a, t.region, 0, t.page).unwrap_err().errno(),
                libc::EPERM
            );
            m.acquire(a, t.region, 0, 2 * t.page, LeaseMode::Shared)
                .unwrap();
            m.acquire(b, t.region, 0, 2 * t.page, LeaseMode::Exclusive)
                .unwrap();
            assert_eq!(
                m.pin(a, t.region, 0, t.page).unwrap_err().errno(),
                libc::EPERM
            );
            // An exclusive lease that covers only part of the range is not enough.
            m.acquire(a, t.region, 0, t.page, LeaseMode::Exclusive)
                .unwrap();
            assert_eq!(
                m.pin(a, t.region, 0, 2 * t.page).unwrap_err().errno(),
                libc::EPERM
            );
            assert!(m.snapshot().pins().is_empty(), "{}", t.fs);
            let p = m.pin(a, t.region, 0, t.page).unwrap();
            assert_eq!(m.snapshot().pins().len(), 1);
            // Pinned pages are resident, locked, and mapped for DMA at region iova + offset.
            assert!(mincore_resident(t.map.addr(), t.page as usize), "{}", t.fs);
            assert!(locked_kib() >= t.page / 1024, "{}: nothing mlocked", t.fs);
            assert_eq!(
                t.dma.mappings(),
                vec![(t.iova, t.map.addr(), t.page)],
                "{}",
                t.fs
            );
            assert_eq!(m.unpin(b, p).unwrap_err().errno(), libc::EPERM);
            m.unpin(a, p).unwrap();
            assert!(t.dma.mappings().is_empty());
            assert_eq!(m.unpin(a, p).unwrap_err().errno(), libc::ENOENT);
            // One IOMMU address space: a second pin over a DMA-mapped range is EBUSY naming the first.
            m.acquire(b, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            let p2 = m.pin(a, t.region, 0, t.page).unwrap();
            let e = m.pin(b, t.region, 0, 2 * t.page).unwrap_err();
            assert!(
                matches!(e, MapperError::DmaOverlap { pin, owner, .. } if pin == p2 && owner == a),
                "{e}"
            );
            assert_eq!(e.errno(), libc::EBUSY);
            m.pin(b, t.region, t.page, t.page).unwrap();
            // Past the region: ERANGE.
            assert_eq!(
                m.pin(a, t.region, 8 * t.page, t.page).unwrap_err().errno(),
                libc::ERANGE
            );
        }
    }

    #[test]
    fn releasing_a_lease_with_pins_is_ebusy_then_pins_need_a_new_lease() {
        for t in TestRegion::on_every_fs(4) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let l = m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            let p = m.pin(a, t.region, 0, 2 * t.page).unwrap();
            assert_eq!(
                m.release(a, l).unwrap_err().errno(),
                libc::EBUSY,
                "{}",
                t.fs
            );
            m.unpin(a, p).unwrap();
            m.release(a, l).unwrap();
            assert_eq!(
                m.pin(a, t.region, 0, t.page).unwrap_err().errno(),
                libc::EPERM,
                "{}",
                t.fs
            );
        }
    }

    #[test]
    fn sparse_file_hole_is_refused_naming_the_extent() {
        for t in TestRegion::on_every_fs(8) {
            if t.ram_fs {
                eprintln!(
                    "{}: no extent map on a RAM filesystem; holes are filled by populate there",
                    t.fs
                );
                continue;
            }
            let m = &t.mapper;
            let a = m.add_owner("a");
            m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            t.punch_raw(2 * t.page, t.page);
            let e = m.pin(a, t.region, 0, 4 * t.page).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{}: {e}", t.fs);
            match e {
                MapperError::Unpinnable {
                    file_offset,
                    problem: ExtentProblem::Hole,
                    ..
                } => {
                    assert_eq!(file_offset, 2 * t.page, "{}", t.fs)
                }
                other => panic!("{}: {other}", t.fs),
            }
            assert!(m.snapshot().pins().is_empty());
            assert!(t.dma.mappings().is_empty());
            // Around the hole it pins fine.
            m.pin(a, t.region, 0, 2 * t.page).unwrap();
            m.pin(a, t.region, 3 * t.page, t.page).unwrap();
        }
    }

    #[test]
    fn unwritten_extent_from_fallocate_is_refused() {
        for t in TestRegion::on_every_fs(8) {
            if t.ram_fs {
                continue;
            }
            let m = &t.mapper;
            let a = m.add_owner("a");
            m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            t.punch_raw(4 * t.page, 2 * t.page);
            t.fallocate_raw(4 * t.page, 2 * t.page);
            let e = m.pin(a, t.region, 0, 0).unwrap_err();
            match e {
                MapperError::Unpinnable {
                    file_offset,
                    problem: ExtentProblem::Flags(f),
                    ..
                } => {
                    assert_eq!(file_offset, 4 * t.page, "{}", t.fs);
                    assert!(f.contains(ExtentFlags::UNWRITTEN), "{}: {f}", t.fs);
                }
                other => panic!("{}: {other}", t.fs),
            }
        }
    }

    #[test]
    fn delalloc_extent_is_refused() {
        // ext4 and XFS both delay allocation of freshly written data until writeback.
        for t in TestRegion::on_every_fs(8) {
            if t.ram_fs {
                continue;
            }
            let m = &t.mapper;
            let a = m.add_owner("a");
            m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            t.punch_raw(0, t.page);
            std::os::unix::fs::FileExt::write_at(&*t.file, &[7u8; 16], 0).unwrap();
            match m.pin(a, t.region, 0, t.page).unwrap_err() {
                MapperError::Unpinnable {
                    problem: ExtentProblem::Flags(f),
                    ..
                } => {
                    assert!(f.contains(ExtentFlags::DELALLOC), "{}: {f}", t.fs)
                }
                other => panic!("{}: {other}", t.fs),
            }
        }
    }

    #[test]
    fn reflinked_shared_extent_is_refused_on_xfs() {
        let Some(t) = TestRegion::on_xfs(8) else {
            return;
        };
        let m = &t.mapper;
        let a = m.add_owner("a");
        m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
        let clone = t.reflink_copy();
        let e = m.pin(a, t.region, 0, t.page).unwrap_err();
        match e {
            MapperError::Unpinnable {
                file_offset: 0,
                problem: ExtentProblem::Flags(f),
                ..
            } => {
                assert!(f.contains(ExtentFlags::SHARED), "{f}")
            }
            other => panic!("xfs: {other}"),
        }
        drop(clone);
    }

    #[test]
    fn a_partly_reflinked_range_names_the_first_shared_extent() {
        let Some(t) = TestRegion::on_xfs(16) else {
            return;
        };
        let m = &t.mapper;
        let a = m.add_owner("a");
        m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
        let _clone = t.reflink_range(4 * t.page, 2 * t.page);
        // The whole region: the error names the first bad extent, [4p, 6p) SHARED.
        match m.pin(a, t.region, 0, 0) {
            Err(MapperError::Unpinnable {
                file_offset,
                len,
                problem: ExtentProblem::Flags(f),
            }) => {
                assert_eq!((file_offset, len), (4 * t.page, 2 * t.page));
                assert!(f.contains(ExtentFlags::SHARED), "{f}");
            }
            other => panic!("xfs: {other:?}"),
        }
        // prepare unshares just that range (no pin ran before it: populating a neighbour can dirty the shared
        // pages through a large folio, and writeback would unshare them by itself); then it all pins.
        let r = m
            .prepare(a, t.region, 4 * t.page, 2 * t.page, &mut |_| {})
            .unwrap();
        assert_eq!(
            r,
            super::super::prepare::PrepareReport {
                zeroed: 0,
                unshared: 2 * t.page
            }
        );
        m.pin(a, t.region, 0, 0).unwrap();
        assert_eq!(t.read_file(4 * t.page, 1)[0], t.fill_byte(4 * t.page));
    }

    /// A memfd of `pages` pages (a RAM-backed region's file).
    fn memfd(pages: u64) -> Arc<File> {
        // SAFETY: a NUL-terminated name; the fd is owned by the File made from it.
        let fd = unsafe { libc::memfd_create(c"pin-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(pages * page_size()).unwrap();
        Arc::new(f)
    }

    /// Adds a region over `pages` pages of `file`, declared as `kind`, mapped shared or private, at an IOVA of
    /// its own.
    fn region_of(
        m: &Mapper,
        file: &Arc<File>,
        pages: u64,
        kind: BackingKind,
        private: bool,
    ) -> RegionId {
        let size = pages * page_size();
        let iova = 0x1_0000_0000 + m.snapshot().regions.len() as u64 * 0x1000_0000;
        let opts = MapOptions {
            private,
            ..MapOptions::default()
        };
        let map = Arc::new(HostMapping::map(file, 0, size, opts).unwrap());
        m.add_region(
            RegionDesc::new(file.clone(), 0, size, kind)
                .with_mapping(map)
                .with_iova(iova),
        )
        .unwrap()
    }

    /// Pins a region's first page with an exclusive lease; the outcome.
    fn dma_pin(m: &Mapper, r: RegionId) -> Result<PinId> {
        let o = m.add_owner("dma-ctx");
        m.acquire(o, r, 0, page_size(), LeaseMode::Exclusive)?;
        m.pin(o, r, 0, page_size())
    }

    /// With a DMA mapper that pins through the kernel, a pin the kernel would refuse fails up front with
    /// EOPNOTSUPP naming the rule and the backings that work, before anything is locked or mapped; regions report
    /// their rule. FS-DAX is declared here (this host has no DAX; the lab shows the kernel's own refusal).
    #[test]
    fn dma_pins_the_kernel_would_refuse_fail_up_front_naming_the_rule() {
        let t = TestRegion::on_tmp(4);
        let dma = Arc::new(RecordingDma::with_kernel_rules());
        let (notifier, _rx) = ChannelNotifier::new();
        let m = Mapper::new(Arc::new(notifier), Some(dma.clone()));
        let fsdax = region_of(&m, &t.file, 4, BackingKind::FsDax, false);
        let fsdax_private = region_of(&m, &t.file, 4, BackingKind::FsDax, true);
        let shared = region_of(&m, &t.file, 4, BackingKind::Regular, false);
        let private = region_of(&m, &t.file, 4, BackingKind::Regular, true);
        let ram = region_of(&m, &memfd(4), 4, BackingKind::Ram, false);

        let locked = locked_kib();
        for r in [fsdax, fsdax_private] {
            let e = dma_pin(&m, r).unwrap_err();
            assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("never pins FS-DAX") && msg.contains(PINNABLE_BACKINGS),
                "{msg}"
            );
        }
        let new_kernel =
            KernelVersion::running().is_none_or(|k| k >= KernelVersion::SHARED_FILE_REFUSED);
        match dma_pin(&m, shared) {
            Err(e) if new_kernel => {
                assert_eq!(e.errno(), libc::EOPNOTSUPP);
                assert!(e.to_string().contains("since Linux 6.5"), "{e}");
            }
            Ok(_) if !new_kernel => {}
            other => panic!(
                "shared page-cache file on {:?}: {other:?}",
                KernelVersion::running()
            ),
        }
        assert_eq!(locked_kib(), locked, "a refused DMA pin locked nothing");
        let private_pin = dma_pin(&m, private).unwrap();
        let ram_pin = dma_pin(&m, ram).unwrap();
        assert_eq!(dma.mappings().len(), 2 + usize::from(!new_kernel));

        let s = m.snapshot();
        let rule = |r: RegionId| s.regions.iter().find(|v| v.id == r).unwrap().dma_rule;
        assert_eq!(rule(fsdax), DmaRule::FsDax);
        assert_eq!(rule(fsdax_private), DmaRule::FsDax);
        assert_eq!(rule(private), DmaRule::PrivateCopy);
        assert_eq!(rule(ram), DmaRule::RamBacked);
        assert_eq!(rule(shared).pinnable(), !new_kernel);
        let pinned: Vec<PinId> = s.pins().into_iter().map(|(_, p)| p.id).collect();
        assert!(pinned.contains(&private_pin) && pinned.contains(&ram_pin));
    }

    /// Pins without a DMA mapper, or with one that pins nothing through the kernel, keep working on every
    /// backing: they are about layout stability, not DMA.
    #[test]
    fn pins_without_kernel_dma_pinning_are_unchanged_on_fsdax() {
        let t = TestRegion::on_tmp(4);
        for dma in [
            None,
            Some(Arc::new(RecordingDma::new()) as Arc<dyn DmaMapper>),
        ] {
            let (notifier, _rx) = ChannelNotifier::new();
            let m = Mapper::new(Arc::new(notifier), dma);
            let r = region_of(&m, &t.file, 4, BackingKind::FsDax, false);
            dma_pin(&m, r).unwrap();
        }
    }

    /// With a DMA mapper, a pin asked without DMA maps nothing and works on FS-DAX; the same range asked for DMA
    /// is refused by the rule; a DMA pin maps exactly its range at the region's IOVA plus its offset, and its
    /// unpin unmaps it. Asking for DMA where no device does DMA is EINVAL.
    #[test]
    fn pins_say_whether_they_are_for_dma() {
        let t = TestRegion::on_tmp(4);
        let dma = Arc::new(RecordingDma::with_kernel_rules());
        let (notifier, _rx) = ChannelNotifier::new();
        let m = Mapper::new(Arc::new(notifier), Some(dma.clone()));
        let fsdax = region_of(&m, &t.file, 4, BackingKind::FsDax, false);
        let ram = region_of(&m, &memfd(4), 4, BackingKind::Ram, false);
        let o = m.add_owner("agent");
        let pg = page_size();
        m.acquire(o, fsdax, 0, 4 * pg, LeaseMode::Exclusive)
            .unwrap();
        m.acquire(o, ram, 0, 4 * pg, LeaseMode::Exclusive).unwrap();
        let layout_only = m.pin_with(o, fsdax, 0, pg, false).unwrap();
        assert!(dma.mappings().is_empty());
        let e = m.pin_with(o, fsdax, pg, pg, true).unwrap_err();
        assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
        let p = m.pin_with(o, ram, pg, 2 * pg, true).unwrap();
        let iova = 0x1_1000_0000;
        assert_eq!(
            dma.mappings()
                .into_iter()
                .map(|(i, _, l)| (i, l))
                .collect::<Vec<_>>(),
            vec![(iova + pg, 2 * pg)]
        );
        m.unpin(o, p).unwrap();
        assert!(dma.mappings().is_empty());
        m.unpin(o, layout_only).unwrap();

        let (notifier, _rx) = ChannelNotifier::new();
        let plain = Mapper::new(Arc::new(notifier), None);
        let r = region_of(&plain, &memfd(4), 4, BackingKind::Ram, false);
        let o = plain.add_owner("agent");
        plain.acquire(o, r, 0, pg, LeaseMode::Exclusive).unwrap();
        assert_eq!(
            plain.pin_with(o, r, 0, pg, true).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    /// A virtual IOMMU's MAP: the pin is mapped at the IOVA the guest chose, a layout change over it is refused
    /// naming the owner, and its unpin unmaps that IOVA; a second DMA pin of the same pages is EBUSY.
    #[test]
    fn a_pin_at_a_chosen_iova_maps_there_and_unmaps_there() {
        let dma = Arc::new(RecordingDma::new());
        let (notifier, _rx) = ChannelNotifier::new();
        let m = Mapper::new(Arc::new(notifier), Some(dma.clone()));
        let r = region_of(&m, &memfd(8), 8, BackingKind::Ram, false);
        let o = m.add_owner("viommu:0000:00:04.0");
        let pg = page_size();
        m.acquire(o, r, 2 * pg, 2 * pg, LeaseMode::Exclusive)
            .unwrap();
        let p = m.pin_dma_at(o, r, 2 * pg, 2 * pg, 0xfff0_0000).unwrap();
        let maps: Vec<_> = dma.mappings().into_iter().map(|(i, _, l)| (i, l)).collect();
        assert_eq!(maps, vec![(0xfff0_0000, 2 * pg)]);
        let e = m.punch(None, r, 3 * pg, pg).unwrap_err();
        assert_eq!(e.errno(), libc::ETXTBSY);
        assert!(e.to_string().contains("viommu:0000:00:04.0"), "{e}");
        // The rest of the region stays free for layout changes.
        m.punch(None, r, 6 * pg, pg).unwrap();
        assert_eq!(
            m.pin_dma_at(o, r, 2 * pg, pg, 0x1000).unwrap_err().errno(),
            libc::EBUSY
        );
        m.unpin(o, p).unwrap();
        assert!(dma.mappings().is_empty());
    }

    /// A DMA mapper whose kernel refuses every pin (as a kernel newer than the rules would).
    struct KernelSaysNo {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl DmaMapper for KernelSaysNo {
        fn map(&self, _: u64, _: DmaRange<'_>) -> std::io::Result<()> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(std::io::Error::from_raw_os_error(libc::EFAULT))
        }
        fn unmap(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Where the kernel refuses a pin the rules allow, its answer wins: the pin fails with EOPNOTSUPP naming the
    /// kernel's errno, nothing stays locked, the region reports `kernel-refused` and later DMA pins there are
    /// refused up front without asking the kernel again.
    #[test]
    fn the_kernels_refusal_wins_over_the_rules_and_is_reported() {
        let dma = Arc::new(KernelSaysNo {
            calls: Default::default(),
        });
        let (notifier, _rx) = ChannelNotifier::new();
        let m = Mapper::new(Arc::new(notifier), Some(dma.clone()));
        let r = region_of(&m, &memfd(4), 4, BackingKind::Ram, false);
        let locked = locked_kib();
        let e = dma_pin(&m, r).unwrap_err();
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert!(
            e.to_string().contains("the kernel refused a DMA pin here"),
            "{e}"
        );
        assert_eq!(locked_kib(), locked);
        let rule = m.snapshot().regions[0].dma_rule;
        assert_eq!(rule, DmaRule::KernelRefused(libc::EFAULT));
        assert_eq!(rule.name(), "kernel-refused");
        let e = dma_pin(&m, r).unwrap_err();
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert_eq!(
            dma.calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "asked the kernel once"
        );
        assert!(m.snapshot().pins().is_empty());
    }
}
