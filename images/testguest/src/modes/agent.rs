//! The agent modes (`agent=MODE`): the test guest speaks the agent protocol over the virtio-console port
//! `org.daxvisor.agent.0`, from ring 3. Every step prints one `agent ...` line; the end-to-end tests read them.
//!
//! - `hello`: hello, list regions (`agent region id=R size=S kind=K name=N`), a line on the console port.
//! - `shared`: take a shared lease on the whole first region (`agent lease L off=0 len=N`), wait for break
//!   notices and answer each by releasing (`agent notice break=B lease=L off=O len=N reason=R`,
//!   `agent released L`), `breaks=N` times (default 1), re-acquiring between them.
//! - `exclusive-pin`: exclusive lease, prepare, pin (`agent pinned P`), hold it `hold=S` seconds
//!   (`agent holding`), then close the port (`agent port closed`) and wait `hold=S` seconds more.
//! - `hostile`: garbage, a truncated frame, an oversized header, a wrong-version frame, an unknown type and a
//!   flood of requests whose answers it never reads; then a new session that must be served normally
//!   (`agent hostile: second session served`).
//! - `bench`: `rounds=N` acquire+release round trips (`agent bench acquire_release rounds=N cycles=C`).
//! - `offer`: takes nothing; offers a range past the region's end (`agent offer outside: ERRNO`), then the second
//!   half of the first region back for reclaim (`agent offer id=N off=O len=L`, `agent offered`), and keeps the
//!   session open `hold=S` seconds (an offer goes when its session ends). Run after `pmem=write` the range
//!   holds data the host may punch.

use daxvisor_proto::agent::{
    self, errno, name_field, name_str, Acquire, BreakNotice, FrameReader, Handle, Hello, LeaseMode,
    Message, OpenOwner, RangeRequest, ReadEvent, MAX_FRAME,
};
use daxvisor_proto::boot::BootInfo;

use super::probe::Found;
use crate::cmdline::{AgentMode, Options};
use crate::exit::code;
use crate::say;
use crate::tsc::{rdtsc, relax, Deadline, CYCLES_PER_SECOND_MIN};
use crate::virtio::console::{ConsoleDevice, DEVICE_ID_CONSOLE};

/// Waiting for a reply.
const REPLY_TIMEOUT_CYCLES: u64 = 30 * CYCLES_PER_SECOND_MIN;
/// Waiting for a break notice.
const NOTICE_TIMEOUT_CYCLES: u64 = 300 * CYCLES_PER_SECOND_MIN;

/// A reply or notice, copied out of the reader (the region list is summarised).
#[derive(Clone, Copy, Debug)]
enum Got {
    Reply(u32, Reply),
    Notice(BreakNotice),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Error(u32, u64),
    Hello(u16, u64),
    Owner(u64),
    Ok(u64),
    Granted(u64, u64),
    /// How many, the first and the last.
    Regions(usize, Option<agent::RegionInfo>, Option<agent::RegionInfo>),
    Progress,
    Other(u8),
}

struct Client {
    con: ConsoleDevice,
    reader: FrameReader,
    next_id: u32,
    /// Notices that arrived while waiting for a reply.
    pending: [Option<BreakNotice>; 8],
}

impl Client {
    fn send(&mut self, msg: &Message<'_>) -> Result<u32, u32> {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut buf = [0u8; MAX_FRAME];
        let n = agent::encode(msg, self.next_id, &mut buf).map_err(|_| code::AGENT_PROTOCOL)?;
        self.send_raw(&buf[..n])?;
        Ok(self.next_id)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), u32> {
        self.con.send_agent(bytes).map_err(|e| {
            say!("FAIL agent send: {e}");
            code::AGENT_INIT
        })
    }

    /// The next reply or notice, or `None` at the deadline.
    fn next(&mut self, deadline: Deadline) -> Option<Got> {
        loop {
            if let Some(ev) = self.reader.next_event() {
                let got = match ev {
                    ReadEvent::Malformed { request_id, error } => {
                        say!("agent: malformed frame from the host ({error})");
                        Got::Reply(request_id, Reply::Error(errno::EPROTO, 0))
                    }
                    ReadEvent::Frame(f) => {
                        let r = match f.message {
                            Message::BreakNotice(n) => return Some(Got::Notice(n)),
                            Message::Error(e) => Reply::Error(e.errno, e.holder),
                            Message::HelloReply(h) => Reply::Hello(h.version, h.session),
                            Message::OwnerOpened { owner } => Reply::Owner(owner),
                            Message::Ok { value } => Reply::Ok(value),
                            Message::LeaseGranted(g) | Message::Pinned(g) => {
                                Reply::Granted(g.id, g.len)
                            }
                            Message::Regions(list) => Reply::Regions(
                                list.len(),
                                list.get(0),
                                list.len().checked_sub(1).and_then(|i| list.get(i)),
                            ),
                            Message::PrepareProgress(_) => Reply::Progress,
                            m => Reply::Other(m.msg_type() as u8),
                        };
                        Got::Reply(f.request_id, r)
                    }
                };
                return Some(got);
            }
            let mut chunk = [0u8; 1024];
            let mut len = 0;
            if self.con.recv_agent(&mut |b| {
                chunk[..b.len()].copy_from_slice(b);
                len = b.len();
            }) {
                let mut rest = &chunk[..len];
                while !rest.is_empty() {
                    let took = self.reader.push(rest);
                    rest = &rest[took..];
                    if took == 0 {
                        break;
                    }
                }
                continue;
            }
            let _ = self.con.poll_control();
            if deadline.passed() {
                return None;
            }
            relax();
        }
    }

    /// Sends `msg` and waits for its final reply (notices on the way are kept for later).
    fn call(&mut self, msg: &Message<'_>) -> Result<Reply, u32> {
        let id = self.send(msg)?;
        let deadline = Deadline::after(REPLY_TIMEOUT_CYCLES);
        loop {
            match self.next(deadline) {
                None => {
                    say!("FAIL agent: no reply to request {id}");
                    return Err(code::AGENT_TIMEOUT);
                }
                Some(Got::Notice(n)) => {
                    if let Some(slot) = self.pending.iter_mut().find(|s| s.is_none()) {
                        *slot = Some(n);
                    }
                }
                Some(Got::Reply(rid, Reply::Progress)) if rid == id => {}
                Some(Got::Reply(rid, r)) if rid == id => return Ok(r),
                Some(Got::Reply(..)) => {}
            }
        }
    }

    fn notice(&mut self, deadline: Deadline) -> Option<BreakNotice> {
        if let Some(n) = self.pending.iter_mut().find_map(|s| s.take()) {
            return Some(n);
        }
        loop {
            match self.next(deadline)? {
                Got::Notice(n) => return Some(n),
                Got::Reply(..) => {}
            }
        }
    }

    fn hello(&mut self) -> Result<(), u32> {
        let hello = Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            flags: 0,
        });
        match self.call(&hello)? {
            Reply::Hello(v, session) => {
                say!("agent hello version={v} session={session}");
                Ok(())
            }
            r => Err(unexpected("hello", r)),
        }
    }

    fn first_region(&mut self) -> Result<agent::RegionInfo, u32> {
        match self.call(&Message::ListRegions)? {
            Reply::Regions(n, Some(r), _) => {
                say!(
                    "agent region id={} size={:#x} kind={} name={} (of {n})",
                    r.region,
                    r.size,
                    r.kind,
                    name_str(&r.name).unwrap_or("?")
                );
                Ok(r)
            }
            r => Err(unexpected("list regions", r)),
        }
    }

    fn open_owner(&mut self, name: &str) -> Result<u64, u32> {
        let msg = Message::OpenOwner(OpenOwner {
            name: name_field(name),
        });
        match self.call(&msg)? {
            Reply::Owner(o) => {
                say!("agent owner {o} ({name})");
                Ok(o)
            }
            r => Err(unexpected("open owner", r)),
        }
    }

    fn acquire(&mut self, owner: u64, region: u64, mode: LeaseMode) -> Result<(u64, u64), u32> {
        let msg = Message::Acquire(Acquire {
            range: RangeRequest {
                owner,
                region,
                offset: 0,
                len: 0,
            },
            mode,
            flags: 0,
        });
        // EAGAIN while the change that broke the previous lease has not applied yet: ask again.
        let deadline = Deadline::after(REPLY_TIMEOUT_CYCLES);
        loop {
            match self.call(&msg)? {
                Reply::Granted(l, len) => return Ok((l, len)),
                Reply::Error(errno::EAGAIN, _) if !deadline.passed() => relax(),
                r => return Err(unexpected("acquire", r)),
            }
        }
    }

    fn release(&mut self, owner: u64, lease: u64) -> Result<(), u32> {
        match self.call(&Message::Release(Handle { owner, id: lease }))? {
            Reply::Ok(_) => Ok(()),
            r => Err(unexpected("release", r)),
        }
    }
}

/// Prints why a reply was not the one expected; returns the failure code.
fn unexpected(what: &str, r: Reply) -> u32 {
    match r {
        Reply::Error(e, holder) => say!("FAIL agent {what}: {} (holder {holder})", errno::name(e)),
        r => say!("FAIL agent {what}: unexpected reply {r:?}"),
    }
    code::AGENT_PROTOCOL
}

/// Finds the console, runs the handshake and the mode. Returns 0 or a failure code.
pub fn run(mode: AgentMode, opts: &Options, _info: &BootInfo, devices: &[Found]) -> u32 {
    match run_inner(mode, opts, devices) {
        Ok(()) => 0,
        Err(rc) => rc,
    }
}

/// Finds the console, brings it up and opens the agent port.
fn connect(devices: &[Found]) -> Result<Client, u32> {
    let Some(dev) = devices
        .iter()
        .find(|d| d.probed.is_some_and(|p| p.device_id == DEVICE_ID_CONSOLE))
    else {
        say!("FAIL agent: no virtio-console device");
        return Err(code::AGENT_INIT);
    };
    // SAFETY: the probe found this device.
    let mmio = unsafe { dev.registers() };
    let Some(mut con) = ConsoleDevice::new(mmio) else {
        say!("FAIL agent: console queues already taken");
        return Err(code::AGENT_INIT);
    };
    if let Err(e) = con.init().and_then(|()| con.handshake()) {
        say!("FAIL agent: console: {e}");
        return Err(code::AGENT_INIT);
    }
    say!(
        "agent port {} named, console port {}",
        con.agent_port.unwrap_or(0),
        con.console_port.unwrap_or(0)
    );
    if con
        .write_console(b"daxvisor-testguest: hello on the virtio console\n")
        .is_err()
        || con.open_agent(true).is_err()
    {
        say!("FAIL agent: console port");
        return Err(code::AGENT_INIT);
    }
    Ok(Client {
        con,
        reader: FrameReader::new(),
        next_id: 0,
        pending: [None; 8],
    })
}

fn run_inner(mode: AgentMode, opts: &Options, devices: &[Found]) -> Result<(), u32> {
    let mut c = connect(devices)?;
    match mode {
        AgentMode::Hello => {
            c.hello()?;
            c.first_region()?;
        }
        AgentMode::Shared => shared(&mut c, opts)?,
        AgentMode::ExclusivePin => exclusive_pin(&mut c, opts)?,
        AgentMode::Hostile => hostile(&mut c)?,
        AgentMode::Bench => bench(&mut c, opts)?,
        AgentMode::Offer => offer(&mut c, opts)?,
    }
    Ok(())
}

fn shared(c: &mut Client, opts: &Options) -> Result<(), u32> {
    c.hello()?;
    let region = c.first_region()?;
    let owner = c.open_owner("testguest")?;
    for i in 0..opts.breaks {
        let (lease, len) = c.acquire(owner, region.region, LeaseMode::Shared)?;
        if i == 0 {
            say!("agent lease {lease} off=0 len={len:#x}");
            say!("agent waiting for a break");
        } else {
            // For a host that triggers the next break only once the lease exists again.
            say!("agent ready {i}");
        }
        let Some(n) = c.notice(Deadline::after(NOTICE_TIMEOUT_CYCLES)) else {
            say!("FAIL agent: no break notice");
            return Err(code::AGENT_TIMEOUT);
        };
        c.release(owner, n.lease)?;
        if i == 0 || i + 1 == opts.breaks {
            say!(
                "agent notice break={} lease={} off={:#x} len={:#x} reason={} deadline_ms={}",
                n.break_id,
                n.lease,
                n.offset,
                n.len,
                agent::BreakReason::from_u32(n.reason).name(),
                n.deadline_ms
            );
            say!("agent released {}", n.lease);
        }
    }
    say!("agent answered {} breaks", opts.breaks);
    Ok(())
}

fn offer(c: &mut Client, opts: &Options) -> Result<(), u32> {
    c.hello()?;
    let region = c.first_region()?;
    let owner = c.open_owner("testguest-offer")?;
    let outside = Message::OfferReclaim(RangeRequest {
        owner,
        region: region.region,
        offset: region.size,
        len: 4096,
    });
    match c.call(&outside)? {
        Reply::Error(e, _) => say!("agent offer outside: {}", errno::name(e)),
        r => return Err(unexpected("offer outside the window", r)),
    }
    let half = region.size / 2;
    let msg = Message::OfferReclaim(RangeRequest {
        owner,
        region: region.region,
        offset: half,
        len: region.size - half,
    });
    match c.call(&msg)? {
        Reply::Ok(id) => say!(
            "agent offer id={id} off={half:#x} len={:#x}",
            region.size - half
        ),
        r => return Err(unexpected("offer", r)),
    }
    say!("agent offered");
    let end = Deadline::after(opts.hold_s * CYCLES_PER_SECOND_MIN);
    while !end.passed() {
        // Nothing is held: a notice would be a bug, and replies are not expected; keep the port drained.
        if let Some(Got::Notice(n)) = c.next(end) {
            say!(
                "FAIL agent: an owner holding nothing got a notice for lease {}",
                n.lease
            );
            return Err(code::AGENT_PROTOCOL);
        }
    }
    Ok(())
}

/// A session that holds a pin: the pin lasts as long as the session (the port stays open while this lives).
pub struct HeldPin {
    _client: Client,
}

/// For `hotplug-pin=1`: pins the whole of the last region the host lists (the one just added) through the
/// agent, as a guest whose device DMAs there would, and keeps the session open.
pub fn pin_last_region(devices: &[Found]) -> Result<HeldPin, u32> {
    let mut c = connect(devices)?;
    c.hello()?;
    let region = match c.call(&Message::ListRegions)? {
        Reply::Regions(_, _, Some(r)) => r,
        r => return Err(unexpected("list regions", r)),
    };
    let owner = c.open_owner("testguest-hot")?;
    let (lease, _) = c.acquire(owner, region.region, LeaseMode::Exclusive)?;
    let range = RangeRequest {
        owner,
        region: region.region,
        offset: 0,
        len: 0,
    };
    match c.call(&Message::Prepare(range))? {
        Reply::Ok(_) => {}
        r => return Err(unexpected("prepare", r)),
    }
    match c.call(&Message::Pin(range))? {
        Reply::Granted(pin, _) => say!(
            "agent pinned {pin} on {} (lease {lease}, owner {owner})",
            name_str(&region.name).unwrap_or("?")
        ),
        r => return Err(unexpected("pin", r)),
    }
    Ok(HeldPin { _client: c })
}

fn exclusive_pin(c: &mut Client, opts: &Options) -> Result<(), u32> {
    c.hello()?;
    let region = c.first_region()?;
    let owner = c.open_owner("testguest-dma")?;
    let (lease, len) = c.acquire(owner, region.region, LeaseMode::Exclusive)?;
    say!("agent exclusive lease {lease} len={len:#x}");
    let range = RangeRequest {
        owner,
        region: region.region,
        offset: 0,
        len: 0,
    };
    match c.call(&Message::Prepare(range))? {
        Reply::Ok(_) => say!("agent prepared"),
        r => return Err(unexpected("prepare", r)),
    }
    match c.call(&Message::Pin(range))? {
        Reply::Granted(pin, _) => say!("agent pinned {pin}"),
        r => return Err(unexpected("pin", r)),
    }
    say!("agent holding");
    // Answer nothing, just keep reading (a break would be a bug: exclusive holders are not asked).
    let hold = opts.hold_s * CYCLES_PER_SECOND_MIN;
    if let Some(n) = c.notice(Deadline::after(hold)) {
        say!(
            "FAIL agent: an exclusive holder got a break notice for lease {}",
            n.lease
        );
        return Err(code::AGENT_PROTOCOL);
    }
    if c.con.open_agent(false).is_err() {
        return Err(code::AGENT_INIT);
    }
    say!("agent port closed");
    let end = Deadline::after(hold);
    while !end.passed() {
        let _ = c.con.poll_control();
        relax();
    }
    Ok(())
}

fn hostile(c: &mut Client) -> Result<(), u32> {
    c.hello()?;
    // Garbage with no magic in it.
    c.send_raw(&[0x5a; 100])?;
    // A truncated frame (header and 10 of 40 payload bytes), then zeros so its claimed length completes.
    let mut buf = [0u8; MAX_FRAME];
    let acq = Message::Acquire(Acquire {
        range: RangeRequest {
            owner: 1,
            region: 1,
            offset: 0,
            len: 0,
        },
        mode: LeaseMode::Shared,
        flags: 0,
    });
    agent::encode(&acq, 77, &mut buf).map_err(|_| code::AGENT_PROTOCOL)?;
    c.send_raw(&buf[..agent::HEADER_LEN + 10])?;
    c.send_raw(&[0u8; MAX_FRAME])?;
    // A header claiming a payload over the limit.
    let n = agent::encode(&Message::ListRegions, 78, &mut buf).map_err(|_| code::AGENT_PROTOCOL)?;
    buf[6..8].copy_from_slice(&0xffffu16.to_le_bytes());
    c.send_raw(&buf[..n])?;
    // A well-checked frame of version 9 and one of an unknown type.
    for (off, val, id) in [(4usize, 9u8, 79u32), (5, 0x3e, 80)] {
        let n =
            agent::encode(&Message::ListRegions, id, &mut buf).map_err(|_| code::AGENT_PROTOCOL)?;
        buf[off] = val;
        let crc = agent::crc::crc32(&buf[..12]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        c.send_raw(&buf[..n])?;
    }
    // A flood of requests whose answers are never read: 4000 heartbeats, in 4 KiB writes.
    let mut flood = [0u8; 4096];
    let mut at = 0;
    for seq in 0..4000u64 {
        let n = agent::encode(&Message::Heartbeat { seq }, 1000 + seq as u32, &mut buf)
            .map_err(|_| code::AGENT_PROTOCOL)?;
        if at + n > flood.len() {
            c.send_raw(&flood[..at])?;
            at = 0;
        }
        flood[at..at + n].copy_from_slice(&buf[..n]);
        at += n;
    }
    c.send_raw(&flood[..at])?;
    say!("agent hostile: sent garbage, truncated, oversized, wrong-version, unknown-type frames and a flood");
    // End the session, drop whatever of it is still in flight, start a new one.
    c.con.open_agent(false).map_err(|_| code::AGENT_INIT)?;
    let quiet = Deadline::after(CYCLES_PER_SECOND_MIN / 2);
    while !quiet.passed() {
        c.con.recv_agent(&mut |_| {});
        relax();
    }
    c.reader.clear();
    c.pending = [None; 8];
    c.con.open_agent(true).map_err(|_| code::AGENT_INIT)?;
    c.hello()?;
    let region = c.first_region()?;
    let owner = c.open_owner("after-hostile")?;
    let (lease, _) = c.acquire(owner, region.region, LeaseMode::Shared)?;
    c.release(owner, lease)?;
    say!("agent hostile: second session served");
    Ok(())
}

fn bench(c: &mut Client, opts: &Options) -> Result<(), u32> {
    c.hello()?;
    let region = c.first_region()?;
    let owner = c.open_owner("bench")?;
    let t0 = rdtsc();
    for _ in 0..opts.rounds {
        let (lease, _) = c.acquire(owner, region.region, LeaseMode::Shared)?;
        c.release(owner, lease)?;
    }
    say!(
        "agent bench acquire_release rounds={} cycles={}",
        opts.rounds,
        rdtsc() - t0
    );
    Ok(())
}
