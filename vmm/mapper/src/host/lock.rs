//! Exclusive use of backing files: an open-file-description lock (`F_OFD_SETLK`) on the whole file, held for
//! as long as the file is used (a write lock for a writable user, a shared read lock for readers). A second
//! user, or anything else that honours POSIX/OFD locks, is refused with the file and the holder's pid named,
//! however often it retries.
//!
//! The holder is looked up before the file is opened (`/proc/locks` by device and inode), so a refused second
//! VMM never opens the file and never breaks the running VM's kernel lease. `F_OFD_GETLK` reports pid -1 for OFD
//! locks, and so does `/proc/locks`; the pid comes from the `lock:` lines of `/proc/PID/fdinfo/FD`, which list
//! the locks held through that descriptor.
//!
//! The lock lives on the open file description: every `dup` of the backing's descriptor shares it, and it goes
//! away when the last one closes (at VM end, or if the VMM dies).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the exclusive-use lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum FileLockError {
    /// Another process holds a conflicting lock.
    #[error("pmem {path}: in use by {holder}, which holds a {kind} lock on it; stop that VM or use another file")]
    Busy {
        /// The file.
        path: PathBuf,
        /// Who holds it.
        holder: Holder,
        /// "write" when we wanted a shared lock, "conflicting" when we wanted the write lock.
        kind: &'static str,
    },
    /// fcntl failed for another reason.
    #[error("pmem {path}: cannot lock the file: {source}")]
    Lock {
        /// The file.
        path: PathBuf,
        /// What fcntl said.
        #[source]
        source: io::Error,
    },
}

/// Who holds a lock, as far as /proc tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A process, with its command name (`/proc/PID/comm`).
    Process {
        /// Its pid.
        pid: u32,
        /// Its command name.
        command: String,
    },
    /// A lock is held, but no descriptor holding it could be found in /proc (another pid namespace).
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process { pid, command } => write!(f, "pid {pid} ({command})"),
            Holder::Unknown => write!(f, "another process (pid not found in /proc)"),
        }
    }
}

/// The `MAJ:MIN:INO` key `/proc/locks` and fdinfo print for a file (major and minor in hex).
fn lock_key(meta: &std::fs::Metadata) -> String {
    let dev = meta.dev();
    format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    )
}

/// One parsed lock line: its class (POSIX, OFDLCK, FLOCK, LEASE...), WRITE or READ, pid field.
struct LockLine<'a> {
    class: &'a str,
    write: bool,
    pid: i64,
}

/// Parse the part of a `/proc/locks` or fdinfo `lock:` line after the index, if it is about `key`.
fn parse_lock_line<'a>(line: &'a str, key: &str) -> Option<LockLine<'a>> {
    // "1: OFDLCK  ADVISORY  WRITE -1 00:2a:1234 0 EOF"; waiters carry "->" and are skipped.
    let mut f = line.split_whitespace();
    let _index = f.next()?;
    let class = f.next()?;
    if class == "->" {
        return None;
    }
    let _advisory = f.next()?;
    let mode = f.next()?;
    let pid: i64 = f.next()?.parse().ok()?;
    if f.next()? != key {
        return None;
    }
    Some(LockLine {
        class,
        write: mode == "WRITE",
        pid,
    })
}

/// Does a held lock of this kind stop us taking ours? Leases are the kernel lease machinery, not locks.
fn conflicts(l: &LockLine<'_>, want_write: bool) -> bool {
    matches!(l.class, "POSIX" | "OFDLCK" | "FLOCK") && (want_write || l.write)
}

fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Find the process holding a lock on `key` that conflicts with `want_write`, preferring another process to
/// this one. `None`: no such lock.
fn find_holder(key: &str, want_write: bool) -> Option<Holder> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let held: Vec<LockLine<'_>> = locks
        .lines()
        .filter_map(|l| parse_lock_line(l, key))
        .filter(|l| conflicts(l, want_write))
        .collect();
    if held.is_empty() {
        return None;
    }
    let me = std::process::id();
    let posix_pid = held
        .iter()
        .filter_map(|l| u32::try_from(l.pid).ok())
        .find(|&p| p != me);
    if let Some(pid) = posix_pid {
        return Some(Holder::Process {
            pid,
            command: command_of(pid),
        });
    }
    // OFD locks show pid -1: look for the descriptor that holds it.
    Some(pid_from_fdinfo(key, want_write, me).unwrap_or(Holder::Unknown))
}

/// The process with a descriptor holding a conflicting lock on `key`: another one if any, else this one.
fn pid_from_fdinfo(key: &str, want_write: bool, me: u32) -> Option<Holder> {
    let mut mine = false;
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let holds = info
                .lines()
                .filter_map(|l| l.strip_prefix("lock:"))
                .filter_map(|l| parse_lock_line(l.trim_start(), key))
                .any(|l| conflicts(&l, want_write));
            if holds && pid == me {
                mine = true;
            } else if holds {
                return Some(Holder::Process {
                    pid,
                    command: command_of(pid),
                });
            }
        }
    }
    mine.then(|| Holder::Process {
        pid: me,
        command: command_of(me),
    })
}

/// Every other process with a descriptor of the file at `path` (same device and inode), and whether that
/// descriptor is open for writing; bounded by what /proc lists. A file that does not exist has none.
pub fn openers_of(path: &Path) -> Vec<(Holder, bool)> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let mut out: Vec<(Holder, bool)> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&p| p != me)
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let mut write = None;
        for fd in fds.flatten() {
            // stat through the magic link: the file the descriptor refers to (nothing is opened).
            let same = std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino));
            if !same {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            let flags = std::fs::read_to_string(info).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
            let w = flags.is_none_or(|f| f & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32);
            write = Some(write.unwrap_or(false) || w);
        }
        if let Some(w) = write {
            out.push((
                Holder::Process {
                    pid,
                    command: command_of(pid),
                },
                w,
            ));
        }
    }
    out
}

fn busy(path: &Path, holder: Holder, want_write: bool) -> FileLockError {
    FileLockError::Busy {
        path: path.to_owned(),
        holder,
        kind: if want_write { "conflicting" } else { "write" },
    }
}

/// Before opening `path`: refuse if another process holds a lock that would stop ours. A file that does not
/// exist yet (`create=on`) has no holder; a lock this process holds is left to [`lock_file`] to refuse.
pub fn refuse_if_locked(path: &Path, want_write: bool) -> Result<(), FileLockError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    match find_holder(&lock_key(&meta), want_write) {
        Some(Holder::Process { pid, .. }) if pid == std::process::id() => Ok(()),
        Some(holder) => Err(busy(path, holder, want_write)),
        None => Ok(()),
    }
}

/// Take the whole-file OFD lock on `file` (write lock if `write`, else shared), without waiting.
pub fn lock_file(file: &File, path: &Path, write: bool) -> Result<(), FileLockError> {
    // SAFETY: flock is plain old data; all-zero is a valid value that the fields below complete.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl.l_pid = 0; // required for OFD locks
                  // SAFETY: F_OFD_SETLK reads the flock we own for the duration of the call; the fd is valid (borrowed).
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            let holder = file
                .metadata()
                .ok()
                .and_then(|m| find_holder(&lock_key(&m), write))
                .unwrap_or(Holder::Unknown);
            Err(busy(path, holder, write))
        }
        _ => Err(FileLockError::Lock {
            path: path.to_owned(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn proc_locks_lines_parse() {
        let key = "00:2a:1234";
        let l = parse_lock_line("1: OFDLCK  ADVISORY  WRITE -1 00:2a:1234 0 EOF", key).unwrap();
        assert_eq!((l.class, l.write, l.pid), ("OFDLCK", true, -1));
        assert!(parse_lock_line("1: OFDLCK  ADVISORY  WRITE -1 00:2a:1235 0 EOF", key).is_none());
        assert!(parse_lock_line("1: -> POSIX ADVISORY WRITE 9 00:2a:1234 0 EOF", key).is_none());
        let lease = parse_lock_line("2: LEASE  ACTIVE    WRITE 77 00:2a:1234 0 EOF", key).unwrap();
        assert!(!conflicts(&lease, true));
        let read = parse_lock_line("3: POSIX  ADVISORY  READ 77 00:2a:1234 0 EOF", key).unwrap();
        assert!(conflicts(&read, true) && !conflicts(&read, false));
    }

    /// A second open file description of the same file, as a second VMM would have, is refused, and the holder
    /// found through fdinfo (here: this process).
    #[test]
    fn a_second_writer_is_refused_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let open = |w: bool| OpenOptions::new().read(true).write(w).open(&p).unwrap();
        let first = open(true);
        lock_file(&first, &p, true).unwrap();
        for _ in 0..3 {
            let e = lock_file(&open(true), &p, true).unwrap_err();
            let me = format!("pid {}", std::process::id());
            assert!(e.to_string().contains(&me), "{e}");
            assert!(lock_file(&open(false), &p, false).is_err());
        }
        drop(first);
        let r1 = open(false);
        let r2 = open(false);
        lock_file(&r1, &p, false).unwrap();
        lock_file(&r2, &p, false).unwrap();
        assert!(lock_file(&open(true), &p, true).is_err());
    }
}
