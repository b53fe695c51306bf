//! `--metrics-addr 127.0.0.1:PORT`: `GET /metrics` (and nothing else) over HTTP on a loopback TCP port, for a
//! Prometheus that cannot scrape a Unix socket. Opt-in and loopback only (the configuration refuses any other
//! address): the metrics name regions and files, and the operator API with its changes stays on the socket.
//! Its own thread and current-thread runtime, with the API thread's seccomp list (accept, epoll, send).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::context::ApiContext;

#[derive(Debug, thiserror::Error)]
#[error("--metrics-addr {addr}: {op}: {source}")]
pub struct MetricsListenerError {
    addr: SocketAddr,
    op: &'static str,
    #[source]
    source: std::io::Error,
}

/// The running listener; dropping it stops it.
pub struct MetricsListener {
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl MetricsListener {
    /// Bind `addr` (now, before capabilities are dropped) and serve `ctx`'s metrics on a new thread.
    pub fn start(addr: SocketAddr, ctx: Arc<ApiContext>) -> Result<Self, MetricsListenerError> {
        let err = |op, source| MetricsListenerError { addr, op, source };
        let listener = TcpListener::bind(addr).map_err(|e| err("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err("set_nonblocking", e))?;
        let bound = listener.local_addr().map_err(|e| err("local_addr", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err("start a runtime", e))?;
        let (shutdown, mut rx) = watch::channel(false);
        let router = axum::Router::new()
            .route("/metrics", axum::routing::get(super::metrics::get))
            .with_state(ctx);
        let thread = crate::threads::spawn("metrics", crate::seccomp::ThreadKind::Api, move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("metrics listener: cannot use the socket: {e}");
                        return;
                    }
                };
                let stop = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!("metrics listener: {e}");
                }
            });
        })
        .map_err(|e| err("spawn its thread", e))?;
        tracing::info!(addr = %bound, "metrics listening (GET /metrics)");
        Ok(MetricsListener {
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            crate::threads::join("metrics", t);
        }
    }
}
