//! Offer-reclaim: ranges guests gave back, and the operator's policy for punching them.
//!
//! A guest owner offers a range it no longer needs (`OfferReclaim` on the agent channel). The offer is checked
//! against the mapper (the owner exists, the range lies in the region's window, the region has a file layout,
//! the owner holds no lease or pin over it) and recorded here. Per region the operator chooses `manual` (offers
//! are listed; `POST /regions/{id}/reclaim` punches them) or `auto` (each offer is punched at once, on the
//! `reclaim` thread, as an ordinary layout change: holds of others still refuse it). An offer is only a promise
//! of the guest that made it: the offers of a session go when the session ends.
//!
//! An offer under `auto` made with a waiter ([`Reclaim::offer_then`]: the agent channel's `OfferReclaim`) is
//! answered once its punch is done or refused (a refused one is dropped, so the guest's error means nothing
//! was kept); a guest that froze its filesystem for the offer thaws only after that answer. Dropping offers
//! (owner closed, session ended, a lease taken over them) waits for a punch in progress, so once a guest's
//! `CloseOwner` is answered nothing it offered can be punched any more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::events::{EventLog, NewEvent};
use crate::pmem::BackingKind;
use crate::region_registry::{Region, RegionRegistry};
use daxvisor_mapper::{
    BreakPolicy, ByteRange, ChangeRequest, LayoutChange, Mapper, MapperError, OwnerId, RegionId,
    OPEN_END,
};

/// Offers recorded at once (`ENOMEM` past it): a guest cannot grow the table without bound.
pub const MAX_OFFERS: usize = 1024;
/// Offers waiting for the `reclaim` thread under policy `auto`; past it they stay listed for the operator.
const AUTO_QUEUE: usize = 64;
/// How long holders of shared leases get when an offered range is punched.
pub const RECLAIM_DEADLINE: Duration = Duration::from_secs(5);

/// What happens to a region's offers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReclaimPolicy {
    /// Offers are listed; the operator punches them.
    #[default]
    Manual,
    /// Each offer is punched as it arrives.
    Auto,
}

impl ReclaimPolicy {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            ReclaimPolicy::Manual => "manual",
            ReclaimPolicy::Auto => "auto",
        }
    }
}

/// One recorded offer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// Its id (the guest's `Ok` reply carries it).
    pub id: u64,
    /// The region, as the operator named it.
    pub region: String,
    /// Region-relative byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// The offering owner.
    pub owner: u64,
    /// The agent session it came in.
    pub session: u64,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// What punching one offer came to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReclaimOutcome {
    /// The offer.
    pub offer: Offer,
    /// Punched (the offer is gone); otherwise it stays listed.
    pub punched: bool,
    /// The errno name when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// The mapper's refusal, or what was done, in words.
    pub message: String,
}

/// What the reclaim table counts, for the metrics.
#[derive(Debug, Default)]
pub struct ReclaimCounters {
    /// Offers accepted.
    pub offers: AtomicU64,
    /// Bytes in accepted offers.
    pub bytes_offered: AtomicU64,
    /// Bytes of offers punched.
    pub bytes_reclaimed: AtomicU64,
}

/// Told how an offer under `auto` ended: `Ok(offer id)` punched, `Err(errno)` refused or dropped (`ECANCELED`).
pub type OfferWaiter = Box<dyn FnOnce(Result<u64, i32>) + Send>;

/// What [`Reclaim::offer_then`] did with an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Listed (policy `manual`, or no waiter): answer the guest now.
    Listed(u64),
    /// Queued for the punch (policy `auto`): the waiter answers.
    Queued(u64),
}

/// Bytes offered and punched in one region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionReclaimBytes {
    pub offered: u64,
    pub reclaimed: u64,
}

#[derive(Default)]
struct Table {
    next: u64,
    offers: Vec<(Offer, RegionId)>,
    policies: HashMap<RegionId, ReclaimPolicy>,
    waiters: HashMap<u64, OfferWaiter>,
    bytes: HashMap<RegionId, RegionReclaimBytes>,
}

impl Table {
    /// Removes the offers `drop` picks; returns the waiters of those that had one.
    fn drop_offers(&mut self, drop: impl Fn(&Offer, RegionId) -> bool) -> Vec<OfferWaiter> {
        let mut gone = Vec::new();
        self.offers.retain(|(o, r)| {
            let d = drop(o, *r);
            if d {
                gone.push(o.id);
            }
            !d
        });
        gone.iter()
            .filter_map(|id| self.waiters.remove(id))
            .collect()
    }
}

/// Tells the waiters of dropped offers.
fn cancelled(waiters: Vec<OfferWaiter>) {
    for w in waiters {
        w(Err(libc::ECANCELED));
    }
}

/// The VM's reclaim-offers table.
pub struct Reclaim {
    mapper: Mapper,
    events: Arc<EventLog>,
    regions: Arc<RegionRegistry>,
    table: Mutex<Table>,
    /// Held while an offer is punched; dropping offers takes it, so no punch outlives its offer.
    punching: Mutex<()>,
    auto: SyncSender<u64>,
    /// Counters for `/metrics`.
    pub counters: ReclaimCounters,
}

impl Reclaim {
    /// The table and its `reclaim` thread (which ends when the table is dropped).
    pub fn start(
        mapper: Mapper,
        events: Arc<EventLog>,
        regions: Arc<RegionRegistry>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(AUTO_QUEUE);
        let r = Arc::new(Reclaim {
            mapper,
            events,
            regions,
            table: Mutex::new(Table::default()),
            punching: Mutex::new(()),
            auto: tx,
            counters: ReclaimCounters::default(),
        });
        let weak = Arc::downgrade(&r);
        crate::threads::spawn("reclaim", crate::seccomp::ThreadKind::Reclaim, move || {
            auto_worker(&weak, &rx)
        })?;
        Ok(r)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn punching(&self) -> std::sync::MutexGuard<'_, ()> {
        self.punching.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes offered and punched in the region so far.
    pub fn region_bytes(&self, region: RegionId) -> RegionReclaimBytes {
        self.table().bytes.get(&region).copied().unwrap_or_default()
    }

    fn region(&self, id: RegionId) -> Option<Arc<Region>> {
        self.regions.by_id(id)
    }

    /// Records an offer of `owner` (of agent session `session`); returns its id or the errno for the guest:
    /// ENOENT (no such owner or region), ERANGE (outside the window; `len` 0 runs to its end), EOPNOTSUPP
    /// (device-DAX), EBUSY (the owner holds a lease or pin over it), ENOMEM (table full).
    pub fn offer(
        &self,
        session: u64,
        owner: OwnerId,
        region: RegionId,
        offset: u64,
        len: u64,
    ) -> Result<u64, i32> {
        match self.offer_then(session, owner, region, offset, len, None)? {
            Offered::Listed(id) | Offered::Queued(id) => Ok(id),
        }
    }

    /// [`Reclaim::offer`]; under policy `auto` with a `waiter`, the offer is queued for its punch and the
    /// waiter told how it ended (`EAGAIN` at once when the punch queue is full: nothing is kept).
    pub fn offer_then(
        &self,
        session: u64,
        owner: OwnerId,
        region: RegionId,
        offset: u64,
        len: u64,
        waiter: Option<OfferWaiter>,
    ) -> Result<Offered, i32> {
        let reg = self.region(region).ok_or(libc::ENOENT)?;
        match reg.kind() {
            // No file layout to punch.
            BackingKind::DevDax => return Err(libc::EOPNOTSUPP),
            BackingKind::Regular | BackingKind::FsDax | BackingKind::Ram => {}
        }
        let size = reg.size();
        if offset >= size {
            return Err(libc::ERANGE);
        }
        let len = if len == 0 { size - offset } else { len };
        let end = match offset.checked_add(len) {
            Some(e) if e <= size => e,
            _ => return Err(libc::ERANGE),
        };
        let snap = self.mapper.snapshot();
        let holder = snap.owner(owner).ok_or(libc::ENOENT)?;
        // Holds are per file: a lease taken through another window of the same file counts too.
        let file_range = |r: RegionId, range: &ByteRange| {
            snap.regions.iter().find(|v| v.id == r).map(|v| {
                let e = if range.end == OPEN_END {
                    v.size
                } else {
                    range.end
                };
                (v.file, v.file_offset + range.start, v.file_offset + e)
            })
        };
        let mine = file_range(region, &ByteRange { start: offset, end });
        let holds = holder
            .leases
            .iter()
            .map(|l| (l.region, l.range))
            .chain(holder.pins.iter().map(|p| (p.region, p.range)));
        for (r, range) in holds {
            if let (Some((f, s, e)), Some((mf, ms, me))) = (file_range(r, &range), mine) {
                if f == mf && s < me && ms < e {
                    return Err(libc::EBUSY);
                }
            }
        }
        let (offer, auto) = {
            let mut t = self.table();
            if t.offers.len() >= MAX_OFFERS {
                return Err(libc::ENOMEM);
            }
            t.next += 1;
            let offer = Offer {
                id: t.next,
                region: reg.name().to_owned(),
                offset,
                length: len,
                owner: owner.to_raw(),
                session,
                at_ms: now_ms(),
            };
            t.offers.push((offer.clone(), region));
            t.bytes.entry(region).or_default().offered += len;
            let auto = t.policies.get(&region).copied().unwrap_or_default() == ReclaimPolicy::Auto;
            let waited = match waiter {
                Some(w) if auto => {
                    t.waiters.insert(offer.id, w);
                    true
                }
                _ => false,
            };
            (offer, (auto, waited))
        };
        let (auto, waited) = auto;
        self.counters.offers.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_offered
            .fetch_add(len, Ordering::Relaxed);
        self.events.push(NewEvent {
            kind: crate::events::EventKind::Offer,
            region: Some(reg.name().to_owned()),
            range: Some((offset, len)),
            owners: vec![owner.to_raw()],
            message: format!(
                "owner {owner} ({}) offers {} {} for reclaim (offer {}, session {session})",
                holder.name,
                reg.name(),
                crate::api::range_text(offset, len),
                offer.id
            ),
            ..NewEvent::default()
        });
        if auto {
            match self.auto.try_send(offer.id) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) if waited => {
                    // The guest waits for a punch that will not come soon: refused, nothing kept.
                    let _ = self.table().drop_offers(|o, _| o.id == offer.id);
                    tracing::warn!(id = %reg.name(), offer = offer.id, "reclaim queue full; the offer is refused (EAGAIN)");
                    return Err(libc::EAGAIN);
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    tracing::warn!(id = %reg.name(), offer = offer.id, "reclaim queue full; the offer stays listed");
                }
            }
        }
        Ok(if waited {
            Offered::Queued(offer.id)
        } else {
            Offered::Listed(offer.id)
        })
    }

    /// Drops the offers of an agent session that ended.
    pub fn end_session(&self, session: u64) {
        let mut t = self.table();
        let before = t.offers.len();
        let waiters = t.drop_offers(|o, _| o.session == session);
        let gone = before - t.offers.len();
        drop(t);
        cancelled(waiters);
        self.wait_for_punch_under_way();
        if gone > 0 {
            tracing::info!(
                session,
                offers = gone,
                "agent session ended; its reclaim offers dropped"
            );
        }
    }

    /// Drops the owner's offers over a range it took a lease on again (it takes the range back: punching it
    /// now would break its own lease).
    pub fn withdraw(&self, owner: OwnerId, region: RegionId, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let _punch = self.punching();
        let waiters = self.table().drop_offers(|o, r| {
            o.owner == owner.to_raw()
                && r == region
                && o.offset < end
                && offset < o.offset.saturating_add(o.length)
        });
        cancelled(waiters);
    }

    /// Drops the offers of an owner that closed (its promise ends with it). When this returns, none of them
    /// will be punched: they leave the table at once (the reclaim thread skips an offer that is no longer
    /// listed), and a punch already under way, which may be one of them, is waited for (at most its break
    /// deadline, [`RECLAIM_DEADLINE`]). The agent thaws its filesystem after this answer, so no punch of its
    /// offers may come after it.
    pub fn end_owner(&self, owner: OwnerId) {
        let waiters = self.table().drop_offers(|o, _| o.owner == owner.to_raw());
        cancelled(waiters);
        self.wait_for_punch_under_way();
    }

    /// Returns once no punch is under way (one that started before this call has ended).
    fn wait_for_punch_under_way(&self) {
        drop(self.punching());
    }

    /// The offers, oldest first; of one region when named.
    pub fn list(&self, region: Option<RegionId>) -> Vec<Offer> {
        self.table()
            .offers
            .iter()
            .filter(|(_, r)| region.is_none_or(|x| x == *r))
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// The region's policy.
    pub fn policy(&self, region: RegionId) -> ReclaimPolicy {
        self.table()
            .policies
            .get(&region)
            .copied()
            .unwrap_or_default()
    }

    /// Sets the region's policy; switching to `auto` queues the offers already listed.
    pub fn set_policy(&self, region: RegionId, policy: ReclaimPolicy) {
        let pending: Vec<u64> = {
            let mut t = self.table();
            t.policies.insert(region, policy);
            t.offers
                .iter()
                .filter(|(_, r)| *r == region)
                .map(|(o, _)| o.id)
                .collect()
        };
        let name = self
            .region(region)
            .map_or_else(String::new, |r| r.name().to_owned());
        self.events.push(NewEvent {
            kind: crate::events::EventKind::ReclaimPolicySet,
            region: Some(name.clone()),
            message: format!("reclaim policy of {name} set to {}", policy.name()),
            ..NewEvent::default()
        });
        if policy == ReclaimPolicy::Auto {
            for id in pending {
                if self.auto.try_send(id).is_err() {
                    break; // the rest stay listed
                }
            }
        }
    }

    /// Punches every offer of the region now (blocking: holders of shared leases over it are asked first).
    pub fn reclaim_region(&self, region: RegionId) -> Vec<ReclaimOutcome> {
        let ids: Vec<u64> = self.list(Some(region)).iter().map(|o| o.id).collect();
        ids.into_iter().filter_map(|id| self.punch(id)).collect()
    }

    /// Punches one offer through the mapper; `None` when it is no longer listed. Its waiter, if any, is told.
    fn punch(&self, id: u64) -> Option<ReclaimOutcome> {
        let _punch = self.punching();
        let (offer, region) = self
            .table()
            .offers
            .iter()
            .find(|(o, _)| o.id == id)
            .cloned()?;
        let req = ChangeRequest {
            deadline: RECLAIM_DEADLINE,
            policy: BreakPolicy::Fail,
            ..ChangeRequest::new(
                region,
                LayoutChange::Punch {
                    off: offer.offset,
                    len: offer.length,
                },
            )
        };
        let what = format!(
            "{} {} (offer {} of owner {})",
            offer.region,
            crate::api::range_text(offer.offset, offer.length),
            offer.id,
            offer.owner
        );
        match self.mapper.change(req) {
            Ok(report) => {
                let waiter = {
                    let mut t = self.table();
                    t.offers.retain(|(o, _)| o.id != id);
                    t.bytes.entry(region).or_default().reclaimed += offer.length;
                    t.waiters.remove(&id)
                };
                if let Some(w) = waiter {
                    w(Ok(id));
                }
                self.counters
                    .bytes_reclaimed
                    .fetch_add(offer.length, Ordering::Relaxed);
                let message = format!(
                    "reclaimed {what}: punched, {} holder(s) asked",
                    report.notified.len()
                );
                self.events.push(NewEvent {
                    kind: crate::events::EventKind::ReclaimDone,
                    region: Some(offer.region.clone()),
                    range: Some((offer.offset, offer.length)),
                    owners: vec![offer.owner],
                    message: message.clone(),
                    ..NewEvent::default()
                });
                Some(ReclaimOutcome {
                    offer,
                    punched: true,
                    errno: None,
                    message,
                })
            }
            Err(e) => {
                // A waiting guest is told; its offer goes (a refused request keeps nothing). Without a waiter
                // the offer stays listed for the operator.
                let waiter = {
                    let mut t = self.table();
                    let w = t.waiters.remove(&id);
                    if w.is_some() {
                        t.offers.retain(|(o, _)| o.id != id);
                    }
                    w
                };
                if let Some(w) = waiter {
                    w(Err(e.errno()));
                }
                Some(self.refused(offer, &what, &e))
            }
        }
    }

    fn refused(&self, offer: Offer, what: &str, e: &MapperError) -> ReclaimOutcome {
        let message = format!("reclaim of {what} refused: {} ({e})", e.errno_name());
        self.events.push(NewEvent {
            kind: crate::events::EventKind::ReclaimRefused,
            region: Some(offer.region.clone()),
            owners: vec![offer.owner],
            range: Some((offer.offset, offer.length)),
            errno: Some(e.errno_name().to_owned()),
            message: message.clone(),
            ..NewEvent::default()
        });
        ReclaimOutcome {
            offer,
            punched: false,
            errno: Some(e.errno_name().to_owned()),
            message,
        }
    }
}

/// The `reclaim` thread: punches offers of `auto` regions, off the agent thread (a punch may wait for holders
/// of shared leases, who answer through that thread).
fn auto_worker(table: &Weak<Reclaim>, rx: &Receiver<u64>) {
    while let Ok(id) = rx.recv() {
        let Some(t) = table.upgrade() else {
            return;
        };
        t.punch(id);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const SIZE: u64 = 2 << 20;

    struct Rig {
        table: Arc<Reclaim>,
        mapper: Mapper,
        region: RegionId,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    /// A 2 MiB file full of data, registered as region `pm0`.
    fn rig() -> Rig {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let mapper = Mapper::new(Arc::new(crate::lease_manager::LogNotifier), None);
        let pm0 = crate::region_registry::test_region(&mapper, dir.path(), "pm0", SIZE);
        pm0.backing
            .file()
            .write_all_at(&vec![0x5a; SIZE as usize], 0)
            .unwrap();
        pm0.backing.file().sync_all().unwrap();
        let (region, path) = (pm0.id, pm0.path().to_owned());
        let regions = RegionRegistry::new();
        regions.insert(pm0);
        let table = Reclaim::start(mapper.clone(), Arc::default(), regions).unwrap();
        Rig {
            table,
            mapper,
            region,
            path,
            _dir: dir,
        }
    }

    fn allocated(p: &std::path::Path) -> u64 {
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn another_owner_s_exclusive_lease_refuses_the_reclaim_and_the_offer_stays_listed() {
        let r = rig();
        let guest = r.mapper.add_owner("agent:app");
        let other = r.mapper.add_owner("dma");
        let lease = r
            .mapper
            .acquire(
                other,
                r.region,
                0,
                4096,
                daxvisor_mapper::LeaseMode::Exclusive,
            )
            .unwrap();
        r.table.offer(1, guest, r.region, 0, 65536).unwrap();
        let out = r.table.reclaim_region(r.region);
        assert_eq!(out.len(), 1);
        assert!(!out[0].punched);
        assert_eq!(out[0].errno.as_deref(), Some("ETXTBSY"), "{out:?}");
        assert_eq!(r.table.list(None).len(), 1);
        r.mapper.release(other, lease).unwrap();
        let before = allocated(&r.path);
        let out = r.table.reclaim_region(r.region);
        assert!(out[0].punched, "{out:?}");
        assert!(allocated(&r.path) <= before - 65536, "blocks did not drop");
        assert!(r.table.list(None).is_empty());
        assert_eq!(
            r.table.counters.bytes_reclaimed.load(Ordering::Relaxed),
            65536
        );
    }

    #[test]
    fn policy_auto_punches_offers_as_they_arrive() {
        let r = rig();
        let guest = r.mapper.add_owner("agent:app");
        r.table.set_policy(r.region, ReclaimPolicy::Auto);
        let before = allocated(&r.path);
        r.table.offer(1, guest, r.region, SIZE / 2, 0).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !r.table.list(None).is_empty() {
            assert!(std::time::Instant::now() < deadline, "not punched");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            allocated(&r.path) <= before - SIZE / 2,
            "blocks did not drop"
        );
        assert_eq!(
            r.table.counters.bytes_reclaimed.load(Ordering::Relaxed),
            SIZE / 2
        );
    }

    /// A waiter that reports on a channel.
    fn waiter() -> (OfferWaiter, std::sync::mpsc::Receiver<Result<u64, i32>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    #[test]
    fn under_auto_a_waiting_offer_is_answered_after_its_punch_and_a_refused_one_is_dropped() {
        let r = rig();
        let guest = r.mapper.add_owner("agent:reclaim");
        r.table.set_policy(r.region, ReclaimPolicy::Auto);
        let before = allocated(&r.path);
        let (w, rx) = waiter();
        let queued = r
            .table
            .offer_then(1, guest, r.region, 0, 65536, Some(w))
            .unwrap();
        let Offered::Queued(id) = queued else {
            panic!("{queued:?}")
        };
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Ok(id)));
        // By the time the guest hears, the blocks are gone.
        assert!(allocated(&r.path) <= before - 65536, "blocks did not drop");
        assert_eq!(
            r.table.region_bytes(r.region),
            RegionReclaimBytes {
                offered: 65536,
                reclaimed: 65536
            }
        );
        // Another owner's exclusive lease refuses the punch: the guest hears ETXTBSY and nothing stays listed.
        let other = r.mapper.add_owner("dma");
        r.mapper
            .acquire(
                other,
                r.region,
                SIZE / 2,
                4096,
                daxvisor_mapper::LeaseMode::Exclusive,
            )
            .unwrap();
        let (w, rx) = waiter();
        r.table
            .offer_then(1, guest, r.region, SIZE / 2, 65536, Some(w))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Err(libc::ETXTBSY))
        );
        assert!(r.table.list(None).is_empty());
        assert_eq!(r.table.region_bytes(r.region).reclaimed, 65536);
        // Under manual the offer is listed at once and its waiter never called; closing the owner drops it.
        r.table.set_policy(r.region, ReclaimPolicy::Manual);
        let (w, rx) = waiter();
        let listed = r
            .table
            .offer_then(1, guest, r.region, 65536, 65536, Some(w))
            .unwrap();
        assert!(matches!(listed, Offered::Listed(_)), "{listed:?}");
        assert_eq!(r.table.list(None).len(), 1);
        r.table.end_owner(guest);
        assert!(r.table.list(None).is_empty());
        assert!(rx.try_recv().is_err());
        assert!(r.table.reclaim_region(r.region).is_empty());
    }

    /// The agent thaws its filesystem once `CloseOwner` is answered, so from then on none of that owner's offers
    /// may be punched, even one queued behind another owner's punch that waits out a break.
    #[test]
    fn a_closed_owners_queued_offer_is_never_punched_after_the_close_returns() {
        use std::os::unix::fs::FileExt;
        let r = rig();
        let other = r.mapper.add_owner("agent:other");
        let guest = r.mapper.add_owner("agent:reclaim");
        let app = r.mapper.add_owner("app");
        // The app never answers the break of its shared lease: the first punch waits out its deadline.
        r.mapper
            .acquire(app, r.region, 0, 65536, daxvisor_mapper::LeaseMode::Shared)
            .unwrap();
        r.table.set_policy(r.region, ReclaimPolicy::Auto);
        let (w1, slow) = waiter();
        r.table
            .offer_then(1, other, r.region, 0, 65536, Some(w1))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.mapper.snapshot().breaks.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the punch never started"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The guest's offer waits in the queue behind it; then the guest closes its owner.
        let (w2, mine) = waiter();
        r.table
            .offer_then(2, guest, r.region, SIZE / 2, 65536, Some(w2))
            .unwrap();
        r.table.end_owner(guest);
        assert_eq!(mine.try_recv(), Ok(Err(libc::ECANCELED)));
        // The close waited for the punch under way: it has ended (the app never released).
        assert_eq!(slow.try_recv(), Ok(Err(libc::ETIMEDOUT)));
        // Once a third owner's offer queued after the guest's is punched, the queue has passed the guest's.
        let third = r.mapper.add_owner("agent:third");
        let (w3, last) = waiter();
        r.table
            .offer_then(3, third, r.region, SIZE - 65536, 65536, Some(w3))
            .unwrap();
        assert!(matches!(
            last.recv_timeout(Duration::from_secs(10)),
            Ok(Ok(_))
        ));
        let mut buf = vec![0u8; 65536];
        std::fs::File::open(&r.path)
            .unwrap()
            .read_exact_at(&mut buf, SIZE / 2)
            .unwrap();
        assert!(
            buf.iter().all(|&b| b == 0x5a),
            "the closed owner's range was punched"
        );
        assert!(r.table.list(None).is_empty());
    }

    #[test]
    fn device_dax_unknown_owners_and_closed_owners() {
        // Device-DAX (EOPNOTSUPP) needs a /dev/daxX.Y this host lacks: the lab's device-DAX region covers it.
        let r = rig();
        assert_eq!(
            r.table.offer(1, OwnerId::from_raw(999), r.region, 0, 4096),
            Err(libc::ENOENT)
        );
        let guest = r.mapper.add_owner("agent:app");
        r.table.offer(1, guest, r.region, 0, 4096).unwrap();
        r.table.end_owner(guest);
        assert!(r.table.list(None).is_empty());
        // Taking a lease over an offered range withdraws the offer; elsewhere it stays.
        r.table.offer(1, guest, r.region, 0, 4096).unwrap();
        r.table.withdraw(guest, r.region, 8192, 4096);
        assert_eq!(r.table.list(None).len(), 1);
        r.table.withdraw(guest, r.region, 0, 1);
        assert!(r.table.list(None).is_empty());
        assert_eq!(r.table.counters.offers.load(Ordering::Relaxed), 2);
    }
}
