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
    guard_signal, Access, BreakNotice, BreakNotifier, GuardEvent, GuardOutcome, HostGuard, Mapper,
    MapperError, RegionDesc, RegionId, RevokeNotice, SeenBy,
};
use vmm_sys_util::eventfd::EventFd;

use crate::events::{EventLog, NewEvent};
use crate::pmem::flush::FlushFence;
use crate::pmem::Backing;
use crate::region_registry::RegionRegistry;

/// Break notices with no guest channel to carry them: logged.
pub struct LogNotifier;

impl BreakNotifier for LogNotifier {
    fn break_notice(&self, n: &BreakNotice) {
        tracing::warn!(owner = %n.owner, region = %n.region, reason = n.reason, leases = n.leases.len(), "break notice");
    }
    fn revoked(&self, n: &RevokeNotice) {
        tracing::warn!(owner = %n.owner, region = %n.region, leases = n.leases.len(), dma_torn_down = n.dma_torn_down.len(), "leases revoked");
    }
}

/// Records every notice in the event log, then hands it to the notifier that delivers it.
pub struct RecordingNotifier {
    inner: Arc<dyn BreakNotifier>,
    events: Arc<EventLog>,
    regions: Arc<RegionRegistry>,
}

impl RecordingNotifier {
    /// Records into `events` under the names in `regions`, then hands each notice to `inner`.
    pub fn new(
        inner: Arc<dyn BreakNotifier>,
        events: Arc<EventLog>,
        regions: Arc<RegionRegistry>,
    ) -> Self {
        RecordingNotifier {
            inner,
            events,
            regions,
        }
    }
}

impl BreakNotifier for RecordingNotifier {
    fn break_notice(&self, n: &BreakNotice) {
        self.events.push(NewEvent {
            kind: crate::events::EventKind::BreakNotice,
            region: Some(self.regions.name_of(n.region)),
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
            kind: crate::events::EventKind::Revoked,
            region: Some(self.regions.name_of(n.region)),
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
    fn break_started(&self, b: &daxvisor_mapper::BreakStarted) {
        let names: Vec<String> = b
            .holders
            .iter()
            .map(|(o, name)| format!("{o} ({name})"))
            .collect();
        self.events.push(NewEvent {
            kind: crate::events::EventKind::BreakStarted,
            region: Some(self.regions.name_of(b.region)),
            range: Some((b.range.start, crate::api::range_len(&b.range))),
            owners: b.holders.iter().map(|(o, _)| o.to_raw()).collect(),
            message: format!(
                "{} of {} {}: waiting on {}",
                b.reason,
                self.regions.name_of(b.region),
                crate::api::range_text(b.range.start, crate::api::range_len(&b.range)),
                names.join(", ")
            ),
            ..NewEvent::default()
        });
    }
    fn holder_released(&self, r: &daxvisor_mapper::HolderReleased) {
        self.events.push(NewEvent {
            kind: crate::events::EventKind::HolderReleased,
            region: Some(self.regions.name_of(r.region)),
            owners: vec![r.owner.to_raw()],
            message: format!(
                "{} ({}) released after {} ms",
                r.owner,
                r.name,
                r.after.as_millis()
            ),
            ..NewEvent::default()
        });
    }
}

/// What the guard calls when a backing file can no longer back the guest (a flag it cannot clear): stops the VM
/// with the reason.
pub type StopVm = Box<dyn Fn(String) + Send + Sync>;

pub struct LeaseManager {
    mapper: Mapper,
    /// Set by [`LeaseManager::stop_vm_with`].
    stop_vm: Arc<std::sync::OnceLock<StopVm>>,
    guard: Arc<HostGuard>,
    /// The `host-guard` thread and what stops it.
    guard_thread: Option<(EventFd, std::thread::JoinHandle<Option<()>>)>,
    /// The warning that fanotify is not in use was given.
    lease_only_warned: AtomicBool,
}

impl LeaseManager {
    /// Must run on the thread that runs the event loop, before any other thread is spawned: the guard's signal
    /// is blocked here and every later thread inherits the mask (see the mapper crate's guard module).
    /// Notices and guard events are recorded in `events`.
    pub fn new(events: Arc<EventLog>, regions: Arc<RegionRegistry>) -> Result<Self, MapperError> {
        Self::with_notifier(Arc::new(LogNotifier), events, regions)
    }

    /// As [`LeaseManager::new`], with the notifier that carries break and revoke notices to holders (the agent
    /// channel's, for a VM that has one). Opens the host guard's fanotify group here, during VM setup and before
    /// capabilities are dropped, and starts the `host-guard` thread: from now on opens of guarded files wait
    /// for its answer, the VMM's own included, so it runs for as long as this manager lives.
    pub fn with_notifier(
        notifier: Arc<dyn BreakNotifier>,
        events: Arc<EventLog>,
        regions: Arc<RegionRegistry>,
    ) -> Result<Self, MapperError> {
        Self::with_dma(notifier, None, events, regions)
    }

    /// As [`LeaseManager::with_notifier`], with the DMA mapper of the VM's passthrough devices (pins for DMA
    /// map their range for the devices).
    pub fn with_dma(
        notifier: Arc<dyn BreakNotifier>,
        dma: Option<Arc<dyn daxvisor_mapper::DmaMapper>>,
        events: Arc<EventLog>,
        regions: Arc<RegionRegistry>,
    ) -> Result<Self, MapperError> {
        let recording = RecordingNotifier::new(notifier, events.clone(), regions.clone());
        let mapper = Mapper::new(Arc::new(recording), dma);
        let guard = Arc::new(HostGuard::new(mapper.clone(), guard_signal())?);
        let io = |op: &'static str| move |source| MapperError::Io { op, source };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(io("host guard eventfd"))?;
        let stop_fd = stop.as_raw_fd();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let stop_vm: Arc<std::sync::OnceLock<StopVm>> = Arc::default();
        let (g, log, n, stop_hook) = (guard.clone(), events, regions, stop_vm.clone());
        let prepared = guard.clone();
        let thread = crate::threads::spawn_prepared(
            "host-guard",
            crate::seccomp::ThreadKind::Guard,
            move || prepared.set_thread().map_err(|e| e.to_string()),
            move || {
                let _ = ready_tx.send(());
                let lines = GuardLines::default();
                g.run(stop_fd, |ev| {
                    log_guard_event(ev, &log, &n, &lines);
                    stop_if_lost(ev, &n, &stop_hook);
                });
                lines.flush();
            },
        )
        .map_err(io("spawn the host-guard thread"))?;
        if ready.recv().is_err() {
            let _ = thread.join();
            return Err(MapperError::Io {
                op: "start the host-guard thread",
                source: std::io::Error::other("it could not set itself up (its log line says why)"),
            });
        }
        Ok(LeaseManager {
            mapper,
            stop_vm,
            guard,
            guard_thread: Some((stop, thread)),
            lease_only_warned: AtomicBool::new(false),
        })
    }

    pub fn mapper(&self) -> &Mapper {
        &self.mapper
    }

    /// How to stop the VM when a backing file can no longer back it (an immutable flag the guard cannot clear):
    /// cleanly, with a message naming the file, the flag and who set it, before the guest's next write fault
    /// would end it with an EFAULT.
    pub fn stop_vm_with(&self, stop: StopVm) {
        let _ = self.stop_vm.set(stop);
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
            self.warn_if_lease_only();
            if let Err(e) = self.guard.arm(id, b.guard()) {
                let by: Vec<String> = daxvisor_mapper::openers_of(b.path())
                    .into_iter()
                    .map(|(h, w)| {
                        if w {
                            format!("{h} for writing")
                        } else {
                            h.to_string()
                        }
                    })
                    .collect();
                tracing::warn!(
                    id = b.id(),
                    path = %b.path().display(),
                    error = %e,
                    "cannot guard the backing file (open elsewhere: {}); foreign opens will not be seen",
                    if by.is_empty() { "?".to_owned() } else { by.join(", ") }
                );
            }
        }
        Ok(id)
    }

    /// Take a region out of the lease manager (a hot-removed or never-attached region): the host guard lets go of
    /// its file, the mapper forgets it (refused, and logged, while anything still holds it).
    pub fn remove_pmem_region(&self, id: RegionId) {
        remove_region(&self.mapper, &self.guard, id);
    }

    /// The host guard (hot remove disarms it for the leaving region's file).
    pub fn guard(&self) -> Arc<HostGuard> {
        self.guard.clone()
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

/// An immutable flag the guard could not clear: the guest's next write fault on the file would fail, so the VM
/// is stopped now, saying why. (An append-only flag fails only punches and new opens for writing: logged.)
fn stop_if_lost(ev: &GuardEvent, regions: &RegionRegistry, stop: &std::sync::OnceLock<StopVm>) {
    let flags = ev.detail.as_deref().unwrap_or("");
    if ev.access != Access::Flags
        || ev.outcome != GuardOutcome::NotUndone
        || !flags.contains("immutable")
    {
        return;
    }
    let Some(stop) = stop.get() else { return };
    let pid = ev.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let path = regions
        .by_id(ev.region)
        .map_or_else(|| "?".to_owned(), |r| r.path().display().to_string());
    stop(format!(
        "pmem {}: the {flags} flag was set on its backing file {path} by pid {pid} ({}) and cannot be cleared \
         ({}); stopped before the guest's next write to it fails",
        regions.name_of(ev.region),
        ev.command,
        ev.refused_by.as_deref().unwrap_or("?")
    ));
}

/// Repeated allowed opens (the same command reading the file again and again) folded into one log line per
/// burst ([`crate::log_burst`]); every event is still recorded in the event log and counted in the metrics.
#[derive(Default)]
struct GuardLines(Mutex<HashMap<(String, String, String), crate::log_burst::Burst>>);

/// Kinds of repeated line tracked at once; past it the oldest bursts are forgotten (their lines were written).
const GUARD_LINE_KINDS: usize = 256;

impl GuardLines {
    /// `Some(folded)`: write this event's line, saying `folded` earlier ones were folded into it; `None`: fold.
    fn hit(&self, ev: &GuardEvent, ids: &str) -> Option<u64> {
        if ev.access != Access::Open || ev.outcome != GuardOutcome::Allowed {
            return Some(0);
        }
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= GUARD_LINE_KINDS {
            m.clear();
        }
        m.entry((ids.to_owned(), ev.command.clone(), ev.mode.to_string()))
            .or_default()
            .hit()
    }

    /// At the guard's end: one line for every burst that folded events since its last line.
    fn flush(&self) {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for ((ids, command, mode), b) in m.iter() {
            let folded = b.flush();
            if folded > 0 {
                tracing::warn!(id = %ids, %command, %mode, folded, "host guard: foreign opens of a backing file allowed since the last line");
            }
        }
    }
}

/// One log line for a guard event (or none, folded into a burst's), and its record in the VM's event log.
fn log_guard_event(ev: &GuardEvent, log: &EventLog, regions: &RegionRegistry, lines: &GuardLines) {
    let ids = ev
        .regions
        .iter()
        .map(|r| regions.name_of(*r))
        .collect::<Vec<_>>()
        .join(",");
    let pid = ev.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let why = ev.refused_by.as_deref().unwrap_or("");
    let detail = ev.detail.as_deref().unwrap_or("?");
    let what = match (ev.access, ev.outcome) {
        (Access::Flags, GuardOutcome::NotUndone) => format!(
            "host guard: the {detail} flag was set on a running VM's backing file and cannot be cleared ({why}); \
             the guest's next write fault on it fails"
        ),
        (Access::Flags, _) => format!(
            "host guard: the {detail} flag was set on a running VM's backing file; cleared again"
        ),
        (Access::Unlink, _) => "host guard: the backing file lost its last name (rm, or mv over it); the VM runs \
             on, and at stop its data is copied to a recovery file beside the old name"
            .to_owned(),
        (Access::Rename, _) => format!("host guard: the backing file was renamed to {detail}"),
        (Access::Truncate, GuardOutcome::Denied) => {
            "host guard: foreign truncate by path of a backing file denied (EPERM)".to_owned()
        }
        (Access::Truncate, GuardOutcome::HeldAllowed) => {
            "host guard: foreign truncate by path of a backing file held; whole-file break done, allowed".to_owned()
        }
        (Access::Truncate, _) => format!(
            "host guard: foreign truncate by path of a backing file while the file is held: {why}"
        ),
        (Access::Open, _) => open_message(ev, why),
    };
    let answered_in_ms = ev.answered_in.as_millis() as u64;
    let Some(folded) = lines.hit(ev, &ids) else {
        push_guard_event(ev, log, regions, &who_of(ev, &pid), answered_in_ms);
        return;
    };
    let what = if folded > 0 {
        format!("{what} ({folded} more like it since the last line)")
    } else {
        what
    };
    match ev.outcome {
        GuardOutcome::HeldDenied | GuardOutcome::NotUndone => tracing::error!(
            id = %ids, pid = %pid, command = %ev.command, access = %ev.access, mode = %ev.mode, outcome = %ev.outcome,
            policy = %ev.policy, notified = %owner_list(&ev.notified), revoked = %owner_list(&ev.revoked), answered_in_ms, "{what}"
        ),
        _ => tracing::warn!(
            id = %ids, pid = %pid, command = %ev.command, access = %ev.access, mode = %ev.mode, outcome = %ev.outcome,
            policy = %ev.policy, notified = %owner_list(&ev.notified), revoked = %owner_list(&ev.revoked), answered_in_ms, "{what}"
        ),
    }
    push_guard_event(ev, log, regions, &who_of(ev, &pid), answered_in_ms);
}

/// Who did it, for the event log.
fn who_of(ev: &GuardEvent, pid: &str) -> String {
    match (ev.seen_by, ev.access) {
        (SeenBy::Fanotify, Access::Open) => format!(
            "a foreign process opened the backing file (pid {pid}, {:?}, mode {})",
            ev.command, ev.mode
        ),
        (SeenBy::Fanotify, access) => format!(
            "a foreign process acted on the backing file (pid {pid}, {:?}, {access}{})",
            ev.command,
            ev.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        (SeenBy::KernelLease, _) => {
            "a foreign process truncated or opened the backing file unseen by fanotify (kernel lease)"
                .to_owned()
        }
    }
}

/// The message of an open's (or a kernel lease break's) event.
fn open_message(ev: &GuardEvent, why: &str) -> String {
    match (ev.seen_by, ev.outcome) {
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
        (_, GuardOutcome::Undone | GuardOutcome::NotUndone | GuardOutcome::Noted) => {
            format!("host guard: foreign access of a backing file: {}", ev.outcome)
        }
    }
}

/// A guard event's record in the VM's event log.
fn push_guard_event(
    ev: &GuardEvent,
    log: &EventLog,
    regions: &RegionRegistry,
    who: &str,
    answered_in_ms: u64,
) {
    log.push(NewEvent {
        kind: crate::events::EventKind::Guard,
        region: Some(regions.name_of(ev.region)),
        owners: ev.notified.iter().map(|o| o.to_raw()).collect(),
        range: None,
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
            Some(why) if ev.access == Access::Flags => {
                format!("{who}: {}: {why}", ev.outcome)
            }
            Some(why) => format!("{who}: {} while it is held: {why}", ev.outcome),
        },
        // The guard's own line (above) is the log; this is the record the API serves.
        logged: true,
    });
}

/// Owners as a log field a person reads: `owner:2,owner:5` (`-` for none).
fn owner_list(owners: &[daxvisor_mapper::OwnerId]) -> String {
    if owners.is_empty() {
        return "-".to_owned();
    }
    owners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Take region `id` out of `mapper` and `guard` (see [`LeaseManager::remove_pmem_region`]).
pub fn remove_region(mapper: &Mapper, guard: &HostGuard, id: RegionId) {
    guard.disarm(id);
    if let Err(e) = mapper.remove_region(id) {
        tracing::warn!(region = %id, "the layout-lease manager keeps the region: {e}");
    }
}
