//! What applications and the CLI say to the daemon over its Unix socket: one JSON object per line each way.
//! Each connection is one owner on the host; closing it releases everything it held.

use serde::{Deserialize, Serialize};

/// A request from an application.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The regions the VM gives this guest.
    Regions,
    /// A lease for this connection.
    Lease {
        region: u64,
        #[serde(default)]
        offset: u64,
        /// 0 = to the end of the region.
        #[serde(default)]
        len: u64,
        #[serde(default)]
        exclusive: bool,
    },
    /// Make a range pinnable (needs this connection's exclusive lease over it).
    Prepare {
        region: u64,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        len: u64,
    },
    /// Pin a range (needs this connection's exclusive lease over it).
    Pin {
        region: u64,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        len: u64,
        /// For DMA: the host maps the range for the VM's passthrough devices until the unpin.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dma: bool,
    },
    /// Release a lease, whichever connection holds it.
    Release { lease: u64 },
    /// The daemon's view: session, owners, leases, pins, breaks.
    Status,
    /// Give the free space of pmem filesystems back to the host (freeze, offer, thaw).
    Reclaim {
        /// One mount; none = every filesystem on a pmem device.
        #[serde(default)]
        mount: Option<String>,
        #[serde(default)]
        min_size: u64,
        /// The bound on the host's answers while frozen, in milliseconds.
        timeout_ms: u64,
    },
}

/// The answer to one request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Response {
    pub ok: bool,
    /// Errno name when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// The owner holding the range, for ETXTBSY/EDEADLK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A new lease or pin id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<Region>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// One report per filesystem reclaimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<Vec<crate::thin::Report>>,
}

/// Sent to a connection when one of its leases is asked for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The host needs the range back.
    Break {
        lease: u64,
        region: u64,
        offset: u64,
        len: u64,
        deadline_ms: u32,
        reason: String,
    },
    /// The daemon released the lease (the hook exited 0).
    Released { lease: u64 },
    /// The host revoked the lease at its deadline.
    Revoked { lease: u64 },
}

/// A line the daemon sends: a response or an event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Line {
    Event(Event),
    Response(Response),
}

/// One region.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub id: u64,
    pub name: String,
    pub guest_addr: u64,
    pub size: u64,
    pub kind: String,
    pub readonly: bool,
    pub dma_pinnable: bool,
}

/// One lease or pin the daemon knows of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hold {
    pub id: u64,
    pub what: String,
    pub owner: u64,
    pub client: String,
    pub region: u64,
    pub offset: u64,
    pub len: u64,
}

/// The daemon's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Status {
    pub session: u64,
    pub port: String,
    pub clients: usize,
    pub holds: Vec<Hold>,
    pub breaks_seen: u64,
    pub hooks_run: u64,
}
