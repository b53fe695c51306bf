//! Ending one owner by the operator's hand: a guest (or device) that holds capacity hostage loses its DMA
//! mappings first, then its pins and leases, and is told (a `Revoked` message on the agent channel for a guest
//! owner). Changes that waited on it proceed.

use daxvisor_mapper::OwnerId;

use super::{ActionError, Actions};
use crate::events::{EventKind, NewEvent};

/// What revoking an owner took away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub owner: u64,
    pub name: String,
    pub leases: usize,
    pub dma_torn_down: usize,
    /// The regions it held leases or pins on, by name.
    pub regions: Vec<String>,
}

impl Actions {
    /// End owner `raw` now: DMA unmapped first, pins and leases released, the owner told.
    pub fn revoke_owner(&self, raw: u64) -> Result<Revoked, ActionError> {
        let owner = OwnerId::from_raw(raw);
        let name = self.owner_name(raw);
        let notices = self.mapper.revoke_owner(owner)?;
        let out = Revoked {
            owner: raw,
            name,
            leases: notices.iter().map(|n| n.leases.len()).sum(),
            dma_torn_down: notices.iter().map(|n| n.dma_torn_down.len()).sum(),
            regions: notices
                .iter()
                .map(|n| self.regions.name_of(n.region))
                .collect(),
        };
        self.events.push(NewEvent {
            kind: EventKind::OwnerRevoked,
            region: out.regions.first().cloned(),
            owners: vec![raw],
            message: format!(
                "the operator revoked {owner} ({}): {} lease(s) released, {} DMA mapping(s) torn down",
                out.name, out.leases, out.dma_torn_down
            ),
            ..NewEvent::default()
        });
        Ok(out)
    }
}
