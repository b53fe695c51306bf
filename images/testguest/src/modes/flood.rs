//! `pmem=flush-flood`: flush the first pmem device back to back, forever (the VMM's rate limiter and the
//! operator API are tested against it). Prints `pmemK flood: N flushes answered` after every 100.

use super::pmem::flush_or_fail;
use crate::say;
use crate::virtio::pmem::{FlushResult, PmemDevice};

/// How often the flood reports its count.
const REPORT_EVERY: u64 = 100;

/// Never returns unless a flush fails (then the failure code).
pub fn run(n: usize, pmem: &mut PmemDevice) -> u32 {
    if let Err(rc) = flush_or_fail(n, pmem) {
        return rc;
    }
    let mut answered: u64 = 1;
    loop {
        match pmem.flush() {
            FlushResult::Ok { .. } => answered += 1,
            other => {
                say!("FAIL pmem{n} flood flush {}: {other}", answered + 1);
                return crate::exit::code::FLUSH_FAILED;
            }
        }
        if answered.is_multiple_of(REPORT_EVERY) {
            say!("pmem{n} flood: {answered} flushes answered");
        }
    }
}
