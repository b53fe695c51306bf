//! DMA mappers: where a pin hands its range to a device. `VfioContainer` (feature `vfio`, in `vfio.rs`) issues
//! the real VFIO type1 IOMMU ioctls; `RecordingDma` is an in-process backend that records IOVA mappings so tests
//! (and VMs without passthrough devices) can see exactly what a device could reach.

#[cfg(any(test, feature = "test-util"))]
use std::collections::BTreeMap;
use std::io;
#[cfg(any(test, feature = "test-util"))]
use std::sync::Mutex;

/// A range of a live host mapping that a pin hands to a DMA mapper. Only the mapper makes these (from a
/// region's own [`crate::HostMapping`]), so an implementation never receives a wild address.
#[derive(Clone, Copy, Debug)]
pub struct DmaRange<'a> {
    mapping: &'a crate::HostMapping,
    off: usize,
    len: usize,
}

impl<'a> DmaRange<'a> {
    pub(crate) fn new(mapping: &'a crate::HostMapping, off: usize, len: usize) -> Self {
        DmaRange { mapping, off, len }
    }

    /// Host virtual address of the first byte.
    pub fn vaddr(&self) -> usize {
        self.mapping.addr() + self.off
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Never true: pins are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Maps host virtual ranges at IOVAs for a device, and tears them down.
pub trait DmaMapper: Send + Sync {
    /// Makes `range` reachable by the device at `iova`.
    fn map(&self, iova: u64, range: DmaRange<'_>) -> io::Result<()>;
    /// Removes the mapping of `[iova, iova + len)` made by one `map`.
    fn unmap(&self, iova: u64, len: u64) -> io::Result<()>;
    /// Whether `map` pins pages through the kernel's long-term pinning (VFIO type1, iommufd), so that the
    /// kernel's rules of what may be pinned ([`crate::DmaRule`]) apply and a pin the kernel would refuse is
    /// refused up front.
    fn long_term_pins(&self) -> bool {
        true
    }
}

/// Records IOVA -> (vaddr, len) mappings in process, refusing overlaps like an IOMMU would (feature
/// `test-util`): tests see exactly what a device could reach. It pins nothing itself, so the kernel's pinning
/// rules apply to it only when made with [`RecordingDma::with_kernel_rules`].
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct RecordingDma {
    maps: Mutex<BTreeMap<u64, (usize, u64)>>,
    kernel_rules: bool,
}

#[cfg(any(test, feature = "test-util"))]
impl RecordingDma {
    /// No mappings yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// As [`RecordingDma::new`], standing in for a DMA mapper that pins through the kernel: the mapper refuses
    /// up front what the kernel would refuse to pin.
    pub fn with_kernel_rules() -> Self {
        RecordingDma {
            kernel_rules: true,
            ..Self::default()
        }
    }

    /// (iova, vaddr, len) of every live mapping, by iova.
    pub fn mappings(&self) -> Vec<(u64, usize, u64)> {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(i, (v, l))| (*i, *v, *l))
            .collect()
    }
}

#[cfg(any(test, feature = "test-util"))]
impl DmaMapper for RecordingDma {
    fn map(&self, iova: u64, range: DmaRange<'_>) -> io::Result<()> {
        let (vaddr, len) = (range.vaddr(), range.len());
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let end = iova
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0
            || m.range(..end)
                .next_back()
                .is_some_and(|(i, (_, l))| i + l > iova)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        m.insert(iova, (vaddr, len));
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&iova) {
            Some((_, l)) if *l == len => {
                m.remove(&iova);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn long_term_pins(&self) -> bool {
        self.kernel_rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::*;

    fn mapping(len: u64) -> crate::HostMapping {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        crate::HostMapping::map(&f, 0, len, crate::MapOptions::default()).unwrap()
    }

    #[test]
    fn recording_backend_refuses_overlap_and_unknown_unmap() {
        let m = mapping(0x3000);
        let d = RecordingDma::new();
        d.map(0x1000, DmaRange::new(&m, 0, 0x2000)).unwrap();
        assert_eq!(
            d.map(0x2000, DmaRange::new(&m, 0, 0x1000))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            d.map(0, DmaRange::new(&m, 0, 0x1001))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        d.map(0x3000, DmaRange::new(&m, 0x2000, 0x1000)).unwrap();
        assert_eq!(
            d.unmap(0x1000, 0x1000).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        d.unmap(0x1000, 0x2000).unwrap();
        assert_eq!(d.mappings(), vec![(0x3000, m.addr() + 0x2000, 0x1000)]);
    }
}
