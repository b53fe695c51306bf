//! The one host-file probe: what a backing file is (regular, fs-dax, device-DAX, RAM), which filesystem it is
//! on, and its identity (device, inode) that the mapper's hold tables key on. Every part of daxvisor asks here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::kind::{BackingKind, FsKind};

/// 2 MiB: device-DAX's alignment on kernels that do not report one.
const DEFAULT_DEVDAX_ALIGN: u64 = 2 << 20;

/// Device-DAX geometry from sysfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevDaxInfo {
    /// Bytes the device provides.
    pub size: u64,
    /// Mapping alignment (and size granularity) the device requires.
    pub align: u64,
}

/// The identity of a file: what holds are indexed by, so two regions on one file see each other's holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    dev: u64,
    ino: u64,
}

impl FileKey {
    /// The key of an open file (fstat).
    pub fn of(file: &File) -> io::Result<FileKey> {
        let m = file.metadata()?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The key of the file a path names (symlinks followed), without opening it.
    pub fn of_path(path: &std::path::Path) -> io::Result<FileKey> {
        let m = std::fs::metadata(path)?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl std::fmt::Display for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "file {}:{}/{}",
            libc::major(self.dev),
            libc::minor(self.dev),
            self.ino
        )
    }
}

/// What [`probe`] found out about an open backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The backing kind everything else follows.
    pub kind: BackingKind,
    /// The filesystem the file is on.
    pub fs: FsKind,
    /// Device-DAX geometry (only for [`BackingKind::DevDax`]).
    pub dev_dax: Option<DevDaxInfo>,
    /// The file's identity.
    pub key: FileKey,
}

/// Why a file could not be probed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// fstat/fstatfs failed.
    #[error("cannot inspect the file: {0}")]
    Stat(#[source] io::Error),
    /// A character device that is not device-DAX, or device-DAX with unreadable geometry.
    #[error("{0}")]
    NotDevDax(String),
}

/// Probes an open file; `sysfs` is where device-DAX geometry is read (`/sys`; tests point it elsewhere).
pub fn probe(file: &File, sysfs: &Path) -> Result<Probe, ProbeError> {
    let meta = file.metadata().map_err(ProbeError::Stat)?;
    let key = FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let fs = fs_kind(file).map_err(ProbeError::Stat)?;
    if meta.file_type().is_char_device() {
        let info = dev_dax_info(sysfs, meta.rdev()).map_err(ProbeError::NotDevDax)?;
        return Ok(Probe {
            kind: BackingKind::DevDax,
            fs,
            dev_dax: Some(info),
            key,
        });
    }
    let kind = if is_dax_file(file) {
        BackingKind::FsDax
    } else if fs.is_ram() {
        BackingKind::Ram
    } else {
        BackingKind::Regular
    };
    Ok(Probe {
        kind,
        fs,
        dev_dax: None,
        key,
    })
}

/// The filesystem `file` lives on (fstatfs).
pub fn fs_kind(file: &impl AsRawFd) -> io::Result<FsKind> {
    // SAFETY: statfs is plain data; fstatfs writes only into it.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut s) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FsKind::from_magic(s.f_type as i64))
}

/// statx reports STATX_ATTR_DAX for files whose page cache is bypassed (fs-dax).
fn is_dax_file(file: &File) -> bool {
    // SAFETY: statx writes into the zeroed struct we pass; the empty path with AT_EMPTY_PATH refers to the fd.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, valid NUL-terminated path, valid out pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    let dax = libc::STATX_ATTR_DAX as u64;
    rc == 0 && stx.stx_attributes_mask & dax != 0 && stx.stx_attributes & dax != 0
}

/// Size and alignment of the device-DAX instance with device number `rdev`, from
/// `<sysfs>/dev/char/MAJ:MIN/{subsystem,size,align}` (falling back to `<sysfs>/bus/dax/devices/NAME/`).
pub fn dev_dax_info(sysfs: &Path, rdev: u64) -> Result<DevDaxInfo, String> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let dev_dir = sysfs.join(format!("dev/char/{maj}:{min}"));
    let subsystem = std::fs::read_link(dev_dir.join("subsystem")).map_err(|_| {
        format!("character device {maj}:{min} is not device-DAX (no sysfs subsystem)")
    })?;
    if subsystem.file_name().is_none_or(|n| n != "dax") {
        return Err(format!(
            "character device {maj}:{min} belongs to '{}', not dax",
            subsystem
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
    }
    let name = std::fs::canonicalize(&dev_dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_owned()));
    let read_u64 = |attr: &str| -> Option<u64> {
        let candidates = std::iter::once(dev_dir.join(attr)).chain(
            name.iter()
                .map(|n| sysfs.join("bus/dax/devices").join(n).join(attr)),
        );
        candidates
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .find_map(|s| {
                let s = s.trim();
                match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).ok(),
                    None => s.parse().ok(),
                }
            })
    };
    let size = read_u64("size").ok_or_else(|| format!("{maj}:{min}: no readable sysfs size"))?;
    // Kernels before 5.10 have no align attribute; device-DAX then always used 2 MiB.
    let align = read_u64("align").unwrap_or(DEFAULT_DEVDAX_ALIGN);
    if align == 0 || !align.is_power_of_two() {
        return Err(format!("{maj}:{min}: bad sysfs align {align}"));
    }
    Ok(DevDaxInfo { size, align })
}
