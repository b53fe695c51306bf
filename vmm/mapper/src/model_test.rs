//! Property test: random sequences of acquire / release / pin / unpin / layout change / owner exit on three
//! regions over ONE real file (ext4 under /tmp), with windows at nonzero offsets, overlapping windows, a gap no
//! window covers, and ranges reaching outside the windows; run against the real mapper and against a small
//! reference model written from the documented semantics. After every step the errno (or success), the
//! file's size and bytes (those outside every window never change), every lease and pin by owner with
//! region-relative ranges, the DMA mappings and the per-region index answers must agree with the model.
//!
//! Breaks use deadline 0 so that a step never waits: `fail` must give ETIMEDOUT with nothing changed, `revoke`
//! must remove the shared leases, strip the holders' DMA mappings on the file and apply the change.

use std::time::Duration;

use proptest::prelude::*;

use crate::test_files::{TestRegion, TEST_IOVA};
use crate::*;

const FILE_PAGES: u64 = 32;
const OWNERS: usize = 3;
/// (first page, pages) of each region: [0,12), [8,20) overlapping it, a gap [20,24), and [24,32) the tail.
const WINDOWS: [(u64, u64); 3] = [(0, 12), (8, 12), (24, 8)];
const GAP: (u64, u64) = (20, 24);

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        owner: usize,
        region: usize,
        page: u64,
        pages: u64,
        exclusive: bool,
    },
    Release {
        owner: usize,
        nth: usize,
    },
    Pin {
        owner: usize,
        region: usize,
        page: u64,
        pages: u64,
    },
    Unpin {
        owner: usize,
        nth: usize,
    },
    Change {
        requester: Option<usize>,
        region: usize,
        kind: u8,
        page: u64,
        pages: u64,
        revoke: bool,
    },
    OwnerExit {
        owner: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let owner = 0..OWNERS;
    let region = 0..WINDOWS.len();
    prop_oneof![
        4 => (owner.clone(), region.clone(), 0..16u64, 0..6u64, any::<bool>())
            .prop_map(|(owner, region, page, pages, exclusive)| Op::Acquire { owner, region, page, pages, exclusive }),
        2 => (owner.clone(), 0..8usize).prop_map(|(owner, nth)| Op::Release { owner, nth }),
        3 => (owner.clone(), region.clone(), 0..14u64, 1..5u64)
            .prop_map(|(owner, region, page, pages)| Op::Pin { owner, region, page, pages }),
        2 => (owner.clone(), 0..8usize).prop_map(|(owner, nth)| Op::Unpin { owner, nth }),
        4 => (proptest::option::of(owner.clone()), region, 0..4u8, 0..16u64, 0..6u64, any::<bool>())
            .prop_map(|(requester, region, kind, page, pages, revoke)| Op::Change { requester, region, kind, page, pages, revoke }),
        1 => owner.prop_map(|owner| Op::OwnerExit { owner }),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MLease {
    id: LeaseId,
    owner: usize,
    region: usize,
    /// File pages.
    range: ByteRange,
    exclusive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MPin {
    id: PinId,
    owner: usize,
    region: usize,
    /// File pages.
    range: ByteRange,
    lease: LeaseId,
    dma: bool,
}

/// The reference: plain vectors, linear scans, bytes per page; ranges in file pages.
struct Model {
    alive: [bool; OWNERS],
    leases: Vec<MLease>,
    pins: Vec<MPin>,
    /// One byte per file page (pages are uniform) and whether the page has written blocks.
    pages: Vec<(u8, bool)>,
}

impl Model {
    fn holds(&self, range: ByteRange, requester: Option<usize>) -> Option<i32> {
        let pins: Vec<&MPin> = self
            .pins
            .iter()
            .filter(|p| p.range.overlaps(&range))
            .collect();
        if pins.iter().any(|p| Some(p.owner) == requester) {
            return Some(libc::EDEADLK);
        }
        if !pins.is_empty() {
            return Some(libc::ETXTBSY);
        }
        let ex: Vec<&MLease> = self
            .leases
            .iter()
            .filter(|l| l.exclusive && l.range.overlaps(&range))
            .collect();
        if ex.iter().any(|l| Some(l.owner) == requester) {
            return Some(libc::EDEADLK);
        }
        if !ex.is_empty() {
            return Some(libc::ETXTBSY);
        }
        None
    }

    /// A region-relative request in file pages, or ERANGE.
    fn window_range(region: usize, page: u64, pages: u64) -> std::result::Result<ByteRange, i32> {
        let (base, size) = WINDOWS[region];
        let end = if pages == 0 { size } else { page + pages };
        if page >= size || end > size {
            return Err(libc::ERANGE);
        }
        Ok(ByteRange::new(base + page, base + end))
    }

    /// Shrink/grow preconditions: the window holds the file's tail, and the direction is right.
    fn tail(&self, region: usize, kind: u8, new_size: u64) -> std::result::Result<u64, i32> {
        let (base, size) = WINDOWS[region];
        let len = self.pages.len() as u64;
        if len < base || len > base + size {
            return Err(libc::EINVAL);
        }
        let cur = len - base;
        if (kind == 2 && new_size > cur) || (kind == 3 && new_size < cur) {
            return Err(libc::EINVAL);
        }
        if new_size > size {
            return Err(libc::ERANGE);
        }
        Ok(cur)
    }
}

struct Harness {
    t: TestRegion,
    regions: [RegionId; 3],
    owners: [OwnerId; OWNERS],
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let t = TestRegion::on_tmp(WINDOWS[0].1);
        // Grow the test file to its full length, every page written with its own byte.
        let pg = t.page;
        for p in WINDOWS[0].1..FILE_PAGES {
            use std::os::unix::fs::FileExt;
            t.file
                .write_all_at(&vec![t.fill_byte(p * pg); pg as usize], p * pg)
                .unwrap();
        }
        t.file.sync_all().unwrap();
        let regions = [
            t.region,
            t.add_window(WINDOWS[1].0, WINDOWS[1].1),
            t.add_window(WINDOWS[2].0, WINDOWS[2].1),
        ];
        let owners = [
            t.mapper.add_owner("o0"),
            t.mapper.add_owner("o1"),
            t.mapper.add_owner("o2"),
        ];
        let pages = (0..FILE_PAGES)
            .map(|p| (t.fill_byte(p * t.page), true))
            .collect();
        Harness {
            t,
            regions,
            owners,
            model: Model {
                alive: [true; OWNERS],
                leases: vec![],
                pins: vec![],
                pages,
            },
        }
    }

    fn page(&self) -> u64 {
        self.t.page
    }

    /// File pages -> file bytes.
    fn bytes(&self, r: ByteRange) -> ByteRange {
        let pg = self.page();
        ByteRange::new(r.start * pg, r.end.saturating_mul(pg))
    }

    /// File pages -> bytes relative to `region`.
    fn relative(&self, region: usize, r: ByteRange) -> ByteRange {
        let base = WINDOWS[region].0;
        self.bytes(ByteRange::new(r.start - base, r.end - base))
    }

    fn iova(&self, region: usize, r: ByteRange) -> u64 {
        let pg = self.page();
        let (base, _) = WINDOWS[region];
        let region_iova = if region == 0 {
            TEST_IOVA
        } else {
            TEST_IOVA + (1 << 30) + base * pg
        };
        region_iova + (r.start - base) * pg
    }

    /// Applies `op` to both and returns (real errno or 0, model errno or 0).
    fn step(&mut self, op: &Op) -> (i32, i32) {
        let pg = self.page();
        let m = self.t.mapper.clone();
        let errno = |r: std::result::Result<(), MapperError>| r.err().map_or(0, |e| e.errno());
        match *op {
            Op::Acquire {
                owner,
                region,
                page,
                pages,
                exclusive,
            } => {
                let mode = if exclusive {
                    LeaseMode::Exclusive
                } else {
                    LeaseMode::Shared
                };
                let got = m.acquire(
                    self.owners[owner],
                    self.regions[region],
                    page * pg,
                    pages * pg,
                    mode,
                );
                let want = if !self.model.alive[owner] {
                    Err(libc::ENOENT)
                } else {
                    Model::window_range(region, page, pages)
                };
                if let (Ok(id), Ok(range)) = (&got, want) {
                    self.model.leases.push(MLease {
                        id: *id,
                        owner,
                        region,
                        range,
                        exclusive,
                    });
                }
                (errno(got.map(|_| ())), want.err().unwrap_or(0))
            }
            Op::Release { owner, nth } => {
                // Pick among all leases so that other owners' leases (EPERM) are tried too.
                let Some(l) = self
                    .model
                    .leases
                    .get(nth % self.model.leases.len().max(1))
                    .cloned()
                else {
                    return (0, 0);
                };
                let got = m.release(self.owners[owner], l.id);
                let want = if !self.model.alive[owner] {
                    libc::ENOENT
                } else if l.owner != owner {
                    libc::EPERM
                } else if self.model.pins.iter().any(|p| p.lease == l.id) {
                    libc::EBUSY
                } else {
                    self.model.leases.retain(|x| x.id != l.id);
                    0
                };
                (errno(got), want)
            }
            Op::Pin {
                owner,
                region,
                page,
                pages,
            } => {
                let got = m.pin(
                    self.owners[owner],
                    self.regions[region],
                    page * pg,
                    pages * pg,
                );
                let want = (|| {
                    if !self.model.alive[owner] {
                        return Err(libc::ENOENT);
                    }
                    let range = Model::window_range(region, page, pages)?;
                    if self.model.pins.iter().any(|p| p.range.overlaps(&range)) {
                        return Err(libc::EBUSY);
                    }
                    let covering = self
                        .model
                        .leases
                        .iter()
                        .filter(|l| l.owner == owner && l.exclusive && l.range.contains(&range))
                        .min_by_key(|l| (l.range.start, l.id))
                        .map(|l| l.id)
                        .ok_or(libc::EPERM)?;
                    if (range.start..range.end)
                        .any(|p| !self.model.pages.get(p as usize).is_some_and(|x| x.1))
                    {
                        return Err(libc::EINVAL);
                    }
                    Ok((range, covering))
                })();
                if let (Ok(id), Ok((range, lease))) = (&got, want) {
                    self.model.pins.push(MPin {
                        id: *id,
                        owner,
                        region,
                        range,
                        lease,
                        dma: true,
                    });
                }
                (errno(got.map(|_| ())), want.err().unwrap_or(0))
            }
            Op::Unpin { owner, nth } => {
                let Some(p) = self
                    .model
                    .pins
                    .get(nth % self.model.pins.len().max(1))
                    .cloned()
                else {
                    return (0, 0);
                };
                let got = m.unpin(self.owners[owner], p.id);
                let want = if !self.model.alive[owner] {
                    libc::ENOENT
                } else if p.owner != owner {
                    libc::EPERM
                } else {
                    self.model.pins.retain(|x| x.id != p.id);
                    0
                };
                (errno(got), want)
            }
            Op::OwnerExit { owner } => {
                let got = m.owner_exit(self.owners[owner]);
                let want = if self.model.alive[owner] {
                    self.model.alive[owner] = false;
                    self.model.leases.retain(|l| l.owner != owner);
                    self.model.pins.retain(|p| p.owner != owner);
                    0
                } else {
                    libc::ENOENT
                };
                (errno(got), want)
            }
            Op::Change {
                requester,
                region,
                kind,
                page,
                pages,
                revoke,
            } => {
                let change = match kind {
                    0 => LayoutChange::Punch {
                        off: page * pg,
                        len: pages * pg,
                    },
                    1 => LayoutChange::Zero {
                        off: page * pg,
                        len: pages * pg,
                    },
                    2 => LayoutChange::Shrink {
                        new_size: page * pg,
                    },
                    _ => LayoutChange::Grow {
                        new_size: page * pg,
                    },
                };
                let policy = if revoke {
                    BreakPolicy::Revoke
                } else {
                    BreakPolicy::Fail
                };
                let got = m.change(ChangeRequest {
                    requester: requester.map(|o| self.owners[o]),
                    deadline: Duration::ZERO,
                    policy,
                    ..ChangeRequest::new(self.regions[region], change)
                });
                let want = self.model_change(requester, region, kind, page, pages, revoke);
                (errno(got.map(|_| ())), want)
            }
        }
    }

    fn model_change(
        &mut self,
        requester: Option<usize>,
        region: usize,
        kind: u8,
        page: u64,
        pages: u64,
        revoke: bool,
    ) -> i32 {
        if requester.is_some_and(|o| !self.model.alive[o]) {
            return libc::ENOENT;
        }
        let base = WINDOWS[region].0;
        let range = match kind {
            0 | 1 => Model::window_range(region, page, pages),
            2 => self
                .model
                .tail(region, kind, page)
                .map(|_| ByteRange::new(base + page, OPEN_END)),
            _ => self.model.tail(region, kind, page).map(|_| {
                let len = self.model.pages.len() as u64;
                ByteRange::new(len.saturating_sub(1), OPEN_END)
            }),
        };
        let range = match range {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Some(e) = self.model.holds(range, requester) {
            return e;
        }
        let shared: Vec<MLease> = self
            .model
            .leases
            .iter()
            .filter(|l| l.range.overlaps(&range) && Some(l.owner) != requester)
            .cloned()
            .collect();
        if !shared.is_empty() && !revoke {
            return libc::ETIMEDOUT;
        }
        for l in &shared {
            for p in self.model.pins.iter_mut().filter(|p| p.owner == l.owner) {
                p.dma = false;
            }
        }
        self.model.leases.retain(|l| !shared.contains(l));
        let p = &mut self.model.pages;
        let len = p.len() as u64;
        match kind {
            0 | 1 => {
                for i in range.start.min(len)..range.end.min(len) {
                    p[i as usize] = (0, false);
                }
            }
            2 => p.truncate((base + page) as usize),
            _ => p.resize((base + page) as usize, (0, false)),
        }
        0
    }

    /// Everything observable must match the model.
    fn check(&self, op: &Op) -> std::result::Result<(), TestCaseError> {
        let pg = self.page();
        let t = &self.t;
        let model = &self.model;
        prop_assert_eq!(
            t.file_size(),
            model.pages.len() as u64 * pg,
            "size after {:?}",
            op
        );
        let bytes = t.read_file(0, (model.pages.len() as u64 * pg) as usize);
        for (i, (b, _)) in model.pages.iter().enumerate() {
            let chunk = &bytes[i * pg as usize..(i + 1) * pg as usize];
            prop_assert!(
                chunk.iter().all(|x| x == b),
                "page {} content after {:?}",
                i,
                op
            );
        }
        // No change named on a region ever touches the gap no window covers.
        for p in GAP.0..GAP.1 {
            let b = t.read_file(p * pg, pg as usize);
            prop_assert!(
                b.iter().all(|x| *x == t.fill_byte(p * pg)),
                "page {} outside every window changed after {:?}",
                p,
                op
            );
        }
        let snap = t.mapper.snapshot();
        let mut got_leases: Vec<(OwnerId, LeaseId, RegionId, ByteRange, LeaseMode)> = snap
            .leases()
            .into_iter()
            .map(|(o, l)| (o, l.id, l.region, l.range, l.mode))
            .collect();
        let mut want_leases: Vec<(OwnerId, LeaseId, RegionId, ByteRange, LeaseMode)> = model
            .leases
            .iter()
            .map(|l| {
                let mode = if l.exclusive {
                    LeaseMode::Exclusive
                } else {
                    LeaseMode::Shared
                };
                (
                    self.owners[l.owner],
                    l.id,
                    self.regions[l.region],
                    self.relative(l.region, l.range),
                    mode,
                )
            })
            .collect();
        got_leases.sort_by_key(|x| x.1);
        want_leases.sort_by_key(|x| x.1);
        prop_assert_eq!(got_leases, want_leases, "leases after {:?}", op);
        let mut got_pins: Vec<(OwnerId, PinId, RegionId, ByteRange, Option<LeaseId>, bool)> = snap
            .pins()
            .into_iter()
            .map(|(o, p)| (o, p.id, p.region, p.range, p.lease, p.dma.is_some()))
            .collect();
        let mut want_pins: Vec<(OwnerId, PinId, RegionId, ByteRange, Option<LeaseId>, bool)> =
            model
                .pins
                .iter()
                .map(|p| {
                    (
                        self.owners[p.owner],
                        p.id,
                        self.regions[p.region],
                        self.relative(p.region, p.range),
                        Some(p.lease),
                        p.dma,
                    )
                })
                .collect();
        got_pins.sort_by_key(|x| x.1);
        want_pins.sort_by_key(|x| x.1);
        prop_assert_eq!(got_pins, want_pins, "pins after {:?}", op);
        let mut want_dma: Vec<(u64, u64)> = model
            .pins
            .iter()
            .filter(|p| p.dma)
            .map(|p| (self.iova(p.region, p.range), self.bytes(p.range).len()))
            .collect();
        want_dma.sort();
        let got_dma: Vec<(u64, u64)> = t
            .dma
            .mappings()
            .into_iter()
            .map(|(i, _, l)| (i, l))
            .collect();
        prop_assert_eq!(got_dma, want_dma, "DMA after {:?}", op);
        // Each region's index answers like a scan of the model, and refuses queries outside its window.
        for (ri, region) in self.regions.iter().enumerate() {
            for (s, l) in [(0, 1), (3, 4), (6, 0), (0, 0), (11, 3), (14, 1)] {
                let got = t.mapper.lease_holders(*region, s * pg, l * pg);
                match Model::window_range(ri, s, l) {
                    Err(e) => prop_assert_eq!(got.map(|_| ()).unwrap_err().errno(), e),
                    Ok(q) => {
                        let mut got: Vec<LeaseId> = got.unwrap().into_iter().map(|x| x.0).collect();
                        let mut want: Vec<LeaseId> = model
                            .leases
                            .iter()
                            .filter(|x| x.range.overlaps(&q))
                            .map(|x| x.id)
                            .collect();
                        got.sort();
                        want.sort();
                        prop_assert_eq!(got, want, "region {} query {} after {:?}", ri, q, op);
                    }
                }
            }
        }
        prop_assert!(snap.breaks.is_empty());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn mapper_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut h = Harness::new();
        for op in &ops {
            let (got, want) = h.step(op);
            prop_assert_eq!(
                errno_name(got), errno_name(want), "errno for {:?} (got {}, want {})", op, got, want
            );
            h.check(op)?;
        }
    }
}
