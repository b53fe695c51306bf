//! The virtual IOMMU (`--device vfio=PATH,iommu=on`): a virtio-iommu device on PCI with the passthrough device
//! behind it, described to the guest by ACPI VIOT (`crate::acpi::viot`). The guest kernel's DMA API maps and
//! unmaps; each MAP of pmem is a pin of exactly that extent held by the endpoint (`viommu:NAME`), each UNMAP its
//! release ([`dma`]), so unmapped pmem stays free for layout changes while the device runs.
//!
//! - [`dma`]: what a MAP becomes on the host (container map for RAM, lease + pin for pmem) and the counters.
//! - [`recall`]: `iommu=recall`: tell the guest, wait, fence at the deadline.
//! - [`setup`]: checks the configuration, builds the device, puts it on PCI.
//!
//! All endpoints share the VM's one VFIO container, so one IOVA space: `iommu=on` takes exactly one passthrough
//! device (refused otherwise at start).

pub mod dma;
pub mod recall;
pub mod setup;

pub use dma::{MapCounters, RamDma, ViommuDma};
pub use setup::{Viommu, ViommuError};

/// IOVA bits advertised (`input_range` = [0, 2^39)): the narrowest address width of Intel VT-d (39 bits, 3-level
/// tables) and below AMD-Vi's 48, so every IOVA the guest picks can be mapped by whatever IOMMU the host has.
pub const INPUT_BITS: u32 = 39;
/// x86's MSI doorbell (0xfee00000-0xfeefffff): reported by PROBE as a reserved MSI range the guest must not map.
pub const MSI_RANGE: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// Most mappings at once: each is a pin or a container mapping; the host's type1 backend allows 65535 per
/// container by default (`dma_entry_limit`).
pub const MAX_MAPPINGS: usize = 65_000;
