//! `/owners`, `/breaks`, `/leases`: who holds what (leases and pins by owner, with byte ranges), the breaks
//! in progress, and the operator's own leases (held as owner "operator", so the API is useful without a guest
//! agent: an exclusive operator lease protects a range from every change).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use super::error::{ApiError, ErrorBody};
use super::json::ApiJson;
use super::range_len;
use daxvisor_mapper::LeaseMode;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LeaseView {
    pub id: u64,
    pub region: String,
    /// Region-relative, page-rounded.
    pub offset: u64,
    /// 0 = to the end of the file.
    pub length: u64,
    /// "shared" or "exclusive".
    pub mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PinView {
    pub id: u64,
    pub region: String,
    pub offset: u64,
    pub length: u64,
    /// The exclusive lease it sits under.
    #[serde(default)]
    pub lease: Option<u64>,
    /// Validation or populate still running.
    pub pending: bool,
    /// DMA mapping torn down by a revoke.
    pub dma_revoked: bool,
    /// A DMA pin: the IOVA its range is mapped at for the VM's passthrough devices.
    #[serde(default)]
    pub dma_iova: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OwnerView {
    pub id: u64,
    pub name: String,
    pub leases: Vec<LeaseView>,
    pub pins: Vec<PinView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BreakView {
    pub id: u64,
    pub region: String,
    pub offset: u64,
    pub length: u64,
    /// What the change is ("punch", "zero", "host-open", ...).
    pub reason: String,
    /// Milliseconds left before the policy applies (0 once past).
    pub deadline_in_ms: u64,
    /// Owners whose leases are still held.
    pub waiting_on: Vec<u64>,
}

/// Every owner with its leases and pins.
#[utoipa::path(get, operation_id = "list_owners", path = "/owners", tag = "holds", responses((status = 200, body = [OwnerView])))]
pub async fn owners(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<OwnerView>> {
    let snap = ctx.mapper.snapshot();
    Json(
        snap.owners
            .iter()
            .map(|o| OwnerView {
                id: o.id.to_raw(),
                name: o.name.clone(),
                leases: o
                    .leases
                    .iter()
                    .map(|l| LeaseView {
                        id: l.id.to_raw(),
                        region: ctx.region_name(l.region),
                        offset: l.range.start,
                        length: range_len(&l.range),
                        mode: l.mode.to_string(),
                    })
                    .collect(),
                pins: o
                    .pins
                    .iter()
                    .map(|p| PinView {
                        id: p.id.to_raw(),
                        region: ctx.region_name(p.region),
                        offset: p.range.start,
                        length: range_len(&p.range),
                        lease: p.lease.map(daxvisor_mapper::LeaseId::to_raw),
                        pending: p.pending,
                        dma_revoked: p.dma_revoked,
                        dma_iova: p.dma.map(|(iova, _)| iova),
                    })
                    .collect(),
            })
            .collect(),
    )
}

/// Breaks in progress: range, reason, deadline, who is still holding.
#[utoipa::path(get, operation_id = "list_breaks", path = "/breaks", tag = "holds", responses((status = 200, body = [BreakView])))]
pub async fn breaks(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<BreakView>> {
    let snap = ctx.mapper.snapshot();
    let now = std::time::Instant::now();
    Json(
        snap.breaks
            .iter()
            .map(|b| {
                let mut waiting: Vec<u64> = b.waiting_on.iter().map(|(_, o)| o.to_raw()).collect();
                waiting.sort_unstable();
                waiting.dedup();
                BreakView {
                    id: b.id.to_raw(),
                    region: ctx.region_name(b.region),
                    offset: b.range.start,
                    length: range_len(&b.range),
                    reason: b.reason.to_owned(),
                    deadline_in_ms: b.deadline.saturating_duration_since(now).as_millis() as u64,
                    waiting_on: waiting,
                }
            })
            .collect(),
    )
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Breakable: a change asks the holder (notice, deadline) first.
    Shared,
    /// Unbreakable: changes over it fail at once with ETXTBSY naming the holder.
    Exclusive,
}

/// An operator lease request.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    pub region: String,
    pub offset: u64,
    /// 0 = to the end of the region.
    #[serde(default)]
    pub length: u64,
    pub mode: Mode,
    /// Hold it as the operator's job `operator:NAME` (a separate owner: the operator's own changes ask it
    /// like any other holder) instead of as `operator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Take a lease as the operator (or one of its jobs).
#[utoipa::path(post, operation_id = "acquire_lease", path = "/leases", tag = "holds", request_body = LeaseBody,
    responses((status = 201, body = LeaseView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "EAGAIN: a break is in progress there")))]
pub async fn acquire(
    State(ctx): State<Arc<ApiContext>>,
    ApiJson(body): ApiJson<LeaseBody>,
) -> Result<(StatusCode, Json<LeaseView>), ApiError> {
    let mode = match body.mode {
        Mode::Shared => LeaseMode::Shared,
        Mode::Exclusive => LeaseMode::Exclusive,
    };
    let l = ctx
        .actions
        .acquire_lease_as(
            body.owner.as_deref(),
            &body.region,
            body.offset,
            body.length,
            mode,
        )
        .map_err(|e| ctx.error(e))?;
    Ok((
        StatusCode::CREATED,
        Json(LeaseView {
            id: l.id.to_raw(),
            region: l.region,
            offset: l.offset,
            length: l.length,
            mode: l.mode.to_string(),
        }),
    ))
}

/// Release one of the operator's leases.
#[utoipa::path(delete, operation_id = "release_lease", path = "/leases/{id}", tag = "holds",
    params(("id" = u64, Path, description = "lease id")),
    responses((status = 204, description = "released"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn release(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let raw: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("lease id '{id}' is not a number")))?;
    ctx.actions.release_lease(raw).map_err(|e| ctx.error(e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// What revoking an owner took away.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevokedView {
    pub owner: u64,
    pub name: String,
    /// Leases released.
    pub leases: u64,
    /// Pins whose DMA mappings were torn down (before anything else went).
    pub dma_torn_down: u64,
    /// Regions it held leases or pins on.
    pub regions: Vec<String>,
}

/// End one owner now (a guest holding capacity hostage): its DMA mappings are torn down first, then its pins and
/// leases are released, and it is told (a guest owner gets a revoke message on the agent channel). Changes that
/// waited on it proceed.
#[utoipa::path(post, operation_id = "revoke_owner", path = "/owners/{id}/revoke", tag = "holds",
    params(("id" = u64, Path, description = "owner id (GET /owners)")),
    responses((status = 200, body = RevokedView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such owner")))]
pub async fn revoke_owner(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
) -> Result<Json<RevokedView>, ApiError> {
    let raw: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("owner id '{id}' is not a number")))?;
    let r = ctx.actions.revoke_owner(raw).map_err(|e| ctx.error(e))?;
    Ok(Json(RevokedView {
        owner: r.owner,
        name: r.name,
        leases: r.leases as u64,
        dma_torn_down: r.dma_torn_down as u64,
        regions: r.regions,
    }))
}
