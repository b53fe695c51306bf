//! Legacy port-I/O devices: the 16550 serial port, the i8042 reset line, and the exit port.

pub mod exit;
pub mod i8042;
pub mod serial;

pub use exit::{ExitPort, VmExitStatus};
pub use i8042::I8042;
pub use serial::Serial;

use vmm_sys_util::eventfd::EventFd;

/// vm-superio raises interrupts and reset requests through a `Trigger`; ours writes to an `EventFd`
/// (an irqfd for interrupts, the VMM's exit event for reset).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
