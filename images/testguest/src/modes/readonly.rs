//! `pmem=readonly-write`: try to write the pattern into a region the VMM maps read-only (or copy-on-write), flush,
//! and report what reads back. The host-side test checks the file; the guest only reports.

use super::pmem::byte_count;
use super::write::write_pattern;
use crate::cmdline::Options;
use crate::pattern;
use crate::say;
use crate::virtio::pmem::{FlushResult, PmemDevice};

/// Bytes written by default: every guest store to a read-only memslot is an exit, so keep it small.
pub const DEFAULT_BYTES: u64 = 4096;

/// FNV-1a over the words, to tell "unchanged" without keeping a copy.
fn digest(pmem: &PmemDevice, len: u64) -> u64 {
    let base = pmem.start as *const u64;
    (0..len / 8).fold(0xcbf2_9ce4_8422_2325, |h, i| {
        // SAFETY: [start, start + len) is inside the mapped region (checked by the caller).
        let v = unsafe { core::ptr::read_volatile(base.add(i as usize)) };
        (h ^ v).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn pattern_words(pmem: &PmemDevice, len: u64, seed: u32) -> u64 {
    let base = pmem.start as *const u64;
    (0..len / 8)
        .filter(|&i| {
            // SAFETY: as for `digest`.
            unsafe { core::ptr::read_volatile(base.add(i as usize)) == pattern::word(seed, i * 8) }
        })
        .count() as u64
}

pub fn run(n: usize, pmem: &mut PmemDevice, opts: &Options) -> u32 {
    let len = byte_count(opts, pmem.size, Some(DEFAULT_BYTES));
    let words = len / 8;
    let before = digest(pmem, len);
    write_pattern(pmem, len, opts.seed);
    say!(
        "pmem{n} readonly-write: wrote {len} bytes seed {}",
        opts.seed
    );
    let after = digest(pmem, len);
    let matching = pattern_words(pmem, len, opts.seed);
    if after == before {
        say!("pmem{n} readonly-write: read back unchanged");
    } else if matching == words {
        say!("pmem{n} readonly-write: read back the pattern");
    } else {
        say!("pmem{n} readonly-write: read back changed, {matching} of {words} words match the pattern");
    }
    match pmem.flush() {
        FlushResult::Ok { .. } => say!("pmem{n} flush ok"),
        other => say!("pmem{n} flush failed: {other}"),
    }
    0
}
