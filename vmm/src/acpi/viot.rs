//! ACPI VIOT (Virtual I/O Translation table, ACPI 6.4 5.2.32): tells the guest which PCI endpoints sit behind the
//! virtio-iommu and where that virtio-iommu is (its own PCI requester id), so that x86 Linux (CONFIG_ACPI_VIOT)
//! probes the virtio-iommu driver for them. Built with the `acpi_tables` crate's VIOT builder: one
//! virtio-pci-IOMMU node, and a PCI-range node for the endpoint (endpoint id = requester id, as Linux reads it:
//! `endpoint_start + (bdf - bdf_start)`).

use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};

use super::{OEM_ID, OEM_REVISION};

/// The virtual IOMMU's place on bus 0 of segment 0 and its endpoint (one: see `crate::viommu`), as requester
/// ids (device << 3 | function).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub iommu: u16,
    pub endpoint: u16,
}

fn device(bdf: u16) -> PciDevice {
    // Bus 0; device (5 bits) and function (3 bits) are in range by construction of the masks.
    PciDevice::new(
        0,
        (bdf >> 8) as u8,
        ((bdf >> 3) & 0x1f) as u8,
        (bdf & 7) as u8,
    )
}

/// The table's bytes.
pub fn build(t: &Topology) -> Vec<u8> {
    let mut viot = VIOT::new(OEM_ID, *b"DAXVVIOT", OEM_REVISION);
    let handle = viot.add_virtio_pci_iommu(VirtIoPciIommu::new(device(t.iommu)));
    let e = t.endpoint;
    viot.add_pci_range(PciRange::new(device(e), device(e), &handle));
    super::aml_bytes(&viot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes as ACPI 6.4 lays them out and Linux's drivers/acpi/viot.c reads them: header, node count and
    /// offset, the virtio-pci IOMMU node (type 3, its BDF), the PCI range node of the endpoint (type 1,
    /// endpoint_start = BDF, BDF range, output node = the IOMMU node's offset); the checksum sums to zero.
    #[test]
    fn viot_has_the_iommu_node_and_the_endpoints_range() {
        let b = build(&Topology {
            iommu: 5 << 3,
            endpoint: 4 << 3,
        });
        assert_eq!(&b[0..4], b"VIOT");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0, "checksum");
        assert_eq!(u16::from_le_bytes([b[36], b[37]]), 2, "node count");
        let first = usize::from(u16::from_le_bytes([b[38], b[39]]));
        assert_eq!(first, 48);
        // The IOMMU node.
        assert_eq!(b[first], 3);
        assert_eq!(u16::from_le_bytes([b[first + 2], b[first + 3]]), 16);
        assert_eq!(u16::from_le_bytes([b[first + 6], b[first + 7]]), 5 << 3);
        // The endpoint range.
        let r = first + 16;
        assert_eq!(b[r], 1);
        assert_eq!(
            u32::from_le_bytes(b[r + 4..r + 8].try_into().unwrap()),
            4 << 3
        );
        assert_eq!(u16::from_le_bytes([b[r + 12], b[r + 13]]), 4 << 3);
        assert_eq!(u16::from_le_bytes([b[r + 14], b[r + 15]]), 4 << 3);
        assert_eq!(
            usize::from(u16::from_le_bytes([b[r + 16], b[r + 17]])),
            first
        );
        assert_eq!(b.len(), r + 24);
    }
}
