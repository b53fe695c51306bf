//! Lab diagnostics: what the kernel says about a DAX file or a device-DAX node, asked with the real system calls.
//! Busybox cannot show statx attributes or try MAP_SYNC, so the lab scenarios use this (it is built static and
//! shipped in the lab image). On a host without DAX it reports that and fails, which tests/lab.rs also checks.
//!
//!   lab-probe fsdax PATH     create PATH (2 MiB), print its statx attributes, map it MAP_SHARED_VALIDATE|MAP_SYNC,
//!                            write through the mapping, read the bytes back with read(2); exit 0 only if the file
//!                            is DAX and the MAP_SYNC mapping works
//!   lab-probe devdax DEV     print the device's size and alignment from sysfs, map one alignment unit, write and
//!                            read it back through a second mapping; exit 0 when that works
//!   lab-probe pattern PATH SEED LEN
//!                            map the first LEN bytes of PATH (a file or device-DAX) and count the 8-byte words that
//!                            differ from the test guest's pattern for SEED; exit 0 when none does

// Test support: a failed step fails the test that called it, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

const PROBE_LEN: usize = 2 << 20;
const PATTERN: &[u8] = b"daxvisor-lab-probe";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1..).unwrap_or_default() {
        [cmd, path] if cmd == "fsdax" => probe_fsdax(Path::new(path)),
        [cmd, path] if cmd == "devdax" => probe_devdax(Path::new(path)),
        [cmd, path, seed, len] if cmd == "pattern" => check_pattern(Path::new(path), seed, len),
        _ => Err(
            "usage: lab-probe fsdax PATH | lab-probe devdax /dev/daxN.M | lab-probe pattern PATH SEED LEN"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("lab-probe: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe_fsdax(path: &Path) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    file.set_len(PROBE_LEN as u64)
        .map_err(|e| format!("set_len {}: {e}", path.display()))?;

    let (attributes, mask) = statx_attributes(path)?;
    let dax_bit = libc::STATX_ATTR_DAX as u64;
    let dax = attributes & dax_bit != 0;
    println!(
        "statx: {} attributes=0x{attributes:x} attributes_mask=0x{mask:x} STATX_ATTR_DAX={}",
        path.display(),
        if dax { "yes" } else { "no" }
    );

    let map_sync = match Mapping::new(&file, PROBE_LEN, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC)
    {
        Ok(map) => {
            map.write(0, PATTERN);
            // With MAP_SYNC the store is durable once it leaves the CPU caches; read(2) sees it at once either way.
            let mut back = vec![0u8; PATTERN.len()];
            file.read_exact_at(&mut back, 0)
                .map_err(|e| format!("read back {}: {e}", path.display()))?;
            if back != PATTERN {
                return Err(format!("read back {back:?}, wrote {PATTERN:?}"));
            }
            println!("mmap MAP_SHARED_VALIDATE|MAP_SYNC: ok ({PROBE_LEN} bytes, write read back)");
            true
        }
        Err(e) => {
            println!("mmap MAP_SHARED_VALIDATE|MAP_SYNC: {e}");
            false
        }
    };
    match (dax, map_sync) {
        (true, true) => {
            println!("fsdax: {} is DAX and maps with MAP_SYNC", path.display());
            Ok(())
        }
        _ => Err(format!(
            "{} is not usable as fs-dax (STATX_ATTR_DAX={dax}, MAP_SYNC={map_sync})",
            path.display()
        )),
    }
}

fn probe_devdax(dev: &Path) -> Result<(), String> {
    let name = dev
        .file_name()
        .ok_or_else(|| format!("{} names no device", dev.display()))?;
    let sys = Path::new("/sys/bus/dax/devices").join(name);
    let size = read_sysfs_u64(&sys.join("size"))?;
    let align = read_sysfs_u64(&sys.join("align")).unwrap_or(PROBE_LEN as u64);
    println!("devdax: {} size={size} align={align}", dev.display());
    if size == 0 {
        return Err(format!("{} has size 0", dev.display()));
    }
    let len = usize::try_from(align).map_err(|_| format!("align {align} too large"))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    // Device-DAX has no read(2); a second mapping shows the write reached the device, not a private copy.
    let first = Mapping::new(&file, len, libc::MAP_SHARED)?;
    first.write(0, PATTERN);
    drop(first);
    let second = Mapping::new(&file, len, libc::MAP_SHARED)?;
    let back = second.read(0, PATTERN.len());
    if back != PATTERN {
        return Err(format!("second mapping reads {back:?}, wrote {PATTERN:?}"));
    }
    println!("devdax: mmap {len} bytes MAP_SHARED: ok (write seen through a second mapping)");
    Ok(())
}

fn check_pattern(path: &Path, seed: &str, len: &str) -> Result<(), String> {
    let seed: u32 = parse_number(seed).ok_or_else(|| format!("bad seed {seed:?}"))?;
    let len: usize = parse_number(len).ok_or_else(|| format!("bad length {len:?}"))?;
    if len == 0 || !len.is_multiple_of(8) {
        return Err(format!("length {len} must be a positive multiple of 8"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("stat {}: {e}", path.display()))?;
    // Reading a mapping past the end of a file is SIGBUS, not an error.
    if meta.is_file() && meta.len() < len as u64 {
        return Err(format!(
            "{} holds {} bytes, fewer than {len}",
            path.display(),
            meta.len()
        ));
    }
    // A mapping reads files and device-DAX alike (device-DAX has no read(2)).
    let map = Mapping::new(&file, len, libc::MAP_SHARED)?;
    let bytes = map.read(0, len);
    let bad = daxvisor_tests::pattern_mismatches(&bytes, seed, len);
    println!(
        "pattern: {} seed={seed} len={len} mismatched words={bad}",
        path.display()
    );
    if bad == 0 {
        Ok(())
    } else {
        Err(format!(
            "{bad} words of {} differ from the pattern",
            path.display()
        ))
    }
}

/// Decimal or 0x-prefixed hexadecimal.
fn parse_number<T: TryFrom<u64>>(s: &str) -> Option<T> {
    let v = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => s.parse().ok()?,
    };
    T::try_from(v).ok()
}

fn read_sysfs_u64(path: &Path) -> Result<u64, String> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    s.trim()
        .parse()
        .map_err(|e| format!("parse {} ({:?}): {e}", path.display(), s.trim()))
}

fn statx_attributes(path: &Path) -> Result<(u64, u64), String> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: statx is plain data; all-zero is a valid value for it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: cpath is a valid NUL-terminated string and stx a valid, writable statx buffer for the call.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            0,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(format!(
            "statx {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok((stx.stx_attributes, stx.stx_attributes_mask))
}

/// A shared read-write mapping of the start of a file, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize, flags: libc::c_int) -> Result<Mapping, String> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file we hold open; nothing aliases it yet.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: the range is inside the mapping (checked above) and the mapping is writable.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr.add(offset), bytes.len()) }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: the range is inside the mapping (checked above) and the mapping is readable.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr(), len) }
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len describe a mapping made in Mapping::new and not unmapped since.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}
