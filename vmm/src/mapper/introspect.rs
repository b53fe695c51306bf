//! Introspection: every lease and pin by owner with byte ranges (the RFC's /proc/<pid>/file_pins listed files
//! only; operators need the ranges), breaks in progress, and what the host guard saw.

use std::time::Instant;

use super::breaks::BreakId;
use super::guard::GuardEvent;
use super::lease::{LeaseId, LeaseMode};
use super::owner::OwnerId;
use super::pin::{PinId, PinState};
use super::range::ByteRange;
use super::region::RegionId;
use super::Mapper;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub id: LeaseId,
    pub region: RegionId,
    pub range: ByteRange,
    pub mode: LeaseMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinView {
    pub id: PinId,
    pub region: RegionId,
    pub range: ByteRange,
    pub lease: Option<LeaseId>,
    /// Validation/populate still running.
    pub pending: bool,
    /// The IOVA range a device can reach, if mapped.
    pub dma: Option<(u64, u64)>,
    pub dma_revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerView {
    pub id: OwnerId,
    pub name: String,
    pub leases: Vec<LeaseView>,
    pub pins: Vec<PinView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakView {
    pub id: BreakId,
    pub region: RegionId,
    pub range: ByteRange,
    pub waiting_on: Vec<(LeaseId, OwnerId)>,
    pub deadline: Instant,
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// By owner id.
    pub owners: Vec<OwnerView>,
    pub breaks: Vec<BreakView>,
    pub guard_events: Vec<GuardEvent>,
}

impl Snapshot {
    pub fn leases(&self) -> Vec<(OwnerId, LeaseView)> {
        self.owners
            .iter()
            .flat_map(|o| o.leases.iter().map(|l| (o.id, l.clone())))
            .collect()
    }

    pub fn pins(&self) -> Vec<(OwnerId, PinView)> {
        self.owners
            .iter()
            .flat_map(|o| o.pins.iter().map(|p| (o.id, p.clone())))
            .collect()
    }

    pub fn owner(&self, id: OwnerId) -> Option<&OwnerView> {
        self.owners.iter().find(|o| o.id == id)
    }
}

impl Mapper {
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
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
                            range: x.range,
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
                            range: x.range,
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
                range: b.range,
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
            owners,
            breaks,
            guard_events: st.guard_events.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::test_files::TestRegion;

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
                    range: ByteRange::new(0, OPEN),
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
                crate::mapper::MapperError::TextBusy {
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
    const OPEN: u64 = crate::mapper::OPEN_END;
}
