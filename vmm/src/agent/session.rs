//! The service thread: one session per opening of the agent port, its owners, and every request answered.
//!
//! A session starts when the guest opens the port and ends when it closes it, resets the device or the VM
//! stops; ending it makes every owner it opened exit in the mapper (leases released, pins unpinned, waiting
//! changes re-evaluated). Requests are checked against the session before the mapper sees them: an owner of
//! another session or an unknown region is `ENOENT`, a range outside its region `ERANGE`, and a refused request
//! changes nothing.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use daxvisor_proto::agent::{
    self, errno, name_str, region_flags, region_kind, ErrorReply, Frame, FrameReader, Granted,
    Handle, HelloReply, LeaseMode, Message, RangeRequest, ReadEvent, RegionInfo, RegionList,
    MAX_FRAME, MAX_PAYLOAD, MAX_REGIONS, NAME_LEN, VERSION,
};

use super::notifier::Routes;
use super::port::{PortEvent, PortInbox};
use super::slow::{SlowJob, SlowKind, SlowWorker};
use crate::pmem::BackingKind;
use crate::region_registry::{Region, RegionRegistry};
use daxvisor_mapper::{LeaseId, Mapper, MapperError, OwnerId, PinId, RegionId};

/// Owners one session may have open at once (`ENOMEM` past it).
pub const MAX_OWNERS_PER_SESSION: usize = 64;
/// Leases one session may hold at once (`ENOMEM` past it): a guest cannot grow the host's lease table without
/// bound.
pub const MAX_LEASES_PER_SESSION: usize = 4096;

/// Where the service's frames go: the agent port (its sender), or a test's collector. `session` is the port
/// opening the frame belongs to; a frame for a session that already ended is dropped (returns `false`).
pub trait Outbox: Send + Sync {
    /// Queues one whole frame for the guest.
    fn send(&self, session: u64, frame: &[u8]) -> bool;
}

/// Encodes `msg` and queues it; `false` when the guest will not get it (port closed, its buffer full).
pub(crate) fn send_frame(
    out: &dyn Outbox,
    session: u64,
    request_id: u32,
    msg: &Message<'_>,
) -> bool {
    let mut buf = [0u8; MAX_FRAME];
    match agent::encode(msg, request_id, &mut buf) {
        Ok(n) => out.send(session, &buf[..n]),
        Err(e) => {
            tracing::error!("cannot encode agent reply: {e}");
            false
        }
    }
}

/// An error reply for a mapper refusal, naming the holder where there is one.
pub(crate) fn mapper_error(e: &MapperError) -> Message<'static> {
    let holder = match e {
        MapperError::TextBusy { holder, .. } | MapperError::Deadlock { holder, .. } => {
            holder.to_raw()
        }
        _ => 0,
    };
    Message::Error(ErrorReply {
        errno: e.errno() as u32,
        reserved: 0,
        holder,
    })
}

pub(crate) fn error(errno: u32) -> Message<'static> {
    Message::Error(ErrorReply {
        errno,
        reserved: 0,
        holder: 0,
    })
}

struct Session {
    id: u64,
    hello: bool,
    /// Open owners. What they hold is counted by the mapper (leases revoked at a deadline go there too).
    owners: HashSet<OwnerId>,
    reader: Box<FrameReader>,
}

/// The service thread's state.
pub(crate) struct Service {
    mapper: Mapper,
    regions: Arc<RegionRegistry>,
    out: Arc<dyn Outbox>,
    routes: Arc<Routes>,
    slow: SlowWorker,
    session: Option<Session>,
    counters: Arc<super::AgentCounters>,
    reclaim: Arc<crate::reclaim::Reclaim>,
}

impl Service {
    pub(crate) fn new(
        mapper: Mapper,
        regions: Arc<RegionRegistry>,
        out: Arc<dyn Outbox>,
        routes: Arc<Routes>,
        slow: SlowWorker,
        counters: Arc<super::AgentCounters>,
        reclaim: Arc<crate::reclaim::Reclaim>,
    ) -> Self {
        Service {
            mapper,
            regions,
            out,
            routes,
            slow,
            session: None,
            counters,
            reclaim,
        }
    }

    /// Serves the inbox until shutdown.
    pub(crate) fn run(&mut self, inbox: &PortInbox) {
        loop {
            match inbox.next() {
                PortEvent::Shutdown => {
                    self.end_session("VM stopping");
                    return;
                }
                PortEvent::Session { open, session } => {
                    self.end_session("port closed or reopened");
                    if open {
                        self.start_session(session);
                    }
                }
                PortEvent::Bytes(b) => self.feed(&b),
            }
        }
    }

    pub(crate) fn start_session(&mut self, id: u64) {
        self.routes.start(id, self.out.clone());
        self.session = Some(Session {
            id,
            hello: false,
            owners: HashSet::new(),
            reader: Box::new(FrameReader::new()),
        });
        self.counters.sessions_open.fetch_add(1, Ordering::Relaxed);
        self.counters.sessions_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = id, "agent session started");
    }

    pub(crate) fn end_session(&mut self, why: &str) {
        let Some(s) = self.session.take() else {
            return;
        };
        self.routes.end(s.id);
        self.reclaim.end_session(s.id);
        self.counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
        for owner in s.owners.iter() {
            match self.mapper.owner_exit(*owner) {
                // Already gone: the operator revoked it.
                Ok(()) | Err(MapperError::NotFound(_)) => {}
                Err(e) => tracing::warn!(session = s.id, %owner, "agent owner exit: {e}"),
            }
        }
        let stats = s.reader.stats();
        tracing::info!(
            session = s.id,
            owners = s.owners.len(),
            frames = stats.frames,
            malformed = stats.malformed,
            skipped_bytes = stats.skipped_bytes,
            "agent session ended ({why}); its owners released everything"
        );
    }

    /// Guest bytes of the current session: every complete frame answered.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        let Some(mut s) = self.session.take() else {
            return; // bytes written while no session is open are not a request
        };
        while !data.is_empty() {
            let took = s.reader.push(data);
            data = &data[took..];
            loop {
                let (request_id, reply) = match s.reader.next_event() {
                    None => break,
                    Some(ReadEvent::Malformed { request_id, error }) => {
                        self.counters
                            .frames_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            session = s.id,
                            request_id,
                            "malformed agent frame: {error}"
                        );
                        (request_id, Some(self::error(error.errno())))
                    }
                    Some(ReadEvent::Frame(f)) => {
                        let id = f.request_id;
                        // The frame borrows the reader; the request is copied out of it first.
                        let owned = OwnedRequest::from(&f);
                        (id, self.handle(&mut sess_view(&mut s), id, owned))
                    }
                };
                if let Some(reply) = reply {
                    send_frame(self.out.as_ref(), s.id, request_id, &reply);
                }
            }
        }
        self.session = Some(s);
    }

    fn resolve(&self, region: u64, offset: u64, len: u64) -> Result<(Arc<Region>, u64, u64), u32> {
        let r = self
            .regions
            .by_id(RegionId::from_raw(region))
            .ok_or(errno::ENOENT)?;
        resolve_range(&r, offset, len).map(|(o, l)| (r, o, l))
    }

    /// Answers one request; `None` when the answer comes later (from the slow worker).
    fn handle(
        &mut self,
        s: &mut SessionView<'_>,
        request_id: u32,
        req: OwnedRequest,
    ) -> Option<Message<'static>> {
        let m = &self.mapper;
        let OwnedRequest::Message(msg) = req else {
            return Some(error(errno::ENOSYS));
        };
        if let Message::Hello(h) = msg {
            if h.min_version > u16::from(VERSION) || h.max_version < u16::from(VERSION) {
                return Some(error(errno::EPROTONOSUPPORT));
            }
            *s.hello = true;
            if h.flags & agent::hello_flags::REGION_NOTICES != 0 {
                self.routes.want_region_notices(s.id);
            }
            return Some(Message::HelloReply(HelloReply {
                version: u16::from(VERSION),
                reserved: 0,
                max_payload: MAX_PAYLOAD as u32,
                session: s.id,
            }));
        }
        if !*s.hello {
            return Some(error(errno::EPROTO));
        }
        let check_owner = |owner: u64| -> Result<OwnerId, u32> {
            let o = OwnerId::from_raw(owner);
            if s.owners.contains(&o) {
                Ok(o)
            } else {
                Err(errno::ENOENT)
            }
        };
        let reply = match msg {
            Message::ListRegions => {
                // Sent from here: the list borrows a local.
                let infos: Vec<RegionInfo> = self
                    .regions
                    .all()
                    .iter()
                    .take(MAX_REGIONS)
                    .map(|r| region_info(r, &self.mapper))
                    .collect();
                send_frame(
                    self.out.as_ref(),
                    s.id,
                    request_id,
                    &Message::Regions(RegionList::new(&infos)),
                );
                return None;
            }
            Message::OpenOwner(o) => {
                if s.owners.len() >= MAX_OWNERS_PER_SESSION {
                    return Some(error(errno::ENOMEM));
                }
                let name = name_str(&o.name).unwrap_or("?");
                let id = m.add_owner(&format!("agent:{name}"));
                s.owners.insert(id);
                self.routes.add_owner(id, s.id);
                tracing::info!(session = s.id, owner = %id, name, "agent owner opened");
                Message::OwnerOpened { owner: id.to_raw() }
            }
            Message::CloseOwner { owner } => match check_owner(owner) {
                Err(e) => error(e),
                Ok(o) => {
                    s.owners.remove(&o);
                    self.routes.remove_owner(o);
                    self.reclaim.end_owner(o);
                    match m.owner_exit(o) {
                        Ok(()) => Message::Ok { value: 0 },
                        Err(e) => mapper_error(&e),
                    }
                }
            },
            Message::Acquire(a) => {
                let r = a.range;
                let owner = match check_owner(r.owner) {
                    Ok(o) => o,
                    Err(e) => return Some(error(e)),
                };
                if a.flags != 0 {
                    return Some(error(errno::EINVAL));
                }
                if s.leases(m) >= MAX_LEASES_PER_SESSION {
                    return Some(error(errno::ENOMEM));
                }
                let (entry, off, len) = match self.resolve(r.region, r.offset, r.len) {
                    Ok(x) => x,
                    Err(e) => return Some(error(e)),
                };
                let mode = match a.mode {
                    LeaseMode::Shared => daxvisor_mapper::LeaseMode::Shared,
                    LeaseMode::Exclusive => daxvisor_mapper::LeaseMode::Exclusive,
                };
                match m.acquire(owner, entry.id, off, len, mode) {
                    Ok(lease) => {
                        self.reclaim.withdraw(owner, entry.id, off, len);
                        tracing::debug!(session = s.id, %owner, %lease, id = %entry.name(), off, len, %mode, "agent lease");
                        Message::LeaseGranted(Granted {
                            id: lease.to_raw(),
                            region: r.region,
                            offset: off,
                            len,
                        })
                    }
                    Err(e) => mapper_error(&e),
                }
            }
            Message::Release(Handle { owner, id }) => match check_owner(owner) {
                Err(e) => error(e),
                Ok(o) => match m.release(o, LeaseId::from_raw(id)) {
                    Ok(()) => Message::Ok { value: 0 },
                    Err(e) => mapper_error(&e),
                },
            },
            Message::Unpin(Handle { owner, id }) => match check_owner(owner) {
                Err(e) => error(e),
                Ok(o) => match m.unpin(o, PinId::from_raw(id)) {
                    Ok(()) => Message::Ok { value: 0 },
                    Err(e) => mapper_error(&e),
                },
            },
            Message::Pin(r) | Message::PinDma(r) | Message::Prepare(r) => {
                let owner = match check_owner(r.owner) {
                    Ok(o) => o,
                    Err(e) => return Some(error(e)),
                };
                let (entry, off, len) = match self.resolve(r.region, r.offset, r.len) {
                    Ok(x) => x,
                    Err(e) => return Some(error(e)),
                };
                let kind = match msg {
                    Message::Pin(_) => SlowKind::Pin,
                    Message::PinDma(_) => {
                        // Only where the operator said so (`--pmem dma=agent`), and only with a device.
                        if entry.config.dma != crate::pmem::DmaPolicy::Agent {
                            tracing::info!(session = s.id, id = %entry.name(), dma = %entry.config.dma, "agent DMA pin refused: the region is not dma=agent");
                            return Some(error(errno::EPERM));
                        }
                        SlowKind::PinDma
                    }
                    _ => SlowKind::Prepare,
                };
                let job = SlowJob {
                    session: s.id,
                    request_id,
                    kind,
                    owner,
                    region: entry.id,
                    region_wire: r.region,
                    off,
                    len,
                };
                if !self.slow.submit(job) {
                    return Some(error(errno::EAGAIN));
                }
                return None;
            }
            Message::OfferReclaim(RangeRequest {
                owner,
                region,
                offset,
                len,
            }) => match check_owner(owner)
                .and_then(|o| self.resolve(region, offset, len).map(|x| (o, x)))
            {
                Err(e) => error(e),
                Ok((o, (entry, off, len))) => {
                    // Under policy `auto` the answer waits for the punch (the guest may hold its filesystem
                    // frozen until then).
                    let (out, session) = (self.out.clone(), s.id);
                    let waiter: crate::reclaim::OfferWaiter = Box::new(move |r| {
                        let reply = match r {
                            Ok(id) => Message::Ok { value: id },
                            Err(e) => error(e.unsigned_abs()),
                        };
                        send_frame(out.as_ref(), session, request_id, &reply);
                    });
                    match self
                        .reclaim
                        .offer_then(s.id, o, entry.id, off, len, Some(waiter))
                    {
                        Ok(crate::reclaim::Offered::Listed(id)) => Message::Ok { value: id },
                        Ok(crate::reclaim::Offered::Queued(_)) => return None,
                        Err(e) => error(e.unsigned_abs()),
                    }
                }
            },
            Message::Heartbeat { seq } => Message::Ok { value: seq },
            // Replies and notices are the host's to send.
            _ => error(errno::ENOSYS),
        };
        Some(reply)
    }
}

/// The parts of a session a request handler changes (the session's reader stays borrowed by the frame loop).
struct SessionView<'a> {
    id: u64,
    hello: &'a mut bool,
    owners: &'a mut HashSet<OwnerId>,
}

impl SessionView<'_> {
    /// Leases the session's owners hold now, as the mapper counts them.
    fn leases(&self, mapper: &Mapper) -> usize {
        self.owners.iter().map(|o| mapper.lease_count(*o)).sum()
    }
}

fn sess_view(s: &mut Session) -> SessionView<'_> {
    SessionView {
        id: s.id,
        hello: &mut s.hello,
        owners: &mut s.owners,
    }
}

/// A request copied out of the reader's buffer. The region list is the only message that borrows, and it is a
/// reply: a guest sending it gets `ENOSYS`.
enum OwnedRequest {
    Message(Message<'static>),
    NotARequest,
}

impl From<&Frame<'_>> for OwnedRequest {
    fn from(f: &Frame<'_>) -> Self {
        if !f.message.msg_type().is_request() {
            return OwnedRequest::NotARequest;
        }
        match f.message {
            Message::Regions(_) => OwnedRequest::NotARequest,
            Message::Hello(h) => OwnedRequest::Message(Message::Hello(h)),
            Message::ListRegions => OwnedRequest::Message(Message::ListRegions),
            Message::OpenOwner(o) => OwnedRequest::Message(Message::OpenOwner(o)),
            Message::CloseOwner { owner } => OwnedRequest::Message(Message::CloseOwner { owner }),
            Message::Acquire(a) => OwnedRequest::Message(Message::Acquire(a)),
            Message::Release(h) => OwnedRequest::Message(Message::Release(h)),
            Message::Pin(r) => OwnedRequest::Message(Message::Pin(r)),
            Message::PinDma(r) => OwnedRequest::Message(Message::PinDma(r)),
            Message::Unpin(h) => OwnedRequest::Message(Message::Unpin(h)),
            Message::Prepare(r) => OwnedRequest::Message(Message::Prepare(r)),
            Message::OfferReclaim(r) => OwnedRequest::Message(Message::OfferReclaim(r)),
            Message::Heartbeat { seq } => OwnedRequest::Message(Message::Heartbeat { seq }),
            _ => OwnedRequest::NotARequest,
        }
    }
}

/// `len` 0 = to the end of the region; the range must lie inside it.
pub(crate) fn resolve_range(r: &Region, offset: u64, len: u64) -> Result<(u64, u64), u32> {
    let size = r.size();
    if offset >= size {
        return Err(errno::ERANGE);
    }
    let len = if len == 0 { size - offset } else { len };
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok((offset, len)),
        _ => Err(errno::ERANGE),
    }
}

/// A region as the agent protocol describes it (the region list, and the notice of a region added).
pub fn region_info(r: &Region, mapper: &Mapper) -> RegionInfo {
    let kind = match r.kind() {
        BackingKind::Regular => region_kind::REGULAR,
        BackingKind::FsDax => region_kind::FS_DAX,
        BackingKind::DevDax => region_kind::DEV_DAX,
        BackingKind::Ram => region_kind::RAM,
    };
    let mut flags = 0;
    if r.readonly() {
        flags |= region_flags::READONLY;
    }
    // What the host kernel lets a DMA mapper pin long-term, as the mapper classified the region.
    if mapper.region(r.id).is_ok_and(|v| v.dma_rule.pinnable()) {
        flags |= region_flags::DMA_PINNABLE;
    }
    let mut name = [0u8; NAME_LEN];
    name.copy_from_slice(&agent::name_field(r.name()));
    RegionInfo {
        region: r.id.to_raw(),
        guest_addr: r.guest_addr,
        size: r.size(),
        kind,
        flags,
        name,
    }
}
