//! Two values per block of the interval index, in key order: its first start and its largest end, with levels
//! above that summarize [`FAN`] blocks (or nodes) each: the first start of the run (a search descends by it)
//! and the largest end (the stabbing descent prunes by it). A node keeps the [`FAN`] starts and the [`FAN`]
//! ends of its children in one cache line, so a query reads one line per level and gets both; at a million
//! entries the block level takes 90 KiB and the levels above it 30 KiB (`docs/performance.md`). Nodes are
//! searched by counting, not bisecting: no data-dependent branch per probe.
//!
//! Hand-written because what a level keeps is index-specific and a block split or merge shifts positions,
//! which a crate's ordered map, keyed by value, cannot express without re-keying every later block.

/// Children per node: four starts and four ends fill one 64-byte line (eight in two lines measured no faster).
pub(super) const FAN: usize = 4;

/// A start no query counts (past every real start: a range's start is below its end).
const NO_START: u64 = u64::MAX;
/// An end no query counts (a query's start is never below 0).
const NO_END: u64 = 0;

/// One node: the starts and ends of up to `FAN` children, padded with `NO_START` / `NO_END`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(super) struct Node {
    pub starts: [u64; FAN],
    pub ends: [u64; FAN],
}

impl Node {
    const EMPTY: Node = Node {
        starts: [NO_START; FAN],
        ends: [NO_END; FAN],
    };

    /// How this node shows in the level above.
    fn summary(&self) -> (u64, u64) {
        (
            self.starts[0],
            self.ends.iter().copied().max().unwrap_or(NO_END),
        )
    }

    /// How many starts satisfy `pred` (which holds for a prefix, and never for `NO_START`).
    pub fn count_starts(&self, pred: impl Fn(u64) -> bool) -> usize {
        self.starts.iter().map(|s| usize::from(pred(*s))).sum()
    }

    /// Bit `c` set when child `c`'s largest end is after `from`.
    pub fn ends_after(&self, from: u64) -> u32 {
        self.ends
            .iter()
            .enumerate()
            .fold(0, |m, (c, e)| m | (u32::from(*e > from) << c))
    }
}

#[derive(Clone, Debug, Default)]
struct Level {
    nodes: Vec<Node>,
    len: usize,
}

impl Level {
    fn get(&self, i: usize) -> (u64, u64) {
        let n = &self.nodes[i / FAN];
        (n.starts[i % FAN], n.ends[i % FAN])
    }

    fn set(&mut self, i: usize, (start, end): (u64, u64)) {
        let n = &mut self.nodes[i / FAN];
        n.starts[i % FAN] = start;
        n.ends[i % FAN] = end;
    }

    fn push(&mut self, v: (u64, u64)) {
        if self.len % FAN == 0 {
            self.nodes.push(Node::EMPTY);
        }
        self.len += 1;
        self.set(self.len - 1, v);
    }

    fn insert(&mut self, i: usize, v: (u64, u64)) {
        self.push(v);
        for j in (i + 1..self.len).rev() {
            self.set(j, self.get(j - 1));
        }
        self.set(i, v);
    }

    fn remove(&mut self, i: usize) {
        for j in i..self.len - 1 {
            self.set(j, self.get(j + 1));
        }
        self.len -= 1;
        if self.len % FAN == 0 {
            self.nodes.pop();
        } else {
            self.set(self.len, (NO_START, NO_END));
        }
    }
}

/// Per-block first starts and largest ends with their summary levels (see the module docs).
#[derive(Clone, Debug)]
pub(super) struct Summary {
    /// `levels[0]`: one pair per block; `levels[k + 1]` entry `n` summarizes node `n` of `levels[k]`; the top
    /// level has at most `FAN` entries (one node).
    levels: Vec<Level>,
}

impl Summary {
    pub fn new() -> Self {
        Summary {
            levels: vec![Level::default()],
        }
    }

    /// Blocks.
    pub fn len(&self) -> usize {
        self.levels[0].len
    }

    /// Block `i`'s (first start, largest end).
    pub fn get(&self, i: usize) -> (u64, u64) {
        self.levels[0].get(i)
    }

    /// Index of the top level.
    pub fn top(&self) -> usize {
        self.levels.len() - 1
    }

    /// Entries at level `k` (level 0 = one per block).
    #[cfg(test)]
    pub fn level_len(&self, k: usize) -> usize {
        self.levels[k].len
    }

    /// Node `n` of level `k`.
    pub fn node(&self, k: usize, n: usize) -> &Node {
        &self.levels[k].nodes[n]
    }

    /// Recomputes the levels above the blocks (after a block came or went: O(blocks / FAN)).
    fn rebuild(&mut self) {
        self.levels.truncate(1);
        while self.levels[self.levels.len() - 1].len > FAN {
            let below = &self.levels[self.levels.len() - 1];
            let mut up = Level::default();
            for n in &below.nodes {
                up.push(n.summary());
            }
            self.levels.push(up);
        }
    }

    /// Sets block `i`'s pair and the one summary per level above it.
    pub fn update(&mut self, i: usize, v: (u64, u64)) {
        self.levels[0].set(i, v);
        let mut n = i / FAN;
        for k in 1..self.levels.len() {
            let up = self.levels[k - 1].nodes[n].summary();
            self.levels[k].set(n, up);
            n /= FAN;
        }
    }

    /// A new block at position `i`.
    pub fn insert(&mut self, i: usize, v: (u64, u64)) {
        self.levels[0].insert(i, v);
        self.rebuild();
    }

    /// Block `i` went.
    pub fn remove(&mut self, i: usize) {
        self.levels[0].remove(i);
        self.rebuild();
    }

    /// How many blocks' first starts satisfy `pred`, which must hold for a prefix of them and never for
    /// `u64::MAX`: one node per level, top down. `work` counts the nodes read.
    pub fn count_starts(&self, pred: impl Fn(u64) -> bool, work: &mut u64) -> usize {
        if self.len() == 0 {
            return 0;
        }
        let top = self.top();
        *work += 1;
        let mut p = self.levels[top].nodes[0].count_starts(&pred);
        for k in (0..top).rev() {
            // Entry p - 1 of the level above starts inside the prefix and entry p (if any) does not: the
            // prefix ends in node p - 1 of this level.
            let Some(n) = p.checked_sub(1) else {
                return 0;
            };
            *work += 1;
            p = n * FAN + self.levels[k].nodes[n].count_starts(&pred);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every level summarizes the one below after any inserts, removes and updates, and the prefix count
        /// matches a linear count.
        #[test]
        fn levels_stay_consistent(ops in proptest::collection::vec((0usize..600, 0u64..1000, 0u64..1000, 0u8..3), 1..400)) {
            let mut s = Summary::new();
            let mut model: Vec<(u64, u64)> = Vec::new();
            for (at, a, b, op) in &ops {
                match op {
                    0 => {
                        let i = at % (model.len() + 1);
                        model.insert(i, (*a, *b));
                        s.insert(i, (*a, *b));
                    }
                    1 if !model.is_empty() => {
                        let i = at % model.len();
                        model.remove(i);
                        s.remove(i);
                    }
                    _ if !model.is_empty() => {
                        let i = at % model.len();
                        model[i] = (*a, *b);
                        s.update(i, (*a, *b));
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(s.len(), model.len());
            prop_assert!(s.level_len(s.top()) <= FAN);
            for (i, v) in model.iter().enumerate() {
                prop_assert_eq!(s.get(i), *v);
            }
            for k in 1..=s.top() {
                for n in 0..s.level_len(k) {
                    let below: Vec<(u64, u64)> = (n * FAN..((n + 1) * FAN).min(s.level_len(k - 1)))
                        .map(|i| s.levels[k - 1].get(i))
                        .collect();
                    let want = (below[0].0, below.iter().map(|v| v.1).max().unwrap_or(0));
                    prop_assert_eq!(s.levels[k].get(n), want);
                }
            }
            let mut sorted = model.clone();
            sorted.sort_unstable();
            let mut s = Summary::new();
            for (i, v) in sorted.iter().enumerate() {
                s.insert(i, *v);
            }
            for x in [0, 1, 500, 999, 1000] {
                let mut work = 0;
                prop_assert_eq!(s.count_starts(|v| v < x, &mut work), sorted.iter().filter(|v| v.0 < x).count());
                prop_assert_eq!(s.count_starts(|v| v <= x, &mut work), sorted.iter().filter(|v| v.0 <= x).count());
            }
        }
    }
}
