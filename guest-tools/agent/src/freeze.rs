//! Freezing a filesystem (`FIFREEZE`) for as long as a guard lives, and thawing it (`FITHAW`) whatever happens:
//! when the guard is dropped (on return, on error, while a panic unwinds) and when the process gets SIGTERM,
//! SIGINT or SIGHUP while frozen (the handler thaws every frozen filesystem, then lets the signal do what it
//! would have done).
//!
//! While frozen, writes to the filesystem block (write(2), page faults on shared mappings); the kernel
//! writes every dirty page and commits the journal before `FIFREEZE` returns, so the allocation bitmaps read
//! afterwards are the truth until the thaw. A SIGKILL cannot be caught: the filesystem then stays frozen until
//! `fsfreeze -u` (or the agent's next `reclaim` of it, which reports `EBUSY` from FIFREEZE).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Filesystems frozen at once (one per guard); the signal handler reads these without locks.
const SLOTS: usize = 16;
static FROZEN: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
static HANDLERS: Once = Once::new();
static HANDLERS_OK: AtomicBool = AtomicBool::new(false);

/// Why a filesystem was not frozen or thawed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FIFREEZE {path}: {source}")]
    Freeze {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FITHAW {path}: {source}")]
    Thaw {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} filesystems are frozen already")]
    TooMany(usize),
    #[error("cannot install the thaw-on-signal handlers: {0}")]
    Signals(std::io::Error),
}

/// A frozen filesystem; dropping it thaws it.
pub struct Frozen {
    dir: File,
    path: PathBuf,
    slot: usize,
    thawed: bool,
}

/// Freezes the filesystem mounted at `mount` (its root directory).
pub fn freeze(mount: &Path) -> Result<Frozen, FreezeError> {
    install_handlers()?;
    let dir = File::open(mount).map_err(|source| FreezeError::Open {
        path: mount.to_owned(),
        source,
    })?;
    let fd = dir.as_raw_fd();
    // The slot is taken before the freeze, so a signal arriving right after FIFREEZE finds the fd.
    let slot = FROZEN
        .iter()
        .position(|s| {
            s.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .ok_or(FreezeError::TooMany(SLOTS))?;
    // SAFETY: FIFREEZE takes no argument memory (the int argument is ignored); `fd` is our open directory.
    let rc = unsafe { libc::ioctl(fd, FIFREEZE, 0) };
    if rc < 0 {
        let source = std::io::Error::last_os_error();
        FROZEN[slot].store(-1, Ordering::SeqCst);
        return Err(FreezeError::Freeze {
            path: mount.to_owned(),
            source,
        });
    }
    Ok(Frozen {
        dir,
        path: mount.to_owned(),
        slot,
        thawed: false,
    })
}

impl Frozen {
    /// Thaws now, reporting a failure (dropping the guard thaws too, but can only log one).
    pub fn thaw(mut self) -> Result<(), FreezeError> {
        self.thaw_once()
    }

    /// The frozen filesystem's root directory.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    fn thaw_once(&mut self) -> Result<(), FreezeError> {
        if self.thawed {
            return Ok(());
        }
        self.thawed = true;
        // Taken back from the handler first: a signal now finds nothing to thaw, and we thaw below.
        FROZEN[self.slot].store(-1, Ordering::SeqCst);
        // SAFETY: FITHAW takes no argument memory; the fd is our open directory.
        let rc = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            // EINVAL: not frozen (a signal handler or someone else thawed it): the goal is reached.
            if source.raw_os_error() != Some(libc::EINVAL) {
                return Err(FreezeError::Thaw {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_once() {
            eprintln!("daxvisor-agent: {e}");
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP thaw every frozen filesystem, then act as they would have.
fn install_handlers() -> Result<(), FreezeError> {
    HANDLERS.call_once(|| {
        let mut ok = true;
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: an all-zero sigaction is a valid value to fill in.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: `sa.sa_mask` is a sigset_t we own.
            unsafe { libc::sigemptyset(&mut sa.sa_mask) };
            // SAFETY: installs a handler that only makes async-signal-safe calls (ioctl, signal, raise).
            if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
                ok = false;
            }
        }
        HANDLERS_OK.store(ok, Ordering::SeqCst);
    });
    if HANDLERS_OK.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(FreezeError::Signals(std::io::Error::other(
            "sigaction failed",
        )))
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    thaw_all();
    // SAFETY: restoring the default action and raising the signal again are async-signal-safe; the process
    // then ends (or stops) as the signal says.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Thaws every filesystem a guard froze (from the signal handler: atomics and ioctl only).
fn thaw_all() {
    for s in &FROZEN {
        let fd = s.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: the fd belongs to a live guard (it clears its slot before closing); FITHAW takes no memory.
            unsafe { libc::ioctl(fd, FITHAW, 0) };
        }
    }
}
