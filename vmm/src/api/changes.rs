//! `POST /regions/{id}/punch|zero|break`: parse the body and run the change action ([`crate::actions::change`])
//! on a blocking thread (it may wait for holders up to its deadline); its progress reaches `GET /events` from
//! the mapper's break events as it happens.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use super::error::{ApiError, ErrorBody};
use super::json::ApiJson;
pub use crate::actions::change::{
    ChangeKind, ChangeResult, HolderOutcome, Policy, DEFAULT_DEADLINE_MS, MAX_DEADLINE_MS,
};
use crate::actions::Change;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    /// Region-relative byte offset.
    pub offset: u64,
    /// Bytes; 0 = to the end of the region.
    #[serde(default)]
    pub length: u64,
    /// Milliseconds holders of shared leases get to release (default 5000, at most one day).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub policy: Policy,
}

/// Punch a range: deallocate it (it reads back as zeros and its blocks return to the filesystem).
#[utoipa::path(post, operation_id = "punch", path = "/regions/{id}/punch", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "the change was applied"),
        (status = 400, body = ErrorBody, description = "bad request (range outside the region, bad JSON, ...)"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused: ETXTBSY/EDEADLK naming the holder, ETIMEDOUT, EAGAIN")))]
pub async fn punch(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, ChangeKind::Punch).await
}

/// Zero a range, keeping its blocks allocated.
#[utoipa::path(post, operation_id = "zero", path = "/regions/{id}/zero", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "the change was applied"),
        (status = 400, body = ErrorBody, description = "bad request"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused, with errno and holder")))]
pub async fn zero(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, ChangeKind::Zero).await
}

/// Break (evacuate) a range: every holder is asked to give it back; the file is not changed.
#[utoipa::path(post, operation_id = "break_range", path = "/regions/{id}/break", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "every holder released (or was revoked)"),
        (status = 400, body = ErrorBody, description = "bad request"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused, with errno and holder")))]
pub async fn evacuate(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, ChangeKind::Break).await
}

async fn run(
    ctx: Arc<ApiContext>,
    name: String,
    body: ChangeBody,
    kind: ChangeKind,
) -> Result<Json<ChangeResult>, ApiError> {
    let change = Change {
        kind,
        region: name,
        offset: body.offset,
        length: body.length,
        deadline_ms: body.deadline_ms,
        policy: body.policy,
    };
    let started = std::time::Instant::now();
    let actions = ctx.actions.clone();
    let result = tokio::task::spawn_blocking(move || actions.change(change))
        .await
        .map_err(|e| ApiError::internal(format!("change task failed: {e}")))?;
    // Bad input (no such region, a range outside it) is not a change: only what reached the mapper is counted.
    let label = match &result {
        Ok(r) if r.holders.iter().any(|h| h.revoked) => Some("revoked"),
        Ok(_) => Some("done"),
        Err(crate::actions::ActionError::Refused(e)) => Some(match e.errno() {
            libc::ETIMEDOUT => "timed_out",
            libc::ETXTBSY | libc::EDEADLK => "conflict",
            _ => "error",
        }),
        Err(_) => None,
    };
    if let Some(label) = label {
        ctx.metrics
            .record_change(kind.name(), label, started.elapsed());
    }
    result.map(Json).map_err(|e| ctx.error(e))
}
