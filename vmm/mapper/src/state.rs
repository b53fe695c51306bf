//! The mapper's tables and the helpers that keep them consistent. Every hold lives in three places (its own
//! table, its file's interval index, its owner's set); one insert and one remove helper per kind of hold keep
//! them in step.

use std::collections::HashMap;

use crate::breaks::BreakState;
use crate::dma::DmaMapper;
use crate::error::{MapperError, Missing, Result};
use crate::guard::{GuardCounts, GuardEvent};
use crate::host::FileKey;
use crate::ids::{BreakId, LeaseId, OwnerId, PinId, RegionId};
use crate::interval::IntervalIndex;
use crate::lease::Lease;
use crate::lease_table::LeaseTable;
use crate::owner::Owner;
use crate::pin::Pin;
use crate::range::ByteRange;
use crate::region::Region;

/// The holds on one file, in file offsets.
#[derive(Debug)]
pub(crate) struct FileHolds {
    /// Regions on this file; the entry goes with the last one.
    pub regions: usize,
    pub leases: IntervalIndex,
    pub pins: IntervalIndex,
    pub transients: IntervalIndex,
    pub breaks: IntervalIndex,
    /// Changes past their breaks, waiting for transient pins to drain: new transient pins queue behind them.
    pub draining: IntervalIndex,
}

impl FileHolds {
    fn new() -> Self {
        FileHolds {
            regions: 0,
            leases: IntervalIndex::new(),
            pins: IntervalIndex::new(),
            transients: IntervalIndex::new(),
            breaks: IntervalIndex::new(),
            draining: IntervalIndex::new(),
        }
    }

    /// A break or a draining change overlapping `range` (other than `except`), if any.
    pub fn busy(&self, range: ByteRange, except: Option<u64>) -> Option<ByteRange> {
        let mut found = None;
        for idx in [&self.breaks, &self.draining] {
            idx.for_each_overlap(range, |r, id| {
                if Some(id) == except {
                    return std::ops::ControlFlow::Continue(());
                }
                found = Some(r);
                std::ops::ControlFlow::Break(())
            });
            if found.is_some() {
                break;
            }
        }
        found
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    next: u64,
    pub owners: HashMap<OwnerId, Owner>,
    pub regions: HashMap<RegionId, Region>,
    pub files: HashMap<FileKey, FileHolds>,
    pub leases: LeaseTable,
    pub pins: HashMap<PinId, Pin>,
    pub breaks: HashMap<BreakId, BreakState>,
    /// Transient pins and draining changes: (file, file range).
    pub transients: HashMap<u64, (FileKey, ByteRange)>,
    pub draining: HashMap<u64, (FileKey, ByteRange)>,
    /// The latest host guard events, at most [`crate::guard::GUARD_HISTORY`], oldest first.
    pub guard_events: std::collections::VecDeque<GuardEvent>,
    /// Every host guard event ever, counted per region.
    pub guard_counts: HashMap<RegionId, GuardCounts>,
}

impl State {
    pub fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    pub fn check_owner(&self, owner: OwnerId) -> Result<&Owner> {
        if owner == OwnerId::NONE {
            return Err(MapperError::NoOwner);
        }
        self.owners
            .get(&owner)
            .ok_or(MapperError::NotFound(Missing::Owner(owner)))
    }

    pub fn owner_name(&self, owner: OwnerId) -> String {
        self.owners
            .get(&owner)
            .map(|o| o.name.clone())
            .unwrap_or_default()
    }

    pub fn region(&self, id: RegionId) -> Result<&Region> {
        self.regions
            .get(&id)
            .ok_or(MapperError::NotFound(Missing::Region(id)))
    }

    /// The holds of a region's file.
    pub fn holds(&self, region: &Region) -> Result<&FileHolds> {
        self.files
            .get(&region.key)
            .ok_or(MapperError::NotFound(Missing::Region(region.id)))
    }

    pub fn insert_region(&mut self, region: Region) {
        self.files
            .entry(region.key)
            .or_insert_with(FileHolds::new)
            .regions += 1;
        self.regions.insert(region.id, region);
    }

    pub fn remove_region(&mut self, id: RegionId) -> Option<Region> {
        let r = self.regions.remove(&id)?;
        if let Some(f) = self.files.get_mut(&r.key) {
            f.regions -= 1;
            if f.regions == 0 {
                self.files.remove(&r.key);
            }
        }
        Some(r)
    }

    /// Stores a new lease and returns its id (ENOSPC once the table has no slot left).
    pub fn insert_lease(&mut self, lease: Lease) -> Result<LeaseId> {
        let (key, range, owner) = (lease.key, lease.range, lease.owner);
        let pos = self.owners.get(&owner).map_or(0, |o| o.leases.len());
        let id = self
            .leases
            .insert(lease, pos)
            .ok_or(MapperError::TableFull { what: "lease" })?;
        if let Some(f) = self.files.get_mut(&key) {
            f.leases.insert(range, id.to_raw());
        }
        if let Some(o) = self.owners.get_mut(&owner) {
            o.leases.push(id);
        }
        Ok(id)
    }

    /// Forgets a lease everywhere (table, file index, owner).
    pub fn drop_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let (l, pos) = self.leases.remove(&id)?;
        if let Some(f) = self.files.get_mut(&l.key) {
            f.leases.remove(l.range, id.to_raw());
        }
        if let Some(o) = self.owners.get_mut(&l.owner) {
            if o.leases.get(pos) == Some(&id) {
                o.leases.swap_remove(pos);
                if let Some(moved) = o.leases.get(pos) {
                    self.leases.set_owner_pos(*moved, pos);
                }
            }
        }
        Some(l)
    }

    pub fn insert_pin(&mut self, id: PinId, pin: Pin) {
        if let Some(f) = self.files.get_mut(&pin.key) {
            f.pins.insert(pin.range, id.to_raw());
        }
        if let Some(o) = self.owners.get_mut(&pin.owner) {
            o.pins.insert(id);
        }
        self.pins.insert(id, pin);
    }

    /// Forgets a pin everywhere, tearing down its DMA mapping before its mlock: the device must lose access
    /// before the pages may move.
    pub fn drop_pin(&mut self, id: PinId, dma: Option<&dyn DmaMapper>) -> Option<Pin> {
        let p = self.pins.remove(&id)?;
        if let Some(f) = self.files.get_mut(&p.key) {
            f.pins.remove(p.range, id.to_raw());
        }
        if let Some(o) = self.owners.get_mut(&p.owner) {
            o.pins.remove(&id);
        }
        p.teardown(dma);
        Some(p)
    }

    pub fn insert_transient(&mut self, id: u64, key: FileKey, range: ByteRange) {
        if let Some(f) = self.files.get_mut(&key) {
            f.transients.insert(range, id);
        }
        self.transients.insert(id, (key, range));
    }

    pub fn drop_transient(&mut self, id: u64) {
        if let Some((key, range)) = self.transients.remove(&id) {
            if let Some(f) = self.files.get_mut(&key) {
                f.transients.remove(range, id);
            }
        }
    }

    pub fn insert_draining(&mut self, id: u64, key: FileKey, range: ByteRange) {
        if let Some(f) = self.files.get_mut(&key) {
            f.draining.insert(range, id);
        }
        self.draining.insert(id, (key, range));
    }

    pub fn drop_draining(&mut self, id: u64) {
        if let Some((key, range)) = self.draining.remove(&id) {
            if let Some(f) = self.files.get_mut(&key) {
                f.draining.remove(range, id);
            }
        }
    }

    pub fn insert_break(&mut self, id: BreakId, b: BreakState) {
        if let Some(f) = self.files.get_mut(&b.file) {
            f.breaks.insert(b.range, id.to_raw());
        }
        self.breaks.insert(id, b);
    }

    pub fn end_break(&mut self, id: BreakId) {
        if let Some(b) = self.breaks.remove(&id) {
            if let Some(f) = self.files.get_mut(&b.file) {
                f.breaks.remove(b.range, id.to_raw());
            }
        }
    }
}
