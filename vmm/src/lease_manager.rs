//! The VM's layout-lease manager: one [`Mapper`] over the VM's pmem regions, and the host guard on the event
//! loop. Every region is registered before its device is built, so the device's flushes run under transient
//! pins (a punch waits for a flush in flight). While the VM runs, a foreign process that opens or truncates a
//! backing file the VMM opened alone is seen at once (the kernel breaks the VMM's write lease), handled as a
//! whole-file break, logged and recorded.
//!
//! Until the agent channel connects guest holders, break and revoke notices have nobody to go to: they are
//! logged ([`LogNotifier`]).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use daxvisor_mapper::{
    guard_signal, BreakNotice, BreakNotifier, HostGuard, Mapper, MapperError, RegionDesc, RegionId,
    RevokeNotice,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::pmem::flush::FlushFence;
use crate::pmem::Backing;

/// How often the guard retries taking its lease on files a foreign open took it from.
const REARM_INTERVAL: Duration = Duration::from_secs(1);

/// Break notices with no guest channel to carry them: logged.
pub struct LogNotifier;

impl BreakNotifier for LogNotifier {
    fn break_notice(&self, n: &BreakNotice) {
        tracing::warn!(owner = %n.owner, region = %n.region, reason = n.reason, leases = ?n.leases, "break notice");
    }
    fn revoked(&self, n: &RevokeNotice) {
        tracing::warn!(owner = %n.owner, region = %n.region, leases = ?n.leases, dma_torn_down = ?n.dma_torn_down, "leases revoked");
    }
}

pub struct LeaseManager {
    mapper: Mapper,
    guard: Arc<HostGuard>,
}

impl LeaseManager {
    /// Must run on the thread that runs the event loop, before any other thread is spawned: the guard's signal
    /// is blocked here and every later thread inherits the mask (see the mapper crate's guard module).
    pub fn new() -> Result<Self, MapperError> {
        let mapper = Mapper::new(Arc::new(LogNotifier), None);
        let guard = Arc::new(HostGuard::new(mapper.clone(), guard_signal())?);
        Ok(LeaseManager { mapper, guard })
    }

    pub fn mapper(&self) -> &Mapper {
        &self.mapper
    }

    /// What a pmem device's flush worker holds around each flush batch.
    pub fn fence(&self, region: RegionId) -> FlushFence {
        FlushFence::new(self.mapper.clone(), region)
    }

    /// Register a pmem backing mapped at guest address `gpa` and, where its layout can change, guard its file.
    /// A file that is already open elsewhere cannot be guarded (the kernel grants a write lease only to a lone
    /// opener): warned, not fatal.
    pub fn add_pmem_region(&self, b: &Backing, gpa: u64) -> Result<RegionId, MapperError> {
        let file = b.file().try_clone().map_err(|e| MapperError::Io {
            op: "dup backing file",
            source: e,
        })?;
        let id = self.mapper.add_region(
            RegionDesc::new(Arc::new(file), 0, b.size(), b.kind())
                .with_mapping(b.mapping().clone())
                .with_iova(gpa)
                .with_name(b.id()),
        )?;
        if b.kind().has_layout() {
            if let Err(e) = self.guard.arm(id) {
                tracing::warn!(
                    id = b.id(),
                    path = %b.path().display(),
                    error = %e,
                    "cannot guard the backing file (is it open elsewhere?); foreign opens will not be seen"
                );
            }
        }
        Ok(id)
    }

    /// At VM end: end every owner still registered (their leases and pins go), one log line each.
    pub fn end_owners(&self) {
        for owner in self.mapper.snapshot().owners {
            match self.mapper.owner_exit(owner.id) {
                Ok(()) => tracing::info!(
                    owner = %owner.name,
                    leases = owner.leases.len(),
                    pins = owner.pins.len(),
                    "owner ended at VM stop"
                ),
                Err(e) => tracing::warn!(owner = %owner.name, "cannot end owner at VM stop: {e}"),
            }
        }
    }

    /// The event-loop side: the guard's signalfd and its re-arm timer.
    pub fn subscriber(&self) -> std::io::Result<GuardSubscriber> {
        let mut timer = TimerFd::new()?;
        timer.reset(REARM_INTERVAL, Some(REARM_INTERVAL))?;
        Ok(GuardSubscriber {
            guard: self.guard.clone(),
            timer,
        })
    }
}

pub struct GuardSubscriber {
    guard: Arc<HostGuard>,
    timer: TimerFd,
}

impl MutEventSubscriber for GuardSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.guard.rearm();
            return;
        }
        for ev in self.guard.service() {
            match &ev.outcome {
                Ok(()) => tracing::warn!(
                    region = %ev.region,
                    notified = ?ev.notified,
                    revoked = ?ev.revoked,
                    answered_in_ms = ev.answered_in.as_millis() as u64,
                    "host guard: a foreign process opened a backing file; whole-file break done"
                ),
                Err(why) => tracing::error!(
                    region = %ev.region,
                    answered_in_ms = ev.answered_in.as_millis() as u64,
                    "host guard: a foreign process opened a backing file while it is held: {why}"
                ),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.guard.fd(), "guard signalfd"),
            (self.timer.as_raw_fd(), "guard timer"),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                tracing::error!("cannot watch the {what}: {e}");
            }
        }
    }
}
