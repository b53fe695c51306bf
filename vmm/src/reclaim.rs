//! Offer-reclaim: ranges guests gave back, and the operator's policy for punching them.
//!
//! A guest owner offers a range it no longer needs (`OfferReclaim` on the agent channel). The offer is checked
//! against the mapper (the owner exists, the range lies in the region's window, the region has a file layout,
//! the owner holds no lease or pin over it) and recorded here. Per region the operator chooses `manual` (offers
//! are listed; `POST /regions/{id}/reclaim` punches them) or `auto` (each offer is punched at once, on the
//! `reclaim` thread, as an ordinary layout change: holds of others still refuse it). An offer is only a promise
//! of the guest that made it: the offers of a session go when the session ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::events::{EventLog, NewEvent};
use crate::pmem::BackingKind;
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

/// A region as the table checks offers against it.
#[derive(Clone, Debug)]
pub struct ReclaimRegion {
    /// The mapper's id.
    pub id: RegionId,
    /// The operator's name.
    pub name: String,
    /// Backing kind (device-DAX has no file layout to punch).
    pub kind: BackingKind,
    /// Window size.
    pub size: u64,
}

#[derive(Default)]
struct Table {
    next: u64,
    offers: Vec<(Offer, RegionId)>,
    policies: HashMap<RegionId, ReclaimPolicy>,
}

/// The VM's reclaim-offers table.
pub struct Reclaim {
    mapper: Mapper,
    events: Arc<EventLog>,
    regions: Vec<ReclaimRegion>,
    table: Mutex<Table>,
    auto: SyncSender<u64>,
    /// Counters for `/metrics`.
    pub counters: ReclaimCounters,
}

impl Reclaim {
    /// The table and its `reclaim` thread (which ends when the table is dropped).
    pub fn start(
        mapper: Mapper,
        events: Arc<EventLog>,
        regions: Vec<ReclaimRegion>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(AUTO_QUEUE);
        let r = Arc::new(Reclaim {
            mapper,
            events,
            regions,
            table: Mutex::new(Table::default()),
            auto: tx,
            counters: ReclaimCounters::default(),
        });
        let weak = Arc::downgrade(&r);
        std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || auto_worker(&weak, &rx))?;
        Ok(r)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn region(&self, id: RegionId) -> Option<&ReclaimRegion> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The region the operator named.
    pub fn region_by_name(&self, name: &str) -> Option<&ReclaimRegion> {
        self.regions.iter().find(|r| r.name == name)
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
        let reg = self.region(region).ok_or(libc::ENOENT)?;
        if reg.kind == BackingKind::DevDax {
            return Err(libc::EOPNOTSUPP);
        }
        if offset >= reg.size {
            return Err(libc::ERANGE);
        }
        let len = if len == 0 { reg.size - offset } else { len };
        let end = match offset.checked_add(len) {
            Some(e) if e <= reg.size => e,
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
                region: reg.name.clone(),
                offset,
                length: len,
                owner: owner.to_raw(),
                session,
                at_ms: now_ms(),
            };
            t.offers.push((offer.clone(), region));
            let auto = t.policies.get(&region).copied().unwrap_or_default() == ReclaimPolicy::Auto;
            (offer, auto)
        };
        self.counters.offers.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_offered
            .fetch_add(len, Ordering::Relaxed);
        self.events.push(NewEvent {
            kind: "offer",
            region: Some(reg.name.clone()),
            owners: vec![owner.to_raw()],
            message: format!(
                "owner {owner} ({}) offers {} [{offset:#x}, +{len:#x}) for reclaim (offer {}, session {session})",
                holder.name, reg.name, offer.id
            ),
            ..NewEvent::default()
        });
        if auto {
            match self.auto.try_send(offer.id) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    tracing::warn!(id = %reg.name, offer = offer.id, "reclaim queue full; the offer stays listed");
                }
            }
        }
        Ok(offer.id)
    }

    /// Drops the offers of an agent session that ended.
    pub fn end_session(&self, session: u64) {
        let mut t = self.table();
        let before = t.offers.len();
        t.offers.retain(|(o, _)| o.session != session);
        let gone = before - t.offers.len();
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
        self.table().offers.retain(|(o, r)| {
            !(o.owner == owner.to_raw()
                && *r == region
                && o.offset < end
                && offset < o.offset.saturating_add(o.length))
        });
    }

    /// Drops the offers of an owner that closed (its promise ends with it).
    pub fn end_owner(&self, owner: OwnerId) {
        self.table()
            .offers
            .retain(|(o, _)| o.owner != owner.to_raw());
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
            .map_or_else(String::new, |r| r.name.clone());
        self.events.push(NewEvent {
            kind: "reclaim-policy-set",
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

    /// Punches one offer through the mapper; `None` when it is no longer listed.
    fn punch(&self, id: u64) -> Option<ReclaimOutcome> {
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
            "{} [{:#x}, +{:#x}) (offer {} of owner {})",
            offer.region, offer.offset, offer.length, offer.id, offer.owner
        );
        match self.mapper.change(req) {
            Ok(report) => {
                self.table().offers.retain(|(o, _)| o.id != id);
                self.counters
                    .bytes_reclaimed
                    .fetch_add(offer.length, Ordering::Relaxed);
                let message = format!(
                    "reclaimed {what}: punched, {} holder(s) asked",
                    report.notified.len()
                );
                self.events.push(NewEvent {
                    kind: "reclaim-done",
                    region: Some(offer.region.clone()),
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
            Err(e) => Some(self.refused(offer, &what, &e)),
        }
    }

    fn refused(&self, offer: Offer, what: &str, e: &MapperError) -> ReclaimOutcome {
        let message = format!("reclaim of {what} refused: {} ({e})", e.errno_name());
        self.events.push(NewEvent {
            kind: "reclaim-refused",
            region: Some(offer.region.clone()),
            owners: vec![offer.owner],
            errno: Some(e.errno_name().to_owned()),
            message: message.clone(),
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
    if let Err(e) = crate::seccomp::apply_for_thread(crate::seccomp::ThreadKind::Reclaim) {
        tracing::error!("reclaim worker not started: {e}");
        return;
    }
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
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use daxvisor_mapper::RegionDesc;

    const SIZE: u64 = 1 << 20;

    struct Rig {
        table: Arc<Reclaim>,
        mapper: Mapper,
        region: RegionId,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    /// A 1 MiB file full of data, registered as region `pm0`.
    fn rig(kind: BackingKind) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&vec![0x5a; SIZE as usize]).unwrap();
        file.sync_all().unwrap();
        let mapper = Mapper::new(Arc::new(crate::lease_manager::LogNotifier), None);
        let region = mapper
            .add_region(
                RegionDesc::new(Arc::new(file), 0, SIZE, BackingKind::Regular).with_name("pm0"),
            )
            .unwrap();
        let table = Reclaim::start(
            mapper.clone(),
            Arc::default(),
            vec![ReclaimRegion {
                id: region,
                name: "pm0".into(),
                kind,
                size: SIZE,
            }],
        )
        .unwrap();
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
        let r = rig(BackingKind::Regular);
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
        let r = rig(BackingKind::Regular);
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

    #[test]
    fn device_dax_unknown_owners_and_closed_owners() {
        let r = rig(BackingKind::DevDax);
        let guest = r.mapper.add_owner("agent:app");
        assert_eq!(
            r.table.offer(1, guest, r.region, 0, 4096),
            Err(libc::EOPNOTSUPP)
        );
        let r = rig(BackingKind::Regular);
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
