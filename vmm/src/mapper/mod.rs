//! The memory mapper: layout leases, extent pins, range-limited breaks and layout changes over the files that
//! back pmem regions (DESIGN.md, "The memory mapper"). It knows nothing of KVM or virtio: files, ranges, owners.
//!
//! - Owners ([`Mapper::add_owner`], [`Mapper::owner_exit`]) hold leases and pins; when one goes, all it held goes.
//! - Leases ([`Mapper::acquire`], [`Mapper::release`]): `Shared` (breakable) or `Exclusive` (unbreakable).
//! - Pins ([`Mapper::pin`], [`Mapper::unpin`]) need an exclusive lease of the same owner, stable extents
//!   (FIEMAP), then populate + mlock + DMA map. [`Mapper::prepare`] makes a range pinnable.
//! - Transient pins ([`Mapper::transient`]): the VMM's own short I/O; changes wait for them.
//! - Layout changes ([`Mapper::change`], [`Mapper::punch`], ...): pins -> ETXTBSY/EDEADLK, exclusive leases ->
//!   ETXTBSY/EDEADLK, shared leases -> break (notices through [`BreakNotifier`]) and wait, then fallocate/ftruncate.
//! - The host guard ([`HostGuard`]) turns a foreign open of a backing file into a whole-file break.
//! - Introspection ([`Mapper::snapshot`]): every lease and pin by owner with byte ranges.
//!
//! Wiring (what the VMM does): build one `Mapper` with its `BreakNotifier` (the agent channel turns notices into
//! protocol messages) and a `DmaMapper` (`VfioContainer` when devices are passed through); `add_region` for each
//! pmem region with its fd, offset, size, kind and host mapping (IOVA = guest physical address); `add_owner` per
//! agent connection / DMA context and `owner_exit` when it goes; take `transient` around its own flushes; create
//! the `HostGuard` on the main thread before spawning threads (so every thread inherits the blocked signal), `arm`
//! each region whose file it opened alone, and read the guard's fd from the thread that created it, calling
//! `service` (it blocks while holders answer, up to the capped deadline) and `rearm` on a timer.
//!
//! Concurrency: one mutex over the tables and one condvar that every release, unpin, owner exit, break end and
//! transient-pin drop signals. Nothing waits while holding the mutex (breaks wait on the condvar, notices are
//! delivered with the mutex released), and slow work (FIEMAP, populate of gigabytes, prepare) runs unlocked with
//! the range already claimed, so the agent channel and the operator API can call in from several threads.

pub mod breaks;
pub mod dma;
pub mod error;
pub mod guard;
pub mod host_mapping;
pub mod interval;
pub mod introspect;
pub mod layout_change;
pub mod lease;
pub mod owner;
pub mod pin;
pub mod prepare;
pub mod range;
pub mod region;
pub mod transient;

#[cfg(test)]
mod concurrency_test;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod test_files;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use breaks::{
    BreakEvent, BreakId, BreakNotice, BreakNotifier, BreakPolicy, ChannelNotifier, RevokeNotice,
};
pub use dma::{DmaMapper, RecordingDma, VfioContainer};
pub use error::{HoldKind, MapperError, Result};
pub use guard::{GuardEvent, HostGuard};
pub use host_mapping::{HostMapping, OwnedMapping};
pub use introspect::Snapshot;
pub use layout_change::{ChangeReport, ChangeRequest, LayoutChange};
pub use lease::{LeaseId, LeaseMode};
pub use owner::OwnerId;
pub use pin::{ExtentFlags, ExtentProblem, PinId};
pub use prepare::{PrepareProgress, PrepareReport};
pub use range::{ByteRange, OPEN_END};
pub use region::{RegionDesc, RegionId};
pub use transient::TransientPin;

use breaks::BreakState;
use lease::Lease;
use owner::Owner;
use pin::Pin;
use region::Region;

/// The layout-lease manager. Cheap to clone; clones share the same tables.
#[derive(Clone)]
pub struct Mapper {
    state: Arc<Mutex<State>>,
    changed: Arc<Condvar>,
    notifier: Arc<dyn BreakNotifier>,
    dma: Option<Arc<dyn DmaMapper>>,
}

impl std::fmt::Debug for Mapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapper").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    owners: HashMap<OwnerId, Owner>,
    regions: HashMap<RegionId, Region>,
    leases: HashMap<LeaseId, Lease>,
    pins: HashMap<PinId, Pin>,
    breaks: HashMap<BreakId, BreakState>,
    transients: HashMap<u64, (RegionId, ByteRange)>,
    guard_events: Vec<GuardEvent>,
}

impl Mapper {
    /// `notifier` delivers break and revoke notices to holders; `dma` maps pinned ranges for devices (None when
    /// the VM has no DMA-capable passthrough device).
    pub fn new(notifier: Arc<dyn BreakNotifier>, dma: Option<Arc<dyn DmaMapper>>) -> Self {
        Mapper {
            state: Arc::default(),
            changed: Arc::new(Condvar::new()),
            notifier,
            dma,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the tables consistent (every mutation is a single step), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a region; its file must stay open for as long as the region exists.
    pub fn add_region(&self, desc: RegionDesc) -> Result<RegionId> {
        if let Some(m) = desc.mapping {
            if (m.len as u64) < desc.size {
                return Err(MapperError::Invalid(format!(
                    "mapping of {:#x} bytes is smaller than the region ({:#x})",
                    m.len, desc.size
                )));
            }
        }
        desc.file_offset
            .checked_add(desc.size)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| MapperError::OutOfRange("region end overflows".into()))?;
        let mut st = self.lock();
        let id = RegionId(st.next_id());
        tracing::debug!(%id, kind = %desc.kind, size = desc.size, "region added");
        st.regions.insert(id, Region::new(desc));
        Ok(id)
    }

    /// Removes a region that has no leases, pins or transient pins left (EBUSY otherwise).
    pub fn remove_region(&self, region: RegionId) -> Result<()> {
        let mut st = self.lock();
        let reg = st.region(region)?;
        if !reg.leases.is_empty() || !reg.pins.is_empty() || !reg.transients.is_empty() {
            return Err(MapperError::RegionBusy {
                leases: reg.leases.len(),
                pins: reg.pins.len(),
            });
        }
        st.regions.remove(&region);
        Ok(())
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn check_owner(&self, owner: OwnerId) -> Result<&Owner> {
        if owner == OwnerId::NONE {
            return Err(MapperError::NoOwner);
        }
        self.owners
            .get(&owner)
            .ok_or_else(|| MapperError::NotFound(format!("{owner}")))
    }

    fn owner_name(&self, owner: OwnerId) -> String {
        self.owners
            .get(&owner)
            .map(|o| o.name.clone())
            .unwrap_or_default()
    }

    fn region(&self, id: RegionId) -> Result<&Region> {
        self.regions
            .get(&id)
            .ok_or_else(|| MapperError::NotFound(format!("{id}")))
    }

    fn region_mut(&mut self, id: RegionId) -> Result<&mut Region> {
        self.regions
            .get_mut(&id)
            .ok_or_else(|| MapperError::NotFound(format!("{id}")))
    }

    fn insert_lease(&mut self, id: LeaseId, lease: Lease) {
        if let Some(r) = self.regions.get_mut(&lease.region) {
            r.leases.insert(lease.range, id.0);
        }
        if let Some(o) = self.owners.get_mut(&lease.owner) {
            o.leases.insert(id);
        }
        self.leases.insert(id, lease);
    }

    /// Forgets a lease everywhere (table, region index, owner).
    fn drop_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let l = self.leases.remove(&id)?;
        if let Some(r) = self.regions.get_mut(&l.region) {
            r.leases.remove(l.range, id.0);
        }
        if let Some(o) = self.owners.get_mut(&l.owner) {
            o.leases.remove(&id);
        }
        Some(l)
    }

    /// Forgets a pin everywhere, tearing down its DMA mapping before its mlock: the device must lose access
    /// before the pages may move.
    fn drop_pin(&mut self, id: PinId, dma: Option<&dyn DmaMapper>) -> Option<Pin> {
        let p = self.pins.remove(&id)?;
        if let Some(r) = self.regions.get_mut(&p.region) {
            r.pins.remove(p.range, id.0);
        }
        if let Some(o) = self.owners.get_mut(&p.owner) {
            o.pins.remove(&id);
        }
        p.teardown(dma);
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::test_files::TestRegion;
    use crate::pmem::BackingKind;

    #[test]
    fn region_validation_and_removal() {
        let t = TestRegion::on_tmp(4);
        let m = &t.mapper;
        let mut desc = m.lock().region(t.region).unwrap().desc.clone();
        desc.size = desc.mapping.unwrap().len as u64 * 2;
        assert_eq!(
            m.add_region(desc.clone()).unwrap_err().errno(),
            libc::EINVAL
        );
        desc.mapping = None;
        desc.file_offset = u64::MAX - 1;
        assert_eq!(
            m.add_region(desc.clone()).unwrap_err().errno(),
            libc::ERANGE
        );
        desc.file_offset = 0;
        desc.kind = BackingKind::Regular;
        let r = m.add_region(desc).unwrap();
        let o = m.add_owner("a");
        let l = m.acquire(o, r, 0, 0, LeaseMode::Shared).unwrap();
        assert_eq!(m.remove_region(r).unwrap_err().errno(), libc::EBUSY);
        m.release(o, l).unwrap();
        m.remove_region(r).unwrap();
        assert_eq!(m.remove_region(r).unwrap_err().errno(), libc::ENOENT);
    }
}
