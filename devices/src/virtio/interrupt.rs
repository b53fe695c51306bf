//! Device-to-driver notifications.
//!
//! virtio-mmio has one interrupt line per device and an InterruptStatus register saying why it fired
//! (bit 0: used buffer, bit 1: configuration change). [`IrqfdInterrupt`] keeps that register and signals an
//! `EventFd` the VMM registers with KVM as an irqfd, so any thread (event loop, flush worker) can interrupt the
//! guest without a vCPU exit or a lock on the transport.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the device interrupts the driver; the value is the InterruptStatus bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device used buffers in a queue.
    UsedBuffer = 1,
    /// The device configuration (or the device status, e.g. DEVICE_NEEDS_RESET) changed.
    ConfigChange = 2,
}

/// Raises interrupts for one device. Shared between the transport and the device's worker threads.
pub trait VirtioInterrupt: Send + Sync {
    /// Set the InterruptStatus bit for `kind` and signal the interrupt line.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// The device used buffers in queue `queue`. Transports with one vector per queue (virtio-pci with
    /// MSI-X) raise that queue's; the default is [`VirtioInterrupt::trigger`] with `UsedBuffer`.
    fn trigger_queue(&self, queue: usize) -> std::io::Result<()> {
        let _ = queue;
        self.trigger(InterruptKind::UsedBuffer)
    }
    /// Current InterruptStatus register value.
    fn status(&self) -> u32;
    /// Clear the bits the driver acknowledged (InterruptACK register).
    fn ack(&self, bits: u32);
    /// Clear everything (device reset).
    fn clear(&self);
}

/// Interrupt through an irqfd: the VMM passes `irqfd()` to `VmFd::register_irqfd(fd, gsi)`.
pub struct IrqfdInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl IrqfdInterrupt {
    /// No interrupt pending, with a fresh non-blocking irqfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqfdInterrupt {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The EventFd to register with KVM as an irqfd for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

impl VirtioInterrupt for IrqfdInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        // Status first: the guest's handler reads it as soon as the line fires.
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_status_and_signals_the_irqfd() {
        let irq = IrqfdInterrupt::new().unwrap();
        assert!(irq.irqfd().read().is_err(), "nothing signalled yet");
        irq.trigger(InterruptKind::UsedBuffer).unwrap();
        irq.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
