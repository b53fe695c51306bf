//! Getting a guest's first instruction to run: recognise the kernel image, load it, build what its boot
//! protocol expects in guest memory, and say where each vCPU starts.
//!
//! - [`image`]: which kind of image a file is (bzImage, Linux ELF vmlinux, freestanding test guest ELF).
//! - [`linux`]: the Linux 64-bit boot protocol (zero page, e820, command line, initrd).
//! - [`testguest`]: the daxvisor boot ABI (`proto::boot`) and the test guest embedded in this binary.
//! - [`long_mode`]: the 64-bit entry state both share.

pub mod image;
pub mod linux;
pub mod long_mode;
pub mod testguest;

use std::path::PathBuf;

/// Where the boot vCPU starts and with which pointer arguments.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub rip: u64,
    pub rsp: u64,
    /// Linux: boot_params.
    pub rsi: u64,
    /// Test guest: BootInfo.
    pub rdi: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is not a bzImage or a 64-bit ELF (first bytes {magic:02x?})")]
    UnknownFormat { path: PathBuf, magic: Vec<u8> },
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("test guest: {0}")]
    TestGuestLimits(String),
    #[error("this daxvisor was built without the test guest; pass --kernel")]
    NoTestGuest,
    #[error("writing boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    LongMode(#[from] long_mode::LongModeError),
}
