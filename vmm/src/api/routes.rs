//! The router and the OpenAPI document, from one list: every route is registered through utoipa-axum with the
//! `#[utoipa::path]` of its handler, so the document describes exactly what is served.

use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::Json;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::context::ApiContext;
use super::error::ApiError;
use super::json::MAX_BODY;
use super::{changes, devices, events, holds, metrics, reclaim, regions, vm};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "daxvisor operator API",
        description = "Control plane of one daxvisor VM, over HTTP/1.1 on the Unix socket given to \
            `daxvisor run --api-socket`: who holds what, layout changes that ask holders first, flush rate \
            limits, events, metrics. Errors are JSON bodies naming the problem, with the errno name and the \
            holder when the layout-lease manager refused.",
        version = "1",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "vm", description = "The VM: state, configuration, stop"),
        (name = "regions", description = "pmem regions and their flush rate limits"),
        (name = "holds", description = "Owners, leases, pins, breaks; the operator's own leases"),
        (name = "changes", description = "Punch, zero, break (evacuate)"),
        (name = "devices", description = "Passthrough devices and what they can reach by DMA"),
        (name = "reclaim", description = "Ranges guests offered back; the policy for punching them"),
        (name = "events", description = "The event stream"),
        (name = "metrics", description = "Prometheus metrics"),
    )
)]
struct ApiDoc;

fn build() -> OpenApiRouter<Arc<ApiContext>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(vm::get))
        .routes(routes!(vm::stop))
        .routes(routes!(regions::list, regions::add))
        .routes(routes!(regions::get, regions::remove))
        .routes(routes!(regions::set_rate_limit))
        .routes(routes!(holds::owners))
        .routes(routes!(holds::breaks))
        .routes(routes!(holds::acquire))
        .routes(routes!(holds::release))
        .routes(routes!(holds::revoke_owner))
        .routes(routes!(changes::punch))
        .routes(routes!(changes::zero))
        .routes(routes!(changes::evacuate))
        .routes(routes!(devices::list))
        .routes(routes!(devices::probe))
        .routes(routes!(devices::viommu))
        .routes(routes!(reclaim::list))
        .routes(routes!(reclaim::stats))
        .routes(routes!(reclaim::region))
        .routes(routes!(reclaim::set_policy))
        .routes(routes!(reclaim::reclaim))
        .routes(routes!(events::get))
        .routes(routes!(metrics::get))
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3 document of this API (`docs/openapi.json` is a checked-in copy).
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| build().into_openapi())
}

/// The document as `docs/openapi.json` holds it.
pub fn openapi_text() -> String {
    let mut s = openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

/// This document.
#[utoipa::path(get, operation_id = "get_openapi", path = "/openapi.json", tag = "vm",
    responses((status = 200, description = "the OpenAPI 3 document", content_type = "application/json")))]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The served router.
pub fn router(ctx: Arc<ApiContext>) -> axum::Router {
    let (router, _) = build().split_for_parts();
    router
        .fallback(|| async { ApiError::not_found("no such endpoint (see GET /openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in document is the one the code generates; regenerate with
    /// `cargo run -p daxvisor -- openapi > docs/openapi.json`.
    #[test]
    fn docs_openapi_json_is_what_the_code_serves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let file = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            file == openapi_text(),
            "docs/openapi.json differs from the served API; run `cargo run -p daxvisor -- openapi > docs/openapi.json`"
        );
    }
}
