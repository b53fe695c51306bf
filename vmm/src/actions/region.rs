//! Live capacity: adding a pmem region to the running VM and removing one (see [`crate::hotplug`]).
//!
//! Add: the same checks as at start (id, file not already attached, size, backing kind, lock, guard,
//! `create=on` undone on any failure), a window from the reserved hotplug space, then the same attach as at
//! start on the main thread, then the guest is told (PCIU). A refused add leaves nothing behind.
//!
//! Remove: a layout change over the whole region with reason `remove` (every lease broken; pins and exclusive
//! leases refuse it with ETXTBSY naming the holder, unless the operator revokes that owner first; from its start
//! new leases and pins on the region are refused with ENODEV, and a removal that fails lifts that), then the
//! guest is asked to eject the device (PCID) and must acknowledge (B0EJ, ACPI `_EJ0`) within the eject
//! timeout (else ETIMEDOUT and the device stays, nothing lost); only then is the device taken out, the memory
//! slot deleted, the file synced, and the mapping, lock and descriptor dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use daxvisor_mapper::{BreakPolicy, ChangeRequest, FileKey, LayoutChange};

use super::{ActionError, Actions};
use crate::events::{EventKind, NewEvent};
use crate::host_files::StartUndo;
use crate::hotplug::{Eject, Handles, Hotplug, Request};
use crate::pmem::attach::record_undo;
use crate::pmem::{Backing, PmemConfig};
use crate::region_registry::{Region, RegionRegistry};

/// How long the main thread may take to serve an attach or detach (it never waits for the guest).
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest gets to eject a device when the request names no timeout.
pub const DEFAULT_EJECT_TIMEOUT_MS: u64 = 10_000;

/// A removal as the operator asks for it.
#[derive(Clone, Debug, Default)]
pub struct Removal {
    /// Milliseconds holders of shared leases get to release (default 5000).
    pub deadline_ms: Option<u64>,
    /// Milliseconds the guest gets to eject the device (default 10000).
    pub eject_timeout_ms: Option<u64>,
}

/// What a removal did.
#[derive(Clone, Debug)]
pub struct Removed {
    pub region: String,
    /// Holders asked to release (the break's report).
    pub holders: usize,
    pub total_ms: u64,
}

impl Actions {
    fn hotplug(&self) -> Result<&Arc<Hotplug>, ActionError> {
        self.hotplug.get().ok_or_else(|| {
            ActionError::Invalid(
                "this VM has no hotplug space: start it with --transport pci --pmem-hotplug SIZE"
                    .into(),
            )
        })
    }

    /// Guest-physical space reserved for added regions: (base, size, bytes in use).
    pub fn hotplug_space(&self) -> Option<(u64, u64, u64)> {
        self.hotplug
            .get()
            .map(|h| (h.space.base, h.space.size, h.space.used()))
    }

    /// Add a region to the running VM (the `--pmem` keys). Returns the region once the guest has been told.
    pub fn add_region(&self, config: PmemConfig) -> Result<Arc<Region>, ActionError> {
        let started = Instant::now();
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| next_name(&self.regions));
        let result = self.try_add(&id, config);
        match &result {
            Ok(r) => self.events.push(NewEvent {
                kind: EventKind::RegionAdded,
                region: Some(id.clone()),
                message: format!(
                    "{id} added: {} bytes at {:#x} ({}) in {} ms",
                    r.size(),
                    r.guest_addr,
                    r.path().display(),
                    started.elapsed().as_millis()
                ),
                ..NewEvent::default()
            }),
            Err(e) => self.events.push(NewEvent {
                kind: EventKind::RegionAddRefused,
                region: Some(id.clone()),
                errno: errno_of(e),
                message: format!("adding {id} refused: {e}"),
                ..NewEvent::default()
            }),
        }
        match &result {
            Ok(r) => {
                tracing::info!(id = %id, guest_addr = format_args!("{:#x}", r.guest_addr), size = r.size(), ms = started.elapsed().as_millis() as u64, "pmem region hot-added")
            }
            Err(e) => tracing::warn!(id = %id, "pmem hot add refused: {e}"),
        }
        result
    }

    fn try_add(&self, id: &str, mut config: PmemConfig) -> Result<Arc<Region>, ActionError> {
        let hp = self.hotplug()?.clone();
        if self.stopping() {
            return Err(ActionError::Invalid("the VM is stopping".into()));
        }
        if self.regions.by_name(id).is_some() {
            return Err(busy("EEXIST", format!("a region '{id}' already exists")));
        }
        if config.readonly {
            return Err(ActionError::Invalid(
                "readonly=on regions are attached at start only (--pmem)".into(),
            ));
        }
        if let Ok(key) = FileKey::of_path(&config.file) {
            if let Some(r) = self.regions.all().iter().find(|r| r.file == key) {
                return Err(busy(
                    "EBUSY",
                    format!(
                        "{} is already attached as region '{}'",
                        config.file.display(),
                        r.name()
                    ),
                ));
            }
        }
        config.id = Some(id.to_owned());
        // Everything `create=on` does is put back when this is dropped uncommitted.
        let mut undo = StartUndo::new();
        let backing = Backing::open(&config, id).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("in use") || msg.contains("lock") {
                busy("EBUSY", msg)
            } else {
                ActionError::Invalid(msg)
            }
        })?;
        record_undo(&backing, &mut undo).map_err(|e| ActionError::Internal(e.to_string()))?;
        let align = backing
            .dev_dax()
            .map_or(0, |d| d.align)
            .max(crate::layout::PMEM_ALIGN);
        let Some(window) = hp.space.allocate(backing.size(), align) else {
            return Err(busy(
                "ENOSPC",
                format!(
                    "no room for {} bytes in the hotplug space ({} of {} bytes in use)",
                    backing.size(),
                    hp.space.used(),
                    hp.space.size
                ),
            ));
        };
        if config.prefault {
            if let Err(e) = crate::pmem::prefault::prefault(&backing) {
                hp.space.free(&window);
                return Err(ActionError::Internal(e.to_string()));
            }
        }
        let gpa = window.start();
        let (tx, rx) = std::sync::mpsc::channel();
        if !hp.request(Request::Attach {
            backing,
            gpa,
            reply: tx,
        }) {
            hp.space.free(&window);
            return Err(ActionError::Internal("the VM is not running".into()));
        }
        let (backing, attached) = match rx.recv_timeout(SERVE_TIMEOUT) {
            Ok(r) => r,
            Err(_) => {
                // The window stays taken: the main thread may still attach there.
                return Err(ActionError::Internal(
                    "the VM did not serve the attach".into(),
                ));
            }
        };
        let a = match attached {
            Ok(a) => a,
            Err(e) => {
                hp.space.free(&window);
                return Err(ActionError::Invalid(e.to_string()));
            }
        };
        let file = match FileKey::of(backing.file()) {
            Ok(f) => f,
            Err(e) => {
                // Cannot happen on an open file; take the attach back all the same.
                self.detach(
                    &hp,
                    a.region,
                    attach_handles(&a, window.start(), window.len()),
                );
                hp.space.free(&window);
                return Err(ActionError::Internal(format!("fstat: {e}")));
            }
        };
        let Some(pci_device) = a.pci_device else {
            return Err(ActionError::Internal("the region is not on PCI".into()));
        };
        hp.record(a.region, attach_handles(&a, gpa, window.len()));
        let region = self.regions.insert(Region {
            backing,
            config,
            file,
            id: a.region,
            guest_addr: gpa,
            slot: a.slot,
            metrics: a.metrics,
            rate_limit: a.rate_limit,
        });
        undo.commit();
        hp.slots.plugged(pci_device);
        let told = hp
            .routes
            .region_added(crate::agent::session::region_info(&region, &self.mapper));
        tracing::debug!(id = %id, agent_told = told, "region-added notice");
        Ok(region)
    }

    /// Remove a hot-added region (see the module's documentation for the order).
    pub fn remove_region(&self, name: &str, removal: Removal) -> Result<Removed, ActionError> {
        let started = Instant::now();
        let result = self.try_remove(name, &removal, started);
        match &result {
            Ok(r) => {
                self.events.push(NewEvent {
                    kind: EventKind::RegionRemoved,
                    region: Some(name.to_owned()),
                    message: format!(
                        "{name} removed in {} ms ({} holder(s) asked): ejected by the guest, synced, unlocked, closed",
                        r.total_ms, r.holders
                    ),
                    ..NewEvent::default()
                });
                tracing::info!(id = %name, ms = r.total_ms, "pmem region hot-removed");
            }
            Err(e) => {
                self.events.push(NewEvent {
                    kind: EventKind::RegionRemoveRefused,
                    region: Some(name.to_owned()),
                    errno: errno_of(e),
                    message: format!("removing {name} refused: {e}"),
                    ..NewEvent::default()
                });
                tracing::warn!(id = %name, "pmem hot remove refused: {e}");
            }
        }
        result
    }

    fn try_remove(
        &self,
        name: &str,
        removal: &Removal,
        started: Instant,
    ) -> Result<Removed, ActionError> {
        let hp = self.hotplug()?.clone();
        let region = self.region(name)?;
        let Some(handles) = hp.handles(region.id) else {
            return Err(ActionError::Invalid(format!(
                "region '{name}' was attached at start; only regions added while the VM runs can be removed"
            )));
        };
        let deadline_ms = removal
            .deadline_ms
            .unwrap_or(super::change::DEFAULT_DEADLINE_MS);
        if deadline_ms > super::change::MAX_DEADLINE_MS {
            return Err(ActionError::Invalid(format!(
                "deadline_ms {deadline_ms} is above the maximum {}",
                super::change::MAX_DEADLINE_MS
            )));
        }
        let eject_ms = removal.eject_timeout_ms.unwrap_or(DEFAULT_EJECT_TIMEOUT_MS);
        if eject_ms > super::change::MAX_DEADLINE_MS {
            return Err(ActionError::Invalid(format!(
                "eject_timeout_ms {eject_ms} is above the maximum {}",
                super::change::MAX_DEADLINE_MS
            )));
        }
        self.events.push(NewEvent {
            kind: EventKind::RegionRemoveStarted,
            region: Some(name.to_owned()),
            message: format!(
                "removing {name}: every lease broken with reason remove (deadline {deadline_ms} ms), then eject (timeout {eject_ms} ms)"
            ),
            ..NewEvent::default()
        });
        // From here until the device is gone, nothing new may be taken on the region: a lease granted after the
        // break would be dropped with the region, unasked. A removal that fails opens it again.
        self.mapper.set_closing(region.id, true)?;
        let break_and_eject = || -> Result<_, ActionError> {
            let report = self.mapper.change(ChangeRequest {
                requester: None,
                deadline: Duration::from_millis(deadline_ms),
                policy: BreakPolicy::Fail,
                ..ChangeRequest::new(region.id, LayoutChange::Remove)
            })?;
            hp.slots.request_eject(handles.pci_device);
            match hp
                .slots
                .wait_ejected(handles.pci_device, Duration::from_millis(eject_ms))
            {
                Eject::Done => Ok(report),
                Eject::TimedOut => Err(busy(
                    "ETIMEDOUT",
                    format!(
                        "the guest did not eject {name} within {eject_ms} ms; the device stays attached"
                    ),
                )),
                Eject::VmStopped => Err(busy(
                    "ESHUTDOWN",
                    format!(
                        "the VM stopped before the guest ejected {name}; the region is synced and closed with the VM"
                    ),
                )),
            }
        };
        let report = break_and_eject().inspect_err(|_| {
            if let Err(e) = self.mapper.set_closing(region.id, false) {
                tracing::warn!(id = %name, "reopening the region after a failed removal: {e}");
            }
        })?;
        self.detach(&hp, region.id, handles);
        Ok(Removed {
            region: name.to_owned(),
            holders: report.notified.len(),
            total_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Take an attached region out of the VM (main thread), the registry, the lease manager and the space;
    /// sync it and drop it (unmap, unlock, close).
    fn detach(&self, hp: &Hotplug, id: daxvisor_mapper::RegionId, handles: Handles) {
        let (tx, rx) = std::sync::mpsc::channel();
        if hp.request(Request::Detach { handles, reply: tx }) {
            match rx.recv_timeout(SERVE_TIMEOUT) {
                // Dropped here: the device's flush worker is joined off the main thread.
                Ok(detached) => drop(detached),
                Err(_) => tracing::error!(region = %id, "the VM did not serve the detach"),
            }
        }
        hp.forget(id);
        crate::lease_manager::remove_region(&self.mapper, &hp.guard, id);
        if let Some(region) = self.regions.remove(id) {
            region.final_sync();
            region.log_summary();
            if Arc::strong_count(&region) > 1 {
                tracing::debug!(region = %id, "the region is still referenced; it closes with the last reference");
            }
        }
        if let Ok(r) = vm_allocator::RangeInclusive::new(
            handles.window.0,
            handles.window.0 + handles.window.1 - 1,
        ) {
            hp.space.free(&r);
        }
    }
}

fn attach_handles(a: &crate::pmem::attach::Attached, gpa: u64, len: u64) -> Handles {
    Handles {
        memslot: a.memslot,
        subscriber: a.subscriber,
        pci_device: a.pci_device.unwrap_or(0),
        window: (gpa, len),
    }
}

/// `pmemN` with the first N not taken.
fn next_name(regions: &RegionRegistry) -> String {
    (0..)
        .map(|i| format!("pmem{i}"))
        .find(|n| regions.by_name(n).is_none())
        .unwrap_or_default()
}

fn busy(errno: &'static str, message: String) -> ActionError {
    ActionError::Busy { errno, message }
}

fn errno_of(e: &ActionError) -> Option<String> {
    match e {
        ActionError::Busy { errno, .. } => Some((*errno).to_owned()),
        ActionError::Refused(m) => Some(m.errno_name().to_owned()),
        _ => None,
    }
}
