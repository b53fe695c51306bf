//! The VM's layout-lease manager: one [`Mapper`] over the VM's pmem regions, and the host guard on its own
//! `host-guard` thread. Every region is registered before its device is built, so the device's flushes run under
//! transient pins (a punch waits for a flush in flight). While the VM runs, a foreign process that opens a
//! backing file is seen before its open completes (fanotify) and refused, held for a whole-file break, or
//! allowed as the region's `guard=` says; a truncate by path is delayed by the kernel lease for a whole-file
//! break. Each is logged once, recorded and counted (the mapper crate's guard module has the mechanics).
//!
//! Break and revoke notices go through the notifier the VM gives it: the agent channel's
//! ([`crate::agent::AgentNotifier`]) for guest owners; [`LogNotifier`] logs them where nothing else listens.
//! Every notice, revoke and guard event is also recorded in the VM's event log ([`RecordingNotifier`]), which
//! the operator API serves.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use daxvisor_mapper::{
    guard_signal, BreakNotice, BreakNotifier, GuardEvent, GuardOutcome, HostGuard, Mapper,
    MapperError, RegionDesc, RegionId, RevokeNotice, SeenBy,
};
use vmm_sys_util::eventfd::EventFd;

use crate::api::events::{EventLog, NewEvent};
use crate::pmem::flush::FlushFence;
use crate::pmem::Backing;

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
    names: Names,
    /// The `host-guard` thread and what stops it.
    guard_thread: Option<(EventFd, std::thread::JoinHandle<()>)>,
    /// The warning that fanotify is not in use was given.
    lease_only_warned: AtomicBool,
}

impl LeaseManager {
    /// Must run on the thread that runs the event loop, before any other thread is spawned: the guard's signal
    /// is blocked here and every later thread inherits the mask (see the mapper crate's guard module).
    /// Notices and guard events are recorded in `events`.
    pub fn new(events: Arc<EventLog>) -> Result<Self, MapperError> {
        Self::with_notifier(Arc::new(LogNotifier), events)
    }

    /// As [`LeaseManager::new`], with the notifier that carries break and revoke notices to holders (the agent
    /// channel's, for a VM that has one). Opens the host guard's fanotify group here, during VM setup and before
    /// capabilities are dropped, and starts the `host-guard` thread: from now on opens of guarded files wait
    /// for its answer, the VMM's own included, so it runs for as long as this manager lives.
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
        let io = |op: &'static str| move |source| MapperError::Io { op, source };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(io("host guard eventfd"))?;
        let stop_fd = stop.as_raw_fd();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let (g, log, n) = (guard.clone(), events, names.clone());
        let thread = std::thread::Builder::new()
            .name("host-guard".into())
            .spawn(move || {
                let setup = g.set_thread().map_err(|e| e.to_string()).and_then(|()| {
                    crate::seccomp::apply_for_thread(crate::seccomp::ThreadKind::Guard)
                        .map_err(|e| e.to_string())
                });
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    g.run(stop_fd, |ev| log_guard_event(ev, &log, &n));
                }
            })
            .map_err(io("spawn the host-guard thread"))?;
        let started = ready
            .recv()
            .unwrap_or_else(|_| Err("the host-guard thread ended at start".into()));
        if let Err(why) = started {
            let _ = thread.join();
            return Err(MapperError::Io {
                op: "start the host-guard thread",
                source: std::io::Error::other(why),
            });
        }
        Ok(LeaseManager {
            mapper,
            guard,
            names,
            guard_thread: Some((stop, thread)),
            lease_only_warned: AtomicBool::new(false),
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
            self.warn_if_lease_only();
            if let Err(e) = self.guard.arm(id, b.guard()) {
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

    /// Without fanotify (no CAP_SYS_ADMIN) the kernel lease is all the guard has: said once, at start.
    fn warn_if_lease_only(&self) {
        let Some(why) = self.guard.fanotify_unavailable() else {
            return;
        };
        if self.lease_only_warned.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            error = %why,
            "host guard: fanotify permission events are not available (they need CAP_SYS_ADMIN); only the kernel \
             write lease guards the backing files: a foreign open or truncate is delayed for a whole-file break, \
             never refused (guard=deny and guard=hold refuse nothing), its pid and command are not known, and a \
             file opened elsewhere is not guarded at all"
        );
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
}

impl Drop for LeaseManager {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.guard_thread.take() {
            if let Err(e) = stop.write(1) {
                tracing::error!("cannot stop the host-guard thread: {e}");
                return;
            }
            let _ = thread.join();
        }
    }
}

/// One log line for a guard event, and its record in the VM's event log.
fn log_guard_event(ev: &GuardEvent, log: &EventLog, names: &Names) {
    let ids = ev
        .regions
        .iter()
        .map(|r| name_of(names, *r))
        .collect::<Vec<_>>()
        .join(",");
    let pid = ev.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let why = ev.refused_by.as_deref().unwrap_or("");
    let what = match (ev.seen_by, ev.outcome) {
        (SeenBy::KernelLease, _) if why.is_empty() => {
            "host guard: a foreign truncate or an open fanotify cannot see (kernel lease); delayed for a whole-file break, whole-file break done".to_owned()
        }
        (SeenBy::KernelLease, _) => format!(
            "host guard: a foreign truncate or an open fanotify cannot see (kernel lease) while the file is held: {why}; delayed, then let through (a kernel lease cannot refuse)"
        ),
        (_, GuardOutcome::Allowed) => "host guard: foreign open of a backing file allowed".to_owned(),
        (_, GuardOutcome::Denied) => "host guard: foreign open of a backing file denied (EPERM)".to_owned(),
        (_, GuardOutcome::HeldAllowed) => {
            "host guard: foreign open of a backing file held; whole-file break done, allowed".to_owned()
        }
        (_, GuardOutcome::HeldDenied | GuardOutcome::Delayed) => format!(
            "host guard: foreign open of a backing file held and denied (EPERM) while the file is held: {why}"
        ),
    };
    let answered_in_ms = ev.answered_in.as_millis() as u64;
    match ev.outcome {
        GuardOutcome::HeldDenied => tracing::error!(
            id = %ids, pid = %pid, command = %ev.command, mode = %ev.mode, outcome = %ev.outcome,
            policy = %ev.policy, notified = ?ev.notified, revoked = ?ev.revoked, answered_in_ms, "{what}"
        ),
        _ => tracing::warn!(
            id = %ids, pid = %pid, command = %ev.command, mode = %ev.mode, outcome = %ev.outcome,
            policy = %ev.policy, notified = ?ev.notified, revoked = ?ev.revoked, answered_in_ms, "{what}"
        ),
    }
    let who = match ev.seen_by {
        SeenBy::Fanotify => format!(
            "a foreign process opened the backing file (pid {pid}, {:?}, mode {})",
            ev.command, ev.mode
        ),
        SeenBy::KernelLease => {
            "a foreign process truncated or opened the backing file unseen by fanotify (kernel lease)"
                .to_owned()
        }
    };
    log.push(NewEvent {
        kind: "guard",
        region: Some(name_of(names, ev.region)),
        owners: ev.notified.iter().map(|o| o.to_raw()).collect(),
        errno: ev
            .refused_by
            .as_deref()
            .and_then(|w| w.split(':').next())
            .map(str::to_owned),
        message: match &ev.refused_by {
            None => format!(
                "{who}: {}; {} holder(s) notified, {} revoked, answered in {answered_in_ms} ms",
                ev.outcome,
                ev.notified.len(),
                ev.revoked.len()
            ),
            Some(why) => format!("{who}: {} while it is held: {why}", ev.outcome),
        },
    });
}
