//! The operator API's bounds on what a client can hold, each counted (`GET /metrics`) and documented in
//! `docs/operator-api.md`:
//!
//! - [`BODY_TIMEOUT`]: a request body must arrive within it once the headers did (a client that announces 100
//!   bytes and sends 2 gets 408 and its connection is closed).
//! - [`MAX_FOLLOWERS`]: `GET /events?follow=true` streams at once; one more gets 503.
//! - [`super::server::MAX_CONNECTIONS`]: connections at once. When all are taken, a new client still gets in:
//!   the connection accepted first among those doing nothing for anyone (waiting for a request, or for a body
//!   still on its way; not running a request, not following) is closed for it; only when every connection is
//!   busy is the new one closed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::log_burst::Burst;

/// How long a request body may take to arrive, after its headers.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// `events --follow` streams served at once.
pub const MAX_FOLLOWERS: usize = 16;

/// What the limits refused or closed, since the start.
#[derive(Debug, Default)]
pub struct LimitCounts {
    /// Requests whose body did not arrive within [`BODY_TIMEOUT`] (408).
    pub body_timeouts: AtomicU64,
    /// Follow requests over [`MAX_FOLLOWERS`] (503).
    pub followers_refused: AtomicU64,
    /// Idle connections closed to make room for a new client.
    pub connections_evicted: AtomicU64,
    /// New connections closed because every connection was busy.
    pub connections_refused: AtomicU64,
    followers: AtomicUsize,
    /// One log line per burst of refusals.
    pub refused_lines: Burst,
}

impl LimitCounts {
    /// A follower's place, or `None` when [`MAX_FOLLOWERS`] stream already (counted).
    pub fn follower(self: &Arc<Self>) -> Option<FollowerSlot> {
        let taken = self
            .followers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_FOLLOWERS).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.followers_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(FollowerSlot(self.clone()))
    }

    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A follower's place, given back when its stream ends.
#[derive(Debug)]
pub struct FollowerSlot(Arc<LimitCounts>);

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's work in progress: requests running and follow streams (busy), and of those requests, the
/// ones still waiting for their body (not doing anything for anyone yet). A connection whose every request
/// waits for a body may be closed to make room. The server puts one in every request's extensions.
#[derive(Clone, Debug, Default)]
pub struct ConnBusy {
    busy: Arc<AtomicUsize>,
    reading: Arc<AtomicUsize>,
}

impl ConnBusy {
    /// Busy while the guard lives.
    pub fn hold(&self) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.busy.clone())
    }
    /// Waiting for a body while the guard lives.
    pub fn reading(&self) -> BusyGuard {
        self.reading.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.reading.clone())
    }
    /// Nothing but body waits in progress.
    pub fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) <= self.reading.load(Ordering::SeqCst)
    }
}

/// See [`ConnBusy::hold`].
#[derive(Debug)]
pub struct BusyGuard(Arc<AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_are_bounded_counted_and_given_back() {
        let l = Arc::new(LimitCounts::default());
        let slots: Vec<_> = (0..MAX_FOLLOWERS).map(|_| l.follower().unwrap()).collect();
        assert!(l.follower().is_none());
        assert_eq!(l.get(&l.followers_refused), 1);
        drop(slots);
        assert!(l.follower().is_some());
    }
}
