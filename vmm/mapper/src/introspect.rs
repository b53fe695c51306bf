//! Introspection: every region, and every lease and pin by owner with byte ranges (the F_LAYOUT RFC's
//! `/proc/<pid>/file_pins` listed files only; operators need the ranges), breaks in progress, and what the host
//! guard saw. Ranges are relative to the region each hold is on.

use std::time::Instant;

use crate::guard::{GuardCounts, GuardEvent};
use crate::host::{BackingKind, FileKey};
use crate::ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
use crate::lease::LeaseMode;
use crate::pin::PinState;
use crate::pinnability::DmaRule;
use crate::range::ByteRange;
use crate::region::Region;
use crate::state::State;
use crate::Mapper;

/// A region as the mapper has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionView {
    /// Its id.
    pub id: RegionId,
    /// The name it was registered with (the operator's device id), or empty.
    pub name: String,
    /// Backing kind.
    pub kind: BackingKind,
    /// The file it is a window of.
    pub file: FileKey,
    /// Where the window starts in the file.
    pub file_offset: u64,
    /// Window size.
    pub size: u64,
    /// IOVA of region offset 0.
    pub iova: u64,
    /// Whether pins can populate and lock it (it has a host mapping).
    pub mapped: bool,
    /// Transient pins (the VMM's own I/O, such as flushes) in flight over its window.
    pub in_flight_io: usize,
    /// Whether the kernel lets a DMA mapper pin it (`dma_rule.pinnable()`), and the rule that says so.
    pub dma_rule: DmaRule,
}

/// A lease, region-relative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// Its id.
    pub id: LeaseId,
    /// The region it was taken on.
    pub region: RegionId,
    /// Its range in that region.
    pub range: ByteRange,
    /// Shared or exclusive.
    pub mode: LeaseMode,
}

/// A pin, region-relative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinView {
    /// Its id.
    pub id: PinId,
    /// The region it was taken on.
    pub region: RegionId,
    /// Its range in that region.
    pub range: ByteRange,
    /// The exclusive lease it stands on (none on device-DAX).
    pub lease: Option<LeaseId>,
    /// Validation/populate still running.
    pub pending: bool,
    /// The IOVA range a device can reach, if mapped.
    pub dma: Option<(u64, u64)>,
    /// A revoke tore its DMA mapping down.
    pub dma_revoked: bool,
}

/// An owner and everything it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerView {
    /// Its id.
    pub id: OwnerId,
    /// The name it registered with.
    pub name: String,
    /// Its leases, by id.
    pub leases: Vec<LeaseView>,
    /// Its pins, by id.
    pub pins: Vec<PinView>,
}

/// A break in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakView {
    /// Its id.
    pub id: BreakId,
    /// The region the change was named on.
    pub region: RegionId,
    /// The range broken, relative to that region (file offsets for a file-level change).
    pub range: ByteRange,
    /// Leases not yet released, with their holders.
    pub waiting_on: Vec<(LeaseId, OwnerId)>,
    /// When its policy applies.
    pub deadline: Instant,
    /// What the change is.
    pub reason: &'static str,
}

/// Everything the mapper holds, at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// By region id.
    pub regions: Vec<RegionView>,
    /// By owner id.
    pub owners: Vec<OwnerView>,
    /// By break id.
    pub breaks: Vec<BreakView>,
    /// What the host guard saw, oldest first: the latest [`crate::GUARD_HISTORY`] events.
    pub guard_events: Vec<GuardEvent>,
    /// Every event the host guard saw, counted per region (the history above is bounded, these are not).
    pub guard_counts: std::collections::HashMap<RegionId, GuardCounts>,
}

impl Snapshot {
    /// Every lease with its owner.
    pub fn leases(&self) -> Vec<(OwnerId, LeaseView)> {
        self.owners
            .iter()
            .flat_map(|o| o.leases.iter().map(|l| (o.id, l.clone())))
            .collect()
    }

    /// Every pin with its owner.
    pub fn pins(&self) -> Vec<(OwnerId, PinView)> {
        self.owners
            .iter()
            .flat_map(|o| o.pins.iter().map(|p| (o.id, p.clone())))
            .collect()
    }

    /// One owner.
    pub fn owner(&self, id: OwnerId) -> Option<&OwnerView> {
        self.owners.iter().find(|o| o.id == id)
    }
}

impl Region {
    pub(crate) fn view(&self, st: &State) -> RegionView {
        let window = self.window();
        let in_flight_io = st
            .transients
            .values()
            .filter(|(k, r)| *k == self.key && r.overlaps(&window))
            .count();
        RegionView {
            in_flight_io,
            id: self.id,
            name: self.desc.name.clone(),
            kind: self.desc.kind,
            file: self.key,
            file_offset: self.desc.file_offset,
            size: self.desc.size,
            iova: self.desc.iova,
            mapped: self.desc.mapping.is_some(),
            dma_rule: self.dma_rule,
        }
    }
}

impl State {
    /// A file range held on `region`, relative to it.
    fn shown(&self, region: RegionId, r: ByteRange) -> ByteRange {
        self.regions
            .get(&region)
            .and_then(|reg| reg.to_region(r))
            .unwrap_or(r)
    }
}

impl Mapper {
    /// Everything the mapper holds, at one instant.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let mut regions: Vec<RegionView> = st.regions.values().map(|r| r.view(&st)).collect();
        regions.sort_by_key(|r| r.id);
        let mut owners: Vec<OwnerView> = st
            .owners
            .iter()
            .map(|(id, o)| {
                let mut leases: Vec<LeaseView> = o
                    .leases
                    .iter()
                    .filter_map(|l| {
                        st.leases.get(l).map(|x| LeaseView {
                            id: *l,
                            region: x.region,
                            range: st.shown(x.region, x.range),
                            mode: x.mode,
                        })
                    })
                    .collect();
                leases.sort_by_key(|l| l.id);
                let mut pins: Vec<PinView> = o
                    .pins
                    .iter()
                    .filter_map(|p| {
                        st.pins.get(p).map(|x| PinView {
                            id: *p,
                            region: x.region,
                            range: st.shown(x.region, x.range),
                            lease: x.lease,
                            pending: x.state == PinState::Pending,
                            dma: x.dma,
                            dma_revoked: x.dma_revoked,
                        })
                    })
                    .collect();
                pins.sort_by_key(|p| p.id);
                OwnerView {
                    id: *id,
                    name: o.name.clone(),
                    leases,
                    pins,
                }
            })
            .collect();
        owners.sort_by_key(|o| o.id);
        let mut breaks: Vec<BreakView> = st
            .breaks
            .iter()
            .map(|(id, b)| BreakView {
                id: *id,
                region: b.region,
                range: if b.range.is_open() && b.reason == "host-open" {
                    b.range
                } else {
                    st.shown(b.region, b.range)
                },
                waiting_on: b
                    .leases
                    .iter()
                    .filter_map(|l| st.leases.get(l).map(|x| (*l, x.owner)))
                    .collect(),
                deadline: b.deadline,
                reason: b.reason,
            })
            .collect();
        breaks.sort_by_key(|b| b.id);
        Snapshot {
            regions,
            owners,
            breaks,
            guard_events: st.guard_events.iter().cloned().collect(),
            guard_counts: st.guard_counts.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::TestRegion;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn snapshot_lists_leases_and_pins_by_owner_with_ranges() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("agent-a");
            let b = m.add_owner("dma-b");
            let la = m.acquire(a, t.region, 0, 0, LeaseMode::Shared).unwrap();
            let lb = m
                .acquire(b, t.region, t.page, 2 * t.page, LeaseMode::Exclusive)
                .unwrap();
            let pb = m.pin(b, t.region, t.page + 1, 10).unwrap();
            let s = m.snapshot();
            let va = s.owner(a).unwrap();
            assert_eq!(va.name, "agent-a");
            assert_eq!(
                va.leases,
                vec![LeaseView {
                    id: la,
                    region: t.region,
                    range: ByteRange::new(0, 8 * t.page),
                    mode: LeaseMode::Shared
                }]
            );
            let vb = s.owner(b).unwrap();
            assert_eq!(
                vb.leases[0].range,
                ByteRange::new(t.page, 3 * t.page),
                "{}",
                t.fs
            );
            assert_eq!(vb.pins.len(), 1);
            let p = &vb.pins[0];
            assert_eq!(
                (p.id, p.range, p.lease, p.pending),
                (pb, ByteRange::new(t.page, 2 * t.page), Some(lb), false)
            );
            assert_eq!(p.dma, Some((t.iova + t.page, t.page)));
            // Any ETXTBSY names the holder and the held range.
            match m.punch(Some(a), t.region, 0, 0).unwrap_err() {
                crate::MapperError::TextBusy {
                    holder,
                    holder_name,
                    range,
                    ..
                } => {
                    assert_eq!((holder, holder_name.as_str(), range), (b, "dma-b", p.range))
                }
                e => panic!("{}: {e}", t.fs),
            }
        }
    }
}
