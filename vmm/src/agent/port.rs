//! The agent port's backend on the event loop, and the bounded inbox it fills for the service thread.
//!
//! The event loop never waits here: bytes past [`MAX_QUEUED_BYTES`] not yet taken by the service are dropped
//! (counted; the session's stream reader resynchronises on the next frame), and opens and closes are never
//! dropped (a close followed by an open collapses into one "new session" event when the queue is long).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use daxvisor_devices::virtio::console::{PortBackend, PortSender};

/// Guest bytes the inbox holds before it drops more.
pub const MAX_QUEUED_BYTES: usize = 256 * 1024;

/// Bytes events are merged up to this size.
const MERGE_BYTES: usize = 64 * 1024;

/// What the service thread takes from the inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// End the current session, if any; then, when `open`, start the port opening number `session`.
    Session { open: bool, session: u64 },
    /// Bytes the guest wrote.
    Bytes(Vec<u8>),
    /// The VM is stopping.
    Shutdown,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<PortEvent>,
    bytes: usize,
    shutdown: bool,
}

/// The queue between the port backend and the service thread.
#[derive(Default)]
pub struct PortInbox {
    queue: Mutex<Queue>,
    ready: Condvar,
    dropped_bytes: AtomicU64,
}

impl PortInbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every update leaves the queue consistent; keep serving after a panic elsewhere.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_bytes(&self, data: &[u8]) {
        let mut q = self.lock();
        if q.bytes + data.len() > MAX_QUEUED_BYTES {
            drop(q);
            self.dropped_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return;
        }
        q.bytes += data.len();
        match q.events.back_mut() {
            Some(PortEvent::Bytes(b)) if b.len() + data.len() <= MERGE_BYTES => {
                b.extend_from_slice(data)
            }
            _ => q.events.push_back(PortEvent::Bytes(data.to_vec())),
        }
        drop(q);
        self.ready.notify_one();
    }

    fn push_session(&self, open: bool, session: u64) {
        let mut q = self.lock();
        // "End, then maybe start" twice in a row is the same as the second alone.
        if let Some(PortEvent::Session { .. }) = q.events.back() {
            q.events.pop_back();
        }
        q.events.push_back(PortEvent::Session { open, session });
        drop(q);
        self.ready.notify_one();
    }

    /// Asks the service thread to end its session and stop.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.ready.notify_all();
    }

    /// The next event, waiting for one; [`PortEvent::Shutdown`] once asked to stop.
    pub fn next(&self) -> PortEvent {
        let mut q = self.lock();
        loop {
            if q.shutdown {
                return PortEvent::Shutdown;
            }
            if let Some(ev) = q.events.pop_front() {
                if let PortEvent::Bytes(b) = &ev {
                    q.bytes -= b.len();
                }
                return ev;
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Guest bytes dropped because the service fell behind.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes.load(Ordering::Relaxed)
    }
}

/// The [`PortBackend`] of the agent port.
#[derive(Clone, Default)]
pub struct AgentPort {
    inbox: Arc<PortInbox>,
    /// The port's sender, known once the console device exists; it numbers the guest's openings.
    sender: Arc<OnceLock<PortSender>>,
}

impl AgentPort {
    /// A backend with an empty inbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives the backend the port's sender (after the console device is built).
    pub fn set_sender(&self, sender: PortSender) {
        let _ = self.sender.set(sender);
    }

    /// The inbox the service thread reads.
    pub fn inbox(&self) -> Arc<PortInbox> {
        self.inbox.clone()
    }
}

impl PortBackend for AgentPort {
    fn guest_wrote(&mut self, data: &[u8]) {
        self.inbox.push_bytes(data);
    }

    fn guest_open(&mut self, open: bool) {
        let session = self.sender.get().map_or(0, PortSender::session);
        self.inbox.push_session(open, session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_bounded_and_sessions_never_dropped() {
        let mut port = AgentPort::new();
        let inbox = port.inbox();
        port.guest_open(true);
        let chunk = vec![1u8; 32 * 1024];
        for _ in 0..(MAX_QUEUED_BYTES / chunk.len() + 4) {
            port.guest_wrote(&chunk);
        }
        assert_eq!(inbox.dropped_bytes(), 4 * chunk.len() as u64);
        port.guest_open(false);
        port.guest_open(true);
        assert_eq!(
            inbox.next(),
            PortEvent::Session {
                open: true,
                session: 0
            }
        );
        let mut total = 0;
        loop {
            match inbox.next() {
                PortEvent::Bytes(b) => total += b.len(),
                ev => {
                    assert_eq!(
                        ev,
                        PortEvent::Session {
                            open: true,
                            session: 0
                        },
                        "close+open collapse into one new session"
                    );
                    break;
                }
            }
        }
        assert_eq!(total, MAX_QUEUED_BYTES);
        inbox.shutdown();
        assert_eq!(inbox.next(), PortEvent::Shutdown);
    }
}
