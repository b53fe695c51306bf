//! Offer-reclaim: the ranges guests gave back ([`crate::reclaim`]), each region's policy for them, and punching
//! them on the operator's word.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use super::error::{ApiError, ErrorBody};
use super::json::ApiJson;
use crate::reclaim::{Offer, ReclaimOutcome, ReclaimPolicy};

/// A region's offers and its policy.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionOffers {
    pub region: String,
    pub policy: ReclaimPolicy,
    pub offers: Vec<Offer>,
}

/// The policy for a region's offers.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// `manual` (listed until the operator reclaims them) or `auto` (punched as they arrive).
    pub policy: ReclaimPolicy,
}

/// What a reclaim did, offer by offer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReclaimResult {
    pub region: String,
    /// Bytes punched.
    pub reclaimed_bytes: u64,
    pub outcomes: Vec<ReclaimOutcome>,
}

/// Every offer guests made that is still listed, oldest first.
#[utoipa::path(get, operation_id = "list_offers", path = "/reclaim", tag = "reclaim",
    responses((status = 200, body = [Offer])))]
pub async fn list(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<Offer>> {
    Json(ctx.reclaim.list(None))
}

/// One region's offers and its reclaim policy.
#[utoipa::path(get, operation_id = "region_offers", path = "/regions/{id}/reclaim", tag = "reclaim",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    responses((status = 200, body = RegionOffers), (status = 404, body = ErrorBody)))]
pub async fn region(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
) -> Result<Json<RegionOffers>, ApiError> {
    let r = ctx.region(&id)?;
    Ok(Json(RegionOffers {
        region: r.name.clone(),
        policy: ctx.reclaim.policy(r.region),
        offers: ctx.reclaim.list(Some(r.region)),
    }))
}

/// Set a region's reclaim policy; `auto` also punches the offers already listed.
#[utoipa::path(put, operation_id = "set_reclaim_policy", path = "/regions/{id}/reclaim-policy", tag = "reclaim",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = PolicyBody,
    responses((status = 200, body = PolicyBody, description = "the policy now in force"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_policy(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> Result<Json<PolicyBody>, ApiError> {
    let r = ctx.region(&id)?;
    ctx.reclaim.set_policy(r.region, body.policy);
    Ok(Json(body))
}

/// Punch every offered range of a region now (holders of shared leases over one are asked first; a pin or
/// exclusive lease of another owner refuses it, and the offer stays listed).
#[utoipa::path(post, operation_id = "reclaim", path = "/regions/{id}/reclaim", tag = "reclaim",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    responses((status = 200, body = ReclaimResult, description = "each offer punched or refused"),
        (status = 404, body = ErrorBody)))]
pub async fn reclaim(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
) -> Result<Json<ReclaimResult>, ApiError> {
    let r = ctx.region(&id)?;
    let (name, region) = (r.name.clone(), r.region);
    let table = ctx.reclaim.clone();
    let outcomes = tokio::task::spawn_blocking(move || table.reclaim_region(region))
        .await
        .map_err(|e| ApiError::internal(format!("reclaim task failed: {e}")))?;
    Ok(Json(ReclaimResult {
        region: name,
        reclaimed_bytes: outcomes
            .iter()
            .filter(|o| o.punched)
            .map(|o| o.offer.length)
            .sum(),
        outcomes,
    }))
}
