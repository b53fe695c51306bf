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

/// Bytes offered and punched: one region, or the whole guest (this VM).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReclaimBytes {
    /// The region's name; absent for the guest's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The region's policy; absent for the guest's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ReclaimPolicy>,
    /// Accepted offers (the guest's total only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offers: Option<u64>,
    /// Bytes in accepted offers.
    pub offered_bytes: u64,
    /// Bytes of offered ranges punched.
    pub reclaimed_bytes: u64,
}

/// What the guest offered back and what was punched, per region and in all.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReclaimStats {
    pub guest: ReclaimBytes,
    pub regions: Vec<ReclaimBytes>,
}

/// Bytes offered and reclaimed, per region and for the guest.
#[utoipa::path(get, operation_id = "reclaim_stats", path = "/reclaim/stats", tag = "reclaim",
    responses((status = 200, body = ReclaimStats)))]
pub async fn stats(State(ctx): State<Arc<ApiContext>>) -> Json<ReclaimStats> {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let c = &ctx.reclaim.counters;
    Json(ReclaimStats {
        guest: ReclaimBytes {
            region: None,
            policy: None,
            offers: Some(load(&c.offers)),
            offered_bytes: load(&c.bytes_offered),
            reclaimed_bytes: load(&c.bytes_reclaimed),
        },
        regions: ctx
            .regions
            .all()
            .iter()
            .map(|r| {
                let b = ctx.reclaim.region_bytes(r.id);
                ReclaimBytes {
                    region: Some(r.name().to_owned()),
                    policy: Some(ctx.reclaim.policy(r.id)),
                    offers: None,
                    offered_bytes: b.offered,
                    reclaimed_bytes: b.reclaimed,
                }
            })
            .collect(),
    })
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
        region: r.name().to_owned(),
        policy: ctx.reclaim.policy(r.id),
        offers: ctx.reclaim.list(Some(r.id)),
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
    ctx.actions
        .set_reclaim_policy(&id, body.policy)
        .map_err(|e| ctx.error(e))?;
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
    let actions = ctx.actions.clone();
    let region = id.clone();
    let outcomes = tokio::task::spawn_blocking(move || actions.reclaim_now(&region))
        .await
        .map_err(|e| ApiError::internal(format!("reclaim task failed: {e}")))?
        .map_err(|e| ctx.error(e))?;
    Ok(Json(ReclaimResult {
        region: id,
        reclaimed_bytes: outcomes
            .iter()
            .filter(|o| o.punched)
            .map(|o| o.offer.length)
            .sum(),
        outcomes,
    }))
}
