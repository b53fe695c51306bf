//! Transient pins: the VMM's own short I/O on a range (a flush in progress, a prepare writing zeros). A layout
//! change over the range waits for them instead of failing (Jan Kara: short-term pins make truncate wait).

use super::error::Result;
use super::range::ByteRange;
use super::region::RegionId;
use super::Mapper;

/// Held for the duration of the I/O; dropping it lets waiting changes proceed.
#[derive(Debug)]
#[must_use = "the transient pin ends when this is dropped"]
pub struct TransientPin {
    mapper: Mapper,
    id: u64,
    region: RegionId,
    range: ByteRange,
}

impl TransientPin {
    pub fn range(&self) -> ByteRange {
        self.range
    }
}

impl Mapper {
    /// Marks `[off, off+len)` busy with short I/O. Works on every backing kind and never waits.
    pub fn transient(&self, region: RegionId, off: u64, len: u64) -> Result<TransientPin> {
        let range = ByteRange::from_request(off, len)?;
        let mut st = self.lock();
        st.region(region)?;
        let id = st.next_id();
        st.region_mut(region)?.transients.insert(range, id);
        st.transients.insert(id, (region, range));
        Ok(TransientPin {
            mapper: self.clone(),
            id,
            region,
            range,
        })
    }
}

impl Drop for TransientPin {
    fn drop(&mut self) {
        let mut st = self.mapper.lock();
        st.transients.remove(&self.id);
        if let Some(r) = st.regions.get_mut(&self.region) {
            r.transients.remove(self.range, self.id);
        }
        drop(st);
        self.mapper.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use crate::mapper::test_files::TestRegion;

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
