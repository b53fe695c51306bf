//! `pmem=write`, `pmem=write-flush-spin` and `pmem=write-loop`: write the pattern (crate::pattern), flush, and read it back.

use super::pmem::{byte_count, flush_or_fail};
use crate::cmdline::Options;
use crate::exit::code;
use crate::pattern;
use crate::say;
use crate::virtio::pmem::{FlushResult, PmemDevice};

/// Write the pattern over `len` bytes from the region start. Volatile stores: the device (the host file) is the
/// reader, the compiler must not drop or merge them.
pub fn write_pattern(pmem: &PmemDevice, len: u64, seed: u32) {
    let base = pmem.start as *mut u64;
    for i in 0..len / 8 {
        // SAFETY: the region [start, start + size) is mapped (checked by the caller) and len <= size.
        unsafe { core::ptr::write_volatile(base.add(i as usize), pattern::word(seed, i * 8)) };
    }
}

/// The first offset whose word differs from the pattern, with what was read.
pub fn verify_pattern(pmem: &PmemDevice, len: u64, seed: u32) -> Option<(u64, u64)> {
    let base = pmem.start as *const u64;
    (0..len / 8).find_map(|i| {
        // SAFETY: as for `write_pattern`.
        let v = unsafe { core::ptr::read_volatile(base.add(i as usize)) };
        (v != pattern::word(seed, i * 8)).then_some((i * 8, v))
    })
}

fn write(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u64 {
    let len = byte_count(opts, pmem.size, None);
    write_pattern(pmem, len, opts.seed);
    say!("pmem{n} wrote {len} bytes seed {}", opts.seed);
    len
}

pub fn write_flush_verify(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    let len = write(n, pmem, opts);
    if let Err(rc) = flush_or_fail(n, pmem) {
        return rc;
    }
    match verify_pattern(pmem, len, opts.seed) {
        None => {
            say!("pmem{n} readback ok");
            0
        }
        Some((off, v)) => {
            say!(
                "FAIL pmem{n} readback mismatch at offset {off:#x}: read {v:#018x} expected {:#018x}",
                pattern::word(opts.seed, off)
            );
            code::READBACK_MISMATCH
        }
    }
}

pub fn write_flush(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    write(n, pmem, opts);
    match flush_or_fail(n, pmem) {
        Ok(_) => {
            say!("pmem{n} flush acknowledged");
            0
        }
        Err(rc) => rc,
    }
}

/// Passes reported by `write_loop`; later passes are silent (the serial port is slow).
const LOOP_REPORTED_PASSES: u64 = 3;

/// Write and flush until the VM is stopped. A failed flush is reported and the loop goes on, as a guest
/// retrying would: a file shrunk under the guest then ends in the access fault that names it, whether the
/// shrink landed during a write pass or during a flush.
pub fn write_loop(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    let len = byte_count(opts, pmem.size, None);
    let mut pass: u64 = 0;
    loop {
        pass += 1;
        write_pattern(pmem, len, opts.seed);
        let result = pmem.flush();
        if !matches!(result, FlushResult::Ok { .. }) {
            say!("pmem{n} flush in pass {pass} failed: {result}; writing on");
            continue;
        }
        if pass <= LOOP_REPORTED_PASSES {
            say!("pmem{n} pass {pass} flushed");
        }
    }
}
