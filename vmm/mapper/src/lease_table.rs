//! The lease records: a slab (one `Vec` of slots, freed slots reused) whose slot number is part of the lease id,
//! so that finding a lease by id is one indexed load, and taking a lease writes a slot that is either the
//! slab's tail or one freed a moment ago (both in cache). A hash map keyed by id puts every new lease at a
//! random place of a table that, at a million leases, is far larger than the cache: that insert alone cost
//! several DRAM misses per acquire (`docs/performance.md`). Hand-written because the id has to carry the slot
//! and a generation (ids are never reused), which general slab crates do not expose as an id.
//!
//! Id layout: the low 32 bits are `slot + 1` (so no id is 0), the bits above the slot's generation, bumped
//! every time the slot is freed. A slot whose generation reaches [`MAX_GENERATION`] is retired, never reused:
//! an id names at most one lease ever, an id the table never handed out (or one already released) names
//! nothing, and ids stay below 2^53, exact in any JSON reader of the operator API.
//!
//! Each slot also keeps the lease's position in its owner's list (`Owner::leases`, a `Vec`): removal there is
//! a swap with the last one, whose position is updated here, with no hash set per owner.

use crate::ids::LeaseId;
use crate::lease::Lease;

/// The last generation a slot may have (21 bits above the 32 of the slot: ids below 2^53). A slot freed at
/// this generation is retired: one slot of memory per two million reuses.
const MAX_GENERATION: u32 = (1 << 21) - 1;

#[derive(Debug)]
struct Slot {
    generation: u32,
    /// Position of this lease in its owner's list.
    owner_pos: u32,
    lease: Option<Lease>,
}

/// Leases by id (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    slots: Vec<Slot>,
    /// Freed slots, reused last-freed first (the most likely to be in cache).
    free: Vec<u32>,
}

fn split(id: LeaseId) -> Option<(usize, u32)> {
    let raw = id.to_raw();
    let low = (raw & u64::from(u32::MAX)) as u32;
    let slot = low.checked_sub(1)?;
    Some((slot as usize, (raw >> 32) as u32))
}

fn join(slot: u32, generation: u32) -> LeaseId {
    LeaseId::from_raw((u64::from(generation) << 32) | (u64::from(slot) + 1))
}

impl LeaseTable {
    /// Stores `lease`, returning its new id; `None` once all 2^32 - 1 slots are in use (not reachable before
    /// memory runs out, but nothing here may panic).
    pub fn insert(&mut self, lease: Lease, owner_pos: usize) -> Option<LeaseId> {
        let owner_pos = u32::try_from(owner_pos).ok()?;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|s| *s < u32::MAX)?;
                self.slots.push(Slot {
                    generation: 0,
                    owner_pos: 0,
                    lease: None,
                });
                s
            }
        };
        let s = self.slots.get_mut(slot as usize)?;
        s.lease = Some(lease);
        s.owner_pos = owner_pos;
        Some(join(slot, s.generation))
    }

    fn slot(&self, id: LeaseId) -> Option<&Slot> {
        let (slot, generation) = split(id)?;
        self.slots
            .get(slot)
            .filter(|s| s.generation == generation && s.lease.is_some())
    }

    /// The lease `id` names, if it is held.
    pub fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.slot(*id)?.lease.as_ref()
    }

    /// Whether `id` names a held lease.
    pub fn contains_key(&self, id: &LeaseId) -> bool {
        self.slot(*id).is_some()
    }

    /// Records that `id` moved to `pos` in its owner's list.
    pub fn set_owner_pos(&mut self, id: LeaseId, pos: usize) {
        let Some((slot, generation)) = split(id) else {
            return;
        };
        if let (Some(s), Ok(pos)) = (self.slots.get_mut(slot), u32::try_from(pos)) {
            if s.generation == generation && s.lease.is_some() {
                s.owner_pos = pos;
            }
        }
    }

    /// Forgets `id`, returning the lease and its position in its owner's list; the slot's next lease gets a
    /// new id.
    pub fn remove(&mut self, id: &LeaseId) -> Option<(Lease, usize)> {
        let (slot, generation) = split(*id)?;
        let s = self.slots.get_mut(slot)?;
        if s.generation != generation {
            return None;
        }
        let lease = s.lease.take()?;
        let pos = s.owner_pos as usize;
        if s.generation < MAX_GENERATION {
            s.generation += 1;
            // `slot` came from the low 32 bits of an id.
            self.free.push(slot as u32);
        }
        Some((lease, pos))
    }

    /// Every held lease, with its id, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (LeaseId, &Lease)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let lease = s.lease.as_ref()?;
            Some((join(i as u32, s.generation), lease))
        })
    }

    /// Every held lease.
    pub fn values(&self) -> impl Iterator<Item = &Lease> {
        self.iter().map(|(_, l)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseMode;
    use crate::test_files::TestRegion;
    #[allow(unused_imports)]
    use crate::*;

    fn lease(start: u64) -> Lease {
        let t = TestRegion::on_tmp(1);
        let key = t.mapper.snapshot().regions[0].file;
        Lease {
            owner: OwnerId::from_raw(1),
            region: t.region,
            key,
            range: ByteRange::new(start, start + 4096),
            mode: LeaseMode::Shared,
        }
    }

    #[test]
    fn ids_are_never_reused_and_stale_or_foreign_ids_name_nothing() {
        let mut t = LeaseTable::default();
        let a = t.insert(lease(0), 0).unwrap();
        let b = t.insert(lease(4096), 1).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.get(&a).unwrap().range.start, 0);
        let (gone, pos) = t.remove(&a).unwrap();
        assert_eq!((gone.range.start, pos), (0, 0));
        assert!(t.remove(&a).is_none());
        // The freed slot is reused under a new id; the old id stays dead.
        let c = t.insert(lease(8192), 0).unwrap();
        assert_ne!(c, a);
        assert!(t.get(&a).is_none() && !t.contains_key(&a));
        assert_eq!(t.get(&c).unwrap().range.start, 8192);
        t.set_owner_pos(a, 7);
        assert_eq!(t.remove(&c).unwrap().1, 0, "a stale id moved nothing");
        let c = t.insert(lease(8192), 0).unwrap();
        for raw in [0, u64::from(u32::MAX), 999, (5 << 32) | 1] {
            assert!(t.get(&LeaseId::from_raw(raw)).is_none(), "{raw:#x}");
        }
        let mut ids: Vec<LeaseId> = t.iter().map(|(id, _)| id).collect();
        ids.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(ids, want);
    }

    #[test]
    fn a_slot_at_its_last_generation_is_retired() {
        let mut t = LeaseTable::default();
        assert_eq!(split(t.insert(lease(0), 0).unwrap()), Some((0, 0)));
        t.slots[0].generation = MAX_GENERATION;
        let a = join(0, MAX_GENERATION);
        assert!(a.to_raw() < 1 << 53);
        assert!(t.remove(&a).is_some());
        let b = t.insert(lease(0), 0).unwrap();
        assert_eq!(split(b), Some((1, 0)), "a new slot, not the retired one");
        assert!(t.get(&a).is_none());
    }
}
