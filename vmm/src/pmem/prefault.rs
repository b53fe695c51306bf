//! `prefault=on`: populate a region's host page tables before the guest starts, so the guest's first touch of
//! a page costs what a later touch does instead of a nested page fault.
//!
//! The mapping is populated by the mapper's [`HostMapping::populate`](daxvisor_mapper::HostMapping::populate):
//! `MADV_POPULATE_WRITE` on shared writable mappings (the page cache or DAX blocks are allocated and mapped
//! writable), `MADV_POPULATE_READ` for `readonly=on` and `discard_writes=on` (whose copy-on-write pages would
//! otherwise all be copied into anonymous memory), in chunks on a few threads.
//! A terminal gets a progress bar for large regions; the log gets one line with the time taken.
//!
//! A sparse file gets its holes filled. If that fails (a full file system: the kernel reports EFAULT, as it
//! would deliver SIGBUS to a store), the holes this prefault filled are punched again, so a refused start
//! leaves the file as it found it, and the error says what was short.

use std::fs::File;
use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use daxvisor_mapper::BackingKind;

use super::backing::Backing;

/// Work unit of one populate call: large enough that the syscall is noise, small enough to spread a few GiB
/// over the threads and to move the progress bar.
const CHUNK: u64 = 64 << 20;
/// More threads than this contend on the file's mapping lock rather than add bandwidth.
const MAX_THREADS: usize = 8;
/// Regions at least this large show a progress bar when stderr is a terminal.
const PROGRESS_MIN: u64 = 1 << 30;
/// At most this many holes are remembered for the undo of a failed prefault (a more fragmented file is
/// restored up to here, with a warning).
const MAX_HOLES: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
#[error("pmem {id}: prefault=on failed at offset {offset:#x} of {size:#x}: {why}")]
pub struct PrefaultError {
    pub id: String,
    pub offset: u64,
    pub size: u64,
    pub why: String,
}

/// What a prefault did, for the log line and the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Prefaulted {
    pub bytes: u64,
    pub threads: usize,
    pub elapsed: Duration,
}

/// Which populate a backing gets (the mapper decides, from its mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn of(backing: &Backing) -> Access {
        if backing.mapping().populates_for_write() {
            Access::Write
        } else {
            Access::Read
        }
    }

    fn name(self) -> &'static str {
        match self {
            Access::Read => "MADV_POPULATE_READ",
            Access::Write => "MADV_POPULATE_WRITE",
        }
    }
}

/// Populate `[off, off + len)` of `backing`'s mapping.
fn populate(backing: &Backing, off: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    backing.mapping().populate(off, len)
}

/// Populate all of `backing`'s mapping before the guest starts. On failure, holes this filled are punched again.
pub fn prefault(backing: &Backing) -> Result<Prefaulted, PrefaultError> {
    let access = Access::of(backing);
    let holes = restorable_holes(backing);
    let started = Instant::now();
    let size = backing.size();
    let chunk = backing.dev_dax().map_or(CHUNK, |d| CHUNK.max(d.align));
    let chunks = size.div_ceil(chunk);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
        .min(usize::try_from(chunks).unwrap_or(MAX_THREADS))
        .max(1);

    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let running = AtomicUsize::new(threads);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<(u64, io::Error)>> = Mutex::new(None);
    let progress = progress_bar(size);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chunks {
                        break;
                    }
                    let off = i * chunk;
                    let len = chunk.min(size - off);
                    if let Err(e) = populate(backing, off, len) {
                        stop.store(true, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.as_ref().is_none_or(|(o, _)| off < *o) {
                            *slot = Some((off, e));
                        }
                        break;
                    }
                    done.fetch_add(len, Ordering::Relaxed);
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        if let Some(bar) = &progress {
            while running.load(Ordering::Acquire) > 0 {
                bar.set_position(done.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let error = first_error.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some((offset, e)) = error {
        let why = explain(backing.file(), access, &e);
        restore_holes(backing, &holes);
        return Err(PrefaultError {
            id: backing.id().to_owned(),
            offset,
            size,
            why,
        });
    }
    let report = Prefaulted {
        bytes: size,
        threads,
        elapsed: started.elapsed(),
    };
    let secs = report.elapsed.as_secs_f64();
    tracing::info!(
        id = %backing.id(),
        bytes = size,
        how = %access.name(),
        threads,
        ms = format_args!("{:.1}", secs * 1e3),
        mib_per_s = format_args!("{:.0}", size as f64 / f64::from(1 << 20) / secs.max(1e-9)),
        "pmem region prefaulted"
    );
    Ok(report)
}

fn progress_bar(size: u64) -> Option<indicatif::ProgressBar> {
    if size < PROGRESS_MIN || !io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "prefault {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// The populate error in the operator's terms.
fn explain(file: &File, access: Access, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EFAULT) if file_system_full(file) => format!(
            "no space left on the file system (ENOSPC): the file is sparse and {} allocates every block; \
             free space, or allocate the file (fallocate) before starting",
            access.name()
        ),
        Some(libc::EFAULT) => format!(
            "the kernel could not supply a page ({e}): out of space or quota, a hole it cannot fill, or the file \
             shrank"
        ),
        Some(libc::EINVAL) => format!(
            "{} is not supported here ({e}; it needs Linux 5.14 or later)",
            access.name()
        ),
        Some(libc::ENOMEM) => format!("out of memory ({e})"),
        _ => format!("{}: {e}", access.name()),
    }
}

fn file_system_full(file: &File) -> bool {
    daxvisor_mapper::free_bytes(file).is_ok_and(|free| free == 0)
}

/// The holes of a writable file backing in `[0, size)`: what a failed populate must give back. Device-DAX has
/// none; read populates allocate no blocks (and a read-only descriptor could not punch them).
fn restorable_holes(backing: &Backing) -> Vec<(u64, u64)> {
    if backing.kind() == BackingKind::DevDax || Access::of(backing) == Access::Read {
        return Vec::new();
    }
    let (holes, complete) = daxvisor_mapper::holes(backing.file(), backing.size(), MAX_HOLES);
    if !complete {
        tracing::warn!(
            id = %backing.id(),
            "the file has more than {MAX_HOLES} holes: a failed prefault gives back only the first ones"
        );
    }
    holes
}

/// Punch `holes` again (they held no data before the prefault, and no guest has run since).
fn restore_holes(backing: &Backing, holes: &[(u64, u64)]) {
    for &(off, len) in holes {
        if let Err(e) = daxvisor_mapper::punch(backing.file(), off, len) {
            tracing::warn!(
                id = %backing.id(),
                "cannot give back the blocks a failed prefault allocated at {off:#x}+{len:#x}: {e}"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmem::PmemConfig;

    const MIB: u64 = 1 << 20;

    /// Resident pages of `[addr, addr + len)` of this process, by mincore.
    fn resident(addr: u64, len: u64) -> usize {
        let pages = (len / 4096) as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: the range is a live mapping of the caller; v has one byte per page.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v.iter().filter(|b| **b & 1 == 1).count()
    }

    fn open(path: &std::path::Path, extra: &str) -> Backing {
        let cfg: PmemConfig = format!("file={}{extra}", path.display()).parse().unwrap();
        Backing::open(&cfg, "t").unwrap()
    }

    #[test]
    fn prefault_fills_a_sparse_tmpfs_file_and_keeps_its_contents() {
        // On tmpfs, mincore's page-cache residency is the file's allocation: a sparse file shows its holes.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("r.img");
        let f = File::create(&p).unwrap();
        f.set_len(8 * MIB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x3cu8; 4096], 2 * MIB).unwrap();
        let b = open(&p, "");
        assert_eq!(resident(b.host_addr(), b.size()), 1, "one written page");
        let done = prefault(&b).unwrap();
        assert_eq!(done.bytes, 8 * MIB);
        assert_eq!(resident(b.host_addr(), b.size()), (8 * MIB / 4096) as usize);
        drop(b);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, 8 * MIB);
        let page = 2 * MIB as usize..2 * MIB as usize + 4096;
        assert!(bytes[page.clone()].iter().all(|&x| x == 0x3c));
        assert_eq!(bytes.iter().filter(|&&x| x != 0).count(), page.len());
    }

    #[test]
    fn read_only_regions_are_populated_for_reading() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("ro.img");
        std::fs::write(&p, vec![7u8; 4 * MIB as usize]).unwrap();
        let b = open(&p, ",readonly=on");
        assert_eq!(Access::of(&b), Access::Read);
        assert!(restorable_holes(&b).is_empty());
        prefault(&b).unwrap();
        let b = open(&p, ",discard_writes=on");
        assert_eq!(Access::of(&b), Access::Read);
        prefault(&b).unwrap();
        drop(b);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 4 * MIB as usize]);
    }
}
