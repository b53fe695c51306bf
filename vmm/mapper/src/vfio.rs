//! The VFIO type1 IOMMU backend: VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on a container fd the VMM set up.
//! Hand-written ioctls: the rust-vmm vfio crates pull in vm-memory and KVM types this crate must not depend on.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::dma::{DmaMapper, DmaRange};

// linux/vfio.h: VFIO_TYPE = ';', VFIO_BASE = 100.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (VFIO_BASE + nr)) as libc::c_ulong
}
pub(crate) const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
pub(crate) const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
pub(crate) const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
pub(crate) const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
pub(crate) const VFIO_API_VERSION: i32 = 0;
pub(crate) const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct VfioIommuType1DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct VfioIommuType1DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

/// A VFIO container (/dev/vfio/vfio) whose groups and IOMMU type the VMM has set up.
#[derive(Debug)]
pub struct VfioContainer {
    fd: OwnedFd,
}

impl VfioContainer {
    /// Opens the container device and checks the API version and type1 IOMMU support.
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let c = VfioContainer { fd: f.into() };
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let v = unsafe { libc::ioctl(c.fd.as_raw_fd(), VFIO_GET_API_VERSION) };
        if v < 0 {
            return Err(io::Error::last_os_error());
        }
        if v != VFIO_API_VERSION {
            return Err(io::Error::other(format!(
                "VFIO API version {v}, want {VFIO_API_VERSION}"
            )));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer argument by value.
        let t1 = unsafe { libc::ioctl(c.fd.as_raw_fd(), VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU) };
        if t1 <= 0 {
            return Err(io::Error::other("VFIO container lacks the type1v2 IOMMU"));
        }
        Ok(c)
    }

    /// Wraps an fd the VMM already configured (groups attached, VFIO_SET_IOMMU done).
    pub fn from_file(f: File) -> Self {
        VfioContainer { fd: f.into() }
    }

    /// Wraps a raw fd.
    ///
    /// # Safety
    /// `fd` must be an open fd that nothing else will close.
    pub unsafe fn from_raw_fd(fd: i32) -> Self {
        // SAFETY: forwarded to the caller.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        VfioContainer { fd }
    }
}

impl DmaMapper for VfioContainer {
    fn map(&self, iova: u64, range: DmaRange<'_>) -> io::Result<()> {
        let (vaddr, len) = (range.vaddr(), range.len());
        let arg = VfioIommuType1DmaMap {
            argsz: std::mem::size_of::<VfioIommuType1DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA reads `argsz` bytes of `arg`, which is exactly its size.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut arg = VfioIommuType1DmaUnmap {
            argsz: std::mem::size_of::<VfioIommuType1DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: len,
        };
        // SAFETY: VFIO_IOMMU_UNMAP_DMA reads and writes back (size unmapped) `argsz` bytes of `arg`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if arg.size != len {
            return Err(io::Error::other(format!(
                "VFIO unmapped {:#x} of {len:#x} bytes",
                arg.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn vfio_ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n) from linux/vfio.h.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(std::mem::size_of::<VfioIommuType1DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<VfioIommuType1DmaUnmap>(), 24);
    }

    /// This machine has no VFIO (/dev/vfio absent, no IOMMU), so the container is exercised at its edges: opening
    /// a missing container fails cleanly, and the real MAP/UNMAP ioctls on an fd that is not a container are
    /// rejected by the kernel (ENOTTY) and surface as errors, never as a recorded mapping.
    #[test]
    fn vfio_container_edges_without_vfio_on_this_machine() {
        if Path::new("/dev/vfio/vfio").exists() {
            eprintln!("/dev/vfio/vfio exists: open must succeed or fail with a clear reason");
            if let Err(e) = VfioContainer::open(Path::new("/dev/vfio/vfio")) {
                eprintln!("open: {e}");
            }
        } else {
            let e = VfioContainer::open(Path::new("/dev/vfio/vfio")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
        // /dev/null is a character device without VFIO ioctls: both version check and DMA ioctls fail.
        assert!(VfioContainer::open(Path::new("/dev/null")).is_err());
        let c = VfioContainer::from_file(File::open("/dev/null").unwrap());
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let m = crate::HostMapping::map(&f, 0, 4096, crate::MapOptions::default()).unwrap();
        let e = c.map(0x1000, DmaRange::new(&m, 0, 4096)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        let e = c.unmap(0x1000, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }
}
