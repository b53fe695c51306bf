//! Layout changes: punch, zero, shrink, grow, and the host guard's whole-file break. The order is DESIGN.md's:
//! any pin over the range -> ETXTBSY (EDEADLK when the requester owns it; EDEADLK wins), any exclusive lease ->
//! the same; a break or change in progress on an overlapping range -> queue behind it; shared leases -> break
//! and wait (holders may still flush meanwhile); then wait for in-flight transient pins, with new ones queued
//! behind the change; then fallocate/ftruncate, under the lock so no pin or lease can slip in between the last
//! check and the change. A refused change changes nothing.
//!
//! A change named on a region works inside its window: punch and zero never touch a byte outside it (nor past
//! the end of the file), and shrink and grow are only for the region that holds its file's tail. Holds are
//! checked across every region of the file.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use crate::breaks::{
    BreakNotice, BreakPolicy, BreakStarted, BreakState, HolderReleased, RevokeNotice,
};
use crate::dma::DmaMapper;
use crate::error::{HoldKind, MapperError, Missing, Result};
use crate::host::{self, FileKey};
use crate::ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
use crate::lease::LeaseMode;
use crate::range::{ByteRange, OPEN_END};
use crate::state::State;
use crate::Mapper;

/// A layout change. Offsets and sizes are relative to the region the request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutChange {
    /// Deallocate `[off, off+len)` (reads back as zeros); `len == 0`: to the end of the window.
    Punch {
        /// Region offset.
        off: u64,
        /// Length; 0 = to the end of the window.
        len: u64,
    },
    /// Zero `[off, off+len)` keeping it allocated; `len == 0`: to the end of the window.
    Zero {
        /// Region offset.
        off: u64,
        /// Length; 0 = to the end of the window.
        len: u64,
    },
    /// Truncate the file down to `new_size` bytes from the window's start; checks `[new_size, EOF)`.
    Shrink {
        /// Size from the window's start.
        new_size: u64,
    },
    /// Extend the file to `new_size` bytes from the window's start; checks from the old last block.
    Grow {
        /// Size from the window's start.
        new_size: u64,
    },
    /// Break (evacuate) `[off, off+len)` without changing the file: holders of shared leases are asked to give
    /// it back (and revoked at the deadline under `Revoke`), pins and exclusive leases refuse it like any
    /// change; the operator does this before acting on a range. `len == 0`: to the end of the window.
    Evacuate {
        /// Region offset.
        off: u64,
        /// Length; 0 = to the end of the window.
        len: u64,
    },
    /// The region is about to be hot-removed from the VM: a break over the whole window (every lease asked to
    /// give it back with reason `remove`; pins and exclusive leases refuse it), no change to the file.
    Remove,
    /// A foreign process opened or truncated the backing file (host guard): a whole-file break, no change.
    /// File-level: ranges in its report and errors are file offsets.
    HostOpen,
}

impl LayoutChange {
    /// The change's name, as notices and logs give it.
    pub fn name(&self) -> &'static str {
        match self {
            LayoutChange::Punch { .. } => "punch",
            LayoutChange::Zero { .. } => "zero",
            LayoutChange::Shrink { .. } => "shrink",
            LayoutChange::Grow { .. } => "grow",
            LayoutChange::Evacuate { .. } => "evacuate",
            LayoutChange::Remove => "remove",
            LayoutChange::HostOpen => "host-open",
        }
    }
}

/// A layout change with who asks and how long holders get.
#[derive(Clone, Debug)]
pub struct ChangeRequest {
    /// The region the change is named on.
    pub region: RegionId,
    /// The change.
    pub change: LayoutChange,
    /// The owner asking (for EDEADLK), or None for the operator/host.
    pub requester: Option<OwnerId>,
    /// How long holders of shared leases get to release.
    pub deadline: Duration,
    /// What happens at the deadline.
    pub policy: BreakPolicy,
}

impl ChangeRequest {
    /// A change with no requester, the default deadline and policy `Fail`.
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

/// The break deadline a [`ChangeRequest::new`] gets.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// Longest break deadline a request may ask for (an operator typo must not park a change for years).
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// What a change did and waited for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeReport {
    /// The range that was checked (page-rounded; region-relative, file-relative for file-level changes).
    pub range: Option<ByteRange>,
    /// Holders that were sent break notices.
    pub notified: Vec<OwnerId>,
    /// When each notified holder had released everything the break needed, from the break's start.
    pub released: Vec<(OwnerId, Duration)>,
    /// Holders whose leases were revoked at the deadline.
    pub revoked: Vec<OwnerId>,
    /// It waited for the VMM's own I/O (transient pins) to finish.
    pub waited_for_transient: bool,
    /// It waited behind another break or change on an overlapping range.
    pub queued_behind_break: bool,
    /// From the request to the change applied.
    pub took: Duration,
}

/// Where a change lands: the file range it checks, and the window ranges are shown in (None: file-level).
struct Target {
    key: FileKey,
    range: ByteRange,
    window: Option<ByteRange>,
}

impl Target {
    /// A file range as the requester sees it.
    fn show(&self, r: ByteRange) -> ByteRange {
        match self.window {
            Some(w) => r
                .intersect(&w)
                .map(|x| ByteRange::new(x.start - w.start, x.end - w.start))
                .unwrap_or(r),
            None => r,
        }
    }
}

impl Mapper {
    /// Punches `[off, off+len)` of `region` with the default deadline and policy.
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

    /// Zeroes `[off, off+len)` of `region` with the default deadline and policy.
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

    /// Shrinks the file of `region` (its tail) to `new_size` bytes from the window's start.
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

    /// Grows the file of `region` (its tail) to `new_size` bytes from the window's start.
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
            return Err(MapperError::DeadlineTooLong {
                asked: req.deadline,
                max: MAX_DEADLINE,
            });
        }
        let started = Instant::now();
        let mut report = ChangeReport::default();
        let mut drain = None;
        let (mut st, result) = self.run_change(self.lock(), &req, &mut report, &mut drain);
        if let Some(id) = drain {
            st.drop_draining(id);
            drop(st);
            self.changed.notify_all();
        }
        report.took = started.elapsed();
        result.map(|()| report)
    }

    fn run_change<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        req: &ChangeRequest,
        report: &mut ChangeReport,
        drain: &mut Option<u64>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        macro_rules! check {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return (st, Err(e)),
                }
            };
        }
        loop {
            if let Some(o) = req.requester {
                check!(st.check_owner(o));
            }
            let target = check!(st.change_target(req));
            report.range = Some(target.show(target.range));
            check!(st.check_holds(&target, req.requester));
            let Some(holds) = st.files.get(&target.key) else {
                return (st, Err(MapperError::NotFound(Missing::Region(req.region))));
            };
            if holds.busy(target.range, *drain).is_some() {
                report.queued_behind_break = true;
                st = self.wait(st);
                continue;
            }
            // The requester's own shared leases are not broken: it does not wait on itself (a lease holder's
            // own change goes through, as a kernel lease holder's own open does).
            let shared: Vec<LeaseId> = holds
                .leases
                .overlapping(target.range)
                .into_iter()
                .map(LeaseId::from_raw)
                .filter(|id| {
                    req.requester.is_none()
                        || st
                            .leases
                            .get(id)
                            .is_none_or(|l| Some(l.owner) != req.requester)
                })
                .collect();
            if !shared.is_empty() {
                let (s, r) = self.break_leases(st, req, &target, shared, report);
                st = s;
                check!(r);
                // Every holder released (or was revoked): go round again, re-checking everything.
                continue;
            }
            if holds.transients.any_overlap(target.range) {
                if drain.is_none() {
                    let id = st.next_id();
                    st.insert_draining(id, target.key, target.range);
                    *drain = Some(id);
                }
                report.waited_for_transient = true;
                st = self.wait(st);
                continue;
            }
            check!(st.apply(req));
            tracing::info!(region = %req.region, change = req.change.name(), range = %target.show(target.range), "layout change applied");
            return (st, Ok(()));
        }
    }

    /// Records a break over `shared`, notifies the holders with the lock released, and waits for them (or the
    /// deadline and its policy).
    fn break_leases<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        req: &ChangeRequest,
        target: &Target,
        shared: Vec<LeaseId>,
        report: &mut ChangeReport,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let started = Instant::now();
        let deadline = started + req.deadline;
        let bid = BreakId::from_raw(st.next_id());
        let notices = st.notices(bid, target.range, &shared, deadline, req.change.name());
        st.insert_break(
            bid,
            BreakState {
                region: req.region,
                file: target.key,
                range: target.range,
                leases: shared.clone(),
                deadline,
                reason: req.change.name(),
            },
        );
        let mut waiting: Vec<OwnerId> = notices.iter().map(|n| n.owner).collect();
        waiting.dedup();
        report.notified.extend(waiting.iter().copied());
        let started_notice = BreakStarted {
            break_id: bid,
            region: req.region,
            range: target.show(target.range),
            holders: waiting.iter().map(|o| (*o, st.owner_name(*o))).collect(),
            reason: req.change.name(),
        };
        drop(st);
        tracing::info!(%bid, region = %req.region, range = %target.show(target.range), holders = waiting.len(), reason = req.change.name(), "break started");
        self.notifier.break_started(&started_notice);
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
            // One pass over the leases, then one over the holders: a wake-up costs O(leases + holders).
            let holding: std::collections::HashSet<OwnerId> = remaining
                .iter()
                .filter_map(|l| st.leases.get(l).map(|l| l.owner))
                .collect();
            let mut released = Vec::new();
            waiting.retain(|o| {
                let holds = holding.contains(o);
                if !holds {
                    report.released.push((*o, started.elapsed()));
                    released.push(HolderReleased {
                        break_id: bid,
                        region: req.region,
                        owner: *o,
                        name: started_notice
                            .holders
                            .iter()
                            .find(|(h, _)| h == o)
                            .map(|(_, n)| n.clone())
                            .unwrap_or_default(),
                        after: started.elapsed(),
                    });
                }
                holds
            });
            if !released.is_empty() {
                drop(st);
                for r in &released {
                    self.notifier.holder_released(r);
                }
                st = self.lock();
                continue;
            }
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
                    holders.sort();
                    holders.dedup();
                    st.end_break(bid);
                    self.changed.notify_all();
                    let range = target.show(target.range);
                    tracing::warn!(%bid, %range, ?holders, "break timed out; change refused");
                    return (st, Err(MapperError::TimedOut { range, holders }));
                }
                BreakPolicy::Revoke => {
                    let revoked = st.revoke(bid, target, &remaining, self.dma.as_deref());
                    report.revoked.extend(revoked.iter().map(|r| r.owner));
                    // A revoked holder did not release: it is not reported as released.
                    waiting.retain(|o| !revoked.iter().any(|r| r.owner == *o));
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
        (st, Ok(()))
    }
}

impl State {
    /// The file range a change must check.
    fn change_target(&self, req: &ChangeRequest) -> Result<Target> {
        let reg = self.region(req.region)?;
        reg.require_layout()?;
        let window = reg.window();
        let base = window.start;
        let tail = |change: &'static str, new_size: u64| -> Result<u64> {
            let file_len = reg.file_len()?;
            if window.end < file_len || file_len < base {
                return Err(MapperError::NotFileTail {
                    region: reg.id,
                    name: reg.label(),
                    window_end: window.end,
                    file_size: file_len,
                });
            }
            let cur = file_len.saturating_sub(base);
            let wrong = match change {
                "shrink" => new_size > cur,
                _ => new_size < cur,
            };
            if wrong {
                return Err(MapperError::WrongDirection {
                    change,
                    new_size,
                    size: cur,
                });
            }
            if new_size > reg.desc.size {
                return Err(MapperError::OutOfWindow {
                    region: reg.id,
                    name: reg.label(),
                    off: new_size,
                    len: 0,
                    size: reg.desc.size,
                });
            }
            Ok(cur)
        };
        let (range, window) = match req.change {
            LayoutChange::Punch { off, len }
            | LayoutChange::Zero { off, len }
            | LayoutChange::Evacuate { off, len } => {
                (reg.to_file(reg.request(off, len)?), Some(window))
            }
            LayoutChange::Remove => (reg.to_file(reg.request(0, 0)?), Some(window)),
            LayoutChange::Shrink { new_size } => {
                tail("shrink", new_size)?;
                (ByteRange::for_shrink(base + new_size), Some(window))
            }
            LayoutChange::Grow { new_size } => {
                let cur = tail("grow", new_size)?;
                (ByteRange::for_grow(base + cur), Some(window))
            }
            LayoutChange::HostOpen => (ByteRange::new(0, OPEN_END), None),
        };
        Ok(Target {
            key: reg.key,
            range,
            window,
        })
    }

    /// Pins, then exclusive leases: EDEADLK if the requester holds one (wins), else ETXTBSY naming the holder.
    fn check_holds(&self, target: &Target, requester: Option<OwnerId>) -> Result<()> {
        let Some(holds) = self.files.get(&target.key) else {
            return Ok(());
        };
        let range = target.range;
        let overlap = |r: ByteRange| target.show(r.intersect(&range).unwrap_or(r));
        let mut first: Option<(OwnerId, ByteRange)> = None;
        let mut own: Option<ByteRange> = None;
        holds.pins.for_each_overlap(range, |r, id| {
            if let Some(p) = self.pins.get(&PinId::from_raw(id)) {
                if Some(p.owner) == requester {
                    own = Some(overlap(r));
                    return ControlFlow::Break(());
                }
                first.get_or_insert((p.owner, overlap(r)));
            }
            ControlFlow::Continue(())
        });
        self.hold_error(HoldKind::Pin, first, own, requester)?;
        let (mut first, mut own) = (None, None);
        holds.leases.for_each_overlap(range, |r, id| {
            if let Some(l) = self.leases.get(&LeaseId::from_raw(id)) {
                if l.mode == LeaseMode::Exclusive {
                    if Some(l.owner) == requester {
                        own = Some(overlap(r));
                        return ControlFlow::Break(());
                    }
                    first.get_or_insert((l.owner, overlap(r)));
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

    /// The leases of `ids` grouped by (holder, region), each with the part of `range` it covers, relative to
    /// the lease's own region.
    fn by_holder(
        &self,
        range: ByteRange,
        ids: &[LeaseId],
    ) -> BTreeMap<(OwnerId, RegionId), Vec<(LeaseId, ByteRange)>> {
        let mut out: BTreeMap<(OwnerId, RegionId), Vec<(LeaseId, ByteRange)>> = BTreeMap::new();
        for id in ids {
            let Some(l) = self.leases.get(id) else {
                continue;
            };
            let Some(overlap) = l.range.intersect(&range) else {
                continue;
            };
            let shown = self
                .regions
                .get(&l.region)
                .and_then(|r| r.to_region(overlap))
                .unwrap_or(overlap);
            out.entry((l.owner, l.region))
                .or_default()
                .push((*id, shown));
        }
        out
    }

    /// One notice per holder and region, listing each of its leases with the overlap.
    fn notices(
        &self,
        bid: BreakId,
        range: ByteRange,
        leases: &[LeaseId],
        deadline: Instant,
        reason: &'static str,
    ) -> Vec<BreakNotice> {
        self.by_holder(range, leases)
            .into_iter()
            .map(|((owner, region), leases)| BreakNotice {
                break_id: bid,
                owner,
                region,
                leases,
                deadline,
                reason,
            })
            .collect()
    }

    /// Revoke policy: per holder, tear down the DMA mappings of its pins on the file (an owner that ignores a
    /// break is a failed DMA context; its device loses access first), then remove its leases in the break.
    fn revoke(
        &mut self,
        bid: BreakId,
        target: &Target,
        remaining: &[LeaseId],
        dma: Option<&dyn DmaMapper>,
    ) -> Vec<RevokeNotice> {
        let groups = self.by_holder(target.range, remaining);
        let mut out = Vec::new();
        let mut torn_for: BTreeMap<OwnerId, Vec<PinId>> = BTreeMap::new();
        for ((owner, region), leases) in groups {
            let torn = torn_for
                .entry(owner)
                .or_insert_with(|| self.tear_down_dma(owner, target.key, dma))
                .clone();
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

    /// Unmaps the DMA of every pin `owner` has on file `key`, keeping the pins (and their mlock).
    fn tear_down_dma(
        &mut self,
        owner: OwnerId,
        key: FileKey,
        dma: Option<&dyn DmaMapper>,
    ) -> Vec<PinId> {
        let pins: Vec<PinId> = self
            .owners
            .get(&owner)
            .map(|o| o.pins.iter().copied().collect())
            .unwrap_or_default();
        let mut torn = Vec::new();
        for pid in pins {
            let Some(p) = self.pins.get_mut(&pid).filter(|p| p.key == key) else {
                continue;
            };
            if let (Some((iova, len)), Some(d)) = (p.dma.take(), dma) {
                if let Err(e) = d.unmap(iova, len) {
                    tracing::error!(%pid, error = %e, "DMA unmap on revoke failed");
                }
                p.dma_revoked = true;
                torn.push(pid);
            }
        }
        torn.sort();
        torn
    }

    /// The change itself. Runs under the lock, after every check passed.
    fn apply(&self, req: &ChangeRequest) -> Result<()> {
        let reg = self.region(req.region)?;
        let file = &reg.desc.file;
        let base = reg.desc.file_offset;
        match req.change {
            LayoutChange::Punch { off, len } | LayoutChange::Zero { off, len } => {
                // Exactly the bytes asked for (checks covered whole pages), never past the end of the file:
                // zeroing there would allocate blocks nobody can see.
                let end = if len == 0 { reg.desc.size } else { off + len };
                let start = base + off;
                let end = (base + end).min(reg.file_len()?);
                if start >= end {
                    return Ok(());
                }
                if matches!(req.change, LayoutChange::Punch { .. }) {
                    host::punch(file, start, end - start)
                        .map_err(|e| MapperError::io("fallocate(PUNCH_HOLE)", e))
                } else {
                    host::zero(file, start, end - start)
                        .map_err(|e| MapperError::io("fallocate(ZERO_RANGE)", e))
                }
            }
            LayoutChange::Shrink { new_size } | LayoutChange::Grow { new_size } => file
                .set_len(base + new_size)
                .map_err(|e| MapperError::io("ftruncate", e)),
            LayoutChange::Evacuate { .. } | LayoutChange::Remove | LayoutChange::HostOpen => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use crate::*;
    use std::sync::Arc;

    use super::*;
    use crate::test_files::TestRegion;
    use crate::BackingKind;
    use crate::{Mapper, RegionDesc};

    /// Everything a refused change must leave as it was: size, bytes, extents (FIEMAP, where the filesystem has
    /// an extent map), tables, DMA mappings.
    type Observed = (
        u64,
        Vec<u8>,
        Option<Vec<crate::Extent>>,
        crate::Snapshot,
        Vec<(u64, usize, u64)>,
    );

    fn state_of(t: &TestRegion) -> Observed {
        use std::os::fd::AsRawFd;
        let size = t.file_size();
        let extents = crate::read_extents(t.file.as_raw_fd(), 0, u64::MAX).ok();
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
            m.grow(None, t.region, 8 * t.page).unwrap();
            assert_eq!(t.file_size(), 8 * t.page);
            assert_eq!(t.read_file(7 * t.page, 1)[0], 0);
            // Punch to EOF (len 0).
            m.punch(None, t.region, 5 * t.page, 0).unwrap();
            assert_eq!(
                t.read_file(5 * t.page - 1, 2),
                vec![t.fill_byte(4 * t.page), 0],
                "{}",
                t.fs
            );
            assert_eq!(t.file_size(), 8 * t.page, "punch keeps the size");
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
                m.grow(None, t.region, 8 * t.page).unwrap_err().errno(),
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
    fn evacuate_breaks_shared_leases_and_changes_nothing_in_the_file() {
        for mut t in TestRegion::on_every_fs(8) {
            let m = t.mapper.clone();
            let a = m.add_owner("a");
            let l = m.acquire(a, t.region, 0, 0, LeaseMode::Shared).unwrap();
            let events = t.events.take().unwrap();
            let before = t.read_file(0, t.file_size() as usize);
            let (m2, region, page) = (m.clone(), t.region, t.page);
            let h = std::thread::spawn(move || {
                m2.change(ChangeRequest {
                    deadline: std::time::Duration::from_secs(10),
                    ..ChangeRequest::new(
                        region,
                        LayoutChange::Evacuate {
                            off: page,
                            len: 2 * page,
                        },
                    )
                })
            });
            match events
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap()
            {
                crate::BreakEvent::Notice(n) => {
                    assert_eq!(n.reason, "evacuate");
                    assert_eq!(
                        n.leases,
                        vec![(l, ByteRange::new(t.page, 3 * t.page))],
                        "{}",
                        t.fs
                    );
                }
                other => panic!("{}: {other:?}", t.fs),
            }
            m.release(a, l).unwrap();
            let report = h.join().unwrap().unwrap();
            assert_eq!(report.notified, vec![a]);
            assert_eq!(t.read_file(0, t.file_size() as usize), before, "{}", t.fs);
            // Exclusive holds refuse it at once, like any change.
            m.acquire(a, t.region, 0, t.page, LeaseMode::Exclusive)
                .unwrap();
            let e = m
                .change(ChangeRequest::new(
                    t.region,
                    LayoutChange::Evacuate { off: 0, len: 0 },
                ))
                .unwrap_err();
            assert_eq!(e.errno(), libc::ETXTBSY, "{}", t.fs);
        }
    }

    #[test]
    fn grow_checks_from_the_old_last_block_and_shrink_from_the_new_size() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let l = m
                .acquire(a, t.region, 0, 5 * t.page, LeaseMode::Exclusive)
                .unwrap();
            m.shrink(None, t.region, 6 * t.page).unwrap();
            // A lease short of the old last page does not conflict with a grow.
            m.grow(None, t.region, 8 * t.page).unwrap();
            assert_eq!(t.file_size(), 8 * t.page, "{}", t.fs);
            // Growing past the window would change bytes outside it.
            assert_eq!(
                m.grow(None, t.region, 9 * t.page).unwrap_err().errno(),
                libc::ERANGE
            );
            m.shrink(None, t.region, 6 * t.page).unwrap();
            m.release(a, l).unwrap();
            // The last page of the old size does conflict.
            m.acquire(a, t.region, 5 * t.page, t.page, LeaseMode::Exclusive)
                .unwrap();
            assert_eq!(
                m.grow(None, t.region, 8 * t.page).unwrap_err().errno(),
                libc::ETXTBSY,
                "{}",
                t.fs
            );
            assert_eq!(t.file_size(), 6 * t.page);
            // And shrink covers [new size, EOF): the lease at page 5 blocks shrinking below it only.
            m.shrink(None, t.region, 6 * t.page).unwrap();
            assert_eq!(
                m.shrink(None, t.region, 5 * t.page).unwrap_err().errno(),
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
            m.punch(Some(OwnerId::from_raw(12345)), t.region, 0, 1)
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
        let m = Mapper::new(Arc::new(crate::ChannelNotifier::new().0), None);
        let r = m
            .add_region(
                RegionDesc::new(t.file.clone(), 0, 4 * t.page, BackingKind::DevDax)
                    .with_mapping(t.map.clone()),
            )
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
