//! Diagnostic for the DAX lab: the seed scenario of the layout-lease debate, on a real file.
//!
//! Usage: daxvisor-mapper-demo <file-on-fsdax-mount | /dev/daxX.Y> [size-MiB, default 4]
//!
//! For a file: maps it MAP_SHARED_VALIDATE|MAP_SYNC when the filesystem allows it (fs-dax), takes an exclusive
//! lease on the first half, prepares and pins it through the mapper, writes a marker through the mapping, asks
//! the mapper to punch that range (refused: ETXTBSY naming the pin's owner) and checks the marker is intact; then
//! does a bare kernel punch (fallocate, no mapper) on the second half while it is mapped and mlocked and checks
//! that the mapping now reads zeros. For a device-DAX node: layout leases and layout changes are refused with
//! EOPNOTSUPP. Prints one `key: value` line per fact and exits 0 only if every fact is the expected one.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::process::ExitCode;
use std::sync::Arc;

use daxvisor::mapper::pin::{mlock, populate_write};
use daxvisor::mapper::{
    ChannelNotifier, LeaseMode, Mapper, MapperError, OwnedMapping, RecordingDma, RegionDesc,
};
use daxvisor::pmem::BackingKind;

const STATX_ATTR_DAX: u64 = 0x0020_0000;
const MARK_PINNED: u8 = 0xa5;
const MARK_BARE: u8 = 0xb6;

fn is_dax_file(f: &std::fs::File) -> bool {
    // SAFETY: statx is plain data; statx() writes only into it.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out-pointer.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS,
            &mut sx,
        )
    };
    rc == 0
        && sx.stx_attributes_mask & STATX_ATTR_DAX != 0
        && sx.stx_attributes & STATX_ATTR_DAX != 0
}

fn errno_line(r: Result<impl std::fmt::Debug, MapperError>) -> String {
    match r {
        Ok(v) => format!("ok ({v:?})"),
        Err(e) => e.errno_name().to_string(),
    }
}

fn devdax(path: &str) -> Result<bool, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    let m = Mapper::new(Arc::new(ChannelNotifier::new().0), None);
    let region = m
        .add_region(RegionDesc {
            file: Arc::new(f),
            file_offset: 0,
            size: 2 << 20,
            kind: BackingKind::DevDax,
            mapping: None,
            iova: 0,
        })
        .map_err(|e| e.to_string())?;
    let owner = m.add_owner("owner");
    let lease = errno_line(m.acquire(owner, region, 0, 0, LeaseMode::Exclusive));
    let punch = errno_line(m.punch(None, region, 0, 4096));
    println!("devdax: {lease}");
    println!("devdax-punch: {punch}");
    Ok(lease == "EOPNOTSUPP" && punch == "EOPNOTSUPP")
}

fn file(path: &str, mib: u64) -> Result<bool, String> {
    let size = mib << 20;
    let half = size / 2;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    // Real data everywhere, so the bare punch has something to destroy.
    f.write_all_at(&vec![0x11u8; size as usize], 0)
        .map_err(|e| format!("write: {e}"))?;
    f.set_len(size).map_err(|e| format!("set_len: {e}"))?;
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    let kind = if is_dax_file(&f) {
        BackingKind::FsDax
    } else {
        BackingKind::Regular
    };
    let map = OwnedMapping::new(&f, 0, size as usize, true).map_err(|e| format!("mmap: {e}"))?;
    println!("backing: {kind}");
    println!("map-sync: {}", if map.is_sync() { "yes" } else { "no" });
    let f = Arc::new(f);

    let m = Mapper::new(
        Arc::new(ChannelNotifier::new().0),
        Some(Arc::new(RecordingDma::new())),
    );
    let owner = m.add_owner("dma-context");
    let region = m
        .add_region(RegionDesc {
            file: f.clone(),
            file_offset: 0,
            size,
            kind,
            mapping: Some(map.host()),
            iova: 0,
        })
        .map_err(|e| e.to_string())?;
    m.acquire(owner, region, 0, half, LeaseMode::Exclusive)
        .map_err(|e| e.to_string())?;
    m.prepare(owner, region, 0, half, &mut |_| {})
        .map_err(|e| format!("prepare: {e}"))?;
    let pinned = match m.pin(owner, region, 0, half) {
        Ok(_) => {
            println!("mapper-pin: ok");
            true
        }
        Err(e) => {
            println!("mapper-pin: {} ({e})", e.errno_name());
            false
        }
    };
    for i in (0..half as usize).step_by(4096) {
        map.write(i, MARK_PINNED);
    }
    let punch = m.punch(None, region, 0, half);
    let punch_ok = match &punch {
        Err(MapperError::TextBusy { holder, .. }) => {
            println!("mapper-punch: ETXTBSY holder={holder}");
            *holder == owner
        }
        Err(e) => {
            println!("mapper-punch: {}", e.errno_name());
            false
        }
        Ok(_) => {
            println!("mapper-punch: ok");
            false
        }
    };
    if let Err(e) = &punch {
        println!("mapper-punch-error: {e}");
    }
    let intact = (0..half as usize)
        .step_by(4096)
        .all(|i| map.read(i) == MARK_PINNED);
    println!("data-intact: {}", if intact { "yes" } else { "no" });

    // The bare kernel on the second half: mapped, populated, mlocked, marked; fallocate punches it anyway.
    let (b_addr, b_len) = (map.host().addr + half as usize, half as usize);
    populate_write(b_addr, b_len).map_err(|e| format!("populate: {e}"))?;
    let locked = mlock(b_addr, b_len).is_ok();
    println!("bare-mlock: {}", if locked { "ok" } else { "failed" });
    for i in (half as usize..size as usize).step_by(4096) {
        map.write(i, MARK_BARE);
    }
    // SAFETY: fallocate on our own fd over the second half.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            half as libc::off_t,
            half as libc::off_t,
        )
    };
    let bare_ok = rc == 0;
    println!(
        "bare-punch: {}",
        if bare_ok {
            "ok".to_string()
        } else {
            std::io::Error::last_os_error().to_string()
        }
    );
    let zeroed = (half as usize..size as usize)
        .step_by(4096)
        .all(|i| map.read(i) == 0);
    println!("bare-mapping-zeroed: {}", if zeroed { "yes" } else { "no" });

    m.owner_exit(owner).map_err(|e| e.to_string())?;
    Ok(pinned && punch_ok && intact && bare_ok && zeroed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!(
            "usage: daxvisor-mapper-demo <file-on-fsdax-mount | /dev/daxX.Y> [size-MiB, default 4]"
        );
        return ExitCode::from(2);
    };
    let mib = match args.get(2).map(|s| s.parse::<u64>()) {
        None => 4,
        Some(Ok(n)) if n >= 2 && n % 2 == 0 && n <= 1 << 20 => n,
        Some(_) => {
            eprintln!("size must be an even number of MiB, at least 2");
            return ExitCode::from(2);
        }
    };
    let is_chr = std::fs::metadata(path)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    let r = if is_chr {
        devdax(path)
    } else {
        file(path, mib)
    };
    match r {
        Ok(true) => {
            println!("result: pass");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("result: fail");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("error: {e}");
            println!("result: fail");
            ExitCode::FAILURE
        }
    }
}
