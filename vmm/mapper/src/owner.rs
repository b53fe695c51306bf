//! Owners: who holds leases and pins (a guest agent connection, an application behind it, a DMA context, the
//! operator). Every lease and pin has exactly one owner; when the owner goes away, everything it holds goes.

use std::collections::{BTreeMap, HashSet};

use crate::breaks::RevokeNotice;
use crate::error::{MapperError, Missing, Result};
use crate::ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
use crate::range::ByteRange;
use crate::Mapper;

#[derive(Debug)]
pub(crate) struct Owner {
    pub name: String,
    /// Its leases; each lease's slot records its position here (`LeaseTable::owner_pos`).
    pub leases: Vec<LeaseId>,
    pub pins: HashSet<PinId>,
}

impl Mapper {
    /// Registers an owner; `name` is what introspection and ETXTBSY errors show.
    pub fn add_owner(&self, name: &str) -> OwnerId {
        let mut st = self.lock();
        let id = OwnerId::from_raw(st.next_id());
        st.owners.insert(
            id,
            Owner {
                name: name.to_string(),
                leases: Vec::new(),
                pins: HashSet::new(),
            },
        );
        tracing::debug!(%id, name, "owner added");
        id
    }

    /// How many leases `owner` holds now (0 for an owner that is gone): what a per-owner limit counts, so
    /// leases revoked at a break's deadline or ended with their owner are never counted twice.
    pub fn lease_count(&self, owner: OwnerId) -> usize {
        self.lock().owners.get(&owner).map_or(0, |o| o.leases.len())
    }

    /// The operator ends `owner` while it still holds things (a guest that holds capacity hostage): its pins'
    /// DMA mappings are torn down first, then its pins and leases go, and it is told, one [`RevokeNotice`] per
    /// region it held leases on (region-relative ranges; `dma_torn_down` lists the pins whose DMA was unmapped).
    /// Every change waiting on it re-evaluates. Returns the notices sent.
    pub fn revoke_owner(&self, owner: OwnerId) -> Result<Vec<RevokeNotice>> {
        let mut st = self.lock();
        let o = st
            .owners
            .remove(&owner)
            .ok_or(MapperError::NotFound(Missing::Owner(owner)))?;
        let bid = BreakId::from_raw(st.next_id());
        let mut torn = Vec::new();
        // Every region it held anything on gets a notice, also one where it held only pins (device-DAX).
        let mut by_region: BTreeMap<RegionId, Vec<(LeaseId, ByteRange)>> = BTreeMap::new();
        for pin in o.pins {
            let had_dma = st.pins.get(&pin).is_some_and(|p| p.dma.is_some());
            if let Some(p) = st.drop_pin(pin, self.dma.as_deref()) {
                by_region.entry(p.region).or_default();
                if had_dma {
                    torn.push(pin);
                }
            }
        }
        torn.sort();
        for lease in o.leases {
            if let Some(l) = st.drop_lease(lease) {
                let shown = st
                    .regions
                    .get(&l.region)
                    .and_then(|r| r.to_region(l.range))
                    .unwrap_or(l.range);
                by_region.entry(l.region).or_default().push((lease, shown));
            }
        }
        let notices: Vec<RevokeNotice> = by_region
            .into_iter()
            .enumerate()
            .map(|(i, (region, leases))| RevokeNotice {
                break_id: bid,
                owner,
                region,
                leases,
                // Said once, with the first region's notice.
                dma_torn_down: if i == 0 { torn.clone() } else { Vec::new() },
            })
            .collect();
        tracing::warn!(%owner, name = %o.name, regions = notices.len(), dma_torn_down = torn.len(), "owner revoked by the operator");
        drop(st);
        self.changed.notify_all();
        for n in &notices {
            self.notifier.revoked(n);
        }
        Ok(notices)
    }

    /// The owner went away (agent channel closed, DMA context destroyed, VM stopping): its pins are unpinned
    /// (DMA unmapped first, then munlocked) and its leases released, and every change waiting on them
    /// re-evaluates. Works in the middle of a break: the waiting change proceeds.
    pub fn owner_exit(&self, owner: OwnerId) -> Result<()> {
        let mut st = self.lock();
        let o = st
            .owners
            .remove(&owner)
            .ok_or(MapperError::NotFound(Missing::Owner(owner)))?;
        for pin in o.pins {
            st.drop_pin(pin, self.dma.as_deref());
        }
        for lease in o.leases {
            st.drop_lease(lease);
        }
        tracing::info!(%owner, name = %o.name, "owner exited; everything it held released");
        drop(st);
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_files::TestRegion;
    use crate::LeaseMode;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn owner_exit_releases_everything_and_unknown_owners_are_enoent() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let o = m.add_owner("agent");
            let l = m
                .acquire(o, t.region, 0, 4 * t.page, LeaseMode::Exclusive)
                .unwrap();
            m.pin(o, t.region, 0, t.page).unwrap();
            m.acquire(o, t.region, 0, 0, LeaseMode::Shared).unwrap();
            assert_eq!(t.dma.mappings().len(), 1, "{}", t.fs);
            m.owner_exit(o).unwrap();
            let snap = m.snapshot();
            assert!(snap.owners.is_empty(), "{}: {snap:?}", t.fs);
            assert!(
                t.dma.mappings().is_empty(),
                "{}: DMA mapping left behind",
                t.fs
            );
            // The change that the pin blocked now succeeds.
            m.punch(None, t.region, 0, t.page).unwrap();
            assert_eq!(m.release(o, l).unwrap_err().errno(), libc::ENOENT);
            assert_eq!(m.owner_exit(o).unwrap_err().errno(), libc::ENOENT);
            assert_eq!(
                m.acquire(o, t.region, 0, 1, LeaseMode::Shared)
                    .unwrap_err()
                    .errno(),
                libc::ENOENT
            );
        }
    }

    #[test]
    fn a_revoked_owner_loses_dma_first_then_everything_and_is_told_per_region() {
        let mut t = TestRegion::on_tmp(8);
        let events = t.events.take().unwrap();
        let m = &t.mapper;
        let o = m.add_owner("agent:stuck");
        let l = m
            .acquire(o, t.region, 0, 4 * t.page, LeaseMode::Exclusive)
            .unwrap();
        let pin = m.pin(o, t.region, 0, t.page).unwrap();
        assert_eq!(t.dma.mappings().len(), 1);
        // The pin refuses a punch until the operator revokes its owner.
        assert_eq!(
            m.punch(None, t.region, 0, t.page).unwrap_err().errno(),
            libc::ETXTBSY
        );
        let notices = m.revoke_owner(o).unwrap();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].leases.len(), 1);
        assert_eq!(notices[0].leases[0].0, l);
        assert_eq!(notices[0].dma_torn_down, vec![pin]);
        assert!(t.dma.mappings().is_empty(), "DMA mapping left behind");
        assert!(m.snapshot().owners.is_empty());
        match events.try_recv().unwrap() {
            BreakEvent::Revoked(n) => assert_eq!(n, notices[0]),
            e => panic!("expected the revoke notice, got {e:?}"),
        }
        m.punch(None, t.region, 0, t.page).unwrap();
        assert_eq!(m.revoke_owner(o).unwrap_err().errno(), libc::ENOENT);
    }
}
