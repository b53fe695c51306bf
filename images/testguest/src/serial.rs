//! Output over the 16550 at COM1. Every line the guest prints starts with [`PREFIX`] so tests can pick the
//! guest's lines out of the VMM's output.
//!
//! The transmit-holding register is written without polling the line status register first: daxvisor's 16550
//! (vm-superio) accepts every byte at once, and skipping the poll halves the VM exits per byte.

use core::fmt;

use crate::port::outb;
use daxvisor_proto::boot::SERIAL_PORT;

pub const PREFIX: &str = "daxvisor-testguest: ";

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(SERIAL_PORT, b);
        }
        Ok(())
    }
}

/// Print one line: the prefix, the formatted text, a newline.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut s = $crate::serial::Serial;
        let _ = s.write_str($crate::serial::PREFIX);
        let _ = s.write_fmt(format_args!($($arg)*));
        let _ = s.write_str("\n");
    }};
}
