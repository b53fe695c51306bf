//! Several threads at once, as the VMM will call the mapper (agent channel, operator API, host guard): random
//! leases, pins, prepares and layout changes with breaks answered by a separate "agent" thread. Nothing may hang,
//! only the documented errnos may come back, and afterwards the tables, the interval index and the DMA mappings
//! must agree with each other.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::layout_change::{ChangeRequest, LayoutChange};
use super::test_files::TestRegion;
use super::*;

const PAGES: u64 = 64;
const WORKERS: usize = 4;
const OPS: usize = 300;

const EXPECTED: [i32; 9] = [
    libc::EPERM,
    libc::EINVAL,
    libc::EBUSY,
    libc::ETXTBSY,
    libc::EDEADLK,
    libc::EAGAIN,
    libc::ETIMEDOUT,
    libc::ERANGE,
    libc::ENOENT,
];

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn worker(m: Mapper, region: RegionId, owner: OwnerId, seed: u64, page: u64) -> usize {
    let mut rng = Rng(seed);
    let mut leases: Vec<(LeaseId, u64, u64)> = Vec::new();
    let mut pins: Vec<PinId> = Vec::new();
    let mut ok = 0;
    let check = |r: std::result::Result<(), MapperError>| match r {
        Ok(()) => true,
        Err(e) => {
            assert!(
                EXPECTED.contains(&e.errno()),
                "unexpected error from the mapper: {e}"
            );
            false
        }
    };
    for _ in 0..OPS {
        let p = rng.below(PAGES);
        let n = 1 + rng.below(4);
        let done = match rng.below(7) {
            0 | 1 => {
                let mode = if rng.below(2) == 0 {
                    LeaseMode::Shared
                } else {
                    LeaseMode::Exclusive
                };
                let r = m.acquire(owner, region, p * page, n * page, mode);
                if let Ok(l) = r {
                    if mode == LeaseMode::Exclusive {
                        leases.push((l, p, n));
                    }
                }
                check(r.map(|_| ()))
            }
            2 if !leases.is_empty() => {
                let (l, lp, ln) = leases[rng.below(leases.len() as u64) as usize];
                let off = lp + rng.below(ln);
                let r = m.pin(owner, region, off * page, page);
                if let Ok(pin) = r {
                    pins.push(pin);
                }
                let _ = l;
                check(r.map(|_| ()))
            }
            3 if !pins.is_empty() => {
                let pin = pins.swap_remove(rng.below(pins.len() as u64) as usize);
                check(m.unpin(owner, pin))
            }
            4 if !leases.is_empty() => {
                let i = rng.below(leases.len() as u64) as usize;
                let r = m.release(owner, leases[i].0);
                if r.is_ok() || matches!(&r, Err(e) if e.errno() == libc::ENOENT) {
                    leases.swap_remove(i);
                }
                check(r)
            }
            5 if !leases.is_empty() => {
                let (_, lp, ln) = leases[rng.below(leases.len() as u64) as usize];
                check(
                    m.prepare(owner, region, lp * page, ln * page, &mut |_| {})
                        .map(|_| ()),
                )
            }
            _ => {
                let change = if rng.below(2) == 0 {
                    LayoutChange::Punch {
                        off: p * page,
                        len: n * page,
                    }
                } else {
                    LayoutChange::Zero {
                        off: p * page,
                        len: n * page,
                    }
                };
                let policy = if rng.below(3) == 0 {
                    BreakPolicy::Revoke
                } else {
                    BreakPolicy::Fail
                };
                let requester = if rng.below(2) == 0 { Some(owner) } else { None };
                let req = ChangeRequest {
                    requester,
                    deadline: Duration::from_millis(20),
                    policy,
                    ..ChangeRequest::new(region, change)
                };
                check(m.change(req).map(|_| ()))
            }
        };
        ok += done as usize;
    }
    ok
}

#[test]
fn concurrent_callers_never_hang_and_leave_consistent_tables() {
    let mut t = TestRegion::on_tmp(PAGES);
    let m = t.mapper.clone();
    let owners: Vec<OwnerId> = (0..WORKERS)
        .map(|i| m.add_owner(&format!("w{i}")))
        .collect();
    // The responsive agent: releases whatever a notice names, most of the time.
    let events = t.events.take().unwrap();
    let agent_m = m.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agent_stop = stop.clone();
    let agent = thread::spawn(move || {
        let mut n = 0u64;
        while !agent_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(ev) = events.recv_timeout(Duration::from_millis(20)) else {
                continue;
            };
            if let BreakEvent::Notice(notice) = ev {
                n += 1;
                if !n.is_multiple_of(5) {
                    for (l, _) in notice.leases {
                        let _ = agent_m.release(notice.owner, l);
                    }
                }
            }
        }
    });
    let (done_tx, done_rx) = mpsc::channel();
    let mut handles = Vec::new();
    for (i, o) in owners.iter().enumerate() {
        let (m, region, page, o, tx) = (m.clone(), t.region, t.page, *o, done_tx.clone());
        handles.push(thread::spawn(move || {
            let ok = worker(m, region, o, 0x9e37_79b9 + i as u64 * 7919, page);
            tx.send(ok).unwrap();
        }));
    }
    let mut total_ok = 0;
    for _ in 0..WORKERS {
        total_ok += done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a worker hung");
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        total_ok > WORKERS * OPS / 10,
        "almost nothing succeeded ({total_ok})"
    );

    let s = m.snapshot();
    assert!(s.breaks.is_empty());
    for o in &s.owners {
        for p in &o.pins {
            let l = o
                .leases
                .iter()
                .find(|l| Some(l.id) == p.lease)
                .expect("pin without its lease");
            assert!(l.mode == LeaseMode::Exclusive && l.range.contains(&p.range));
        }
    }
    let mut want_dma: Vec<(u64, usize, u64)> = s
        .pins()
        .iter()
        .filter_map(|(_, p)| {
            p.dma
                .map(|(iova, len)| (iova, t.map.addr() + p.range.start as usize, len))
        })
        .collect();
    want_dma.sort();
    assert_eq!(t.dma.mappings(), want_dma);
    assert_eq!(
        m.lease_holders(t.region, 0, 0).unwrap().len(),
        s.leases().len(),
        "index and tables disagree"
    );

    for o in owners {
        m.owner_exit(o).unwrap();
    }
    assert!(m.snapshot().owners.is_empty());
    assert!(t.dma.mappings().is_empty());
    assert!(m.lease_holders(t.region, 0, 0).unwrap().is_empty());
    m.punch(None, t.region, 0, 0).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    agent.join().unwrap();
}
