//! What the API server works on: the VM's mapper, its pmem regions as the operator named them, the event log,
//! the metrics and a way to stop the VM. Built by the VM before its threads start; shared by every request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use daxvisor_devices::virtio::pmem::{FlushRateLimit, PmemMetrics};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::events::{EventLog, NewEvent};
use super::metrics::ApiMetrics;
use crate::pmem::BackingKind;
use daxvisor_mapper::{Mapper, OwnerId, RegionId};

/// The VM configuration as the operator gave it (what `GET /vm` reports).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfigView {
    /// The kernel path, or "built-in test guest".
    pub kernel: String,
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u8,
    /// The `--pmem` ids, in order.
    pub pmem: Vec<String>,
}

/// One pmem region as the API sees it.
pub struct RegionHandle {
    /// The id the operator gave (`--pmem id=NAME`, default `pmemN`).
    pub name: String,
    pub region: RegionId,
    pub path: PathBuf,
    pub kind: BackingKind,
    pub size: u64,
    pub guest_addr: u64,
    pub readonly: bool,
    pub metrics: Arc<PmemMetrics>,
    pub rate_limit: Arc<FlushRateLimit>,
}

/// Stops the VM gracefully (vCPUs stopped, flushes answered, regions synced).
pub type StopFn = Box<dyn Fn() + Send + Sync>;

pub struct ApiContext {
    pub mapper: Mapper,
    pub regions: Vec<RegionHandle>,
    pub config: VmConfigView,
    pub started: Instant,
    pub started_at: SystemTime,
    pub events: Arc<EventLog>,
    pub metrics: ApiMetrics,
    /// The agent service's counters.
    pub agent: Arc<crate::agent::AgentCounters>,
    /// Ranges guests offered back, and each region's reclaim policy.
    pub reclaim: Arc<crate::reclaim::Reclaim>,
    stop: StopFn,
    stopping: std::sync::atomic::AtomicBool,
    operator: Mutex<Option<OwnerId>>,
}

/// The name the operator's own leases are held under.
pub const OPERATOR: &str = "operator";

impl ApiContext {
    pub fn new(
        mapper: Mapper,
        regions: Vec<RegionHandle>,
        config: VmConfigView,
        events: Arc<EventLog>,
        agent: Arc<crate::agent::AgentCounters>,
        reclaim: Arc<crate::reclaim::Reclaim>,
        stop: StopFn,
    ) -> Arc<Self> {
        Arc::new(ApiContext {
            mapper,
            regions,
            config,
            started: Instant::now(),
            started_at: SystemTime::now(),
            events,
            metrics: ApiMetrics::default(),
            agent,
            reclaim,
            stop,
            stopping: std::sync::atomic::AtomicBool::new(false),
            operator: Mutex::new(None),
        })
    }

    /// The region the operator named, or 404 naming it.
    pub fn region(&self, name: &str) -> Result<&RegionHandle, ApiError> {
        self.regions.iter().find(|r| r.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
            ApiError::not_found(format!(
                "no region '{name}' (regions: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// The region's operator name for a mapper region id.
    pub fn region_name(&self, id: RegionId) -> String {
        self.regions
            .iter()
            .find(|r| r.region == id)
            .map_or_else(|| id.to_string(), |r| r.name.clone())
    }

    /// The operator's owner, registered on first use.
    pub fn operator(&self) -> OwnerId {
        let mut op = self.operator.lock().unwrap_or_else(|p| p.into_inner());
        *op.get_or_insert_with(|| self.mapper.add_owner(OPERATOR))
    }

    /// The operator's owner if it was ever registered.
    pub fn operator_if_any(&self) -> Option<OwnerId> {
        *self.operator.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn owner_name(&self, owner: u64) -> String {
        self.mapper
            .snapshot()
            .owner(daxvisor_mapper::OwnerId::from_raw(owner))
            .map(|o| o.name.clone())
            .unwrap_or_default()
    }

    pub fn event(&self, e: NewEvent) {
        self.events.push(e);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ask the VM to stop; the second and later calls do nothing.
    pub fn stop(&self) {
        if !self
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            (self.stop)();
        }
    }
}
