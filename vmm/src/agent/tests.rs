//! The service against a real mapper on a real file: the guest side is frames fed to the session and the
//! frames it answers with; the host side is a real punch on another thread.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use daxvisor_proto::agent::{
    self, decode, errno, Acquire, Handle, Hello, LeaseMode, Message, OpenOwner, RangeRequest,
    MAX_FRAME,
};

use super::notifier::{AgentNotifier, Routes};
use super::session::{Outbox, Service};
use super::slow::SlowWorker;
use crate::region_registry::RegionRegistry;
use daxvisor_mapper::Mapper;

const SIZE: u64 = 2 << 20;

/// Frames the service sent, with the session they were for.
#[derive(Default)]
struct Collector {
    frames: Mutex<Vec<(u64, Vec<u8>)>>,
    more: Condvar,
}

impl Outbox for Collector {
    fn send(&self, session: u64, frame: &[u8]) -> bool {
        self.frames.lock().unwrap().push((session, frame.to_vec()));
        self.more.notify_all();
        true
    }
}

impl Collector {
    /// Waits for the next frame and returns (session, request id, decoded message) through `f`.
    fn next<R>(&self, f: impl FnOnce(u64, u32, &Message<'_>) -> R) -> R {
        let mut frames = self.frames.lock().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while frames.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no frame from the service within 10 s");
            frames = self.more.wait_timeout(frames, left).unwrap().0;
        }
        let (session, bytes) = frames.remove(0);
        let (frame, _) = decode(&bytes).unwrap();
        f(session, frame.request_id, &frame.message)
    }

    fn is_empty(&self) -> bool {
        self.frames.lock().unwrap().is_empty()
    }
}

struct Rig {
    mapper: Mapper,
    svc: Service,
    out: Arc<Collector>,
    region: u64,
    reclaim: Arc<crate::reclaim::Reclaim>,
    routes: Arc<Routes>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with(None, "")
}

/// A rig whose mapper has `dma` as its DMA mapper and whose region has the `--pmem` options `extra`.
fn rig_with(dma: Option<Arc<dyn daxvisor_mapper::DmaMapper>>, extra: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let routes = Routes::new();
    let mapper = Mapper::new(Arc::new(AgentNotifier::new(routes.clone())), dma);
    let pm0 = crate::region_registry::test_region_with(&mapper, dir.path(), "pm0", SIZE, extra);
    let id = pm0.id;
    let regions = RegionRegistry::new();
    regions.insert(pm0);
    let out = Arc::new(Collector::default());
    let slow = SlowWorker::spawn(mapper.clone(), out.clone()).unwrap();
    let reclaim =
        crate::reclaim::Reclaim::start(mapper.clone(), Arc::default(), regions.clone()).unwrap();
    let svc = Service::new(
        mapper.clone(),
        regions,
        out.clone(),
        routes.clone(),
        slow,
        Arc::default(),
        reclaim.clone(),
    );
    Rig {
        mapper,
        svc,
        out,
        region: id.to_raw(),
        reclaim,
        routes,
        _dir: dir,
    }
}

fn frame(msg: &Message<'_>, id: u32) -> Vec<u8> {
    let mut b = [0u8; MAX_FRAME];
    let n = agent::encode(msg, id, &mut b).unwrap();
    b[..n].to_vec()
}

impl Rig {
    /// Sends one request and returns the final reply's message through `f`, checking the request id. Progress
    /// frames for the same request come first when the work outlasts the progress interval (a loaded machine
    /// makes even a 2 MiB prepare that slow); they are checked and passed over.
    fn ask<R>(&mut self, id: u32, msg: &Message<'_>, f: impl FnOnce(&Message<'_>) -> R) -> R {
        self.svc.feed(&frame(msg, id));
        let mut f = Some(f);
        loop {
            let reply = self.out.next(|_, rid, m| {
                assert_eq!(rid, id, "reply to request {id}: {m:?}");
                if let Message::PrepareProgress(p) = m {
                    assert!(p.done <= p.total, "progress past the total: {p:?}");
                    return None;
                }
                f.take().map(|f| f(m))
            });
            if let Some(reply) = reply {
                return reply;
            }
        }
    }

    fn hello(&mut self) {
        let hello = Message::Hello(Hello {
            min_version: 1,
            max_version: 3,
            flags: 0,
        });
        self.ask(1, &hello, |m| {
            assert!(matches!(m, Message::HelloReply(h) if h.version == 1))
        });
    }

    fn open_owner(&mut self, name: &str) -> u64 {
        let msg = Message::OpenOwner(OpenOwner {
            name: agent::name_field(name),
        });
        self.ask(2, &msg, |m| match m {
            Message::OwnerOpened { owner } => *owner,
            m => panic!("open owner: {m:?}"),
        })
    }

    fn acquire(&mut self, owner: u64, offset: u64, len: u64, mode: LeaseMode) -> Result<u64, u32> {
        let msg = Message::Acquire(Acquire {
            range: RangeRequest {
                owner,
                region: self.region,
                offset,
                len,
            },
            mode,
            flags: 0,
        });
        self.ask(3, &msg, |m| match m {
            Message::LeaseGranted(g) => Ok(g.id),
            Message::Error(e) => Err(e.errno),
            m => panic!("acquire: {m:?}"),
        })
    }

    fn leases(&self) -> usize {
        self.mapper.snapshot().leases().len()
    }
}

fn errno_of(m: &Message<'_>) -> u32 {
    match m {
        Message::Error(e) => e.errno,
        m => panic!("expected an error, got {m:?}"),
    }
}

#[test]
fn shared_lease_gets_a_notice_for_the_punched_range_and_the_release_lets_the_punch_finish() {
    let mut r = rig();
    r.svc.start_session(7);
    r.hello();
    let region = r.region;
    r.ask(9, &Message::ListRegions, |m| match m {
        Message::Regions(list) => {
            assert_eq!(list.len(), 1);
            let info = list.get(0).unwrap();
            assert_eq!((info.region, info.size), (region, SIZE));
            assert_eq!(agent::name_str(&info.name), Some("pm0"));
        }
        m => panic!("{m:?}"),
    });
    let owner = r.open_owner("db");
    let lease = r.acquire(owner, 0, 0, LeaseMode::Shared).unwrap();

    let mapper = r.mapper.clone();
    let region = daxvisor_mapper::RegionId::from_raw(r.region);
    let punch = std::thread::spawn(move || mapper.punch(None, region, 0x10_0000, 0x1_0000));
    let notice = r.out.next(|session, rid, m| match m {
        Message::BreakNotice(n) => {
            assert_eq!((session, rid), (7, 0));
            *n
        }
        m => panic!("expected a break notice, got {m:?}"),
    });
    assert_eq!(
        (notice.owner, notice.lease, notice.region),
        (owner, lease, r.region)
    );
    assert_eq!((notice.offset, notice.len), (0x10_0000, 0x1_0000));
    assert_eq!(notice.reason, agent::BreakReason::Punch as u32);
    assert!(notice.deadline_ms > 0);

    let release = Message::Release(Handle { owner, id: lease });
    r.ask(10, &release, |m| assert_eq!(*m, Message::Ok { value: 0 }));
    let report = punch.join().unwrap().unwrap();
    assert_eq!(r.leases(), 0, "{report:?}");
}

#[test]
fn exclusive_lease_refuses_the_punch_naming_the_guest_owner() {
    let mut r = rig();
    r.svc.start_session(1);
    r.hello();
    let owner = r.open_owner("dma");
    r.acquire(owner, 0, 0x20_0000, LeaseMode::Exclusive)
        .unwrap();
    let err = r
        .mapper
        .punch(
            None,
            daxvisor_mapper::RegionId::from_raw(r.region),
            0,
            0x1000,
        )
        .unwrap_err();
    match err {
        daxvisor_mapper::MapperError::TextBusy {
            holder,
            holder_name,
            ..
        } => {
            assert_eq!(holder.to_raw(), owner);
            assert_eq!(holder_name, "agent:dma");
        }
        e => panic!("expected ETXTBSY, got {e}"),
    }
    assert!(r.out.is_empty(), "an exclusive holder is not asked");
}

#[test]
fn ending_the_session_releases_everything_its_owners_held() {
    let mut r = rig();
    r.svc.start_session(1);
    r.hello();
    let a = r.open_owner("a");
    let b = r.open_owner("b");
    r.acquire(a, 0, 0x1000, LeaseMode::Shared).unwrap();
    r.acquire(b, 0x1000, 0x1000, LeaseMode::Exclusive).unwrap();
    assert_eq!(r.leases(), 2);
    r.svc.end_session("test");
    assert_eq!(r.leases(), 0);
    assert_eq!(r.mapper.snapshot().owners.len(), 0);
    // Bytes with no session open are nobody's requests.
    r.svc.feed(&frame(&Message::ListRegions, 5));
    assert!(r.out.is_empty());
}

#[test]
fn requests_outside_the_session_s_business_are_refused_and_change_nothing() {
    let mut r = rig();
    r.svc.start_session(1);
    r.ask(4, &Message::ListRegions, |m| {
        assert_eq!(errno_of(m), errno::EPROTO)
    });
    let v9 = Message::Hello(Hello {
        min_version: 9,
        max_version: 9,
        flags: 0,
    });
    r.ask(5, &v9, |m| assert_eq!(errno_of(m), errno::EPROTONOSUPPORT));
    r.hello();
    let owner = r.open_owner("app");
    assert_eq!(
        r.acquire(owner + 1000, 0, 0, LeaseMode::Shared),
        Err(errno::ENOENT)
    );
    assert_eq!(
        r.acquire(owner, SIZE, 0, LeaseMode::Shared),
        Err(errno::ERANGE)
    );
    assert_eq!(
        r.acquire(owner, SIZE - 0x1000, 0x2000, LeaseMode::Shared),
        Err(errno::ERANGE)
    );
    assert_eq!(
        r.acquire(owner, u64::MAX, 2, LeaseMode::Shared),
        Err(errno::ERANGE)
    );
    let lease = r.acquire(owner, 0, 0x1000, LeaseMode::Shared).unwrap();
    // Another session's owner cannot release it, nor can this one release a lease id that is not its own.
    let other = r.open_owner("other");
    let release = Message::Release(Handle {
        owner: other,
        id: lease,
    });
    r.ask(6, &release, |m| assert_eq!(errno_of(m), errno::EPERM));
    let pin = Message::Pin(RangeRequest {
        owner,
        region: r.region,
        offset: 0,
        len: 0x1000,
    });
    // Refused (no exclusive lease; this test region has no host mapping either), and nothing pinned.
    r.ask(7, &pin, |m| {
        assert!(matches!(m, Message::Error(_)), "{m:?}")
    });
    assert!(r.mapper.snapshot().pins().is_empty());
    // A host-to-guest message sent by the guest.
    r.ask(8, &Message::Ok { value: 1 }, |m| {
        assert_eq!(errno_of(m), errno::ENOSYS)
    });
    assert_eq!(r.leases(), 1);
    r.ask(9, &Message::Heartbeat { seq: 77 }, |m| {
        assert_eq!(*m, Message::Ok { value: 77 })
    });
}

#[test]
fn garbage_is_answered_and_the_session_keeps_serving() {
    let mut r = rig();
    r.svc.start_session(1);
    r.svc.feed(b"\x00\xffthis is not a frame");
    r.out.next(|_, rid, m| {
        assert_eq!(rid, 0);
        assert_eq!(errno_of(m), errno::EPROTO);
    });
    r.hello();
    // An oversized header: answered once, the rest of it skipped quietly, then the session goes on.
    let mut big = frame(&Message::ListRegions, 3);
    big[6..8].copy_from_slice(&5000u16.to_le_bytes());
    r.svc.feed(&big);
    r.out.next(|_, rid, m| {
        assert_eq!(rid, 3);
        assert_eq!(errno_of(m), errno::EMSGSIZE);
    });
    let owner = r.open_owner("after-garbage");
    assert!(r.acquire(owner, 0, 0, LeaseMode::Shared).is_ok());
}

impl Rig {
    fn offer(&mut self, owner: u64, offset: u64, len: u64) -> Result<u64, u32> {
        let msg = Message::OfferReclaim(RangeRequest {
            owner,
            region: self.region,
            offset,
            len,
        });
        self.ask(11, &msg, |m| match m {
            Message::Ok { value } => Ok(*value),
            Message::Error(e) => Err(e.errno),
            m => panic!("offer: {m:?}"),
        })
    }
}

#[test]
fn offers_are_checked_recorded_and_dropped_with_their_session() {
    let mut r = rig();
    r.svc.start_session(5);
    r.hello();
    let owner = r.open_owner("app");
    // Outside the window, and an owner this session never opened.
    assert_eq!(r.offer(owner, SIZE, 0), Err(errno::ERANGE));
    assert_eq!(r.offer(owner, 0, SIZE + 1), Err(errno::ERANGE));
    assert_eq!(r.offer(owner + 1000, 0, 4096), Err(errno::ENOENT));
    // Its own lease over the range: giving back what it holds is refused.
    let lease = r.acquire(owner, 0, 8192, LeaseMode::Shared).unwrap();
    assert_eq!(r.offer(owner, 4096, 4096), Err(errno::EBUSY));
    assert!(r.reclaim.list(None).is_empty());
    let id = r.offer(owner, 8192, 8192).unwrap();
    let offers = r.reclaim.list(None);
    assert_eq!(offers.len(), 1);
    assert_eq!(
        (
            offers[0].id,
            offers[0].offset,
            offers[0].length,
            offers[0].owner,
            offers[0].session
        ),
        (id, 8192, 8192, owner, 5)
    );
    assert_eq!(
        r.reclaim
            .counters
            .bytes_offered
            .load(std::sync::atomic::Ordering::Relaxed),
        8192
    );
    let _ = lease;
    r.svc.end_session("test");
    assert!(
        r.reclaim.list(None).is_empty(),
        "offers go with their session"
    );
}

#[test]
fn a_guest_revoked_far_more_often_than_the_session_limit_can_still_take_a_lease() {
    use super::session::MAX_LEASES_PER_SESSION;
    use daxvisor_mapper::{BreakPolicy, ChangeRequest, LayoutChange, RegionId};
    let mut r = rig();
    r.svc.start_session(7);
    r.hello();
    let owner = r.open_owner("db");
    let region = RegionId::from_raw(r.region);
    for round in 0..MAX_LEASES_PER_SESSION + 16 {
        r.acquire(owner, 0, 4096, LeaseMode::Shared)
            .unwrap_or_else(|e| panic!("round {round}: acquire refused with errno {e}"));
        // The guest never answers: at the (immediate) deadline its lease is revoked.
        let revoke = ChangeRequest {
            deadline: Duration::ZERO,
            policy: BreakPolicy::Revoke,
            ..ChangeRequest::new(region, LayoutChange::Evacuate { off: 0, len: 4096 })
        };
        let report = r.mapper.change(revoke).unwrap();
        assert_eq!(report.revoked.len(), 1, "round {round}");
        // The notice and the revoke frames the guest was sent.
        r.out.frames.lock().unwrap().clear();
    }
    assert_eq!(r.leases(), 0);
    assert!(r.acquire(owner, 0, 4096, LeaseMode::Shared).is_ok());
}

/// A region added while the VM runs is announced only to a session whose hello asked for it: an older agent
/// (flags 0) is never sent a message type it cannot decode.
#[test]
fn region_added_notices_go_only_to_agents_that_asked() {
    let info = agent::RegionInfo {
        region: 7,
        guest_addr: 1 << 32,
        size: SIZE,
        kind: agent::region_kind::REGULAR,
        flags: 0,
        name: agent::name_field("hot"),
    };
    let mut r = rig();
    r.svc.start_session(1);
    r.hello();
    assert!(!r.routes.region_added(info));
    assert!(r.out.is_empty());

    let mut r = rig();
    r.svc.start_session(1);
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 3,
        flags: agent::hello_flags::REGION_NOTICES,
    });
    r.ask(1, &hello, |m| assert!(matches!(m, Message::HelloReply(_))));
    assert!(r.routes.region_added(info));
    r.out.next(|_, id, m| {
        assert_eq!(id, 0, "a notice");
        assert_eq!(*m, Message::RegionAdded(info));
    });
}

/// DMA pins through the agent: only on a `dma=agent` region, only inside the window and under the owner's own
/// exclusive lease; a DMA pin maps exactly its range at the region's guest address plus the offset and its
/// unpin removes it; a plain pin maps nothing. `RecordingDma` stands in for the VFIO container (this machine
/// has no IOMMU; the lab shows the container).
#[test]
fn dma_pins_map_exactly_the_pinned_range_and_only_on_dma_agent_regions() {
    let pin_dma = |owner, region, offset, len| {
        Message::PinDma(RangeRequest {
            owner,
            region,
            offset,
            len,
        })
    };
    let dma = Arc::new(daxvisor_mapper::RecordingDma::new());
    let mut r = rig_with(Some(dma.clone()), ",dma=agent");
    r.svc.start_session(1);
    r.hello();
    let owner = r.open_owner("nvme-io");
    // No lease yet: EPERM, nothing mapped.
    r.ask(10, &pin_dma(owner, r.region, 0x1000, 0x1000), |m| {
        assert_eq!(errno_of(m), errno::EPERM)
    });
    r.acquire(owner, 0, SIZE, LeaseMode::Exclusive).unwrap();
    // Outside the window: ERANGE.
    r.ask(11, &pin_dma(owner, r.region, SIZE, 0x1000), |m| {
        assert_eq!(errno_of(m), errno::ERANGE)
    });
    assert!(dma.mappings().is_empty());
    let prepare = Message::Prepare(RangeRequest {
        owner,
        region: r.region,
        offset: 0,
        len: 0,
    });
    r.ask(15, &prepare, |m| assert_eq!(*m, Message::Ok { value: 0 }));
    let pin = r.ask(12, &pin_dma(owner, r.region, 0x1000, 0x2000), |m| match m {
        Message::Pinned(g) => g.id,
        m => panic!("DMA pin: {m:?}"),
    });
    let plain = Message::Pin(RangeRequest {
        owner,
        region: r.region,
        offset: 0x10000,
        len: 0x1000,
    });
    r.ask(13, &plain, |m| {
        assert!(matches!(m, Message::Pinned(_)), "{m:?}")
    });
    let mapped: Vec<(u64, u64)> = dma.mappings().iter().map(|&(i, _, l)| (i, l)).collect();
    assert_eq!(mapped, vec![((1 << 32) + 0x1000, 0x2000)]);
    r.ask(14, &Message::Unpin(Handle { owner, id: pin }), |m| {
        assert_eq!(*m, Message::Ok { value: 0 })
    });
    assert!(dma.mappings().is_empty());

    // dma=off (the default): refused before the mapper is asked.
    let dma = Arc::new(daxvisor_mapper::RecordingDma::new());
    let mut r = rig_with(Some(dma.clone()), "");
    r.svc.start_session(1);
    r.hello();
    let owner = r.open_owner("nvme-io");
    r.acquire(owner, 0, SIZE, LeaseMode::Exclusive).unwrap();
    r.ask(10, &pin_dma(owner, r.region, 0, 0x1000), |m| {
        assert_eq!(errno_of(m), errno::EPERM)
    });
    assert!(dma.mappings().is_empty() && r.mapper.snapshot().pins().is_empty());
}
