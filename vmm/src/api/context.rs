//! What the API server works on: the VM's actions, and what it reads (mapper, region registry, event log,
//! metrics). Shared by every request.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::error::ApiError;
use super::metrics::ApiMetrics;
use crate::actions::{ActionError, Actions};
use crate::events::{EventLog, NewEvent};
use crate::region_registry::{Region, RegionRegistry};
use daxvisor_mapper::{Mapper, RegionId};

pub use crate::config_spec::VmConfigView;

/// What the API works on: the VM's actions (every change goes through them) and what it reads (the mapper,
/// the region registry, the event log, counters). Built by the VM before its threads start.
pub struct ApiContext {
    pub actions: Arc<Actions>,
    pub mapper: Mapper,
    pub regions: Arc<RegionRegistry>,
    pub config: VmConfigView,
    /// The `vm` label of every metric series (`VmConfig::label`).
    pub vm_label: String,
    pub started: Instant,
    pub started_at: SystemTime,
    pub events: Arc<EventLog>,
    pub metrics: ApiMetrics,
    /// The agent service's counters.
    pub agent: Arc<crate::agent::AgentCounters>,
    /// Ranges guests offered back, and each region's reclaim policy.
    pub reclaim: Arc<crate::reclaim::Reclaim>,
    /// What the API's bounds refused or closed ([`super::limits`]).
    pub limits: Arc<super::limits::LimitCounts>,
    /// Passthrough devices, if the VM has any.
    pub devices: Option<Arc<crate::vfio::DeviceList>>,
}

impl ApiContext {
    pub fn new(
        actions: Arc<Actions>,
        config: VmConfigView,
        agent: Arc<crate::agent::AgentCounters>,
        devices: Option<Arc<crate::vfio::DeviceList>>,
    ) -> Arc<Self> {
        Arc::new(ApiContext {
            mapper: actions.mapper.clone(),
            regions: actions.regions.clone(),
            events: actions.events.clone(),
            reclaim: actions.reclaim.clone(),
            actions,
            vm_label: config.name.clone().unwrap_or_else(|| {
                config
                    .api_socket
                    .as_deref()
                    .and_then(|s| crate::socket_dir::name_of_socket(std::path::Path::new(s)))
                    .unwrap_or_else(|| format!("pid-{}", std::process::id()))
            }),
            config,
            started: Instant::now(),
            started_at: SystemTime::now(),
            metrics: ApiMetrics::default(),
            agent,
            limits: Arc::default(),
            devices,
        })
    }

    /// The region the operator named, or 404 naming it.
    pub fn region(&self, name: &str) -> Result<Arc<Region>, ApiError> {
        self.actions.region(name).map_err(|e| self.error(e))
    }

    /// The region's operator name for a mapper region id.
    pub fn region_name(&self, id: RegionId) -> String {
        self.regions.name_of(id)
    }

    pub fn owner_name(&self, owner: u64) -> String {
        self.actions.owner_name(owner)
    }

    pub fn event(&self, e: NewEvent) {
        self.events.push(e);
    }

    pub fn stopping(&self) -> bool {
        self.actions.stopping()
    }

    /// An action's refusal as the API answers it.
    pub fn error(&self, e: ActionError) -> ApiError {
        ApiError::from_action(e, |o| self.owner_name(o))
    }
}
