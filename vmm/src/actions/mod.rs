//! The action layer: everything that changes a running VM, as typed calls. The operator API's handlers only
//! parse a request and call an action; `daxvisor-ctl` reaches the same actions through the API, and tests call
//! them directly. An action checks its input against the region registry (a bad name or range changes
//! nothing), runs through the mapper (the one point of synchronisation: no VM-wide lock), records what happened
//! in the event log, and returns a typed result or an [`ActionError`].
//!
//! - [`change`]: punch, zero and break (evacuate) a range, holders asked first; progress comes from the mapper's
//!   break events as they happen, the result from its change report.
//! - [`lease`]: the operator's own leases (hold a range against changes while the operator works on it).
//! - [`limits`]: a region's flush rate limits and reclaim policy, and punching offered ranges now.
//! - [`region`]: adding a pmem region to the running VM and removing one (live capacity).
//! - [`owner`]: ending one owner (a guest holding capacity hostage): DMA unmapped first, everything released.
//! - [`Actions::stop`]: the graceful stop.

pub mod change;
pub mod lease;
pub mod limits;
pub mod owner;
pub mod region;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use daxvisor_mapper::{Mapper, MapperError, OwnerId};

use crate::events::{EventKind, EventLog, NewEvent};
use crate::reclaim::Reclaim;
use crate::region_registry::{Region, RegionRegistry};
use crate::vstate::vcpu::{RunState, StopReason};

pub use change::{Change, ChangeKind, ChangeResult, HolderOutcome, Policy};

/// The name the operator's own leases are held under.
pub const OPERATOR: &str = "operator";

/// Why an action was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No region has this name.
    #[error("no region '{name}' (regions: {})", if known.is_empty() { "none".to_owned() } else { known.join(", ") })]
    NoRegion { name: String, known: Vec<String> },
    /// A range that does not lie inside the region's window.
    #[error("{0}")]
    OutOfRange(String),
    /// Input the action cannot take (a zero-sized bucket, a deadline past the maximum, an unknown lease).
    #[error("{0}")]
    Invalid(String),
    /// The operator holds no such lease.
    #[error("the operator holds no lease {0}")]
    NoLease(u64),
    /// The mapper refused (ETXTBSY naming the holder, ETIMEDOUT, EAGAIN, ...).
    #[error(transparent)]
    Refused(#[from] MapperError),
    /// A blocking part of the action could not run.
    #[error("{0}")]
    Internal(String),
    /// The VM's state refuses it now (a name or file in use, no space left, no acknowledgement in time); `errno`
    /// names why. Nothing was changed.
    #[error("{message}")]
    Busy {
        errno: &'static str,
        message: String,
    },
}

/// The actions of one VM. Shared by every transport (`Arc`); cheap to call from any thread.
pub struct Actions {
    pub(crate) mapper: Mapper,
    pub(crate) regions: Arc<RegionRegistry>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) reclaim: Arc<Reclaim>,
    state: Arc<RunState>,
    stopping: AtomicBool,
    operator: Mutex<Option<OwnerId>>,
    /// The operator's jobs (`operator:NAME`), each its own owner, registered on first use.
    jobs: Mutex<std::collections::BTreeMap<String, OwnerId>>,
    /// Live capacity, when the VM reserved hotplug space.
    pub(crate) hotplug: std::sync::OnceLock<Arc<crate::hotplug::Hotplug>>,
    /// The virtual IOMMU, when the VM has one (`iommu=recall` regions recall through it).
    pub(crate) viommu: std::sync::OnceLock<Arc<crate::viommu::Viommu>>,
}

impl Actions {
    pub fn new(
        mapper: Mapper,
        regions: Arc<RegionRegistry>,
        events: Arc<EventLog>,
        reclaim: Arc<Reclaim>,
        state: Arc<RunState>,
    ) -> Arc<Self> {
        Arc::new(Actions {
            mapper,
            regions,
            events,
            reclaim,
            state,
            stopping: AtomicBool::new(false),
            operator: Mutex::new(None),
            jobs: Mutex::new(std::collections::BTreeMap::new()),
            hotplug: std::sync::OnceLock::new(),
            viommu: std::sync::OnceLock::new(),
        })
    }

    /// Give the actions the VM's virtual IOMMU (once, at build).
    pub fn set_viommu(&self, viommu: Arc<crate::viommu::Viommu>) {
        let _ = self.viommu.set(viommu);
    }

    /// The VM's virtual IOMMU, if it has one.
    pub fn viommu(&self) -> Option<&Arc<crate::viommu::Viommu>> {
        self.viommu.get()
    }

    /// Give the actions the VM's hotplug (once, at build).
    pub fn set_hotplug(&self, hotplug: Arc<crate::hotplug::Hotplug>) {
        let _ = self.hotplug.set(hotplug);
    }

    /// The region the operator named.
    pub fn region(&self, name: &str) -> Result<Arc<Region>, ActionError> {
        self.regions
            .by_name(name)
            .ok_or_else(|| ActionError::NoRegion {
                name: name.to_owned(),
                known: self.regions.names(),
            })
    }

    /// Stop the VM gracefully (vCPUs stopped, flushes answered, regions synced). `false` when a stop was
    /// already asked for (nothing more happens).
    pub fn stop(&self) -> bool {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.events.push(NewEvent {
            kind: EventKind::StopRequested,
            message: "the operator asked the VM to stop".into(),
            ..NewEvent::default()
        });
        self.state.request_stop(StopReason::Operator);
        true
    }

    /// The VM has stopped: the last event of its log. Followers' streams end after it; this waits (a short
    /// while at most) until they have, so the event reaches them before the API stops serving.
    pub fn stopped(&self, how: &str) {
        // A removal waiting for the guest's eject answers now instead of at its timeout.
        if let Some(hp) = self.hotplug.get() {
            hp.slots.vm_stopped();
        }
        self.events.push(NewEvent {
            kind: EventKind::VmStopped,
            message: format!("the VM stopped: {how}"),
            ..NewEvent::default()
        });
        self.events
            .wait_for_followers(std::time::Duration::from_secs(1));
    }

    /// A stop was asked for through [`Actions::stop`].
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The operator's owner, registered on first use.
    pub fn operator(&self) -> OwnerId {
        let mut op = self.operator.lock().unwrap_or_else(|p| p.into_inner());
        *op.get_or_insert_with(|| self.mapper.add_owner(OPERATOR))
    }

    /// The owner `operator:JOB`, registered on first use: a job's leases are held apart from the operator's,
    /// so the operator's own changes ask it like any other holder.
    pub fn job(&self, job: &str) -> Result<OwnerId, ActionError> {
        let ok = !job.is_empty()
            && job.len() <= 64
            && job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(ActionError::Invalid(format!(
                "owner {job:?}: use letters, digits, '.', '_' and '-' (at most 64)"
            )));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(*jobs
            .entry(job.to_owned())
            .or_insert_with(|| self.mapper.add_owner(&format!("{OPERATOR}:{job}"))))
    }

    /// The operator's owner and its jobs' owners, as registered so far.
    pub fn operator_owners(&self) -> Vec<OwnerId> {
        let mut v: Vec<OwnerId> = self.operator_if_any().into_iter().collect();
        v.extend(
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .copied(),
        );
        v
    }

    /// The operator's owner if it was ever registered.
    pub fn operator_if_any(&self) -> Option<OwnerId> {
        *self.operator.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An owner's name ("" for one that is gone).
    pub fn owner_name(&self, owner: u64) -> String {
        self.mapper
            .snapshot()
            .owner(OwnerId::from_raw(owner))
            .map(|o| o.name.clone())
            .unwrap_or_default()
    }
}

/// Checks a region-relative range against a window of `size` bytes (nothing is asked of the mapper for bad
/// input); returns the explicit `(offset, length)` inside the window. Length 0 runs to the window's end.
pub fn window_range(size: u64, offset: u64, length: u64) -> Result<(u64, u64), ActionError> {
    if offset >= size {
        return Err(ActionError::OutOfRange(format!(
            "offset {offset:#x} is outside the region (size {size:#x})"
        )));
    }
    let length = if length == 0 { size - offset } else { length };
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok((offset, length)),
        _ => Err(ActionError::OutOfRange(format!(
            "{offset:#x}+{length:#x} runs past the end of the region (size {size:#x})"
        ))),
    }
}

#[cfg(test)]
mod tests;
