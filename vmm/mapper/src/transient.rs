//! Transient pins: the VMM's own short I/O on a range (a flush in progress, a prepare writing zeros). A layout
//! change over the range waits for them instead of failing (short-term pins make truncate wait). Ordering keeps
//! both sides moving: a change breaks leases first (a holder may flush while it releases), then waits for the
//! transient pins in flight; from then until it has applied, new transient pins on its range queue behind it,
//! so a busy flusher cannot starve it, and no transient pin ever waits on a guest's answer.

use crate::error::Result;
use crate::ids::RegionId;
use crate::range::ByteRange;
use crate::Mapper;

/// Held for the duration of the I/O; dropping it lets waiting changes proceed. Hold one at a time per range: a
/// second one taken while holding the first can queue behind a change that waits for the first.
#[derive(Debug)]
#[must_use = "the transient pin ends when this is dropped"]
pub struct TransientPin {
    mapper: Mapper,
    id: u64,
    range: ByteRange,
}

impl TransientPin {
    /// The region-relative range it covers.
    pub fn range(&self) -> ByteRange {
        self.range
    }
}

impl Mapper {
    /// Marks `[off, off+len)` of `region` busy with short I/O (`len == 0`: the whole window from `off`). Works
    /// on every backing kind. Waits only while a change that has finished its breaks drains the range.
    pub fn transient(&self, region: RegionId, off: u64, len: u64) -> Result<TransientPin> {
        let mut st = self.lock();
        loop {
            let reg = st.region(region)?;
            let range = reg.request(off, len)?;
            let file_range = reg.to_file(range);
            let key = reg.key;
            if st.holds(reg)?.draining.any_overlap(file_range) {
                st = self.wait(st);
                continue;
            }
            let id = st.next_id();
            st.insert_transient(id, key, file_range);
            return Ok(TransientPin {
                mapper: self.clone(),
                id,
                range,
            });
        }
    }

    /// As [`Mapper::transient`], but never waits for a change: `Ok(None)` when a change drains the range (the
    /// caller then takes the waiting path, e.g. hands its flush to a worker thread).
    pub fn try_transient(
        &self,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<Option<TransientPin>> {
        let mut st = self.lock();
        let reg = st.region(region)?;
        let range = reg.request(off, len)?;
        let file_range = reg.to_file(range);
        let key = reg.key;
        if st.holds(reg)?.draining.any_overlap(file_range) {
            return Ok(None);
        }
        let id = st.next_id();
        st.insert_transient(id, key, file_range);
        Ok(Some(TransientPin {
            mapper: self.clone(),
            id,
            range,
        }))
    }
}

impl Drop for TransientPin {
    fn drop(&mut self) {
        self.mapper.lock().drop_transient(self.id);
        self.mapper.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use crate::*;
    use std::sync::mpsc;
    use std::time::Duration;

    use crate::test_files::TestRegion;

    #[test]
    fn a_change_waits_for_a_transient_pin_then_proceeds() {
        for t in TestRegion::on_every_fs(8) {
            let m = t.mapper.clone();
            let tp = m.transient(t.region, t.page, t.page).unwrap();
            let (tx, rx) = mpsc::channel();
            let region = t.region;
            let page = t.page;
            let h = std::thread::spawn(move || {
                let r = m.punch(None, region, 0, 4 * page);
                tx.send(()).unwrap();
                r
            });
            // The punch must not complete while the transient pin is held; data is still there.
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "{}: punch did not wait",
                t.fs
            );
            assert_eq!(t.read_file(t.page, 1)[0], t.fill_byte(t.page), "{}", t.fs);
            drop(tp);
            let report = h.join().unwrap().unwrap();
            assert!(report.waited_for_transient, "{}", t.fs);
            assert_eq!(
                t.read_file(t.page, 1)[0],
                0,
                "{}: punch did not happen",
                t.fs
            );
            // A transient pin elsewhere does not hold anything up.
            let _far = t.mapper.transient(t.region, 6 * t.page, t.page).unwrap();
            let r = t.mapper.punch(None, t.region, 0, t.page).unwrap();
            assert!(!r.waited_for_transient);
        }
    }

    /// try_transient takes a pin where nothing drains, and answers None (without waiting) over a range a
    /// change is draining; the change still waits for the pins taken before it.
    #[test]
    fn try_transient_never_waits_for_a_draining_change() {
        let t = TestRegion::on_tmp(8);
        let held = t.mapper.transient(t.region, 0, t.page).unwrap();
        let (tx, rx) = mpsc::channel();
        let (m, region, page) = (t.mapper.clone(), t.region, t.page);
        std::thread::spawn(move || tx.send(m.punch(None, region, 0, page)));
        // The punch now drains page 0 (it waits for `held`): a new transient pin there would queue behind it.
        let mut refused = false;
        for _ in 0..3000 {
            match t.mapper.try_transient(t.region, 0, t.page).unwrap() {
                None => {
                    refused = true;
                    break;
                }
                Some(p) => drop(p),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(refused, "try_transient took a pin over a draining range");
        // Elsewhere it is free.
        assert!(t
            .mapper
            .try_transient(t.region, 4 * t.page, t.page)
            .unwrap()
            .is_some());
        drop(held);
        let report = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
        assert!(report.waited_for_transient);
        assert!(t
            .mapper
            .try_transient(t.region, 0, t.page)
            .unwrap()
            .is_some());
    }

    /// Two flushers whose transient pins overlap in time, so the range is never free: without the queue a
    /// waiting change would never see it empty. The change drains them and applies; the flushers go on after.
    #[test]
    fn a_busy_flusher_cannot_starve_a_waiting_change() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let t = TestRegion::on_tmp(8);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let flushers: Vec<_> = (0..2)
            .map(|i| {
                let (m, region, stop, rounds) =
                    (t.mapper.clone(), t.region, stop.clone(), rounds.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(i));
                    while !stop.load(Ordering::Relaxed) {
                        let tp = m.transient(region, 0, 0).unwrap();
                        std::thread::sleep(Duration::from_millis(2));
                        drop(tp);
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        while rounds.load(Ordering::Relaxed) < 20 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        let (m, region, page) = (t.mapper.clone(), t.region, t.page);
        std::thread::spawn(move || tx.send(m.punch(None, region, page, page)));
        let report = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the punch was starved by the flushers")
            .unwrap();
        assert!(report.waited_for_transient);
        assert_eq!(t.read_file(t.page, 1)[0], 0, "punch applied");
        let after = rounds.load(Ordering::Relaxed);
        while rounds.load(Ordering::Relaxed) < after + 20 {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        for f in flushers {
            f.join().unwrap();
        }
    }

    /// A holder told to give a range back often flushes first: its flush (a transient pin) must not wait for
    /// the change it is answering. It completes, the holder releases, the change proceeds.
    #[test]
    fn a_holder_flushes_while_it_answers_a_break() {
        for mut t in TestRegion::on_every_fs(8) {
            let m = t.mapper.clone();
            let holder = m.add_owner("guest-agent");
            let lease = m
                .acquire(holder, t.region, 0, 4 * t.page, LeaseMode::Shared)
                .unwrap();
            let events = t.events.take().unwrap();
            let (m2, region, page) = (m.clone(), t.region, t.page);
            let change = std::thread::spawn(move || m2.punch(None, region, 0, 2 * page));
            let BreakEvent::Notice(n) = events.recv_timeout(Duration::from_secs(10)).unwrap()
            else {
                panic!("{}: expected a break notice", t.fs);
            };
            assert_eq!(n.owner, holder);
            // The flush, while the break waits on this very holder.
            let (tx, rx) = mpsc::channel();
            let (m3, region) = (m.clone(), t.region);
            std::thread::spawn(move || {
                let tp = m3.transient(region, 0, 0);
                tx.send(tp.map(|tp| tp.range())).unwrap();
            });
            let flushed = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the holder's flush waited on the break it is answering");
            assert!(flushed.is_ok(), "{}", t.fs);
            assert_eq!(m.snapshot().breaks.len(), 1, "still breaking");
            m.release(holder, lease).unwrap();
            let report = change.join().unwrap().unwrap();
            assert_eq!(report.notified, vec![holder]);
            assert_eq!(t.read_file(0, 1)[0], 0, "{}: punch applied", t.fs);
        }
    }
}
