//! `/regions`: the VM's pmem regions as the operator named them (backing, placement, flush counters, guard,
//! holds) and their flush rate limits.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use daxvisor_devices::virtio::pmem::{BucketConfig, FlushLimits};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use super::error::{ApiError, ErrorBody};
use super::json::ApiJson;
use super::range_len;
use crate::region_registry::Region;
use daxvisor_mapper::Snapshot;

/// One token bucket: `size` tokens, refilled in full every `refill_ms`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    /// Burst size in tokens (requests or bytes), at least 1.
    pub size: u64,
    /// Milliseconds to refill an empty bucket, at least 1.
    pub refill_ms: u64,
}

/// A region's flush rate limits; an absent bucket is unlimited.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Flush requests.
    #[serde(default)]
    pub ops: Option<Bucket>,
    /// Bytes; each sync costs the region's size.
    #[serde(default)]
    pub bytes: Option<Bucket>,
}

/// Flush counters of the region's virtio-pmem device.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlushCounters {
    pub requests: u64,
    /// fdatasync (or no-op) calls; each answers every request queued before it started.
    pub syncs: u64,
    pub errors: u64,
    /// Requests that waited for the rate limiter.
    pub throttled: u64,
    pub throttle_wait_us: u64,
    pub readonly_writes_dropped: u64,
}

/// What the host guard saw on the region's backing file.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuardView {
    /// The backing kind has a layout the guard watches (everything but device-DAX).
    pub watched: bool,
    /// Foreign opens seen.
    pub events: u64,
    /// The last one, in words.
    #[serde(default)]
    pub last: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionView {
    /// As given to `--pmem id=` (default `pmemN`).
    pub id: String,
    pub path: String,
    /// regular, fsdax, devdax or memfd.
    pub kind: String,
    /// Whether the host kernel lets a DMA mapper pin this backing long-term, and why.
    pub dma_pinnable: String,
    pub size: u64,
    /// Bytes of the backing file the filesystem has allocated (its blocks); 0 for device-DAX.
    pub bytes_allocated: u64,
    pub guest_addr: u64,
    pub readonly: bool,
    pub flush: FlushCounters,
    pub rate_limit: RateLimit,
    pub guard: GuardView,
    pub leases: u64,
    pub pins: u64,
    /// Bytes under leases (overlaps counted once per lease).
    pub bytes_leased: u64,
    pub bytes_pinned: u64,
}

/// The region's DMA pinnability as the mapper classified it (backing kind, mapping, running kernel; a kernel
/// that refused a pin overrides the rules).
pub fn dma_pinnable(snap: &Snapshot, r: &Region) -> String {
    match snap.regions.iter().find(|v| v.id == r.id) {
        Some(v) => format!(
            "{} ({})",
            if v.dma_rule.pinnable() { "yes" } else { "no" },
            v.dma_rule
        ),
        None => "unknown".to_owned(),
    }
}

/// Holds on a region: (leases, pins, bytes leased, bytes pinned). Open-ended ranges count to the region's end.
pub fn holds(snap: &Snapshot, r: &Region) -> (u64, u64, u64, u64) {
    let len = |range: &daxvisor_mapper::ByteRange| match range_len(range) {
        0 => r.size().saturating_sub(range.start),
        n => n,
    };
    let (mut leases, mut pins, mut bl, mut bp) = (0, 0, 0, 0);
    for (_, l) in snap.leases() {
        if l.region == r.id {
            leases += 1;
            bl += len(&l.range);
        }
    }
    for (_, p) in snap.pins() {
        if p.region == r.id {
            pins += 1;
            bp += len(&p.range);
        }
    }
    (leases, pins, bl, bp)
}

fn view(r: &Region, snap: &Snapshot) -> RegionView {
    let m = r.metrics.snapshot();
    let (leases, pins, bytes_leased, bytes_pinned) = holds(snap, r);
    let guard: Vec<_> = snap
        .guard_events
        .iter()
        .filter(|g| g.regions.contains(&r.id))
        .collect();
    RegionView {
        id: r.name().to_owned(),
        path: r.path().display().to_string(),
        kind: r.kind().as_str().to_owned(),
        dma_pinnable: dma_pinnable(snap, r),
        size: r.size(),
        bytes_allocated: r.allocated_bytes(),
        guest_addr: r.guest_addr,
        readonly: r.readonly(),
        flush: FlushCounters {
            requests: m.requests,
            syncs: m.syncs,
            errors: m.errors,
            throttled: m.throttled,
            throttle_wait_us: m.throttle_wait_us,
            readonly_writes_dropped: m.readonly_writes_dropped,
        },
        rate_limit: to_view(r.rate_limit.limits()),
        guard: GuardView {
            watched: r.kind().has_layout(),
            events: snap.guard_counts.get(&r.id).map_or(0, |c| c.events),
            last: guard.last().map(|g| {
                let who = g.pid.map_or_else(
                    || "a truncate or unseen open".to_owned(),
                    |p| format!("pid {p} ({})", g.command),
                );
                match &g.refused_by {
                    None => format!(
                        "foreign open by {who}, mode {}: {} in {} ms",
                        g.mode,
                        g.outcome,
                        g.answered_in.as_millis()
                    ),
                    Some(why) => format!(
                        "foreign open by {who}, mode {}: {} while held: {why}",
                        g.mode, g.outcome
                    ),
                }
            }),
        },
        leases,
        pins,
        bytes_leased,
        bytes_pinned,
    }
}

fn to_view(l: FlushLimits) -> RateLimit {
    let b = |c: BucketConfig| Bucket {
        size: c.size,
        refill_ms: c.refill.as_millis() as u64,
    };
    RateLimit {
        ops: l.ops.map(b),
        bytes: l.bytes.map(b),
    }
}

/// A rate-limit body into the limits it asks for (the action refuses zero sizes or refill times).
pub fn from_view(l: RateLimit) -> FlushLimits {
    let b = |v: Bucket| BucketConfig {
        size: v.size,
        refill: Duration::from_millis(v.refill_ms),
    };
    FlushLimits {
        ops: l.ops.map(b),
        bytes: l.bytes.map(b),
    }
}

/// Every pmem region.
#[utoipa::path(get, operation_id = "list_regions", path = "/regions", tag = "regions",
    responses((status = 200, body = [RegionView])))]
pub async fn list(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<RegionView>> {
    let snap = ctx.mapper.snapshot();
    Json(ctx.regions.all().iter().map(|r| view(r, &snap)).collect())
}

/// One pmem region.
#[utoipa::path(get, operation_id = "get_region", path = "/regions/{id}", tag = "regions",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    responses((status = 200, body = RegionView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
) -> Result<Json<RegionView>, ApiError> {
    let r = ctx.region(&id)?;
    Ok(Json(view(&r, &ctx.mapper.snapshot())))
}

/// Set a region's flush rate limits (replacing both buckets; an absent bucket is unlimited). Throttled guest
/// flushes wait; they are never failed.
#[utoipa::path(put, operation_id = "set_rate_limit", path = "/regions/{id}/rate-limit", tag = "regions",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = RateLimit,
    responses((status = 200, body = RateLimit, description = "the limits now in force"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_rate_limit(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RateLimit>,
) -> Result<Json<RateLimit>, ApiError> {
    let limits = from_view(body);
    let now = ctx
        .actions
        .set_rate_limit(&id, limits)
        .map_err(|e| ctx.error(e))?;
    Ok(Json(to_view(now)))
}

/// The limits in words, as the event log says them.
pub fn describe(l: &RateLimit) -> String {
    crate::actions::limits::describe(&from_view(*l))
}

/// A region to add: the keys of `--pmem` (see `daxvisor run --help`). Sizes take the same suffixes ("64M").
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddRegion {
    /// Host file or device-DAX path.
    pub file: String,
    /// Window size ("64M", "1G" or bytes); default: the file's size.
    #[serde(default)]
    pub size: Option<String>,
    /// The region's name (default `pmemN`, the first N not in use).
    #[serde(default)]
    pub id: Option<String>,
    /// Create the file (or extend it to `size`); undone if the add is refused.
    #[serde(default)]
    pub create: Option<bool>,
    #[serde(default)]
    pub prefault: Option<bool>,
    /// Host guard policy, as `--pmem guard=`.
    #[serde(default)]
    pub guard: Option<String>,
}

impl AddRegion {
    /// The `--pmem` string for these keys, parsed by the same parser.
    fn config(&self) -> Result<crate::pmem::PmemConfig, ApiError> {
        let mut parts = vec![format!("file={}", self.file)];
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        let on = |b: bool| if b { "on" } else { "off" }.to_owned();
        put("size", self.size.clone());
        put("id", self.id.clone());
        put("create", self.create.map(on));
        put("prefault", self.prefault.map(on));
        put("guard", self.guard.clone());
        if parts.iter().skip(1).any(|p| p.matches(',').count() > 0) || self.file.contains(',') {
            return Err(ApiError::bad_request("values must not contain ','"));
        }
        parts
            .join(",")
            .parse()
            .map_err(|e: crate::pmem::config::PmemConfigError| ApiError::bad_request(e.to_string()))
    }
}

/// Add a pmem region to the running VM (needs `--transport pci --pmem-hotplug SIZE`): the same checks as at
/// start, a window in the hotplug space, a virtio-pci function the guest is told about. A refused add leaves
/// nothing behind (a file `create` made is removed).
#[utoipa::path(post, operation_id = "add_region", path = "/regions", tag = "regions",
    request_body = AddRegion,
    responses((status = 201, body = RegionView, description = "added; the guest was told"),
        (status = 400, body = ErrorBody, description = "bad keys, size, backing; no hotplug space configured"),
        (status = 409, body = ErrorBody, description = "EEXIST (id), EBUSY (file in use), ENOSPC (no hotplug space left)")))]
pub async fn add(
    State(ctx): State<Arc<ApiContext>>,
    ApiJson(body): ApiJson<AddRegion>,
) -> Result<(StatusCode, Json<RegionView>), ApiError> {
    let config = body.config()?;
    let started = std::time::Instant::now();
    let actions = ctx.actions.clone();
    let result = tokio::task::spawn_blocking(move || actions.add_region(config))
        .await
        .map_err(|e| ApiError::internal(format!("add task failed: {e}")))?;
    ctx.metrics.record_change(
        "add",
        if result.is_ok() { "done" } else { "refused" },
        started.elapsed(),
    );
    let r = result.map_err(|e| ctx.error(e))?;
    Ok((StatusCode::CREATED, Json(view(&r, &ctx.mapper.snapshot()))))
}

/// How long holders and the guest get.
#[derive(
    Clone, Debug, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams, PartialEq, Eq,
)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Milliseconds holders of shared leases get to release (default 5000).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Milliseconds the guest gets to eject the device (default 10000).
    #[serde(default)]
    pub eject_timeout_ms: Option<u64>,
}

/// What a removal did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemovedView {
    pub region: String,
    /// Holders asked to release.
    pub holders: u64,
    pub total_ms: u64,
}

/// Remove a region added while the VM runs: every lease is broken with reason `remove` (pins and exclusive
/// leases refuse: 409 naming the holder; `POST /owners/{id}/revoke` ends a stuck owner), the guest ejects the
/// device, then the mapping is dropped and the file synced, unlocked and closed. No eject in time: 409
/// ETIMEDOUT, the device stays.
#[utoipa::path(delete, operation_id = "remove_region", path = "/regions/{id}", tag = "regions",
    params(("id" = String, Path, description = "region id"), RemoveQuery),
    responses((status = 200, body = RemovedView, description = "removed, synced, unlocked, closed"),
        (status = 400, body = ErrorBody, description = "not a hot-added region; no hotplug space configured"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "ETXTBSY naming the holder, ETIMEDOUT (holders or the guest's eject)")))]
pub async fn remove(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Json<RemovedView>, ApiError> {
    let started = std::time::Instant::now();
    let actions = ctx.actions.clone();
    let removal = crate::actions::region::Removal {
        deadline_ms: q.deadline_ms,
        eject_timeout_ms: q.eject_timeout_ms,
    };
    let result = tokio::task::spawn_blocking(move || actions.remove_region(&id, removal))
        .await
        .map_err(|e| ApiError::internal(format!("remove task failed: {e}")))?;
    let label = match &result {
        Ok(_) => Some("done"),
        Err(crate::actions::ActionError::Refused(e)) => Some(match e.errno() {
            libc::ETIMEDOUT => "timed_out",
            _ => "conflict",
        }),
        Err(crate::actions::ActionError::Busy { .. }) => Some("timed_out"),
        Err(_) => None,
    };
    if let Some(label) = label {
        ctx.metrics
            .record_change("remove", label, started.elapsed());
    }
    let r = result.map_err(|e| ctx.error(e))?;
    Ok(Json(RemovedView {
        region: r.region,
        holders: r.holders as u64,
        total_ms: r.total_ms,
    }))
}
