//! End-to-end: virtio-pmem backed by host files, driven by the test guest on real KVM.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daxvisor_tests::{
    daxvisor, daxvisor_as_nobody, daxvisor_bin, guest_lines, mapped_rss_kib, mapped_smaps_kib,
    pattern_mismatches, run_with_timeout, share_read_only,
};
use std::ffi::OsStr;

const MIB: usize = 1 << 20;

fn pmem_arg(path: &std::path::Path, extra: &str) -> String {
    format!("file={}{extra}", path.display())
}

#[test]
fn the_pattern_the_guest_writes_is_in_the_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let r = daxvisor(&[
        "run",
        "--pmem",
        &pmem_arg(&img, ",size=4M,create=on"),
        "--cmdline",
        "pmem=write seed=7",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines = guest_lines(&r.stdout);
    for want in [
        "pmem0 wrote 4194304 bytes seed 7",
        "pmem0 flush ok",
        "pmem0 readback ok",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{}", r.stdout);
    }
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), 4 * MIB);
    assert_eq!(pattern_mismatches(&bytes, 7, 4 * MIB), 0);
    assert!(
        r.stderr.contains("kind=regular"),
        "backing kind is logged: {}",
        r.stderr
    );
}

#[test]
fn a_flushed_pattern_survives_sigkill_of_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let (mut child, seen) = spawn_spinning_vm(&img, "size=8M,create=on", "seed=3");
    // SIGKILL: no destructor, no exit handler, no chance for the VMM to sync anything after the ack.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.iter().any(|l| l.ends_with("pmem0 flush acknowledged")),
        "no flush ack: {seen:?}"
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        pattern_mismatches(&bytes, 3, 8 * MIB),
        0,
        "flushed data lost after SIGKILL"
    );
}

#[test]
fn readonly_and_discard_writes_leave_the_file_byte_for_byte_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("golden.img");
    let golden: Vec<u8> = (0..2 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&img, &golden).unwrap();
    for (opt, expect) in [
        (",readonly=on", "read back unchanged"),
        (",discard_writes=on", "read back the pattern"),
    ] {
        let r = daxvisor(&[
            "run",
            "--pmem",
            &pmem_arg(&img, opt),
            "--cmdline",
            "pmem=readonly-write seed=9",
        ]);
        assert_eq!(r.code, Some(0), "{opt}: {r:?}");
        let lines = guest_lines(&r.stdout);
        assert!(
            lines.iter().any(|l| l.ends_with(expect)),
            "{opt}: expected {expect:?}:\n{}",
            r.stdout
        );
        assert!(
            std::fs::read(&img).unwrap() == golden,
            "{opt} modified the backing file"
        );
    }
}

#[test]
fn readonly_writes_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    std::fs::write(&img, vec![0u8; 2 * MIB]).unwrap();
    let r = daxvisor(&[
        "run",
        "--pmem",
        &pmem_arg(&img, ",readonly=on"),
        "--cmdline",
        "pmem=readonly-write size=4K",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // 4 KiB of 8-byte stores = 512 writes, each an MMIO exit on the read-only slot, each dropped.
    assert!(
        r.stderr.contains("readonly_writes_dropped=512"),
        "{}",
        r.stderr
    );
}

#[test]
fn malformed_requests_leave_the_device_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.img");
    let r = daxvisor(&[
        "run",
        "--pmem",
        &pmem_arg(&img, ",size=2M,create=on"),
        "--cmdline",
        "pmem=malformed",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines = guest_lines(&r.stdout);
    let cases: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("pmem0 malformed ") && l.contains("good flush ok"))
        .collect();
    assert_eq!(cases.len(), 11, "{}", r.stdout);
    assert!(
        lines.contains(&"pmem0 malformed: 11 cases done, device still serving"),
        "{}",
        r.stdout
    );
}

#[test]
fn bad_pmem_input_is_refused_before_the_guest_starts_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = d.join("small.img");
    std::fs::write(&small, vec![7u8; 2 * MIB]).unwrap();
    let empty = d.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let odd = d.join("odd.img");
    std::fs::write(&odd, vec![0u8; 3 * MIB]).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (pmem_arg(&d.join("missing.img"), ""), "No such file"),
        (pmem_arg(d, ""), "directory"),
        (pmem_arg(&fifo, ""), "FIFO"),
        (pmem_arg(&empty, ""), "size"),
        (pmem_arg(&small, ",size=0"), "size"),
        (pmem_arg(&small, ",size=4M"), "larger than the file"),
        (pmem_arg(&odd, ""), "2 MiB"),
        (pmem_arg(&small, ",colour=blue"), "colour"),
        ("size=2M".to_string(), "file"),
    ];
    let before: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for (arg, want) in &cases {
        let r = run_with_timeout(
            Command::new(daxvisor_bin()).args(["run", "--serial", "none", "--pmem", arg]),
            Duration::from_secs(30),
        );
        assert_eq!(r.code, Some(2), "--pmem {arg}: {r:?}");
        // Parse errors come from the command-line parser ("error: ..."), the rest from the VM start.
        let errors: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("daxvisor: ") || l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "--pmem {arg}: {}", r.stderr);
        assert!(
            errors[0].to_lowercase().contains(&want.to_lowercase()),
            "--pmem {arg}: {}",
            errors[0]
        );
    }
    let after: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a refused start created or removed files");
    assert_eq!(std::fs::read(&small).unwrap(), vec![7u8; 2 * MIB]);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[test]
fn no_permission_on_the_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root-only.img");
    std::fs::write(&img, vec![0u8; 2 * MIB]).unwrap();
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    share_read_only(dir.path());
    let pmem = pmem_arg(&img, "");
    let Some(r) = daxvisor_as_nobody(&["run", "--serial", "none", "--pmem", &pmem].map(OsStr::new))
    else {
        return;
    };
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        vec![0u8; 2 * MIB],
        "the refused start changed the file"
    );
}

/// Start a VM whose guest writes its pattern, flushes and then spins; return it, with the guest's output lines,
/// once the guest is spinning.
fn spawn_spinning_vm(
    img: &std::path::Path,
    pmem_opts: &str,
    guest_opts: &str,
) -> (std::process::Child, Vec<String>) {
    let pmem = pmem_arg(img, &format!(",{pmem_opts}"));
    let cmdline = format!("pmem=write-flush-spin {guest_opts}");
    let mut child = Command::new(daxvisor_bin())
        .args(["run", "--pmem", &pmem, "--cmdline", &cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            let spinning = l.ends_with("spinning until killed");
            seen.push(l);
            if spinning {
                return (child, seen);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the guest never reached its spin loop: {seen:?}");
}

#[test]
fn the_host_guard_sees_a_foreign_open_of_a_running_vms_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("guarded.img");
    let (mut child, _) = spawn_spinning_vm(&img, "size=2M,create=on", "");
    // This process is the foreign opener: the open waits for the guard's answer (a read-only open is allowed
    // under every policy, the default deny included).
    let t0 = Instant::now();
    let opened = std::fs::File::open(&img);
    let held_for = t0.elapsed();
    assert!(opened.is_ok(), "{opened:?}");
    // Give the guard a moment to log, then stop the VM and read what it said.
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("foreign open held for {held_for:?}");
    assert!(stderr.contains("host guard armed"), "{stderr}");
    assert!(
        stderr.contains("host guard: foreign open of a backing file allowed")
            && stderr.contains("mode=read outcome=allowed"),
        "the read-only open was not seen or not let through:\n{stderr}"
    );
}

#[test]
fn prefault_makes_the_whole_region_resident_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut resident = Vec::new();
    for prefault in ["off", "on"] {
        let img = dir.path().join(format!("prefault-{prefault}.img"));
        // The guest writes 4 KiB, flushes and spins: everything else resident was populated by daxvisor.
        let opts = format!("size=16M,create=on,prefault={prefault}");
        let (mut child, _) = spawn_spinning_vm(&img, &opts, "size=4K");
        let rss = mapped_rss_kib(child.id(), &img);
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        resident.push((rss.expect("daxvisor maps the backing file"), stderr));
    }
    let (off, ref off_log) = resident[0];
    let (on, ref on_log) = resident[1];
    eprintln!("resident KiB of the 16 MiB region: prefault=off {off}, prefault=on {on}");
    // The guest's 4 KiB write brings in one page: 4 KiB, or the whole 2 MiB page where the file system has
    // large folios (the mapping asks for huge pages).
    assert!(
        off <= 2048,
        "without prefault only the page the guest touched: {off} KiB"
    );
    assert_eq!(on, 16 * 1024, "with prefault every page of the region");
    assert!(!off_log.contains("prefaulted"), "{off_log}");
    let prefaulted = on_log.find("pmem region prefaulted").expect(on_log);
    let started = on_log.find("starting VM").expect(on_log);
    assert!(
        prefaulted < started,
        "prefault runs before the guest: {on_log}"
    );
    assert!(on_log.contains("how=MADV_POPULATE_WRITE"), "{on_log}");
}

#[test]
fn prefault_on_a_huge_page_tmpfs_maps_the_region_with_2_mib_entries() {
    // tmpfs with huge=always: the backing can hold 2 MiB pages, and daxvisor's mapping asks for them.
    let fs = SmallTmpfs::mount_with("size=64M,huge=always");
    let img = fs.0.path().join("huge.img");
    let (mut child, _) = spawn_spinning_vm(&img, "size=16M,create=on,prefault=on", "size=4K");
    let huge = mapped_smaps_kib(child.id(), &img, "ShmemPmdMapped:");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("KiB of the 16 MiB region mapped with 2 MiB entries: {huge:?}");
    assert_eq!(
        huge,
        Some(16 * 1024),
        "every 2 MiB of the region in one entry"
    );
    assert!(log.contains("huge_pages=true"), "{log}");
    // KVM's own tables: pre-faulted where KVM offers it, and said so where it does not.
    assert!(
        log.contains("pre-faulted in KVM") || log.contains("KVM_PRE_FAULT_MEMORY not offered"),
        "{log}"
    );
}

/// A small tmpfs mounted on a fresh directory, unmounted on drop.
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    fn mount(size: &str) -> SmallTmpfs {
        Self::mount_with(&format!("size={size}"))
    }

    /// A tmpfs with mount options `opts`.
    fn mount_with(opts: &str) -> SmallTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "daxvisor-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs ({opts}) failed: this test needs root (CI runs as root)"
        );
        SmallTmpfs(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_failed_prefault_on_a_full_file_system_refuses_the_start_and_gives_the_blocks_back() {
    use std::os::unix::fs::MetadataExt;
    let fs = SmallTmpfs::mount("4M");
    let img = fs.0.path().join("sparse.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let r = run_with_timeout(
        Command::new(daxvisor_bin()).args([
            "run",
            "--serial",
            "none",
            "--pmem",
            &pmem_arg(&img, ",prefault=on"),
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("daxvisor: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    assert!(
        errors[0].contains("prefault=on failed") && errors[0].contains("no space left"),
        "{}",
        errors[0]
    );
    assert!(!r.stderr.contains("starting VM"), "{}", r.stderr);
    let m = std::fs::metadata(&img).unwrap();
    assert_eq!(m.len(), 8 * MIB as u64, "the file keeps its length");
    assert_eq!(
        m.blocks(),
        0,
        "the blocks the prefault filled are given back"
    );
    let names: Vec<_> = std::fs::read_dir(fs.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("sparse.img")]);
}

/// The panic policy: a panic in any VMM thread (injected here through the debug-build-only
/// `DAXVISOR_TEST_PANIC`) stops the VM cleanly: one line naming the thread, the final flush, exit 1.
#[test]
fn a_panic_in_any_thread_stops_the_vm_cleanly_naming_the_thread() {
    // The service threads, the vCPU and the region's flush worker (a device thread, started by the device crate).
    for thread in ["agent", "reclaim", "api", "vcpu0", "pmem-flush-pmem0"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("vm.img");
        let sock = dir.path().join("api.sock");
        let r = run_with_timeout(
            Command::new(daxvisor_bin())
                .args(["run", "--pmem"])
                .arg(pmem_arg(&img, ",size=4M,create=on"))
                .args(["--cmdline", "pmem=write-loop seed=5", "--api-socket"])
                .arg(&sock)
                .env("DAXVISOR_TEST_PANIC", thread),
            Duration::from_secs(120),
        );
        assert_eq!(r.code, Some(1), "{thread}: {r:?}");
        let needle = format!("thread '{thread}' panicked: injected by DAXVISOR_TEST_PANIC");
        assert!(r.stderr.contains(&needle), "{thread}: {}", r.stderr);
        assert!(
            r.stderr.contains("final fdatasync done"),
            "{thread}: the stop was not clean: {}",
            r.stderr
        );
        assert!(!sock.exists(), "{thread}: the API socket was left behind");
    }
}
