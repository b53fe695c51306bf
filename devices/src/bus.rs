//! Address-range dispatch of vCPU exits to devices.
//!
//! One [`Bus`] for port I/O and one for MMIO. Each device owns a half-open range `[base, base + len)`; ranges
//! never overlap. Accesses that hit no device are reported to the caller (which logs them at debug level and
//! otherwise ignores them: a guest poking unmapped space must never take the VMM down).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Fill `data` with what the device returns for a read at `offset`. Unwritten bytes read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handle a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range has length zero or runs past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space (port I/O or MMIO) mapping non-overlapping ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base; value is (len, device).
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` at `[base, base + len)`; refused if the range is empty, wraps or overlaps another device.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The closest device at or below `end - 1` is the only one that can overlap.
        if let Some((&b, &(l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must lie inside the device's range.
        if offset.checked_add(size as u64)? <= *len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Dispatch a read. Returns false when no device covers `[addr, addr + data.len())`; `data` is then left as
    /// all ones, which is what real hardware returns for unclaimed reads.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write. Returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device mutex poisoned by a panic in another thread still holds consistent register state for our simple
/// devices; keep serving rather than cascading the panic into every vCPU.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(vec![0; 8])));
        bus.insert(dev.clone(), 0x100, 8).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x104, 8),
            Err(BusError::Overlap {
                base: 0x104,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xfc, 8),
            Err(BusError::Overlap { base: 0xfc, len: 8 })
        );
        assert!(bus.insert(dev.clone(), 0x108, 8).is_ok());
        assert_eq!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );

        assert!(bus.write(0x102, &[1, 2]));
        let mut buf = [0u8; 2];
        assert!(bus.read(0x102, &mut buf));
        assert_eq!(buf, [1, 2]);
        // Straddling the end of a device, or hitting nothing, is unclaimed.
        assert!(!bus.read(0x107, &mut [0u8; 2]));
        let mut miss = [0u8; 4];
        assert!(!bus.read(0x1000, &mut miss));
        assert_eq!(miss, [0xff; 4]);
        assert!(!bus.write(0x0, &[0]));
    }
}
