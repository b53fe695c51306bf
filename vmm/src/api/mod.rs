//! The operator API: REST over a Unix socket (`daxvisor run --api-socket PATH`), in the convention of Cloud
//! Hypervisor and Firecracker, with an OpenAPI 3 document generated from the handlers (`docs/openapi.json`)
//! and Prometheus metrics. See `docs/operator-api.md`.
//!
//! - [`server`]: the socket and the API thread (hyper on a current-thread tokio runtime).
//! - [`routes`]: the router and the OpenAPI document, from one list.
//! - [`context`]: what requests work on (the mapper, the regions as the operator named them, events, stop).
//! - One module per resource group: [`vm`], [`regions`] (and flush rate limits), [`holds`] (owners, leases,
//!   pins, breaks, the operator's own leases), [`changes`] (punch, zero, break), [`reclaim`]
//!   (offers guests gave back, the policy for them), [`events`], [`metrics`].
//! - [`error`], [`json`]: every refusal is a JSON body naming the problem.

pub mod changes;
pub mod context;
pub mod error;
pub mod events;
pub mod holds;
pub mod json;
pub mod metrics;
pub mod reclaim;
pub mod regions;
pub mod routes;
pub mod server;
pub mod vm;

pub use context::{ApiContext, RegionHandle, VmConfigView};
pub use server::{ApiServer, ApiSocketError};

/// The length the API reports for a range: 0 for an open end ("to the end", as requests say it).
pub fn range_len(r: &daxvisor_mapper::ByteRange) -> u64 {
    if r.end == daxvisor_mapper::OPEN_END {
        0
    } else {
        r.end - r.start
    }
}
