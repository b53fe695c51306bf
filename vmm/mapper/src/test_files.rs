//! Real backing files for the mapper's unit tests, on each filesystem this machine offers: /tmp (ext4 here),
//! /dev/shm (tmpfs) and an XFS reflink=1 loop mount made by scripts/xfs-loop.sh (skipped with a message when
//! it is not mounted; under `CI=true` its absence fails the test instead: CI installs it). Files start fully
//! written and synced (no delalloc), every page filled with its own byte.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::{
    page_size, BackingKind, BreakEvent, ChannelNotifier, HostMapping, MapOptions, Mapper,
    RecordingDma, RegionDesc, RegionId,
};

const EXT4_MAGIC: i64 = 0xEF53;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const XFS_MAGIC: i64 = 0x5846_5342;
/// _IOW(0x94, 9, int)
const FICLONE: libc::c_ulong = 0x4004_9409;
/// _IOW(0x94, 13, struct file_clone_range)
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

pub(crate) const TEST_IOVA: u64 = 0x1_0000_0000;

fn fs_magic(p: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain data; statfs() writes only into it.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0).then_some(s.f_type as i64)
}

/// The XFS reflink=1 mount made by scripts/xfs-loop.sh, if present.
pub(crate) fn xfs_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(
        std::env::var("DAXVISOR_XFS_DIR").unwrap_or_else(|_| "/mnt/daxvisor-xfs".into()),
    );
    if fs_magic(&dir) == Some(XFS_MAGIC) {
        Some(dir)
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no XFS mount at {} under CI=true: scripts/xfs-loop.sh must run first",
            dir.display()
        );
        eprintln!(
            "SKIP xfs: no XFS mount at {} (run scripts/xfs-loop.sh as root; needs loop devices)",
            dir.display()
        );
        None
    }
}

pub(crate) struct TestRegion {
    pub fs: String,
    pub ram_fs: bool,
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub file: Arc<File>,
    pub map: Arc<HostMapping>,
    pub mapper: Mapper,
    pub region: RegionId,
    pub page: u64,
    pub iova: u64,
    pub dma: Arc<RecordingDma>,
    pub events: Option<Receiver<BreakEvent>>,
}

impl TestRegion {
    pub fn on_every_fs(pages: u64) -> Vec<TestRegion> {
        let mut v = vec![
            Self::create(Path::new("/tmp"), pages),
            Self::create(Path::new("/dev/shm"), pages),
        ];
        v.extend(Self::on_xfs(pages));
        v
    }

    pub fn on_tmp(pages: u64) -> TestRegion {
        Self::create(Path::new("/tmp"), pages)
    }

    pub fn on_xfs(pages: u64) -> Option<TestRegion> {
        xfs_dir().map(|d| Self::create(&d, pages))
    }

    pub fn create(base: &Path, pages: u64) -> TestRegion {
        let dir = tempfile::Builder::new()
            .prefix("daxvisor-mapper-")
            .tempdir_in(base)
            .unwrap();
        let magic = fs_magic(base).unwrap_or(0);
        let fs = match magic {
            EXT4_MAGIC => "ext4",
            TMPFS_MAGIC => "tmpfs",
            XFS_MAGIC => "xfs",
            _ => "other",
        };
        let fs = format!("{fs}:{}", base.display());
        let page = page_size();
        let path = dir.path().join("backing.img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut buf = vec![0u8; (pages * page) as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = fill(i as u64, page);
        }
        file.write_all_at(&buf, 0).unwrap();
        file.sync_all().unwrap();
        let file = Arc::new(file);
        let size = pages * page;
        let map = Arc::new(HostMapping::map(&file, 0, size, MapOptions::default()).unwrap());
        let dma = Arc::new(RecordingDma::new());
        let (notifier, events) = ChannelNotifier::new();
        let mapper = Mapper::new(Arc::new(notifier), Some(dma.clone()));
        let ram_fs = magic == TMPFS_MAGIC;
        let kind = if ram_fs {
            BackingKind::Ram
        } else {
            BackingKind::Regular
        };
        let region = mapper
            .add_region(
                RegionDesc::new(file.clone(), 0, size, kind)
                    .with_mapping(map.clone())
                    .with_iova(TEST_IOVA),
            )
            .unwrap();
        TestRegion {
            fs,
            ram_fs,
            _dir: dir,
            path,
            file,
            map,
            mapper,
            region,
            page,
            iova: TEST_IOVA,
            dma,
            events: Some(events),
        }
    }

    /// Adds a second region on the same file: the window of `pages` pages at page `at`, mapped, at its own
    /// IOVA (past the first region's).
    pub fn add_window(&self, at: u64, pages: u64) -> RegionId {
        let kind = if self.ram_fs {
            BackingKind::Ram
        } else {
            BackingKind::Regular
        };
        let (off, len) = (at * self.page, pages * self.page);
        let map = HostMapping::map(&self.file, off, len, MapOptions::default()).unwrap();
        self.mapper
            .add_region(
                RegionDesc::new(self.file.clone(), off, len, kind)
                    .with_mapping(Arc::new(map))
                    .with_iova(TEST_IOVA + (1 << 30) + off),
            )
            .unwrap()
    }

    pub fn fill_byte(&self, off: u64) -> u8 {
        fill(off, self.page)
    }

    pub fn is_xfs(&self) -> bool {
        self.fs.starts_with("xfs")
    }

    pub fn read_file(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let n = self.file.read_at(&mut b, off).unwrap();
        b.truncate(n);
        b
    }

    pub fn file_size(&self) -> u64 {
        self.file.metadata().unwrap().len()
    }

    /// A bare kernel hole punch, bypassing the mapper (to build test layouts).
    pub fn punch_raw(&self, off: u64, len: u64) {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on the test's own fd.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as i64, len as i64) };
        assert_eq!(rc, 0, "punch: {}", std::io::Error::last_os_error());
    }

    /// Allocates without writing: unwritten extents on ext4 and XFS.
    pub fn fallocate_raw(&self, off: u64, len: u64) {
        // SAFETY: as above.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    }

    /// Reflink copy of the whole backing file (FICLONE): every extent becomes SHARED.
    pub fn reflink_copy(&self) -> File {
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.with_extension("clone"))
            .unwrap();
        // SAFETY: FICLONE takes the source fd by value.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, self.file.as_raw_fd()) };
        assert_eq!(rc, 0, "FICLONE: {}", std::io::Error::last_os_error());
        dst
    }
}

impl TestRegion {
    /// Reflinks `[off, off+len)` of the backing file into a new file (FICLONERANGE): only that range becomes
    /// SHARED in the backing file.
    pub fn reflink_range(&self, off: u64, len: u64) -> File {
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.with_extension("range-clone"))
            .unwrap();
        dst.set_len(off + len).unwrap();
        let arg = FileCloneRange {
            src_fd: self.file.as_raw_fd() as i64,
            src_offset: off,
            src_length: len,
            dest_offset: off,
        };
        // SAFETY: FICLONERANGE reads one struct file_clone_range.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE, &arg) };
        assert_eq!(rc, 0, "FICLONERANGE: {}", std::io::Error::last_os_error());
        dst
    }
}

fn fill(off: u64, page: u64) -> u8 {
    ((off / page) % 251 + 1) as u8
}

/// Whether every page of `[addr, addr+len)` is resident.
pub(crate) fn mincore_resident(addr: usize, len: usize) -> bool {
    let page = page_size() as usize;
    let mut v = vec![0u8; len.div_ceil(page)];
    // SAFETY: `v` has one byte per page of the range.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, v.as_mut_ptr()) };
    rc == 0 && v.iter().all(|b| b & 1 == 1)
}
