//! virtio-pmem (virtio 1.2, 5.19; device id 27): a guest physical window that is a host file, plus one
//! request queue on which the guest asks for its writes to be made durable.
//!
//! - [`device`]: the device model ([`Pmem`]): config space, queue processing, completions.
//! - [`request`]: parsing an untrusted descriptor chain into a request.
//! - [`flush`]: the [`Flush`] trait the VMM's backing implements and the coalescing worker thread.
//! - [`metrics`]: counters and the latency histogram.
//! - [`rate_limit`]: token buckets (requests, bytes) the flush worker waits on; changeable at runtime.
//! - [`readonly`]: drops and counts guest writes to a `readonly=on` window.
//!
//! The device never sees the file: it calls a [`Flush`] object the VMM built for the backing kind (fdatasync
//! for page-cache files, nothing for MAP_SYNC or device-DAX), so file policy stays in the VMM.

pub mod device;
pub mod flush;
pub mod metrics;
pub mod rate_limit;
pub mod readonly;
pub mod request;

#[cfg(test)]
mod queue_proptest;

pub use device::{Pmem, PmemConfig};
pub use flush::{Flush, FlushPolicy, FlushWorker};
pub use metrics::{PmemMetrics, PmemMetricsSnapshot};
pub use rate_limit::{BucketConfig, FlushLimits, FlushRateLimit};
pub use readonly::ReadonlyWindow;

/// virtio-pmem device id.
pub const VIRTIO_ID_PMEM: u32 = 27;
/// The only request type: make everything written to the region so far durable.
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// Response `ret`: the flush succeeded.
pub const VIRTIO_PMEM_RESP_TYPE_OK: u32 = 0;
/// Response `ret`: the flush failed.
pub const VIRTIO_PMEM_RESP_TYPE_EIO: u32 = 1;
/// Size of the single request queue. The Linux driver sends one request per flush, so 256 outstanding
/// flushes is plenty.
pub const QUEUE_SIZE: u16 = 256;
