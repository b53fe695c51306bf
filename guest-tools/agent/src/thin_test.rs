//! The extent arithmetic, and freezing and GETFSMAP on a real ext4 and XFS on loop devices (needs root,
//! losetup, mkfs.ext4, e2fsck, mkfs.xfs and xfs_repair; without them the tests say so and pass, or fail under
//! CI=true).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use super::*;
use crate::freeze;
use crate::fsmap::{self, Extent};

const MIB: u64 = 1 << 20;

#[test]
fn free_extents_become_region_ranges_aligned_inward_clipped_and_filtered() {
    let free = [
        // Unaligned both ends: in the region [8292, 20430), which shrinks to the one page [12K, 16K).
        Extent {
            start: 4096 + 100,
            len: 16384 - 4096 - 100 - 50,
        },
        // Shorter than a granule once aligned: dropped.
        Extent {
            start: 20000,
            len: 3000,
        },
        // Runs past the region's end: clipped.
        Extent {
            start: 60 * 1024,
            len: 64 * 1024,
        },
    ];
    // The device's byte 0 is the region's byte 4096.
    let r = device_ranges(&free, 4096, 100 * 1024, 4096, 0);
    assert_eq!(
        r,
        vec![
            Range {
                offset: 12288,
                len: 4096
            },
            Range {
                offset: 64 * 1024,
                len: 36 * 1024
            },
        ]
    );
    // min_size drops the short ones; a 2 MiB granule keeps only the whole huge pages.
    assert_eq!(
        device_ranges(&free, 4096, 100 * 1024, 4096, 16 * 1024),
        vec![Range {
            offset: 64 * 1024,
            len: 36 * 1024
        }]
    );
    let big = [Extent {
        start: MIB,
        len: 5 * MIB,
    }];
    assert_eq!(
        device_ranges(&big, 0, 64 * MIB, 2 * MIB, 0),
        vec![Range {
            offset: 2 * MIB,
            len: 4 * MIB
        }]
    );
    // Offsets near u64::MAX neither wrap nor escape the region.
    let edge = [Extent {
        start: u64::MAX - 10,
        len: 100,
    }];
    assert!(device_ranges(&edge, 4096, 64 * MIB, 4096, 0).is_empty());
    assert!(device_ranges(&big, 64 * MIB, 64 * MIB, 4096, 0).is_empty());
    assert_eq!(punch_granule(region_kind::RAM), 2 * MIB);
    assert_eq!(punch_granule(region_kind::FS_DAX), 4096);
}

#[test]
fn region_of_finds_the_window_holding_the_device() {
    let mk = |region, guest_addr, size, kind| RegionInfo {
        region,
        guest_addr,
        size,
        kind,
        flags: 0,
        name: agent::name_field("r"),
    };
    let regions = [
        mk(1, 0x1_0000_0000, 64 * MIB, region_kind::FS_DAX),
        mk(2, 0x1_0400_0000, 64 * MIB, region_kind::DEV_DAX),
    ];
    let (r, base) = region_of(&regions, 0x1_0400_0000).unwrap();
    assert_eq!((r.region, base), (2, 0));
    let (r, base) = region_of(&regions, 0x1_0000_1000).unwrap();
    assert_eq!((r.region, base), (1, 0x1000));
    assert!(region_of(&regions, 0x2_0000_0000).is_none());
    assert_eq!(parse_size("2M").unwrap(), 2 * MIB);
    assert_eq!(parse_size("64KiB").unwrap(), 65536);
    assert!(parse_size("2Q").is_err());
    assert!(parse_size("99999999999T").is_err());
    assert_eq!(parse_every("90").unwrap(), Some(Duration::from_secs(90)));
    assert_eq!(parse_every("10m").unwrap(), Some(Duration::from_secs(600)));
    assert_eq!(parse_every("off").unwrap(), None);
    assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
    assert_eq!(unescape("/mnt/x\\"), "/mnt/x\\");
}

/// A loop-mounted ext4 in a temporary directory, unmounted and detached on drop.
struct LoopExt4 {
    dir: tempfile::TempDir,
    dev: String,
}

impl LoopExt4 {
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        // A probe write thread may still hold a file open for a moment.
        for _ in 0..50 {
            let mounted = std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .contains(self.mnt().to_str().unwrap_or("?"));
            if !mounted {
                break;
            }
            let _ = Command::new("umount")
                .arg(self.mnt())
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn missing_prerequisite(what: &str) -> Option<LoopExt4> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "prerequisite missing under CI: {what}"
    );
    eprintln!("SKIP: {what}");
    None
}

/// 64 MiB ext4 (4 KiB blocks) on a loop device, mounted.
fn loop_ext4() -> Option<LoopExt4> {
    loop_fs("ext4", 64 * MIB)
}

/// A filesystem made by `mkfs.KIND` on a loop device of `size` bytes, mounted.
fn loop_fs(kind: &str, size: u64) -> Option<LoopExt4> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing_prerequisite("not root (loop mounts need it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let args: &[&str] = if kind == "ext4" {
        &["-q", "-F", "-b", "4096"]
    } else {
        &["-q", "-f"]
    };
    let ok = Command::new(format!("mkfs.{kind}"))
        .args(args)
        .arg(&img)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return missing_prerequisite(&format!("mkfs.{kind} failed or is missing"));
    }
    let out = match Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => return missing_prerequisite("losetup failed (no loop devices?)"),
    };
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let fs = LoopExt4 { dir, dev };
    std::fs::create_dir(fs.mnt()).unwrap();
    let mounted = Command::new("mount")
        .args([&fs.dev, fs.mnt().to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        return missing_prerequisite(&format!("mount of a loop {kind} failed"));
    }
    Some(fs)
}

fn write_file(p: &Path, len: usize, byte: u8) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.sync_all().unwrap();
}

/// Whether a write to the filesystem completes within `wait` (it blocks while frozen).
fn write_completes(dir: &Path, wait: Duration) -> bool {
    let (tx, rx) = channel();
    let p = dir.join("probe");
    std::thread::spawn(move || {
        write_file(&p, 4096, 7);
        let _ = tx.send(());
    });
    rx.recv_timeout(wait).is_ok()
}

#[test]
fn getfsmap_on_ext4_lists_the_freed_space_and_none_of_the_files() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let dev = std::fs::metadata(&mnt).unwrap().dev();
    for i in 0..12 {
        write_file(&mnt.join(format!("f{i}")), 4 * MIB as usize, 0x40 + i);
    }
    let keep = mnt.join("keep");
    write_file(&keep, MIB as usize, 0x99);
    let before: u64 = {
        let dir = std::fs::File::open(&mnt).unwrap();
        fsmap::free_extents(dir.as_fd(), dev)
            .unwrap()
            .iter()
            .map(|e| e.len)
            .sum()
    };
    for i in 0..12 {
        std::fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
    }
    let frozen = freeze::freeze(&mnt).unwrap();
    let free = fsmap::free_extents(frozen.dir().as_fd(), dev).unwrap();
    frozen.thaw().unwrap();
    let after: u64 = free.iter().map(|e| e.len).sum();
    assert!(
        after >= before + 40 * MIB,
        "freeing 48 MiB of files grew the free space from {before} to {after} bytes"
    );
    // GETFSMAP agrees with statfs (ext4 reports the same free block count both ways).
    // SAFETY: a zeroed statvfs is a valid buffer; the path is a NUL-terminated string we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(after, st.f_bfree * st.f_frsize);
    // The kept file's blocks are not free: its data is intact after the free ranges are zeroed through the
    // block device (what a punch does to them), and e2fsck finds nothing wrong.
    {
        let frozen = freeze::freeze(&mnt).unwrap();
        let free = fsmap::free_extents(frozen.dir().as_fd(), dev).unwrap();
        let mut devf = std::fs::OpenOptions::new()
            .write(true)
            .open(&fs.dev)
            .unwrap();
        for r in device_ranges(&free, 0, 64 * MIB, 4096, 0) {
            use std::io::{Seek, SeekFrom};
            devf.seek(SeekFrom::Start(r.offset)).unwrap();
            devf.write_all(&vec![0u8; r.len as usize]).unwrap();
        }
        devf.sync_all().unwrap();
        frozen.thaw().unwrap();
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg("echo 3 > /proc/sys/vm/drop_caches")
        .status();
    assert_eq!(std::fs::read(&keep).unwrap(), vec![0x99u8; MIB as usize]);
    let umount = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(umount.success());
    let fsck = Command::new("e2fsck")
        .args(["-fn", &fs.dev])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck after zeroing the free ranges: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// The same on XFS (300 MiB, its smallest): GETFSMAP lists the freed space, zeroing the free ranges through the
/// block device leaves the kept file and `xfs_repair -n` clean.
#[test]
fn getfsmap_on_xfs_lists_the_freed_space_and_none_of_the_files() {
    let Some(fs) = loop_fs("xfs", 300 * MIB) else {
        return;
    };
    let mnt = fs.mnt();
    let dev = std::fs::metadata(&mnt).unwrap().dev();
    let keep = mnt.join("keep");
    write_file(&keep, MIB as usize, 0x99);
    let free_now = || -> u64 {
        let dir = std::fs::File::open(&mnt).unwrap();
        fsmap::free_extents(dir.as_fd(), dev)
            .unwrap()
            .iter()
            .map(|e| e.len)
            .sum()
    };
    for i in 0..12 {
        write_file(&mnt.join(format!("f{i}")), 4 * MIB as usize, 0x40 + i);
    }
    let before = free_now();
    for i in 0..12 {
        std::fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
    }
    {
        let frozen = freeze::freeze(&mnt).unwrap();
        let free = fsmap::free_extents(frozen.dir().as_fd(), dev).unwrap();
        let after: u64 = free.iter().map(|e| e.len).sum();
        assert!(
            after >= before + 40 * MIB,
            "freeing 48 MiB of files grew the free space from {before} to {after} bytes"
        );
        let mut devf = std::fs::OpenOptions::new()
            .write(true)
            .open(&fs.dev)
            .unwrap();
        for r in device_ranges(&free, 0, 300 * MIB, 4096, 0) {
            use std::io::{Seek, SeekFrom};
            devf.seek(SeekFrom::Start(r.offset)).unwrap();
            devf.write_all(&vec![0u8; r.len as usize]).unwrap();
        }
        devf.sync_all().unwrap();
        frozen.thaw().unwrap();
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg("echo 3 > /proc/sys/vm/drop_caches")
        .status();
    assert_eq!(std::fs::read(&keep).unwrap(), vec![0x99u8; MIB as usize]);
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    let repair = Command::new("xfs_repair")
        .args(["-n", &fs.dev])
        .output()
        .unwrap();
    assert!(
        repair.status.success(),
        "xfs_repair -n after zeroing the free ranges: {}",
        String::from_utf8_lossy(&repair.stderr)
    );
}

#[test]
fn a_frozen_filesystem_is_thawed_when_its_guard_drops_in_a_panic() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let m = mnt.clone();
    let panicked = std::thread::spawn(move || {
        let _frozen = freeze::freeze(&m).unwrap();
        assert!(
            !write_completes(&m, Duration::from_millis(300)),
            "a write went through while frozen"
        );
        panic!("while frozen");
    })
    .join();
    assert!(panicked.is_err());
    assert!(
        write_completes(&mnt, Duration::from_secs(20)),
        "still frozen after the panic"
    );
    // A second freeze of the same filesystem is refused (EBUSY) and leaves it thawed.
    let first = freeze::freeze(&mnt).unwrap();
    assert!(freeze::freeze(&mnt).is_err());
    drop(first);
    assert!(write_completes(&mnt, Duration::from_secs(20)));
}

/// Run as a child by the next test: freezes `THIN_CHILD_MOUNT`, says so, and waits to be killed.
#[test]
#[ignore = "a helper process of a_frozen_filesystem_is_thawed_when_the_agent_gets_sigterm"]
fn child_freezes_and_waits() {
    let Ok(m) = std::env::var("THIN_CHILD_MOUNT") else {
        return;
    };
    let _frozen = freeze::freeze(Path::new(&m)).unwrap();
    println!("frozen");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_frozen_filesystem_is_thawed_when_the_agent_gets_sigterm() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "thin::tests::child_freezes_and_waits",
            "--ignored",
            "--nocapture",
        ])
        .env("THIN_CHILD_MOUNT", &mnt)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("frozen"))),
        "the child did not freeze"
    );
    assert!(!write_completes(&mnt, Duration::from_millis(300)));
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        write_completes(&mnt, Duration::from_secs(20)),
        "still frozen after the agent's SIGTERM"
    );
}

/// How the scripted host answers offers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostMode {
    /// Zeroes each offered range on the block device (what a punch does).
    Punch,
    /// Refuses every offer (ERANGE).
    Refuse,
    /// Never answers an offer or a close.
    Silent,
}

/// What the scripted host saw.
#[derive(Debug, Default)]
struct HostLog {
    owners_opened: u32,
    offers: Vec<(u64, u64)>,
    /// For each offer and for the close: whether the filesystem was frozen then (a write did not complete).
    frozen_at_offers: Vec<bool>,
    frozen_at_close: Option<bool>,
}

/// A host speaking the real protocol over a socket pair; the agent's end becomes a [`Port`].
fn scripted_host(
    mode: HostMode,
    dev: String,
    mnt: PathBuf,
) -> (
    std::sync::Arc<crate::port::Port>,
    std::thread::JoinHandle<HostLog>,
    std::os::unix::net::UnixStream,
) {
    use daxvisor_proto::agent::{FrameReader, HelloReply, ReadEvent, MAX_FRAME};
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    let (agent_end, mut host) = UnixStream::pair().unwrap();
    let w = std::fs::File::from(OwnedFd::from(agent_end.try_clone().unwrap()));
    let hangup = agent_end.try_clone().unwrap();
    let r = std::fs::File::from(OwnedFd::from(agent_end));
    let handle = std::thread::spawn(move || {
        let mut log = HostLog::default();
        let mut reader = FrameReader::new();
        let mut buf = [0u8; 4096];
        let send = |host: &mut UnixStream, m: &Message<'_>, id: u32| {
            let mut b = [0u8; MAX_FRAME];
            let n = agent::encode(m, id, &mut b).unwrap();
            host.write_all(&b[..n]).unwrap();
        };
        loop {
            while let Some(ReadEvent::Frame(f)) = reader.next_event() {
                let id = f.request_id;
                let reply = match f.message {
                    Message::Hello(_) => Some(Message::HelloReply(HelloReply {
                        version: 1,
                        reserved: 0,
                        max_payload: 4096,
                        session: 3,
                    })),
                    Message::OpenOwner(_) => {
                        log.owners_opened += 1;
                        Some(Message::OwnerOpened { owner: 9 })
                    }
                    Message::OfferReclaim(o) => {
                        log.frozen_at_offers
                            .push(!write_completes(&mnt, Duration::from_millis(200)));
                        log.offers.push((o.offset, o.len));
                        match mode {
                            HostMode::Silent => None,
                            HostMode::Refuse => Some(Message::Error(agent::ErrorReply {
                                errno: errno::ERANGE,
                                reserved: 0,
                                holder: 0,
                            })),
                            HostMode::Punch => {
                                let mut d =
                                    std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
                                d.seek(SeekFrom::Start(o.offset)).unwrap();
                                d.write_all(&vec![0u8; o.len as usize]).unwrap();
                                d.sync_all().unwrap();
                                Some(Message::Ok { value: 1 })
                            }
                        }
                    }
                    Message::CloseOwner { .. } => {
                        log.frozen_at_close =
                            Some(!write_completes(&mnt, Duration::from_millis(200)));
                        (mode != HostMode::Silent).then_some(Message::Ok { value: 0 })
                    }
                    _ => Some(Message::Ok { value: 0 }),
                };
                if let Some(m) = reply {
                    send(&mut host, &m, id);
                }
            }
            match host.read(&mut buf) {
                Ok(0) | Err(_) => return log,
                Ok(n) => {
                    reader.push(&buf[..n]);
                }
            }
        }
    });
    let (port, _notices) = crate::port::Port::start(r, w).unwrap();
    (port, handle, hangup)
}

fn loop_region(kind: u32) -> RegionInfo {
    RegionInfo {
        region: 1,
        guest_addr: 0x1_0000_0000,
        size: 64 * MIB,
        kind,
        flags: 0,
        name: agent::name_field("pmem0"),
    }
}

fn loop_mount(fs: &LoopExt4) -> PmemMount {
    PmemMount {
        mount: fs.mnt(),
        dev: std::fs::metadata(fs.mnt()).unwrap().dev(),
        device: fs.dev.clone(),
        phys: 0x1_0000_0000,
    }
}

fn options(timeout: Duration) -> Options {
    Options {
        mount: None,
        min_size: 64 * 1024,
        timeout,
    }
}

/// The whole reclaim against a host that punches (zeroes) what is offered: every offer and the close come
/// while the filesystem is frozen, the kept file and the filesystem are intact afterwards, and the filesystem
/// is writable again.
#[test]
fn reclaim_offers_only_free_space_while_frozen_and_thaws_after_the_close() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let keep = mnt.join("keep");
    write_file(&keep, 3 * MIB as usize, 0x77);
    for i in 0..12 {
        write_file(&mnt.join(format!("junk{i}")), 4 * MIB as usize, 0x11);
    }
    for i in 0..12 {
        std::fs::remove_file(mnt.join(format!("junk{i}"))).unwrap();
    }
    let (port, host, hangup) = scripted_host(HostMode::Punch, fs.dev.clone(), mnt.clone());
    let mut report = Report::default();
    reclaim_one(
        &port,
        &[loop_region(region_kind::FS_DAX)],
        &loop_mount(&fs),
        &options(Duration::from_secs(30)),
        &mut report,
    )
    .unwrap();
    assert!(write_completes(&mnt, Duration::from_secs(20)), "not thawed");
    drop(port);
    hangup.shutdown(std::net::Shutdown::Both).unwrap();
    let log = host.join().unwrap();
    assert_eq!(log.owners_opened, 1);
    assert!(!log.offers.is_empty(), "{log:?}");
    assert!(log.frozen_at_offers.iter().all(|f| *f), "{log:?}");
    assert_eq!(log.frozen_at_close, Some(true), "{log:?}");
    assert_eq!(report.ranges_offered, log.offers.len() as u64);
    assert_eq!(report.bytes_accepted, report.bytes_offered);
    assert_eq!(
        report.bytes_offered,
        log.offers.iter().map(|o| o.1).sum::<u64>()
    );
    assert!(report.bytes_offered >= 40 * MIB, "{report:?}");
    assert!(report.frozen_us > 0);
    let _ = Command::new("sh")
        .arg("-c")
        .arg("echo 3 > /proc/sys/vm/drop_caches")
        .status();
    assert_eq!(
        std::fs::read(&keep).unwrap(),
        vec![0x77u8; 3 * MIB as usize]
    );
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    let fsck = Command::new("e2fsck")
        .args(["-fn", &fs.dev])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// A host that never answers: the run stops offering at its bound, thaws anyway and reports the timeout.
#[test]
fn a_host_that_never_answers_gets_a_timeout_and_the_filesystem_is_thawed() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    write_file(&mnt.join("junk"), 8 * MIB as usize, 0x11);
    std::fs::remove_file(mnt.join("junk")).unwrap();
    let (port, host, hangup) = scripted_host(HostMode::Silent, fs.dev.clone(), mnt.clone());
    let mut report = Report::default();
    let e = reclaim_one(
        &port,
        &[loop_region(region_kind::REGULAR)],
        &loop_mount(&fs),
        &options(Duration::from_secs(1)),
        &mut report,
    )
    .unwrap_err();
    assert!(matches!(e, ThinError::Timeout(_)), "{e}");
    assert!(write_completes(&mnt, Duration::from_secs(20)), "not thawed");
    assert_eq!(report.bytes_accepted, 0);
    drop(port);
    hangup.shutdown(std::net::Shutdown::Both).unwrap();
    let log = host.join().unwrap();
    assert_eq!(log.offers.len(), 1, "{log:?}");
    assert_eq!(log.frozen_at_close, Some(true));
}

/// A host that refuses every offer (a range the guest does not own, say): each refusal is reported, the run
/// ends without error and the filesystem is thawed.
#[test]
fn refused_offers_are_reported_and_the_filesystem_is_thawed() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let (port, host, hangup) = scripted_host(HostMode::Refuse, fs.dev.clone(), mnt.clone());
    let mut report = Report::default();
    reclaim_one(
        &port,
        &[loop_region(region_kind::FS_DAX)],
        &loop_mount(&fs),
        &options(Duration::from_secs(30)),
        &mut report,
    )
    .unwrap();
    assert!(report.bytes_offered > 0);
    assert_eq!(report.bytes_accepted, 0);
    assert!(write_completes(&mnt, Duration::from_secs(20)), "not thawed");
    drop(port);
    hangup.shutdown(std::net::Shutdown::Both).unwrap();
    let log = host.join().unwrap();
    assert_eq!(log.frozen_at_close, Some(true));
}

/// A device-DAX backing cannot be punched: nothing is opened or frozen.
#[test]
fn a_device_dax_backing_is_not_frozen() {
    let Some(fs) = loop_ext4() else { return };
    let mnt = fs.mnt();
    let (port, host, hangup) = scripted_host(HostMode::Punch, fs.dev.clone(), mnt.clone());
    let mut report = Report::default();
    let e = reclaim_one(
        &port,
        &[loop_region(region_kind::DEV_DAX)],
        &loop_mount(&fs),
        &options(Duration::from_secs(5)),
        &mut report,
    )
    .unwrap_err();
    assert!(matches!(e, ThinError::DeviceDax(1)), "{e}");
    assert_eq!(report.frozen_us, 0);
    assert!(write_completes(&mnt, Duration::from_secs(20)));
    drop(port);
    hangup.shutdown(std::net::Shutdown::Both).unwrap();
    let log = host.join().unwrap();
    assert_eq!(log.owners_opened, 0);
    assert!(log.offers.is_empty());
}
