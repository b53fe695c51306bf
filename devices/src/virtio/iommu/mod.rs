//! virtio-iommu (virtio 1.2, 5.13; device id 23): the guest kernel's DMA API asks this device to map and unmap
//! I/O virtual addresses for the endpoints behind it (passthrough devices, described to the guest by ACPI VIOT).
//!
//! - [`request`]: parsing an untrusted descriptor chain into a request (head, body, where the status goes).
//! - [`device`]: the device model ([`Iommu`]): domains, endpoints and mappings, the specification's status codes,
//!   the event queue that reports faults, and the [`IommuHandle`] the VMM keeps to fence a range.
//! - [`metrics`]: counters of requests, statuses, mapped bytes, fences and fault events.
//!
//! The device knows nothing of VFIO, pins or leases: every mapping it accepts goes through the [`IommuMapper`]
//! the VMM implements (pin + container map for pmem, container map for RAM, a refusal for anything else), and
//! it is the mapper's answer that decides the status the guest reads.

pub mod device;
pub mod metrics;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{DmaMap, Iommu, IommuConfig, IommuHandle, IommuMapper, MapRefusal};
pub use metrics::{IommuMetrics, IommuMetricsSnapshot};

/// virtio-iommu device id.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Size of both queues. One request is in flight per DMA-API call of the guest.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2, 5.13.3).
pub mod features {
    /// `input_range` in config space is valid.
    pub const INPUT_RANGE: u64 = 1 << 0;
    /// `domain_range` in config space is valid.
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    /// MAP and UNMAP are supported.
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// Endpoints not attached to a domain bypass the IOMMU (not offered: unattached means no DMA).
    pub const BYPASS: u64 = 1 << 3;
    /// PROBE is supported.
    pub const PROBE: u64 = 1 << 4;
    /// The MMIO mapping flag is supported (not offered).
    pub const MMIO: u64 = 1 << 5;
}

/// Request types (virtio 1.2, 5.13.6).
pub mod req_type {
    /// Attach an endpoint to a domain.
    pub const ATTACH: u8 = 1;
    /// Detach an endpoint from a domain.
    pub const DETACH: u8 = 2;
    /// Map a range of IOVA to guest physical memory.
    pub const MAP: u8 = 3;
    /// Unmap a range of IOVA.
    pub const UNMAP: u8 = 4;
    /// Ask for an endpoint's properties.
    pub const PROBE: u8 = 5;
}

/// Status codes written in the request tail (virtio 1.2, 5.13.6).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Virtio communication error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
    /// Internal device error.
    pub const DEVERR: u8 = 3;
    /// Invalid parameters.
    pub const INVAL: u8 = 4;
    /// Out-of-range parameters.
    pub const RANGE: u8 = 5;
    /// Entry not found.
    pub const NOENT: u8 = 6;
    /// Bad address.
    pub const FAULT: u8 = 7;
    /// Insufficient resources.
    pub const NOMEM: u8 = 8;
    /// Number of status codes (for per-status counters).
    pub const COUNT: usize = 9;

    /// The specification's name of a status code.
    pub fn name(s: u8) -> &'static str {
        match s {
            OK => "ok",
            IOERR => "ioerr",
            UNSUPP => "unsupp",
            DEVERR => "deverr",
            INVAL => "inval",
            RANGE => "range",
            NOENT => "noent",
            FAULT => "fault",
            NOMEM => "nomem",
            _ => "unknown",
        }
    }
}

/// MAP flags.
pub mod map_flags {
    /// The endpoint may read.
    pub const READ: u32 = 1 << 0;
    /// The endpoint may write.
    pub const WRITE: u32 = 1 << 1;
    /// The range is MMIO (not supported: [`super::features::MMIO`] is not offered).
    pub const MMIO: u32 = 1 << 2;
}

/// Fault event (virtio 1.2, 5.13.6.9): reasons and flags.
pub mod fault {
    /// The endpoint accessed an address that has no mapping.
    pub const REASON_MAPPING: u8 = 2;
    /// The fault was on a read.
    pub const FLAG_READ: u32 = 1 << 0;
    /// The fault was on a write.
    pub const FLAG_WRITE: u32 = 1 << 1;
    /// `address` is valid.
    pub const FLAG_ADDRESS: u32 = 1 << 8;
    /// Size of `struct virtio_iommu_fault`.
    pub const LEN: usize = 24;
}

/// PROBE property: reserved memory region (virtio 1.2, 5.13.6.8.2).
pub mod probe {
    /// Property type: reserved memory region.
    pub const RESV_MEM: u16 = 1;
    /// Subtype: accesses are MSI doorbells, they bypass translation.
    pub const RESV_MEM_MSI: u8 = 1;
    /// Bytes the device writes per endpoint (properties, then a zero type that ends them).
    pub const SIZE: u32 = 64;
}
