//! The operator's own leases. A shared lease lets the operator hold a range while it works on it and be asked
//! (like any holder) before a change takes it; an exclusive lease refuses every change over the range
//! (ETXTBSY, or EDEADLK for the operator's own change) until it is released.

use daxvisor_mapper::{LeaseId, LeaseMode};

use super::{window_range, ActionError, Actions};
use crate::events::{EventKind, NewEvent};

/// A lease the operator now holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorLease {
    pub id: LeaseId,
    pub region: String,
    /// Region-relative, explicit (never "to the end").
    pub offset: u64,
    pub length: u64,
    pub mode: LeaseMode,
}

impl Actions {
    /// Take a lease on `[offset, offset+length)` of the named region (length 0: to its end).
    pub fn acquire_lease(
        &self,
        region: &str,
        offset: u64,
        length: u64,
        mode: LeaseMode,
    ) -> Result<OperatorLease, ActionError> {
        self.acquire_lease_as(None, region, offset, length, mode)
    }

    /// Take a lease as the operator (`job` None) or as one of its jobs (`operator:JOB`, a separate owner).
    pub fn acquire_lease_as(
        &self,
        job: Option<&str>,
        region: &str,
        offset: u64,
        length: u64,
        mode: LeaseMode,
    ) -> Result<OperatorLease, ActionError> {
        let reg = self.region(region)?;
        let (offset, length) = window_range(reg.size(), offset, length)?;
        let op = match job {
            None => self.operator(),
            Some(j) => self.job(j)?,
        };
        let who = job.map_or_else(|| "operator".to_owned(), |j| format!("operator:{j}"));
        let id = self.mapper.acquire(op, reg.id, offset, length, mode)?;
        // The range as the mapper holds it (page-rounded).
        let (offset, length) = self
            .mapper
            .snapshot()
            .owner(op)
            .and_then(|o| o.leases.iter().find(|l| l.id == id))
            .map_or((offset, length), |l| {
                (l.range.start, crate::api::range_len(&l.range))
            });
        let lease = OperatorLease {
            id,
            region: region.to_owned(),
            offset,
            length,
            mode,
        };
        self.events.push(NewEvent {
            kind: EventKind::LeaseAcquired,
            region: Some(region.to_owned()),
            range: Some((offset, length)),
            owners: vec![op.to_raw()],
            message: format!(
                "{who} took {mode} lease {} on {region} {}",
                id.to_raw(),
                crate::api::range_text(offset, length)
            ),
            ..NewEvent::default()
        });
        Ok(lease)
    }

    /// Release one of the leases of the operator or its jobs.
    pub fn release_lease(&self, raw: u64) -> Result<(), ActionError> {
        let lease = LeaseId::from_raw(raw);
        let snap = self.mapper.snapshot();
        let (op, name, held) = self
            .operator_owners()
            .into_iter()
            .find_map(|op| {
                let o = snap.owner(op)?;
                let l = o.leases.iter().find(|l| l.id == lease)?;
                Some((op, o.name.clone(), self.regions.name_of(l.region)))
            })
            .ok_or(ActionError::NoLease(raw))?;
        self.mapper.release(op, lease)?;
        self.events.push(NewEvent {
            kind: EventKind::LeaseReleased,
            region: Some(held),
            owners: vec![op.to_raw()],
            message: format!("{name} released lease {raw}"),
            ..NewEvent::default()
        });
        Ok(())
    }
}
