//! The host side of a console port.
//!
//! Guest to host: the device hands every byte the guest writes to the port's [`PortBackend`] on the event loop,
//! and tells it when the guest opens or closes the port (or resets the device). Host to guest: a
//! [`PortSender`], cloneable and usable from any thread, queues whole messages in a bounded buffer and wakes the
//! event loop, which copies them into the guest's receive buffers as the guest posts them. A message that does
//! not fit (the guest stopped draining its queue) or that arrives while the guest has the port closed is
//! dropped and counted: a guest costs the host at most [`super::PORT_RX_LIMIT`] bytes per port.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::metrics::ConsoleMetrics;

/// Where a port's guest output goes, and who hears about the guest opening and closing it. Called on the
/// event loop: must not block.
pub trait PortBackend: Send {
    /// Bytes the guest wrote to the port, in order.
    fn guest_wrote(&mut self, data: &[u8]);

    /// The guest opened (`true`) or closed (`false`) the port; a device reset closes every open port.
    fn guest_open(&mut self, _open: bool) {}
}

pub(crate) struct Inbox {
    pub(crate) bytes: VecDeque<u8>,
    /// The guest has the port open: messages are accepted.
    pub(crate) open: bool,
    /// How many times the guest opened the port: the current opening's number (its session).
    pub(crate) opens: u64,
}

pub(crate) struct Shared {
    inbox: Mutex<Inbox>,
    limit: usize,
    wake: Arc<EventFd>,
    metrics: Arc<ConsoleMetrics>,
}

impl Shared {
    pub(crate) fn new(limit: usize, wake: Arc<EventFd>, metrics: Arc<ConsoleMetrics>) -> Self {
        Shared {
            inbox: Mutex::new(Inbox {
                bytes: VecDeque::new(),
                open: false,
                opens: 0,
            }),
            limit,
            wake,
            metrics,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inbox> {
        // Every update leaves the inbox consistent; keep serving after a panic elsewhere.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens or closes the port for host messages; closing drops what was queued (counted as one message).
    pub(crate) fn set_open(&self, open: bool) {
        let mut inbox = self.lock();
        inbox.open = open;
        if open {
            inbox.opens += 1;
        }
        if !open && !inbox.bytes.is_empty() {
            self.metrics.add_rx_dropped(inbox.bytes.len());
            inbox.bytes = VecDeque::new();
        }
    }
}

/// Queues messages for the guest on one port. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct PortSender(pub(crate) Arc<Shared>);

impl PortSender {
    /// Queues `msg` for the guest, whole or not at all. Returns `false` (and counts the drop) when the guest has
    /// the port closed or the port's buffer has no room for all of it.
    pub fn send(&self, msg: &[u8]) -> bool {
        self.send_to(None, msg)
    }

    /// As [`PortSender::send`], but only while the guest's opening number `session` ([`PortSender::session`])
    /// lasts: an answer for a session the guest already closed never reaches the next one.
    pub fn send_in_session(&self, session: u64, msg: &[u8]) -> bool {
        self.send_to(Some(session), msg)
    }

    /// The number of the guest's current (or last) opening of the port; 0 before the first.
    pub fn session(&self) -> u64 {
        self.0.lock().opens
    }

    fn send_to(&self, session: Option<u64>, msg: &[u8]) -> bool {
        let shared = &self.0;
        {
            let mut inbox = shared.lock();
            let other_session = session.is_some_and(|s| s != inbox.opens);
            if !inbox.open || other_session || inbox.bytes.len() + msg.len() > shared.limit {
                drop(inbox);
                shared.metrics.add_rx_dropped(msg.len());
                return false;
            }
            inbox.bytes.extend(msg);
        }
        if let Err(e) = shared.wake.write(1) {
            tracing::warn!("cannot wake the console device: {e}");
        }
        true
    }

    /// Whether the guest has the port open now.
    pub fn is_open(&self) -> bool {
        self.0.lock().open
    }

    /// Bytes queued and not yet delivered to the guest.
    pub fn queued(&self) -> usize {
        self.0.lock().bytes.len()
    }
}
