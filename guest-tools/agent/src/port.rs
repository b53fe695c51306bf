//! The agent port: one open of `/dev/virtio-ports/org.daxvisor.agent.0` is one session with daxvisor. A reader
//! thread turns the byte stream into frames (resynchronising after anything malformed); requests wait for the
//! reply with their request id; break and revoke notices go to a channel.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use daxvisor_proto::agent::{
    self, errno, BreakNotice, FrameReader, Hello, Message, ReadEvent, RegionInfo, Revoked,
    MAX_FRAME, VERSION,
};

/// How long a request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A reply, copied out of the reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The host refused: errno and, for ETXTBSY/EDEADLK, the holding owner.
    Error { errno: u32, holder: u64 },
    /// Hello accepted.
    Hello { version: u16, session: u64 },
    /// The regions.
    Regions(Vec<RegionInfo>),
    /// A new owner.
    Owner(u64),
    /// Success.
    Ok(u64),
    /// A new lease or pin: id, offset, length.
    Granted { id: u64, offset: u64, len: u64 },
}

/// Something the host sent on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Release a lease.
    Break(BreakNotice),
    /// A lease is gone.
    Revoked(Revoked),
    /// A region was added to the running VM.
    RegionAdded(RegionInfo),
    /// The port failed or closed: the session and all its owners are gone.
    SessionLost,
}

/// Why a request did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("cannot open the agent port {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("writing to the agent port: {0}")]
    Write(std::io::Error),
    #[error("no reply from daxvisor within {0:?}")]
    Timeout(Duration),
    #[error("the session with daxvisor ended")]
    SessionLost,
    #[error("daxvisor refused: {}", errno::name(*.0))]
    Refused(u32, u64),
    #[error("unexpected reply {0:?}")]
    Unexpected(Reply),
}

type Pending = Arc<Mutex<HashMap<u32, Sender<Reply>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session on the agent port.
pub struct Port {
    out: Mutex<File>,
    next_id: Mutex<u32>,
    pending: Pending,
    /// The session id daxvisor gave in its hello reply.
    pub session: u64,
}

impl Port {
    /// A session over any byte stream pair (the port, or a test's socket).
    pub fn start(reader: File, writer: File) -> Result<(Arc<Port>, Receiver<Notice>), PortError> {
        let pending: Pending = Arc::default();
        let (notices, rx) = channel();
        {
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("port-reader".into())
                .spawn(move || read_loop(reader, &pending, &notices))
                .map_err(PortError::Write)?;
        }
        let mut port = Port {
            out: Mutex::new(writer),
            next_id: Mutex::new(0),
            pending,
            session: 0,
        };
        let hello = Message::Hello(Hello {
            min_version: u16::from(VERSION),
            max_version: u16::from(VERSION),
            flags: agent::hello_flags::REGION_NOTICES,
        });
        match port.call(&hello)? {
            Reply::Hello { session, .. } => port.session = session,
            r => return Err(PortError::Unexpected(r)),
        }
        Ok((Arc::new(port), rx))
    }

    /// Sends a request and waits for its final reply; an `Error` reply becomes [`PortError::Refused`].
    pub fn call(&self, msg: &Message<'_>) -> Result<Reply, PortError> {
        self.call_timeout(msg, REPLY_TIMEOUT)
    }

    /// [`Port::call`], waiting at most `timeout` for the reply.
    pub fn call_timeout(&self, msg: &Message<'_>, timeout: Duration) -> Result<Reply, PortError> {
        let id = {
            let mut n = lock(&self.next_id);
            *n = n.wrapping_add(1).max(1);
            *n
        };
        let (tx, rx) = channel();
        lock(&self.pending).insert(id, tx);
        let mut buf = [0u8; MAX_FRAME];
        let n = agent::encode(msg, id, &mut buf)
            .map_err(|e| PortError::Write(std::io::Error::other(e.to_string())))?;
        if let Err(e) = lock(&self.out).write_all(&buf[..n]) {
            lock(&self.pending).remove(&id);
            return Err(PortError::Write(e));
        }
        let reply = rx.recv_timeout(timeout);
        lock(&self.pending).remove(&id);
        match reply {
            Ok(Reply::Error { errno, holder }) => Err(PortError::Refused(errno, holder)),
            Ok(r) => Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(PortError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(PortError::SessionLost),
        }
    }
}

fn read_loop(mut reader: File, pending: &Pending, notices: &Sender<Notice>) {
    let mut frames = Box::new(FrameReader::new());
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let took = frames.push(data);
            data = &data[took..];
            while let Some(ev) = frames.next_event() {
                let (id, reply) = match ev {
                    ReadEvent::Malformed { request_id, error } => {
                        eprintln!("daxvisor-agent: malformed frame from the host: {error}");
                        (
                            request_id,
                            Reply::Error {
                                errno: error.errno(),
                                holder: 0,
                            },
                        )
                    }
                    ReadEvent::Frame(f) => {
                        let r = match f.message {
                            Message::BreakNotice(b) => {
                                let _ = notices.send(Notice::Break(b));
                                continue;
                            }
                            Message::Revoked(r) => {
                                let _ = notices.send(Notice::Revoked(r));
                                continue;
                            }
                            Message::RegionAdded(info) => {
                                let _ = notices.send(Notice::RegionAdded(info));
                                continue;
                            }
                            Message::PrepareProgress(_) => continue,
                            Message::Error(e) => Reply::Error {
                                errno: e.errno,
                                holder: e.holder,
                            },
                            Message::HelloReply(h) => Reply::Hello {
                                version: h.version,
                                session: h.session,
                            },
                            Message::Regions(list) => Reply::Regions(list.iter().collect()),
                            Message::OwnerOpened { owner } => Reply::Owner(owner),
                            Message::Ok { value } => Reply::Ok(value),
                            Message::LeaseGranted(g) | Message::Pinned(g) => Reply::Granted {
                                id: g.id,
                                offset: g.offset,
                                len: g.len,
                            },
                            _ => continue,
                        };
                        (f.request_id, r)
                    }
                };
                if let Some(tx) = lock(pending).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
        }
    }
    // Waiters see their senders dropped: the session is gone.
    lock(pending).clear();
    let _ = notices.send(Notice::SessionLost);
}
