//! `pmem=bench`: time two write passes (cold: first touch; warm) and a read pass over the pmem region with the
//! TSC, for the bandwidth benchmark, which runs the same kernels ([`super::kernels`]) on the host over the same
//! file. The TSC frequency is measured against the PIT; the raw cycle counts are printed too, so a host that
//! knows its TSC frequency better can recompute.

use super::kernels::{fill, sum};
use super::pmem::flush_or_fail;
use crate::cmdline::Options;
use crate::say;
use crate::tsc::rdtsc;
use crate::virtio::pmem::PmemDevice;

pub fn run(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    let len = opts.bench_mib.saturating_mul(1 << 20).min(pmem.size) & !7;
    // First pass: every page is touched for the first time (the host populates it).
    let t0 = rdtsc();
    // SAFETY: [start, start + len) lies inside the pmem window the device reported and the BootInfo maps.
    unsafe { fill(pmem.start, len, 0x5a5a_5a5a_5a5a_5a5a) };
    let t1 = rdtsc();
    // Second pass: steady state, pages already mapped.
    // SAFETY: as above.
    unsafe { fill(pmem.start, len, 0xa5a5_a5a5_a5a5_a5a5) };
    let t2 = rdtsc();
    // SAFETY: as above.
    let total = unsafe { sum(pmem.start, len) };
    let t3 = rdtsc();
    // Each qword holds 0xa5a5...: the sum proves the loads happened and read what the warm pass wrote.
    if total != 0xa5a5_a5a5_a5a5_a5a5u64.wrapping_mul((len & !31) / 8) {
        say!("FAIL pmem{n} bench: read pass sum {total:#x} does not match the written pattern");
        return crate::exit::code::READBACK_MISMATCH;
    }
    let flush_cycles = match flush_or_fail(n, pmem) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    let (cold, warm, read) = (t1 - t0, t2 - t1, t3 - t2);
    let khz = crate::tsc::calibrate_khz().unwrap_or(0);
    say!(
        "pmem{n} bench bytes={len} cold_cycles={cold} warm_cycles={warm} read_cycles={read} \
         flush_cycles={flush_cycles} tsc_khz={khz} cold_mib_per_s={} warm_mib_per_s={} read_mib_per_s={}",
        mib_per_s(len, cold, khz),
        mib_per_s(len, warm, khz),
        mib_per_s(len, read, khz)
    );
    0
}

/// Bandwidth from a byte count, TSC cycles and the TSC frequency; 0 when the frequency is unknown.
fn mib_per_s(bytes: u64, cycles: u64, khz: u64) -> u64 {
    if cycles == 0 {
        return 0;
    }
    (bytes as u128 * khz as u128 * 1000 / cycles as u128 / (1 << 20)) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_arithmetic() {
        // 1 GiB in one second of a 2.6 GHz TSC.
        assert_eq!(super::mib_per_s(1 << 30, 2_600_000_000, 2_600_000), 1024);
        assert_eq!(super::mib_per_s(1 << 30, 0, 2_600_000), 0);
        assert_eq!(super::mib_per_s(1 << 30, 1000, 0), 0);
    }
}
