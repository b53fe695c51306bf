//! The guest side of the lab's passthrough scenario (shipped in the Linux guest image as `dma-read`): a device
//! DMAs into a file on the DAX-mounted pmem through an `O_DIRECT` read into a mapping of that file.
//!
//!   dma-read offset FILE        print the byte offset of FILE's first block on its block device (FIEMAP): on a
//!                               DAX-mounted virtio-pmem, the region offset the guest agent pins
//!   dma-read read DEV FILE LEN  map the first LEN bytes of FILE shared, read LEN bytes from the start of DEV with
//!                               O_DIRECT straight into that mapping (the device writes the file's pages by DMA),
//!                               msync, and print the first 16 bytes the mapping now holds
//!   dma-read loop DEV FILE LEN STOP
//!                               until the file STOP exists or SIGTERM: fill the mapping with 'x', read LEN bytes
//!                               of DEV by O_DIRECT into it (each round the next LEN-sized slot of DEV), and check
//!                               every 16-byte line against what the device holds there (the lab's NVMe names
//!                               each line's own byte offset: "dv" and 13 digits). A line of zeros is a range the
//!                               host punched (not corruption); 'x' left after a read that succeeded, or any
//!                               other byte, is. Prints each failed or zeroed read as it happens and a summary at
//!                               the end; exits 1 if any read was corrupt

// Test support: a failed step fails the scenario that called it, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; 1],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
const FIEMAP_FLAG_SYNC: u32 = 1;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("offset") if args.len() == 3 => {
            let f = OpenOptions::new().read(true).open(&args[2]).unwrap();
            let mut m = Fiemap {
                start: 0,
                length: u64::MAX,
                flags: FIEMAP_FLAG_SYNC,
                mapped_extents: 0,
                extent_count: 1,
                reserved: 0,
                extents: [FiemapExtent::default()],
            };
            // SAFETY: FIEMAP fills the struct it is given, sized for the one extent it asks for.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m) };
            assert_eq!(rc, 0, "FIEMAP: {}", std::io::Error::last_os_error());
            assert_eq!(m.mapped_extents, 1, "no extent: write the file first");
            println!("{}", m.extents[0].physical);
            ExitCode::SUCCESS
        }
        Some("read") if args.len() == 5 => {
            let (dev, len, p) = open_dev_and_map(&args);
            // SAFETY: the mapping is `len` bytes long; the device writes it by DMA during the call.
            let n = unsafe { libc::pread(dev.as_raw_fd(), p, len, 0) };
            assert_eq!(
                n,
                len as isize,
                "O_DIRECT read: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: same mapping.
            assert_eq!(unsafe { libc::msync(p, len, libc::MS_SYNC) }, 0);
            // SAFETY: at least 16 bytes of the mapping, read after the DMA finished.
            let head = unsafe { std::slice::from_raw_parts(p as *const u8, 16) };
            println!(
                "read {n} bytes by DMA; the mapping starts {:?}",
                String::from_utf8_lossy(head)
            );
            ExitCode::SUCCESS
        }
        Some("loop") if args.len() == 6 => {
            let (dev, len, p) = open_dev_and_map(&args);
            read_loop(&dev, p, len, &args[5])
        }
        _ => {
            eprintln!(
                "usage: dma-read offset FILE | dma-read read DEV FILE LEN | dma-read loop DEV FILE LEN STOP"
            );
            ExitCode::from(2)
        }
    }
}

/// `DEV FILE LEN` of `read` and `loop`: the device opened for O_DIRECT reads, LEN, and FILE's first LEN bytes
/// mapped shared.
fn open_dev_and_map(args: &[String]) -> (std::fs::File, usize, *mut libc::c_void) {
    let len: usize = args[4].parse().unwrap();
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args[2])
        .unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args[3])
        .unwrap();
    (dev, len, map_shared(&file, len))
}

/// A shared read-write mapping of the first `len` bytes of `file`, for the life of the process.
fn map_shared(file: &std::fs::File, len: usize) -> *mut libc::c_void {
    // SAFETY: a fresh shared mapping of the file, used only through raw pointers by the caller.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// What one read left in the buffer.
#[derive(Debug, PartialEq)]
enum Check {
    Right,
    /// Some lines are zeros (the host punched there), the rest right.
    Zeroed,
    /// The first wrong line: its offset in the buffer and what it held.
    Corrupt(usize, String),
}

fn check(buf: &[u8], dev_off: u64) -> Check {
    let mut zeroed = false;
    for (i, line) in buf.chunks(16).enumerate() {
        let want = format!("dv{:013}\n", dev_off + (i as u64) * 16);
        if line == want.as_bytes() {
            continue;
        }
        if line.iter().all(|&b| b == 0) {
            zeroed = true;
            continue;
        }
        return Check::Corrupt(i * 16, String::from_utf8_lossy(line).into_owned());
    }
    if zeroed {
        Check::Zeroed
    } else {
        Check::Right
    }
}

fn read_loop(dev: &std::fs::File, p: *mut libc::c_void, len: usize, stop: &str) -> ExitCode {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    // SAFETY: lseek on an open descriptor.
    let size = unsafe { libc::lseek(dev.as_raw_fd(), 0, libc::SEEK_END) }.max(0) as u64;
    let slots = (size / len as u64).max(1);
    let (mut reads, mut right, mut zeroed, mut failed, mut corrupt) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    println!("dma-read loop: reading {len} bytes at a time from {slots} slots of the device");
    while !STOP.load(Ordering::Relaxed) && !std::path::Path::new(stop).exists() {
        let dev_off = (reads % slots) * len as u64;
        reads += 1;
        // SAFETY: the mapping is `len` bytes long; poisoned first so a read that did not land is seen.
        unsafe { std::ptr::write_bytes(p as *mut u8, b'x', len) };
        // SAFETY: the mapping is `len` bytes long; the device writes it by DMA during the call.
        let n = unsafe { libc::pread(dev.as_raw_fd(), p, len, dev_off as libc::off_t) };
        if n != len as isize {
            failed += 1;
            println!(
                "dma-read loop: read {reads} at {dev_off}: failed ({n}): {}",
                std::io::Error::last_os_error()
            );
            continue;
        }
        // SAFETY: the whole mapping, read after the DMA finished.
        let buf = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        match check(buf, dev_off) {
            Check::Right => right += 1,
            Check::Zeroed => {
                zeroed += 1;
                println!("dma-read loop: read {reads} at {dev_off}: some lines zeroed (punched by the host)");
            }
            Check::Corrupt(at, held) => {
                corrupt += 1;
                println!("dma-read loop: read {reads} at {dev_off}: CORRUPT at +{at}: {held:?}");
            }
        }
    }
    println!(
        "dma-read loop: {reads} reads: {right} right, {zeroed} zeroed, {failed} failed, {corrupt} corrupt"
    );
    if corrupt == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(from: u64, n: u64) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("dv{:013}\n", from + i * 16).into_bytes())
            .collect()
    }

    #[test]
    fn a_read_is_right_zeroed_where_punched_and_corrupt_where_stale_or_poisoned() {
        assert_eq!(check(&lines(4096, 8), 4096), Check::Right);
        let mut b = lines(4096, 8);
        b[16..32].fill(0);
        assert_eq!(check(&b, 4096), Check::Zeroed);
        assert!(
            matches!(check(&lines(0, 8), 4096), Check::Corrupt(0, _)),
            "another slot's data"
        );
        let mut b = lines(4096, 8);
        b[32..48].fill(b'x');
        assert!(
            matches!(check(&b, 4096), Check::Corrupt(32, _)),
            "the DMA did not land"
        );
    }
}
