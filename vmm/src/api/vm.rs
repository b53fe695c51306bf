//! `/vm`: the VM's state, uptime and configuration, and the graceful stop.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::{ApiContext, VmConfigView};

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmView {
    /// "running" or "stopping".
    pub state: String,
    pub uptime_ms: u64,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub pid: u32,
    pub config: VmConfigView,
    /// Guest-physical space reserved for regions added while the VM runs (`--pmem-hotplug`); absent without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem_hotplug: Option<HotplugSpaceView>,
}

/// The reserved hotplug space.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HotplugSpaceView {
    /// Guest-physical base address.
    pub base: u64,
    /// Bytes reserved.
    pub size: u64,
    /// Bytes taken by added regions now.
    pub used: u64,
}

/// The VM.
#[utoipa::path(get, operation_id = "get_vm", path = "/vm", tag = "vm", responses((status = 200, body = VmView)))]
pub async fn get(State(ctx): State<Arc<ApiContext>>) -> Json<VmView> {
    Json(VmView {
        state: if ctx.stopping() {
            "stopping"
        } else {
            "running"
        }
        .to_owned(),
        uptime_ms: ctx.started.elapsed().as_millis() as u64,
        started_at_ms: ctx
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        pid: std::process::id(),
        config: ctx.config.clone(),
        pmem_hotplug: ctx
            .actions
            .hotplug_space()
            .map(|(base, size, used)| HotplugSpaceView { base, size, used }),
    })
}

/// Stop the VM gracefully: vCPUs stopped, in-flight flushes answered, daxvisor exits 0. Answered before the
/// VM is gone (202); the socket disappears when it is.
#[utoipa::path(post, operation_id = "stop_vm", path = "/vm/stop", tag = "vm",
    responses((status = 202, description = "the VM is stopping")))]
pub async fn stop(State(ctx): State<Arc<ApiContext>>) -> StatusCode {
    ctx.actions.stop();
    StatusCode::ACCEPTED
}
