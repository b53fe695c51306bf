//! Interval index: a treap keyed by (start, id) where every node also keeps the largest `end` in its subtree.
//! An overlap query skips any subtree whose max end is at or before the query start and stops going right once
//! starts pass the query end, so insert, remove and "who overlaps [a, b)" cost O(log n + k) expected; the lease
//! table of a region must stay fast at a million leases (DESIGN.md, performance targets).
//!
//! Nodes live in one arena (`Vec`) with a free list, so a million entries are a million small structs, not a
//! million allocations.

use std::ops::ControlFlow;

use super::range::ByteRange;

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Node {
    start: u64,
    end: u64,
    id: u64,
    max_end: u64,
    prio: u32,
    left: u32,
    right: u32,
}

#[derive(Debug)]
pub struct IntervalIndex {
    nodes: Vec<Node>,
    free: Vec<u32>,
    root: u32,
    len: usize,
    rng: u64,
}

impl Default for IntervalIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl IntervalIndex {
    pub fn new() -> Self {
        IntervalIndex { nodes: Vec::new(), free: Vec::new(), root: NIL, len: 0, rng: 0x9e37_79b9_7f4a_7c15 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn next_prio(&mut self) -> u32 {
        // xorshift64: the treap only needs priorities independent of the keys.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 32) as u32
    }

    fn key(&self, n: u32) -> (u64, u64) {
        let n = &self.nodes[n as usize];
        (n.start, n.id)
    }

    fn fix(&mut self, n: u32) {
        let (l, r) = (self.nodes[n as usize].left, self.nodes[n as usize].right);
        let mut m = self.nodes[n as usize].end;
        if l != NIL {
            m = m.max(self.nodes[l as usize].max_end);
        }
        if r != NIL {
            m = m.max(self.nodes[r as usize].max_end);
        }
        self.nodes[n as usize].max_end = m;
    }

    /// Splits `t` into keys `< key` and keys `>= key`.
    fn split(&mut self, t: u32, key: (u64, u64)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.key(t) < key {
            let (a, b) = self.split(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = a;
            self.fix(t);
            (t, b)
        } else {
            let (a, b) = self.split(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = b;
            self.fix(t);
            (a, t)
        }
    }

    /// Joins two treaps where every key of `a` is below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.fix(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.fix(b);
            b
        }
    }

    /// Adds `[range)` under `id`; ids must be unique per index.
    pub fn insert(&mut self, range: ByteRange, id: u64) {
        let prio = self.next_prio();
        let node =
            Node { start: range.start, end: range.end, id, max_end: range.end, prio, left: NIL, right: NIL };
        let n = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let (a, b) = self.split(self.root, (range.start, id));
        let a = self.merge(a, n);
        self.root = self.merge(a, b);
        self.len += 1;
    }

    /// Removes the entry `id` that was inserted with `range.start`. Returns whether it was there.
    pub fn remove(&mut self, range: ByteRange, id: u64) -> bool {
        let key = (range.start, id);
        let (a, rest) = self.split(self.root, key);
        // `rest` starts with `key` if present: split it again just past it. `start < end <= u64::MAX`, so
        // `start + 1` cannot overflow.
        let past = match id.checked_add(1) {
            Some(next) => (range.start, next),
            None => (range.start + 1, 0),
        };
        let (mid, b) = self.split(rest, past);
        let found = mid != NIL;
        if found {
            debug_assert_eq!(self.key(mid), key);
            self.free.push(mid);
            self.len -= 1;
            self.root = self.merge(a, b);
        } else {
            let r = self.merge(mid, b);
            self.root = self.merge(a, r);
        }
        found
    }

    /// Calls `f(range, id)` for every entry overlapping `q`, in start order, until it breaks.
    pub fn for_each_overlap<F>(&self, q: ByteRange, mut f: F)
    where
        F: FnMut(ByteRange, u64) -> ControlFlow<()>,
    {
        let _ = self.visit(self.root, q, &mut f);
    }

    fn visit<F>(&self, t: u32, q: ByteRange, f: &mut F) -> ControlFlow<()>
    where
        F: FnMut(ByteRange, u64) -> ControlFlow<()>,
    {
        if t == NIL {
            return ControlFlow::Continue(());
        }
        let n = &self.nodes[t as usize];
        if n.max_end <= q.start {
            return ControlFlow::Continue(());
        }
        self.visit(n.left, q, f)?;
        if n.start >= q.end {
            return ControlFlow::Continue(());
        }
        if n.end > q.start {
            f(ByteRange::new(n.start, n.end), n.id)?;
        }
        self.visit(n.right, q, f)
    }

    /// Ids overlapping `q`.
    pub fn overlapping(&self, q: ByteRange) -> Vec<u64> {
        let mut out = Vec::new();
        self.for_each_overlap(q, |_, id| {
            out.push(id);
            ControlFlow::Continue(())
        });
        out
    }

    pub fn any_overlap(&self, q: ByteRange) -> bool {
        let mut any = false;
        self.for_each_overlap(q, |_, _| {
            any = true;
            ControlFlow::Break(())
        });
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basic_overlap() {
        let mut ix = IntervalIndex::new();
        ix.insert(ByteRange::new(0, 10), 1);
        ix.insert(ByteRange::new(5, 20), 2);
        ix.insert(ByteRange::new(30, u64::MAX), 3);
        assert_eq!(ix.overlapping(ByteRange::new(9, 10)), vec![1, 2]);
        assert_eq!(ix.overlapping(ByteRange::new(10, 30)), vec![2]);
        assert_eq!(ix.overlapping(ByteRange::new(1 << 60, (1 << 60) + 1)), vec![3]);
        assert!(ix.remove(ByteRange::new(5, 20), 2));
        assert!(!ix.remove(ByteRange::new(5, 20), 2));
        assert_eq!(ix.overlapping(ByteRange::new(0, 100)), vec![1, 3]);
        assert_eq!(ix.len(), 2);
    }

    proptest! {
        /// The index answers exactly like a linear scan after any sequence of inserts and removes.
        #[test]
        fn matches_linear_scan(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>()), 1..200),
                               queries in proptest::collection::vec((0u64..80, 1u64..20), 1..20)) {
            let mut ix = IntervalIndex::new();
            let mut model: Vec<(ByteRange, u64)> = Vec::new();
            for (i, (s, l, del)) in ops.into_iter().enumerate() {
                if del && !model.is_empty() {
                    let (r, id) = model.remove((s as usize) % model.len());
                    prop_assert!(ix.remove(r, id));
                } else {
                    let r = ByteRange::new(s, s + l);
                    ix.insert(r, i as u64);
                    model.push((r, i as u64));
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            for (s, l) in queries {
                let q = ByteRange::new(s, s + l);
                let mut want: Vec<u64> = model.iter().filter(|(r, _)| r.overlaps(&q)).map(|(_, id)| *id).collect();
                let mut got = ix.overlapping(q);
                want.sort_unstable();
                got.sort_unstable();
                prop_assert_eq!(got, want);
            }
        }
    }
}
