//! `/regions`: the VM's pmem regions as the operator named them (backing, placement, flush counters, guard,
//! holds) and their flush rate limits.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use daxvisor_devices::virtio::pmem::{BucketConfig, FlushLimits};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::{ApiContext, RegionHandle};
use super::error::{ApiError, ErrorBody};
use super::events::NewEvent;
use super::json::ApiJson;
use super::range_len;
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
pub fn dma_pinnable(snap: &Snapshot, r: &RegionHandle) -> String {
    match snap.regions.iter().find(|v| v.id == r.region) {
        Some(v) => format!(
            "{} ({})",
            if v.dma_rule.pinnable() { "yes" } else { "no" },
            v.dma_rule
        ),
        None => "unknown".to_owned(),
    }
}

/// Holds on a region: (leases, pins, bytes leased, bytes pinned). Open-ended ranges count to the region's end.
pub fn holds(snap: &Snapshot, r: &RegionHandle) -> (u64, u64, u64, u64) {
    let len = |range: &daxvisor_mapper::ByteRange| match range_len(range) {
        0 => r.size.saturating_sub(range.start),
        n => n,
    };
    let (mut leases, mut pins, mut bl, mut bp) = (0, 0, 0, 0);
    for (_, l) in snap.leases() {
        if l.region == r.region {
            leases += 1;
            bl += len(&l.range);
        }
    }
    for (_, p) in snap.pins() {
        if p.region == r.region {
            pins += 1;
            bp += len(&p.range);
        }
    }
    (leases, pins, bl, bp)
}

fn view(r: &RegionHandle, snap: &Snapshot) -> RegionView {
    let m = r.metrics.snapshot();
    let (leases, pins, bytes_leased, bytes_pinned) = holds(snap, r);
    let guard: Vec<_> = snap
        .guard_events
        .iter()
        .filter(|g| g.regions.contains(&r.region))
        .collect();
    RegionView {
        id: r.name.clone(),
        path: r.path.display().to_string(),
        kind: r.kind.as_str().to_owned(),
        dma_pinnable: dma_pinnable(snap, r),
        size: r.size,
        guest_addr: r.guest_addr,
        readonly: r.readonly,
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
            watched: r.kind.has_layout(),
            events: snap.guard_counts.get(&r.region).map_or(0, |c| c.events),
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

/// A rate-limit body into the limits it sets; zero sizes or refill times are refused.
pub fn from_view(l: RateLimit) -> Result<FlushLimits, ApiError> {
    let b = |name: &str, v: Bucket| {
        if v.size == 0 || v.refill_ms == 0 {
            return Err(ApiError::bad_request(format!(
                "rate limit {name}: size and refill_ms must be at least 1"
            )));
        }
        Ok(BucketConfig {
            size: v.size,
            refill: Duration::from_millis(v.refill_ms),
        })
    };
    Ok(FlushLimits {
        ops: l.ops.map(|v| b("ops", v)).transpose()?,
        bytes: l.bytes.map(|v| b("bytes", v)).transpose()?,
    })
}

/// Every pmem region.
#[utoipa::path(get, operation_id = "list_regions", path = "/regions", tag = "regions",
    responses((status = 200, body = [RegionView])))]
pub async fn list(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<RegionView>> {
    let snap = ctx.mapper.snapshot();
    Json(ctx.regions.iter().map(|r| view(r, &snap)).collect())
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
    Ok(Json(view(r, &ctx.mapper.snapshot())))
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
    let r = ctx.region(&id)?;
    let limits = from_view(body)?;
    r.rate_limit.set(limits);
    let now = to_view(r.rate_limit.limits());
    ctx.event(NewEvent {
        kind: "rate-limit-set",
        region: Some(id.clone()),
        message: format!("flush rate limit of {id}: {}", describe(&now)),
        ..NewEvent::default()
    });
    Ok(Json(now))
}

pub fn describe(l: &RateLimit) -> String {
    let b = |what: &str, b: Option<Bucket>| match b {
        Some(b) => format!("{what} {} per {} ms", b.size, b.refill_ms),
        None => format!("{what} unlimited"),
    };
    format!("{}, {}", b("requests", l.ops), b("bytes", l.bytes))
}
