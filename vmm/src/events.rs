//! The VM's event log: what happened to leases, breaks, layout changes, limits, offers and the host guard, in
//! order, each with a typed [`EventKind`]. The last [`HISTORY`] events are kept for `GET /events`; followers get
//! every new one as it happens. Producers (the lease manager's notifier, the actions, the reclaim table) push
//! [`NewEvent`]s; the log stamps them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use utoipa::ToSchema;

/// Events kept for readers that were not following.
pub const HISTORY: usize = 1024;
/// Events a slow follower may fall behind by before it is told it lost some.
const FOLLOW_BUFFER: usize = 256;

/// What an event is about.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The operator API started.
    ApiStarted,
    /// The operator took a lease.
    LeaseAcquired,
    /// The operator released a lease.
    LeaseReleased,
    /// An operator change (punch, zero, break) started.
    ChangeStarted,
    /// A change is waiting for holders of shared leases.
    BreakStarted,
    /// A holder released everything a break asked of it.
    HolderReleased,
    /// A holder did not release by the deadline and was revoked.
    HolderRevoked,
    /// An operator change was applied.
    ChangeDone,
    /// An operator change was refused (errno and holder named).
    ChangeRefused,
    /// A holder was asked to release (every break, whoever started it).
    BreakNotice,
    /// A holder's leases were revoked at a break's deadline.
    Revoked,
    /// The host guard saw a foreign access to a backing file.
    Guard,
    /// A change met a range a device behind the virtual IOMMU has mapped (`iommu=recall`): the guest agent was
    /// told (device, guest-physical range, deadline).
    DmaRecall,
    /// A recalled mapping was still there at the deadline: the VMM unmapped it itself and reported a fault to
    /// the guest; the change proceeds.
    DmaFenced,
    /// A region's flush rate limit changed.
    RateLimitSet,
    /// A guest offered a range back.
    Offer,
    /// A region's reclaim policy changed.
    ReclaimPolicySet,
    /// An offered range was punched.
    ReclaimDone,
    /// Punching an offered range was refused.
    ReclaimRefused,
    /// The operator revoked an owner (everything it held released, DMA first).
    OwnerRevoked,
    /// A region was hot-added (its duration in the message).
    RegionAdded,
    /// A hot add was refused; nothing was left behind.
    RegionAddRefused,
    /// A hot remove started: the whole region is being broken with reason `remove`.
    RegionRemoveStarted,
    /// A region was hot-removed: ejected by the guest, unmapped, synced, unlocked, closed.
    RegionRemoved,
    /// A hot remove was refused (a pin or exclusive lease, holders past the deadline, no eject in time); the
    /// region stays.
    RegionRemoveRefused,
    /// A stop of the VM was asked for.
    #[default]
    StopRequested,
    /// The VM stopped (the last event; followers' streams end after it).
    VmStopped,
    /// This follower fell behind and lost events.
    EventsLost,
}

impl EventKind {
    /// The name the API and the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ApiStarted => "api-started",
            EventKind::LeaseAcquired => "lease-acquired",
            EventKind::LeaseReleased => "lease-released",
            EventKind::ChangeStarted => "change-started",
            EventKind::BreakStarted => "break-started",
            EventKind::HolderReleased => "holder-released",
            EventKind::HolderRevoked => "holder-revoked",
            EventKind::ChangeDone => "change-done",
            EventKind::ChangeRefused => "change-refused",
            EventKind::BreakNotice => "break-notice",
            EventKind::Revoked => "revoked",
            EventKind::Guard => "guard",
            EventKind::DmaRecall => "dma-recall",
            EventKind::DmaFenced => "dma-fenced",
            EventKind::RateLimitSet => "rate-limit-set",
            EventKind::Offer => "offer",
            EventKind::ReclaimPolicySet => "reclaim-policy-set",
            EventKind::ReclaimDone => "reclaim-done",
            EventKind::ReclaimRefused => "reclaim-refused",
            EventKind::OwnerRevoked => "owner-revoked",
            EventKind::RegionAdded => "region-added",
            EventKind::RegionAddRefused => "region-add-refused",
            EventKind::RegionRemoveStarted => "region-remove-started",
            EventKind::RegionRemoved => "region-removed",
            EventKind::RegionRemoveRefused => "region-remove-refused",
            EventKind::StopRequested => "stop-requested",
            EventKind::VmStopped => "vm-stopped",
            EventKind::EventsLost => "events-lost",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One thing that happened.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
    /// The region, as the operator named it, when the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Owners the event is about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<u64>,
    /// Start of the range the event is about, bytes from the start of the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Bytes of that range; 0 = to the end of the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// The errno name, for refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// One line in words.
    pub message: String,
}

/// What a producer says; the log stamps `seq` and `at_ms`.
#[derive(Clone, Debug, Default)]
pub struct NewEvent {
    pub kind: EventKind,
    pub region: Option<String>,
    pub owners: Vec<u64>,
    /// The range, when the event is about one: (offset, length) in the region.
    pub range: Option<(u64, u64)>,
    pub errno: Option<String>,
    pub message: String,
    /// Recorded only: the producer wrote its own log line (the host guard's, folded when it repeats).
    pub logged: bool,
}

#[derive(Debug)]
pub struct EventLog {
    state: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
    /// Follower streams still open (each holds a [`Follower`]).
    followers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            state: Mutex::new((0, VecDeque::new())),
            tx: broadcast::channel(FOLLOW_BUFFER).0,
            followers: Default::default(),
        }
    }
}

/// Counts one open follower stream while it lives.
#[derive(Debug)]
pub struct Follower(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl EventLog {
    pub fn push(&self, e: NewEvent) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // The history lock is held while broadcasting so followers see events in `seq` order.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        let ev = Event {
            seq: st.0,
            at_ms,
            kind: e.kind,
            region: e.region,
            owners: e.owners,
            offset: e.range.map(|r| r.0),
            length: e.range.map(|r| r.1),
            errno: e.errno,
            message: e.message,
        };
        if !e.logged {
            tracing::info!(
                kind = e.kind.as_str(),
                region = ev.region.as_deref().unwrap_or("-"),
                "{}",
                ev.message
            );
        }
        if st.1.len() == HISTORY {
            st.1.pop_front();
        }
        st.1.push_back(ev.clone());
        // No follower is not an error.
        let _ = self.tx.send(ev);
    }

    /// Events with `seq > after`.
    pub fn since(&self, after: u64) -> Vec<Event> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1.iter().filter(|e| e.seq > after).cloned().collect()
    }

    /// The history and a receiver for everything after it, taken atomically (no event lost or repeated), and
    /// the follower's token (kept while its stream is open).
    pub fn follow(&self, after: u64) -> (Vec<Event>, broadcast::Receiver<Event>, Follower) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let history = st.1.iter().filter(|e| e.seq > after).cloned().collect();
        self.followers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (history, rx, Follower(self.followers.clone()))
    }

    /// Wait up to `grace` for every follower stream to end (each ends after `vm-stopped`), so the stop event
    /// reaches them before the API goes.
    pub fn wait_for_followers(&self, grace: std::time::Duration) {
        let until = std::time::Instant::now() + grace;
        while self.followers.load(std::sync::atomic::Ordering::SeqCst) > 0
            && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_followers_get_what_comes_after_it() {
        let log = EventLog::default();
        for i in 0..(HISTORY + 10) {
            log.push(NewEvent {
                kind: EventKind::Offer,
                message: format!("{i}"),
                ..NewEvent::default()
            });
        }
        let all = log.since(0);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].seq, 11);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let (hist, mut rx, _follower) = log.follow(HISTORY as u64 + 8);
        assert_eq!(hist.iter().map(|e| e.seq).collect::<Vec<_>>(), [1033, 1034]);
        log.push(NewEvent {
            kind: EventKind::StopRequested,
            ..NewEvent::default()
        });
        let e = rx.try_recv().unwrap();
        assert_eq!((e.seq, e.kind), (1035, EventKind::StopRequested));
    }
}
