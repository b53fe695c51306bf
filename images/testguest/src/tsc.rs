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

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 1/20 s.
const CALIBRATION_DIVISOR: u64 = 20;

/// Measure the TSC frequency (kHz) against PIT channel 2, as Linux's `pit_calibrate_tsc` does: gate channel 2
/// on through port 0x61, count down 1/20 s in mode 0, and count TSC ticks until its output goes high. `None` when
/// there is no PIT behind the ports (the measurement comes out absurd) or it never fires.
pub fn calibrate_khz() -> Option<u64> {
    use crate::port::{inb, outb};
    let latch = PIT_HZ / CALIBRATION_DIVISOR;
    // Gate channel 2 on, speaker off.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    let t0 = rdtsc();
    outb(0x42, (latch >> 8) as u8);
    let deadline = Deadline::after(10 * CYCLES_PER_SECOND_MIN);
    while inb(0x61) & 0x20 == 0 {
        if deadline.passed() {
            return None;
        }
    }
    let khz = (rdtsc() - t0) * CALIBRATION_DIVISOR / 1000;
    // Below 100 MHz or above 100 GHz: not a real PIT answering.
    (100_000..100_000_000).contains(&khz).then_some(khz)
}
