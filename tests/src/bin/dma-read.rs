//! The guest side of the lab's passthrough scenario (shipped in the Linux guest image as `dma-read`): a device
//! DMAs into a file on the DAX-mounted pmem through an `O_DIRECT` read into a mapping of that file.
//!
//!   dma-read offset FILE        print the byte offset of FILE's first block on its block device (FIEMAP): on a
//!                               DAX-mounted virtio-pmem, the region offset the guest agent pins
//!   dma-read read DEV FILE LEN  map the first LEN bytes of FILE shared, read LEN bytes from the start of DEV with
//!                               O_DIRECT straight into that mapping (the device writes the file's pages by DMA),
//!                               msync, and print the first 16 bytes the mapping now holds

// Test support: a failed step fails the scenario that called it, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;

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
            // SAFETY: a fresh shared mapping of the file, used only through raw pointers below.
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
        _ => {
            eprintln!("usage: dma-read offset FILE | dma-read read DEV FILE LEN");
            ExitCode::from(2)
        }
    }
}
