//! Layout changes the operator asks for: punch, zero, and break (evacuate: holders give the range back, the
//! file is not changed). Each runs through the mapper: pins and exclusive leases refuse it with ETXTBSY naming
//! the holder; shared leases are broken with notice and a deadline, and the policy says what happens after it.
//! Progress (break started, each holder released) reaches the event log from the mapper's break events as it
//! happens (the lease manager's notifier); the result is the mapper's change report.

use std::time::Duration;

use daxvisor_mapper::{BreakPolicy, ChangeRequest, LayoutChange, OwnerId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{window_range, ActionError, Actions};
use crate::events::{EventKind, NewEvent};

/// Longest deadline an action accepts (the mapper's own cap).
pub const MAX_DEADLINE_MS: u64 = 24 * 3600 * 1000;
/// Deadline when the request names none.
pub const DEFAULT_DEADLINE_MS: u64 = 5000;

/// What happens when holders have not released by the deadline.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The change is refused with ETIMEDOUT; nothing changed, leases kept.
    #[default]
    Fail,
    /// The remaining holders' leases are revoked (DMA mappings torn down first) and the change proceeds.
    Revoke,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fail => "fail",
            Policy::Revoke => "revoke",
        }
    }
}

/// Which change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Punch,
    Zero,
    Break,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Punch => "punch",
            ChangeKind::Zero => "zero",
            ChangeKind::Break => "break",
        }
    }
}

/// A change of a range of a region, as the operator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    /// The region's name.
    pub region: String,
    /// Region-relative byte offset.
    pub offset: u64,
    /// Bytes; 0 = to the end of the region.
    pub length: u64,
    /// Milliseconds holders of shared leases get (default 5000, at most one day).
    pub deadline_ms: Option<u64>,
    pub policy: Policy,
}

/// One holder that was asked to release.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HolderOutcome {
    pub owner: u64,
    pub name: String,
    /// Milliseconds from the break's start to its release, as the mapper saw it; none when revoked.
    #[serde(default)]
    pub released_after_ms: Option<u64>,
    pub revoked: bool,
}

/// The change report: what was checked, who was asked, when each released, how long it all took.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeResult {
    /// "punch", "zero" or "break".
    pub change: String,
    pub region: String,
    pub offset: u64,
    pub length: u64,
    /// The page-rounded range the mapper checked (region-relative).
    pub checked_offset: u64,
    /// 0 = to the end.
    pub checked_length: u64,
    pub holders: Vec<HolderOutcome>,
    pub waited_for_transient: bool,
    pub queued_behind_break: bool,
    pub total_ms: u64,
}

impl Actions {
    /// Runs a change to its end (it may wait for holders up to its deadline: call it off any thread that must
    /// stay responsive).
    pub fn change(&self, c: Change) -> Result<ChangeResult, ActionError> {
        let reg = self.region(&c.region)?;
        let (offset, length) = window_range(reg.size(), c.offset, c.length)?;
        let deadline_ms = c.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS);
        if deadline_ms > MAX_DEADLINE_MS {
            return Err(ActionError::Invalid(format!(
                "deadline_ms {deadline_ms} is above the maximum {MAX_DEADLINE_MS}"
            )));
        }
        let change = match c.kind {
            ChangeKind::Punch => LayoutChange::Punch {
                off: offset,
                len: length,
            },
            ChangeKind::Zero => LayoutChange::Zero {
                off: offset,
                len: length,
            },
            ChangeKind::Break => LayoutChange::Evacuate {
                off: offset,
                len: length,
            },
        };
        let req = ChangeRequest {
            // The operator's own leases: its exclusive lease over the range is EDEADLK (not ETXTBSY), and its
            // shared lease is not broken (it does not wait on itself).
            requester: self.operator_if_any(),
            deadline: Duration::from_millis(deadline_ms),
            policy: match c.policy {
                Policy::Fail => BreakPolicy::Fail,
                Policy::Revoke => BreakPolicy::Revoke,
            },
            ..ChangeRequest::new(reg.id, change)
        };
        let name = c.region;
        let what = format!(
            "{} {name} {}",
            c.kind.name(),
            crate::api::range_text(offset, length)
        );
        self.events.push(NewEvent {
            kind: EventKind::ChangeStarted,
            region: Some(name.clone()),
            range: Some((offset, length)),
            message: format!(
                "{what} deadline {deadline_ms} ms policy {}",
                c.policy.name()
            ),
            ..NewEvent::default()
        });
        let started = std::time::Instant::now();
        // `iommu=recall`: mappings a device has over the range are recalled (and fenced at the deadline)
        // before the mapper sees the change; their pins would refuse it otherwise.
        let (recalled, _held_off) = match self.viommu.get() {
            Some(v) if reg.config.iommu == crate::pmem::IommuPolicy::Recall => {
                let len = if length == 0 {
                    reg.size() - offset
                } else {
                    length
                };
                let (recalled, hold) = v.recall(
                    &name,
                    reg.guest_addr + offset,
                    len,
                    Duration::from_millis(deadline_ms),
                    &self.events,
                );
                (recalled, Some(hold))
            }
            _ => (Vec::new(), None),
        };
        let outcome = self.mapper.change(req);
        let elapsed = started.elapsed();
        let result = match outcome {
            Ok(report) => {
                let mut holders = self.holder_outcomes(
                    &name,
                    &report.notified,
                    &report.released,
                    &report.revoked,
                );
                holders.extend(recalled.iter().map(|r| HolderOutcome {
                    owner: r.owner.to_raw(),
                    name: r.name.clone(),
                    released_after_ms: r.released_after.map(|d| d.as_millis() as u64),
                    revoked: r.fenced,
                }));
                let fenced = recalled.iter().filter(|r| r.fenced).count();
                let (checked_offset, checked_length) = report
                    .range
                    .map_or((offset, length), |r| (r.start, crate::api::range_len(&r)));
                self.events.push(NewEvent {
                    kind: EventKind::ChangeDone,
                    region: Some(name.clone()),
                    range: Some((offset, length)),
                    owners: holders.iter().map(|h| h.owner).collect(),
                    message: format!(
                        "{what} done in {} ms ({} holder(s) asked, {} revoked)",
                        elapsed.as_millis(),
                        holders.len(),
                        report.revoked.len() + fenced
                    ),
                    ..NewEvent::default()
                });
                Ok(ChangeResult {
                    change: c.kind.name().to_owned(),
                    region: name,
                    offset,
                    length,
                    checked_offset,
                    checked_length,
                    holders,
                    waited_for_transient: report.waited_for_transient,
                    queued_behind_break: report.queued_behind_break,
                    total_ms: elapsed.as_millis() as u64,
                })
            }
            Err(e) => {
                let mut owners: Vec<u64> = Vec::new();
                if let daxvisor_mapper::MapperError::TextBusy { holder, .. }
                | daxvisor_mapper::MapperError::Deadlock { holder, .. } = &e
                {
                    owners.push(holder.to_raw());
                }
                if let daxvisor_mapper::MapperError::TimedOut { holders, .. } = &e {
                    owners.extend(holders.iter().map(|h| h.to_raw()));
                }
                self.events.push(NewEvent {
                    kind: EventKind::ChangeRefused,
                    region: Some(name.clone()),
                    range: Some((offset, length)),
                    owners,
                    errno: Some(e.errno_name().to_owned()),
                    message: format!("{what} refused: {} ({e})", e.errno_name()),
                    ..NewEvent::default()
                });
                Err(ActionError::Refused(e))
            }
        };
        result
    }

    /// Every holder the mapper notified, with when it released (from the mapper's report); revoked holders get
    /// an event.
    fn holder_outcomes(
        &self,
        region: &str,
        notified: &[OwnerId],
        released: &[(OwnerId, Duration)],
        revoked: &[OwnerId],
    ) -> Vec<HolderOutcome> {
        let mut owners: Vec<OwnerId> = notified.to_vec();
        owners.sort();
        owners.dedup();
        let snap = self.mapper.snapshot();
        owners
            .into_iter()
            .map(|o| {
                let was_revoked = revoked.contains(&o);
                let name = snap.owner(o).map(|v| v.name.clone()).unwrap_or_default();
                if was_revoked {
                    self.events.push(NewEvent {
                        kind: EventKind::HolderRevoked,
                        region: Some(region.to_owned()),
                        owners: vec![o.to_raw()],
                        message: format!(
                            "{o} ({name}) did not release by the deadline; its leases were revoked"
                        ),
                        ..NewEvent::default()
                    });
                }
                HolderOutcome {
                    owner: o.to_raw(),
                    name,
                    released_after_ms: released
                        .iter()
                        .find(|(r, _)| *r == o)
                        .filter(|_| !was_revoked)
                        .map(|(_, after)| after.as_millis() as u64),
                    revoked: was_revoked,
                }
            })
            .collect()
    }
}
