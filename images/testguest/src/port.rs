//! x86 port I/O. The test guest runs in ring 3 with IOPL = 3, so these instructions do not fault; each one exits
//! to the VMM.

/// Write one byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output touches no memory; with IOPL = 3 it cannot fault, it only exits to the VMM.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Write a 32-bit value to `port` with one `out` (the exit port requires a single 32-bit write).
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Read one byte from `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Read a 32-bit value from `port`.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}
