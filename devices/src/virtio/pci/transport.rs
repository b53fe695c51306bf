//! [`VirtioPciDevice`]: the PCI function, BAR 0 decoding onto the shared virtio device state, and MSI-X interrupts.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{cap_type, common};
use crate::pci::configuration::{self, BarSpec, PciConfiguration, PciIdentity};
use crate::pci::msix::{MsiSink, Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::pci::PciDevice;
use crate::virtio::device_state::DeviceState;
use crate::virtio::interrupt::{InterruptKind, VirtioInterrupt};
use crate::virtio::mmio::TransportError;
use crate::virtio::{GuestMemory, VirtioDevice};

/// The virtio PCI vendor id; device ids are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// BAR 0's size.
pub const BAR_SIZE: u64 = 0x8000;
/// Where the common configuration sits in BAR 0.
pub const COMMON_CFG: u64 = 0x0000;
/// Where the ISR byte sits in BAR 0.
pub const ISR_CFG: u64 = 0x1000;
/// Where the device configuration sits in BAR 0.
pub const DEVICE_CFG: u64 = 0x2000;
/// Where the notification addresses start in BAR 0.
pub const NOTIFY_CFG: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Where the MSI-X table sits in BAR 0.
pub const MSIX_TABLE: u64 = 0x4000;
/// Where the MSI-X pending-bit array sits in BAR 0.
pub const MSIX_PBA: u64 = 0x6000;
/// "No MSI-X vector" in the vector fields.
pub const NO_VECTOR: u16 = 0xffff;

const REGION_SIZE: u64 = 0x1000;
/// Queues a device may have: their notify addresses and MSI-X vectors (plus config) must fit their regions.
const MAX_QUEUES: usize = 255;
const VENDOR_CAP: u8 = 0x09;

/// Interrupts of one virtio-pci function: the ISR byte and a vector per queue and for configuration changes.
struct PciInterrupt {
    msix: Arc<Msix>,
    isr: AtomicU32,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    fn raise(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix.signal(vector);
        }
    }

    fn reset_vectors(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.isr.fetch_or(kind as u32, Ordering::SeqCst);
        match kind {
            InterruptKind::ConfigChange => self.raise(self.config_vector.load(Ordering::SeqCst)),
            InterruptKind::UsedBuffer => {
                // No queue named: raise each distinct queue vector once.
                let mut raised: Vec<u16> = Vec::new();
                for v in &self.queue_vectors {
                    let v = v.load(Ordering::SeqCst);
                    if !raised.contains(&v) {
                        raised.push(v);
                        self.raise(v);
                    }
                }
            }
        }
        Ok(())
    }

    fn trigger_queue(&self, queue: usize) -> std::io::Result<()> {
        self.isr
            .fetch_or(InterruptKind::UsedBuffer as u32, Ordering::SeqCst);
        if let Some(v) = self.queue_vectors.get(queue) {
            self.raise(v.load(Ordering::SeqCst));
        }
        Ok(())
    }

    fn status(&self) -> u32 {
        self.isr.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.isr.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.isr.store(0, Ordering::SeqCst);
    }
}

/// A virtio device on the PCI bus: configuration space, BAR 0 and the device state it decodes onto.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap: usize,
    pci_cfg_cap: usize,
    state: DeviceState,
    interrupt: Arc<PciInterrupt>,
    config_generation: u8,
}

/// PCI class code for a virtio device type, so `lspci` says what it is.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        3 => 0x07_80_00,  // console: simple communication controller, other
        27 => 0x05_80_00, // pmem: memory controller, other
        _ => 0xff_00_00,
    }
}

impl VirtioPciDevice {
    /// `device` behind a PCI function whose BAR 0 reads `bar_address` (32 KiB aligned; the VMM allocates it)
    /// with memory decoding on, and whose MSI-X vectors go to `sink` (vector n for queue n, the last for
    /// configuration changes is only a suggestion: the driver picks). `mem` is guest RAM only (see
    /// [`super::super::GuestMemory`]).
    pub fn new(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        sink: Arc<dyn MsiSink>,
        bar_address: u64,
    ) -> Result<Self, TransportError> {
        let num_queues = device.queue_max_sizes().len();
        if let Some(&size) = device.queue_max_sizes().get(MAX_QUEUES) {
            return Err(TransportError::QueueMaxSize {
                index: MAX_QUEUES,
                size,
            });
        }
        let vectors = num_queues as u16 + 1;
        let msix = Arc::new(Msix::new(vectors, sink));
        let device_type = device.device_type();
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: 0x1040u16.wrapping_add(device_type as u16),
            // Modern-only devices have revision 1 or more, so legacy drivers leave them alone.
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        let spec = BarSpec {
            size: BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        };
        config
            .add_bar(0, spec, bar_address)
            .map_err(|_| TransportError::BarAddress(bar_address))?;
        config.enable_memory();
        let too_big = |_| TransportError::Capability;
        let cap = |cfg_type: u8, offset: u64, length: u64| {
            let mut b = vec![VENDOR_CAP, 0, 16, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(length as u32).to_le_bytes());
            b
        };
        config
            .add_capability(&cap(cap_type::COMMON, COMMON_CFG, common::SIZE), &[])
            .map_err(too_big)?;
        config
            .add_capability(&cap(cap_type::ISR, ISR_CFG, 1), &[])
            .map_err(too_big)?;
        config
            .add_capability(&cap(cap_type::DEVICE, DEVICE_CFG, REGION_SIZE), &[])
            .map_err(too_big)?;
        let mut notify = cap(cap_type::NOTIFY, NOTIFY_CFG, REGION_SIZE);
        notify[2] = 20;
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify, &[]).map_err(too_big)?;
        let (body, writable) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(&body, &writable).map_err(too_big)?;
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are the driver's.
        let mut pci_cfg = cap(cap_type::PCI_CFG, 0, 0);
        pci_cfg[2] = 20;
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut pci_cfg_w = vec![0u8; 20];
        pci_cfg_w[4] = 0xff;
        pci_cfg_w[8..16].fill(0xff);
        let pci_cfg_cap = config
            .add_capability(&pci_cfg, &pci_cfg_w)
            .map_err(too_big)?;

        let interrupt = Arc::new(PciInterrupt {
            msix,
            isr: AtomicU32::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        });
        Ok(VirtioPciDevice {
            config,
            msix_cap,
            pci_cfg_cap,
            state: DeviceState::new(mem, device, interrupt.clone(), "virtio-pci")?,
            interrupt,
            config_generation: 0,
        })
    }

    /// The device's virtio device id.
    pub fn device_type(&self) -> u32 {
        self.state.device.device_type()
    }

    /// Number of MSI-X vectors (the VMM sets up one GSI for each).
    pub fn msix_vectors(&self) -> u16 {
        self.interrupt.msix.vectors()
    }

    /// One ioeventfd per queue, at BAR 0 + `offset` (any access width, no datamatch).
    pub fn queue_notify_fds(&self) -> Vec<(&EventFd, u64)> {
        self.state
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd, NOTIFY_CFG + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)))
            .collect()
    }

    /// Where BAR 0 is now (the driver may move it).
    pub fn bar_address(&self) -> Option<u64> {
        self.config.bar_address(0)
    }

    /// The device status as the driver last left it (plus DEVICE_NEEDS_RESET if the device set it).
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device was started at DRIVER_OK and not reset since.
    pub fn is_activated(&self) -> bool {
        self.state.is_activated()
    }

    /// The guest memory the device works on (for tests that play the driver).
    #[cfg(test)]
    pub(crate) fn mem_for_tests(&self) -> GuestMemory {
        self.state.mem.clone()
    }

    fn vector_or_none(&self, v: u16) -> u16 {
        if v < self.interrupt.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// A common-configuration read: `(value, width)` of the field at `offset`, or None for a width or offset
    /// that is not a field (64-bit fields may also be read as two 32-bit halves).
    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        let st = &self.state;
        let q = st.selected_queue();
        let qv = self
            .interrupt
            .queue_vectors
            .get(st.queue_select as usize)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        let v = match (offset, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(st.device_features_select),
            (common::DEVICE_FEATURE, 4) => u64::from(st.device_features_word()),
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(st.driver_features_select),
            (common::DRIVER_FEATURE, 4) => match st.driver_features_select {
                0 => st.driver_features & 0xffff_ffff,
                1 => st.driver_features >> 32,
                _ => 0,
            },
            (common::CONFIG_MSIX_VECTOR, 2) => {
                u64::from(self.interrupt.config_vector.load(Ordering::SeqCst))
            }
            (common::NUM_QUEUES, 2) => st.queues.len() as u64,
            (common::DEVICE_STATUS, 1) => u64::from(st.status() as u8),
            (common::CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (common::QUEUE_SELECT, 2) => u64::from(st.queue_select),
            // A queue that does not exist has size 0 (virtio 1.2, 4.1.4.3.2).
            (common::QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size())),
            (common::QUEUE_MSIX_VECTOR, 2) => u64::from(qv),
            (common::QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready())),
            (common::QUEUE_NOTIFY_OFF, 2) => u64::from(st.queue_select),
            (o, 4 | 8)
                if (common::QUEUE_DESC..common::SIZE).contains(&o) && o % len as u64 == 0 =>
            {
                let field = o & !7;
                let full = q.map_or(0, |q| match field {
                    common::QUEUE_DESC => q.desc_table(),
                    common::QUEUE_DRIVER => q.avail_ring(),
                    _ => q.used_ring(),
                });
                match (len, o % 8) {
                    (8, _) => full,
                    (_, 0) => full & 0xffff_ffff,
                    _ => full >> 32,
                }
            }
            _ => return None,
        };
        Some(v)
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let Some(dst) = b.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(b);
        match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.state.device_features_select = value as u32,
            (common::DRIVER_FEATURE_SELECT, 4) => self.state.driver_features_select = value as u32,
            (common::DRIVER_FEATURE, 4) => self.state.write_driver_features(value as u32),
            (common::CONFIG_MSIX_VECTOR, 2) => {
                let v = self.vector_or_none(value as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            (common::DEVICE_STATUS, 1) => {
                if self.state.write_status(value as u32) {
                    self.interrupt.reset_vectors();
                }
            }
            (common::QUEUE_SELECT, 2) => self.state.queue_select = u32::from(value as u16),
            (common::QUEUE_SIZE, 2) => {
                if let Some(q) = self.state.queue_config_writable() {
                    if q.try_set_size(value as u16).is_err() {
                        tracing::debug!("virtio queue size {value} refused");
                    }
                }
            }
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let v = self.vector_or_none(value as u16);
                if let Some(slot) = self
                    .interrupt
                    .queue_vectors
                    .get(self.state.queue_select as usize)
                {
                    slot.store(v, Ordering::SeqCst);
                }
            }
            (common::QUEUE_ENABLE, 2) => {
                // Enable only during setup; disabling needs a reset (virtio 1.2, 4.1.4.3.2).
                if value == 1 {
                    if let Some(q) = self.state.queue_config_writable() {
                        q.set_ready(true);
                    }
                }
            }
            (o, 4 | 8)
                if (common::QUEUE_DESC..common::SIZE).contains(&o)
                    && o % data.len() as u64 == 0 =>
            {
                if let Some(q) = self.state.queue_config_writable() {
                    set_queue_address(q, o, data.len(), value);
                }
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci common config write ignored"
            ),
        }
    }

    fn notify_write(&mut self, offset: u64) {
        if !offset.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) {
            return;
        }
        let index = (offset / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
        // Only reached when the VMM's ioeventfd does not cover this address (e.g. the driver moved BAR 0):
        // feed the same path the ioeventfd takes.
        if !self.state.kick(index) {
            tracing::debug!(index, "virtio-pci notify for a missing queue ignored");
        }
    }

    /// After a configuration write: MSI-X enable and function mask follow the capability's message control.
    fn sync_msix_control(&mut self) {
        let mut c = [0u8; 2];
        self.config.read_bytes(self.msix_cap + 2, &mut c);
        let control = u16::from_le_bytes(c) & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
        self.interrupt.msix.set_control(control);
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: `(offset in BAR 0, length)` the driver selected, if usable.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let mut f = [0u8; 12];
        self.config.read_bytes(self.pci_cfg_cap + 4, &mut f);
        let bar = f[0];
        let offset = u64::from(u32::from_le_bytes([f[4], f[5], f[6], f[7]]));
        let len = u32::from_le_bytes([f[8], f[9], f[10], f[11]]) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }
}

/// Replace a queue address (all of it, or its low or high half). virtio-queue keeps the old value for a
/// misaligned one; `is_valid` at DRIVER_OK catches the rest.
fn set_queue_address(q: &mut Queue, offset: u64, len: usize, value: u64) {
    let field = offset & !7;
    let old = match field {
        common::QUEUE_DESC => q.desc_table(),
        common::QUEUE_DRIVER => q.avail_ring(),
        _ => q.used_ring(),
    };
    let new = match (len, offset % 8) {
        (8, _) => value,
        (_, 0) => (old & !0xffff_ffff) | (value & 0xffff_ffff),
        _ => (old & 0xffff_ffff) | (value << 32),
    };
    let result = match field {
        common::QUEUE_DESC => q.try_set_desc_table_address(GuestAddress(new)),
        common::QUEUE_DRIVER => q.try_set_avail_ring_address(GuestAddress(new)),
        _ => q.try_set_used_ring_address(GuestAddress(new)),
    };
    if let Err(e) = result {
        tracing::debug!("virtio queue address refused: {e}");
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            let mut b = [0u8; 4];
            if let Some((offset, len)) = self.pci_cfg_target() {
                self.read_bar(0, offset, &mut b[..len]);
            }
            return u32::from_le_bytes(b);
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            if let (Some((bar_offset, len)), Some((value, _))) = (
                self.pci_cfg_target(),
                configuration::merge_bytes(offset, data),
            ) {
                let bytes = value.to_le_bytes();
                self.write_bar(0, bar_offset, &bytes[..len]);
            }
            return;
        }
        self.config.write_reg(reg, offset, data);
        if reg == (self.msix_cap + 2) / 4 {
            self.sync_msix_control();
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG + REGION_SIZE => {
                if let Some(v) = self.read_common(o, data.len()) {
                    data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
                }
            }
            ISR_CFG => {
                // Reading ISR clears it (virtio 1.2, 4.1.4.5).
                data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst) as u8;
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION_SIZE).contains(&o) => {
                self.state.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix.read_table(o - MSIX_TABLE, data)
            }
            o if o >= MSIX_PBA => self.interrupt.msix.read_pba(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG + REGION_SIZE => self.write_common(o, data),
            o if (DEVICE_CFG..DEVICE_CFG + REGION_SIZE).contains(&o) => {
                self.state.device.write_config(o - DEVICE_CFG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            o if (NOTIFY_CFG..NOTIFY_CFG + REGION_SIZE).contains(&o) => {
                self.notify_write(o - NOTIFY_CFG)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix.write_table(o - MSIX_TABLE, data)
            }
            _ => tracing::debug!(
                offset,
                "virtio-pci write to a read-only or unused BAR offset ignored"
            ),
        }
    }
}

/// Lock a transport even if a panic poisoned its mutex (see [`crate::virtio::mmio::lock`]).
pub fn lock(t: &Mutex<VirtioPciDevice>) -> MutexGuard<'_, VirtioPciDevice> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The transport's face on the VMM's event loop: polls the queue notify EventFds (and the device's host-side
/// sources) and runs the device's queue processing there.
pub struct VirtioPciSubscriber {
    transport: Arc<Mutex<VirtioPciDevice>>,
}

impl VirtioPciSubscriber {
    /// A subscriber for `transport`, to add to the event loop's `EventManager`.
    pub fn new(transport: Arc<Mutex<VirtioPciDevice>>) -> Self {
        VirtioPciSubscriber { transport }
    }
}

impl MutEventSubscriber for VirtioPciSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        lock(&self.transport).state.init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        lock(&self.transport).state.process_event(events, ops);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::pci::msix::tests::EventFdSink;
    use crate::pci::{PciEcam, PciMmioWindow, PciRoot};
    use crate::virtio::pmem::{Pmem, PmemConfig};
    use crate::virtio::status;
    use event_manager::SubscriberOps;
    use vm_memory::{Bytes, GuestMemoryMmap};

    pub(crate) const BAR: u64 = 0xc000_8000;
    const ALL_OK: u8 =
        (status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK) as u8;

    pub(crate) fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub(crate) fn pmem_device() -> Pmem {
        let file = tempfile::tempfile().unwrap();
        Pmem::new(
            "pci-test",
            PmemConfig {
                start: 0x1_0000_0000,
                size: 0x20_0000,
            },
            Arc::new(move || file.sync_data()),
        )
        .unwrap()
    }

    /// A driver's view: the root bus through ECAM and the memory window.
    pub(crate) struct Driver {
        pub ecam: PciEcam,
        pub window: PciMmioWindow,
        pub dev: Arc<Mutex<VirtioPciDevice>>,
    }

    impl Driver {
        pub(crate) fn new(sink: Arc<dyn MsiSink>) -> Self {
            let t = VirtioPciDevice::new(mem(), Box::new(pmem_device()), sink, BAR).unwrap();
            let dev = Arc::new(Mutex::new(t));
            let root = PciRoot::new();
            root.add_device(dev.clone()).unwrap();
            let root = Arc::new(root);
            Driver {
                ecam: PciEcam::new(root.clone()),
                window: PciMmioWindow::new(root, 0xc000_0000),
                dev,
            }
        }
        pub(crate) fn cfg_read(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.ecam.read((1 << 15) | off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        pub(crate) fn cfg_write(&mut self, off: u64, v: u64, len: usize) {
            self.ecam.write((1 << 15) | off, &v.to_le_bytes()[..len]);
        }
        pub(crate) fn bar_read(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.window.read(BAR - 0xc000_0000 + off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        pub(crate) fn bar_write(&mut self, off: u64, v: u64, len: usize) {
            self.window
                .write(BAR - 0xc000_0000 + off, &v.to_le_bytes()[..len]);
        }
        /// Walk the capability list: `(offset, id, cfg_type)` for each.
        pub(crate) fn capabilities(&mut self) -> Vec<(u64, u8, u8)> {
            let mut caps = Vec::new();
            let mut at = self.cfg_read(0x34, 1);
            while at != 0 && caps.len() < 48 {
                let id = self.cfg_read(at, 1) as u8;
                // cfg_type for virtio's vendor capabilities; other capabilities have writable bytes there.
                let cfg_type = if id == 0x09 {
                    self.cfg_read(at + 3, 1) as u8
                } else {
                    0
                };
                caps.push((at, id, cfg_type));
                at = self.cfg_read(at + 1, 1);
            }
            caps
        }
        /// The Linux bring-up: features, one queue at `rings` with MSI-X vector 0, config vector 1, DRIVER_OK.
        pub(crate) fn bring_up(&mut self, rings: u64) -> u8 {
            let msix = self
                .capabilities()
                .into_iter()
                .find(|c| c.1 == 0x11)
                .map(|c| c.0)
                .unwrap();
            self.cfg_write(msix + 2, u64::from(MSIX_ENABLE), 2);
            for v in 0..2u64 {
                self.bar_write(MSIX_TABLE + v * 16, 0xfee0_0000, 4);
                self.bar_write(MSIX_TABLE + v * 16 + 8, 0x30 + v, 4);
                self.bar_write(MSIX_TABLE + v * 16 + 12, 0, 4);
            }
            let c = COMMON_CFG;
            self.bar_write(c + common::DEVICE_STATUS, 0, 1);
            self.bar_write(c + common::DEVICE_STATUS, 1, 1);
            self.bar_write(c + common::DEVICE_STATUS, 3, 1);
            self.bar_write(c + common::DRIVER_FEATURE_SELECT, 1, 4);
            self.bar_write(c + common::DRIVER_FEATURE, 1, 4);
            self.bar_write(c + common::DEVICE_STATUS, 0xb, 1);
            self.bar_write(c + common::CONFIG_MSIX_VECTOR, 1, 2);
            self.bar_write(c + common::QUEUE_SELECT, 0, 2);
            self.bar_write(c + common::QUEUE_SIZE, 8, 2);
            self.bar_write(c + common::QUEUE_MSIX_VECTOR, 0, 2);
            self.bar_write(c + common::QUEUE_DESC, rings, 8);
            self.bar_write(c + common::QUEUE_DRIVER, rings.wrapping_add(0x1000), 4);
            self.bar_write(c + common::QUEUE_DRIVER + 4, 0, 4);
            self.bar_write(c + common::QUEUE_DEVICE, rings.wrapping_add(0x2000), 8);
            self.bar_write(c + common::QUEUE_ENABLE, 1, 2);
            self.bar_write(c + common::DEVICE_STATUS, u64::from(ALL_OK), 1);
            self.bar_read(c + common::DEVICE_STATUS, 1) as u8
        }
    }

    #[test]
    fn identity_bar_and_capabilities_as_a_driver_finds_them() {
        let sink = EventFdSink::new(2);
        let mut d = Driver::new(sink);
        assert_eq!(
            d.cfg_read(0, 4),
            0x105b_1af4,
            "virtio vendor, device 0x1040 + 27"
        );
        assert_eq!(d.cfg_read(8, 1), 1, "modern revision");
        assert_eq!(d.cfg_read(0x10, 4), (BAR & 0xffff_fff0) | 0b100);
        // BAR sizing.
        d.cfg_write(0x10, 0xffff_ffff, 4);
        d.cfg_write(0x14, 0xffff_ffff, 4);
        assert_eq!(d.cfg_read(0x10, 4) & !0xf, (!(BAR_SIZE - 1)) & 0xffff_fff0);
        d.cfg_write(0x10, BAR, 4);
        d.cfg_write(0x14, 0, 4);
        let caps = d.capabilities();
        let types: Vec<u8> = caps.iter().filter(|c| c.1 == 0x09).map(|c| c.2).collect();
        assert_eq!(types, [1, 3, 4, 2, 5]);
        let notify = caps.iter().find(|c| c.2 == cap_type::NOTIFY).unwrap().0;
        assert_eq!(d.cfg_read(notify + 16, 4), 4, "notify_off_multiplier");
        assert_eq!(d.cfg_read(notify + 8, 4), NOTIFY_CFG);
        let msix = caps.iter().find(|c| c.1 == 0x11).unwrap().0;
        assert_eq!(
            d.cfg_read(msix + 2, 2),
            1,
            "two vectors: one queue + config"
        );
        assert_eq!(d.cfg_read(msix + 4, 4), MSIX_TABLE);
        assert_eq!(d.cfg_read(msix + 8, 4), MSIX_PBA);
        assert_eq!(d.bar_read(COMMON_CFG + common::NUM_QUEUES, 2), 1);
        // Device config: pmem start at 0, size at 8.
        assert_eq!(d.bar_read(DEVICE_CFG, 8), 0x1_0000_0000);
        assert_eq!(d.bar_read(DEVICE_CFG + 8, 8), 0x20_0000);
    }

    #[test]
    fn msix_vectors_are_validated_and_reset() {
        let sink = EventFdSink::new(2);
        let mut d = Driver::new(sink);
        let c = COMMON_CFG;
        assert_eq!(
            d.bar_read(c + common::CONFIG_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        d.bar_write(c + common::CONFIG_MSIX_VECTOR, 7, 2);
        assert_eq!(
            d.bar_read(c + common::CONFIG_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR),
            "beyond the table"
        );
        d.bar_write(c + common::CONFIG_MSIX_VECTOR, 1, 2);
        assert_eq!(d.bar_read(c + common::CONFIG_MSIX_VECTOR, 2), 1);
        d.bar_write(c + common::QUEUE_SELECT, 5, 2);
        d.bar_write(c + common::QUEUE_MSIX_VECTOR, 0, 2);
        assert_eq!(
            d.bar_read(c + common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR),
            "no queue 5"
        );
        assert_eq!(d.bar_read(c + common::QUEUE_SIZE, 2), 0, "no queue 5");
        d.bar_write(c + common::DEVICE_STATUS, 0, 1);
        assert_eq!(
            d.bar_read(c + common::CONFIG_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
    }

    #[test]
    fn flush_round_trip_raises_the_queue_vector() {
        let sink = EventFdSink::new(2);
        let mut d = Driver::new(sink.clone());
        let rings = 0x1_0000;
        assert_eq!(d.bring_up(rings), ALL_OK);
        assert!(lock(&d.dev).is_activated());
        // One flush request: descriptor 0 (request, 4 bytes) -> descriptor 1 (response, 4 bytes, write).
        let m = lock(&d.dev).state.mem.clone();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&b, GuestAddress(rings + i * 16)).unwrap();
        };
        desc(0, 0x8000, 4, 1, 1);
        desc(1, 0x9000, 4, 2, 0);
        m.write_obj(0u32, GuestAddress(0x8000)).unwrap();
        m.write_obj(0xffu32, GuestAddress(0x9000)).unwrap();
        m.write_obj(0u16, GuestAddress(rings + 0x1000 + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(rings + 0x1000 + 2)).unwrap();
        // The driver's notify (trapped here: no KVM ioeventfd in a unit test) reaches the queue's EventFd.
        d.bar_write(NOTIFY_CFG, 0, 2);
        let mut em = event_manager::EventManager::<VirtioPciSubscriber>::new().unwrap();
        em.add_subscriber(VirtioPciSubscriber::new(d.dev.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while m.read_obj::<u16>(GuestAddress(rings + 0x2000 + 2)).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "flush never answered");
            let _ = em.run_with_timeout(10);
        }
        let wait_vector = |v| {
            while sink.fired(v) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "vector {v} never fired"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        wait_vector(0);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x9000)).unwrap(),
            0,
            "VIRTIO_PMEM_RESP_TYPE_OK"
        );
        assert_eq!(d.bar_read(ISR_CFG, 1), 1, "used-buffer bit");
        assert_eq!(d.bar_read(ISR_CFG, 1), 0, "read to clear");
        // A notify for a queue that was never enabled: DEVICE_NEEDS_RESET and the config vector fires.
        lock(&d.dev).state.queue_notified(0);
        let mut t = lock(&d.dev);
        t.state.queues[0].set_ready(false);
        t.state.queue_notified(0);
        drop(t);
        assert_ne!(
            d.bar_read(COMMON_CFG + common::DEVICE_STATUS, 1) as u32 & status::DEVICE_NEEDS_RESET,
            0
        );
        wait_vector(1);
    }

    #[test]
    fn pci_cfg_capability_reaches_bar_zero() {
        let sink = EventFdSink::new(2);
        let mut d = Driver::new(sink);
        let cap = d
            .capabilities()
            .into_iter()
            .find(|c| c.2 == cap_type::PCI_CFG)
            .unwrap()
            .0;
        d.cfg_write(cap + 4, 0, 1);
        d.cfg_write(cap + 8, COMMON_CFG + common::NUM_QUEUES, 4);
        d.cfg_write(cap + 12, 2, 4);
        assert_eq!(d.cfg_read(cap + 16, 4), 1);
        // Out of the BAR, or a bad length: reads zero, writes nothing.
        d.cfg_write(cap + 8, BAR_SIZE, 4);
        assert_eq!(d.cfg_read(cap + 16, 4), 0);
        d.cfg_write(cap + 8, COMMON_CFG + common::DEVICE_STATUS, 4);
        d.cfg_write(cap + 12, 1, 4);
        d.cfg_write(cap + 16, 1, 4);
        assert_eq!(
            d.bar_read(COMMON_CFG + common::DEVICE_STATUS, 1),
            1,
            "ACKNOWLEDGE through the window"
        );
    }
}
