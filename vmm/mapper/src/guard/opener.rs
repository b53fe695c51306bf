//! Who is opening a guarded file, read from /proc while the opener is held in its open: the process id and
//! command line, and the open's mode from the blocked thread's `/proc/TID/syscall` (the syscall number and its
//! arguments). Hand-written: three small bounded reads, where a procfs crate would add a dependency tree to a
//! crate that keeps its dependencies to libc, thiserror and tracing. Every read is bounded; a process that is gone, a syscall that is not a plain open, or a file
//! we may not read gives `OpenMode::Unknown`, which the guard treats as a write.

use std::io::Read;

/// How a foreign process opens a guarded file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// O_RDONLY without O_TRUNC.
    Read,
    /// O_WRONLY or O_RDWR, O_TRUNC, or creat(2).
    Write,
    /// Not a plain open (openat2, io_uring, exec), or the opener could not be read: counted as a write.
    Unknown,
}

impl OpenMode {
    /// `read`, `write` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenMode::Read => "read",
            OpenMode::Write => "write",
            OpenMode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for OpenMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What /proc says about an opener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Opener {
    /// The opening process (thread group), if it could be read.
    pub pid: Option<u32>,
    /// Its command line, NUL separators as spaces, at most [`COMMAND_MAX`] bytes.
    pub command: String,
    pub mode: OpenMode,
}

/// Longest command line kept (bytes); longer ones end in "...".
pub(crate) const COMMAND_MAX: usize = 256;
/// /proc/TID/syscall is one line of at most nine numbers; /proc/TID/status's Tgid is in its first lines.
const SYSCALL_MAX: u64 = 512;
const STATUS_MAX: u64 = 4096;

/// x86-64 syscall numbers of the opens whose flags can be read.
const SYS_OPEN: u64 = 2;
const SYS_CREAT: u64 = 85;
const SYS_OPENAT: u64 = 257;

fn read_bounded(path: &str, max: u64) -> Option<Vec<u8>> {
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The mode of the open a thread is blocked in, from the text of its `/proc/TID/syscall`.
pub(crate) fn open_mode_from_syscall(text: &str) -> OpenMode {
    let mut fields = text.split_ascii_whitespace();
    let num = |s: Option<&str>| -> Option<u64> {
        let s = s?;
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    let Some(nr) = num(fields.next()) else {
        return OpenMode::Unknown; // "running", or empty
    };
    let args: Vec<Option<u64>> = fields.take(6).map(|f| num(Some(f))).collect();
    let flags = match nr {
        SYS_OPEN => args.get(1).copied().flatten(),
        SYS_OPENAT => args.get(2).copied().flatten(),
        SYS_CREAT => return OpenMode::Write,
        _ => None,
    };
    match flags {
        Some(f) => mode_of_flags(f),
        None => OpenMode::Unknown,
    }
}

fn mode_of_flags(flags: u64) -> OpenMode {
    let acc = flags & libc::O_ACCMODE as u64;
    if acc == libc::O_RDONLY as u64 && flags & libc::O_TRUNC as u64 == 0 {
        OpenMode::Read
    } else {
        OpenMode::Write
    }
}

fn tgid_of(tid: u32) -> Option<u32> {
    let status = read_bounded(&format!("/proc/{tid}/status"), STATUS_MAX)?;
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn command_of(pid: u32) -> Option<String> {
    let raw = read_bounded(&format!("/proc/{pid}/cmdline"), COMMAND_MAX as u64 + 1)?;
    let cut = raw.len() > COMMAND_MAX;
    let mut s: String = String::from_utf8_lossy(&raw[..raw.len().min(COMMAND_MAX)])
        .trim_end_matches('\0')
        .chars()
        .map(|c| if c == '\0' || c.is_control() { ' ' } else { c })
        .collect();
    if cut {
        s.push_str("...");
    }
    Some(s)
}

/// The process's name (`/proc/PID/comm`, at most 16 bytes), readable until it is reaped.
fn name_of(pid: u32) -> Option<String> {
    let raw = read_bounded(&format!("/proc/{pid}/comm"), 64)?;
    let name = String::from_utf8_lossy(&raw).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Whether `tid` is a thread of this process (its own opens pass the guard).
pub(crate) fn is_own_thread(tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The text of `/proc/TID/syscall`. A thread held in a fanotify permission wait is woken whenever the group
/// answers any event, and for that moment the kernel shows it as `running`: such a reading is taken again
/// (bounded) until the thread sleeps in its call again.
fn blocked_syscall(tid: u32) -> Option<String> {
    const TRIES: u32 = 200;
    const EVERY: std::time::Duration = std::time::Duration::from_micros(250);
    let path = format!("/proc/{tid}/syscall");
    let mut text = String::new();
    for _ in 0..TRIES {
        text = String::from_utf8_lossy(&read_bounded(&path, SYSCALL_MAX)?).into_owned();
        if !text.starts_with("running") {
            break;
        }
        std::thread::sleep(EVERY);
    }
    Some(text)
}

/// x86-64 truncate(2): a path, not a descriptor, so no open of it was seen.
pub(crate) const SYS_TRUNCATE: u64 = 76;

/// The number of the syscall thread `tid` is in, if it could be read (`None` while it runs in user space).
pub(crate) fn syscall_of(tid: u32) -> Option<u64> {
    blocked_syscall(tid)?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reads the opener held in its open on thread `tid` (FAN_REPORT_TID): pid, command and mode.
pub(crate) fn read_opener(tid: u32) -> Opener {
    let mode = blocked_syscall(tid)
        .map(|text| open_mode_from_syscall(&text))
        .unwrap_or(OpenMode::Unknown);
    let pid = tgid_of(tid);
    // A process that ended but is not reaped yet has no command line any more, but still its name.
    let command = pid
        .and_then(command_of)
        .filter(|c| !c.is_empty())
        .or_else(|| pid.and_then(name_of))
        .unwrap_or_else(|| "?".to_owned());
    Opener { pid, command, mode }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    #[test]
    fn syscall_lines_give_the_open_mode() {
        // open(path, flags, mode): flags is the second argument; openat(dirfd, path, flags, mode): the third.
        let cases = [
            (
                "2 0x7ffd1000 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00",
                OpenMode::Read,
            ),
            (
                "2 0x7ffd1000 0x241 0x1b6 0x0 0x0 0x0 0x7ffd 0x7f00",
                OpenMode::Write,
            ),
            (
                "257 0xffffff9c 0x7ffd1000 0x80000 0x0 0x0 0x0 0x1 0x2",
                OpenMode::Read,
            ),
            (
                "257 0xffffff9c 0x7ffd1000 0x2 0x0 0x0 0x0 0x1 0x2",
                OpenMode::Write,
            ),
            (
                "257 0xffffff9c 0x7ffd1000 0x441 0x1b6 0x0 0x0 0x1 0x2",
                OpenMode::Write,
            ),
            // O_RDONLY|O_TRUNC truncates.
            (
                "257 0xffffff9c 0x7ffd1000 0x200 0x0 0x0 0x0 0x1 0x2",
                OpenMode::Write,
            ),
            (
                "85 0x7ffd1000 0x1a4 0x0 0x0 0x0 0x0 0x1 0x2",
                OpenMode::Write,
            ),
            // openat2's flags are behind a pointer; io_uring and exec tell nothing.
            (
                "437 0xffffff9c 0x7ffd1000 0x7ffd2000 0x18 0x0 0x0 0x1 0x2",
                OpenMode::Unknown,
            ),
            ("426 0x3 0x1 0x0 0x0 0x0 0x0 0x1 0x2", OpenMode::Unknown),
            ("running", OpenMode::Unknown),
            ("-1 0x7ffd 0x7f00", OpenMode::Unknown),
            ("257 0xffffff9c", OpenMode::Unknown),
            ("", OpenMode::Unknown),
        ];
        for (line, want) in cases {
            assert_eq!(open_mode_from_syscall(line), want, "{line}");
        }
    }

    /// A real thread blocked in openat of a FIFO (an open for writing waits for a reader): its syscall file
    /// gives the flags it passed.
    #[test]
    fn a_thread_blocked_in_openat_shows_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (write, custom, want) in [
            (true, libc::O_APPEND, OpenMode::Write),
            (false, libc::O_NOATIME, OpenMode::Read),
        ] {
            let (tx, rx) = std::sync::mpsc::channel();
            let path = fifo.clone();
            let opener = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() } as u32).unwrap();
                let f = std::fs::OpenOptions::new()
                    .read(!write)
                    .write(write)
                    .custom_flags(custom)
                    .open(&path);
                f.map(|_| ())
            });
            let tid = rx.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let line = loop {
                let l = String::from_utf8_lossy(
                    &read_bounded(&format!("/proc/self/task/{tid}/syscall"), SYSCALL_MAX).unwrap(),
                )
                .into_owned();
                if l.starts_with("257 ") {
                    break l;
                }
                assert!(
                    Instant::now() < deadline,
                    "thread never blocked in openat: {l}"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            let flags = u64::from_str_radix(
                line.split_whitespace()
                    .nth(3)
                    .unwrap()
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap();
            assert_ne!(flags & custom as u64, 0, "{line}");
            assert_eq!(open_mode_from_syscall(&line), want, "{line}");
            assert_eq!(read_opener(tid).mode, want);
            // SAFETY: getpid has no preconditions.
            assert_eq!(read_opener(tid).pid, Some(unsafe { libc::getpid() } as u32));
            assert!(is_own_thread(tid));
            // The other end releases the blocked open (a blocked reader counts as a reader for a writer).
            let _peer = std::fs::OpenOptions::new()
                .read(write)
                .write(!write)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap();
            opener.join().unwrap().unwrap();
        }
    }

    #[test]
    fn a_foreign_process_is_read_with_its_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // The new program's command line appears a moment after exec returns to the parent: before it the
        // forked child shows the test binary's, and for a moment during the exec none (then its name, "sleep").
        let deadline = Instant::now() + Duration::from_secs(10);
        let o = loop {
            let o = read_opener(child.id());
            if o.command == "sleep 30" || Instant::now() > deadline {
                break o;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(o.pid, Some(child.id()));
        assert_eq!(o.command, "sleep 30");
        // Sleeping in clock_nanosleep, not an open.
        assert_eq!(o.mode, OpenMode::Unknown);
        assert!(!is_own_thread(child.id()));
        // Gone: nothing readable, counted as unknown.
        let gone = read_opener(child.id());
        assert_eq!((gone.pid, gone.mode), (None, OpenMode::Unknown));
    }
}
