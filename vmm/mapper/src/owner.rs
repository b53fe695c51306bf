//! Owners: who holds leases and pins (a guest agent connection, an application behind it, a DMA context, the
//! operator). Every lease and pin has exactly one owner; when the owner goes away, everything it holds goes.

use std::collections::HashSet;

use crate::error::{MapperError, Missing, Result};
use crate::ids::{LeaseId, OwnerId, PinId};
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
}
