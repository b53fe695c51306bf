//! Break and revoke notices to the guest: the mapper calls [`AgentNotifier`] for every holder it must ask or
//! tell; for an owner of the agent's current session the notice becomes frames on the port, anything else is
//! logged (no channel reaches it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use daxvisor_proto::agent::{self, BreakReason, Message, MAX_FRAME};

use super::session::Outbox;
use daxvisor_mapper::{BreakNotice, BreakNotifier, OwnerId, RevokeNotice};

#[derive(Default)]
struct Inner {
    /// The session the port is in now and where its frames go.
    current: Option<(u64, Arc<dyn Outbox>)>,
    /// Which session opened each agent owner.
    owners: HashMap<OwnerId, u64>,
    /// The session whose hello asked for region notices (a region added while the VM runs).
    region_notices: Option<u64>,
}

/// Which owners belong to which session: written by the service thread, read by the notifier (on whatever
/// thread asked for the change). Never held across a mapper call, so the mapper may call the notifier with its
/// own lock held.
#[derive(Default)]
pub struct Routes(Mutex<Inner>);

impl Routes {
    /// No session yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent; keep serving after a panic elsewhere.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn start(&self, session: u64, out: Arc<dyn Outbox>) {
        self.lock().current = Some((session, out));
    }

    pub(crate) fn end(&self, session: u64) {
        let mut r = self.lock();
        if r.current.as_ref().is_some_and(|(s, _)| *s == session) {
            r.current = None;
        }
        r.owners.retain(|_, s| *s != session);
    }

    /// `session`'s hello asked for region notices.
    pub(crate) fn want_region_notices(&self, session: u64) {
        self.lock().region_notices = Some(session);
    }

    /// Tell the current session a region was added, if its hello asked for that (older guests did not and
    /// are not sent a message they cannot decode). `true` when it was sent.
    pub fn region_added(&self, info: agent::RegionInfo) -> bool {
        let target = {
            let r = self.lock();
            r.current
                .as_ref()
                .filter(|(s, _)| r.region_notices == Some(*s))
                .map(|(s, out)| (*s, out.clone()))
        };
        match target {
            Some((session, out)) => send(out.as_ref(), session, &Message::RegionAdded(info)),
            None => false,
        }
    }

    /// Tell the current session's agent that the device with requester id `endpoint` has guest-physical
    /// `[gpa, gpa + len)` mapped for DMA and the host needs it within `deadline_ms` (a recall: see
    /// [`agent::BreakReason::DmaRecall`]). `true` when it was sent.
    pub fn dma_recall(
        &self,
        recall: u64,
        endpoint: u32,
        gpa: u64,
        len: u64,
        deadline_ms: u32,
    ) -> bool {
        let target = self
            .lock()
            .current
            .as_ref()
            .map(|(s, out)| (*s, out.clone()));
        let Some((session, out)) = target else {
            return false;
        };
        let msg = Message::BreakNotice(agent::BreakNotice {
            break_id: recall,
            owner: 0,
            lease: u64::from(endpoint),
            region: 0,
            offset: gpa,
            len,
            deadline_ms,
            reason: BreakReason::DmaRecall as u32,
        });
        send(out.as_ref(), session, &msg)
    }

    pub(crate) fn add_owner(&self, owner: OwnerId, session: u64) {
        self.lock().owners.insert(owner, session);
    }

    pub(crate) fn remove_owner(&self, owner: OwnerId) {
        self.lock().owners.remove(&owner);
    }

    /// Where frames for `owner` go: its session, if that is the current one.
    fn target(&self, owner: OwnerId) -> Option<(u64, Arc<dyn Outbox>)> {
        let r = self.lock();
        let session = *r.owners.get(&owner)?;
        r.current
            .as_ref()
            .filter(|(s, _)| *s == session)
            .map(|(s, out)| (*s, out.clone()))
    }

    /// The session `owner` was opened in, if it is an agent owner still open.
    pub fn session_of(&self, owner: OwnerId) -> Option<u64> {
        self.lock().owners.get(&owner).copied()
    }
}

/// The mapper's notifier when the VM has an agent channel.
pub struct AgentNotifier {
    routes: Arc<Routes>,
}

impl AgentNotifier {
    /// A notifier routing through `routes` (shared with the service).
    pub fn new(routes: Arc<Routes>) -> Self {
        AgentNotifier { routes }
    }
}

fn reason_code(reason: &str) -> BreakReason {
    match reason {
        "punch" => BreakReason::Punch,
        "zero" => BreakReason::Zero,
        "shrink" => BreakReason::Shrink,
        "host-open" => BreakReason::HostOpen,
        "evacuate" => BreakReason::Evacuate,
        "remove" => BreakReason::Remove,
        _ => BreakReason::Other,
    }
}

fn send(out: &dyn Outbox, session: u64, msg: &Message<'_>) -> bool {
    let mut buf = [0u8; MAX_FRAME];
    match agent::encode(msg, 0, &mut buf) {
        Ok(n) => out.send(session, &buf[..n]),
        Err(e) => {
            tracing::error!("cannot encode agent notice: {e}");
            false
        }
    }
}

impl BreakNotifier for AgentNotifier {
    fn break_notice(&self, n: &BreakNotice) {
        let Some((session, out)) = self.routes.target(n.owner) else {
            tracing::warn!(owner = %n.owner, region = %n.region, reason = n.reason, leases = n.leases.len(), "break notice for an owner no agent session holds");
            return;
        };
        let deadline_ms = n
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(u128::from(u32::MAX)) as u32;
        let mut delivered = 0usize;
        for (lease, range) in &n.leases {
            let msg = Message::BreakNotice(agent::BreakNotice {
                break_id: n.break_id.to_raw(),
                owner: n.owner.to_raw(),
                lease: lease.to_raw(),
                region: n.region.to_raw(),
                offset: range.start,
                len: range.end.saturating_sub(range.start),
                deadline_ms,
                reason: reason_code(n.reason) as u32,
            });
            if send(out.as_ref(), session, &msg) {
                delivered += 1;
            }
        }
        tracing::info!(owner = %n.owner, session, region = %n.region, reason = n.reason, leases = n.leases.len(), delivered, deadline_ms, "break notice sent to guest agent");
    }

    fn revoked(&self, n: &RevokeNotice) {
        let Some((session, out)) = self.routes.target(n.owner) else {
            tracing::warn!(owner = %n.owner, region = %n.region, leases = n.leases.len(), "leases revoked from an owner no agent session holds");
            return;
        };
        for (lease, range) in &n.leases {
            let msg = Message::Revoked(agent::Revoked {
                break_id: n.break_id.to_raw(),
                owner: n.owner.to_raw(),
                lease: lease.to_raw(),
                region: n.region.to_raw(),
                offset: range.start,
                len: range.end.saturating_sub(range.start),
            });
            send(out.as_ref(), session, &msg);
        }
        tracing::warn!(owner = %n.owner, session, region = %n.region, leases = n.leases.len(), dma_torn_down = n.dma_torn_down.len(), "leases revoked from guest agent");
    }
}
