//! The VFIO type1 IOMMU backend: a container (/dev/vfio/vfio) holding a passthrough device's IOMMU group with the
//! type1v2 IOMMU, and VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on it.
//!
//! Hand-written ioctls, not rust-vmm's `vfio-ioctls`: its 0.10 release matches the workspace's versions (kvm-ioctls
//! 0.25, vmm-sys-util 0.15, vm-memory 0.18, and it builds without its KVM feature), but it requires vm-memory,
//! which this crate (no guest memory) does not use, attaches a group to a container only by opening a device of it
//! through sysfs, and panics in its device's drop when detaching fails. The seven ioctls here are all the mapper needs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use crate::dma::{DmaMapper, DmaRange};

// linux/vfio.h: VFIO_TYPE = ';', VFIO_BASE = 100.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (VFIO_BASE + nr)) as libc::c_ulong
}
pub(crate) const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
pub(crate) const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
pub(crate) const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
pub(crate) const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
pub(crate) const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
pub(crate) const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
pub(crate) const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
pub(crate) const VFIO_API_VERSION: i32 = 0;
pub(crate) const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// The page [`VfioContainer::iova_mapped`] maps to ask the container about an IOVA.
const PROBE_LEN: u64 = 4096;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct VfioGroupStatus {
    argsz: u32,
    flags: u32,
}

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

/// A VFIO container (/dev/vfio/vfio) with its groups and the type1v2 IOMMU: what it maps, its devices reach.
/// Dropping it closes the groups (they leave the container) and the container; the kernel then removes every
/// mapping left.
#[derive(Debug)]
pub struct VfioContainer {
    fd: OwnedFd,
    /// Groups attached by [`VfioContainer::with_group`]; closed before the container (fields drop in order).
    groups: Vec<File>,
    /// What the kernel accepted and has not unmapped yet: iova -> len.
    live: Mutex<BTreeMap<u64, u64>>,
}

impl VfioContainer {
    /// Opens the container device and checks the API version and type1 IOMMU support.
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let c = Self::from_file(f);
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

    /// A container holding the IOMMU group `group` (`/dev/vfio/N`; every device in it bound to vfio-pci) with
    /// the type1v2 IOMMU set: ready to map.
    pub fn with_group(group: &Path) -> io::Result<Self> {
        let mut c = Self::open(Path::new("/dev/vfio/vfio"))?;
        let g = OpenOptions::new().read(true).write(true).open(group)?;
        let mut status = VfioGroupStatus {
            argsz: std::mem::size_of::<VfioGroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS reads `argsz` and writes `flags`, both inside `status`.
        if unsafe { libc::ioctl(g.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut status) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(format!(
                "VFIO group {} is not viable: bind every device in it to vfio-pci",
                group.display()
            )));
        }
        let container_fd: libc::c_int = c.fd.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container fd, through the pointer.
        if unsafe { libc::ioctl(g.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &container_fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        c.groups.push(g);
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        if unsafe { libc::ioctl(container_fd, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU) } < 0 {
            return Err(io::Error::last_os_error());
        }
        tracing::info!(group = %group.display(), "VFIO container ready (type1v2 IOMMU)");
        Ok(c)
    }

    /// Wraps an fd the VMM already configured (groups attached, VFIO_SET_IOMMU done).
    pub fn from_file(f: File) -> Self {
        VfioContainer {
            fd: f.into(),
            groups: Vec::new(),
            live: Mutex::default(),
        }
    }

    /// Wraps a raw fd.
    ///
    /// # Safety
    /// `fd` must be an open fd that nothing else will close.
    pub unsafe fn from_raw_fd(fd: i32) -> Self {
        // SAFETY: forwarded to the caller.
        Self::from_file(unsafe { File::from_raw_fd(fd) })
    }

    /// The mappings the kernel accepted and still holds, as (iova, len) by iova.
    pub fn mappings(&self) -> Vec<(u64, u64)> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(i, l)| (*i, *l))
            .collect()
    }

    /// Asks the kernel whether the container maps anything at `iova`: VFIO_IOMMU_MAP_DMA of a scratch page there
    /// fails with EEXIST when a mapping covers it; when it succeeds, the page is unmapped again at once.
    pub fn iova_mapped(&self, iova: u64) -> io::Result<bool> {
        let scratch = tempfile_page()?;
        let page = crate::HostMapping::map(&scratch, 0, PROBE_LEN, crate::MapOptions::default())?;
        // SAFETY: `page` is a live mapping owned here, unmapped from the IOMMU below before it is dropped.
        match unsafe { self.map_vaddr(iova, page.addr(), PROBE_LEN) } {
            Ok(()) => {
                self.unmap_ioctl(iova, PROBE_LEN)?;
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// VFIO_IOMMU_MAP_DMA of `[vaddr, vaddr + len)` at `iova`, readable and writable by the devices, without the
    /// mapper's checks: the kernel's answer as it is.
    ///
    /// # Safety
    /// `[vaddr, vaddr + len)` must be a mapping of this process that stays mapped until it is unmapped from the
    /// container, and that no Rust reference points into while the devices can write it.
    pub unsafe fn map_vaddr(&self, iova: u64, vaddr: usize, len: u64) -> io::Result<()> {
        let arg = VfioIommuType1DmaMap {
            argsz: std::mem::size_of::<VfioIommuType1DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA reads `argsz` bytes of `arg`, which is exactly its size; the range is the
        // caller's to give.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmap_ioctl(&self, iova: u64, len: u64) -> io::Result<()> {
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

impl AsRawFd for VfioContainer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A one-page unlinked temporary file, the scratch page of [`VfioContainer::iova_mapped`].
fn tempfile_page() -> io::Result<File> {
    let name = c"daxvisor-vfio-probe";
    // SAFETY: a NUL-terminated name; the new fd is owned by the File made from it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(PROBE_LEN)?;
    Ok(f)
}

impl DmaMapper for VfioContainer {
    fn map(&self, iova: u64, range: DmaRange<'_>) -> io::Result<()> {
        // SAFETY: a DmaRange is a range of a region's live HostMapping, which the mapper keeps (and keeps
        // unmapped from the container before dropping) as long as the pin; guest memory is only accessed through
        // volatile copies, never Rust references.
        unsafe { self.map_vaddr(iova, range.vaddr(), range.len()) }?;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iova, range.len());
        tracing::debug!(iova, len = range.len(), "VFIO_IOMMU_MAP_DMA");
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        self.unmap_ioctl(iova, len)?;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&iova);
        tracing::debug!(iova, len, "VFIO_IOMMU_UNMAP_DMA");
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
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
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
        assert!(c.mappings().is_empty(), "a refused map is not recorded");
        // Asking the container about an IOVA goes through the same ioctl, and so fails the same way.
        assert_eq!(
            c.iova_mapped(0x1000).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        // Without a container device (or without that group) there is no container to attach to.
        let e = VfioContainer::with_group(Path::new("/dev/vfio/no-such-group")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
