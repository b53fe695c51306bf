//! DMA mappers: where a pin hands its range to a device. `VfioContainer` issues the real VFIO type1 IOMMU ioctls
//! (VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA) on a container fd; `RecordingDma` is an in-process backend that
//! records IOVA mappings so tests (and VMs without passthrough devices) can see exactly what a device could reach.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

/// Maps host virtual ranges at IOVAs for a device, and tears them down.
pub trait DmaMapper: Send + Sync {
    fn map(&self, iova: u64, vaddr: usize, len: u64) -> io::Result<()>;
    fn unmap(&self, iova: u64, len: u64) -> io::Result<()>;
}

// linux/vfio.h: VFIO_TYPE = ';', VFIO_BASE = 100.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (VFIO_BASE + nr)) as libc::c_ulong
}
pub const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
pub const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
pub const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
pub const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
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
        VfioContainer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }
}

impl DmaMapper for VfioContainer {
    fn map(&self, iova: u64, vaddr: usize, len: u64) -> io::Result<()> {
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

/// Records IOVA -> (vaddr, len) mappings in process, refusing overlaps like an IOMMU would.
#[derive(Debug, Default)]
pub struct RecordingDma {
    maps: Mutex<BTreeMap<u64, (usize, u64)>>,
}

impl RecordingDma {
    pub fn new() -> Self {
        Self::default()
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

impl DmaMapper for RecordingDma {
    fn map(&self, iova: u64, vaddr: usize, len: u64) -> io::Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let buf = vec![0u8; 4096];
        let e = c.map(0x1000, buf.as_ptr() as usize, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        let e = c.unmap(0x1000, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }

    #[test]
    fn recording_backend_refuses_overlap_and_unknown_unmap() {
        let d = RecordingDma::new();
        d.map(0x1000, 0xdead000, 0x2000).unwrap();
        assert_eq!(
            d.map(0x2000, 0, 0x1000).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            d.map(0, 0, 0x1001).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        d.map(0x3000, 0xbeef000, 0x1000).unwrap();
        assert_eq!(
            d.unmap(0x1000, 0x1000).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        d.unmap(0x1000, 0x2000).unwrap();
        assert_eq!(d.mappings(), vec![(0x3000, 0xbeef000, 0x1000)]);
    }
}
