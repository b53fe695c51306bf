//! The agent service: between the virtio-console port `org.daxvisor.agent.0` and the mapper
//! (docs/agent-protocol.md).
//!
//! - [`port`]: the port's backend on the event loop; it only queues the guest's bytes and its opens and closes
//!   (bounded) for the service thread.
//! - [`session`]: one session per opening of the port: hello, owners, requests answered from the mapper.
//! - [`slow`]: the worker thread for mapper calls that take long (pin, prepare), so they never hold up the
//!   session's other requests (a release answering a break must not wait behind a gigabyte pin).
//! - [`notifier`]: the mapper's [`BreakNotifier`](daxvisor_mapper::BreakNotifier) for agent owners: a break or
//!   revoke notice for an owner of the current session becomes a message on the port.
//!
//! Threads: the event loop only copies bytes into the port inbox; the `agent` thread decodes and answers; the
//! `agent-slow` thread runs pins and prepares. The guest closing the port, resetting the device or the VM
//! stopping ([`AgentService`] dropped) ends the session: every owner it opened exits, releasing all it held.
//!
//! For other VMM components the surface is the notifier: a change asked through the mapper (the operator API's
//! punch, the host guard's foreign open) reaches the guest holding the range through it, nothing else to call.

pub mod notifier;
pub mod port;
pub mod session;
pub mod slow;

#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

use daxvisor_devices::virtio::console::PortSender;

use daxvisor_mapper::Mapper;

pub use notifier::{AgentNotifier, Routes};
pub use port::{AgentPort, PortInbox};
pub use session::Outbox;

/// What the agent service counts, for the operator API's metrics.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Sessions open now (0 or 1: the port carries one at a time).
    pub sessions_open: AtomicU64,
    /// Sessions started since the VM started.
    pub sessions_total: AtomicU64,
    /// Malformed frames answered with an error and skipped.
    pub frames_rejected: AtomicU64,
}

impl Outbox for PortSender {
    fn send(&self, session: u64, frame: &[u8]) -> bool {
        self.send_in_session(session, frame)
    }
}

/// The running service: the `agent` thread and what feeds it. Dropping it ends the session (owners exit) and
/// joins the thread.
pub struct AgentService {
    inbox: Arc<PortInbox>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl AgentService {
    /// Starts the service thread for the port whose backend `port` is, answering through `out`. `routes` is
    /// shared with the [`AgentNotifier`] given to the mapper.
    pub fn start(
        mapper: Mapper,
        regions: Arc<crate::region_registry::RegionRegistry>,
        port: &AgentPort,
        out: Arc<dyn Outbox>,
        routes: Arc<Routes>,
        counters: Arc<AgentCounters>,
        reclaim: Arc<crate::reclaim::Reclaim>,
    ) -> std::io::Result<Self> {
        let inbox = port.inbox();
        let slow = slow::SlowWorker::spawn(mapper.clone(), out.clone())?;
        let mut svc = session::Service::new(mapper, regions, out, routes, slow, counters, reclaim);
        let rx = inbox.clone();
        let thread = crate::threads::spawn(
            "agent",
            crate::seccomp::ThreadKind::AgentService,
            move || svc.run(&rx),
        )?;
        Ok(AgentService {
            inbox,
            thread: Some(thread),
        })
    }
}

impl Drop for AgentService {
    fn drop(&mut self) {
        self.inbox.shutdown();
        if let Some(t) = self.thread.take() {
            crate::threads::join("agent", t);
        }
    }
}
