//! Opening a pmem backing, detecting its kind and mapping it for the guest.
//!
//! Everything is checked before anything is created or changed: a missing file, a directory, a FIFO (never
//! opened: its type is checked first, and the open is O_NONBLOCK in case it was swapped in between), a file
//! without permission, a zero or unaligned size, or a size larger than the file is an error that leaves the
//! file system untouched. Only then does `create=on` create or extend the file (removing what it created if a
//! later step fails).
//!
//! ## Size policy: 2 MiB multiples, refused otherwise (never padded)
//! The guest window must be a 2 MiB multiple (2 MiB-aligned guest address and host address, so the host can
//! back it with huge pages, and Linux's DAX `memremap_pages` works in 2 MiB subsections). A size that is not a
//! multiple is refused with the rounded-up size to use. Padding was rejected: whatever backs the pad (anonymous
//! memory or a read-only slot) would accept guest data that silently never reaches the file, and a guest file
//! system would put data there; mapping the file past its end would SIGBUS/EFAULT. Refusing keeps the invariant
//! that every guest-visible byte is a byte of the file. `create=on` extends a short file to a valid size.
//!
//! ## Kinds and mapping flags
//! The kind comes from the mapper crate's probe (`daxvisor_mapper::probe`), the one place that knows host
//! files; the mapping from its `HostMapping`:
//! | kind    | detected by                                   | mapping                                        |
//! |---------|-----------------------------------------------|------------------------------------------------|
//! | DevDax  | char device whose sysfs subsystem is `dax`    | MAP_SHARED (device-DAX is synchronous already)  |
//! | FsDax   | statx STATX_ATTR_DAX                          | MAP_SHARED_VALIDATE\|MAP_SYNC, else MAP_SHARED with a warning |
//! | Ram     | fstatfs tmpfs or hugetlbfs (/dev/shm, memfd)  | MAP_SHARED                                      |
//! | Regular | anything else                                 | MAP_SHARED                                      |
//! `discard_writes=on` maps MAP_PRIVATE (the file is opened read-only, so it cannot be written even by
//! mistake); `readonly=on` maps PROT_READ and opens read-only.
//!
//! ## A backing file that shrinks under the VM
//! Pages past the new end of file fault. The VMM never touches the mapping itself: devices get guest memory
//! without the pmem windows (see `daxvisor_devices::virtio::GuestMemory`), so no VMM thread can take the SIGBUS.
//! A guest access to a lost page makes KVM_RUN fail with EFAULT on that vCPU, which the vCPU loop reports. The
//! flush path notices the shrink (fstat before each sync), logs it and answers the guest with EIO. The host
//! guard (kernel write lease, issue "mapper") sees a foreign truncate as it happens.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use daxvisor_mapper::{probe, BackingKind, DevDaxInfo, HostMapping, MapOptions, ProbeError};

use super::config::{PmemConfig, SIZE_ALIGN};

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("pmem {path}: no such file (add create=on,size=SIZE to create it)")]
    Missing { path: PathBuf },
    #[error("pmem {path}: cannot inspect: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pmem {path}: is a {what}, not a regular file or device-DAX character device")]
    WrongType { path: PathBuf, what: &'static str },
    #[error("pmem {path}: permission denied opening it {mode}")]
    PermissionDenied { path: PathBuf, mode: &'static str },
    #[error("pmem {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pmem {path}: size is zero (the file is empty; give size=SIZE with create=on to extend it)"
    )]
    ZeroSize { path: PathBuf },
    #[error("pmem {path}: size {size} is not a multiple of 2 MiB; use size={suggest} (with create=on if the file is shorter)")]
    Unaligned {
        path: PathBuf,
        size: u64,
        suggest: String,
    },
    #[error("pmem {path}: size {size} is larger than the {what} ({len} bytes){hint}")]
    TooLarge {
        path: PathBuf,
        size: u64,
        len: u64,
        what: &'static str,
        hint: &'static str,
    },
    #[error("pmem {path}: device-DAX {what}")]
    DevDax { path: PathBuf, what: String },
    #[error("pmem {path}: the file system is read-only (EROFS); use readonly=on or discard_writes=on, or a file on a writable file system")]
    ReadOnlyFs { path: PathBuf },
    #[error("pmem {path}: busy (EAGAIN): another process holds a kernel lease on it (a running VM?); stop it or use another file")]
    Busy { path: PathBuf },
    #[error(
        "pmem {path}: cannot create it: the directory {parent} does not exist; create it first"
    )]
    MissingParent { path: PathBuf, parent: PathBuf },
    #[error(transparent)]
    Lock(#[from] daxvisor_mapper::FileLockError),
    #[error("pmem {path}: open for writing by {holders}; under guard=deny the start is refused: stop it, or add \
             shared=on if it may write the file while the VM runs")]
    OpenForWriting { path: PathBuf, holders: String },
    #[error("pmem {path}: is a symbolic link to {target}, which does not exist; create=on does not create \
             through a link: give the target's path, or remove the link")]
    DanglingLink { path: PathBuf, target: PathBuf },
    #[error("pmem {path}: size {size} is larger than a KVM memory slot can be ({max} bytes, 8 TiB less a page); \
             split it into several --pmem regions of at most that size")]
    TooLargeForKvm { path: PathBuf, size: u64, max: u64 },
    #[error("pmem {path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What KVM needs for the region's memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmemMemslot {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    /// Register with KVM_MEM_READONLY: guest writes then exit as MMIO writes, which the VMM drops and counts.
    pub readonly: bool,
}

/// An opened, checked and mapped pmem backing. Unmapped on drop (after the VM's memslots are gone).
pub struct Backing {
    id: String,
    path: PathBuf,
    file: File,
    kind: BackingKind,
    size: u64,
    readonly: bool,
    discard_writes: bool,
    guard: daxvisor_mapper::GuardPolicy,
    dev_dax: Option<DevDaxInfo>,
    mapping: Arc<HostMapping>,
    /// This open created the file (create=on).
    created: bool,
    /// This open extended the file from this length (create=on).
    extended_from: Option<u64>,
}

/// KVM_MEM_MAX_NR_PAGES (2^31 - 1 pages): the largest memory slot KVM takes; a larger one is EINVAL.
pub const KVM_SLOT_MAX: u64 = ((1 << 31) - 1) * 4096;

/// Everything about `cfg`'s file that can be checked without opening, creating or changing it: a holder of its
/// lock, its type, a missing file without `create=on`, a dangling link or missing directory with it, a size no
/// memory slot takes, a writer elsewhere under `guard=deny`. [`super::attach()`] runs it on every region before
/// it opens any, so a later region's problem never leaves an earlier region's file touched.
pub fn check_before_open(cfg: &PmemConfig) -> Result<(), BackingError> {
    let path = &cfg.file;
    let write_file = !cfg.readonly && !cfg.discard_writes;
    daxvisor_mapper::refuse_if_locked(path, write_file)?;
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(BackingError::Stat {
                path: path.clone(),
                source: e,
            })
        }
    };
    let too_large = |size: u64| BackingError::TooLargeForKvm {
        path: path.clone(),
        size,
        max: KVM_SLOT_MAX,
    };
    match &meta {
        None if cfg.create => {
            if let Ok(target) = std::fs::read_link(path) {
                return Err(BackingError::DanglingLink {
                    path: path.clone(),
                    target,
                });
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.exists() {
                    return Err(BackingError::MissingParent {
                        path: path.clone(),
                        parent: parent.to_owned(),
                    });
                }
            }
        }
        None => return Err(BackingError::Missing { path: path.clone() }),
        Some(m) => {
            check_type(path, m)?;
            if m.file_type().is_file() && cfg.size.is_none() && m.len() > KVM_SLOT_MAX {
                return Err(too_large(m.len()));
            }
        }
    }
    if let Some(size) = cfg.size.filter(|&s| s > KVM_SLOT_MAX) {
        return Err(too_large(size));
    }
    if write_file
        && meta.as_ref().is_some_and(|m| m.file_type().is_file())
        && maybe_written_elsewhere(path)
    {
        let writers: Vec<String> = daxvisor_mapper::openers_of(path)
            .into_iter()
            .filter(|(_, write)| *write)
            .map(|(h, _)| h.to_string())
            .collect();
        if !writers.is_empty() {
            let holders = writers.join(", ");
            if cfg.guard == daxvisor_mapper::GuardPolicy::Deny && !cfg.shared {
                return Err(BackingError::OpenForWriting {
                    path: path.clone(),
                    holders,
                });
            }
            tracing::warn!(path = %path.display(), guard = %cfg.guard, shared = cfg.shared,
                "pmem: the backing file is open for writing by {holders}; its writes through that descriptor are not seen by the host guard");
        }
    }
    Ok(())
}

/// Whether another process may have `path` open for writing. Asked of the kernel first, cheaply: a read lease
/// on a read-only descriptor is refused (EAGAIN) exactly when the file is open for writing somewhere; the
/// lease is given back at once, and the read-only open changes nothing in the file. Only then (or where
/// leases are not offered) is /proc searched for the writers' names.
fn maybe_written_elsewhere(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOATIME)
        .open(path)
        .or_else(|_| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
        })
    else {
        return true;
    };
    // SAFETY: lease fcntls take integer arguments; the descriptor is open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return false;
    }
    true
}

impl Backing {
    /// Open, check and map the backing of `cfg`. `id` names it in logs.
    pub fn open(cfg: &PmemConfig, id: &str) -> Result<Backing, BackingError> {
        Self::open_with_sysfs(cfg, id, Path::new("/sys"))
    }

    /// As [`Backing::open`], reading device-DAX geometry under `sysfs` (tests point it at a fake tree: this
    /// machine has no device-DAX).
    pub fn open_with_sysfs(
        cfg: &PmemConfig,
        id: &str,
        sysfs: &Path,
    ) -> Result<Backing, BackingError> {
        let path = cfg.file.clone();
        let write_file = !cfg.readonly && !cfg.discard_writes;
        // Refused before the open: a second VMM must not even break the running VM's kernel lease.
        check_before_open(cfg)?;

        // Look before opening: a FIFO would block the open, a directory is never right.
        let meta = match std::fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(BackingError::Stat { path, source: e }),
        };
        let mut created = CreatedFile::none();
        let file = match &meta {
            None if cfg.create => {
                let f = create_new(&path)?;
                created = CreatedFile::new(&path);
                f
            }
            None => return Err(BackingError::Missing { path }),
            Some(m) => {
                check_type(&path, m)?;
                open_existing(&path, write_file)?
            }
        };
        // The path may have been swapped between stat and open: check what we actually opened.
        let meta = file.metadata().map_err(|e| BackingError::Stat {
            path: path.clone(),
            source: e,
        })?;
        check_type(&path, &meta)?;

        let probed = probe(&file, sysfs).map_err(|e| match e {
            ProbeError::NotDevDax(what) => BackingError::DevDax {
                path: path.clone(),
                what,
            },
            ProbeError::Stat(source) => BackingError::Stat {
                path: path.clone(),
                source,
            },
            other => BackingError::Stat {
                path: path.clone(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        let (kind, dev_dax) = (probed.kind, probed.dev_dax);
        if dev_dax.is_some() && cfg.discard_writes {
            // The device-DAX driver only allows shared mappings.
            return Err(BackingError::DevDax {
                path,
                what: "cannot be mapped copy-on-write (discard_writes=on)".into(),
            });
        }
        let avail_len = match dev_dax {
            Some(d) => d.size,
            None => meta.len(),
        };
        let size = cfg.size.unwrap_or(avail_len);
        check_size(&path, size, avail_len, dev_dax, cfg.create)?;
        // Held for the VM's life (it lives on this open file description); taken before anything is changed.
        daxvisor_mapper::lock_file(&file, &path, write_file)?;

        if size > avail_len {
            // create=on, regular file: reserve the blocks now so a guest write cannot hit ENOSPC later.
            daxvisor_mapper::extend(&file, avail_len, size).map_err(|e| BackingError::Io {
                path: path.clone(),
                what: "extend the file",
                source: e,
            })?;
        }
        let opts = MapOptions {
            writable: !cfg.readonly,
            private: cfg.discard_writes,
            want_sync: kind == BackingKind::FsDax && !cfg.readonly && !cfg.discard_writes,
            align: dev_dax.map_or(SIZE_ALIGN, |d| d.align.max(SIZE_ALIGN)),
            huge_pages: wants_huge_pages(kind, &file, size, cfg.prefault),
        };
        let mapping = HostMapping::map(&file, 0, size, opts).map_err(|e| BackingError::Io {
            path: path.clone(),
            what: "mmap it",
            source: e,
        });
        let mapping = match mapping {
            Ok(m) => m,
            Err(e) => {
                if size > avail_len && !created.is_armed() {
                    // Undo the extension of an existing file.
                    let _ = file.set_len(avail_len);
                }
                return Err(e);
            }
        };
        let was_created = created.is_armed();
        created.keep();

        let backing = Backing {
            id: id.to_owned(),
            path,
            file,
            kind,
            size,
            readonly: cfg.readonly,
            discard_writes: cfg.discard_writes,
            guard: cfg.guard,
            dev_dax,
            mapping: Arc::new(mapping),
            created: was_created,
            extended_from: (size > avail_len && !was_created).then_some(avail_len),
        };
        tracing::info!(
            id = %backing.id,
            path = %backing.path.display(),
            kind = %backing.kind,
            size = backing.size,
            flags = %backing.mapping.flags_str(),
            prot = if backing.readonly { "PROT_READ" } else { "PROT_READ|PROT_WRITE" },
            host_addr = format_args!("{:#x}", backing.host_addr()),
            "pmem backing mapped"
        );
        Ok(backing)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open backing file (the mapper takes leases and reads extents through it).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Guest-visible size (= mapping length), a 2 MiB multiple.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The host guard's policy for foreign opens of the file (`guard=`).
    pub fn guard(&self) -> daxvisor_mapper::GuardPolicy {
        self.guard
    }

    pub fn discard_writes(&self) -> bool {
        self.discard_writes
    }

    /// Whether the mapping is MAP_SYNC (fs-dax and the kernel agreed).
    pub fn map_sync(&self) -> bool {
        self.mapping.is_sync()
    }

    /// The host mapping of the whole region (the mapper keeps a reference for pins).
    pub fn mapping(&self) -> &Arc<HostMapping> {
        &self.mapping
    }

    pub fn dev_dax(&self) -> Option<DevDaxInfo> {
        self.dev_dax
    }

    /// Host virtual address of the mapping, 2 MiB aligned (device-DAX: its alignment).
    pub fn host_addr(&self) -> u64 {
        self.mapping.addr() as u64
    }

    /// The mmap flags in words, as logged.
    pub fn mmap_flags_str(&self) -> String {
        self.mapping.flags_str()
    }

    /// The KVM memslot for this region at `guest_phys_addr` (2 MiB aligned, from `layout::pmem_start`).
    pub fn memslot(&self, guest_phys_addr: u64) -> PmemMemslot {
        PmemMemslot {
            guest_phys_addr,
            memory_size: self.size,
            userspace_addr: self.host_addr(),
            readonly: self.readonly,
        }
    }

    /// This open created the file (`create=on`).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The length this open extended the file from (`create=on` on a shorter file).
    pub fn extended_from(&self) -> Option<u64> {
        self.extended_from
    }

    /// Fails if the file is now shorter than the part the guest sees (someone truncated it under the VM).
    pub fn check_not_shrunk(&self) -> io::Result<()> {
        if self.dev_dax.is_some() {
            return Ok(());
        }
        if let Some(len) = daxvisor_mapper::shrunk_below(&self.file, self.size)? {
            return Err(io::Error::other(format!(
                "backing file {} shrank to {len} bytes under the VM (guest sees {})",
                self.path.display(),
                self.size
            )));
        }
        Ok(())
    }
}

/// Removes a file this code created unless told to keep it: failed setup leaves nothing behind.
struct CreatedFile(Option<PathBuf>);

impl CreatedFile {
    fn none() -> Self {
        CreatedFile(None)
    }
    fn new(path: &Path) -> Self {
        CreatedFile(Some(path.to_owned()))
    }
    fn is_armed(&self) -> bool {
        self.0.is_some()
    }
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn check_type(path: &Path, m: &Metadata) -> Result<(), BackingError> {
    let t = m.file_type();
    let what = if t.is_file() || t.is_char_device() {
        return Ok(());
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device (use a file on its file system, or device-DAX)"
    } else {
        "special file"
    };
    Err(BackingError::WrongType {
        path: path.to_owned(),
        what,
    })
}

fn open_error(path: &Path, e: io::Error, mode: &'static str) -> BackingError {
    if e.raw_os_error() == Some(libc::EROFS) {
        return BackingError::ReadOnlyFs {
            path: path.to_owned(),
        };
    }
    if e.raw_os_error() == Some(libc::EAGAIN) {
        return BackingError::Busy {
            path: path.to_owned(),
        };
    }
    if e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS) {
        BackingError::PermissionDenied {
            path: path.to_owned(),
            mode,
        }
    } else {
        BackingError::Open {
            path: path.to_owned(),
            source: e,
        }
    }
}

fn open_existing(path: &Path, write: bool) -> Result<File, BackingError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        // Never block (a FIFO swapped in after the type check) and never inherit into children.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_error(path, e, if write { "read-write" } else { "read-only" }))
}

fn create_new(path: &Path) -> Result<File, BackingError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) if !parent.exists() => BackingError::MissingParent {
                    path: path.to_owned(),
                    parent: parent.to_owned(),
                },
                _ => BackingError::Missing {
                    path: path.to_owned(),
                },
            },
            _ => open_error(path, e, "to create it"),
        })
}

fn check_size(
    path: &Path,
    size: u64,
    avail: u64,
    dev_dax: Option<DevDaxInfo>,
    create: bool,
) -> Result<(), BackingError> {
    let path = path.to_owned();
    if size == 0 {
        return Err(BackingError::ZeroSize { path });
    }
    if !size.is_multiple_of(SIZE_ALIGN) {
        let up = size.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
        return Err(BackingError::Unaligned {
            path,
            size,
            suggest: format!("{}M", up >> 20),
        });
    }
    if let Some(d) = dev_dax {
        if d.align != 0 && !size.is_multiple_of(d.align) {
            return Err(BackingError::DevDax {
                path,
                what: format!(
                    "size {size} is not a multiple of the device alignment {}",
                    d.align
                ),
            });
        }
        if size > d.size {
            return Err(BackingError::TooLarge {
                path,
                size,
                len: d.size,
                what: "device",
                hint: "",
            });
        }
        if create {
            return Err(BackingError::DevDax {
                path,
                what: "cannot be created or extended (create=on)".into(),
            });
        }
    } else if size > avail && !create {
        return Err(BackingError::TooLarge {
            path,
            size,
            len: avail,
            what: "file",
            hint: "; add create=on to extend it",
        });
    }
    Ok(())
}

/// Whether to ask for 2 MiB pages (see [`MapOptions::huge_pages`]). DAX maps its own 2 MiB entries. A page-cache
/// file or shmem faults a whole 2 MiB page in when asked, and a write into a hole then allocates the 2 MiB around
/// it instead of 4 KiB: so only where that changes nothing, when the window's blocks (or pages) are all allocated
/// already, or with prefault=on, which fills every hole anyway.
fn wants_huge_pages(kind: BackingKind, file: &File, size: u64, prefault: bool) -> bool {
    use std::os::unix::fs::MetadataExt;
    let allocated = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    matches!(kind, BackingKind::Regular | BackingKind::Ram) && (prefault || allocated >= size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmem::flush::{BackingFlush, FlushAction};
    use daxvisor_devices::virtio::pmem::Flush;
    use daxvisor_mapper::dev_dax_info;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
    use std::process::Command;
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    const MIB: u64 = 1 << 20;

    fn cfg(path: &Path, extra: &str) -> PmemConfig {
        let mut s = format!("file={}", path.display().to_string().replace(',', ",,"));
        if !extra.is_empty() {
            s.push(',');
            s.push_str(extra);
        }
        s.parse().unwrap()
    }

    fn file_of(dir: &Path, name: &str, len: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    /// Read `len` bytes at `off` of the mapping. Test-only: the VMM itself never reads pmem mappings.
    fn mapped(b: &Backing, off: u64, len: usize) -> Vec<u8> {
        assert!(off + len as u64 <= b.size());
        // SAFETY: the range lies inside the live mapping owned by `b`.
        unsafe { std::slice::from_raw_parts((b.host_addr() + off) as *const u8, len).to_vec() }
    }

    fn write_mapped(b: &Backing, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= b.size());
        // SAFETY: the range lies inside the live, writable mapping owned by `b`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (b.host_addr() + off) as *mut u8,
                data.len(),
            )
        }
    }

    /// Capture tracing output of `f`.
    fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Cap(Arc<Mutex<Vec<u8>>>);
        impl Write for Cap {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let cap = Cap::default();
        let w = cap.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        // Another test thread's subscriber coming or going can leave a callsite's cached interest at "never"
        // while this one is installed (tracing caches interest across threads): rebuild it inside the scope.
        let out = tracing::subscriber::with_default(sub, || {
            tracing::callsite::rebuild_interest_cache();
            f()
        });
        let text = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
        (out, text)
    }

    /// 2 MiB pages are asked for where they allocate nothing a guest write would not: an allocated file, or a
    /// sparse one with prefault=on (which fills its holes); a sparse file without prefault keeps 4 KiB steps.
    #[test]
    fn huge_pages_only_where_they_change_no_allocation() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let sparse = file_of(dir.path(), "sparse.img", 4 * MIB);
        let b = Backing::open(&cfg(&sparse, ""), "t").unwrap();
        assert!(!b.mapping().is_huge_advised(), "sparse, no prefault");
        drop(b);
        let b = Backing::open(&cfg(&sparse, "prefault=on"), "t").unwrap();
        assert!(b.mapping().is_huge_advised(), "sparse, prefault=on");
        drop(b);
        let created = dir.path().join("created.img");
        let b = Backing::open(&cfg(&created, "size=4M,create=on"), "t").unwrap();
        assert!(
            b.mapping().is_huge_advised(),
            "create=on allocates the file"
        );
        drop(b);
        let ro = Backing::open(&cfg(&created, "discard_writes=on"), "t").unwrap();
        assert!(
            !ro.mapping().is_huge_advised(),
            "private copies are not advised"
        );
    }

    /// Check the regular-file path on the file system of `dir`: kind, flags, alignment, writes reach the file,
    /// fdatasync flush; and that MAP_SYNC is refused there and falls back with the warning.
    fn check_regular_fs(dir: &Path) {
        let p = file_of(dir, "vm.img", 4 * MIB);
        let (b, logs) = logs_of(|| Backing::open(&cfg(&p, "id=t"), "t").unwrap());
        assert_eq!(b.kind(), BackingKind::Regular);
        assert_eq!(b.size(), 4 * MIB);
        assert_eq!(b.host_addr() % (2 * MIB), 0, "2 MiB aligned host address");
        assert_eq!(b.mmap_flags_str(), "MAP_SHARED");
        assert!(
            logs.contains("pmem backing mapped") && logs.contains("kind=regular"),
            "{logs}"
        );
        write_mapped(&b, 3 * MIB, b"guest data");
        let flush = BackingFlush::new(&b, None).unwrap();
        assert_eq!(flush.action(), FlushAction::Fdatasync);
        flush.flush().unwrap();
        let mut buf = [0u8; 10];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut buf, 3 * MIB)
            .unwrap();
        assert_eq!(&buf, b"guest data");

        // MAP_SYNC: this file system is not DAX, so the kernel refuses and we fall back, loudly.
        let (m, logs) = logs_of(|| {
            HostMapping::map(
                b.file(),
                0,
                2 * MIB,
                MapOptions {
                    writable: false,
                    private: false,
                    want_sync: true,
                    align: 2 * MIB,
                    huge_pages: false,
                },
            )
        });
        let m = m.unwrap();
        assert!(!m.is_sync());
        assert_eq!(m.flags_str(), "MAP_SHARED");
        assert!(
            logs.contains("WARN") && logs.contains("MAP_SYNC refused"),
            "{logs}"
        );
    }

    #[test]
    fn ext4_file_is_regular_and_map_sync_falls_back() {
        let dir =
            tempfile::tempdir_in(std::env::var("PMEM_TEST_EXT4_DIR").unwrap_or("/var/tmp".into()))
                .unwrap();
        let fs = fs_type(dir.path());
        println!("testing on {fs}");
        check_regular_fs(dir.path());
    }

    fn fs_type(p: &Path) -> String {
        let out = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn loop_mounted_xfs_is_not_dax() {
        let Some(mnt) = XfsMount::new() else { return };
        assert_eq!(fs_type(&mnt.dir()), "xfs");
        println!("loop-mounted XFS at {}", mnt.dir().display());
        check_regular_fs(&mnt.dir());
    }

    /// Why this host cannot loop-mount XFS: a failure under CI=true, a SKIP line otherwise.
    fn xfs_missing(why: &str) -> Option<XfsMount> {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prerequisite missing under CI=true: loop-mounted XFS: {why}"
        );
        eprintln!("SKIP: loop-mounted XFS: {why}");
        None
    }

    /// A loop-mounted XFS (reflink on), unmounted on drop; `None` (with a message) if this host cannot.
    struct XfsMount {
        tmp: tempfile::TempDir,
        mounted: bool,
    }

    impl XfsMount {
        fn new() -> Option<XfsMount> {
            // SAFETY: getuid has no preconditions.
            if unsafe { libc::getuid() } != 0 {
                return xfs_missing("needs root to loop-mount");
            }
            let tmp = tempfile::tempdir_in("/var/tmp").ok()?;
            let img = tmp.path().join("xfs.img");
            File::create(&img).ok()?.set_len(320 * MIB).ok()?;
            let ok = Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&img)
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                return xfs_missing(
                    "mkfs.xfs missing or failed (scripts/setup-host.sh installs xfsprogs)",
                );
            }
            let mnt = tmp.path().join("mnt");
            std::fs::create_dir(&mnt).ok()?;
            let ok = Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                return xfs_missing("loop mount failed");
            }
            Some(XfsMount { tmp, mounted: true })
        }

        fn dir(&self) -> PathBuf {
            self.tmp.path().join("mnt")
        }
    }

    impl Drop for XfsMount {
        fn drop(&mut self) {
            if self.mounted {
                let _ = Command::new("umount").arg(self.dir()).status();
            }
        }
    }

    #[test]
    fn tmpfs_and_memfd_are_memfd_kind() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = file_of(dir.path(), "shm.img", 2 * MIB);
        let b = Backing::open(&cfg(&p, ""), "shm").unwrap();
        assert_eq!(b.kind(), BackingKind::Ram);
        assert_eq!(
            BackingFlush::new(&b, None).unwrap().action(),
            FlushAction::Nothing
        );

        // SAFETY: memfd_create with a valid name; we own the returned fd.
        let fd = unsafe { libc::memfd_create(c"daxvisor-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned descriptor.
        let memfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        memfd.set_len(2 * MIB).unwrap();
        let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
        let b = Backing::open(&cfg(&path, ""), "memfd").unwrap();
        assert_eq!(b.kind(), BackingKind::Ram);
        write_mapped(&b, 0, b"shared");
        let mut buf = [0u8; 6];
        memfd.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf, b"shared",
            "MAP_SHARED: writes visible through the memfd"
        );
    }

    #[test]
    fn readonly_and_discard_writes_never_write_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_of(dir.path(), "ro.img", 2 * MIB);
        std::fs::write(&p, vec![7u8; 2 * MIB as usize]).unwrap();
        let ro = Backing::open(&cfg(&p, "readonly=on"), "ro").unwrap();
        assert!(ro.readonly());
        assert!(ro.memslot(4 << 30).readonly);
        assert_eq!(mapped(&ro, 100, 3), vec![7, 7, 7]);
        assert_eq!(
            BackingFlush::new(&ro, None).unwrap().action(),
            FlushAction::Nothing
        );

        let dw = Backing::open(&cfg(&p, "discard_writes=on"), "dw").unwrap();
        assert_eq!(dw.mmap_flags_str(), "MAP_PRIVATE|MAP_NORESERVE");
        write_mapped(&dw, 0, b"lost");
        assert_eq!(mapped(&dw, 0, 4), b"lost");
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 2 * MIB as usize]);
        // The file was opened read-only: not even the VMM could write it by mistake.
        assert!(dw.file().write_at(b"x", 0).is_err());
    }

    /// Snapshot of a directory: names, sizes and mtimes, to prove a failed open changed nothing.
    fn snapshot(dir: &Path) -> Vec<(String, u64, SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.modified().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn bad_host_input_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let small = file_of(d, "small.img", 2 * MIB);
        let empty = file_of(d, "empty.img", 0);
        let odd = file_of(d, "odd.img", 3 * MIB);
        std::fs::create_dir(d.join("adir")).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let before = snapshot(d);

        let err = |path: &Path, extra: &str| -> String {
            match Backing::open(&cfg(path, extra), "bad") {
                Ok(_) => panic!("{} {extra}: accepted", path.display()),
                Err(e) => e.to_string(),
            }
        };
        let e = err(&d.join("nope.img"), "");
        assert!(e.contains("no such file") && e.contains("nope.img"), "{e}");
        assert!(err(&d.join("adir"), "").contains("is a directory"));
        // Would block forever if it were opened for writing without O_NONBLOCK; it is not opened at all.
        assert!(err(&fifo, "").contains("is a FIFO"));
        assert!(err(&empty, "").contains("size is zero"));
        let e = err(&small, "size=4M");
        assert!(
            e.contains("larger than the file") && e.contains("create=on"),
            "{e}"
        );
        let e = err(&odd, "");
        assert!(
            e.contains("not a multiple of 2 MiB") && e.contains("size=4M"),
            "{e}"
        );
        let e = err(&small, "size=1M");
        assert!(e.contains("not a multiple of 2 MiB"), "{e}");
        assert!(err(Path::new("/dev/sda-none"), "").contains("no such file"));
        let e = err(Path::new("/dev/null"), "size=2M");
        assert!(e.contains("not dax") || e.contains("not device-DAX"), "{e}");
        let e = err(&d.join("missing-dir/x.img"), "size=2M,create=on");
        assert!(e.contains("missing-dir does not exist"), "{e}");

        assert_eq!(snapshot(d), before, "nothing created or modified");
    }

    #[test]
    fn create_on_creates_and_extends_with_allocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.img");
        let b = Backing::open(&cfg(&p, "size=4M,create=on"), "new").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * MIB);
        assert_eq!(b.size(), 4 * MIB);
        drop(b);
        let b = Backing::open(&cfg(&p, "size=8M,create=on"), "grow").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 8 * MIB);
        use std::os::unix::fs::MetadataExt;
        assert!(
            m.blocks() * 512 >= 4 * MIB,
            "extension allocated, not a hole"
        );
        write_mapped(&b, 8 * MIB - 4, b"tail");
        // One user at a time (the exclusive-use lock): a second open is refused while `b` holds the file.
        assert!(Backing::open(&cfg(&p, "size=2M"), "second").is_err());
        drop(b);
        // Smaller size than the file: the window is a prefix, the file keeps its length.
        let b2 = Backing::open(&cfg(&p, "size=2M"), "prefix").unwrap();
        assert_eq!(b2.size(), 2 * MIB);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 * MIB);
    }

    #[test]
    fn shrinking_file_is_detected_by_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_of(dir.path(), "shrink.img", 4 * MIB);
        let b = Backing::open(&cfg(&p, ""), "shrink").unwrap();
        let flush = BackingFlush::new(&b, None).unwrap();
        flush.flush().unwrap();
        // Someone else truncates the file under the VM.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(MIB)
            .unwrap();
        assert!(b.check_not_shrunk().is_err());
        let (r, logs) = logs_of(|| flush.flush());
        assert!(r.is_err(), "the guest gets EIO, the VMM lives");
        assert!(logs.contains("shrank"), "{logs}");
        // Growing it back does not bring the lost data back: the failure sticks.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        assert!(b.check_not_shrunk().is_ok());
        assert!(flush.flush().is_err());
    }

    /// Root bypasses file permissions, so the check runs in a child process of this test binary as nobody.
    #[test]
    fn no_permission_is_a_clear_error() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = file_of(dir.path(), "root-only.img", 2 * MIB);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            permission_probe_at(&p);
            return;
        }
        use std::os::unix::process::CommandExt;
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "pmem::backing::tests::permission_probe",
                "--nocapture",
            ])
            .env("PMEM_PERMISSION_PROBE", &p)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * MIB);
    }

    fn permission_probe_at(p: &Path) {
        let e = Backing::open(&cfg(p, ""), "perm")
            .err()
            .expect("opened without permission");
        assert!(
            e.to_string()
                .contains("permission denied opening it read-write"),
            "{e}"
        );
        let e = Backing::open(&cfg(p, "readonly=on"), "perm")
            .err()
            .expect("opened without permission");
        assert!(
            e.to_string()
                .contains("permission denied opening it read-only"),
            "{e}"
        );
    }

    #[test]
    #[ignore = "run by no_permission_is_a_clear_error as an unprivileged child"]
    fn permission_probe() {
        let p = std::env::var("PMEM_PERMISSION_PROBE").expect("only run as a child");
        permission_probe_at(Path::new(&p));
    }

    /// This machine has no device-DAX, so the sysfs side is a fake tree (the real one is exercised in the DAX
    /// lab); the device number is a real char device's (/dev/null).
    #[test]
    fn dev_dax_geometry_from_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let rdev = std::fs::metadata("/dev/null").unwrap().rdev();
        let (maj, min) = (libc::major(rdev), libc::minor(rdev));
        let dev = sys.path().join("devices/platform/e820/dax0.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(sys.path().join("bus/dax/devices/dax0.0")).unwrap();
        std::fs::create_dir_all(sys.path().join("dev/char")).unwrap();
        std::os::unix::fs::symlink(&dev, sys.path().join(format!("dev/char/{maj}:{min}"))).unwrap();
        std::os::unix::fs::symlink("../../../../bus/dax", dev.join("subsystem")).unwrap();
        std::fs::write(dev.join("size"), "268435456\n").unwrap();
        // Old kernels: no align attribute -> 2 MiB.
        assert_eq!(
            dev_dax_info(sys.path(), rdev),
            Ok(DevDaxInfo {
                size: 256 * MIB,
                align: 2 * MIB
            })
        );
        std::fs::write(
            sys.path().join("bus/dax/devices/dax0.0/align"),
            "1073741824\n",
        )
        .unwrap();
        assert_eq!(
            dev_dax_info(sys.path(), rdev),
            Ok(DevDaxInfo {
                size: 256 * MIB,
                align: 1 << 30
            })
        );
        std::fs::write(dev.join("align"), "3000\n").unwrap();
        assert!(dev_dax_info(sys.path(), rdev)
            .unwrap_err()
            .contains("bad sysfs align"));
        // Size checks against the geometry.
        let info = DevDaxInfo {
            size: 256 * MIB,
            align: 2 * MIB,
        };
        assert!(
            check_size(Path::new("/dev/dax0.0"), 512 * MIB, 0, Some(info), false)
                .unwrap_err()
                .to_string()
                .contains("larger than the device")
        );
        assert!(check_size(Path::new("/dev/dax0.0"), 2 * MIB, 0, Some(info), true).is_err());
        assert!(check_size(Path::new("/dev/dax0.0"), 128 * MIB, 0, Some(info), false).is_ok());
        // The real /dev/null belongs to "mem", not "dax".
        assert!(dev_dax_info(Path::new("/sys"), rdev)
            .unwrap_err()
            .contains("not dax"));

        // The whole open path on a character device that can be mapped shared (/dev/zero), with the fake sysfs
        // calling it device-DAX: size from sysfs, MAP_SHARED, nothing to flush, no shrink check.
        let zrdev = std::fs::metadata("/dev/zero").unwrap().rdev();
        let zdev = sys.path().join("devices/platform/e820/dax1.0");
        std::fs::create_dir_all(&zdev).unwrap();
        let (zmaj, zmin) = (libc::major(zrdev), libc::minor(zrdev));
        std::os::unix::fs::symlink(&zdev, sys.path().join(format!("dev/char/{zmaj}:{zmin}")))
            .unwrap();
        std::os::unix::fs::symlink("../../../../bus/dax", zdev.join("subsystem")).unwrap();
        std::fs::write(zdev.join("size"), "4194304\n").unwrap();
        std::fs::write(zdev.join("align"), "2097152\n").unwrap();
        let b =
            Backing::open_with_sysfs(&cfg(Path::new("/dev/zero"), ""), "dax", sys.path()).unwrap();
        assert_eq!(b.kind(), BackingKind::DevDax);
        assert_eq!(b.size(), 4 * MIB);
        assert_eq!(
            b.dev_dax(),
            Some(DevDaxInfo {
                size: 4 * MIB,
                align: 2 * MIB
            })
        );
        assert_eq!(b.mmap_flags_str(), "MAP_SHARED");
        let flush = BackingFlush::new(&b, None).unwrap();
        assert_eq!(flush.action(), FlushAction::Nothing);
        flush.flush().unwrap();
        let e =
            Backing::open_with_sysfs(&cfg(Path::new("/dev/zero"), "size=8M"), "dax", sys.path())
                .err()
                .unwrap();
        assert!(e.to_string().contains("larger than the device"), "{e}");
        let e = Backing::open_with_sysfs(
            &cfg(Path::new("/dev/zero"), "discard_writes=on"),
            "dax",
            sys.path(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("copy-on-write"), "{e}");
    }
}
