//! A VFIO device as a function on the guest's PCI bus: its configuration space passed through except what must
//! be emulated (the BARs, which the VMM places; the capability list, which hides MSI; MSI-X enable and mask,
//! which become VFIO interrupt setup), its BARs forwarded to the device region by region with the MSI-X table
//! and pending bits trapped and emulated, and its MSI-X vectors signalled by the device straight into KVM
//! irqfds (no exit to the VMM per interrupt).
//!
//! Everything the guest writes is untrusted: accesses outside a region are dropped by the VFIO wrapper's bounds
//! checks, odd widths into the MSI-X table are ignored by the emulation.

use std::sync::Arc;

use daxvisor_devices::pci::configuration::{merge_bytes, BAR0, CAPABILITIES_POINTER, COMMAND};
use daxvisor_devices::pci::msix::MSIX_CAPABILITY_ID;
use daxvisor_devices::pci::{BarSpec, Msix, PciConfiguration, PciDevice, PciIdentity};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX};
use vfio_ioctls::VfioDevice;

use super::bar_map::BarMap;
use crate::pci::msi_routing::DeviceMsi;

/// The MSI capability id: hidden (the guest uses MSI-X).
const MSI_CAPABILITY_ID: u8 = 0x05;
/// Expansion ROM register: reads as no ROM.
const ROM_BAR: usize = 0x30;
/// Interrupt pin byte: no INTx.
const INTERRUPT_PIN: usize = 0x3d;
const BAR_IO: u32 = 1;
const BAR_MEM_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// One memory BAR of the device, as the VMM placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedBar {
    pub index: usize,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// Where the MSI-X table and PBA are, and the emulation behind them.
struct MsixState {
    cap: usize,
    table: (usize, u64, u64),
    pba: (usize, u64, u64),
    control: u16,
    msix: Msix,
    vectors: Arc<DeviceMsi>,
    enabled_in_vfio: bool,
}

pub struct VfioPciDevice {
    name: String,
    device: Arc<VfioDevice>,
    /// Emulated: the BARs (decoding follows what the guest writes here) and the command register's copy.
    config: PciConfiguration,
    /// Capability offset -> the next pointer the guest sees (MSI left out of the chain).
    next: Vec<(usize, u8)>,
    first_cap: u8,
    msix: Option<MsixState>,
    /// The BARs' mmapped pieces as memory slots (see [`super::bar_map`]), and where the VMM placed each BAR.
    bar_map: Option<BarMap>,
    placed: Vec<(usize, u64)>,
    /// BAR accesses outside the MSI-X table and PBA that exited to the VMM (the mapped pieces never do).
    exits: u64,
}

/// A dword of the device's own configuration space.
pub fn config_read32(device: &VfioDevice, offset: usize) -> u32 {
    let mut b = [0xffu8; 4];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, offset as u64);
    u32::from_le_bytes(b)
}

fn config_byte(device: &VfioDevice, offset: usize) -> u8 {
    (config_read32(device, offset & !3) >> ((offset % 4) * 8)) as u8
}

/// The device's memory BARs (I/O BARs are not passed through).
pub fn memory_bars(device: &VfioDevice) -> Vec<PlacedBar> {
    let mut bars = Vec::new();
    let mut i = 0;
    while i < 6 {
        let size = device.get_region_size(i as u32);
        let reg = config_read32(device, BAR0 + 4 * i);
        let is_64bit = reg & BAR_IO == 0 && reg & 0b110 == BAR_MEM_64;
        if size > 0 && reg & BAR_IO == 0 {
            bars.push(PlacedBar {
                index: i,
                size: size.next_power_of_two().max(16),
                is_64bit,
                prefetchable: reg & BAR_PREFETCHABLE != 0,
            });
        } else if size > 0 {
            tracing::warn!(
                bar = i,
                size,
                "I/O BAR of a passthrough device not passed through"
            );
        }
        i += if is_64bit { 2 } else { 1 };
    }
    bars
}

/// Vectors of the device's MSI-X table (0: no MSI-X).
pub fn msix_table_size(device: &VfioDevice) -> u16 {
    capabilities(device)
        .into_iter()
        .find(|&(_, id)| id == MSIX_CAPABILITY_ID)
        .map_or(0, |(cap, _)| {
            (((config_read32(device, cap) >> 16) as u16) & 0x7ff) + 1
        })
}

/// The capability list: (offset, id) in chain order, bounded against loops.
fn capabilities(device: &VfioDevice) -> Vec<(usize, u8)> {
    let mut caps = Vec::new();
    let mut at = usize::from(config_byte(device, CAPABILITIES_POINTER) & !3);
    while (0x40..0x100).contains(&at) && caps.len() < 48 {
        caps.push((at, config_byte(device, at)));
        at = usize::from(config_byte(device, at + 1) & !3);
    }
    caps
}

impl VfioPciDevice {
    /// `bars` placed at `addresses` (same order); `vectors` gives the MSI-X vectors their GSIs and irqfds.
    pub fn new(
        name: &str,
        device: Arc<VfioDevice>,
        bars: &[(PlacedBar, u64)],
        vectors: Arc<DeviceMsi>,
    ) -> Result<Self, daxvisor_devices::pci::configuration::ConfigurationError> {
        let id = config_read32(&device, 0);
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: id as u16,
            device_id: (id >> 16) as u16,
            revision: 0,
            class_code: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        for &(b, addr) in bars {
            config.add_bar(
                b.index,
                BarSpec {
                    size: b.size,
                    is_64bit: b.is_64bit,
                    prefetchable: b.prefetchable,
                },
                addr,
            )?;
        }
        let caps = capabilities(&device);
        let visible: Vec<(usize, u8)> = caps
            .iter()
            .copied()
            .filter(|&(_, id)| id != MSI_CAPABILITY_ID)
            .collect();
        let next = visible
            .iter()
            .enumerate()
            .map(|(i, &(at, _))| (at, visible.get(i + 1).map_or(0, |&(n, _)| n as u8)))
            .collect();
        let first_cap = visible.first().map_or(0, |&(at, _)| at as u8);
        let msix = visible
            .iter()
            .find(|&&(_, id)| id == MSIX_CAPABILITY_ID)
            .map(|&(cap, _)| {
                let control = (config_read32(&device, cap) >> 16) as u16;
                let n = (control & 0x7ff) + 1;
                let t = config_read32(&device, cap + 4);
                let p = config_read32(&device, cap + 8);
                let table = ((t & 7) as usize, u64::from(t & !7), u64::from(n) * 16);
                let pba = (
                    (p & 7) as usize,
                    u64::from(p & !7),
                    u64::from(n).div_ceil(64) * 8,
                );
                MsixState {
                    cap,
                    table,
                    pba,
                    control: 0,
                    msix: Msix::new(n, vectors.clone()),
                    vectors: vectors.clone(),
                    enabled_in_vfio: false,
                }
            });
        Ok(VfioPciDevice {
            name: name.to_owned(),
            device,
            config,
            next,
            first_cap,
            msix,
            bar_map: None,
            placed: bars.iter().map(|&(b, a)| (b.index, a)).collect(),
            exits: 0,
        })
    }

    /// The ranges of BARs the VMM emulates and must never map: (BAR, offset, length) of the MSI-X table and PBA.
    pub fn trapped_ranges(&self) -> Vec<(usize, u64, u64)> {
        self.msix
            .as_ref()
            .map(|m| vec![m.table, m.pba])
            .unwrap_or_default()
    }

    /// The BARs' mapped pieces, present from now on while each BAR decodes where it was placed.
    pub fn set_bar_map(&mut self, map: BarMap) {
        self.bar_map = Some(map);
        self.sync_bar_map();
    }

    /// Bytes of BAR space the guest reaches without exits now.
    pub fn mapped_bar_bytes(&self) -> u64 {
        self.bar_map.as_ref().map_or(0, BarMap::mapped_bytes)
    }

    fn sync_bar_map(&mut self) {
        let (config, placed) = (&self.config, &self.placed);
        if let Some(map) = self.bar_map.as_mut() {
            map.sync(|bar| {
                let (addr, _) = config.decoded_bar(bar)?;
                placed
                    .iter()
                    .any(|&(b, a)| b == bar && a == addr)
                    .then_some(addr)
            });
        }
    }

    /// MSI-X vectors the device has (0: none).
    pub fn msix_vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.msix.vectors())
    }

    fn set_msix_control(&mut self, control: u16) {
        let Some(m) = &mut self.msix else { return };
        let control = control & 0xc000;
        m.control = control;
        m.msix.set_control(control);
        let enable = control & daxvisor_devices::pci::msix::MSIX_ENABLE != 0;
        if enable && !m.enabled_in_vfio {
            let max = self
                .device
                .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
                .map_or(0, |i| i.count as usize);
            let fds: Vec<_> = m.vectors.irqfds().iter().take(max).collect();
            match self.device.enable_msix(fds) {
                Ok(()) => m.enabled_in_vfio = true,
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "VFIO MSI-X enable failed")
                }
            }
        } else if !enable && m.enabled_in_vfio {
            if let Err(e) = self.device.disable_msix() {
                tracing::error!(device = %self.name, error = %e, "VFIO MSI-X disable failed");
            }
            m.enabled_in_vfio = false;
        }
        tracing::debug!(device = %self.name, control = format_args!("{control:#x}"), "MSI-X control");
    }

    /// Turn MSI-X off in the device (VM end, before reset), and say how its BARs were reached.
    pub fn quiesce(&mut self) {
        self.set_msix_control(0);
        tracing::info!(
            device = %self.name,
            mapped_bytes = self.mapped_bar_bytes(),
            exits = self.exits,
            "passthrough BAR accesses: the mapped pieces never exit; these exited to the VMM"
        );
    }

    /// Which emulated MSI-X structure an access at `offset` of BAR `bar` falls in.
    fn msix_part(&self, bar: usize, offset: u64) -> Option<(bool, u64)> {
        let m = self.msix.as_ref()?;
        let inside = |(b, start, len): (usize, u64, u64)| {
            (b == bar && offset >= start && offset < start + len).then(|| offset - start)
        };
        inside(m.table)
            .map(|o| (true, o))
            .or_else(|| inside(m.pba).map(|o| (false, o)))
    }
}

impl PciDevice for VfioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        let off = reg * 4;
        if (BAR0..BAR0 + 24).contains(&off) {
            return self.config.read_reg(reg);
        }
        if off == ROM_BAR || off >= 0x1000 {
            return if off == ROM_BAR { 0 } else { u32::MAX };
        }
        let mut v = config_read32(&self.device, off);
        if off == CAPABILITIES_POINTER {
            v = (v & !0xff) | u32::from(self.first_cap);
        }
        if off == INTERRUPT_PIN & !3 {
            v &= !(0xff << ((INTERRUPT_PIN % 4) * 8));
        }
        if let Some(&(_, next)) = self.next.iter().find(|&&(at, _)| at == off) {
            v = (v & !0xff00) | (u32::from(next) << 8);
        }
        if let Some(m) = self.msix.as_ref().filter(|m| m.cap == off) {
            v = (v & !(0xc000 << 16)) | (u32::from(m.control) << 16);
        }
        v
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let off = reg * 4;
        if (BAR0..BAR0 + 24).contains(&off) {
            self.config.write_reg(reg, offset, data);
            self.sync_bar_map();
            return;
        }
        if off == ROM_BAR || off >= 0x1000 || offset + data.len() > 4 {
            return;
        }
        if let Some(cap) = self.msix.as_ref().map(|m| m.cap).filter(|&c| c == off) {
            // Message control (bytes 2-3) is emulated; the rest of the capability is read-only.
            if offset + data.len() > 2 {
                if let Some((value, mask)) = merge_bytes(offset, data) {
                    let old = self.read_config(cap / 4);
                    let new = (old & !mask) | (value & mask);
                    self.set_msix_control((new >> 16) as u16);
                }
            }
            return;
        }
        if off == COMMAND {
            self.config.write_reg(reg, offset, data);
            self.sync_bar_map();
        }
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, (off + offset) as u64);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (self.msix_part(bar, offset), &self.msix) {
            (Some((true, o)), Some(m)) => m.msix.read_table(o, data),
            (Some((false, o)), Some(m)) => m.msix.read_pba(o, data),
            _ => {
                self.exits += 1;
                self.device.region_read(bar as u32, data, offset)
            }
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (self.msix_part(bar, offset), &self.msix) {
            (Some((true, o)), Some(m)) => m.msix.write_table(o, data),
            (Some((false, _)), Some(_)) => {}
            _ => {
                self.exits += 1;
                self.device.region_write(bar as u32, data, offset)
            }
        }
    }
}
