//! Legacy port-I/O devices: the 16550 serial port, the i8042 reset line, the ACPI sleep (power-off) register and
//! the exit port.

pub mod acpi_sleep;
pub mod exit;
pub mod i8042;
pub mod serial;

pub use acpi_sleep::AcpiSleep;
pub use exit::{ExitPort, VmExitStatus};
pub use i8042::I8042;
pub use serial::Serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// How a device ends the VM (reset, power-off, exit status). It raises the stop flag that every vCPU checks
/// after each exit, so the guest runs no further instruction once the request is handled, then wakes the event
/// loop, which tears the VM down.
#[derive(Clone)]
pub struct VmStopper {
    stopping: Arc<AtomicBool>,
    evt: Arc<EventFd>,
}

impl VmStopper {
    /// A stopper not yet stopping, with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmStopper {
            stopping: Arc::new(AtomicBool::new(false)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Raise the stop flag and wake the event loop to tear the VM down.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop to stop the VM: {e}");
        }
    }

    /// Whether a stop was requested; vCPUs check it after every exit.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Raise the flag without waking anyone (the event loop itself, on its way out).
    pub fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl vm_superio::Trigger for VmStopper {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.stop();
        Ok(())
    }
}

/// A device of 8-bit registers at port offsets 0..=255 (the UART, the i8042). Only the first byte of an access
/// counts; wider reads return the register in the low byte and zeros above.
pub trait ByteRegisters: Send {
    /// The value of the register at `offset`.
    fn read_register(&mut self, offset: u8) -> u8;
    /// Write `value` to the register at `offset`.
    fn write_register(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> crate::bus::BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.read_register(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            self.write_register(off, value);
        }
    }
}

/// vm-superio raises interrupts and reset requests through a `Trigger`; ours writes to an `EventFd`
/// (an irqfd for interrupts, the VMM's exit event for reset).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
