//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2), modern devices only.
//!
//! One [`MmioTransport`] per device, inserted on the MMIO bus at its window (0x200 bytes used: registers below
//! 0x100, device configuration from 0x100). Queue notifications do not exit to the VMM: each queue has an
//! `EventFd` the VMM registers with KVM as an ioeventfd on the QueueNotify register with the queue index as
//! datamatch ([`MmioTransport::queue_notify_fds`]); the VMM's event loop polls them through
//! [`MmioSubscriber`]. Interrupts go through an irqfd ([`MmioTransport::irqfd`]).
//!
//! Registers are 32-bit; other access widths are ignored (reads as zero). Everything the guest writes is
//! checked: a bad value is ignored or answered with DEVICE_NEEDS_RESET, never a panic.

use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::device_state::DeviceState;
use super::interrupt::{IrqfdInterrupt, VirtioInterrupt};
use super::{status, GuestMemory, VirtioDevice};
use crate::bus::BusDevice;

/// "virt" little-endian.
pub const MMIO_MAGIC: u32 = daxvisor_proto::virtio_mmio::MAGIC_VALUE;
/// Modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = daxvisor_proto::virtio_mmio::VERSION_MODERN;
/// "DAXV".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"DAXV");

pub use daxvisor_proto::virtio_mmio::reg;

/// Bytes of the MMIO window the transport decodes (registers + up to 0x100 bytes of device config). The
/// VMM's slots are larger (4 KiB); the rest reads as zero.
pub const MMIO_WINDOW_USED: u64 = 0x200;

/// What the VMM needs to register one queue's ioeventfd:
/// `vm.register_ioevent(fd, &IoEventAddress::Mmio(base + offset), datamatch)`.
pub struct QueueNotifyFd<'a> {
    /// The queue's notify EventFd, to register as an ioeventfd.
    pub fd: &'a EventFd,
    /// Offset of the QueueNotify register in the device window.
    pub offset: u64,
    /// The 32-bit value the driver writes for this queue (its index).
    pub datamatch: u32,
}

/// The virtio-mmio register block of one device: registers, feature negotiation, queue setup, activation and reset.
pub struct MmioTransport {
    state: DeviceState,
    interrupt: Arc<IrqfdInterrupt>,
    config_generation: u32,
}

/// Transport setup failures (VMM side, before the guest runs).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// [`VirtioDevice::queue_max_sizes`] has a size the queue cannot take (zero, not a power of two, too big).
    #[error("device declares an invalid maximum size {size} for queue {index}")]
    QueueMaxSize {
        /// Index of the queue.
        index: usize,
        /// The size the device declared.
        size: u16,
    },
    /// Creating a queue notify or interrupt EventFd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// virtio-pci: the BAR address the VMM allocated is not aligned to the BAR's size.
    #[error("virtio-pci BAR address {0:#x} is not aligned to the BAR size")]
    BarAddress(u64),
    /// virtio-pci: the capabilities do not fit in configuration space.
    #[error("virtio-pci capabilities do not fit in configuration space")]
    Capability,
}

impl MmioTransport {
    /// `mem` is the guest memory the device may access for queues and buffers (RAM only; see
    /// [`super::GuestMemory`]).
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>) -> Result<Self, TransportError> {
        let interrupt = Arc::new(IrqfdInterrupt::new().map_err(TransportError::EventFd)?);
        Ok(MmioTransport {
            state: DeviceState::new(mem, device, interrupt.clone(), "virtio-mmio")?,
            interrupt,
            config_generation: 0,
        })
    }

    /// The device's virtio device id.
    pub fn device_type(&self) -> u32 {
        self.state.device.device_type()
    }

    /// The EventFd to register with KVM as the device's irqfd (`vm.register_irqfd(fd, gsi)`).
    pub fn irqfd(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    /// One ioeventfd per queue, for `vm.register_ioevent`.
    pub fn queue_notify_fds(&self) -> Vec<QueueNotifyFd<'_>> {
        self.state
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, fd)| QueueNotifyFd {
                fd,
                offset: reg::QUEUE_NOTIFY,
                datamatch: i as u32,
            })
            .collect()
    }

    /// The device status register as the driver last left it (plus DEVICE_NEEDS_RESET if the device set it).
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device was started successfully at DRIVER_OK and not reset since.
    pub fn is_activated(&self) -> bool {
        self.state.is_activated()
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.state.selected_queue();
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.state.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.state.device_features_word(),
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.state.status(),
            reg::QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: length all ones means "none" (virtio 1.2, 4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.state.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.state.driver_features_select = value,
            reg::DRIVER_FEATURES => self.state.write_driver_features(value),
            reg::QUEUE_SEL => self.state.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.state.queue_config_writable() {
                    match u16::try_from(value).map(|v| q.try_set_size(v)) {
                        Ok(Ok(())) => {}
                        _ => tracing::debug!("virtio queue size {value} refused"),
                    }
                }
            }
            reg::QUEUE_READY => {
                let s = self.state.status();
                // Ready may go 0 -> 1 during setup only; 1 -> 0 without a reset is not supported.
                if s & status::FEATURES_OK != 0 && s & status::DRIVER_OK == 0 {
                    if let Some(q) = self.state.selected_queue_mut() {
                        q.set_ready(value == 1);
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Only reached when the VMM did not register the ioeventfd (or for a bad index): feed the same
                // path the ioeventfd takes.
                if !self.state.kick(value as usize) {
                    self.state
                        .set_needs_reset(&format_args!("notify for missing queue {value}"));
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => {
                self.state.write_status(value);
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.state.queue_config_writable() {
                    set_queue_address(q, offset, value);
                }
            }
            _ => tracing::debug!("virtio-mmio write to read-only/unknown register {offset:#x}"),
        }
    }
}

/// Replace the low or high half of a queue address. virtio-queue validates alignment and keeps the old value
/// if the new one is misaligned; `is_valid` at DRIVER_OK catches what is still wrong.
fn set_queue_address(q: &mut Queue, offset: u64, value: u32) {
    let merge = |old: u64, high: bool| {
        if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        }
    };
    let high = offset & 4 != 0;
    let result = match offset & !4 {
        reg::QUEUE_DESC_LOW => {
            q.try_set_desc_table_address(GuestAddress(merge(q.desc_table(), high)))
        }
        reg::QUEUE_DRIVER_LOW => {
            q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring(), high)))
        }
        _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring(), high))),
    };
    if let Err(e) = result {
        tracing::debug!("virtio queue address refused: {e}");
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            self.state.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            tracing::debug!(
                "virtio-mmio {}-byte read at {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.state.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!(
                "virtio-mmio {}-byte write at {offset:#x} ignored",
                data.len()
            );
        }
    }
}

/// Lock a transport even if a panic poisoned its mutex: register state stays consistent (every update is a
/// single assignment) and one broken device must not take the event loop down with it.
pub fn lock(t: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The transport's face on the VMM's event loop: polls the queue notify EventFds (and the device's host-side
/// sources) and runs the device's queue processing there, off the vCPU threads.
pub struct MmioSubscriber {
    transport: Arc<Mutex<MmioTransport>>,
}

impl MmioSubscriber {
    /// A subscriber for `transport`, to add to the event loop's `EventManager`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> Self {
        MmioSubscriber { transport }
    }
}

impl MutEventSubscriber for MmioSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        lock(&self.transport).state.init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        lock(&self.transport).state.process_event(events, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, QueueError};
    use event_manager::SubscriberOps;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    /// A minimal device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        acked: Arc<Mutex<u64>>,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        processed: Arc<AtomicUsize>,
        config: [u8; 8],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn ack_features(&mut self, features: u64) {
            *self.acked.lock().unwrap() = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if !queues[0].ready() {
                return Err(ActivateError::QueueNotReady(0));
            }
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
            self.processed.fetch_add(1, Ordering::SeqCst);
            if index == 1 {
                return Err(QueueError {
                    queue: 1,
                    reason: "probe says broken".into(),
                });
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (
        MmioTransport,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let probe = Probe {
            config: *b"CONFIG!!",
            ..Default::default()
        };
        let (a, r, p) = (
            probe.activations.clone(),
            probe.resets.clone(),
            probe.processed.clone(),
        );
        (MmioTransport::new(mem(), Box::new(probe)).unwrap(), a, r, p)
    }

    /// Driver side of virtio 1.2, 3.1.1 up to FEATURES_OK, accepting `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        rd(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, index);
        wr(t, reg::QUEUE_NUM, 8);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, ..) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shm regions");
        // Config space at 0x100, any width.
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(&b, b"NF");
        // Narrow or misaligned register accesses are ignored and read as zero.
        let mut one = [0xffu8; 1];
        t.read(reg::MAGIC, &mut one);
        assert_eq!(one, [0]);
        let mut mis = [0xffu8; 4];
        t.read(reg::MAGIC + 2, &mut mis);
        assert_eq!(mis, [0; 4]);
    }

    #[test]
    fn feature_negotiation_requires_version_1_and_a_subset() {
        let (mut t, ..) = transport();
        // Legacy driver (no VERSION_1): FEATURES_OK does not stick.
        assert_eq!(negotiate(&mut t, 1 << 3) & status::FEATURES_OK, 0);
        wr(&mut t, reg::STATUS, 0);
        // A feature that was not offered: refused.
        assert_eq!(
            negotiate(&mut t, (1 << 32) | (1 << 5)) & status::FEATURES_OK,
            0
        );
        wr(&mut t, reg::STATUS, 0);
        // VERSION_1 plus an offered feature: accepted and passed to the device.
        let probe_acked = {
            let probe = Probe::default();
            let acked = probe.acked.clone();
            t = MmioTransport::new(mem(), Box::new(probe)).unwrap();
            acked
        };
        assert_ne!(
            negotiate(&mut t, (1 << 32) | (1 << 3)) & status::FEATURES_OK,
            0
        );
        assert_eq!(*probe_acked.lock().unwrap(), (1 << 32) | (1 << 3));
        // Features are frozen after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        wr(&mut t, reg::STATUS, ALL_OK & !status::DRIVER_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_needs_driver_bit_and_status_bits_cannot_be_cleared() {
        let (mut t, ..) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        assert_eq!(
            t.state.driver_features, 0,
            "features written before DRIVER are ignored"
        );
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(
            rd(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER,
            "clearing ACKNOWLEDGE without a reset is ignored"
        );
        // DRIVER_OK before FEATURES_OK does not activate.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
    }

    #[test]
    fn queue_setup_activation_and_reset() {
        let (mut t, activations, resets, _) = transport();
        // Queue registers are ignored before FEATURES_OK.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 16);
        negotiate(&mut t, 1 << 32);
        // Not a power of two, or above the maximum: refused.
        wr(&mut t, reg::QUEUE_NUM, 12);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 16);
        wr(&mut t, reg::QUEUE_NUM, 32);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 16);
        setup_queue(&mut t, 0, 0x1_0000);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 8);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x1_0000);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Misaligned descriptor table: keeps the old value.
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x3);
        assert_ne!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x3);
        wr(&mut t, reg::STATUS, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, reg::STATUS), ALL_OK);
        // Queue config frozen after DRIVER_OK.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 8);
        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 16);
    }

    #[test]
    fn queue_outside_memory_or_device_refusal_sets_needs_reset() {
        let (mut t, activations, ..) = transport();
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 0x20_0000); // beyond the 1 MiB of guest memory
        wr(&mut t, reg::STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            rd(&mut t, reg::INTERRUPT_STATUS),
            2,
            "config change interrupt"
        );
        assert_eq!(t.irqfd().read().unwrap(), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // After a reset the device can be brought up properly.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        negotiate(&mut t, 1 << 32);
        // Queue 0 not ready: the device refuses to activate.
        wr(&mut t, reg::STATUS, ALL_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 0x1_0000);
        wr(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(rd(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn notifications_reach_the_device_through_the_eventfd_path() {
        let (mut t, _, _, processed) = transport();
        // Notify before DRIVER_OK: the queue is not live; the device is marked as needing reset.
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(
            t.state.queue_evts[0].read().unwrap(),
            1,
            "trapped notify feeds the eventfd"
        );
        t.state.queue_notified(0);
        assert_eq!(processed.load(Ordering::SeqCst), 0);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, reg::STATUS, 0);

        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 0x1_0000);
        wr(&mut t, reg::STATUS, ALL_OK);
        t.state.queue_notified(0);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
        // Queue 1 exists but was never made ready.
        t.state.queue_notified(1);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        // Out-of-range notify index: needs reset, no panic.
        wr(&mut t, reg::STATUS, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 99);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);

        // A ready queue kicked between FEATURES_OK and DRIVER_OK is held, then replayed at activation.
        wr(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 0x1_0000);
        t.state.queue_notified(0);
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            processed.load(Ordering::SeqCst),
            1,
            "not consumed before DRIVER_OK"
        );
        wr(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(
            t.state.queue_evts[0].read().unwrap(),
            1,
            "replayed through the eventfd"
        );

        let fds = t.queue_notify_fds();
        assert_eq!(fds.len(), 2);
        assert_eq!((fds[1].offset, fds[1].datamatch), (reg::QUEUE_NOTIFY, 1));
    }

    #[test]
    fn queue_error_from_the_device_sets_needs_reset() {
        let (mut t, _, _, processed) = transport();
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x4_0000);
        wr(&mut t, reg::STATUS, ALL_OK);
        t.state.queue_notified(1);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        // Further notifications are ignored until the driver resets the device.
        t.state.queue_notified(0);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn subscriber_dispatches_queue_events_from_the_event_manager() {
        let (t, _, _, processed) = transport();
        let t = Arc::new(Mutex::new(t));
        {
            let mut g = lock(&t);
            negotiate(&mut g, 1 << 32);
            setup_queue(&mut g, 0, 0x1_0000);
            wr(&mut g, reg::STATUS, ALL_OK);
        }
        let mut em = event_manager::EventManager::<MmioSubscriber>::new().unwrap();
        em.add_subscriber(MmioSubscriber::new(t.clone()));
        // What KVM does on an ioeventfd match.
        lock(&t).state.queue_evts[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
    }
}
