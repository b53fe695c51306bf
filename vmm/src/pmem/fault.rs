//! Explaining a `KVM_RUN` that failed with EFAULT: a guest access to a pmem window whose page the host could
//! not provide. That happens when the backing file shrank under the VM (the page is past its end) or when its
//! file system is full (a write into a hole cannot allocate a block). The message names the region as the
//! operator named it, the file, the guest address and the file offset, and which of the two it was.
//!
//! KVM reports the faulting guest address (`KVM_EXIT_MEMORY_FAULT`) only on some paths; without it the address
//! is inferred: the first page past the new end of a shrunk file, or the first unallocated offset (SEEK_HOLE)
//! of a file whose file system is full.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::PmemRegion;

const PAGE: u64 = 4096;

struct Window {
    id: String,
    path: PathBuf,
    file: File,
    guest_addr: u64,
    size: u64,
    device: bool,
}

/// The pmem windows of a VM, kept to explain faults after the fact.
pub struct FaultMap {
    windows: Vec<Window>,
}

/// Why a window's page cannot be provided.
#[derive(Debug, PartialEq, Eq)]
enum Cause {
    Shrunk { len: u64 },
    FsFull { free: u64 },
}

impl FaultMap {
    pub fn new(regions: &[PmemRegion]) -> io::Result<Self> {
        let windows = regions
            .iter()
            .map(|r| {
                Ok(Window {
                    id: r.id().to_owned(),
                    path: r.backing.path().to_owned(),
                    file: r.backing.file().try_clone()?,
                    guest_addr: r.guest_addr,
                    size: r.backing.size(),
                    device: r.backing.dev_dax().is_some(),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(FaultMap { windows })
    }

    /// One sentence about the fault, or `None` if no pmem window explains it. `gpa` is the faulting guest
    /// physical address when KVM reported it.
    pub fn explain(&self, gpa: Option<u64>) -> Option<String> {
        for w in &self.windows {
            if w.device {
                continue;
            }
            if let Some(a) = gpa {
                if a < w.guest_addr || a >= w.guest_addr + w.size {
                    continue;
                }
            }
            let Some(cause) = cause_of(w) else { continue };
            let offset = match (gpa, &cause) {
                (Some(a), _) => a - w.guest_addr,
                (None, Cause::Shrunk { len }) => len / PAGE * PAGE,
                (None, Cause::FsFull { .. }) => first_hole(&w.file, w.size).unwrap_or(0),
            };
            let how = if gpa.is_some() {
                "reported by KVM"
            } else {
                "inferred"
            };
            let why = match cause {
                Cause::Shrunk { len } => format!(
                    "the file shrank to {len} bytes under the VM (the guest sees {} bytes)",
                    w.size
                ),
                Cause::FsFull { free } => format!(
                    "its file system is full ({free} bytes free) and the page was not allocated"
                ),
            };
            return Some(format!(
                "pmem {id}: guest access at {gpa:#x} (file {path} offset {offset:#x}, {how}) failed: {why}",
                id = w.id,
                gpa = w.guest_addr + offset,
                path = w.path.display(),
            ));
        }
        None
    }
}

fn cause_of(w: &Window) -> Option<Cause> {
    let len = w.file.metadata().ok()?.len();
    if len < w.size {
        return Some(Cause::Shrunk { len });
    }
    // SAFETY: statvfs is plain old data filled by the call; the fd is valid for the call (borrowed).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstatvfs(w.file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    (free < PAGE).then_some(Cause::FsFull { free })
}

/// The first offset below `size` that has no block (SEEK_HOLE), if any.
fn first_hole(file: &File, size: u64) -> Option<u64> {
    // SAFETY: lseek on a valid fd. It moves the offset shared with the backing's descriptor, which nothing
    // reads or writes through (the region is mapped), so no one depends on it.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    u64::try_from(off).ok().filter(|&o| o < size)
}
