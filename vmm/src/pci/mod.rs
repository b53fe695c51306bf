//! The VMM side of PCI (`--transport pci`): the root bus on the port-I/O and MMIO buses, BAR and GSI
//! allocation, and virtio devices as virtio-pci functions with MSI-X through KVM ([`msi_routing`]).
//!
//! - ECAM for bus 0 at [`layout::PCI_ECAM_BASE`] (described by the MCFG table), the legacy 0xCF8/0xCFC ports,
//!   and the 32-bit BAR window [`layout::PCI_MMIO32_BASE`] and the 64-bit window (after the pmem regions) on the
//!   MMIO bus, each forwarding an access to the BAR that decodes it.
//! - BARs come from a `vm-allocator` address allocator over the 32-bit window; GSIs for MSI-X vectors from a
//!   `vm-allocator` id allocator.
//! - Queue notifications are ioeventfds on each queue's notify address in BAR 0 (any width, no datamatch), so
//!   a kick never exits to the VMM. A driver that moves BAR 0 still works: its notify writes then exit and the
//!   transport feeds the same EventFd.

pub mod msi_routing;

use std::sync::{Arc, Mutex};

use daxvisor_devices::bus::{Bus, BusError};
use daxvisor_devices::pci::root::{CONFIG_ADDRESS_PORT, CONFIG_IO_PORTS};
use daxvisor_devices::pci::{PciConfigIo, PciEcam, PciMmioWindow, PciRoot, PciRootError};
use daxvisor_devices::virtio::mmio::TransportError;
use daxvisor_devices::virtio::pci::{VirtioPciDevice, VirtioPciSubscriber, BAR_SIZE};
use daxvisor_devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::GuestMemoryMmap;

use crate::event_loop::Subscriber;
use crate::layout;
use msi_routing::{DeviceMsi, MsiRouting};

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("cannot allocate a {size:#x}-byte BAR in the PCI window: {source}")]
    Bar {
        size: u64,
        source: vm_allocator::Error,
    },
    #[error("no GSI left for MSI-X vectors ({first}..={last}): {source}", first = layout::MSI_GSI_FIRST, last = layout::MSI_GSI_LAST)]
    Gsi { source: vm_allocator::Error },
    #[error("PCI allocator setup: {0}")]
    Allocator(vm_allocator::Error),
    #[error(transparent)]
    Root(#[from] PciRootError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("virtio-pci transport: {0}")]
    Transport(#[from] TransportError),
    #[error("passthrough device configuration: {0}")]
    Config(daxvisor_devices::pci::configuration::ConfigurationError),
    #[error("MSI-X setup (GSI routing, irqfd): {0}")]
    Msi(std::io::Error),
    #[error("mapping a passthrough device's BARs into the guest (mmap, memory slot): {0}")]
    BarMap(std::io::Error),
    #[error("cannot register a queue notification (ioeventfd) at {addr:#x}: {source}")]
    Ioevent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// One virtio-pci function as placed at build time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Device number on bus 0.
    pub device: u8,
    /// Guest-physical address of BAR 0.
    pub bar: u64,
    /// Virtio device id.
    pub device_id: u32,
    /// First GSI of its MSI-X vectors, and how many.
    pub first_gsi: u32,
    pub vectors: u16,
}

/// What ACPI describes: MCFG and the host bridge's `_CRS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciLayout {
    pub ecam_base: u64,
    pub ecam_size: u64,
    /// Last bus number ECAM covers (buses 0..=bus_end).
    pub bus_end: u8,
    pub mmio32: (u64, u64),
    pub mmio64: (u64, u64),
    /// With `--pmem-hotplug`: the generic event device's interrupt (ACPI PCI hotplug, `acpi::hotplug`).
    pub hotplug_irq: Option<u32>,
    /// With the virtual IOMMU: the topology ACPI VIOT describes (`acpi::viot`).
    pub viot: Option<crate::acpi::viot::Topology>,
}

/// What a placed function holds on the bus, given back when it is removed.
struct Placed {
    transport: Arc<Mutex<VirtioPciDevice>>,
    bar: vm_allocator::RangeInclusive,
    gsis: Vec<u32>,
}

/// The root bus and its allocators.
pub struct PciBus {
    root: Arc<PciRoot>,
    bars: AddressAllocator,
    gsis: IdAllocator,
    routing: Arc<MsiRouting>,
    pub functions: Vec<PciFunction>,
    placed: std::collections::HashMap<u8, Placed>,
}

impl PciBus {
    /// Put the root bus on `pio` (0xCF8..0xCFF) and `mmio` (ECAM and the 32-bit BAR window).
    pub fn new(kvm: &Kvm, vm: &VmFd, pio: &mut Bus, mmio: &mut Bus) -> Result<Self, PciError> {
        let root = Arc::new(PciRoot::new());
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            CONFIG_ADDRESS_PORT,
            CONFIG_IO_PORTS,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            layout::PCI_ECAM_BASE,
            layout::PCI_ECAM_SIZE,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciMmioWindow::new(
                root.clone(),
                layout::PCI_MMIO32_BASE,
            ))),
            layout::PCI_MMIO32_BASE,
            layout::PCI_MMIO32_SIZE,
        )?;
        Ok(PciBus {
            root,
            bars: AddressAllocator::new(layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE)
                .map_err(PciError::Allocator)?,
            gsis: IdAllocator::new(layout::MSI_GSI_FIRST, layout::MSI_GSI_LAST)
                .map_err(PciError::Allocator)?,
            routing: Arc::new(MsiRouting::new(kvm, vm).map_err(PciError::Msi)?),
            functions: Vec::new(),
            placed: std::collections::HashMap::new(),
        })
    }

    /// `device` as a virtio-pci function: BAR 0 allocated, one GSI + irqfd per MSI-X vector, one ioeventfd
    /// per queue. Returns the function and the subscriber the caller adds to the event loop. `mem` is guest
    /// RAM only.
    pub fn add_virtio_device(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(PciFunction, Subscriber), PciError> {
        let range = self
            .bars
            .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
            .map_err(|source| PciError::Bar {
                size: BAR_SIZE,
                source,
            })?;
        let bar = range.start();
        // One vector per queue plus one for configuration changes.
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let gsis = self.allocate_gsis(vectors)?;
        let first_gsi = gsis.first().copied().unwrap_or(0);
        let msi = DeviceMsi::new(self.routing.clone(), vm, gsis.clone()).map_err(PciError::Msi)?;
        let transport = VirtioPciDevice::new(mem.clone(), device, Arc::new(msi), bar)?;
        for (fd, offset) in transport.queue_notify_fds() {
            let addr = bar + offset;
            vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| PciError::Ioevent { addr, source })?;
        }
        let function = PciFunction {
            device: 0,
            bar,
            device_id: transport.device_type(),
            first_gsi,
            vectors: transport.msix_vectors(),
        };
        let transport = Arc::new(Mutex::new(transport));
        let device = self.root.add_device(transport.clone())?;
        let function = PciFunction { device, ..function };
        self.functions.push(function);
        self.placed.insert(
            device,
            Placed {
                transport: transport.clone(),
                bar: range,
                gsis,
            },
        );
        tracing::debug!(
            device,
            bar = format_args!("{bar:#x}"),
            device_id = function.device_id,
            first_gsi,
            vectors,
            "virtio-pci function placed"
        );
        let subscriber: Subscriber = Arc::new(Mutex::new(VirtioPciSubscriber::new(transport)));
        Ok((function, subscriber))
    }

    /// `n` GSIs for one function's MSI-X vectors; on failure the ones already taken go back.
    fn allocate_gsis(&mut self, n: u16) -> Result<Vec<u32>, PciError> {
        let mut gsis = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            match self.gsis.allocate_id() {
                Ok(gsi) => gsis.push(gsi),
                Err(source) => {
                    for gsi in gsis {
                        let _ = self.gsis.free_id(gsi);
                    }
                    return Err(PciError::Gsi { source });
                }
            }
        }
        Ok(gsis)
    }

    /// Take function `device` off the bus (hot remove): its queue notifications leave KVM, its BAR range and
    /// GSIs go back to the allocators. Returns its transport for the caller to drop (dropping it closes its
    /// irqfds, which KVM then releases, and ends the device's workers).
    pub fn remove_virtio_device(
        &mut self,
        vm: &VmFd,
        device: u8,
    ) -> Option<Arc<Mutex<VirtioPciDevice>>> {
        let placed = self.placed.remove(&device)?;
        self.root.remove_device(device);
        {
            let t = daxvisor_devices::virtio::pci::lock(&placed.transport);
            let bar = placed.bar.start();
            for (fd, offset) in t.queue_notify_fds() {
                if let Err(e) =
                    vm.unregister_ioevent(fd, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                {
                    tracing::warn!(device, error = %e, "cannot unregister a queue notification");
                }
            }
        }
        if let Err(e) = self.bars.free(&placed.bar) {
            tracing::warn!(device, error = %e, "cannot free a BAR range");
        }
        for gsi in placed.gsis {
            if let Err(e) = self.gsis.free_id(gsi) {
                tracing::warn!(device, gsi, error = %e, "cannot free a GSI");
            }
        }
        self.functions.retain(|f| f.device != device);
        Some(placed.transport)
    }

    /// A passthrough device as a function: its memory BARs placed in the 32-bit window, one GSI + irqfd per
    /// MSI-X vector (the device signals the irqfds itself). Returns the function as the root bus holds it.
    pub fn add_vfio_device(
        &mut self,
        vm: &mut crate::vstate::vm::Vm,
        name: &str,
        device: Arc<vfio_ioctls::VfioDevice>,
    ) -> Result<(PciFunction, Arc<Mutex<crate::vfio::VfioPciDevice>>), PciError> {
        let bars = crate::vfio::pci_device::memory_bars(&device);
        let mut placed = Vec::with_capacity(bars.len());
        for b in bars {
            let align = b.size.max(4096);
            let range = self
                .bars
                .allocate(align, align, AllocPolicy::FirstMatch)
                .map_err(|source| PciError::Bar {
                    size: b.size,
                    source,
                })?;
            placed.push((b, range.start()));
        }
        let vectors = crate::vfio::pci_device::msix_table_size(&device);
        let gsis = self.allocate_gsis(vectors)?;
        let first_gsi = gsis.first().copied().unwrap_or(0);
        let msi =
            Arc::new(DeviceMsi::new(self.routing.clone(), vm.fd(), gsis).map_err(PciError::Msi)?);
        let mut function = crate::vfio::VfioPciDevice::new(name, device.clone(), &placed, msi)
            .map_err(PciError::Config)?;
        let bars: Vec<(usize, u64, u64)> =
            placed.iter().map(|(b, a)| (b.index, *a, b.size)).collect();
        let map = crate::vfio::BarMap::new(name, &device, vm, &bars, &function.trapped_ranges())
            .map_err(PciError::BarMap)?;
        function.set_bar_map(map);
        let vectors = function.msix_vectors();
        let function = Arc::new(Mutex::new(function));
        let slot = self.root.add_device(function.clone())?;
        let bar = placed.first().map_or(0, |&(_, a)| a);
        let placed_function = PciFunction {
            device: slot,
            bar,
            device_id: 0,
            first_gsi,
            vectors,
        };
        self.functions.push(placed_function);
        tracing::info!(
            device = name,
            slot,
            bars = ?placed.iter().map(|(b, a)| format!("{}@{a:#x}+{:#x}", b.index, b.size)).collect::<Vec<_>>(),
            first_gsi,
            vectors,
            "passthrough function placed"
        );
        Ok((placed_function, function))
    }

    /// Put the 64-bit window (after `highest_end`, the end of RAM and pmem) on `mmio`, so a BAR the driver moves
    /// there still decodes, and say what ACPI must describe.
    pub fn place_mmio64_window(
        &mut self,
        mmio: &mut Bus,
        highest_end: u64,
    ) -> Result<PciLayout, PciError> {
        let layout = self.layout(highest_end);
        let (base, size) = layout.mmio64;
        mmio.insert(
            Arc::new(Mutex::new(PciMmioWindow::new(self.root.clone(), base))),
            base,
            size,
        )?;
        Ok(layout)
    }

    /// What ACPI must describe, with the 64-bit window after `highest_end` (the end of RAM and pmem).
    pub fn layout(&self, highest_end: u64) -> PciLayout {
        PciLayout {
            ecam_base: layout::PCI_ECAM_BASE,
            ecam_size: layout::PCI_ECAM_SIZE,
            bus_end: ((layout::PCI_ECAM_SIZE >> 20) - 1) as u8,
            mmio32: (layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE),
            mmio64: layout::pci_mmio64_window(highest_end),
            hotplug_irq: None,
            viot: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daxvisor_devices::pci::{MsiMessage, MsiSink};
    use daxvisor_devices::virtio::pmem::{Pmem, PmemConfig};
    use vm_memory::GuestAddress;

    fn pmem() -> Box<dyn VirtioDevice> {
        let file = tempfile::tempfile().unwrap();
        Box::new(
            Pmem::new(
                "pci-unit",
                PmemConfig {
                    start: 1 << 32,
                    size: 2 << 20,
                },
                std::sync::Arc::new(move || file.sync_data()),
            )
            .unwrap(),
        )
    }

    /// On this machine's KVM: two functions get distinct, aligned BARs in the 32-bit window and their own GSIs;
    /// the ECAM and BAR window answer on the MMIO bus; a route for a vector goes through KVM_SET_GSI_ROUTING.
    #[test]
    fn functions_get_bars_gsis_and_routes_on_real_kvm() {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "prerequisite missing under CI=true: /dev/kvm"
            );
            eprintln!("SKIP: no /dev/kvm");
            return;
        }
        let vm = crate::vstate::vm::Vm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let mut bus = PciBus::new(vm.kvm(), vm.fd(), &mut pio, &mut mmio).unwrap();
        let (a, _) = bus.add_virtio_device(vm.fd(), &mem, pmem()).unwrap();
        let (b, _) = bus.add_virtio_device(vm.fd(), &mem, pmem()).unwrap();
        assert_eq!((a.device, b.device), (1, 2));
        assert_eq!(a.bar % BAR_SIZE, 0);
        assert!(b.bar >= a.bar + BAR_SIZE || a.bar >= b.bar + BAR_SIZE);
        assert!(
            (layout::PCI_MMIO32_BASE..layout::PCI_MMIO32_BASE + layout::PCI_MMIO32_SIZE)
                .contains(&b.bar)
        );
        assert_eq!((a.first_gsi, a.vectors), (layout::MSI_GSI_FIRST, 2));
        assert_eq!(b.first_gsi, layout::MSI_GSI_FIRST + 2);
        // Device 1's vendor/device id through ECAM on the MMIO bus, and its BAR 0 (num_queues) through the window.
        let mut id = [0u8; 4];
        assert!(mmio.read(layout::PCI_ECAM_BASE + (1 << 15), &mut id));
        assert_eq!(u32::from_le_bytes(id), 0x105b_1af4);
        let mut nq = [0u8; 2];
        assert!(mmio.read(a.bar + 0x12, &mut nq));
        assert_eq!(u16::from_le_bytes(nq), 1);
        // The legacy ports are on the port-I/O bus.
        assert!(pio.write(0xcf8, &0x8000_0800u32.to_le_bytes()));
        assert!(pio.read(0xcfc, &mut id));
        assert_eq!(u32::from_le_bytes(id), 0x105b_1af4);
        // A route through real KVM_SET_GSI_ROUTING, with the irqchip defaults kept.
        let routing = MsiRouting::new(vm.kvm(), vm.fd()).unwrap();
        routing
            .set_msi(
                a.first_gsi,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40,
                },
            )
            .unwrap();
        let sink = DeviceMsi::new(std::sync::Arc::new(routing), vm.fd(), vec![100]).unwrap();
        sink.route(
            0,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        )
        .unwrap();
        sink.signal(0).unwrap();
        assert!(sink.signal(1).is_err(), "no vector 1");
        let layout = bus.place_mmio64_window(&mut mmio, 5 << 30).unwrap();
        assert_eq!(layout.mmio64, (5 << 30, layout::PCI_MMIO64_SIZE));
        assert_eq!(layout.bus_end, 0);
        // Device 1's BAR 0 moved into the 64-bit window still decodes there.
        assert!(mmio.write(
            layout::PCI_ECAM_BASE + (1 << 15) + 0x10,
            &0x4000_0000u32.to_le_bytes()
        ));
        assert!(mmio.write(
            layout::PCI_ECAM_BASE + (1 << 15) + 0x14,
            &1u32.to_le_bytes()
        ));
        assert!(mmio.read((5 << 30) + 0x12, &mut nq));
        assert_eq!(u16::from_le_bytes(nq), 1);
    }
}
