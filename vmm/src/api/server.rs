//! The API server: a Unix socket (mode 0600; a stale one from a dead process is replaced, a live one refused),
//! served by hyper on a current-thread tokio runtime on its own thread, so no request ever waits on the event
//! loop or a vCPU, and no vCPU or the event loop on a request. Each connection is its own task: a client that
//! sends nothing or sends slowly holds up only itself (and is dropped after [`HEADER_TIMEOUT`], or
//! [`super::limits::BODY_TIMEOUT`] for a body). When [`MAX_CONNECTIONS`] are open, the connection idle longest
//! is closed for a new client ([`super::limits`]). Slow mapper calls (a change waiting on a break) run on
//! tokio's blocking threads.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

use super::context::ApiContext;
use super::limits::ConnBusy;
use crate::events::NewEvent;

/// An open connection, as the accept loop sees it.
struct Conn {
    accepted: Instant,
    busy: ConnBusy,
    close: Arc<tokio::sync::Notify>,
}

/// Every open connection, by a number given at accept.
type Conns = Arc<Mutex<HashMap<u64, Conn>>>;

/// Makes room for a new client among [`MAX_CONNECTIONS`]: closes the connection accepted first among those with
/// no request in progress and no follow stream. `false` if every one is busy.
fn evict_idle(conns: &Conns) -> bool {
    let conns = conns.lock().unwrap_or_else(|e| e.into_inner());
    let oldest = conns
        .values()
        .filter(|c| c.busy.idle())
        .min_by_key(|c| c.accepted);
    match oldest {
        Some(c) => {
            c.close.notify_one();
            true
        }
        None => false,
    }
}

/// A client must have sent a request's headers this long after connecting or after its last response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at accept (a flood of idle clients cannot exhaust the VMM).
pub const MAX_CONNECTIONS: usize = 64;
/// How long stopping waits for requests still running (a change waiting on a break) before leaving them, and
/// again for the blocking work they started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("--api-socket {0}: another process is serving on it")]
    Live(PathBuf),
    #[error("--api-socket {0}: exists and is not a socket (refusing to replace it)")]
    NotASocket(PathBuf),
    #[error("--api-socket {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The running server. Dropping it stops the server and removes the socket.
pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket we created: only that file is removed.
    ident: (u64, u64),
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl ApiServer {
    /// Bind `path` and start serving `ctx` on a new thread.
    pub fn start(path: &Path, ctx: Arc<ApiContext>) -> Result<Self, ApiSocketError> {
        let io_err = |op, source| ApiSocketError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let listener = bind(path)?;
        let meta = std::fs::metadata(path).map_err(|e| io_err("stat", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("set_nonblocking", e))?;
        let (shutdown, rx) = watch::channel(false);
        // Built here, before the API thread installs its filter; its blocking-pool threads start later, on the
        // API thread, and inherit that filter.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_err("start the API runtime", e))?;
        let thread = crate::threads::spawn("api", crate::seccomp::ThreadKind::Api, move || {
            serve(listener, runtime, ctx, rx)
        })
        .map_err(|e| io_err("spawn the API thread", e))?;
        tracing::info!(socket = %path.display(), "operator API listening");
        Ok(ApiServer {
            path: path.to_owned(),
            ident: (meta.dev(), meta.ino()),
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            crate::threads::join("api", t);
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), "cannot remove the API socket: {e}");
            }
        }
    }
}

/// Create the socket at `path` with mode 0600 from the first instant. A stale socket (nobody accepts on it) is
/// replaced; a live one, or anything that is not a socket, is refused.
fn bind(path: &Path) -> Result<UnixListener, ApiSocketError> {
    let io_err = |op, source| ApiSocketError::Io {
        path: path.to_owned(),
        op,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ApiSocketError::NotASocket(path.to_owned()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiSocketError::Live(path.to_owned())),
            Err(_) => tracing::info!(socket = %path.display(), "replacing a stale API socket"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", e)),
    }
    // Bound in a fresh directory only we can enter, chmod'ed, then renamed into place: nobody can connect
    // before the mode is 0600.
    let dir = private_dir(path).map_err(|e| io_err("create a private directory", e))?;
    let private = dir.join("api.sock");
    let result = (|| {
        let listener = UnixListener::bind(&private).map_err(|e| io_err("bind", e))?;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("chmod 0600", e))?;
        std::fs::rename(&private, path).map_err(|e| io_err("rename into place", e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&private);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// A new directory, mode 0700, next to `path` (a rename must not cross filesystems).
fn private_dir(path: &Path) -> io::Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    for i in 0..100u32 {
        let d = parent.join(format!(".daxvisor-api.{}.{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from(io::ErrorKind::AlreadyExists))
}

fn serve(
    listener: UnixListener,
    runtime: tokio::runtime::Runtime,
    ctx: Arc<ApiContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    runtime.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("operator API: cannot use the socket: {e}");
                return;
            }
        };
        ctx.event(NewEvent {
            kind: crate::events::EventKind::ApiStarted,
            message: "operator API serving".into(),
            ..NewEvent::default()
        });
        // SIGTERM/SIGINT are handled by `crate::signals` (a clean stop; the socket goes when daxvisor returns).
        let limits = ctx.limits.clone();
        let router = super::routes::router(ctx);
        let conns: Conns = Arc::default();
        let mut next_id: u64 = 0;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.changed() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("operator API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let open = conns.lock().unwrap_or_else(|e| e.into_inner()).len();
            if open >= MAX_CONNECTIONS {
                if evict_idle(&conns) {
                    limits.connections_evicted.fetch_add(1, Ordering::Relaxed);
                } else {
                    limits.connections_refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(folded) = limits.refused_lines.hit() {
                        tracing::warn!(
                            refused_since_last_line = folded,
                            "operator API: {MAX_CONNECTIONS} connections open, every one busy; closing a new one \
                             (one line per burst; daxvisor_api_connections_refused counts each)"
                        );
                    }
                    continue;
                }
            }
            next_id += 1;
            let id = next_id;
            let busy = ConnBusy::default();
            let close = Arc::new(tokio::sync::Notify::new());
            conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
                id,
                Conn {
                    accepted: Instant::now(),
                    busy: busy.clone(),
                    close: close.clone(),
                },
            );
            // Every request carries its connection's busy mark and the limits' counters; the connection is busy
            // while a request is in progress.
            let (router, limits2) = (router.clone(), limits.clone());
            let service = TowerToHyperService::new(tower::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(busy.clone());
                    req.extensions_mut().insert(limits2.clone());
                    let guard = busy.hold();
                    let call = tower::ServiceExt::oneshot(router.clone(), req);
                    async move {
                        let r = call.await;
                        drop(guard);
                        r
                    }
                },
            ));
            let conns = conns.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 * 1024);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        tracing::debug!("operator API connection: {e}");
                    },
                    _ = stop.changed() => {
                        // A request still running (a removal the guest acknowledged as the VM stopped) gets its
                        // answer; an idle connection closes at once. The server waits SHUTDOWN_GRACE at most.
                        conn.as_mut().graceful_shutdown();
                        if let Err(e) = conn.as_mut().await {
                            tracing::debug!("operator API connection at stop: {e}");
                        }
                    }
                    _ = close.notified() => tracing::debug!("operator API: idle connection closed for a new client"),
                }
                conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            });
        }
        // Stopping: let the connections finish their answers (each removes itself when done), within the grace.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !conns.lock().unwrap_or_else(|e| e.into_inner()).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
}
