//! Transient pins: the VMM's own short I/O on a range (a flush in progress, a prepare writing zeros). A layout
//! change over the range waits for them instead of failing (short-term pins make truncate wait). Ordering keeps
//! both sides moving: a change breaks leases first (a holder may flush while it releases), then waits for the
//! transient pins in flight; from then until it has applied, new transient pins on its range queue behind it,
//! so a busy flusher cannot starve it, and no transient pin ever waits on a guest's answer.

use crate::error::Result;
use crate::ids::RegionId;
use crate::range::ByteRange;
use crate::Mapper;

/// Held for the duration of the I/O; dropping it lets waiting changes proceed.
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
}
