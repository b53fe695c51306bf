//! The memory kernels of the pmem bandwidth benchmark. The benchmark's host side includes this very file
//! (`vmm/benches/pmem_bandwidth.rs`), so guest and host run the same instructions over the same mapping.

/// Fill `len` bytes (a multiple of 8) at `addr` with `value` using `rep stosq` (fast-string stores, what
/// memset uses for large sizes).
///
/// # Safety
/// `[addr, addr + len)` must be mapped writable, and nothing else may hold a reference into it.
pub unsafe fn fill(addr: u64, len: u64, value: u64) {
    // SAFETY: the caller guarantees the range; rep stosq writes exactly len/8 qwords from addr upwards.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") len / 8 => _,
            inout("rdi") addr => _,
            in("rax") value,
            options(nostack, preserves_flags)
        )
    }
}

/// Read every qword of `[addr, addr + len)` (`len` rounded down to 32) and return their wrapping sum: a read
/// pass whose result depends on every load, so none can be skipped.
///
/// # Safety
/// `[addr, addr + len)` must be mapped readable.
pub unsafe fn sum(addr: u64, len: u64) -> u64 {
    let len = len & !31;
    if len == 0 {
        return 0;
    }
    let (a, b): (u64, u64);
    // SAFETY: the caller guarantees the range; the loop loads len/8 qwords from addr upwards and writes nothing.
    unsafe {
        core::arch::asm!(
            "2:",
            "add {a}, [{p}]",
            "add {b}, [{p} + 8]",
            "add {a}, [{p} + 16]",
            "add {b}, [{p} + 24]",
            "add {p}, 32",
            "sub {n}, 32",
            "jnz 2b",
            p = inout(reg) addr => _,
            n = inout(reg) len => _,
            a = inout(reg) 0u64 => a,
            b = inout(reg) 0u64 => b,
            options(nostack, readonly)
        )
    }
    a.wrapping_add(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_writes_exactly_the_range_and_sum_reads_it() {
        let mut buf = vec![1u64; 1024];
        let addr = buf.as_mut_ptr() as u64;
        // SAFETY: qwords 8..1000 of buf, owned here.
        unsafe { super::fill(addr + 64, 992 * 8, 3) };
        assert!(buf[..8].iter().chain(&buf[1000..]).all(|&q| q == 1));
        assert!(buf[8..1000].iter().all(|&q| q == 3));
        // SAFETY: all of buf; sum rounds 1024*8 down to 32 (already a multiple).
        assert_eq!(unsafe { super::sum(addr, 1024 * 8) }, 32 + 992 * 3);
        // SAFETY: as above; 30 bytes round down to nothing.
        assert_eq!(unsafe { super::sum(addr, 30) }, 0);
    }
}
