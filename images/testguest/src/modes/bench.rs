//! `pmem=bench`: time writes into the pmem region with the TSC, for the write-bandwidth benchmark. The host side
//! converts cycles to time (the guest does not know the TSC frequency) and compares with a host memcpy into the
//! same mapping.

use super::pmem::flush_or_fail;
use crate::cmdline::Options;
use crate::say;
use crate::tsc::rdtsc;
use crate::virtio::pmem::PmemDevice;

/// Fill `len` bytes (multiple of 8) at `addr` with `value` using `rep stosq` (fast-string stores, what memset
/// uses for large sizes).
fn fill(addr: u64, len: u64, value: u64) {
    // SAFETY: the caller passes a mapped range of the pmem region; rep stosq writes exactly len/8 qwords there.
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

pub fn run(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    let len = opts.bench_mib.saturating_mul(1 << 20).min(pmem.size) & !7;
    // First pass: every page is touched for the first time (the host populates it).
    let t0 = rdtsc();
    fill(pmem.start, len, 0x5a5a_5a5a_5a5a_5a5a);
    let t1 = rdtsc();
    // Second pass: steady state, pages already mapped.
    fill(pmem.start, len, 0xa5a5_a5a5_a5a5_a5a5);
    let t2 = rdtsc();
    let flush_cycles = match flush_or_fail(n, pmem) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    say!(
        "pmem{n} bench bytes={len} cold_cycles={} warm_cycles={} flush_cycles={flush_cycles}",
        t1 - t0,
        t2 - t1
    );
    0
}
