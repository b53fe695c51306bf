//! Layout leases: (owner, region, range, mode). `Shared` leases are breakable: a conflicting layout change sends
//! the holder a break notice and waits. `Exclusive` leases are unbreakable: conflicting changes fail at once with
//! ETXTBSY and the holder is never asked. Leases never conflict with each other, only with layout changes. A
//! lease lies inside its region's window; it is indexed by file offsets, so every region on the file sees it.

use std::fmt;
use std::ops::ControlFlow;

use crate::error::{Held, MapperError, Missing, Result};
use crate::host::FileKey;
use crate::ids::{LeaseId, OwnerId, RegionId};
use crate::range::ByteRange;
use crate::Mapper;

/// Separate values, never bit flags (F_LAYOUT|F_EXCLUSIVE once reused an enumeration as flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseMode {
    /// Breakable: the holder is asked to release before a change.
    Shared,
    /// Unbreakable: a conflicting change fails with ETXTBSY.
    Exclusive,
}

impl fmt::Display for LeaseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseMode::Shared => "shared",
            LeaseMode::Exclusive => "exclusive",
        })
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub owner: OwnerId,
    pub region: RegionId,
    pub key: FileKey,
    /// File offsets.
    pub range: ByteRange,
    pub mode: LeaseMode,
}

impl Mapper {
    /// Takes a lease on `[off, off+len)` of `region` (rounded out to pages; `len == 0`: to the end of the
    /// window). EINVAL without owner, ENOENT for an unknown owner or region, ERANGE outside the window,
    /// EOPNOTSUPP on device-DAX, EAGAIN while a break or change is in progress on an overlapping range.
    pub fn acquire(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        mode: LeaseMode,
    ) -> Result<LeaseId> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let reg = st.region(region)?;
        reg.require_layout()?;
        reg.require_open()?;
        let range = reg.to_file(reg.request(off, len)?);
        if let Some(b) = st.holds(reg)?.busy(range, None) {
            return Err(MapperError::BreakInProgress {
                range: reg.to_region(b).unwrap_or(b),
            });
        }
        let key = reg.key;
        let id = st.insert_lease(Lease {
            owner,
            region,
            key,
            range,
            mode,
        })?;
        tracing::debug!(%owner, %id, %range, %mode, "lease acquired");
        Ok(id)
    }

    /// Releases a lease. EPERM if another owner holds it, EBUSY while pins remain under it.
    pub fn release(&self, owner: OwnerId, lease: LeaseId) -> Result<()> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let l = st
            .leases
            .get(&lease)
            .ok_or(MapperError::NotFound(Missing::Lease(lease)))?;
        if l.owner != owner {
            return Err(MapperError::NotOwner {
                owner,
                what: Held::Lease(lease),
            });
        }
        let pins = st.pins.values().filter(|p| p.lease == Some(lease)).count();
        if pins > 0 {
            return Err(MapperError::LeaseBusy { lease, pins });
        }
        st.drop_lease(lease);
        drop(st);
        tracing::debug!(%owner, %lease, "lease released");
        self.changed.notify_all();
        Ok(())
    }

    /// Who holds leases over `[off, off+len)` of `region`, from any region of the same file.
    pub fn lease_holders(
        &self,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<Vec<(LeaseId, OwnerId, LeaseMode)>> {
        let st = self.lock();
        let reg = st.region(region)?;
        let range = reg.to_file(reg.request(off, len)?);
        let mut out = Vec::new();
        st.holds(reg)?.leases.for_each_overlap(range, |_, id| {
            let id = LeaseId::from_raw(id);
            if let Some(l) = st.leases.get(&id) {
                out.push((id, l.owner, l.mode));
            }
            ControlFlow::Continue(())
        });
        Ok(out)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::TestRegion;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn leases_of_different_owners_never_conflict() {
        for t in TestRegion::on_every_fs(8) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            let b = m.add_owner("b");
            m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            m.acquire(b, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            m.acquire(b, t.region, t.page, t.page, LeaseMode::Shared)
                .unwrap();
            assert_eq!(
                m.lease_holders(t.region, t.page, 1).unwrap().len(),
                3,
                "{}",
                t.fs
            );
        }
    }

    #[test]
    fn leases_stay_inside_the_window_and_release_checks_owner() {
        let t = TestRegion::on_tmp(4);
        let m = &t.mapper;
        let a = m.add_owner("a");
        let b = m.add_owner("b");
        for (off, len) in [(4 * t.page, 1), (3 * t.page, t.page + 1), (1 << 40, 0)] {
            assert_eq!(
                m.acquire(a, t.region, off, len, LeaseMode::Shared)
                    .unwrap_err()
                    .errno(),
                libc::ERANGE,
                "[{off:#x}, +{len:#x})"
            );
        }
        let l = m
            .acquire(a, t.region, 3 * t.page, t.page, LeaseMode::Shared)
            .unwrap();
        assert_eq!(m.release(b, l).unwrap_err().errno(), libc::EPERM);
        assert_eq!(
            m.release(OwnerId::NONE, l).unwrap_err().errno(),
            libc::EINVAL
        );
        m.release(a, l).unwrap();
        assert_eq!(m.release(a, l).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            m.acquire(a, t.region, u64::MAX - 1, 10, LeaseMode::Shared)
                .unwrap_err()
                .errno(),
            libc::ERANGE
        );
        assert_eq!(
            m.acquire(a, crate::RegionId::from_raw(999), 0, 1, LeaseMode::Shared)
                .unwrap_err()
                .errno(),
            libc::ENOENT
        );
    }
}
