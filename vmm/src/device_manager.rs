//! Creates the devices, places them on the port-I/O and MMIO buses, and wires their interrupts (irqfd) and
//! notifications (ioeventfd) into KVM. The one place that knows which device sits where.

use std::io::Write;
use std::sync::{Arc, Mutex};

use daxvisor_devices::bus::{Bus, BusDevice, BusError};
use daxvisor_devices::legacy::acpi_sleep::SLEEP_CONTROL_PORT;
use daxvisor_devices::legacy::{AcpiSleep, ExitPort, Serial, VmExitStatus, VmStopper, I8042};
use daxvisor_devices::virtio::mmio::TransportError;
use daxvisor_devices::virtio::{MmioSubscriber, MmioTransport, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::Subscriber;
use crate::layout;

const SERIAL_PORT: u64 = daxvisor_proto::boot::SERIAL_PORT as u64;
const I8042_PORT: u64 = 0x60;
const EXIT_PORT: u64 = daxvisor_proto::boot::EXIT_PORT as u64;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register an interrupt for {what}: {source}")]
    Irqfd {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("virtio transport: {0}")]
    Transport(#[from] TransportError),
    #[error("cannot register a queue notification (ioeventfd) at {addr:#x}: {source}")]
    Ioevent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error(
        "no free virtio-mmio slot: at most {} devices",
        layout::MAX_VIRTIO_DEVICES
    )]
    NoVirtioSlot,
    #[error("PCI: {0}")]
    Pci(#[from] crate::pci::PciError),
}

/// A virtio-mmio window handed out to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
    pub device_id: u32,
}

pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit_status: VmExitStatus,
    pub virtio_slots: Vec<VirtioSlot>,
    /// The PCI root bus when virtio devices go on PCI (`--transport pci`); see [`DeviceManager::enable_pci`].
    pub pci: Option<crate::pci::PciBus>,
}

impl DeviceManager {
    /// Legacy devices: COM1 (writing to `serial_out`), the i8042 reset line and the exit port. `stopper` ends
    /// the VM when the guest resets, powers off or writes an exit status.
    pub fn new(
        vm: &VmFd,
        serial_out: Box<dyn Write + Send>,
        stopper: &VmStopper,
    ) -> Result<Self, DeviceError> {
        let mut dm = DeviceManager {
            pio: Bus::new(),
            mmio: Bus::new(),
            exit_status: VmExitStatus::new(),
            virtio_slots: Vec::new(),
            pci: None,
        };

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                what: "serial",
                source,
            })?;
        dm.pio.insert(
            Arc::new(Mutex::new(Serial::new(serial_irq, serial_out))),
            SERIAL_PORT,
            8,
        )?;

        dm.pio.insert(
            Arc::new(Mutex::new(I8042::new(stopper.clone()))),
            I8042_PORT,
            5,
        )?;
        dm.pio.insert(
            Arc::new(Mutex::new(ExitPort::new(
                dm.exit_status.clone(),
                stopper.clone(),
            ))),
            EXIT_PORT,
            4,
        )?;
        dm.pio.insert(
            Arc::new(Mutex::new(AcpiSleep::new(stopper.clone()))),
            u64::from(SLEEP_CONTROL_PORT),
            2,
        )?;
        Ok(dm)
    }

    /// At VM stop, once no vCPU runs: drop every device (a virtio-pmem device answers its queued flushes and
    /// joins its flush worker as it goes).
    pub fn drop_buses(&mut self) {
        self.mmio = Bus::new();
        self.pio = Bus::new();
    }

    /// Reserve the next virtio-mmio window for a device of type `device_id`.
    pub fn allocate_virtio_slot(&mut self, device_id: u32) -> Result<VirtioSlot, DeviceError> {
        let index = self.virtio_slots.len();
        if index >= layout::MAX_VIRTIO_DEVICES {
            return Err(DeviceError::NoVirtioSlot);
        }
        let (base, irq) = layout::virtio_mmio_slot(index);
        let slot = VirtioSlot {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            irq,
            device_id,
        };
        self.virtio_slots.push(slot);
        Ok(slot)
    }

    /// Put a device (a virtio-mmio transport) in its window.
    pub fn insert_mmio(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        slot: &VirtioSlot,
    ) -> Result<(), DeviceError> {
        self.mmio.insert(device, slot.base, slot.size)?;
        Ok(())
    }

    /// Put the PCI root bus on the buses; virtio devices added from now on become virtio-pci functions.
    pub fn enable_pci(&mut self, kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> Result<(), DeviceError> {
        self.pci = Some(crate::pci::PciBus::new(
            kvm,
            vm,
            &mut self.pio,
            &mut self.mmio,
        )?);
        Ok(())
    }

    /// With PCI: place the 64-bit window after `highest_end` (the end of RAM and the pmem regions) on the MMIO
    /// bus and say what ACPI must describe. Call once, after the last virtio device and before the vCPUs take
    /// their copies of the buses.
    pub fn finish_pci(
        &mut self,
        highest_end: u64,
    ) -> Result<Option<crate::pci::PciLayout>, DeviceError> {
        match &mut self.pci {
            Some(pci) => Ok(Some(pci.place_mmio64_window(&mut self.mmio, highest_end)?)),
            None => Ok(None),
        }
    }

    /// Register a virtio device: on PCI when [`DeviceManager::enable_pci`] was called (the returned slot is
    /// then BAR 0, with no IRQ line: interrupts are MSI-X), else a virtio-mmio transport in the next free window, its irqfd on the window's
    /// IRQ, one ioeventfd per queue on the QueueNotify register (datamatch = queue index). Returns the window
    /// and the subscriber the caller must add to the [`crate::event_loop::EventLoop`] (queue notifications are
    /// processed there). `mem` is guest RAM only: devices never dereference pmem windows.
    pub fn add_virtio_device(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(VirtioSlot, Subscriber), DeviceError> {
        if let Some(pci) = &mut self.pci {
            let (f, subscriber) = pci.add_virtio_device(vm, mem, device)?;
            let slot = VirtioSlot {
                base: f.bar,
                size: daxvisor_devices::virtio::pci::BAR_SIZE,
                irq: 0,
                device_id: f.device_id,
            };
            return Ok((slot, subscriber));
        }
        let transport = MmioTransport::new(mem.clone(), device)?;
        let slot = self.allocate_virtio_slot(transport.device_type())?;
        vm.register_irqfd(transport.irqfd(), slot.irq)
            .map_err(|source| DeviceError::Irqfd {
                what: "virtio",
                source,
            })?;
        for q in transport.queue_notify_fds() {
            let addr = slot.base + q.offset;
            vm.register_ioevent(q.fd, &IoEventAddress::Mmio(addr), q.datamatch)
                .map_err(|source| DeviceError::Ioevent { addr, source })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.insert_mmio(transport.clone(), &slot)?;
        let subscriber: Subscriber = Arc::new(Mutex::new(MmioSubscriber::new(transport)));
        Ok((slot, subscriber))
    }

    /// `virtio_mmio.device=` arguments for kernels that discover devices from the command line.
    pub fn virtio_cmdline_args(&self) -> String {
        self.virtio_slots
            .iter()
            .map(|s| {
                format!(
                    " virtio_mmio.device={}K@{:#x}:{}",
                    s.size >> 10,
                    s.base,
                    s.irq
                )
            })
            .collect()
    }
}
