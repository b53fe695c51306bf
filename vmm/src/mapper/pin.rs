//! Pins: a range handed to a device for DMA. A pin needs an owner (EINVAL), an exclusive lease of the same owner
//! covering the range (EPERM), and extents that cannot move: FIEMAP over the whole range must show no hole (a
//! gap between extents), and no extent flagged UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED,
//! DATA_INLINE, DATA_TAIL, UNWRITTEN or SHARED (LAST and MERGED are harmless). Then the range is populated
//! (MADV_POPULATE_WRITE), mlocked (both in one pass) and DMA-mapped.
//!
//! The pin is recorded (pending) before the slow part runs unlocked, so a layout change racing with it already
//! sees ETXTBSY and a release of its lease sees EBUSY.
//!
//! tmpfs has no extent map (FIEMAP is not supported there): its pages are RAM, allocated by populate and kept
//! resident by mlock, so the FIEMAP step is skipped for it. Device-DAX has no file layout at all: pins there need
//! no lease and no FIEMAP.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::pmem::BackingKind;

use super::dma::DmaMapper;
use super::error::{MapperError, Result};
use super::lease::{LeaseId, LeaseMode};
use super::owner::OwnerId;
use super::range::ByteRange;
use super::region::RegionId;
use super::Mapper;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId(pub u64);

impl fmt::Display for PinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pin:{}", self.0)
    }
}

/// FIEMAP extent flags (linux/fiemap.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtentFlags(pub u32);

impl ExtentFlags {
    pub const LAST: u32 = 0x1;
    pub const UNKNOWN: u32 = 0x2;
    pub const DELALLOC: u32 = 0x4;
    pub const ENCODED: u32 = 0x8;
    pub const DATA_ENCRYPTED: u32 = 0x80;
    pub const NOT_ALIGNED: u32 = 0x100;
    pub const DATA_INLINE: u32 = 0x200;
    pub const DATA_TAIL: u32 = 0x400;
    pub const UNWRITTEN: u32 = 0x800;
    pub const MERGED: u32 = 0x1000;
    pub const SHARED: u32 = 0x2000;

    /// Flags that make an extent unpinnable: its blocks may move, be shared, or not exist yet.
    pub const REFUSED: u32 = Self::UNKNOWN
        | Self::DELALLOC
        | Self::ENCODED
        | Self::DATA_ENCRYPTED
        | Self::NOT_ALIGNED
        | Self::DATA_INLINE
        | Self::DATA_TAIL
        | Self::UNWRITTEN
        | Self::SHARED;

    const NAMES: [(u32, &'static str); 11] = [
        (Self::LAST, "LAST"),
        (Self::UNKNOWN, "UNKNOWN"),
        (Self::DELALLOC, "DELALLOC"),
        (Self::ENCODED, "ENCODED"),
        (Self::DATA_ENCRYPTED, "DATA_ENCRYPTED"),
        (Self::NOT_ALIGNED, "NOT_ALIGNED"),
        (Self::DATA_INLINE, "DATA_INLINE"),
        (Self::DATA_TAIL, "DATA_TAIL"),
        (Self::UNWRITTEN, "UNWRITTEN"),
        (Self::MERGED, "MERGED"),
        (Self::SHARED, "SHARED"),
    ];

    pub fn contains(&self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

impl fmt::Display for ExtentFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut rest = self.0;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 || first {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// Why an extent cannot be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentProblem {
    /// No extent: a gap between extents, or past the last one.
    Hole,
    /// An extent whose flags include a refused one.
    Flags(ExtentFlags),
}

impl fmt::Display for ExtentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtentProblem::Hole => f.write_str("hole"),
            ExtentProblem::Flags(fl) => write!(f, "flags {fl}"),
        }
    }
}

/// One FIEMAP extent, file offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: ExtentFlags,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct FiemapBuf {
    hdr: FiemapHeader,
    ext: [FiemapExtent; EXTENTS_PER_CALL],
}

const EXTENTS_PER_CALL: usize = 128;
/// _IOWR('f', 11, struct fiemap): struct fiemap is 32 bytes.
pub const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The extents FIEMAP reports for `[start, end)` of the file (not syncing first: delalloc shows as such).
pub fn read_extents(fd: RawFd, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let mut buf = Box::new(FiemapBuf {
            hdr: FiemapHeader {
                fm_start: pos,
                fm_length: end - pos,
                fm_extent_count: EXTENTS_PER_CALL as u32,
                ..Default::default()
            },
            ext: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most fm_extent_count extents into `buf`, which
        // has room for exactly that many.
        let rc = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut *buf as *mut FiemapBuf) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (buf.hdr.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.ext[..n] {
            let ext = Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: ExtentFlags(e.fe_flags),
            };
            last |= ext.flags.contains(ExtentFlags::LAST);
            pos = pos.max(ext.logical.saturating_add(ext.length));
            out.push(ext);
        }
        if last {
            break;
        }
    }
    Ok(out)
}

/// The first reason `[start, end)` of the file cannot be pinned: `(file offset, length, problem)`.
pub fn first_problem(
    fd: RawFd,
    start: u64,
    end: u64,
) -> io::Result<Option<(u64, u64, ExtentProblem)>> {
    let mut pos = start;
    for e in read_extents(fd, start, end)? {
        let e_end = e.logical.saturating_add(e.length);
        if e_end <= pos {
            continue;
        }
        if e.logical > pos {
            return Ok(Some((pos, e.logical.min(end) - pos, ExtentProblem::Hole)));
        }
        if e.flags.0 & ExtentFlags::REFUSED != 0 {
            return Ok(Some((
                pos,
                e_end.min(end) - pos,
                ExtentProblem::Flags(e.flags),
            )));
        }
        pos = e_end;
        if pos >= end {
            return Ok(None);
        }
    }
    Ok((pos < end).then_some((pos, end - pos, ExtentProblem::Hole)))
}

/// Whether the file lives on a RAM filesystem without an extent map (tmpfs, hugetlbfs).
pub fn is_ram_fs(fd: RawFd) -> io::Result<bool> {
    // SAFETY: statfs is plain data; fstatfs writes only into it.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid out-pointer.
    if unsafe { libc::fstatfs(fd, &mut s) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let t = s.f_type as i64;
    Ok(t == TMPFS_MAGIC || t == HUGETLBFS_MAGIC)
}

/// Faults every page of `[addr, addr+len)` in writable (allocating backing pages) without touching the data.
pub fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise on a range of a mapping the caller owns; MADV_POPULATE_WRITE does not change contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn mlock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock only changes residency of the caller's mapping.
    if unsafe { libc::mlock(addr as *const libc::c_void, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// MLOCK_ONFAULT (linux/mman.h); the libc crate exports it for Android only.
const MLOCK_ONFAULT: libc::c_uint = 1;

/// Locks `[addr, addr+len)` and faults it in writable in one pass: mlock2(MLOCK_ONFAULT) marks the range locked
/// without walking it, and MADV_POPULATE_WRITE then faults every page, each locked as it is mapped. A plain
/// mlock after populate would walk a gigabyte of pages a second time. Falls back to populate + mlock.
pub fn populate_and_lock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 only changes residency flags of the caller's mapping.
    if unsafe { libc::mlock2(addr as *const libc::c_void, len, MLOCK_ONFAULT) } < 0 {
        populate_write(addr, len)?;
        return mlock(addr, len);
    }
    if let Err(e) = populate_write(addr, len) {
        munlock(addr, len);
        return Err(e);
    }
    Ok(())
}

pub fn munlock(addr: usize, len: usize) {
    // SAFETY: as mlock; failure (range already unmapped) leaves nothing to undo.
    unsafe { libc::munlock(addr as *const libc::c_void, len) };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PinState {
    /// Recorded, validation/populate/mlock/DMA map in progress.
    Pending,
    Active,
}

#[derive(Debug)]
pub(super) struct Pin {
    pub owner: OwnerId,
    pub region: RegionId,
    pub range: ByteRange,
    /// The exclusive lease covering it (none on device-DAX).
    pub lease: Option<LeaseId>,
    pub state: PinState,
    /// mlocked host range.
    pub locked: Option<(usize, usize)>,
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
        if let Some((addr, len)) = self.locked {
            munlock(addr, len);
        }
    }
}

struct PinPlan {
    fd: RawFd,
    file_range: ByteRange,
    check_extents: bool,
    host: (usize, usize),
    iova: u64,
}

impl Mapper {
    /// Pins `[off, off+len)` of `region` (rounded out to pages; `len == 0` means to the end of the region).
    pub fn pin(&self, owner: OwnerId, region: RegionId, off: u64, len: u64) -> Result<PinId> {
        let (id, plan) = self.claim_pin(owner, region, off, len)?;
        match self.pin_unlocked(&plan) {
            Ok(dma) => {
                let mut st = self.lock();
                match st.pins.get_mut(&id) {
                    Some(p) => {
                        p.state = PinState::Active;
                        p.locked = Some(plan.host);
                        p.dma = dma;
                        tracing::debug!(%owner, %id, range = %p.range, "pinned");
                        Ok(id)
                    }
                    None => {
                        // The owner exited while we were pinning: undo and report it gone.
                        drop(st);
                        let p = Pin {
                            owner,
                            region,
                            range: plan.file_range,
                            lease: None,
                            state: PinState::Active,
                            locked: Some(plan.host),
                            dma,
                            dma_revoked: false,
                        };
                        p.teardown(self.dma.as_deref());
                        Err(MapperError::NotFound(format!("{owner}")))
                    }
                }
            }
            Err(e) => {
                let mut st = self.lock();
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
    ) -> Result<(PinId, PinPlan)> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let reg = st.region(region)?;
        let desc = &reg.desc;
        let mapping = desc
            .mapping
            .ok_or_else(|| MapperError::Invalid(format!("{region} has no host mapping to pin")))?;
        let range = ByteRange::within(off, len, desc.size)?;
        if self.dma.is_some() {
            let mut clash = None;
            reg.pins.for_each_overlap(range, |r, id| {
                clash = st.pins.get(&PinId(id)).map(|p| (PinId(id), p.owner, r));
                std::ops::ControlFlow::Break(())
            });
            if let Some((pin, owner, range)) = clash {
                return Err(MapperError::DmaOverlap { pin, owner, range });
            }
        }
        let devdax = desc.kind == BackingKind::DevDax;
        let lease = if devdax {
            None
        } else {
            let mut covering = None;
            reg.leases.for_each_overlap(range, |r, id| {
                if r.contains(&range) {
                    if let Some(l) = st.leases.get(&LeaseId(id)) {
                        if l.owner == owner && l.mode == LeaseMode::Exclusive {
                            covering = Some(LeaseId(id));
                            return std::ops::ControlFlow::Break(());
                        }
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            Some(covering.ok_or(MapperError::NoExclusiveLease { owner, range })?)
        };
        let check_extents = !devdax
            && !is_ram_fs(desc.file.as_raw_fd()).map_err(|e| MapperError::io("fstatfs", e))?;
        let plan = PinPlan {
            fd: desc.file.as_raw_fd(),
            file_range: ByteRange::new(
                desc.file_offset + range.start,
                desc.file_offset + range.end,
            ),
            check_extents,
            host: (mapping.addr + range.start as usize, range.len() as usize),
            iova: desc.iova + range.start,
        };
        let id = PinId(st.next_id());
        st.region_mut(region)?.pins.insert(range, id.0);
        if let Some(o) = st.owners.get_mut(&owner) {
            o.pins.insert(id);
        }
        st.pins.insert(
            id,
            Pin {
                owner,
                region,
                range,
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
    fn pin_unlocked(&self, plan: &PinPlan) -> Result<Option<(u64, u64)>> {
        if plan.check_extents {
            let r = plan.file_range;
            match first_problem(plan.fd, r.start, r.end) {
                Ok(None) => {}
                Ok(Some((file_offset, len, problem))) => {
                    return Err(MapperError::Unpinnable { file_offset, len, problem });
                }
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(MapperError::NotSupported(
                        "the backing filesystem has no FIEMAP: extents cannot be validated for a pin".into(),
                    ))
                }
                Err(e) => return Err(MapperError::io("FIEMAP", e)),
            }
        }
        let (addr, len) = plan.host;
        populate_and_lock(addr, len)
            .map_err(|e| MapperError::io("MADV_POPULATE_WRITE + mlock", e))?;
        if let Some(d) = &self.dma {
            if let Err(e) = d.map(plan.iova, addr, len as u64) {
                munlock(addr, len);
                return Err(MapperError::io("DMA map", e));
            }
            return Ok(Some((plan.iova, len as u64)));
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
            .ok_or_else(|| MapperError::NotFound(format!("{pin}")))?;
        if p.owner != owner {
            return Err(MapperError::NotOwner {
                owner,
                what: pin.to_string(),
            });
        }
        if p.state == PinState::Pending {
            return Err(MapperError::NotFound(format!("{pin} (still being set up)")));
        }
        st.drop_pin(pin, self.dma.as_deref());
        drop(st);
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::test_files::{mincore_resident, TestRegion};

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
        populate_and_lock(t.map.host().addr, 64 * t.page as usize).unwrap();
        assert!(mincore_resident(t.map.host().addr, 64 * t.page as usize));
        assert!(
            locked_kib() >= before + 64 * t.page / 1024,
            "VmLck did not grow by the range"
        );
        munlock(t.map.host().addr, 64 * t.page as usize);
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
            assert!(
                mincore_resident(t.map.host().addr, t.page as usize),
                "{}",
                t.fs
            );
            assert!(locked_kib() >= t.page / 1024, "{}: nothing mlocked", t.fs);
            assert_eq!(
                t.dma.mappings(),
                vec![(t.iova, t.map.host().addr, t.page)],
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
}
