//! The root bus: a host bridge at 00.0 and up to 31 devices on bus 0, reached through ECAM (MMCONFIG) or the
//! legacy 0xCF8/0xCFC ports, and the memory windows their BARs decode in.
//!
//! Only bus 0, function 0 of each device exists; everything else reads as all ones (no device) and ignores
//! writes. BAR accesses come through [`PciMmioWindow`], which covers a whole PCI memory window on the MMIO bus
//! and forwards each access to the device whose BAR decodes that address now, so a driver that moves a BAR is
//! followed without re-arranging the bus.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::configuration::{extract_bytes, PciConfiguration, PciIdentity};
use super::PciDevice;
use crate::bus::BusDevice;

/// Bytes of ECAM space per bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Legacy configuration address port.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// Ports from 0xCF8: the address dword and the data dword.
pub const CONFIG_IO_PORTS: u64 = 8;
/// Device numbers 1..=31 are free for devices (0 is the host bridge).
pub const MAX_DEVICES: usize = 31;

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// Why a device could not be added to the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    /// All 31 device numbers are taken.
    #[error("the PCI bus is full ({MAX_DEVICES} devices)")]
    BusFull,
}

/// The host bridge: identification only, no BARs.
struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0 and what sits on it. The VMM adds devices while it builds the VM (the bus may already be on the
/// port-I/O and MMIO buses then) and while it runs (hot add); a hot-removed device leaves its number empty
/// (reads as no device) until a later add takes it.
pub struct PciRoot {
    devices: RwLock<Vec<Option<SharedDevice>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfiguration::new(PciIdentity {
                vendor_id: 0x1b36,
                device_id: 0x0008,
                revision: 0,
                class_code: 0x06_00_00,
                subsystem_vendor_id: 0x1b36,
                subsystem_id: 0,
            }),
        };
        PciRoot {
            devices: RwLock::new(vec![Some(Arc::new(Mutex::new(bridge)))]),
        }
    }

    fn devices(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<SharedDevice>>> {
        // Entries are only pushed or swapped whole; a panic elsewhere leaves the list whole.
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Put `device` at the next free device number, which is returned.
    pub fn add_device(&self, device: SharedDevice) -> Result<u8, PciRootError> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some(free) = devices.iter().position(Option::is_none) {
            devices[free] = Some(device);
            return Ok(free as u8);
        }
        if devices.len() > MAX_DEVICES {
            return Err(PciRootError::BusFull);
        }
        devices.push(Some(device));
        Ok((devices.len() - 1) as u8)
    }

    /// Take device number `device` off the bus (hot remove); `None` if nothing is there. The host bridge stays.
    pub fn remove_device(&self, device: u8) -> Option<SharedDevice> {
        if device == 0 {
            return None;
        }
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        devices.get_mut(usize::from(device))?.take()
    }

    /// Number of device numbers in use, the host bridge included.
    pub fn device_count(&self) -> usize {
        self.devices().iter().filter(|d| d.is_some()).count()
    }

    fn function(&self, bus: u64, device: u64, function: u64) -> Option<SharedDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices().get(usize::try_from(device).ok()?)?.clone()
    }

    /// Read `data.len()` bytes (1, 2 or 4, within one dword) at `reg_offset` of a function's space.
    pub fn config_read(
        &self,
        bus: u64,
        device: u64,
        function: u64,
        reg_offset: u64,
        data: &mut [u8],
    ) {
        let Some(dev) = self.function(bus, device, function) else {
            data.fill(0xff);
            return;
        };
        let value = lock(&dev).read_config((reg_offset / 4) as usize);
        extract_bytes(value, (reg_offset % 4) as usize, data);
    }

    /// Write `data` (1, 2 or 4 bytes within one dword) at `reg_offset` of a function's space.
    pub fn config_write(&self, bus: u64, device: u64, function: u64, reg_offset: u64, data: &[u8]) {
        if let Some(dev) = self.function(bus, device, function) {
            lock(&dev).write_config((reg_offset / 4) as usize, (reg_offset % 4) as usize, data);
        }
    }

    /// The device and BAR decoding `[addr, addr + len)` now, with the offset of `addr` in the BAR.
    fn bar_at(&self, addr: u64, len: usize) -> Option<(SharedDevice, usize, u64)> {
        self.devices().iter().flatten().find_map(|dev| {
            let d = lock(dev);
            (0..super::configuration::NUM_BARS).find_map(|bar| {
                let (base, size) = d.config().decoded_bar(bar)?;
                let offset = addr.checked_sub(base)?;
                (offset.checked_add(len as u64)? <= size).then(|| (dev.clone(), bar, offset))
            })
        })
    }

    /// A memory read at guest-physical `addr`; all ones when no BAR decodes it.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) {
        match self.bar_at(addr, data.len()) {
            Some((dev, bar, offset)) => lock(&dev).read_bar(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    /// A memory write at guest-physical `addr`; dropped when no BAR decodes it.
    pub fn bar_write(&self, addr: u64, data: &[u8]) {
        match self.bar_at(addr, data.len()) {
            Some((dev, bar, offset)) => lock(&dev).write_bar(bar, offset, data),
            None => tracing::debug!(addr, "PCI memory write decoded by no BAR"),
        }
    }
}

fn lock(dev: &SharedDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device's registers stay consistent across a panic elsewhere; keep serving the others.
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// ECAM: configuration space as memory, 4 KiB per function. Place it on the MMIO bus at the MCFG base.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// ECAM access to `root`'s bus 0 (the window may cover more buses; they hold nothing).
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }
}

fn ecam_decode(offset: u64) -> (u64, u64, u64, u64) {
    (
        offset >> 20,
        (offset >> 15) & 0x1f,
        (offset >> 12) & 7,
        offset & 0xfff,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        self.root.config_write(bus, dev, func, reg, data);
    }
}

/// Configuration mechanism #1: the address dword at 0xCF8 (enable bit, bus, device, function, register) and
/// the data window at 0xCFC..0xCFF. Place it on the port-I/O bus at [`CONFIG_ADDRESS_PORT`].
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// Legacy configuration access to `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// `(bus, device, function, register offset)` for a data access at `offset` into 0xCFC, or None when
    /// the enable bit is clear.
    fn target(&self, data_offset: u64) -> Option<(u64, u64, u64, u64)> {
        let a = u64::from(self.address);
        if a & (1 << 31) == 0 {
            return None;
        }
        Some((
            (a >> 16) & 0xff,
            (a >> 11) & 0x1f,
            (a >> 8) & 7,
            (a & 0xfc) + data_offset,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((b, d, f, r)) => self.root.config_read(b, d, f, r, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Bits 30:24 are reserved and 1:0 must read as zero.
                    self.address = u32::from_le_bytes(b) & 0x80ff_fffc;
                }
            }
            4..=7 => {
                if let Some((b, d, f, r)) = self.target(offset - 4) {
                    self.root.config_write(b, d, f, r, data);
                }
            }
            _ => {}
        }
    }
}

/// A PCI memory window on the MMIO bus (inserted at `base`), forwarding accesses to the BAR that decodes them.
pub struct PciMmioWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciMmioWindow {
    /// A window starting at guest-physical `base`.
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciMmioWindow { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.base.checked_add(offset) {
            Some(addr) => self.root.bar_read(addr, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(addr) = self.base.checked_add(offset) {
            self.root.bar_write(addr, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::configuration::BarSpec;
    use super::*;

    /// A device with one 4 KiB BAR of scratch memory.
    struct Scratch {
        config: PciConfiguration,
        mem: Vec<u8>,
    }

    impl PciDevice for Scratch {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.mem[o..o + data.len()]);
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.mem[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn scratch(addr: u64) -> Arc<Mutex<Scratch>> {
        let mut config = PciConfiguration::new(PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1234,
            revision: 1,
            class_code: 0xff_00_00,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        let spec = BarSpec {
            size: 0x1000,
            is_64bit: false,
            prefetchable: false,
        };
        config.add_bar(0, spec, addr).unwrap();
        config.enable_memory();
        Arc::new(Mutex::new(Scratch {
            config,
            mem: vec![0; 0x1000],
        }))
    }

    fn root_with_two() -> Arc<PciRoot> {
        let root = PciRoot::new();
        assert_eq!(root.add_device(scratch(0xc000_0000)).unwrap(), 1);
        assert_eq!(root.add_device(scratch(0xc000_1000)).unwrap(), 2);
        Arc::new(root)
    }

    fn ecam_read32(e: &mut PciEcam, dev: u64, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        e.read((dev << 15) | reg, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ecam_enumerates_bus_zero_function_zero_only() {
        let root = root_with_two();
        let mut e = PciEcam::new(root);
        assert_eq!(ecam_read32(&mut e, 0, 0), 0x0008_1b36);
        assert_eq!(ecam_read32(&mut e, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(ecam_read32(&mut e, 1, 0), 0x1234_1af4);
        assert_eq!(ecam_read32(&mut e, 3, 0), u32::MAX, "empty slot");
        assert_eq!(ecam_read32(&mut e, 1, 0x1000 - 4), 0, "extended space");
        let mut b = [0u8; 4];
        e.read((1 << 20) | (1 << 15), &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 is empty");
        e.read((1 << 15) | (1 << 12), &mut b);
        assert_eq!(b, [0xff; 4], "function 1 is empty");
        let mut w = [0u8; 2];
        e.read((1 << 15) | 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1234);
        e.read((1 << 15) | 3, &mut w);
        assert_eq!(w, [0xff; 2], "misaligned");
    }

    #[test]
    fn legacy_ports_reach_the_same_space() {
        let root = root_with_two();
        let mut io = PciConfigIo::new(root.clone());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4], "enable bit clear");
        io.write(0, &(0x8000_0000u32 | (1 << 11)).to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1234_1af4);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1234);
        // BAR0 via the ports; sizing.
        io.write(0, &(0x8000_0000u32 | (1 << 11) | 0x10).to_le_bytes());
        io.write(4, &[0xff; 4]);
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_f000);
    }

    #[test]
    fn bar_window_follows_the_bars() {
        let root = root_with_two();
        let mut window = PciMmioWindow::new(root.clone(), 0xc000_0000);
        window.write(0x1008, &[7, 7]);
        let mut b = [0u8; 2];
        window.read(0x1008, &mut b);
        assert_eq!(b, [7, 7]);
        window.read(0x2000, &mut b);
        assert_eq!(b, [0xff; 2], "no BAR there");
        window.read(0xfff, &mut b);
        assert_eq!(b, [0xff; 2], "straddles two BARs");
        // Move device 2's BAR to 0xc000_8000: the old address goes dead, the new one decodes.
        let mut e = PciEcam::new(root.clone());
        e.write((2 << 15) | 0x10, &0xc000_8000u32.to_le_bytes());
        window.read(0x1008, &mut b);
        assert_eq!(b, [0xff; 2]);
        window.read(0x8008, &mut b);
        assert_eq!(b, [7, 7]);
        // Memory decoding off: nothing decodes.
        e.write((2 << 15) | 4, &[0, 0]);
        window.read(0x8008, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn the_bus_holds_31_devices() {
        let root = PciRoot::new();
        for i in 1..=31 {
            assert_eq!(root.add_device(scratch(0)).unwrap(), i);
        }
        assert_eq!(root.add_device(scratch(0)), Err(PciRootError::BusFull));
    }
}
