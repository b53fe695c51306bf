//! The PCI hotplug register block the guest reads to learn which slots changed and writes to eject one, at the
//! I/O ports QEMU's ACPI PCI hotplug uses (`0xae00`), with the same first three registers:
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | PCIU | read (clears) | bit N: a device was added at slot N |
//! | 0x4 | PCID | read (clears) | bit N: the host asks the guest to give up slot N |
//! | 0x8 | B0EJ | write | bit N: the guest let go of slot N (ACPI `_EJ0`) |
//!
//! The ACPI DSDT's GED handler reads PCIU and PCID and notifies the slot devices; the test guest polls them
//! from ring 3. An eject is honoured only for a slot the host asked to remove: the guest cannot take a device
//! away on its own, and a write of any other bits is ignored.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use daxvisor_devices::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of the block.
pub const PORT: u64 = 0xae00;
/// Ports it takes.
pub const LEN: u64 = 0x10;
/// Register offsets.
pub const PCIU: u64 = 0x0;
pub const PCID: u64 = 0x4;
pub const B0EJ: u64 = 0x8;

#[derive(Default)]
struct Bits {
    /// Added, not yet read by the guest.
    up: u32,
    /// Removal asked for, not yet read by the guest.
    down: u32,
    /// Removal asked for (read or not), not yet acknowledged.
    pending: u32,
    /// Acknowledged by the guest's eject.
    ejected: u32,
    /// The VM stopped: nobody will eject anything any more.
    stopped: bool,
}

/// How a wait for an eject ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eject {
    /// The guest acknowledged it.
    Done,
    /// The timeout passed first (the request is withdrawn).
    TimedOut,
    /// The VM stopped first.
    VmStopped,
}

/// Slot changes shared by the register block (vCPU threads) and the hot add/remove actions.
pub struct SlotEvents {
    bits: Mutex<Bits>,
    ejected: Condvar,
    /// Raised when a bit is set (the GED interrupt, for guests that take it).
    notify: Option<EventFd>,
}

fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl SlotEvents {
    pub fn new(notify: Option<EventFd>) -> Arc<Self> {
        Arc::new(SlotEvents {
            bits: Mutex::new(Bits::default()),
            ejected: Condvar::new(),
            notify,
        })
    }

    fn bits(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) {
        if let Some(fd) = &self.notify {
            if let Err(e) = fd.write(1) {
                tracing::warn!("cannot raise the hotplug interrupt: {e}");
            }
        }
    }

    /// A device now sits at `slot`: tell the guest.
    pub fn plugged(&self, slot: u8) {
        {
            let mut b = self.bits();
            b.up |= bit(slot);
            b.down &= !bit(slot);
            b.pending &= !bit(slot);
            b.ejected &= !bit(slot);
        }
        self.signal();
    }

    /// Ask the guest to give up `slot`.
    pub fn request_eject(&self, slot: u8) {
        {
            let mut b = self.bits();
            b.down |= bit(slot);
            b.pending |= bit(slot);
            b.ejected &= !bit(slot);
        }
        self.signal();
    }

    /// The VM stopped: a removal waiting for an eject ends now, with [`Eject::VmStopped`].
    pub fn vm_stopped(&self) {
        self.bits().stopped = true;
        self.ejected.notify_all();
    }

    /// Wait until the guest ejects `slot`, `timeout` passes (the request is then withdrawn) or the VM stops.
    pub fn wait_ejected(&self, slot: u8, timeout: Duration) -> Eject {
        let end = Instant::now() + timeout;
        let mut b = self.bits();
        loop {
            if b.ejected & bit(slot) != 0 {
                b.ejected &= !bit(slot);
                return Eject::Done;
            }
            if b.stopped {
                return Eject::VmStopped;
            }
            let now = Instant::now();
            if now >= end {
                b.down &= !bit(slot);
                b.pending &= !bit(slot);
                return Eject::TimedOut;
            }
            b = self
                .ejected
                .wait_timeout(b, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn read(&self, reg: u64) -> u32 {
        let mut b = self.bits();
        match reg {
            PCIU => std::mem::take(&mut b.up),
            PCID => std::mem::take(&mut b.down),
            _ => 0,
        }
    }

    fn eject(&self, mask: u32) {
        let mut b = self.bits();
        let honoured = mask & b.pending;
        if honoured != mask {
            tracing::debug!(
                mask = format_args!("{mask:#x}"),
                "guest eject of slots the host did not ask to remove ignored"
            );
        }
        if honoured != 0 {
            b.pending &= !honoured;
            b.ejected |= honoured;
            self.ejected.notify_all();
        }
    }
}

/// The register block on the port-I/O bus.
pub struct HotplugRegisters(pub Arc<SlotEvents>);

impl BusDevice for HotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let reg = offset & !3;
        // Only a read of the whole register (or its first byte) takes its bits; others read zero.
        if offset != reg {
            return;
        }
        let v = self.0.read(reg).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != B0EJ {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.0.eject(u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_and_down_bits_clear_on_read_and_only_requested_ejects_count() {
        let s = SlotEvents::new(None);
        let mut regs = HotplugRegisters(s.clone());
        let read = |regs: &mut HotplugRegisters, off| {
            let mut d = [0u8; 4];
            regs.read(off, &mut d);
            u32::from_le_bytes(d)
        };
        s.plugged(3);
        assert_eq!(read(&mut regs, PCIU), 1 << 3);
        assert_eq!(read(&mut regs, PCIU), 0, "read clears");
        // An eject nobody asked for is ignored.
        regs.write(B0EJ, &(1u32 << 3).to_le_bytes());
        assert_eq!(s.wait_ejected(3, Duration::ZERO), Eject::TimedOut);
        s.request_eject(3);
        assert_eq!(read(&mut regs, PCID), 1 << 3);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_ejected(3, Duration::from_secs(30)))
        };
        regs.write(B0EJ, &(1u32 << 3).to_le_bytes());
        assert_eq!(waiter.join().unwrap(), Eject::Done);
        // Not acknowledged in time: withdrawn, and a late eject is ignored.
        s.request_eject(4);
        assert_eq!(s.wait_ejected(4, Duration::from_millis(1)), Eject::TimedOut);
        regs.write(B0EJ, &(1u32 << 4).to_le_bytes());
        assert_eq!(s.wait_ejected(4, Duration::ZERO), Eject::TimedOut);
        // The VM stops while a removal waits: the wait ends at once, and so does any later one.
        s.request_eject(5);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_ejected(5, Duration::from_secs(300)))
        };
        s.vm_stopped();
        assert_eq!(waiter.join().unwrap(), Eject::VmStopped);
        assert_eq!(
            s.wait_ejected(6, Duration::from_secs(300)),
            Eject::VmStopped
        );
        // Odd offsets and slots past 31 do not panic.
        let mut d = [0u8; 2];
        regs.read(1, &mut d);
        s.plugged(200);
    }
}
