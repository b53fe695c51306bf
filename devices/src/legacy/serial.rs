//! 16550 UART on COM1 (vm-superio), interrupt through an irqfd, output to any writer.

use std::io::Write;

use super::{ByteRegisters, EventFdTrigger};
use vmm_sys_util::eventfd::EventFd;

/// A 16550 UART (vm-superio); the VMM places it on COM1.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// `irq` is signalled when the UART raises its interrupt (the VMM registers it as an irqfd).
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queue bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl ByteRegisters for Serial {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            // Output errors (a closed stdout, a full disk) must not stop the guest.
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_written_to_thr() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Out-of-range offsets are ignored, not a panic.
        s.write(0x1_0000, &[1]);
        let mut d = [0u8; 4];
        s.read(5, &mut d);
        assert_ne!(d[0] & 0x20, 0, "THR empty bit set in LSR");
    }
}
