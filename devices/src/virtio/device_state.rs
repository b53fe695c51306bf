//! What every virtio transport shares, whatever its registers look like: the device status state machine
//! (virtio 1.2, 2.1 and 3.1), feature negotiation, when queues may be configured, activation at DRIVER_OK (with
//! kicks that came before it replayed), reset, DEVICE_NEEDS_RESET for whatever the driver gets wrong, and the
//! queue notifications the event loop hands over. virtio-mmio ([`super::mmio`]) and virtio-pci ([`super::pci`])
//! each decode their registers onto one [`DeviceState`].

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{InterruptKind, VirtioInterrupt};
use super::mmio::TransportError;
use super::{status, GuestMemory, VirtioDevice, VIRTIO_F_VERSION_1};

/// One device behind a transport: the device model, its queues as the driver configures them, and the status
/// and features the driver negotiated.
pub(crate) struct DeviceState {
    pub(crate) device: Box<dyn VirtioDevice>,
    pub(crate) mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) queues: Vec<Queue>,
    pub(crate) queue_evts: Vec<EventFd>,
    /// Ready queues notified before DRIVER_OK, replayed at activation.
    early_notify: Vec<bool>,
    pub(crate) queue_select: u32,
    pub(crate) device_features_select: u32,
    pub(crate) driver_features_select: u32,
    pub(crate) driver_features: u64,
    unknown_features_acked: bool,
    status: u32,
    activated: bool,
    /// "virtio-mmio" or "virtio-pci", for the logs.
    transport: &'static str,
}

impl DeviceState {
    /// `device`'s queues at their maximum sizes, each with a notification EventFd. `interrupt` is what the device
    /// gets at activation and what a config change raises.
    pub(crate) fn new(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Arc<dyn VirtioInterrupt>,
        transport: &'static str,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues
                .push(Queue::new(size).map_err(|_| TransportError::QueueMaxSize { index, size })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        Ok(DeviceState {
            device,
            mem,
            interrupt,
            early_notify: vec![false; queues.len()],
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            unknown_features_acked: false,
            status: 0,
            activated: false,
            transport,
        })
    }

    /// The device status as the driver last left it (plus DEVICE_NEEDS_RESET if the device set it).
    pub(crate) fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was started at DRIVER_OK and not reset since.
    pub(crate) fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device's features plus VERSION_1 (modern only).
    pub(crate) fn offered_features(&self) -> u64 {
        self.device.device_features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    /// The 32 offered feature bits `device_features_select` shows.
    pub(crate) fn device_features_word(&self) -> u32 {
        match self.device_features_select {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 feature bits at `driver_features_select`: only while negotiating (after DRIVER,
    /// before FEATURES_OK). Bits above 63 do not exist; a driver setting any is refused at FEATURES_OK.
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            tracing::debug!("virtio driver features written outside negotiation; ignored");
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => self.unknown_features_acked |= value != 0,
        }
    }

    pub(crate) fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    pub(crate) fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue configuration is writable only between FEATURES_OK and DRIVER_OK, and not once the queue is
    /// ready (virtio 1.2, 4.1.4.3.2 and 4.2.3.2).
    pub(crate) fn queue_config_writable(&mut self) -> Option<&mut Queue> {
        let s = self.status;
        if s & status::FEATURES_OK == 0 || s & status::DRIVER_OK != 0 || s & status::FAILED != 0 {
            return None;
        }
        self.selected_queue_mut().filter(|q| !q.ready())
    }

    /// Mark the device broken (virtio 1.2, 2.1.1): the driver sees DEVICE_NEEDS_RESET and, once it has set
    /// DRIVER_OK, a configuration-change interrupt.
    pub(crate) fn set_needs_reset(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(
            device = self.device.device_type(),
            transport = self.transport,
            "virtio device needs reset: {why}"
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptKind::ConfigChange) {
                tracing::warn!("cannot signal config interrupt: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.early_notify.fill(false);
        // Drain notifications the driver sent before the reset so they are not taken for new ones.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.unknown_features_acked = false;
        self.status = 0;
    }

    /// A driver's write of the status register. Returns true when it was a reset (0), so the transport resets
    /// what is its own (virtio-pci's MSI-X vector choices).
    pub(crate) fn write_status(&mut self, value: u32) -> bool {
        if value == 0 {
            self.reset();
            return true;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's bit; the driver only echoes it back.
        let value = value & !status::DEVICE_NEEDS_RESET;
        let old_driver_bits = old & !status::DEVICE_NEEDS_RESET;
        if value & old_driver_bits != old_driver_bits {
            // Drivers may only add bits; clearing one needs a reset (virtio 1.2, 2.1.2).
            tracing::debug!("virtio status write {value:#x} clears bits of {old:#x}; ignored");
            return false;
        }
        let added = value & !old_driver_bits;
        let mut new = old | added;

        if added & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let ok = old_driver_bits & status::DRIVER != 0
                && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0
                && self.driver_features & !offered == 0
                && !self.unknown_features_acked;
            if ok {
                self.device.ack_features(self.driver_features);
            } else {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (virtio 1.2, 3.1.1).
                tracing::debug!(
                    "virtio driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            tracing::debug!("virtio DRIVER_OK before FEATURES_OK; ignored");
            new &= !status::DRIVER_OK;
        }
        self.status = new;

        if added & status::DRIVER_OK != 0 && new & status::DRIVER_OK != 0 {
            self.activate();
        }
        false
    }

    fn activate(&mut self) {
        if self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                self.set_needs_reset(&super::ActivateError::QueueInvalid(i));
                return;
            }
            // The transport keeps its copy for the register reads; the device gets its own.
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(_) => {
                    self.set_needs_reset(&super::ActivateError::QueueInvalid(i));
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => {
                self.activated = true;
                // Replay kicks that came before DRIVER_OK through the event loop, where queues are processed.
                for (i, early) in self.early_notify.iter_mut().enumerate() {
                    if std::mem::take(early) {
                        if let Err(e) = self.queue_evts[i].write(1) {
                            tracing::warn!("cannot replay queue {i} notification: {e}");
                        }
                    }
                }
            }
            Err(e) => self.set_needs_reset(&e),
        }
    }

    /// A trapped notification write (the VMM's ioeventfd did not cover it): fed into the path the ioeventfd
    /// takes. False for a queue that does not exist.
    pub(crate) fn kick(&self, index: usize) -> bool {
        let Some(evt) = self.queue_evts.get(index) else {
            return false;
        };
        if let Err(e) = evt.write(1) {
            tracing::warn!("cannot signal queue eventfd: {e}");
        }
        true
    }

    /// The driver notified queue `index` (through the ioeventfd or a trapped notify write).
    pub(crate) fn queue_notified(&mut self, index: usize) {
        if self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let ready = self.queues.get(index).is_some_and(|q| q.ready());
        if !self.activated {
            if ready && self.status & status::FEATURES_OK != 0 {
                // A configured, ready queue kicked just before DRIVER_OK (some drivers fill receive queues in
                // probe): the device must not consume it yet (virtio 1.2, 2.1.2), so keep it for activation.
                self.early_notify[index] = true;
                return;
            }
            self.set_needs_reset(&format_args!(
                "queue {index} notified before it was ready and DRIVER_OK was set"
            ));
            return;
        }
        if !ready {
            self.set_needs_reset(&format_args!("queue {index} notified but not ready"));
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.set_needs_reset(&e);
        }
    }

    /// The event loop's `init`: the queue notify EventFds and the device's own host-side sources.
    pub(crate) fn init_events(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("cannot poll virtio queue {i} notifications: {e:?}");
            }
        }
        self.device.init_host_events(ops);
    }

    /// The event loop's `process`: a queue notification runs the device's queue processing here, off the vCPU
    /// threads; anything else is the device's.
    pub(crate) fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            Some(index) => {
                // Reading clears the counter; several notifications coalesce into one pass over the queue.
                let _ = self.queue_evts[index].read();
                self.queue_notified(index);
            }
            None => self.device.process_host_event(events, ops),
        }
    }
}
