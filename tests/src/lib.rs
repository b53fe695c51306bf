//! Support for the end-to-end tests: find (and build) the real daxvisor binary, run it like a user does with a
//! hard timeout so no test can hang, and assemble tiny freestanding guests for the fault cases.

// Test support: a failed step fails the test that called it, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The daxvisor binary from the same target directory and profile as the running test, built on first use
/// (cargo only builds the binaries of the package under test, and the tests live in their own package).
pub fn daxvisor_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "daxvisor",
            "--bins",
            "--target-dir",
        ])
        .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        let status = cmd.status().expect("run cargo build for daxvisor");
        assert!(status.success(), "building daxvisor failed");
        profile_dir.join("daxvisor")
    })
}

/// What a finished daxvisor run left: exit code (None if killed by a signal), stdout, stderr.
#[derive(Debug)]
pub struct RunOutcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutcome {
    fn from_output(o: Output) -> Self {
        RunOutcome {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Default hard limit for one VM run in a test. Generous: CI machines are shared.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `daxvisor <args>` to completion (killing it after `RUN_TIMEOUT`).
pub fn daxvisor(args: &[&str]) -> RunOutcome {
    run_with_timeout(Command::new(daxvisor_bin()).args(args), RUN_TIMEOUT)
}

/// Run any command with a hard timeout; a command that outlives it is killed and the test fails loudly.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> RunOutcome {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env(
            "DAXVISOR_LOG",
            std::env::var("DAXVISOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Drain pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
            panic!("{cmd:?} did not finish within {timeout:?}; stdout so far:\n{stdout}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunOutcome::from_output(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Assemble a tiny freestanding guest (GNU as, AT&T syntax, 64-bit) linked at 1 MiB. It starts in the
/// daxvisor boot ABI's entry state (long mode, ring 0). Used for the cases the real test guest must never
/// do: triple faults, emulation failures, pokes at unclaimed ports and MMIO.
pub fn assemble_guest(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&src, format!(".globl _start\n.text\n_start:\n{source}\n")).expect("write asm");
    let ok = Command::new("as")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ld")
            .args(["-static", "-nostdlib", "-Ttext=0x100000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "assembling {name} failed (binutils `as` and `ld` are needed; scripts/setup-host.sh installs them)");
    elf
}

/// Assembly that writes `status` to the exit port.
pub fn asm_exit(status: u32) -> String {
    format!("  mov $0x501, %dx\n  mov ${status}, %eax\n  out %eax, %dx\n9: hlt\n  jmp 9b\n")
}

/// The test guest's pattern word at byte `offset` for `seed` (images/testguest/src/pattern.rs).
pub fn pattern_word(seed: u32, offset: u64) -> u64 {
    0xda85_0000_0000_0000 ^ (u64::from(seed) << 32) ^ offset
}

/// Count the 8-byte words of `bytes[..len]` that are not the test guest's pattern for `seed`.
pub fn pattern_mismatches(bytes: &[u8], seed: u32, len: usize) -> usize {
    bytes[..len]
        .chunks_exact(8)
        .enumerate()
        .filter(|(i, w)| {
            u64::from_le_bytes((*w).try_into().unwrap()) != pattern_word(seed, *i as u64 * 8)
        })
        .count()
}

/// Test guest output lines, with the `daxvisor-testguest: ` prefix removed.
pub fn guest_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("daxvisor-testguest: "))
        .collect()
}

/// A test's prerequisite is missing on this machine. Under `CI=true` that is a failure (CI installs everything
/// the tests need: a skip there would hide a missing install step); elsewhere the test says SKIP and why.
pub fn missing_prerequisite(what: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "prerequisite missing under CI=true: {what}"
    );
    eprintln!("SKIP: {what}");
}

/// Run `daxvisor <args>` as the unprivileged user `nobody` (root bypasses file permissions, so permission errors
/// can only be seen this way). `None` when this machine cannot switch users; the caller skips with a message.
pub fn daxvisor_as_nobody(args: &[&std::ffi::OsStr]) -> Option<RunOutcome> {
    const AS_NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let probe = Command::new("setpriv").args(AS_NOBODY).arg("true").status();
    if !probe.is_ok_and(|s| s.success()) {
        missing_prerequisite("cannot switch to an unprivileged user here (setpriv)");
        return None;
    }
    let bin = daxvisor_bin();
    let r = run_with_timeout(
        Command::new("setpriv").args(AS_NOBODY).arg(bin).args(args),
        Duration::from_secs(30),
    );
    if r.stderr.contains("Permission denied") && r.stderr.contains(&*bin.to_string_lossy()) {
        missing_prerequisite(&format!(
            "the unprivileged user cannot execute {}",
            bin.display()
        ));
        return None;
    }
    Some(r)
}

/// Make a test's temporary directory readable (not writable) by other users, for `daxvisor_as_nobody`.
pub fn share_read_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod test dir");
}

/// A daxvisor started in the background, its stdout lines arriving on a channel and its stderr collected, for
/// tests that act on a running VM (signals, a second VMM, the backing file changed under it).
pub struct RunningVm {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// Every stdout line received so far.
    pub seen: Vec<String>,
}

impl RunningVm {
    /// Start `daxvisor <args>`.
    pub fn spawn(args: &[&str]) -> RunningVm {
        Self::spawn_with(Command::new(daxvisor_bin()).args(args))
    }

    /// Start `cmd`, a command that runs daxvisor (e.g. through `setpriv`, which execs it: same pid).
    pub fn spawn_with(cmd: &mut Command) -> RunningVm {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daxvisor");
        let stdout = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        RunningVm {
            child,
            lines,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (at most `RUN_TIMEOUT`) for a stdout line ending with `suffix`; kills the VM and panics otherwise.
    pub fn wait_for_line(&mut self, suffix: &str) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                let found = l.ends_with(suffix);
                self.seen.push(l);
                if found {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = self.stderr_text();
                panic!(
                    "daxvisor ended ({status}) before printing {suffix:?}: {:?}\n{stderr}",
                    self.seen
                );
            }
        }
        let _ = self.child.kill();
        panic!(
            "no line ending with {suffix:?} within {RUN_TIMEOUT:?}: {:?}",
            self.seen
        );
    }

    /// The next stdout line, if one comes within `timeout` (also kept in `seen`).
    pub fn line_within(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(l.clone());
        Some(l)
    }

    /// Everything the VMM wrote to stderr; only once it has ended (the reader thread ends with it).
    fn stderr_text(&mut self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default(),
        )
        .into_owned()
    }

    /// Whether the VMM is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send `signal` to the VMM.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Wait (at most `timeout`) for the VMM to end on its own; kill it and panic if it does not.
    pub fn finish(mut self, timeout: Duration) -> RunOutcome {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("daxvisor did not end within {timeout:?}: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        RunOutcome {
            code: status.code(),
            stdout: self.seen.join("\n"),
            stderr: self.stderr_text(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        // A test that panicked half-way must not leave a VM spinning.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub mod api;
pub mod lab;

/// Resident KiB of process `pid`'s mappings of `path`, from /proc/PID/smaps (page-table entries present in that
/// process, not the page cache). `None` if the process maps no such file.
pub fn mapped_rss_kib(pid: u32, path: &Path) -> Option<u64> {
    mapped_smaps_kib(pid, path, "Rss:")
}

/// As [`mapped_rss_kib`], for another kB field of smaps (`field` with its colon, e.g. "ShmemPmdMapped:").
pub fn mapped_smaps_kib(pid: u32, path: &Path, field: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let name = path.to_string_lossy();
    let mut in_mapping = false;
    let mut total = None;
    for line in smaps.lines() {
        let is_header = line.split_whitespace().next().is_some_and(|w| {
            w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if is_header {
            in_mapping = line.ends_with(&*name);
        } else if in_mapping {
            if let Some(kib) = line
                .strip_prefix(field)
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                *total.get_or_insert(0) += kib;
            }
        }
    }
    total
}
