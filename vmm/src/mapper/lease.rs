//! Layout leases: (owner, region, range, mode). `Shared` leases are breakable: a conflicting layout change sends
//! the holder a break notice and waits. `Exclusive` leases are unbreakable: conflicting changes fail at once with
//! ETXTBSY and the holder is never asked. Leases of different owners never conflict with each other, only with
//! layout changes; they may extend past EOF, and length 0 means "to EOF however the file grows".

use std::fmt;

use super::error::{MapperError, Result};
use super::owner::OwnerId;
use super::range::ByteRange;
use super::region::RegionId;
use super::Mapper;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease:{}", self.0)
    }
}

/// Separate values, never bit flags (requirement 15: F_LAYOUT|F_EXCLUSIVE reused an enumeration as flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseMode {
    Shared,
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
pub(super) struct Lease {
    pub owner: OwnerId,
    pub region: RegionId,
    pub range: ByteRange,
    pub mode: LeaseMode,
}

impl Mapper {
    /// Takes a lease on `[off, off+len)` of `region` (rounded out to pages; `len == 0` is open-ended).
    /// EINVAL without owner, ENOENT for an unknown owner or region, EOPNOTSUPP on device-DAX, ERANGE on overflow,
    /// EAGAIN while a break is in progress on an overlapping range.
    pub fn acquire(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        mode: LeaseMode,
    ) -> Result<LeaseId> {
        let range = ByteRange::from_request(off, len)?;
        let mut st = self.lock();
        st.check_owner(owner)?;
        let reg = st.region(region)?;
        reg.require_layout()?;
        if let Some(b) = reg.breaking(range) {
            return Err(MapperError::BreakInProgress { range: b });
        }
        let id = LeaseId(st.next_id());
        st.insert_lease(
            id,
            Lease {
                owner,
                region,
                range,
                mode,
            },
        );
        tracing::debug!(%owner, %id, %range, %mode, "lease acquired");
        Ok(id)
    }

    /// Releases a lease. EPERM if another owner holds it, EBUSY while pins remain under it (requirement 11).
    pub fn release(&self, owner: OwnerId, lease: LeaseId) -> Result<()> {
        let mut st = self.lock();
        st.check_owner(owner)?;
        let l = st
            .leases
            .get(&lease)
            .ok_or_else(|| MapperError::NotFound(format!("{lease}")))?;
        if l.owner != owner {
            return Err(MapperError::NotOwner {
                owner,
                what: lease.to_string(),
            });
        }
        let pins = st.pins.values().filter(|p| p.lease == Some(lease)).count();
        if pins > 0 {
            return Err(MapperError::LeaseBusy { lease, pins });
        }
        st.drop_lease(lease);
        if let Some(o) = st.owners.get_mut(&owner) {
            o.leases.remove(&lease);
        }
        drop(st);
        tracing::debug!(%owner, %lease, "lease released");
        self.changed.notify_all();
        Ok(())
    }

    /// Who holds leases over `[off, off+len)`: the lookup the operator and the benchmarks use.
    pub fn lease_holders(
        &self,
        region: RegionId,
        off: u64,
        len: u64,
    ) -> Result<Vec<(LeaseId, OwnerId, LeaseMode)>> {
        let range = ByteRange::from_request(off, len)?;
        let st = self.lock();
        let reg = st.region(region)?;
        let mut out = Vec::new();
        for id in reg.leases.overlapping(range) {
            if let Some(l) = st.leases.get(&LeaseId(id)) {
                out.push((LeaseId(id), l.owner, l.mode));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::test_files::TestRegion;

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
    fn leases_may_extend_past_eof_and_release_checks_owner() {
        let t = TestRegion::on_tmp(4);
        let m = &t.mapper;
        let a = m.add_owner("a");
        let b = m.add_owner("b");
        let l = m
            .acquire(a, t.region, 1 << 40, 1 << 20, LeaseMode::Shared)
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
            m.acquire(a, crate::mapper::RegionId(999), 0, 1, LeaseMode::Shared)
                .unwrap_err()
                .errno(),
            libc::ENOENT
        );
    }
}
