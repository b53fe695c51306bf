//! The layout-lease manager's [`DmaMapper`] over the VFIO container the VM's passthrough devices are in: a pin
//! for DMA becomes `VFIO_IOMMU_MAP_DMA` at IOVA = guest physical address, its end `VFIO_IOMMU_UNMAP_DMA`. Guest
//! RAM is mapped here too, once at start; pmem only ever through pins (`--pmem dma=`).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use daxvisor_mapper::{DmaMapper, DmaRange};
use vfio_ioctls::{VfioContainer, VfioError};

/// What one IOVA range maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// Guest RAM, mapped at start.
    Ram,
    /// A pinned pmem range.
    Pin,
}

/// One live IOMMU mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub iova: u64,
    pub len: u64,
    pub kind: MappingKind,
}

/// Maps for the devices of one container, and remembers what the kernel accepted.
pub struct VfioDma {
    container: Arc<VfioContainer>,
    /// iova -> (len, kind) of every mapping the kernel accepted and that was not unmapped yet.
    live: Mutex<BTreeMap<u64, (u64, MappingKind)>>,
}

fn errno(e: &VfioError) -> io::Error {
    match e {
        VfioError::IommuDmaMap(s) | VfioError::IommuDmaUnmap(s) => {
            io::Error::from_raw_os_error(s.errno())
        }
        other => io::Error::other(other.to_string()),
    }
}

impl VfioDma {
    pub fn new(container: Arc<VfioContainer>) -> Self {
        VfioDma {
            container,
            live: Mutex::default(),
        }
    }

    fn live(&self) -> MutexGuard<'_, BTreeMap<u64, (u64, MappingKind)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Map `len` bytes of guest RAM at host address `host` for DMA at `gpa`.
    ///
    /// # Safety
    /// `[host, host + len)` is guest RAM: mapped for as long as the VM lives, and shared with the guest
    /// already, so a device writing it breaks nothing the guest itself could not.
    pub unsafe fn map_ram(&self, gpa: u64, len: u64, host: *mut u8) -> io::Result<()> {
        // SAFETY: the caller's promise: guest memory, never referenced as Rust data, outliving the mapping
        // (the container is dropped, unmapping everything, before guest memory is).
        unsafe { self.container.vfio_dma_map(gpa, len as usize, host) }.map_err(|e| errno(&e))?;
        self.live().insert(gpa, (len, MappingKind::Ram));
        Ok(())
    }

    /// Every live mapping, by IOVA.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.live()
            .iter()
            .map(|(&iova, &(len, kind))| Mapping { iova, len, kind })
            .collect()
    }

    /// Asks the container itself whether anything is mapped at `iova`: a scratch page mapped there is refused
    /// with `EEXIST` while something is (and removed again when it is not).
    pub fn container_maps(&self, iova: u64) -> io::Result<bool> {
        const PAGE: usize = 4096;
        // SAFETY: a fresh private anonymous page, unmapped below; nothing else refers to it.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the page is ours and is only handed to the IOMMU for the moment of the probe.
        let r = unsafe { self.container.vfio_dma_map(iova, PAGE, page as *mut u8) };
        let answer = match r {
            Ok(()) => {
                let _ = self.container.vfio_dma_unmap(iova, PAGE);
                Ok(false)
            }
            Err(e) => match errno(&e).raw_os_error() {
                Some(libc::EEXIST) => Ok(true),
                _ => Err(errno(&e)),
            },
        };
        // SAFETY: the page mapped above, no longer in the IOMMU.
        unsafe { libc::munmap(page, PAGE) };
        answer
    }

    /// Unmap everything still mapped (VM end, before the device is reset and its group closed). Returns how
    /// many mappings were removed.
    pub fn unmap_all(&self) -> usize {
        let all: Vec<(u64, u64)> = self.live().iter().map(|(&i, &(l, _))| (i, l)).collect();
        let mut n = 0;
        for (iova, len) in all {
            match self.container.vfio_dma_unmap(iova, len as usize) {
                Ok(()) => n += 1,
                Err(e) => tracing::error!(iova, len, error = %e, "VFIO unmap at VM end failed"),
            }
            self.live().remove(&iova);
        }
        n
    }
}

impl DmaMapper for VfioDma {
    fn map(&self, iova: u64, range: DmaRange<'_>) -> io::Result<()> {
        let len = range.len();
        // SAFETY: the mapper hands only ranges of a region's own live host mapping, which it keeps mapped (and
        // locked) until after `unmap` of this range; that memory is the guest's pmem, accessed by the VMM only
        // through raw pointers and system calls, never as Rust references.
        unsafe {
            self.container
                .vfio_dma_map(iova, len as usize, range.vaddr() as *mut u8)
        }
        .map_err(|e| errno(&e))?;
        self.live().insert(iova, (len, MappingKind::Pin));
        // Debug: under a virtual IOMMU this is once per guest I/O; the pin's own line names who asked.
        tracing::debug!(iova = format_args!("{iova:#x}"), len, "VFIO DMA map");
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        let r = self
            .container
            .vfio_dma_unmap(iova, len as usize)
            .map_err(|e| errno(&e));
        self.live().remove(&iova);
        match &r {
            Ok(()) => tracing::debug!(iova = format_args!("{iova:#x}"), len, "VFIO DMA unmap"),
            Err(e) => {
                tracing::warn!(iova = format_args!("{iova:#x}"), len, error = %e, "VFIO DMA unmap failed")
            }
        }
        r
    }
}
