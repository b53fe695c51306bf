//! The operator API: REST over a Unix socket (`daxvisor run --api-socket PATH`), in the convention of Cloud
//! Hypervisor and Firecracker, with an OpenAPI 3 document generated from the handlers (`docs/openapi.json`)
//! and Prometheus metrics. See `docs/operator-api.md`.
//!
//! - [`server`]: the socket and the API thread (hyper on a current-thread tokio runtime).
//! - [`routes`]: the router and the OpenAPI document, from one list.
//! - [`context`]: what requests work on: the VM's actions (every change) and what they read.
//! - Handlers only parse a request and call an action ([`crate::actions`]) or read the registry and mapper.
//! - One module per resource group: [`vm`], [`regions`] (and flush rate limits), [`holds`] (owners, leases,
//!   pins, breaks, the operator's own leases), [`changes`] (punch, zero, break), [`reclaim`]
//!   (offers guests gave back, the policy for them), [`events`], [`metrics`] (also served on a loopback TCP
//!   port by [`metrics_listener`]).
//! - [`error`], [`json`]: every refusal is a JSON body naming the problem.
//! - [`limits`]: how long a body may take, how many followers, who gets a slot when all are taken.

pub mod changes;
pub mod context;
pub mod devices;
pub mod error;
pub mod events;
pub mod holds;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod metrics_listener;
pub mod reclaim;
pub mod regions;
pub mod routes;
pub mod server;
pub mod vm;

pub use context::{ApiContext, VmConfigView};
pub use server::{ApiServer, ApiSocketError};

/// The length the API reports for a range: 0 for an open end ("to the end", as requests say it).
pub fn range_len(r: &daxvisor_mapper::ByteRange) -> u64 {
    if r.end == daxvisor_mapper::OPEN_END {
        0
    } else {
        r.end - r.start
    }
}

/// A region-relative range the way every message and table writes it: `[0x100000, 0x200000)`, or
/// `[0x100000, end)` for length 0 ("to the end of the region").
pub fn range_text(offset: u64, length: u64) -> String {
    if length == 0 {
        format!("[{offset:#x}, end)")
    } else {
        format!("[{offset:#x}, {:#x})", offset.saturating_add(length))
    }
}
