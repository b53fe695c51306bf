//! The daemon with real Unix sockets, a real hook process, and a scripted host on the other end of its port
//! (a socket pair speaking the real protocol): a lease taken through the socket, a break notice, the hook run
//! with the range in its environment, the release reaching the host, the connection's close closing its owner,
//! and a new session after the old one is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use daxvisor_proto::agent::{
    self, BreakNotice, BreakReason, FrameReader, Granted, HelloReply, Message, ReadEvent,
    RegionInfo, RegionList, MAX_FRAME,
};

use super::{run_with, Config, Opener};
use crate::ipc::{Event, Line, Request};

/// The host side of one session.
struct Host {
    s: UnixStream,
    reader: FrameReader,
}

/// What the host saw, copied out of the reader.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Hello,
    ListRegions,
    OpenOwner,
    Acquire(u64),
    Release(u64, u64),
    CloseOwner(u64),
    Other,
}

impl Host {
    fn send(&mut self, msg: &Message<'_>, id: u32) {
        let mut b = [0u8; MAX_FRAME];
        let n = agent::encode(msg, id, &mut b).unwrap();
        self.s.write_all(&b[..n]).unwrap();
    }

    /// The next request, answered the way daxvisor would.
    fn serve_one(&mut self) -> Seen {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(ReadEvent::Frame(f)) = self.reader.next_event() {
                let (id, m) = (f.request_id, f.message);
                let (seen, reply) = match m {
                    Message::Hello(_) => (
                        Seen::Hello,
                        Message::HelloReply(HelloReply {
                            version: 1,
                            reserved: 0,
                            max_payload: 4096,
                            session: 5,
                        }),
                    ),
                    Message::ListRegions => (Seen::ListRegions, Message::Ok { value: 0 }),
                    Message::OpenOwner(_) => (Seen::OpenOwner, Message::OwnerOpened { owner: 42 }),
                    Message::Acquire(a) => (
                        Seen::Acquire(a.range.owner),
                        Message::LeaseGranted(Granted {
                            id: 7,
                            region: a.range.region,
                            offset: 0,
                            len: 0x20_0000,
                        }),
                    ),
                    Message::Release(h) => (Seen::Release(h.owner, h.id), Message::Ok { value: 0 }),
                    Message::CloseOwner { owner } => {
                        (Seen::CloseOwner(owner), Message::Ok { value: 0 })
                    }
                    _ => (Seen::Other, Message::Ok { value: 0 }),
                };
                if seen == Seen::ListRegions {
                    let r = [RegionInfo {
                        region: 1,
                        guest_addr: 0x1_0000_0000,
                        size: 0x20_0000,
                        kind: agent::region_kind::FS_DAX,
                        flags: 0,
                        name: agent::name_field("pmem0"),
                    }];
                    self.send(&Message::Regions(RegionList::new(&r)), id);
                } else {
                    self.send(&reply, id);
                }
                return seen;
            }
            let n = self.s.read(&mut buf).unwrap();
            assert!(n > 0, "the agent closed the port");
            self.reader.push(&buf[..n]);
        }
    }
}

fn opener() -> (Opener, Receiver<Host>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let opener: Opener = Box::new(move || {
        let (agent_end, host_end) = UnixStream::pair()?;
        host_end.set_read_timeout(Some(Duration::from_secs(20)))?;
        let _ = tx.lock().unwrap().send(Host {
            s: host_end,
            reader: FrameReader::new(),
        });
        let w = File::from(OwnedFd::from(agent_end.try_clone()?));
        Ok((File::from(OwnedFd::from(agent_end)), w))
    });
    (opener, rx)
}

fn connect(path: &std::path::Path) -> (UnixStream, BufReader<UnixStream>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            return (s, r);
        }
        assert!(Instant::now() < deadline, "daemon socket never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(s: &mut UnixStream, req: &Request) {
    let mut line = serde_json::to_string(req).unwrap();
    line.push('\n');
    s.write_all(line.as_bytes()).unwrap();
}

fn line(r: &mut BufReader<UnixStream>) -> Line {
    let mut s = String::new();
    r.read_line(&mut s).unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s:?}"))
}

#[test]
fn a_break_runs_the_hook_with_the_range_and_releases_the_lease_then_the_close_ends_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let hook_out = dir.path().join("hook.env");
    let (opener, hosts) = opener();
    let cfg = Config {
        port: "test-port".into(),
        socket: socket.clone(),
        hook: Some(format!(
            "echo \"$DAXVISOR_REGION $DAXVISOR_OFFSET $DAXVISOR_LENGTH $DAXVISOR_REASON $DAXVISOR_LEASE\" > {}",
            hook_out.display()
        )),
        reclaim: crate::config::ReclaimConfig::default(),
    };
    std::thread::spawn(move || run_with(cfg, opener));
    let mut host = hosts.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(host.serve_one(), Seen::Hello);

    let (mut app, mut app_in) = connect(&socket);
    // The daemon serves requests once its hello was answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send(&mut app, &Request::Status);
        if let Line::Response(r) = line(&mut app_in) {
            if r.status.is_some_and(|s| s.session == 5) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no session");
        std::thread::sleep(Duration::from_millis(10));
    }
    send(&mut app, &Request::Regions);
    assert_eq!(host.serve_one(), Seen::ListRegions);
    match line(&mut app_in) {
        Line::Response(r) => {
            let regions = r.regions.unwrap();
            assert_eq!((regions[0].id, regions[0].kind.as_str()), (1, "fsdax"));
        }
        l => panic!("{l:?}"),
    }
    send(
        &mut app,
        &Request::Lease {
            region: 1,
            offset: 0,
            len: 0,
            exclusive: false,
        },
    );
    assert_eq!(host.serve_one(), Seen::OpenOwner);
    assert_eq!(host.serve_one(), Seen::Acquire(42));
    match line(&mut app_in) {
        Line::Response(r) => assert_eq!((r.ok, r.id), (true, Some(7))),
        l => panic!("{l:?}"),
    }

    // The host needs [1 MiB, +64 KiB) back.
    host.send(
        &Message::BreakNotice(BreakNotice {
            break_id: 9,
            owner: 42,
            lease: 7,
            region: 1,
            offset: 0x10_0000,
            len: 0x1_0000,
            deadline_ms: 5000,
            reason: BreakReason::Punch as u32,
        }),
        0,
    );
    assert_eq!(
        host.serve_one(),
        Seen::Release(42, 7),
        "the hook's exit 0 releases"
    );
    let env = std::fs::read_to_string(&hook_out).unwrap();
    assert_eq!(env.trim(), "1 1048576 65536 punch 7");
    let mut events = Vec::new();
    while events.len() < 2 {
        if let Line::Event(e) = line(&mut app_in) {
            events.push(e);
        }
    }
    assert!(matches!(
        events[0],
        Event::Break {
            lease: 7,
            offset: 0x10_0000,
            len: 0x1_0000,
            ..
        }
    ));
    assert_eq!(events[1], Event::Released { lease: 7 });

    send(&mut app, &Request::Status);
    match line(&mut app_in) {
        Line::Response(r) => {
            let st = r.status.unwrap();
            assert_eq!((st.session, st.breaks_seen, st.hooks_run), (5, 1, 1));
            assert!(st.holds.is_empty(), "{st:?}");
        }
        l => panic!("{l:?}"),
    }
    // The application goes away: its owner is closed on the host.
    drop(app);
    drop(app_in);
    assert_eq!(host.serve_one(), Seen::CloseOwner(42));

    // The session is lost (daxvisor side reset): the daemon opens the port again and says hello.
    drop(host);
    let mut host = hosts.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(host.serve_one(), Seen::Hello);
}

/// A DMA recall runs the hook with the device's PCI name and the guest-physical range, and releases nothing
/// (the host watches the device's mappings, not a lease).
#[test]
fn a_dma_recall_runs_the_hook_naming_the_device_and_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let hook_out = dir.path().join("hook.env");
    let (opener, hosts) = opener();
    let cfg = Config {
        port: "test-port".into(),
        socket: socket.clone(),
        hook: Some(format!(
            "echo \"$DAXVISOR_EVENT $DAXVISOR_DEVICE $DAXVISOR_GUEST_ADDR $DAXVISOR_LENGTH $DAXVISOR_DEADLINE_MS\" > {}.tmp && mv {0}.tmp {0}",
            hook_out.display()
        )),
        reclaim: crate::config::ReclaimConfig::default(),
    };
    std::thread::spawn(move || run_with(cfg, opener));
    let mut host = hosts.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(host.serve_one(), Seen::Hello);
    host.send(
        &Message::BreakNotice(BreakNotice {
            break_id: 1,
            owner: 0,
            lease: 4 << 3,
            region: 0,
            offset: 0x1_0010_0000,
            len: 0x8000,
            deadline_ms: 2000,
            reason: BreakReason::DmaRecall as u32,
        }),
        0,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let env = loop {
        if let Ok(s) = std::fs::read_to_string(&hook_out) {
            break s;
        }
        assert!(Instant::now() < deadline, "the hook did not run");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(env.trim(), "dma-recall 0000:00:04.0 0x100100000 32768 2000");
    // Nothing is released: the next thing the host hears is the application's request, not a Release.
    let (mut app, mut app_in) = connect(&socket);
    send(&mut app, &Request::Regions);
    assert_eq!(host.serve_one(), Seen::ListRegions);
    let _ = line(&mut app_in);
}
