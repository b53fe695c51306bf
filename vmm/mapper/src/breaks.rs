//! Breaks: when a layout change meets shared leases, every holder gets one notice listing each of its leases
//! with the exact overlapping range and a deadline, and the change waits until all of them are released. Past
//! the deadline the request's policy applies: `Fail` (ETIMEDOUT, nothing changed, leases kept) or `Revoke`
//! (the holder's DMA mappings are torn down first, then its leases removed, then it is told). Breaks on disjoint
//! ranges proceed independently; a change overlapping a break in progress queues behind it, and the range takes
//! no new leases until the break ends (EAGAIN).
//!
//! Delivery goes through [`BreakNotifier`], which the VMM implements (the agent channel turns notices into
//! protocol messages). Notices are sent with the mapper's lock released, so a notifier may call back into the
//! mapper (release the lease at once, for example).

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::time::Instant;

use crate::host::FileKey;
use crate::ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
use crate::range::ByteRange;

/// What happens when the deadline passes with holders left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakPolicy {
    /// The change fails with ETIMEDOUT; nothing changed, leases kept.
    Fail,
    /// The remaining holders are treated as failed DMA contexts: their DMA mappings on the file are torn
    /// down, their overlapping leases removed, they are told, and the change proceeds.
    Revoke,
}

/// One notice per holder and region: ranges are relative to `region`, the region the holder's leases are on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakNotice {
    /// The break, as introspection lists it.
    pub break_id: BreakId,
    /// The holder asked to release.
    pub owner: OwnerId,
    /// The region its leases are on.
    pub region: RegionId,
    /// Each of the holder's leases with the part of it the change needs.
    pub leases: Vec<(LeaseId, ByteRange)>,
    /// Release before this.
    pub deadline: Instant,
    /// What the change is ("punch", "shrink", "host-open", ...).
    pub reason: &'static str,
}

/// Told to a holder whose leases were revoked at a break's deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokeNotice {
    /// The break.
    pub break_id: BreakId,
    /// The holder.
    pub owner: OwnerId,
    /// The region its leases were on.
    pub region: RegionId,
    /// The leases removed, with the part the change needed.
    pub leases: Vec<(LeaseId, ByteRange)>,
    /// Pins of the holder whose DMA mappings were torn down before the leases went.
    pub dma_torn_down: Vec<PinId>,
}

/// A break began: sent once, before its holders' notices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakStarted {
    /// The break.
    pub break_id: BreakId,
    /// The region the change was named on.
    pub region: RegionId,
    /// The range it needs, as the requester named it (region-relative; file-relative for file-level changes).
    pub range: ByteRange,
    /// Every holder asked, with its name.
    pub holders: Vec<(OwnerId, String)>,
    /// What the change is.
    pub reason: &'static str,
}

/// A holder gave back everything a break asked of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderReleased {
    /// The break.
    pub break_id: BreakId,
    /// The region the change was named on.
    pub region: RegionId,
    /// The holder, and its name.
    pub owner: OwnerId,
    /// Its name.
    pub name: String,
    /// From the break's start to its last release.
    pub after: std::time::Duration,
}

/// Delivers notices to holders; the VMM implements it (an agent channel turns notices into messages). The
/// progress calls (`break_started`, `holder_released`) let a VMM follow a break as it happens; by default they
/// do nothing. Every call is made with the mapper's lock released and must not block for long.
pub trait BreakNotifier: Send + Sync {
    /// Asks a holder to release the listed leases before `deadline`.
    fn break_notice(&self, notice: &BreakNotice);
    /// Tells a holder its leases were revoked.
    fn revoked(&self, notice: &RevokeNotice);
    /// A break began (before its notices go out).
    fn break_started(&self, _started: &BreakStarted) {}
    /// A holder released everything the break needed.
    fn holder_released(&self, _released: &HolderReleased) {}
}

/// A notice as [`ChannelNotifier`] forwards it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakEvent {
    /// A break notice.
    Notice(BreakNotice),
    /// A revoke notice.
    Revoked(RevokeNotice),
}

/// A notifier that forwards every notice into a channel: tests script holders from the receiving end, and
/// a VMM thread can do the same.
#[derive(Debug)]
pub struct ChannelNotifier {
    tx: Mutex<Sender<BreakEvent>>,
}

impl ChannelNotifier {
    /// The notifier and the receiving end of its channel.
    pub fn new() -> (Self, Receiver<BreakEvent>) {
        let (tx, rx) = mpsc::channel();
        (ChannelNotifier { tx: Mutex::new(tx) }, rx)
    }

    fn send(&self, ev: BreakEvent) {
        // A dropped receiver means nobody listens; the break then runs to its deadline, which is the policy.
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(ev);
    }
}

impl BreakNotifier for ChannelNotifier {
    fn break_notice(&self, notice: &BreakNotice) {
        self.send(BreakEvent::Notice(notice.clone()));
    }
    fn revoked(&self, notice: &RevokeNotice) {
        self.send(BreakEvent::Revoked(notice.clone()));
    }
}

/// A break in progress (introspection shows them).
#[derive(Clone, Debug)]
pub(crate) struct BreakState {
    /// The region the change was named on.
    pub region: RegionId,
    pub file: FileKey,
    /// File offsets.
    pub range: ByteRange,
    pub leases: Vec<LeaseId>,
    pub deadline: Instant,
    pub reason: &'static str,
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use crate::*;
    use std::sync::mpsc::RecvTimeoutError;
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::layout_change::{ChangeRequest, LayoutChange};
    use crate::test_files::TestRegion;
    use crate::{LeaseMode, Mapper, MapperError, RecordingDma};

    fn punch_req(
        t: &TestRegion,
        off: u64,
        len: u64,
        ms: u64,
        policy: BreakPolicy,
    ) -> ChangeRequest {
        ChangeRequest {
            deadline: Duration::from_millis(ms),
            policy,
            ..ChangeRequest::new(t.region, LayoutChange::Punch { off, len })
        }
    }

    fn notice(ev: BreakEvent) -> BreakNotice {
        match ev {
            BreakEvent::Notice(n) => n,
            other => panic!("expected a notice, got {other:?}"),
        }
    }

    #[test]
    fn shared_holders_get_one_notice_with_exact_ranges_and_the_change_waits_for_them() {
        for mut t in TestRegion::on_every_fs(16) {
            let m = t.mapper.clone();
            let a = m.add_owner("a");
            let b = m.add_owner("b");
            let a1 = m
                .acquire(a, t.region, 0, 3 * t.page, LeaseMode::Shared)
                .unwrap();
            let a2 = m
                .acquire(a, t.region, 5 * t.page, 0, LeaseMode::Shared)
                .unwrap();
            let b1 = m
                .acquire(b, t.region, 2 * t.page, t.page, LeaseMode::Shared)
                .unwrap();
            let _outside = m
                .acquire(b, t.region, 12 * t.page, t.page, LeaseMode::Shared)
                .unwrap();
            let events = t.events.take().unwrap();
            let (m2, region, page) = (m.clone(), t.region, t.page);
            let h = thread::spawn(move || {
                m2.change(ChangeRequest {
                    deadline: Duration::from_secs(10),
                    ..ChangeRequest::new(
                        region,
                        LayoutChange::Punch {
                            off: 2 * page,
                            len: 6 * page,
                        },
                    )
                })
            });
            let mut got = vec![notice(events.recv_timeout(Duration::from_secs(5)).unwrap())];
            got.push(notice(events.recv_timeout(Duration::from_secs(5)).unwrap()));
            got.sort_by_key(|n| n.owner);
            assert_eq!(got[0].owner, a);
            assert_eq!(
                got[0].leases,
                vec![
                    (a1, ByteRange::new(2 * t.page, 3 * t.page)),
                    (a2, ByteRange::new(5 * t.page, 8 * t.page))
                ],
                "{}",
                t.fs
            );
            assert_eq!(
                (got[1].owner, got[1].leases.clone()),
                (b, vec![(b1, ByteRange::new(2 * t.page, 3 * t.page))])
            );
            assert!(got[0].deadline > std::time::Instant::now());
            assert_eq!(got[0].reason, "punch");
            // Nothing changed while holders still hold; the break shows in introspection.
            m.release(a, a1).unwrap();
            m.release(a, a2).unwrap();
            thread::sleep(Duration::from_millis(100));
            assert!(
                !h.is_finished(),
                "{}: change went ahead with b still holding",
                t.fs
            );
            assert_eq!(t.read_file(2 * t.page, 1)[0], t.fill_byte(2 * t.page));
            let s = m.snapshot();
            assert_eq!(s.breaks.len(), 1);
            assert_eq!(s.breaks[0].waiting_on, vec![(b1, b)]);
            m.release(b, b1).unwrap();
            let report = h.join().unwrap().unwrap();
            let mut notified = report.notified.clone();
            notified.sort();
            assert_eq!(notified, vec![a, b]);
            assert_eq!(
                t.read_file(2 * t.page, 1)[0],
                0,
                "{}: punch did not happen",
                t.fs
            );
            assert!(m.snapshot().breaks.is_empty());
        }
    }

    #[test]
    fn a_range_under_a_break_takes_no_new_leases() {
        let mut t = TestRegion::on_tmp(8);
        let m = t.mapper.clone();
        let a = m.add_owner("a");
        let l = m
            .acquire(a, t.region, 0, 2 * t.page, LeaseMode::Shared)
            .unwrap();
        let events = t.events.take().unwrap();
        let (m2, req) = (
            m.clone(),
            punch_req(&t, 0, t.page, 10_000, BreakPolicy::Fail),
        );
        let h = thread::spawn(move || m2.change(req));
        notice(events.recv_timeout(Duration::from_secs(5)).unwrap());
        for mode in [LeaseMode::Shared, LeaseMode::Exclusive] {
            assert_eq!(
                m.acquire(a, t.region, 0, 1, mode).unwrap_err().errno(),
                libc::EAGAIN
            );
        }
        // Disjoint ranges are not affected.
        m.acquire(a, t.region, t.page, t.page, LeaseMode::Exclusive)
            .unwrap();
        m.release(a, l).unwrap();
        h.join().unwrap().unwrap();
        m.acquire(a, t.region, 0, 1, LeaseMode::Shared).unwrap();
    }

    #[test]
    fn deadline_with_fail_policy_is_etimedout_and_changes_nothing() {
        for mut t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("silent");
            m.acquire(a, t.region, 0, 0, LeaseMode::Shared).unwrap();
            let before = (
                t.file_size(),
                t.read_file(0, 8 * t.page as usize),
                m.snapshot().owners,
            );
            let e = m
                .change(punch_req(&t, 0, 4 * t.page, 150, BreakPolicy::Fail))
                .unwrap_err();
            assert_eq!(e.errno(), libc::ETIMEDOUT, "{}", t.fs);
            assert!(matches!(&e, MapperError::TimedOut { holders, .. } if holders == &vec![a]));
            let e = m
                .change(ChangeRequest {
                    deadline: Duration::from_millis(50),
                    ..ChangeRequest::new(t.region, LayoutChange::Shrink { new_size: 0 })
                })
                .unwrap_err();
            assert_eq!(e.errno(), libc::ETIMEDOUT);
            assert_eq!(
                (
                    t.file_size(),
                    t.read_file(0, 8 * t.page as usize),
                    m.snapshot().owners
                ),
                before,
                "{}",
                t.fs
            );
            assert!(m.snapshot().breaks.is_empty());
            let events = t.events.take().unwrap();
            assert_eq!(events.try_iter().count(), 2, "one notice per attempt");
            // The range takes leases again.
            m.acquire(a, t.region, 0, 1, LeaseMode::Shared).unwrap();
        }
    }

    /// Records, at the moment a revoke notice is delivered, which DMA mappings still exist.
    struct RevokeWitness {
        dma: Arc<RecordingDma>,
        seen: Mutex<Vec<(RevokeNotice, usize)>>,
    }

    impl BreakNotifier for RevokeWitness {
        fn break_notice(&self, _: &BreakNotice) {}
        fn revoked(&self, n: &RevokeNotice) {
            self.seen
                .lock()
                .unwrap()
                .push((n.clone(), self.dma.mappings().len()));
        }
    }

    #[test]
    fn revoke_tears_down_dma_first_then_removes_leases_and_tells_the_holder() {
        for t in TestRegion::on_every_fs(8) {
            let dma = Arc::new(RecordingDma::new());
            let w = Arc::new(RevokeWitness {
                dma: dma.clone(),
                seen: Mutex::new(Vec::new()),
            });
            let m = Mapper::new(w.clone(), Some(dma.clone()));
            let desc = t.mapper.lock().region(t.region).unwrap().desc.clone();
            let r = m.add_region(desc).unwrap();
            let a = m.add_owner("unresponsive");
            let shared = m.acquire(a, r, 0, 2 * t.page, LeaseMode::Shared).unwrap();
            m.acquire(a, r, 6 * t.page, t.page, LeaseMode::Exclusive)
                .unwrap();
            let pin = m.pin(a, r, 6 * t.page, t.page).unwrap();
            assert_eq!(dma.mappings().len(), 1);
            let report = m
                .change(ChangeRequest {
                    deadline: Duration::from_millis(100),
                    policy: BreakPolicy::Revoke,
                    ..ChangeRequest::new(
                        r,
                        LayoutChange::Punch {
                            off: 0,
                            len: 2 * t.page,
                        },
                    )
                })
                .unwrap();
            assert_eq!(report.revoked, vec![a]);
            let seen = w.seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            let (n, mappings_at_notice) = &seen[0];
            assert_eq!(
                *mappings_at_notice, 0,
                "{}: DMA still mapped when the holder was told",
                t.fs
            );
            assert_eq!(n.leases, vec![(shared, ByteRange::new(0, 2 * t.page))]);
            assert_eq!(n.dma_torn_down, vec![pin]);
            // The change went through; the pin stays (locked, still protecting its range) but without DMA.
            assert_eq!(t.read_file(0, 1)[0], 0, "{}", t.fs);
            let s = m.snapshot();
            let o = s.owner(a).unwrap();
            assert_eq!(o.leases.len(), 1);
            assert!(o.pins[0].dma_revoked && o.pins[0].dma.is_none());
            assert_eq!(
                m.punch(None, r, 6 * t.page, 1).unwrap_err().errno(),
                libc::ETXTBSY
            );
            m.unpin(a, pin).unwrap();
        }
    }

    #[test]
    fn disjoint_breaks_proceed_independently_and_overlapping_ones_queue() {
        let mut t = TestRegion::on_tmp(16);
        let m = t.mapper.clone();
        let slow = m.add_owner("slow");
        let fast = m.add_owner("fast");
        let ls = m
            .acquire(slow, t.region, 0, t.page, LeaseMode::Shared)
            .unwrap();
        let lf = m
            .acquire(fast, t.region, 8 * t.page, t.page, LeaseMode::Shared)
            .unwrap();
        let events = t.events.take().unwrap();
        let spawn = |off: u64, len: u64| {
            let (m2, req) = (
                m.clone(),
                punch_req(&t, off, len, 10_000, BreakPolicy::Fail),
            );
            thread::spawn(move || m2.change(req))
        };
        let h_slow = spawn(0, t.page);
        assert_eq!(
            notice(events.recv_timeout(Duration::from_secs(5)).unwrap()).owner,
            slow
        );
        let h_fast = spawn(8 * t.page, t.page);
        let n = notice(events.recv_timeout(Duration::from_secs(5)).unwrap());
        assert_eq!(n.owner, fast);
        // A third change overlapping the slow break queues behind it (and sends no notice of its own yet).
        let h_queued = spawn(0, 2 * t.page);
        thread::sleep(Duration::from_millis(100));
        assert!(matches!(
            events.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        ));
        m.release(fast, lf).unwrap();
        let r_fast = h_fast.join().unwrap().unwrap();
        assert!(!r_fast.queued_behind_break);
        assert!(
            !h_slow.is_finished(),
            "the disjoint break finished the slow one too"
        );
        assert!(!h_queued.is_finished());
        m.release(slow, ls).unwrap();
        h_slow.join().unwrap().unwrap();
        let r_q = h_queued.join().unwrap().unwrap();
        assert!(r_q.queued_behind_break);
        assert!(
            r_q.notified.is_empty(),
            "the lease was gone by the time the queued change ran"
        );
        assert!(matches!(
            events.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        ));
    }

    #[test]
    fn owner_death_mid_break_releases_everything_and_the_change_proceeds() {
        for mut t in TestRegion::on_every_fs(8) {
            let m = t.mapper.clone();
            let dead = m.add_owner("vanishing-agent");
            m.acquire(dead, t.region, 0, 0, LeaseMode::Shared).unwrap();
            m.acquire(dead, t.region, 6 * t.page, t.page, LeaseMode::Exclusive)
                .unwrap();
            m.pin(dead, t.region, 6 * t.page, t.page).unwrap();
            let events = t.events.take().unwrap();
            // The pin blocks a whole-file shrink; a punch of the front only needs the shared lease broken.
            let (m2, req) = (
                m.clone(),
                punch_req(&t, 0, 2 * t.page, 30_000, BreakPolicy::Fail),
            );
            let h = thread::spawn(move || m2.change(req));
            notice(events.recv_timeout(Duration::from_secs(5)).unwrap());
            assert!(!h.is_finished());
            // Loads and stores through the mapping are never blocked, in the pinned range or the breaking one,
            // while a break waits (requirement 4: the mapper never stands between the guest and its memory).
            let pinned = 6 * t.page as usize;
            assert!(t.map.write(pinned, 0x42));
            assert_eq!(t.map.read(pinned), Some(0x42));
            assert!(t.map.write(1, 0x43));
            assert_eq!(t.map.read(1), Some(0x43));
            assert!(!h.is_finished());
            m.owner_exit(dead).unwrap();
            let report = h.join().unwrap().unwrap();
            assert_eq!(report.notified, vec![dead]);
            assert!(m.snapshot().owners.is_empty(), "{}", t.fs);
            assert!(t.dma.mappings().is_empty(), "{}", t.fs);
            assert_eq!(t.read_file(0, 1)[0], 0, "{}", t.fs);
            m.shrink(None, t.region, 0).unwrap();
        }
    }
}
