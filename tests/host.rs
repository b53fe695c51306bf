//! End-to-end: the host side holds. A refused start leaves the directory as it was, special files are refused
//! at once, a second daxvisor cannot take a running VM's file, SIGTERM stops the VM cleanly (and a second one
//! ends a stop that hangs at once), and a backing file that shrinks or fills its file system ends the VM with the
//! region, file and offset named.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use daxvisor_tests::{
    daxvisor, guest_lines, missing_prerequisite, pattern_mismatches, run_with_timeout, RunOutcome,
    RunningVm,
};

const MIB: usize = 1 << 20;

/// What a directory holds: names, sizes and a checksum of each file's bytes.
fn listing(dir: &Path) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            let sum = bytes
                .iter()
                .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
                sum,
            )
        })
        .collect();
    v.sort();
    v
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A freestanding ELF header that classifies as an x86-64 ELF but whose program headers are missing: the
/// kernel load fails late, after the pmem files were created.
fn broken_elf(path: &Path) {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1; // version
    h[0x10] = 2; // ET_EXEC
    h[0x12] = 62; // x86-64
    h[0x14] = 1;
    h[0x18..0x20].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff: right after the header, past the end
    h[0x34] = 64; // ehsize
    h[0x36] = 56; // phentsize
    h[0x38] = 1; // phnum
    std::fs::write(path, h).unwrap();
}

fn arg(p: &Path, extra: &str) -> String {
    format!("file={}{extra}", p.display())
}

fn one_error_line(r: &RunOutcome) -> String {
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("daxvisor: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line: {r:?}");
    lines[0].to_owned()
}

#[test]
fn every_refused_start_leaves_the_directory_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let existing = d.join("existing.img");
    std::fs::write(&existing, vec![0x5au8; 2 * MIB]).unwrap();
    std::fs::write(d.join("serial.log"), b"an earlier run\n").unwrap();
    let bad_kernel = d.join("broken.elf");
    broken_elf(&bad_kernel);
    let before = listing(d);

    let p = |n: &str| d.join(n).display().to_string();
    let created = arg(&d.join("new.img"), ",size=2M,create=on");
    let extended = arg(&existing, ",size=4M,create=on");
    let too_many: Vec<String> = (0..20)
        .map(|i| arg(&d.join(format!("dev{i}.img")), ",size=2M,create=on"))
        .collect();
    let long_cmdline = format!("exit=0 {}", "x".repeat(600));
    let mut cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "bad kernel",
            vec![
                "--kernel".into(),
                bad_kernel.display().to_string(),
                "--serial".into(),
                p("new-serial.log"),
            ],
            "broken.elf",
        ),
        (
            "command line too long",
            vec![
                "--cmdline".into(),
                long_cmdline,
                "--serial".into(),
                p("serial.log"),
                "--console".into(),
                p("new-console.log"),
            ],
            "command line",
        ),
        (
            "missing pmem after created ones",
            vec![
                "--serial".into(),
                p("new-serial.log"),
                "--pmem".into(),
                arg(&d.join("absent.img"), ""),
            ],
            "absent.img",
        ),
        (
            // Refused with the configuration now (the test guest's boot block), before any file is made.
            "too many devices",
            vec!["--serial".into(), p("new-serial.log")],
            "the built-in test guest takes at most 6",
        ),
    ];
    for (_, args, _) in cases.iter_mut().take(3) {
        for pm in [&created, &extended] {
            args.extend(["--pmem".into(), pm.clone()]);
        }
    }
    // The missing file must come after the ones that are created.
    cases[2].1.rotate_left(2);
    for pm in &too_many {
        cases[3].1.extend(["--pmem".into(), pm.clone()]);
    }
    for (what, args, cause) in &cases {
        let mut all = vec!["run"];
        all.extend(args.iter().map(String::as_str));
        let r = daxvisor(&all);
        assert_eq!(r.code, Some(2), "{what}: {r:?}");
        let line = one_error_line(&r);
        assert!(line.contains(cause), "{what}: {line}");
        assert_eq!(listing(d), before, "{what}: the directory changed");
    }
}

#[test]
fn fifos_and_devices_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let kernel = d.join("broken.elf");
    broken_elf(&kernel);
    let f = fifo.display().to_string();
    let k = kernel.display().to_string();
    let pmem = arg(&fifo, "");
    let cases: [(&str, Vec<&str>); 5] = [
        ("--kernel", vec!["--kernel", &f]),
        ("--initrd", vec!["--kernel", &k, "--initrd", &f]),
        ("--serial", vec!["--serial", &f]),
        ("--pmem", vec!["--pmem", &pmem]),
        ("--kernel", vec!["--kernel", "/dev/zero"]),
    ];
    for (option, args) in cases {
        let mut all = vec!["run"];
        all.extend(args);
        let r = run_with_timeout(
            Command::new(daxvisor_tests::daxvisor_bin()).args(&all),
            Duration::from_secs(30),
        );
        assert_eq!(r.code, Some(2), "{all:?}: {r:?}");
        let line = one_error_line(&r);
        assert!(
            line.contains("FIFO") || line.contains("character device"),
            "{option}: {line}"
        );
    }
}

fn spin_vm(img: &Path, pmem_opts: &str, mode: &str) -> RunningVm {
    RunningVm::spawn(&[
        "run",
        "--pmem",
        &arg(img, pmem_opts),
        "--cmdline",
        &format!("pmem={mode} seed=11"),
    ])
}

#[test]
fn a_second_daxvisor_is_refused_with_the_holders_pid_however_often_it_retries() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let mut vm = spin_vm(&img, ",size=2M,create=on", "write-flush-spin");
    vm.wait_for_line("spinning until killed");
    let holder = format!("pid {} (daxvisor)", vm.pid());
    for attempt in 0..3 {
        for opts in ["", ",readonly=on"] {
            let r = daxvisor(&["run", "--pmem", &arg(&img, opts), "--cmdline", "pmem=write"]);
            assert_eq!(r.code, Some(2), "attempt {attempt}{opts}: {r:?}");
            let line = one_error_line(&r);
            assert!(line.contains(&holder) && line.contains("vm.img"), "{line}");
        }
    }
    vm.signal(libc::SIGTERM);
    let r = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code, Some(143), "{r:?}");
    assert!(
        !r.stderr.contains("foreign process"),
        "a refused second VMM must not even open the file (no lease break):\n{}",
        r.stderr
    );
    assert_eq!(
        pattern_mismatches(&std::fs::read(&img).unwrap(), 11, 2 * MIB),
        0
    );
}

#[test]
fn sigterm_and_sigint_stop_a_writing_guest_cleanly() {
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("vm.img");
        let mut vm = spin_vm(&img, ",size=4M,create=on", "write-loop");
        vm.wait_for_line("pmem0 pass 1 flushed");
        vm.signal(signal);
        let r = vm.finish(Duration::from_secs(60));
        assert_eq!(r.code, Some(status), "signal {signal}: {r:?}");
        for want in [
            "stopping the VM",
            "final fdatasync done id=pmem0",
            "pmem counters id=pmem0",
        ] {
            assert!(r.stderr.contains(want), "missing {want:?}:\n{}", r.stderr);
        }
        assert!(guest_lines(&r.stdout).contains(&"pmem0 pass 1 flushed"));
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(pattern_mismatches(&bytes, 11, 4 * MIB), 0);
    }
}

/// The FUSE file system of `tests/fixtures/slow_fsync_fs.py` (a passthrough view of `under` at `mnt` whose
/// fsync can be made slow), unmounted and stopped on drop.
struct SlowFsyncFs {
    fs: std::process::Child,
    under: PathBuf,
    mnt: PathBuf,
}

impl SlowFsyncFs {
    /// Mount it in `dir`; `None` (after `missing_prerequisite`) where FUSE or fusepy is missing.
    fn mount(dir: &Path) -> Option<SlowFsyncFs> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/slow_fsync_fs.py");
        let (under, mnt) = (dir.join("under"), dir.join("mnt"));
        std::fs::create_dir(&under).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let fs = Command::new(&script)
            .arg(&under)
            .arg(&mnt)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut fs) = fs else {
            missing_prerequisite(&format!("cannot run {}", script.display()));
            return None;
        };
        let mounted = |mnt: &Path| {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let at = format!(" {} ", mnt.display());
            info.lines()
                .any(|l| l.contains(&at) && l.contains(" - fuse"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !mounted(&mnt) {
            if std::time::Instant::now() > deadline || !matches!(fs.try_wait(), Ok(None)) {
                let _ = fs.kill();
                let out = fs.wait_with_output().unwrap();
                missing_prerequisite(&format!(
                    "FUSE mount by {} failed (python3-fusepy, libfuse2, /dev/fuse: scripts/setup-host.sh): {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(SlowFsyncFs { fs, under, mnt })
    }
}

impl Drop for SlowFsyncFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.fs.kill();
        let _ = self.fs.wait();
    }
}

#[test]
fn a_second_sigterm_ends_a_hung_stop_at_once_with_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SlowFsyncFs::mount(dir.path()) else {
        return;
    };
    std::fs::File::create(fs.under.join("vm.img"))
        .unwrap()
        .set_len(2 * MIB as u64)
        .unwrap();
    let mut vm = spin_vm(&fs.mnt.join("vm.img"), ",id=data", "write-flush-spin");
    vm.wait_for_line("spinning until killed");
    // From now on an fsync through the mount takes two minutes: the clean stop's final fdatasync hangs there.
    const SLOW_FSYNC: Duration = Duration::from_secs(120);
    std::fs::write(
        fs.under.join(".slow-fsync"),
        SLOW_FSYNC.as_secs().to_string(),
    )
    .unwrap();
    vm.signal(libc::SIGTERM);
    let entered = fs.under.join(".fsync-entered");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !entered.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stop never reached the final fdatasync"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(vm.running(), "the stop did not hang in the final fdatasync");
    let second = std::time::Instant::now();
    vm.signal(libc::SIGTERM);
    // Generous: the point is that it ends long before the fdatasync it was waiting for.
    let r = vm.finish(SLOW_FSYNC / 4);
    let took = second.elapsed();
    eprintln!("exit {:?} {took:?} after the second SIGTERM", r.code);
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(
        r.stderr.contains("second signal: exiting now"),
        "{}",
        r.stderr
    );
    // It did not wait for the flush: no final fdatasync, no counters.
    for absent in ["final fdatasync done", "pmem counters"] {
        assert!(!r.stderr.contains(absent), "{absent:?}:\n{}", r.stderr);
    }
}

#[test]
fn a_backing_file_shrunk_under_the_vm_is_named_in_the_efault_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shrinks.img");
    let mut vm = spin_vm(&img, ",size=4M,create=on,id=data,guard=log", "write-loop");
    vm.wait_for_line("pmem0 pass 1 flushed");
    // guard=log lets a host open for writing through (logged), and the file shrinks under the guest.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(MIB as u64).unwrap();
    let r = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{r:?}");
    let line = one_error_line(&r);
    for want in [
        "EFAULT",
        "pmem data",
        &img.display().to_string(),
        "guest access at 0x100100000",
        "offset 0x100000",
        "shrank to 1048576 bytes",
    ] {
        assert!(line.contains(want), "missing {want:?} in: {line}");
    }
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: PathBuf, size: &str) -> Option<SmallTmpfs> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "daxvisor-test",
            ])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallTmpfs(at))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_file_system_under_a_sparse_backing_is_named_in_the_efault_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mnt) = SmallTmpfs::mount(dir.path().join("mnt"), "4m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs (root is needed)"
        );
        eprintln!("SKIP: cannot mount a tmpfs here (root is needed)");
        return;
    };
    let img = mnt.0.join("sparse.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let r = daxvisor(&["run", "--pmem", &arg(&img, ""), "--cmdline", "pmem=write"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    let line = one_error_line(&r);
    for want in [
        "EFAULT",
        "pmem pmem0",
        &img.display().to_string(),
        "offset 0x",
        "its file system is full",
    ] {
        assert!(line.contains(want), "missing {want:?} in: {line}");
    }
}

#[test]
fn a_read_only_file_system_and_a_missing_directory_are_named_with_a_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/vm.img");
    let r = daxvisor(&["run", "--pmem", &arg(&missing, ",size=2M,create=on")]);
    assert_eq!(r.code, Some(2), "{r:?}");
    let line = one_error_line(&r);
    assert!(
        line.contains("no-such-dir does not exist") && line.contains("create it first"),
        "{line}"
    );

    let Some(mnt) = SmallTmpfs::mount(dir.path().join("ro"), "4m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs (root is needed)"
        );
        eprintln!("SKIP: cannot mount a tmpfs here (root is needed)");
        return;
    };
    let img = mnt.0.join("vm.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 * MIB as u64)
        .unwrap();
    let remount = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mnt.0)
        .status()
        .unwrap();
    assert!(remount.success());
    let r = daxvisor(&["run", "--pmem", &arg(&img, "")]);
    assert_eq!(r.code, Some(2), "{r:?}");
    let line = one_error_line(&r);
    assert!(
        line.contains("read-only (EROFS)") && line.contains("readonly=on"),
        "{line}"
    );
    let r = daxvisor(&["run", "--pmem", &arg(&img, ",readonly=on")]);
    assert_eq!(r.code, Some(0), "a read-only region on it is fine: {r:?}");
}
