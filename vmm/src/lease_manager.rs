//! The VM's layout-lease manager: one [`Mapper`] over the VM's pmem regions, and the host guard on the event
//! loop. Every region is registered before its device is built, so the device's flushes run under transient
//! pins (a punch waits for a flush in flight). While the VM runs, a foreign process that opens or truncates a
//! backing file the VMM opened alone is seen at once (the kernel breaks the VMM's write lease), handled as a
//! whole-file break, logged and recorded.
//!
//! Break and revoke notices go through the notifier the VM gives it: the agent channel's
//! ([`crate::agent::AgentNotifier`]) for guest owners; [`LogNotifier`] logs them where nothing else listens.
//! Every notice, revoke and guard event is also recorded in the VM's event log ([`RecordingNotifier`]), which
//! the operator API serves.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daxvisor_mapper::{
    guard_signal, BreakNotice, BreakNotifier, HostGuard, Mapper, MapperError, RegionDesc, RegionId,
    RevokeNotice,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::events::{EventLog, NewEvent};
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

/// Region names as the operator gave them, for events.
type Names = Arc<Mutex<HashMap<RegionId, String>>>;

fn name_of(names: &Names, region: RegionId) -> String {
    names
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&region)
        .cloned()
        .unwrap_or_else(|| region.to_string())
}

/// Records every notice in the event log, then hands it to the notifier that delivers it.
pub struct RecordingNotifier {
    inner: Arc<dyn BreakNotifier>,
    events: Arc<EventLog>,
    names: Names,
}

impl BreakNotifier for RecordingNotifier {
    fn break_notice(&self, n: &BreakNotice) {
        self.events.push(NewEvent {
            kind: "break-notice",
            region: Some(name_of(&self.names, n.region)),
            owners: vec![n.owner.to_raw()],
            message: format!(
                "{} asked to release {} lease(s) for a {} by {}",
                n.owner,
                n.leases.len(),
                n.reason,
                n.break_id
            ),
            ..NewEvent::default()
        });
        self.inner.break_notice(n);
    }
    fn revoked(&self, n: &RevokeNotice) {
        self.events.push(NewEvent {
            kind: "revoked",
            region: Some(name_of(&self.names, n.region)),
            owners: vec![n.owner.to_raw()],
            message: format!(
                "{} lost {} lease(s) at the deadline of {} ({} DMA mapping(s) torn down)",
                n.owner,
                n.leases.len(),
                n.break_id,
                n.dma_torn_down.len()
            ),
            ..NewEvent::default()
        });
        self.inner.revoked(n);
    }
}

pub struct LeaseManager {
    mapper: Mapper,
    guard: Arc<HostGuard>,
    events: Arc<EventLog>,
    names: Names,
}

impl LeaseManager {
    /// Must run on the thread that runs the event loop, before any other thread is spawned: the guard's signal
    /// is blocked here and every later thread inherits the mask (see the mapper crate's guard module).
    /// Notices and guard events are recorded in `events`.
    pub fn new(events: Arc<EventLog>) -> Result<Self, MapperError> {
        Self::with_notifier(Arc::new(LogNotifier), events)
    }

    /// As [`LeaseManager::new`], with the notifier that carries break and revoke notices to holders (the agent
    /// channel's, for a VM that has one).
    pub fn with_notifier(
        notifier: Arc<dyn BreakNotifier>,
        events: Arc<EventLog>,
    ) -> Result<Self, MapperError> {
        let names = Names::default();
        let recording = RecordingNotifier {
            inner: notifier,
            events: events.clone(),
            names: names.clone(),
        };
        let mapper = Mapper::new(Arc::new(recording), None);
        let guard = Arc::new(HostGuard::new(mapper.clone(), guard_signal())?);
        Ok(LeaseManager {
            mapper,
            guard,
            events,
            names,
        })
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
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, b.id().to_owned());
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

    /// The event-loop side: the guard's signalfd and its re-arm timer. The whole-file breaks themselves run on
    /// the `host-guard` thread this starts: a break waits for guest holders, whose answers arrive through the
    /// event loop (the agent port), so it must never wait on it.
    pub fn subscriber(&self) -> std::io::Result<GuardSubscriber> {
        let mut timer = TimerFd::new()?;
        timer.reset(REARM_INTERVAL, Some(REARM_INTERVAL))?;
        // One pending wake-up is enough: the worker looks at every guarded file each time it runs.
        let (work, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let guard = self.guard.clone();
        let (log, names) = (self.events.clone(), self.names.clone());
        std::thread::Builder::new()
            .name("host-guard".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply_for_thread(crate::seccomp::ThreadKind::Guard)
                {
                    tracing::error!("host guard thread not started: {e}");
                    return;
                }
                while rx.recv().is_ok() {
                    // Everything armed now, the breaking files included (they are disarmed by `service`).
                    let armed = guard.rearm();
                    log_guard_events(&guard.service(), &log, &names);
                    rearm_soon(&guard, armed);
                }
            })?;
        Ok(GuardSubscriber {
            guard: self.guard.clone(),
            timer,
            work,
        })
    }
}

pub struct GuardSubscriber {
    guard: Arc<HostGuard>,
    timer: TimerFd,
    work: std::sync::mpsc::SyncSender<()>,
}

/// After a foreign open the guard can take its kernel lease back only once the opener closed the file. Most
/// openers are short (a backup reading a block, a tool checking a header), so try every few milliseconds for a
/// while before leaving it to the one-second timer: a file is unguarded for as short a time as possible.
fn rearm_soon(guard: &HostGuard, armed_before: usize) {
    const TRIES: u32 = 100;
    const EVERY: Duration = Duration::from_millis(10);
    for _ in 0..TRIES {
        if guard.rearm() >= armed_before {
            return;
        }
        std::thread::sleep(EVERY);
    }
}

/// Reads every queued siginfo from the guard's (non-blocking) signalfd. The kernel directs the lease-break
/// signal at the event-loop thread, so only this thread can take it off the signalfd; the worker finds the
/// breaking files by asking each for its lease state.
fn drain_signalfd(fd: std::os::fd::RawFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    loop {
        // SAFETY: reads at most `info.len()` bytes into a buffer of that size; `fd` is the guard's signalfd,
        // which lives as long as the guard this subscriber holds.
        let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) };
        if n != info.len() as isize {
            return;
        }
    }
}

/// Logs each guard event and records it in the VM's event log.
fn log_guard_events(events: &[daxvisor_mapper::GuardEvent], log: &EventLog, names: &Names) {
    for ev in events {
        log.push(NewEvent {
            kind: "guard",
            region: Some(name_of(names, ev.region)),
            owners: ev.notified.iter().map(|o| o.to_raw()).collect(),
            errno: None,
            message: match &ev.outcome {
                Ok(()) => format!(
                    "a foreign process opened the backing file; whole-file break done in {} ms ({} notified, {} revoked)",
                    ev.answered_in.as_millis(),
                    ev.notified.len(),
                    ev.revoked.len()
                ),
                Err(why) => format!("a foreign process opened the backing file while it is held: {why}"),
            },
        });
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

impl MutEventSubscriber for GuardSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.guard.rearm();
            return;
        }
        drain_signalfd(self.guard.fd());
        // Full means a wake-up is already pending, which covers this one too.
        let _ = self.work.try_send(());
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
