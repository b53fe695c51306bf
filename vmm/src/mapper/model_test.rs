//! Property test: random sequences of acquire / release / pin / unpin / layout change / owner exit, run against
//! the real mapper on a real file (ext4 under /tmp) and against a small reference model written from DESIGN.md.
//! After every step the errno (or success), the file's size and bytes, every lease and pin by owner, the DMA
//! mappings and the interval index's answers must agree with the model.
//!
//! Breaks use deadline 0 so that a step never waits: `fail` must give ETIMEDOUT with nothing changed, `revoke`
//! must remove the shared leases, strip the holders' DMA mappings and apply the change.

use std::time::Duration;

use proptest::prelude::*;

use super::layout_change::{ChangeRequest, LayoutChange};
use super::test_files::TestRegion;
use super::*;

const PAGES: u64 = 24;
const OWNERS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        owner: usize,
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
        page: u64,
        pages: u64,
    },
    Unpin {
        owner: usize,
        nth: usize,
    },
    Change {
        requester: Option<usize>,
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
    prop_oneof![
        4 => (owner.clone(), 0..PAGES + 4, 0..6u64, any::<bool>())
            .prop_map(|(owner, page, pages, exclusive)| Op::Acquire { owner, page, pages, exclusive }),
        2 => (owner.clone(), 0..8usize).prop_map(|(owner, nth)| Op::Release { owner, nth }),
        3 => (owner.clone(), 0..PAGES + 2, 1..5u64).prop_map(|(owner, page, pages)| Op::Pin { owner, page, pages }),
        2 => (owner.clone(), 0..8usize).prop_map(|(owner, nth)| Op::Unpin { owner, nth }),
        4 => (proptest::option::of(owner.clone()), 0..4u8, 0..PAGES + 4, 0..6u64, any::<bool>())
            .prop_map(|(requester, kind, page, pages, revoke)| Op::Change { requester, kind, page, pages, revoke }),
        1 => owner.prop_map(|owner| Op::OwnerExit { owner }),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MLease {
    id: LeaseId,
    owner: usize,
    range: ByteRange,
    exclusive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MPin {
    id: PinId,
    owner: usize,
    range: ByteRange,
    lease: LeaseId,
    dma: bool,
}

/// The reference: plain vectors, linear scans, bytes per page.
struct Model {
    alive: [bool; OWNERS],
    leases: Vec<MLease>,
    pins: Vec<MPin>,
    /// One byte per page (the files' pages are uniform) and whether the page has written blocks.
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
}

struct Harness {
    t: TestRegion,
    owners: [OwnerId; OWNERS],
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let t = TestRegion::on_tmp(PAGES);
        let owners = [
            t.mapper.add_owner("o0"),
            t.mapper.add_owner("o1"),
            t.mapper.add_owner("o2"),
        ];
        let pages = (0..PAGES)
            .map(|p| (t.fill_byte(p * t.page), true))
            .collect();
        Harness {
            t,
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

    /// Applies `op` to both and returns (real errno or 0, model errno or 0).
    fn step(&mut self, op: &Op) -> (i32, i32) {
        let pg = self.page();
        let m = self.t.mapper.clone();
        let region = self.t.region;
        let errno = |r: std::result::Result<(), MapperError>| r.err().map_or(0, |e| e.errno());
        match *op {
            Op::Acquire {
                owner,
                page,
                pages,
                exclusive,
            } => {
                let mode = if exclusive {
                    LeaseMode::Exclusive
                } else {
                    LeaseMode::Shared
                };
                let got = m.acquire(self.owners[owner], region, page * pg, pages * pg, mode);
                let want = if !self.model.alive[owner] {
                    libc::ENOENT
                } else {
                    0
                };
                if let Ok(id) = got {
                    let range = ByteRange::from_request(page * pg, pages * pg).unwrap();
                    self.model.leases.push(MLease {
                        id,
                        owner,
                        range,
                        exclusive,
                    });
                }
                (errno(got.map(|_| ())), want)
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
            Op::Pin { owner, page, pages } => {
                let got = m.pin(self.owners[owner], region, page * pg, pages * pg);
                let range = ByteRange::new(page * pg, (page + pages) * pg);
                let covering = self
                    .model
                    .leases
                    .iter()
                    .filter(|l| l.owner == owner && l.exclusive && l.range.contains(&range))
                    .min_by_key(|l| (l.range.start, l.id))
                    .map(|l| l.id);
                let want = if !self.model.alive[owner] {
                    libc::ENOENT
                } else if range.end > PAGES * pg {
                    libc::ERANGE
                } else if self.model.pins.iter().any(|p| p.range.overlaps(&range)) {
                    libc::EBUSY
                } else if covering.is_none() {
                    libc::EPERM
                } else if (page..page + pages)
                    .any(|p| !self.model.pages.get(p as usize).is_some_and(|x| x.1))
                {
                    libc::EINVAL
                } else {
                    0
                };
                if let Ok(id) = got {
                    if let Some(lease) = covering {
                        self.model.pins.push(MPin {
                            id,
                            owner,
                            range,
                            lease,
                            dma: true,
                        });
                    }
                }
                (errno(got.map(|_| ())), want)
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
                kind,
                page,
                pages,
                revoke,
            } => {
                let size_pages = self.model.pages.len() as u64;
                let (change, range) = match kind {
                    0 => (
                        LayoutChange::Punch {
                            off: page * pg,
                            len: pages * pg,
                        },
                        None,
                    ),
                    1 => (
                        LayoutChange::Zero {
                            off: page * pg,
                            len: pages * pg,
                        },
                        None,
                    ),
                    2 => (
                        LayoutChange::Shrink {
                            new_size: page * pg,
                        },
                        Some(ByteRange::for_shrink(page * pg)),
                    ),
                    _ => (
                        LayoutChange::Grow {
                            new_size: page * pg,
                        },
                        Some(ByteRange::for_grow(size_pages * pg)),
                    ),
                };
                let range = range
                    .unwrap_or_else(|| ByteRange::from_request(page * pg, pages * pg).unwrap());
                let policy = if revoke {
                    BreakPolicy::Revoke
                } else {
                    BreakPolicy::Fail
                };
                let got = m.change(ChangeRequest {
                    requester: requester.map(|o| self.owners[o]),
                    deadline: Duration::ZERO,
                    policy,
                    ..ChangeRequest::new(region, change)
                });
                let want = if requester.is_some_and(|o| !self.model.alive[o]) {
                    libc::ENOENT
                } else if kind == 2 && page > size_pages || kind == 3 && page < size_pages {
                    libc::EINVAL
                } else if let Some(e) = self.model.holds(range, requester) {
                    e
                } else {
                    let shared: Vec<MLease> = self
                        .model
                        .leases
                        .iter()
                        .filter(|l| l.range.overlaps(&range))
                        .cloned()
                        .collect();
                    if !shared.is_empty() && !revoke {
                        libc::ETIMEDOUT
                    } else {
                        for l in &shared {
                            for p in self.model.pins.iter_mut().filter(|p| p.owner == l.owner) {
                                p.dma = false;
                            }
                        }
                        self.model.leases.retain(|l| !shared.contains(l));
                        self.model_apply(kind, page, pages);
                        0
                    }
                };
                (errno(got.map(|_| ())), want)
            }
        }
    }

    fn model_apply(&mut self, kind: u8, page: u64, pages: u64) {
        let p = &mut self.model.pages;
        let size = p.len() as u64;
        match kind {
            0 | 1 => {
                let end = if pages == 0 {
                    size
                } else {
                    (page + pages).min(size)
                };
                for i in page.min(size)..end {
                    p[i as usize] = (0, false);
                }
            }
            2 => p.truncate(page as usize),
            _ => p.resize(page as usize, (0, false)),
        }
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
        let snap = t.mapper.snapshot();
        let mut got_leases: Vec<(OwnerId, LeaseId, ByteRange, LeaseMode)> = snap
            .leases()
            .into_iter()
            .map(|(o, l)| (o, l.id, l.range, l.mode))
            .collect();
        let mut want_leases: Vec<(OwnerId, LeaseId, ByteRange, LeaseMode)> = model
            .leases
            .iter()
            .map(|l| {
                let mode = if l.exclusive {
                    LeaseMode::Exclusive
                } else {
                    LeaseMode::Shared
                };
                (self.owners[l.owner], l.id, l.range, mode)
            })
            .collect();
        got_leases.sort_by_key(|x| x.1);
        want_leases.sort_by_key(|x| x.1);
        prop_assert_eq!(got_leases, want_leases, "leases after {:?}", op);
        let mut got_pins: Vec<(OwnerId, PinId, ByteRange, Option<LeaseId>, bool)> = snap
            .pins()
            .into_iter()
            .map(|(o, p)| (o, p.id, p.range, p.lease, p.dma.is_some()))
            .collect();
        let mut want_pins: Vec<(OwnerId, PinId, ByteRange, Option<LeaseId>, bool)> = model
            .pins
            .iter()
            .map(|p| (self.owners[p.owner], p.id, p.range, Some(p.lease), p.dma))
            .collect();
        got_pins.sort_by_key(|x| x.1);
        want_pins.sort_by_key(|x| x.1);
        prop_assert_eq!(got_pins, want_pins, "pins after {:?}", op);
        let mut want_dma: Vec<(u64, usize, u64)> = model
            .pins
            .iter()
            .filter(|p| p.dma)
            .map(|p| {
                (
                    t.iova + p.range.start,
                    t.map.host().addr + p.range.start as usize,
                    p.range.len(),
                )
            })
            .collect();
        want_dma.sort();
        prop_assert_eq!(t.dma.mappings(), want_dma, "DMA after {:?}", op);
        // The interval index answers like a scan of the model for a few windows, including past EOF.
        for (s, l) in [(0, 1), (3, 4), (10, 0), (PAGES + 2, 3), (0, 0)] {
            let q = ByteRange::from_request(s * pg, l * pg).unwrap();
            let mut got: Vec<LeaseId> = t
                .mapper
                .lease_holders(t.region, s * pg, l * pg)
                .unwrap()
                .into_iter()
                .map(|x| x.0)
                .collect();
            let mut want: Vec<LeaseId> = model
                .leases
                .iter()
                .filter(|x| x.range.overlaps(&q))
                .map(|x| x.id)
                .collect();
            got.sort();
            want.sort();
            prop_assert_eq!(got, want, "index query {} after {:?}", q, op);
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
                error::errno_name(got), error::errno_name(want), "errno for {:?} (got {}, want {})", op, got, want
            );
            h.check(op)?;
        }
    }
}
