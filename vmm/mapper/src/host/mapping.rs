//! Mapping a window of a backing file into the host: MAP_SHARED_VALIDATE|MAP_SYNC on fs-dax (falling back to
//! MAP_SHARED with a warning where the kernel refuses), MAP_PRIVATE for copy-on-write views, at an address
//! aligned as the caller asks (2 MiB for huge pages and guest memslots, more for device-DAX), with
//! MADV_HUGEPAGE where the caller says the backing can use transparent huge pages.
//!
//! [`HostMapping`] owns the mapping and unmaps it on drop. The mapper keeps an `Arc` of it per region, so the
//! addresses it hands to mlock and to the DMA mapper are always a live mapping of the region's own window:
//! nothing safe can give it a wild address.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use super::memory;

/// How to map a window of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// PROT_READ|PROT_WRITE (else PROT_READ).
    pub writable: bool,
    /// MAP_PRIVATE|MAP_NORESERVE: writes stay in the host's memory, the file is never written.
    pub private: bool,
    /// Try MAP_SHARED_VALIDATE|MAP_SYNC first (fs-dax).
    pub want_sync: bool,
    /// Alignment of the host address (a power of two; at least the page size).
    pub align: u64,
    /// Advise MADV_HUGEPAGE on a shared mapping: page-cache files whose file system has large folios and
    /// shmem (tmpfs, memfd) allowed to `advise` then fault whole 2 MiB pages in and map them with one entry,
    /// which lets KVM map the guest's 2 MiB pages with one entry too. Only advice: refused, it is ignored.
    pub huge_pages: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            writable: true,
            private: false,
            want_sync: false,
            align: 4096,
            huge_pages: false,
        }
    }
}

/// A live host mapping of `[file_offset, file_offset + len)` of a file, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    addr: NonNull<u8>,
    len: usize,
    flags: libc::c_int,
    map_sync: bool,
    writable: bool,
    huge_advised: bool,
}

// SAFETY: the mapping is plain memory owned by this value; its address is only handed to the kernel (KVM,
// madvise, mlock, VFIO) or accessed through volatile reads and writes. Moving or sharing the owner between threads
// creates no aliasing Rust references.
unsafe impl Send for HostMapping {}
// SAFETY: as above; every method takes &self and reads plain fields or does volatile single-byte accesses.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `file` at `file_offset` as `opts` says.
    pub fn map(file: &File, file_offset: u64, len: u64, opts: MapOptions) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let align = usize::try_from(opts.align.max(4096))
            .ok()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let reserve_len = len
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // Reserve address space with room to align, then place the file mapping inside it.
        // SAFETY: anonymous PROT_NONE reservation at a kernel-chosen address; touches no existing mapping.
        let reserve = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserve == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = reserve as usize;
        let aligned = start.div_ceil(align) * align;
        let unmap = |addr: usize, len: usize| {
            if len > 0 {
                // SAFETY: the range lies inside our own reservation.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        };
        let prot = if opts.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let map_fixed = |flags: libc::c_int| {
            // SAFETY: MAP_FIXED over [aligned, aligned+len), inside our reservation and used by nothing else.
            let p = unsafe {
                libc::mmap(
                    aligned as *mut libc::c_void,
                    len,
                    prot,
                    flags | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };

        let mut result = Err(io::Error::from_raw_os_error(libc::EINVAL));
        let mut flags = 0;
        let mut map_sync = false;
        if opts.want_sync && !opts.private {
            flags = libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC;
            result = map_fixed(flags);
            match &result {
                Ok(()) => map_sync = true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    tracing::warn!(
                        "MAP_SYNC refused ({e}); falling back to MAP_SHARED: durability now needs fdatasync on every flush"
                    );
                }
                Err(_) => {}
            }
        }
        if !map_sync {
            flags = if opts.private {
                libc::MAP_PRIVATE | libc::MAP_NORESERVE
            } else {
                libc::MAP_SHARED
            };
            result = map_fixed(flags);
        }
        // Give back the alignment slack on both sides (and everything on failure).
        match result {
            Ok(()) => {
                unmap(start, aligned - start);
                unmap(aligned + len, start + reserve_len - (aligned + len));
                let addr = NonNull::new(aligned as *mut u8)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
                let huge_advised = opts.huge_pages
                    && !opts.private
                    && match memory::advise_huge_pages(aligned, len) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!("MADV_HUGEPAGE refused ({e}); mapping with base pages");
                            false
                        }
                    };
                Ok(HostMapping {
                    addr,
                    len,
                    flags,
                    map_sync,
                    writable: opts.writable,
                    huge_advised,
                })
            }
            Err(e) => {
                unmap(start, reserve_len);
                Err(e)
            }
        }
    }

    /// Host virtual address of the first byte.
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping is MAP_SYNC (stores are durable once flushed from the CPU cache).
    pub fn is_sync(&self) -> bool {
        self.map_sync
    }

    /// Whether the kernel took MADV_HUGEPAGE for the mapping.
    pub fn is_huge_advised(&self) -> bool {
        self.huge_advised
    }

    /// Whether the mapping is writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Whether the mapping is MAP_PRIVATE (written pages are anonymous copies; the file is never written).
    pub fn is_private(&self) -> bool {
        // The mapping type is the low two bits; MAP_SHARED_VALIDATE (3) includes MAP_PRIVATE's bit.
        self.flags & libc::MAP_SHARED_VALIDATE == libc::MAP_PRIVATE
    }

    /// The mmap flags in words, as logged.
    pub fn flags_str(&self) -> String {
        let f = self.flags;
        let mut parts = Vec::new();
        if f & libc::MAP_SHARED_VALIDATE == libc::MAP_SHARED_VALIDATE {
            parts.push("MAP_SHARED_VALIDATE");
        } else if f & libc::MAP_SHARED != 0 {
            parts.push("MAP_SHARED");
        } else if f & libc::MAP_PRIVATE != 0 {
            parts.push("MAP_PRIVATE");
        }
        if f & libc::MAP_SYNC != 0 {
            parts.push("MAP_SYNC");
        }
        if f & libc::MAP_NORESERVE != 0 {
            parts.push("MAP_NORESERVE");
        }
        parts.join("|")
    }

    /// `[off, off+len)` of the mapping as an address range; EINVAL when it does not lie inside.
    fn span(&self, off: usize, len: usize) -> io::Result<(usize, usize)> {
        match off.checked_add(len) {
            Some(end) if end <= self.len && len > 0 => Ok((self.addr() + off, len)),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Whether [`HostMapping::populate`] faults pages in writable: on a shared writable mapping. A read-only
    /// mapping can only be populated for reading, and a private (copy-on-write) one is populated for reading
    /// too: a write populate would copy every page of the file into anonymous memory before the guest wrote any.
    pub fn populates_for_write(&self) -> bool {
        self.writable && self.flags & libc::MAP_PRIVATE == 0
    }

    /// Faults `[off, off+len)` in without touching its data: writable (allocating blocks or pages) when
    /// [`HostMapping::populates_for_write`], else readable.
    pub fn populate(&self, off: usize, len: usize) -> io::Result<()> {
        let (addr, len) = self.span(off, len)?;
        if self.populates_for_write() {
            memory::populate_write(addr, len)
        } else {
            memory::populate_read(addr, len)
        }
    }

    /// Locks `[off, off+len)` resident and faults it in writable, in one pass.
    pub fn lock(&self, off: usize, len: usize) -> io::Result<()> {
        let (addr, len) = self.span(off, len)?;
        memory::populate_and_lock(addr, len)
    }

    /// Undoes [`HostMapping::lock`] on `[off, off+len)`.
    pub fn unlock(&self, off: usize, len: usize) {
        if let Ok((addr, len)) = self.span(off, len) {
            memory::munlock(addr, len);
        }
    }

    /// Reads byte `i` through the mapping (volatile: the file may change underneath). None past the end.
    pub fn read(&self, i: usize) -> Option<u8> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `i < len` and the mapping is live for `self`'s lifetime.
        Some(unsafe { std::ptr::read_volatile(self.addr.as_ptr().add(i)) })
    }

    /// Writes byte `i` through the mapping; false past the end or on a read-only mapping.
    pub fn write(&self, i: usize, v: u8) -> bool {
        if i >= self.len || !self.writable {
            return false;
        }
        // SAFETY: as in `read`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.addr.as_ptr().add(i), v) };
        true
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` created and this value owns; nothing uses it after drop.
        let rc = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!("munmap failed: {}", io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::*;
    use std::io::Write;

    /// The VmFlags line of the mapping at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range.and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            }) {
                inside = (a..b).contains(&addr);
            } else if inside && line.starts_with("VmFlags:") {
                return line.to_owned();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn huge_pages_are_advised_on_shared_mappings_only() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        let huge = |private| MapOptions {
            align: 2 << 20,
            private,
            huge_pages: true,
            ..MapOptions::default()
        };
        let shared = HostMapping::map(&f, 0, 4 << 20, huge(false)).unwrap();
        assert!(shared.is_huge_advised());
        // "hg": VM_HUGEPAGE, what MADV_HUGEPAGE sets.
        assert!(
            vm_flags(shared.addr()).contains(" hg"),
            "{}",
            vm_flags(shared.addr())
        );
        let private = HostMapping::map(&f, 0, 4 << 20, huge(true)).unwrap();
        assert!(!private.is_huge_advised());
        assert!(!vm_flags(private.addr()).contains(" hg"));
        let plain = HostMapping::map(&f, 0, 4 << 20, MapOptions::default()).unwrap();
        assert!(!vm_flags(plain.addr()).contains(" hg"));
    }

    #[test]
    fn maps_a_window_at_an_offset_aligned_and_sees_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        let mut data = vec![0u8; 3 << 20];
        data[(1 << 20) + 5] = 0xab;
        f.write_all(&data).unwrap();
        let m = HostMapping::map(
            &f,
            1 << 20,
            2 << 20,
            MapOptions {
                align: 2 << 20,
                ..MapOptions::default()
            },
        )
        .unwrap();
        assert_eq!(m.addr() % (2 << 20), 0);
        assert_eq!(m.read(5), Some(0xab));
        assert_eq!(m.read(2 << 20), None);
        assert!(m.write(6, 1));
        assert_eq!(m.flags_str(), "MAP_SHARED");
        assert!(!m.is_sync(), "tmp is not DAX");
        // Offsets and alignments that cannot be mapped are refused.
        assert!(HostMapping::map(&f, 1, 4096, MapOptions::default()).is_err());
        let bad_align = MapOptions {
            align: 3 << 20,
            ..MapOptions::default()
        };
        assert!(HostMapping::map(&f, 0, 4096, bad_align).is_err());
    }
}
