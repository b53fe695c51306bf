//! Interval index: who holds what in a region. Entries are kept sorted by (start, id) in blocks of at most a few
//! hundred, with a contiguous array of each block's first key (binary search) and a segment tree over each
//! block's largest end. An overlap query binary-searches the blocks that start before the query's end, walks the
//! segment tree down to the blocks whose largest end lies after the query's start, and scans only those; insert
//! and remove touch one block and one tree path. So acquire, lookup and the break fan-out cost
//! O(log n + B + k) for block size B, and with blocks contiguous in memory a query costs a handful of cache
//! misses at a million leases, where a pointer tree costs one per level (DESIGN.md: 1M leases without
//! degradation; `cargo bench --bench mapper` prints the growth).
//!
//! Splitting or merging a block rebuilds the segment tree (O(n / B)); that happens at most once per B / 2
//! inserts or removes, so it adds O(n / B^2) amortized: under 16 at a million leases with B = 256.
//!
//! Inside a block, a query does not binary-search the entries themselves (a 6 KiB array that, at a million
//! leases, is never in cache: one DRAM miss per probe). Each block carries, inline next to its bounds, the
//! start of every [`SEG`]th entry (its fences, a few cache lines that stay cached with the block table); a query
//! searches the fences and then reads one run of [`SEG`] adjacent entries: one miss instead of six or seven.

use std::ops::ControlFlow;

use super::range::ByteRange;

const MAX_BLOCK: usize = 256;
/// Entries per fence (see the module docs): a run of SEG entries is 192 bytes, three adjacent cache lines.
const SEG: usize = 8;
/// Fences a block holds: one per SEG entries of a full block, plus the entry an insert adds before the split.
const FENCES: usize = (MAX_BLOCK + 1).div_ceil(SEG);

#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    id: u64,
    end: u64,
}

impl Entry {
    fn key(&self) -> (u64, u64) {
        (self.start, self.id)
    }
}

#[derive(Clone, Debug)]
struct Block {
    entries: Vec<Entry>,
    max_end: u64,
    /// Longest entry: a query only needs entries starting at or after `q.start - max_len`, which a binary
    /// search finds (open-ended leases make this the whole block, which is still correct).
    max_len: u64,
    /// `fences[s]` = start of entry `s * SEG`, for the segments that exist.
    fences: [u64; FENCES],
}

impl Block {
    fn new(entries: Vec<Entry>) -> Self {
        let mut b = Block {
            entries,
            max_end: 0,
            max_len: 0,
            fences: [0; FENCES],
        };
        b.recompute();
        b
    }

    /// Re-read the fences after entries moved.
    fn refence(&mut self) {
        self.refence_from(0);
    }

    /// Re-read the fences of the entries from `pos` on (an insert or remove at `pos` moved only those, and
    /// its memmove just brought them into cache).
    fn refence_from(&mut self, pos: usize) {
        let first = pos / SEG;
        let fences = self.fences.iter_mut().skip(first);
        for (f, e) in fences.zip(self.entries.iter().skip(first * SEG).step_by(SEG)) {
            *f = e.start;
        }
    }

    /// Index of the first entry whose start is >= `from` (what `partition_point` over the entries gives),
    /// reading the fences and one run of SEG entries.
    fn lower_bound(&self, from: u64) -> usize {
        let segs = self.entries.len().div_ceil(SEG);
        let s = self.fences[..segs].partition_point(|f| *f < from);
        if s == 0 {
            return 0;
        }
        let lo = (s - 1) * SEG;
        let hi = (s * SEG).min(self.entries.len());
        lo + self.entries[lo..hi].partition_point(|e| e.start < from)
    }

    /// Index of the first entry whose key is >= `key` (where an insert goes, or where a present key is),
    /// reading the fences and the run(s) of entries that share `key.0` as their start: one run unless many
    /// entries start at the same offset.
    fn position(&self, key: (u64, u64)) -> usize {
        let segs = self.entries.len().div_ceil(SEG);
        let fences = &self.fences[..segs];
        let first = fences.partition_point(|f| *f < key.0);
        let past = first + fences[first..].partition_point(|f| *f <= key.0);
        let lo = first.saturating_sub(1) * SEG;
        let hi = (past * SEG).min(self.entries.len());
        lo + self.entries[lo..hi].partition_point(|e| e.key() < key)
    }

    fn recompute(&mut self) {
        self.refence();
        self.max_end = self.entries.iter().map(|e| e.end).max().unwrap_or(0);
        self.max_len = self
            .entries
            .iter()
            .map(|e| e.end - e.start)
            .max()
            .unwrap_or(0);
    }

    fn add(&mut self, e: &Entry) {
        self.max_end = self.max_end.max(e.end);
        self.max_len = self.max_len.max(e.end - e.start);
    }
}

#[derive(Debug)]
/// Ranges with ids, answering "which overlap this range" in O(log n + k) (see the module docs).
pub struct IntervalIndex {
    /// First key of each block, contiguous for the binary search.
    firsts: Vec<(u64, u64)>,
    blocks: Vec<Block>,
    /// Segment tree of `max_end` over blocks: leaf `i` at `cap + i`, parents are maxima.
    seg: Vec<u64>,
    cap: usize,
    len: usize,
    max_block: usize,
}

impl Default for IntervalIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl IntervalIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::with_block_size(MAX_BLOCK)
    }

    /// Small blocks exercise splits and merges in tests.
    pub fn with_block_size(max_block: usize) -> Self {
        IntervalIndex {
            firsts: Vec::new(),
            blocks: Vec::new(),
            seg: vec![0; 2],
            cap: 1,
            len: 0,
            max_block: max_block.clamp(2, MAX_BLOCK),
        }
    }

    /// Entries in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block whose key range holds `key` (the last block whose first key is <= key, or block 0).
    fn locate(&self, key: (u64, u64)) -> usize {
        self.firsts.partition_point(|f| *f <= key).saturating_sub(1)
    }

    fn rebuild(&mut self) {
        self.cap = self.blocks.len().next_power_of_two().max(1);
        self.seg = vec![0; 2 * self.cap];
        for (i, b) in self.blocks.iter().enumerate() {
            self.seg[self.cap + i] = b.max_end;
        }
        for p in (1..self.cap).rev() {
            self.seg[p] = self.seg[2 * p].max(self.seg[2 * p + 1]);
        }
    }

    fn seg_update(&mut self, i: usize) {
        let mut p = self.cap + i;
        self.seg[p] = self.blocks[i].max_end;
        while p > 1 {
            p /= 2;
            self.seg[p] = self.seg[2 * p].max(self.seg[2 * p + 1]);
        }
    }

    /// Adds `[range)` under `id`; (start, id) pairs must be unique per index.
    pub fn insert(&mut self, range: ByteRange, id: u64) {
        let e = Entry {
            start: range.start,
            id,
            end: range.end,
        };
        self.len += 1;
        if self.blocks.is_empty() {
            self.blocks.push(Block::new(vec![e]));
            self.firsts.push(e.key());
            self.rebuild();
            return;
        }
        let i = self.locate(e.key());
        let b = &mut self.blocks[i];
        let pos = b.position(e.key());
        b.entries.insert(pos, e);
        b.add(&e);
        b.refence_from(pos);
        if pos == 0 {
            self.firsts[i] = e.key();
        }
        if self.blocks[i].entries.len() > self.max_block {
            let tail = self.blocks[i].entries.split_off(self.max_block / 2);
            self.blocks[i].recompute();
            let nb = Block::new(tail);
            self.firsts.insert(i + 1, nb.entries[0].key());
            self.blocks.insert(i + 1, nb);
            self.rebuild();
        } else {
            self.seg_update(i);
        }
    }

    /// Removes the entry `id` that was inserted with `range.start`. Returns whether it was there.
    pub fn remove(&mut self, range: ByteRange, id: u64) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let key = (range.start, id);
        let i = self.locate(key);
        let b = &mut self.blocks[i];
        let pos = b.position(key);
        if b.entries.get(pos).map(Entry::key) != Some(key) {
            return false;
        }
        let gone = b.entries.remove(pos);
        self.len -= 1;
        if gone.end == b.max_end || gone.end - gone.start == b.max_len {
            b.recompute();
        } else {
            b.refence_from(pos);
        }
        if b.entries.is_empty() {
            self.blocks.remove(i);
            self.firsts.remove(i);
            self.rebuild();
            return true;
        }
        if pos == 0 {
            self.firsts[i] = b.entries[0].key();
        }
        // Merge a block that fell to a quarter into its right neighbour when they fit together, so the block
        // count stays proportional to n.
        let n = b.entries.len();
        let small = n < self.max_block / 4;
        if small
            && i + 1 < self.blocks.len()
            && n + self.blocks[i + 1].entries.len() <= self.max_block
        {
            let next = self.blocks.remove(i + 1);
            self.firsts.remove(i + 1);
            let b = &mut self.blocks[i];
            b.entries.extend_from_slice(&next.entries);
            b.max_end = b.max_end.max(next.max_end);
            b.max_len = b.max_len.max(next.max_len);
            b.refence();
            self.rebuild();
        } else {
            self.seg_update(i);
        }
        true
    }

    /// Calls `f(range, id)` for every entry overlapping `q`, in start order, until it breaks.
    pub fn for_each_overlap<F>(&self, q: ByteRange, mut f: F)
    where
        F: FnMut(ByteRange, u64) -> ControlFlow<()>,
    {
        // Blocks from `hi` on start at or after q.end: nothing there can overlap.
        let hi = self.firsts.partition_point(|k| k.0 < q.end);
        if hi > 0 {
            let _ = self.descend(1, 0, self.cap, hi, q, &mut f);
        }
    }

    fn descend<F>(
        &self,
        node: usize,
        lo: usize,
        width: usize,
        hi: usize,
        q: ByteRange,
        f: &mut F,
    ) -> ControlFlow<()>
    where
        F: FnMut(ByteRange, u64) -> ControlFlow<()>,
    {
        if lo >= hi || self.seg[node] <= q.start {
            return ControlFlow::Continue(());
        }
        if width == 1 {
            let b = &self.blocks[lo];
            let first = b.lower_bound(q.start.saturating_sub(b.max_len));
            for e in &b.entries[first..] {
                if e.start >= q.end {
                    break;
                }
                if e.end > q.start {
                    f(ByteRange::new(e.start, e.end), e.id)?;
                }
            }
            return ControlFlow::Continue(());
        }
        let half = width / 2;
        self.descend(2 * node, lo, half, hi, q, f)?;
        self.descend(2 * node + 1, lo + half, half, hi, q, f)
    }

    /// The work an overlap query for `q` does, in memory locations touched: binary-search probes over the block
    /// keys, segment-tree nodes visited, and block entries probed or scanned. Wall-clock time at a million
    /// entries also pays for DRAM misses that 1k entries never see; this count is what O(log n + k) is about,
    /// and the benchmark prints both.
    pub fn query_work(&self, q: ByteRange) -> u64 {
        let probes = |n: usize| (usize::BITS - n.leading_zeros()) as u64;
        let hi = self.firsts.partition_point(|k| k.0 < q.end);
        let mut work = probes(self.firsts.len());
        if hi == 0 {
            return work;
        }
        let mut stack = vec![(1usize, 0usize, self.cap)];
        while let Some((node, lo, width)) = stack.pop() {
            work += 1;
            if lo >= hi || self.seg[node] <= q.start {
                continue;
            }
            if width == 1 {
                let b = &self.blocks[lo];
                let first = b.lower_bound(q.start.saturating_sub(b.max_len));
                work += probes(b.entries.len().div_ceil(SEG)) + probes(SEG);
                work += b.entries[first..]
                    .iter()
                    .take_while(|e| e.start < q.end)
                    .count() as u64
                    + 1;
                continue;
            }
            let half = width / 2;
            stack.push((2 * node + 1, lo + half, half));
            stack.push((2 * node, lo, half));
        }
        work
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

    /// Whether any entry overlaps `q`.
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
    #[allow(unused_imports)]
    use crate::*;
    use proptest::prelude::*;

    #[test]
    fn basic_overlap() {
        let mut ix = IntervalIndex::with_block_size(2);
        ix.insert(ByteRange::new(0, 10), 1);
        ix.insert(ByteRange::new(5, 20), 2);
        ix.insert(ByteRange::new(30, u64::MAX), 3);
        assert_eq!(ix.overlapping(ByteRange::new(9, 10)), vec![1, 2]);
        assert_eq!(ix.overlapping(ByteRange::new(10, 30)), vec![2]);
        assert_eq!(
            ix.overlapping(ByteRange::new(1 << 60, (1 << 60) + 1)),
            vec![3]
        );
        assert!(ix.remove(ByteRange::new(5, 20), 2));
        assert!(!ix.remove(ByteRange::new(5, 20), 2));
        assert_eq!(ix.overlapping(ByteRange::new(0, 100)), vec![1, 3]);
        assert_eq!(ix.len(), 2);
    }

    proptest! {
        /// The index answers exactly like a linear scan after any sequence of inserts and removes.
        #[test]
        fn matches_linear_scan(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>()), 1..300),
                               queries in proptest::collection::vec((0u64..80, 1u64..20), 1..20),
                               block in 2usize..9) {
            // Tiny blocks so that splits, merges and empty blocks all happen.
            let mut ix = IntervalIndex::with_block_size(block);
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
                // Results come in start order.
                let all = ix.overlapping(ByteRange::new(0, u64::MAX));
                let starts: Vec<u64> = all.iter().map(|id| model.iter().find(|(_, i)| i == id).unwrap().0.start).collect();
                prop_assert!(starts.windows(2).all(|w| w[0] <= w[1]));
                prop_assert_eq!(all.len(), model.len());
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
