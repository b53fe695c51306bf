//! The time-stamp counter: ring 0 cleared CR4.TSD, so `rdtsc` works in ring 3 without an exit. Used for
//! timeouts (counted in cycles: the guest does not know the TSC frequency) and for the write benchmark.

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads a counter into two registers and touches no memory.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}

/// At least ~1 s on any CPU running at 1 GHz or more.
pub const CYCLES_PER_SECOND_MIN: u64 = 1_000_000_000;

/// A deadline `cycles` TSC ticks from now.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after(cycles: u64) -> Self {
        Deadline(rdtsc().saturating_add(cycles))
    }
    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Spin-wait hint.
pub fn relax() {
    core::hint::spin_loop();
}
