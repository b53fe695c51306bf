//! The daemon: owns the agent port, serves applications on a Unix socket (each connection an owner), runs the
//! break hook, and opens a new session when the old one is lost.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use daxvisor_proto::agent::{
    self, errno, region_flags, region_kind, Acquire, BreakReason, Handle, LeaseMode, Message,
    OpenOwner, RangeRequest,
};

use crate::config::ReclaimConfig;
use crate::ipc::{Event, Hold, Line, Region, Request, Response, Status};
use crate::port::{Notice, Port, PortError, Reply};
use crate::thin;

/// How long to wait before opening the port again after the session was lost.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// Longest request line a client may send.
const MAX_LINE: usize = 4096;

#[cfg(test)]
#[path = "daemon_test.rs"]
mod tests;

/// The daemon's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub port: PathBuf,
    pub socket: PathBuf,
    /// Run with `sh -c` on a break notice (the lease is released when it exits 0) and when a region is added
    /// (`DAXVISOR_EVENT=region-added`).
    pub hook: Option<String>,
    /// Periodic reclaim (off unless `every` is set).
    pub reclaim: ReclaimConfig,
}

struct Client {
    name: String,
    owner: Option<u64>,
    out: UnixStream,
}

#[derive(Default)]
struct State {
    port: Option<Arc<Port>>,
    clients: HashMap<u64, Client>,
    holds: Vec<Hold>,
    breaks_seen: u64,
    hooks_run: u64,
}

/// Opens one session's byte stream: (reader, writer).
pub type Opener = Box<dyn Fn() -> std::io::Result<(File, File)> + Send + Sync>;

struct Shared {
    cfg: Config,
    opener: Opener,
    state: Mutex<State>,
    next_client: AtomicU64,
    /// One reclaim at a time (the CLI's and the periodic one).
    reclaiming: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn port(&self) -> Result<Arc<Port>, PortError> {
        self.lock().port.clone().ok_or(PortError::SessionLost)
    }

    fn send_line(&self, client: u64, line: &Line) {
        let st = self.lock();
        if let Some(c) = st.clients.get(&client) {
            if let Ok(mut s) = serde_json::to_string(line) {
                s.push('\n');
                let _ = (&c.out).write_all(s.as_bytes());
            }
        }
    }
}

/// Runs the daemon on the agent port until the socket cannot be served.
pub fn run(cfg: Config) -> std::io::Result<()> {
    let path = cfg.port.clone();
    let opener: Opener = Box::new(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        Ok((f.try_clone()?, f))
    });
    run_with(cfg, opener)
}

/// Runs the daemon with sessions opened by `opener` (the port, or a test's socket pair).
pub fn run_with(cfg: Config, opener: Opener) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket)?;
    let shared = Arc::new(Shared {
        opener,
        cfg,
        state: Mutex::new(State::default()),
        next_client: AtomicU64::new(1),
        reclaiming: Mutex::new(()),
    });
    if let Some(every) = shared.cfg.reclaim.every {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || periodic_reclaim(&shared, every))?;
    }
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("session".into())
            .spawn(move || sessions(&shared))?;
    }
    eprintln!(
        "daxvisor-agent: serving {} for {}",
        shared.cfg.socket.display(),
        shared.cfg.port.display()
    );
    for conn in listener.incoming() {
        let conn = conn?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("client".into())
            .spawn(move || serve_client(&shared, conn))?;
    }
    Ok(())
}

/// Opens the port, handles its notices until the session is lost, and opens it again.
fn sessions(shared: &Arc<Shared>) {
    loop {
        let opened = (shared.opener)().map_err(|source| PortError::Open {
            path: shared.cfg.port.display().to_string(),
            source,
        });
        match opened.and_then(|(r, w)| Port::start(r, w)) {
            Ok((port, notices)) => {
                eprintln!("daxvisor-agent: session {} with daxvisor", port.session);
                shared.lock().port = Some(port);
                handle_notices(shared, &notices);
                // Lost: every owner went with the session; clients holding leases are told by the close.
                let mut st = shared.lock();
                st.port = None;
                st.holds.clear();
                for (_, c) in st.clients.drain() {
                    let _ = c.out.shutdown(std::net::Shutdown::Both);
                }
                eprintln!("daxvisor-agent: session lost; opening the port again");
            }
            Err(e) => eprintln!("daxvisor-agent: {e}"),
        }
        std::thread::sleep(REOPEN_DELAY);
    }
}

/// Runs a reclaim (one at a time).
fn reclaim(shared: &Shared, opts: &thin::Options) -> Result<Vec<thin::Report>, String> {
    let _one = shared.reclaiming.lock().unwrap_or_else(|e| e.into_inner());
    let port = shared.port().map_err(|e| e.to_string())?;
    thin::run(&port, opts).map_err(|e| e.to_string())
}

/// The periodic reclaim of the configuration's mounts, one line per filesystem.
fn periodic_reclaim(shared: &Arc<Shared>, every: Duration) {
    let c = &shared.cfg.reclaim;
    eprintln!("daxvisor-agent: reclaiming pmem free space every {every:?}");
    loop {
        std::thread::sleep(every);
        let mounts: Vec<Option<PathBuf>> = if c.mounts.is_empty() {
            vec![None]
        } else {
            c.mounts.iter().cloned().map(Some).collect()
        };
        for mount in mounts {
            let opts = thin::Options {
                mount,
                min_size: c.min_size,
                timeout: c.timeout,
            };
            match reclaim(shared, &opts) {
                Ok(reports) => {
                    for r in &reports {
                        eprintln!("daxvisor-agent: periodic reclaim: {}", thin::summary(r));
                    }
                }
                Err(e) => eprintln!("daxvisor-agent: periodic reclaim: {e}"),
            }
        }
    }
}

fn handle_notices(shared: &Arc<Shared>, notices: &Receiver<Notice>) {
    while let Ok(n) = notices.recv() {
        match n {
            Notice::SessionLost => return,
            Notice::Revoked(r) => {
                let client = {
                    let mut st = shared.lock();
                    let c = client_of(&st, r.owner);
                    st.holds.retain(|h| !(h.what != "pin" && h.id == r.lease));
                    c
                };
                if let Some(c) = client {
                    shared.send_line(c, &Line::Event(Event::Revoked { lease: r.lease }));
                }
            }
            Notice::RegionAdded(info) => {
                let name = agent::name_str(&info.name).unwrap_or("").to_owned();
                eprintln!(
                    "daxvisor-agent: region {} ({name}) added: {:#x} bytes at {:#x}",
                    info.region, info.size, info.guest_addr
                );
                if let Some(hook) = shared.cfg.hook.clone() {
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("hook".into())
                        .spawn(move || run_added_hook(&shared, &hook, &info, &name));
                }
            }
            Notice::Break(b) if BreakReason::from_u32(b.reason) == BreakReason::DmaRecall => {
                shared.lock().breaks_seen += 1;
                let device = pci_name(b.lease);
                eprintln!(
                    "daxvisor-agent: DMA recall {} for device {device} guest-physical [{:#x}, +{:#x}) deadline {} ms",
                    b.break_id, b.offset, b.len, b.deadline_ms
                );
                if let Some(hook) = shared.cfg.hook.clone() {
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("hook".into())
                        .spawn(move || run_recall_hook(&shared, &hook, &b, &device));
                }
            }
            Notice::Break(b) => {
                let reason = BreakReason::from_u32(b.reason).name().to_owned();
                let client = {
                    let mut st = shared.lock();
                    st.breaks_seen += 1;
                    client_of(&st, b.owner)
                };
                eprintln!(
                    "daxvisor-agent: break {} for lease {} region {} [{:#x}, +{:#x}) reason {reason}",
                    b.break_id, b.lease, b.region, b.offset, b.len
                );
                if let Some(c) = client {
                    shared.send_line(
                        c,
                        &Line::Event(Event::Break {
                            lease: b.lease,
                            region: b.region,
                            offset: b.offset,
                            len: b.len,
                            deadline_ms: b.deadline_ms,
                            reason: reason.clone(),
                        }),
                    );
                }
                if let Some(hook) = shared.cfg.hook.clone() {
                    let shared = shared.clone();
                    // The hook may take its time: notices keep flowing meanwhile.
                    let _ = std::thread::Builder::new()
                        .name("hook".into())
                        .spawn(move || run_hook(&shared, &hook, &b, &reason, client));
                }
            }
        }
    }
}

fn client_of(st: &State, owner: u64) -> Option<u64> {
    st.clients
        .iter()
        .find(|(_, c)| c.owner == Some(owner))
        .map(|(id, _)| *id)
}

/// A PCI requester id as Linux names the device (`0000:BB:DD.F`).
fn pci_name(rid: u64) -> String {
    format!(
        "0000:{:02x}:{:02x}.{}",
        (rid >> 8) & 0xff,
        (rid >> 3) & 0x1f,
        rid & 7
    )
}

/// The hook for a DMA recall (`DAXVISOR_EVENT=dma-recall`): the device (`DAXVISOR_DEVICE`, its PCI name), the
/// guest-physical range (`DAXVISOR_GUEST_ADDR`, `DAXVISOR_LENGTH`) and the deadline. The hook stops whatever does
/// DMA there; the kernel's driver then unmaps it. Nothing is released afterwards: the host watches the mappings.
fn run_recall_hook(shared: &Shared, hook: &str, b: &agent::BreakNotice, device: &str) {
    shared.lock().hooks_run += 1;
    let status = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("DAXVISOR_EVENT", "dma-recall")
        .env("DAXVISOR_REASON", BreakReason::DmaRecall.name())
        .env("DAXVISOR_BREAK_ID", b.break_id.to_string())
        .env("DAXVISOR_DEVICE", device)
        .env("DAXVISOR_GUEST_ADDR", format!("{:#x}", b.offset))
        .env("DAXVISOR_LENGTH", b.len.to_string())
        .env("DAXVISOR_DEADLINE_MS", b.deadline_ms.to_string())
        .status();
    match status {
        Ok(s) => eprintln!("daxvisor-agent: dma-recall hook for {device} exited {s}"),
        Err(e) => eprintln!("daxvisor-agent: cannot run the hook: {e}"),
    }
}

/// The hook for a region added to the running VM: `DAXVISOR_EVENT=region-added` with the region's id, name,
/// guest-physical address and size (the Linux device whose nd region starts there is the new one).
fn run_added_hook(shared: &Shared, hook: &str, info: &agent::RegionInfo, name: &str) {
    shared.lock().hooks_run += 1;
    let status = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("DAXVISOR_EVENT", "region-added")
        .env("DAXVISOR_REGION", info.region.to_string())
        .env("DAXVISOR_NAME", name)
        .env("DAXVISOR_GUEST_ADDR", format!("{:#x}", info.guest_addr))
        .env("DAXVISOR_SIZE", info.size.to_string())
        .status();
    match status {
        Ok(s) => eprintln!("daxvisor-agent: region-added hook for {name} exited {s}"),
        Err(e) => eprintln!("daxvisor-agent: cannot run the hook: {e}"),
    }
}

fn run_hook(
    shared: &Shared,
    hook: &str,
    b: &agent::BreakNotice,
    reason: &str,
    client: Option<u64>,
) {
    shared.lock().hooks_run += 1;
    let status = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("DAXVISOR_BREAK_ID", b.break_id.to_string())
        .env("DAXVISOR_LEASE", b.lease.to_string())
        .env("DAXVISOR_OWNER", b.owner.to_string())
        .env("DAXVISOR_REGION", b.region.to_string())
        .env("DAXVISOR_OFFSET", b.offset.to_string())
        .env("DAXVISOR_LENGTH", b.len.to_string())
        .env("DAXVISOR_DEADLINE_MS", b.deadline_ms.to_string())
        .env("DAXVISOR_REASON", reason)
        .env("DAXVISOR_EVENT", "break")
        .status();
    match status {
        Ok(s) if s.success() => {
            let released = shared.port().and_then(|p| {
                p.call(&Message::Release(Handle {
                    owner: b.owner,
                    id: b.lease,
                }))
            });
            match released {
                Ok(_) => {
                    shared
                        .lock()
                        .holds
                        .retain(|h| !(h.what != "pin" && h.id == b.lease));
                    eprintln!("daxvisor-agent: hook done, lease {} released", b.lease);
                    if let Some(c) = client {
                        shared.send_line(c, &Line::Event(Event::Released { lease: b.lease }));
                    }
                }
                Err(e) => eprintln!(
                    "daxvisor-agent: releasing lease {} after the hook: {e}",
                    b.lease
                ),
            }
        }
        Ok(s) => eprintln!("daxvisor-agent: hook exited {s}; lease {} kept", b.lease),
        Err(e) => eprintln!("daxvisor-agent: cannot run the hook: {e}"),
    }
}

fn serve_client(shared: &Arc<Shared>, conn: UnixStream) {
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let Ok(out) = conn.try_clone() else {
        return;
    };
    shared.lock().clients.insert(
        id,
        Client {
            name: format!("client-{id}"),
            owner: None,
            out,
        },
    );
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(shared, id, req),
            Err(e) => refused("EINVAL", format!("bad request: {e}")),
        };
        shared.send_line(id, &Line::Response(resp));
    }
    // The application went away: its owner closes and everything it held is released.
    let owner = shared.lock().clients.remove(&id).and_then(|c| c.owner);
    if let Some(owner) = owner {
        shared.lock().holds.retain(|h| h.owner != owner);
        if let Ok(p) = shared.port() {
            let _ = p.call(&Message::CloseOwner { owner });
        }
    }
}

fn refused(errno: &str, error: String) -> Response {
    Response {
        ok: false,
        errno: Some(errno.to_owned()),
        error: Some(error),
        ..Response::default()
    }
}

fn port_error(e: &PortError) -> Response {
    match e {
        PortError::Refused(no, holder) => Response {
            ok: false,
            errno: Some(errno::name(*no).to_owned()),
            holder: (*holder != 0).then_some(*holder),
            error: Some(e.to_string()),
            ..Response::default()
        },
        e => refused("EIO", e.to_string()),
    }
}

/// This connection's owner, opened on first use.
fn owner(shared: &Shared, client: u64) -> Result<u64, PortError> {
    let (existing, name) = {
        let st = shared.lock();
        let c = st.clients.get(&client).ok_or(PortError::SessionLost)?;
        (c.owner, c.name.clone())
    };
    if let Some(o) = existing {
        return Ok(o);
    }
    let port = shared.port()?;
    match port.call(&Message::OpenOwner(OpenOwner {
        name: agent::name_field(&name),
    }))? {
        Reply::Owner(o) => {
            if let Some(c) = shared.lock().clients.get_mut(&client) {
                c.owner = Some(o);
            }
            Ok(o)
        }
        r => Err(PortError::Unexpected(r)),
    }
}

fn handle(shared: &Shared, client: u64, req: Request) -> Response {
    match handle_inner(shared, client, req) {
        Ok(r) => r,
        Err(e) => port_error(&e),
    }
}

fn handle_inner(shared: &Shared, client: u64, req: Request) -> Result<Response, PortError> {
    let ok = Response {
        ok: true,
        ..Response::default()
    };
    match req {
        Request::Regions => match shared.port()?.call(&Message::ListRegions)? {
            Reply::Regions(list) => Ok(Response {
                regions: Some(list.iter().map(region).collect()),
                ..ok
            }),
            r => Err(PortError::Unexpected(r)),
        },
        Request::Lease {
            region,
            offset,
            len,
            exclusive,
        } => {
            let owner = owner(shared, client)?;
            let mode = if exclusive {
                LeaseMode::Exclusive
            } else {
                LeaseMode::Shared
            };
            let msg = Message::Acquire(Acquire {
                range: RangeRequest {
                    owner,
                    region,
                    offset,
                    len,
                },
                mode,
                flags: 0,
            });
            granted(
                shared,
                client,
                owner,
                region,
                &msg,
                if exclusive { "exclusive" } else { "shared" },
            )
        }
        Request::Pin {
            region,
            offset,
            len,
            dma,
        } => {
            let owner = owner(shared, client)?;
            let range = RangeRequest {
                owner,
                region,
                offset,
                len,
            };
            let msg = if dma {
                Message::PinDma(range)
            } else {
                Message::Pin(range)
            };
            granted(shared, client, owner, region, &msg, "pin")
        }
        Request::Prepare {
            region,
            offset,
            len,
        } => {
            let owner = owner(shared, client)?;
            shared.port()?.call(&Message::Prepare(RangeRequest {
                owner,
                region,
                offset,
                len,
            }))?;
            Ok(ok)
        }
        Request::Release { lease } => {
            let holder = shared
                .lock()
                .holds
                .iter()
                .find(|h| h.id == lease && h.what != "pin")
                .map(|h| h.owner);
            let Some(owner) = holder else {
                return Ok(refused("ENOENT", format!("no lease {lease} in this guest")));
            };
            shared
                .port()?
                .call(&Message::Release(Handle { owner, id: lease }))?;
            shared.lock().holds.retain(|h| h.id != lease);
            Ok(ok)
        }
        Request::Reclaim {
            mount,
            min_size,
            timeout_ms,
        } => {
            let opts = thin::Options {
                mount: mount.map(PathBuf::from),
                min_size,
                timeout: Duration::from_millis(timeout_ms.max(1)),
            };
            match reclaim(shared, &opts) {
                Ok(reports) => Ok(Response {
                    reclaim: Some(reports),
                    ..ok
                }),
                Err(e) => Ok(refused("EIO", e)),
            }
        }
        Request::Status => {
            let st = shared.lock();
            Ok(Response {
                status: Some(Status {
                    session: st.port.as_ref().map_or(0, |p| p.session),
                    port: shared.cfg.port.display().to_string(),
                    clients: st.clients.len(),
                    holds: st.holds.clone(),
                    breaks_seen: st.breaks_seen,
                    hooks_run: st.hooks_run,
                }),
                ..ok
            })
        }
    }
}

fn granted(
    shared: &Shared,
    client: u64,
    owner: u64,
    region: u64,
    msg: &Message<'_>,
    what: &str,
) -> Result<Response, PortError> {
    match shared.port()?.call(msg)? {
        Reply::Granted { id, offset, len } => {
            let mut st = shared.lock();
            let name = st
                .clients
                .get(&client)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            st.holds.push(Hold {
                id,
                what: what.to_owned(),
                owner,
                client: name,
                region,
                offset,
                len,
            });
            Ok(Response {
                ok: true,
                id: Some(id),
                offset: Some(offset),
                len: Some(len),
                ..Response::default()
            })
        }
        r => Err(PortError::Unexpected(r)),
    }
}

fn region(r: &agent::RegionInfo) -> Region {
    Region {
        id: r.region,
        name: agent::name_str(&r.name).unwrap_or("?").to_owned(),
        guest_addr: r.guest_addr,
        size: r.size,
        kind: match r.kind {
            region_kind::REGULAR => "regular",
            region_kind::FS_DAX => "fsdax",
            region_kind::DEV_DAX => "devdax",
            region_kind::RAM => "ram",
            _ => "unknown",
        }
        .to_owned(),
        readonly: r.flags & region_flags::READONLY != 0,
        dma_pinnable: r.flags & region_flags::DMA_PINNABLE != 0,
    }
}
