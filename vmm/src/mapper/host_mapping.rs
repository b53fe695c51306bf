//! Host mappings of backing files. The mapper only needs the address and length of the mapping the VMM made
//! (`HostMapping`); `OwnedMapping` is a small RAII mmap used by the demo, the benchmarks and the tests, and shows
//! how a region of an fs-dax file is mapped: MAP_SHARED_VALIDATE|MAP_SYNC first, plain MAP_SHARED when the kernel
//! refuses (no DAX: EOPNOTSUPP).

use std::io;
use std::os::fd::AsRawFd;

/// The host virtual address range of region offset 0..len.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMapping {
    pub addr: usize,
    pub len: usize,
}

/// A shared read/write mapping of part of a file, unmapped on drop.
#[derive(Debug)]
pub struct OwnedMapping {
    addr: usize,
    len: usize,
    sync: bool,
}

impl OwnedMapping {
    /// Maps `len` bytes of `file` at `offset` shared and writable; `want_sync` tries MAP_SYNC first.
    pub fn new(file: &impl AsRawFd, offset: u64, len: usize, want_sync: bool) -> io::Result<Self> {
        let fd = file.as_raw_fd();
        if want_sync {
            if let Ok(addr) = mmap(fd, offset, len, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC) {
                return Ok(OwnedMapping {
                    addr,
                    len,
                    sync: true,
                });
            }
        }
        let addr = mmap(fd, offset, len, libc::MAP_SHARED)?;
        Ok(OwnedMapping {
            addr,
            len,
            sync: false,
        })
    }

    pub fn host(&self) -> HostMapping {
        HostMapping {
            addr: self.addr,
            len: self.len,
        }
    }

    /// Whether the mapping is MAP_SYNC (stores are durable once flushed from the CPU cache).
    pub fn is_sync(&self) -> bool {
        self.sync
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads byte `i` through the mapping (volatile: the file may change underneath).
    pub fn read(&self, i: usize) -> u8 {
        assert!(i < self.len);
        // SAFETY: `i < len` and the mapping is live for `self`'s lifetime.
        unsafe { std::ptr::read_volatile(self.as_ptr().add(i)) }
    }

    pub fn write(&self, i: usize, v: u8) {
        assert!(i < self.len);
        // SAFETY: as in `read`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.as_ptr().add(i), v) }
    }
}

fn mmap(fd: i32, offset: u64, len: usize, flags: i32) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL); no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as usize)
}

impl Drop for OwnedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range this struct mapped; nothing else refers to it after drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
