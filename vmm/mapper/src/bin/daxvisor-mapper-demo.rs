//! Diagnostic for the DAX lab: the seed scenario of the layout-lease debate, on a real file.
//!
//! Usage: daxvisor-mapper-demo [--force] <file-on-fsdax-mount | /dev/daxX.Y> [size-MiB, default 4]
//!
//! The file is created; an existing file is refused unless `--force` is given (its contents are overwritten).
//!
//! For a file: maps it MAP_SHARED_VALIDATE|MAP_SYNC when the filesystem allows it (fs-dax), takes an exclusive
//! lease on the first half, prepares and pins it through the mapper, writes a marker through the mapping, asks
//! the mapper to punch that range (refused: ETXTBSY naming the pin's owner) and checks the marker is intact; then
//! does a bare kernel punch (fallocate, no mapper) on the second half while it is mapped and mlocked and checks
//! that the mapping now reads zeros. For a device-DAX node: layout leases and layout changes are refused with
//! EOPNOTSUPP. Prints one `key: value` line per fact and exits 0 only if every fact is the expected one.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use daxvisor_mapper::{
    probe, BackingKind, ChannelNotifier, HostMapping, LeaseMode, MapOptions, Mapper, MapperError,
    RegionDesc,
};

const MARK_PINNED: u8 = 0xa5;
const MARK_BARE: u8 = 0xb6;
const USAGE: &str = "usage: daxvisor-mapper-demo [--force] <file-on-fsdax-mount | /dev/daxX.Y> [size-MiB, default 4]

Shows, on a real file, what the mapper adds over the bare kernel: a range pinned through the mapper cannot be
punched (ETXTBSY naming the holder, data intact), while a bare fallocate punches a mapped, mlocked range and
the mapping reads zeros. On a device-DAX node, layout leases and changes are refused (EOPNOTSUPP).

The file is created and filled; an existing regular file is refused unless --force is given (it is then
overwritten). Prints one `key: value` line per fact; exits 0 when every fact is the expected one, 1 when one
is not, 2 on bad usage.";

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
        .add_region(RegionDesc::new(
            Arc::new(f),
            0,
            2 << 20,
            BackingKind::DevDax,
        ))
        .map_err(|e| e.to_string())?;
    let owner = m.add_owner("owner");
    let lease = errno_line(m.acquire(owner, region, 0, 0, LeaseMode::Exclusive));
    let punch = errno_line(m.punch(None, region, 0, 4096));
    println!("devdax: {lease}");
    println!("devdax-punch: {punch}");
    Ok(lease == "EOPNOTSUPP" && punch == "EOPNOTSUPP")
}

fn file(path: &str, mib: u64, force: bool) -> Result<bool, String> {
    let size = mib << 20;
    let half = size / 2;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .create_new(!force)
        .truncate(false)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{path} exists: give --force to overwrite it")
            }
            _ => format!("open {path}: {e}"),
        })?;
    // Real data everywhere, so the bare punch has something to destroy.
    f.write_all_at(&vec![0x11u8; size as usize], 0)
        .map_err(|e| format!("write: {e}"))?;
    f.set_len(size).map_err(|e| format!("set_len: {e}"))?;
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    let kind = probe(&f, Path::new("/sys"))
        .map_err(|e| format!("probe: {e}"))?
        .kind;
    let opts = MapOptions {
        want_sync: kind == BackingKind::FsDax,
        ..MapOptions::default()
    };
    let map = Arc::new(HostMapping::map(&f, 0, size, opts).map_err(|e| format!("mmap: {e}"))?);
    println!("backing: {kind}");
    println!("map-sync: {}", if map.is_sync() { "yes" } else { "no" });
    let f = Arc::new(f);

    let m = Mapper::new(Arc::new(ChannelNotifier::new().0), None);
    let owner = m.add_owner("dma-context");
    let region = m
        .add_region(RegionDesc::new(f.clone(), 0, size, kind).with_mapping(map.clone()))
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
        let _ = map.write(i, MARK_PINNED);
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
        .all(|i| map.read(i) == Some(MARK_PINNED));
    println!("data-intact: {}", if intact { "yes" } else { "no" });

    // The bare kernel on the second half: mapped, populated, mlocked, marked; fallocate punches it anyway.
    let locked = map.lock(half as usize, half as usize).is_ok();
    println!("bare-mlock: {}", if locked { "ok" } else { "failed" });
    for i in (half as usize..size as usize).step_by(4096) {
        let _ = map.write(i, MARK_BARE);
    }
    let bare = daxvisor_mapper::punch(&f, half, half);
    let bare_ok = bare.is_ok();
    println!(
        "bare-punch: {}",
        match bare {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    );
    let zeroed = (half as usize..size as usize)
        .step_by(4096)
        .all(|i| map.read(i) == Some(0));
    println!("bare-mapping-zeroed: {}", if zeroed { "yes" } else { "no" });

    m.owner_exit(owner).map_err(|e| e.to_string())?;
    Ok(pinned && punch_ok && intact && bare_ok && zeroed)
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let force = args.iter().any(|a| a == "--force");
    args.retain(|a| a != "--force");
    if let Some(bad) = args.iter().find(|a| a.starts_with('-')) {
        eprintln!("unknown option {bad}\n{USAGE}");
        return ExitCode::from(2);
    }
    let Some(path) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mib = match args.get(1).map(|s| s.parse::<u64>()) {
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
        file(path, mib, force)
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
