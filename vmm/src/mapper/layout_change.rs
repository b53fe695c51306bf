//! Layout changes: punch, zero, shrink, grow, and the host guard's whole-file break. The order of checks is
//! DESIGN.md's: any pin over the range -> ETXTBSY (EDEADLK when the requester owns it; EDEADLK wins), any
//! exclusive lease -> the same; transient pins -> wait; a break in progress on an overlapping range -> queue;
//! shared leases -> break and wait; then fallocate/ftruncate, under the lock so no pin or lease can slip in
//! between the last check and the change. A refused change changes nothing.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::breaks::{BreakId, BreakNotice, BreakPolicy, BreakState, RevokeNotice};
use super::error::{HoldKind, MapperError, Result};
use super::lease::{LeaseId, LeaseMode};
use super::owner::OwnerId;
use super::pin::PinId;
use super::range::ByteRange;
use super::region::RegionId;
use super::{Mapper, State};

/// Offsets and sizes are region offsets; the file offset is the region's `file_offset` plus these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutChange {
    /// Deallocate `[off, off+len)` (reads back as zeros); `len == 0` punches to EOF.
    Punch { off: u64, len: u64 },
    /// Zero `[off, off+len)` keeping it allocated.
    Zero { off: u64, len: u64 },
    /// Truncate down to `new_size`; checks [new_size, end).
    Shrink { new_size: u64 },
    /// Extend to `new_size`; checks from the old last block.
    Grow { new_size: u64 },
    /// A foreign process opened or truncated the backing file (host guard): a whole-file break, no change.
    HostOpen,
}

impl LayoutChange {
    pub fn name(&self) -> &'static str {
        match self {
            LayoutChange::Punch { .. } => "punch",
            LayoutChange::Zero { .. } => "zero",
            LayoutChange::Shrink { .. } => "shrink",
            LayoutChange::Grow { .. } => "grow",
            LayoutChange::HostOpen => "host-open",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ChangeRequest {
    pub region: RegionId,
    pub change: LayoutChange,
    /// The owner asking (for EDEADLK), or None for the operator/host.
    pub requester: Option<OwnerId>,
    /// How long holders of shared leases get to release.
    pub deadline: Duration,
    pub policy: BreakPolicy,
}

impl ChangeRequest {
    pub fn new(region: RegionId, change: LayoutChange) -> Self {
        ChangeRequest {
            region,
            change,
            requester: None,
            deadline: DEFAULT_DEADLINE,
            policy: BreakPolicy::Fail,
        }
    }
}

pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// Longest break deadline a request may ask for (an operator typo must not park a change for years).
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeReport {
    /// The range that was checked (page-rounded, open-ended where the change runs to EOF).
    pub range: Option<ByteRange>,
    /// Holders that were sent break notices.
    pub notified: Vec<OwnerId>,
    /// Holders whose leases were revoked at the deadline.
    pub revoked: Vec<OwnerId>,
    pub waited_for_transient: bool,
    pub queued_behind_break: bool,
}

impl Mapper {
    pub fn punch(
        &self,
        requester: Option<OwnerId>,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<ChangeReport> {
        self.change(ChangeRequest {
            requester,
            ..ChangeRequest::new(region, LayoutChange::Punch { off, len })
        })
    }

    pub fn zero(
        &self,
        requester: Option<OwnerId>,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<ChangeReport> {
        self.change(ChangeRequest {
            requester,
            ..ChangeRequest::new(region, LayoutChange::Zero { off, len })
        })
    }

    pub fn shrink(
        &self,
        requester: Option<OwnerId>,
        region: RegionId,
        new_size: u64,
    ) -> Result<ChangeReport> {
        self.change(ChangeRequest {
            requester,
            ..ChangeRequest::new(region, LayoutChange::Shrink { new_size })
        })
    }

    pub fn grow(
        &self,
        requester: Option<OwnerId>,
        region: RegionId,
        new_size: u64,
    ) -> Result<ChangeReport> {
        self.change(ChangeRequest {
            requester,
            ..ChangeRequest::new(region, LayoutChange::Grow { new_size })
        })
    }

    /// Runs one layout change through the checks, breaks and waits, then applies it.
    pub fn change(&self, req: ChangeRequest) -> Result<ChangeReport> {
        if req.deadline > MAX_DEADLINE {
            return Err(MapperError::Invalid(format!(
                "break deadline {:?} above the maximum {MAX_DEADLINE:?}",
                req.deadline
            )));
        }
        let mut report = ChangeReport::default();
        let mut st = self.lock();
        loop {
            if let Some(o) = req.requester {
                st.check_owner(o)?;
            }
            let range = st.change_range(&req)?;
            report.range = Some(range);
            st.check_holds(req.region, range, req.requester)?;
            let reg = st.region(req.region)?;
            if reg.transients.any_overlap(range) {
                report.waited_for_transient = true;
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if reg.breaking(range).is_some() {
                report.queued_behind_break = true;
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let shared: Vec<LeaseId> = reg
                .leases
                .overlapping(range)
                .into_iter()
                .map(LeaseId)
                .collect();
            if shared.is_empty() {
                st.apply(&req)?;
                tracing::info!(region = %req.region, change = req.change.name(), %range, "layout change applied");
                return Ok(report);
            }

            // Break: record it (the range now refuses new leases), notify with the lock released, wait.
            let deadline = Instant::now() + req.deadline;
            let bid = BreakId(st.next_id());
            let notices = st.notices(bid, req.region, range, &shared, deadline, req.change.name());
            st.region_mut(req.region)?.breaks.insert(range, bid.0);
            st.breaks.insert(
                bid,
                BreakState {
                    region: req.region,
                    range,
                    leases: shared.clone(),
                    deadline,
                    reason: req.change.name(),
                },
            );
            report.notified.extend(notices.iter().map(|n| n.owner));
            drop(st);
            tracing::info!(%bid, region = %req.region, %range, holders = notices.len(), "break started");
            for n in &notices {
                self.notifier.break_notice(n);
            }
            st = self.lock();
            loop {
                let remaining: Vec<LeaseId> = shared
                    .iter()
                    .copied()
                    .filter(|l| st.leases.contains_key(l))
                    .collect();
                if remaining.is_empty() {
                    break;
                }
                let now = Instant::now();
                if now < deadline {
                    st = self
                        .changed
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                match req.policy {
                    BreakPolicy::Fail => {
                        let mut holders: Vec<OwnerId> = remaining
                            .iter()
                            .filter_map(|l| st.leases.get(l).map(|l| l.owner))
                            .collect();
                        holders.dedup();
                        st.end_break(bid);
                        drop(st);
                        self.changed.notify_all();
                        tracing::warn!(%bid, %range, ?holders, "break timed out; change refused");
                        return Err(MapperError::TimedOut { range, holders });
                    }
                    BreakPolicy::Revoke => {
                        let revoked =
                            st.revoke(bid, req.region, range, &remaining, self.dma.as_deref());
                        report.revoked.extend(revoked.iter().map(|r| r.owner));
                        drop(st);
                        for r in &revoked {
                            tracing::warn!(%bid, owner = %r.owner, "leases revoked at the break deadline");
                            self.notifier.revoked(r);
                        }
                        st = self.lock();
                    }
                }
            }
            st.end_break(bid);
            self.changed.notify_all();
            // Every holder released: go round again (pins or exclusive leases cannot have appeared in a range
            // under a break, but the requester may have exited) and apply.
        }
    }
}

impl State {
    /// The page-rounded range a change must check.
    fn change_range(&self, req: &ChangeRequest) -> Result<ByteRange> {
        let reg = self.region(req.region)?;
        reg.require_layout()?;
        let base = reg.desc.file_offset;
        let fits = |end: u64| base.checked_add(end).is_some_and(|e| e <= i64::MAX as u64);
        match req.change {
            LayoutChange::Punch { off, len } | LayoutChange::Zero { off, len } => {
                if !fits(off.saturating_add(len)) {
                    return Err(MapperError::OutOfRange(format!(
                        "{off:#x}+{len:#x} past the largest file offset"
                    )));
                }
                ByteRange::from_request(off, len)
            }
            LayoutChange::Shrink { new_size } => {
                let cur = reg.file_size()?;
                if new_size > cur {
                    return Err(MapperError::Invalid(format!(
                        "shrink to {new_size:#x} above the size {cur:#x}"
                    )));
                }
                Ok(ByteRange::for_shrink(new_size))
            }
            LayoutChange::Grow { new_size } => {
                let cur = reg.file_size()?;
                if new_size < cur {
                    return Err(MapperError::Invalid(format!(
                        "grow to {new_size:#x} below the size {cur:#x}"
                    )));
                }
                if !fits(new_size) {
                    return Err(MapperError::OutOfRange(format!(
                        "grow to {new_size:#x} past the largest file size"
                    )));
                }
                Ok(ByteRange::for_grow(cur))
            }
            LayoutChange::HostOpen => Ok(ByteRange::new(0, super::range::OPEN_END)),
        }
    }

    /// Pins, then exclusive leases: EDEADLK if the requester holds one (wins), else ETXTBSY naming the holder.
    pub(super) fn check_holds(
        &self,
        region: RegionId,
        range: ByteRange,
        requester: Option<OwnerId>,
    ) -> Result<()> {
        let reg = self.region(region)?;
        let mut first: Option<(OwnerId, ByteRange)> = None;
        let mut own: Option<ByteRange> = None;
        reg.pins.for_each_overlap(range, |r, id| {
            if let Some(p) = self.pins.get(&PinId(id)) {
                if Some(p.owner) == requester {
                    own = Some(r);
                    return ControlFlow::Break(());
                }
                first.get_or_insert((p.owner, r));
            }
            ControlFlow::Continue(())
        });
        self.hold_error(HoldKind::Pin, first, own, requester)?;
        let (mut first, mut own) = (None, None);
        reg.leases.for_each_overlap(range, |r, id| {
            if let Some(l) = self.leases.get(&LeaseId(id)) {
                if l.mode == LeaseMode::Exclusive {
                    if Some(l.owner) == requester {
                        own = Some(r);
                        return ControlFlow::Break(());
                    }
                    first.get_or_insert((l.owner, r));
                }
            }
            ControlFlow::Continue(())
        });
        self.hold_error(HoldKind::ExclusiveLease, first, own, requester)
    }

    fn hold_error(
        &self,
        kind: HoldKind,
        first: Option<(OwnerId, ByteRange)>,
        own: Option<ByteRange>,
        requester: Option<OwnerId>,
    ) -> Result<()> {
        if let (Some(range), Some(holder)) = (own, requester) {
            return Err(MapperError::Deadlock {
                holder,
                kind,
                range,
            });
        }
        if let Some((holder, range)) = first {
            return Err(MapperError::TextBusy {
                holder,
                holder_name: self.owner_name(holder),
                kind,
                range,
            });
        }
        Ok(())
    }

    /// One notice per holder, listing each of its leases with the overlap.
    fn notices(
        &self,
        bid: BreakId,
        region: RegionId,
        range: ByteRange,
        leases: &[LeaseId],
        deadline: std::time::Instant,
        reason: &'static str,
    ) -> Vec<BreakNotice> {
        let mut by_owner: BTreeMap<OwnerId, Vec<(LeaseId, ByteRange)>> = BTreeMap::new();
        for id in leases {
            if let Some(l) = self.leases.get(id) {
                if let Some(overlap) = l.range.intersect(&range) {
                    by_owner.entry(l.owner).or_default().push((*id, overlap));
                }
            }
        }
        by_owner
            .into_iter()
            .map(|(owner, leases)| BreakNotice {
                break_id: bid,
                owner,
                region,
                leases,
                deadline,
                reason,
            })
            .collect()
    }

    fn end_break(&mut self, bid: BreakId) {
        if let Some(b) = self.breaks.remove(&bid) {
            if let Some(r) = self.regions.get_mut(&b.region) {
                r.breaks.remove(b.range, bid.0);
            }
        }
    }

    /// Revoke policy: per holder, tear down the DMA mappings of its pins in the region (an owner that ignores a
    /// break is a failed DMA context; its device loses access first), then remove its leases in the break.
    fn revoke(
        &mut self,
        bid: BreakId,
        region: RegionId,
        range: ByteRange,
        remaining: &[LeaseId],
        dma: Option<&dyn super::dma::DmaMapper>,
    ) -> Vec<RevokeNotice> {
        let mut by_owner: BTreeMap<OwnerId, Vec<(LeaseId, ByteRange)>> = BTreeMap::new();
        for id in remaining {
            if let Some(l) = self.leases.get(id) {
                by_owner
                    .entry(l.owner)
                    .or_default()
                    .push((*id, l.range.intersect(&range).unwrap_or(l.range)));
            }
        }
        let mut out = Vec::new();
        for (owner, leases) in by_owner {
            let mut torn = Vec::new();
            let pins: Vec<PinId> = self
                .owners
                .get(&owner)
                .map(|o| o.pins.iter().copied().collect())
                .unwrap_or_default();
            for pid in pins {
                if let Some(p) = self.pins.get_mut(&pid) {
                    if p.region == region {
                        if let (Some((iova, len)), Some(d)) = (p.dma.take(), dma) {
                            if let Err(e) = d.unmap(iova, len) {
                                tracing::error!(%pid, error = %e, "DMA unmap on revoke failed");
                            }
                            p.dma_revoked = true;
                            torn.push(pid);
                        }
                    }
                }
            }
            for (l, _) in &leases {
                self.drop_lease(*l);
            }
            out.push(RevokeNotice {
                break_id: bid,
                owner,
                region,
                leases,
                dma_torn_down: torn,
            });
        }
        out
    }

    /// The change itself. Runs under the lock, after every check passed.
    fn apply(&self, req: &ChangeRequest) -> Result<()> {
        let reg = self.region(req.region)?;
        let fd = reg.desc.file.as_raw_fd();
        let base = reg.desc.file_offset;
        match req.change {
            LayoutChange::Punch { off, len } | LayoutChange::Zero { off, len } => {
                let len = if len == 0 {
                    reg.file_size()?.saturating_sub(off)
                } else {
                    len
                };
                if len == 0 {
                    return Ok(());
                }
                let punch = matches!(req.change, LayoutChange::Punch { .. });
                fallocate_change(fd, punch, base + off, len)
            }
            LayoutChange::Shrink { new_size } | LayoutChange::Grow { new_size } => {
                let size = libc::off_t::try_from(base + new_size)
                    .map_err(|_| MapperError::OutOfRange("file size".into()))?;
                // SAFETY: ftruncate on an fd the region owns.
                if unsafe { libc::ftruncate(fd, size) } < 0 {
                    return Err(MapperError::last_os("ftruncate"));
                }
                Ok(())
            }
            LayoutChange::HostOpen => Ok(()),
        }
    }
}

fn fallocate(fd: i32, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd the region owns; offsets were checked to fit off_t.
    if unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn fallocate_change(fd: i32, punch: bool, off: u64, len: u64) -> Result<()> {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if punch {
        return fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len)
            .map_err(|e| MapperError::io("fallocate(PUNCH_HOLE)", e));
    }
    match fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, off, len) {
        Ok(()) => Ok(()),
        // tmpfs has no ZERO_RANGE: punching and re-allocating has the same result (zeros, allocated).
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len)
                .and_then(|()| fallocate(fd, keep, off, len))
                .map_err(|e| MapperError::io("fallocate(PUNCH_HOLE then allocate)", e))
        }
        Err(e) => Err(MapperError::io("fallocate(ZERO_RANGE)", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mapper::test_files::TestRegion;
    use crate::mapper::{Mapper, RegionDesc};
    use crate::pmem::BackingKind;

    /// Everything a refused change must leave as it was: size, bytes, extents (FIEMAP, where the filesystem has
    /// an extent map), tables, DMA mappings.
    type Observed = (
        u64,
        Vec<u8>,
        Option<Vec<crate::mapper::pin::Extent>>,
        crate::mapper::Snapshot,
        Vec<(u64, usize, u64)>,
    );

    fn state_of(t: &TestRegion) -> Observed {
        use std::os::fd::AsRawFd;
        let size = t.file_size();
        let extents = crate::mapper::pin::read_extents(t.file.as_raw_fd(), 0, u64::MAX).ok();
        (
            size,
            t.read_file(0, size as usize),
            extents,
            t.mapper.snapshot(),
            t.dma.mappings(),
        )
    }

    #[test]
    fn changes_with_no_lease_and_no_pin_succeed() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            m.punch(None, t.region, t.page, t.page).unwrap();
            assert_eq!(
                t.read_file(t.page, t.page as usize),
                vec![0; t.page as usize],
                "{}",
                t.fs
            );
            assert_eq!(t.read_file(0, 1)[0], t.fill_byte(0));
            m.zero(None, t.region, 3 * t.page, 1).unwrap();
            assert_eq!(
                t.read_file(3 * t.page, 2),
                vec![0, t.fill_byte(3 * t.page)],
                "{}: zero is exact",
                t.fs
            );
            m.shrink(None, t.region, 6 * t.page).unwrap();
            assert_eq!(t.file_size(), 6 * t.page);
            m.grow(None, t.region, 10 * t.page).unwrap();
            assert_eq!(t.file_size(), 10 * t.page);
            assert_eq!(t.read_file(7 * t.page, 1)[0], 0);
            // Punch to EOF (len 0).
            m.punch(None, t.region, 5 * t.page, 0).unwrap();
            assert_eq!(
                t.read_file(5 * t.page - 1, 2),
                vec![t.fill_byte(4 * t.page), 0],
                "{}",
                t.fs
            );
            assert_eq!(t.file_size(), 10 * t.page, "punch keeps the size");
        }
    }

    #[test]
    fn a_pin_makes_changes_etxtbsy_naming_the_holder_and_edeadlk_for_its_owner() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let b = m.add_owner("b");
            m.acquire(a, t.region, 0, 4 * t.page, LeaseMode::Exclusive)
                .unwrap();
            m.acquire(b, t.region, 0, 4 * t.page, LeaseMode::Exclusive)
                .unwrap();
            m.pin(a, t.region, t.page, t.page).unwrap();
            m.pin(b, t.region, 2 * t.page, t.page).unwrap();
            let before = state_of(&t);
            for change in [
                LayoutChange::Punch {
                    off: t.page,
                    len: 2 * t.page,
                },
                LayoutChange::Zero { off: 0, len: 0 },
                LayoutChange::Shrink {
                    new_size: t.page + 1,
                },
                // Touches each pinned page by a single byte: the check is page-rounded outward.
                LayoutChange::Punch {
                    off: 2 * t.page - 1,
                    len: 2,
                },
            ] {
                // The operator (no owner) gets ETXTBSY naming the first holder.
                let e = m.change(ChangeRequest::new(t.region, change)).unwrap_err();
                match &e {
                    MapperError::TextBusy {
                        holder,
                        kind: HoldKind::Pin,
                        range,
                        ..
                    } => {
                        assert_eq!(
                            (*holder, *range),
                            (a, ByteRange::new(t.page, 2 * t.page)),
                            "{}",
                            t.fs
                        )
                    }
                    e => panic!("{}: {change:?}: {e}", t.fs),
                }
                // Owner b pinned too: EDEADLK wins over ETXTBSY for b even though a also holds the range.
                let e = m.change(ChangeRequest {
                    requester: Some(b),
                    ..ChangeRequest::new(t.region, change)
                });
                assert_eq!(
                    e.unwrap_err().errno(),
                    libc::EDEADLK,
                    "{}: {change:?}",
                    t.fs
                );
                assert_eq!(
                    state_of(&t),
                    before,
                    "{}: refused {change:?} changed something",
                    t.fs
                );
            }
            // Only a's pin in range: ETXTBSY for b. Pages next to the pins are free to change.
            assert_eq!(
                m.punch(Some(b), t.region, t.page, 1).unwrap_err().errno(),
                libc::ETXTBSY
            );
            // (Past the exclusive leases, which end at page 4.)
            m.punch(None, t.region, 4 * t.page, t.page).unwrap();
            m.shrink(None, t.region, 4 * t.page).unwrap();
        }
    }

    #[test]
    fn an_exclusive_lease_fails_changes_at_once_without_asking_the_holder() {
        for mut t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let b = m.add_owner("b");
            m.acquire(a, t.region, 4 * t.page, 0, LeaseMode::Exclusive)
                .unwrap();
            m.acquire(b, t.region, 0, t.page, LeaseMode::Shared)
                .unwrap();
            let before = state_of(&t);
            let e = m.punch(None, t.region, 0, 0).unwrap_err();
            assert!(
                matches!(e, MapperError::TextBusy { holder, kind: HoldKind::ExclusiveLease, .. } if holder == a)
            );
            assert_eq!(
                m.punch(Some(a), t.region, 6 * t.page, 1)
                    .unwrap_err()
                    .errno(),
                libc::EDEADLK
            );
            // Growing touches the old last block, which the open-ended exclusive lease covers.
            assert_eq!(
                m.grow(None, t.region, 16 * t.page).unwrap_err().errno(),
                libc::ETXTBSY
            );
            assert_eq!(state_of(&t), before, "{}", t.fs);
            let events = t.events.take().unwrap();
            assert!(
                events.try_recv().is_err(),
                "{}: a holder was notified",
                t.fs
            );
        }
    }

    #[test]
    fn grow_checks_from_the_old_last_block_and_leases_past_eof_count() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            // A lease entirely past EOF, open-ended: growing into it conflicts.
            let far = m
                .acquire(a, t.region, 100 * t.page, 0, LeaseMode::Exclusive)
                .unwrap();
            assert_eq!(
                m.grow(None, t.region, 200 * t.page).unwrap_err().errno(),
                libc::ETXTBSY,
                "{}",
                t.fs
            );
            m.release(a, far).unwrap();
            // A lease on everything but the last page does not conflict with a grow.
            let l = m
                .acquire(a, t.region, 0, 7 * t.page, LeaseMode::Exclusive)
                .unwrap();
            m.grow(None, t.region, 9 * t.page).unwrap();
            m.release(a, l).unwrap();
            // The last page of the old size does.
            m.acquire(a, t.region, 8 * t.page, t.page, LeaseMode::Exclusive)
                .unwrap();
            assert_eq!(
                m.grow(None, t.region, 20 * t.page).unwrap_err().errno(),
                libc::ETXTBSY
            );
            assert_eq!(t.file_size(), 9 * t.page);
            // And shrink covers [new size, EOF): the lease at page 8 blocks shrinking below it only.
            m.shrink(None, t.region, 9 * t.page).unwrap();
            assert_eq!(
                m.shrink(None, t.region, 8 * t.page).unwrap_err().errno(),
                libc::ETXTBSY
            );
        }
    }

    #[test]
    fn bad_arguments() {
        let t = TestRegion::on_tmp(4);
        let m = &t.mapper;
        assert_eq!(
            m.shrink(None, t.region, 5 * t.page).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            m.grow(None, t.region, t.page).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            m.punch(None, t.region, u64::MAX - 5, 10)
                .unwrap_err()
                .errno(),
            libc::ERANGE
        );
        assert_eq!(
            m.punch(None, t.region, i64::MAX as u64, 10)
                .unwrap_err()
                .errno(),
            libc::ERANGE
        );
        assert_eq!(
            m.grow(None, t.region, u64::MAX).unwrap_err().errno(),
            libc::ERANGE
        );
        assert_eq!(
            m.punch(Some(OwnerId::NONE), t.region, 0, 1)
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        let forever = ChangeRequest {
            deadline: Duration::MAX,
            ..ChangeRequest::new(t.region, LayoutChange::Punch { off: 0, len: 1 })
        };
        assert_eq!(m.change(forever).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            m.punch(Some(OwnerId(12345)), t.region, 0, 1)
                .unwrap_err()
                .errno(),
            libc::ENOENT
        );
        assert_eq!(t.file_size(), 4 * t.page);
    }

    /// This machine has no /dev/dax; a DevDax region over a regular file checks the mapper's side of the
    /// exemption (the DAX lab runs it on a real /dev/daxX.Y through daxvisor-mapper-demo).
    #[test]
    fn device_dax_refuses_layout_leases_and_changes_with_eopnotsupp() {
        let t = TestRegion::on_tmp(4);
        let m = Mapper::new(Arc::new(crate::mapper::ChannelNotifier::new().0), None);
        let r = m
            .add_region(RegionDesc {
                file: t.file.clone(),
                file_offset: 0,
                size: 4 * t.page,
                kind: BackingKind::DevDax,
                mapping: Some(t.map.host()),
                iova: 0,
            })
            .unwrap();
        let a = m.add_owner("a");
        for mode in [LeaseMode::Shared, LeaseMode::Exclusive] {
            assert_eq!(
                m.acquire(a, r, 0, 0, mode).unwrap_err().errno(),
                libc::EOPNOTSUPP
            );
        }
        assert_eq!(
            m.punch(None, r, 0, t.page).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
        assert_eq!(m.shrink(None, r, 0).unwrap_err().errno(), libc::EOPNOTSUPP);
        assert_eq!(
            m.prepare(a, r, 0, 0, &mut |_| {}).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
        assert_eq!(t.file_size(), 4 * t.page);
        // Its layout never changes, so DMA pins need no lease there.
        let p = m.pin(a, r, 0, t.page).unwrap();
        m.unpin(a, p).unwrap();
    }
}
