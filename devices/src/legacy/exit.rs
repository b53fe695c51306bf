//! The exit port: the guest writes a 32-bit status and the VM ends with that status (the test guest's way to
//! report success or failure; the same idea as QEMU's isa-debug-exit, but the status is passed through unchanged).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use super::VmStopper;
use crate::bus::BusDevice;

/// The status the guest asked to exit with; `None` until it writes one.
#[derive(Clone, Default)]
pub struct VmExitStatus(Arc<AtomicI32>);

const UNSET: i32 = i32::MIN;

impl VmExitStatus {
    /// No status written yet.
    pub fn new() -> Self {
        VmExitStatus(Arc::new(AtomicI32::new(UNSET)))
    }
    /// The status the guest wrote (low 8 bits), or `None` if it has not written one.
    pub fn get(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            UNSET => None,
            v => Some(v),
        }
    }
    fn set(&self, v: i32) {
        // First status wins: a second vCPU racing to exit does not overwrite it.
        let _ = self
            .0
            .compare_exchange(UNSET, v & 0xff, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The exit port device: records the first status written (low 8 bits) and ends the VM.
pub struct ExitPort {
    status: VmExitStatus,
    stopper: VmStopper,
}

impl ExitPort {
    /// Record the guest's status in `status` and end the VM through `stopper`.
    pub fn new(status: VmExitStatus, stopper: VmStopper) -> Self {
        ExitPort { status, stopper }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.status.set(i32::from_le_bytes(v));
        self.stopper.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_status_wins_and_signals() {
        let st = VmExitStatus::new();
        let stopper = VmStopper::new().unwrap();
        let mut p = ExitPort::new(st.clone(), stopper.clone());
        assert_eq!(st.get(), None);
        p.write(0, &7u32.to_le_bytes());
        p.write(0, &9u32.to_le_bytes());
        assert_eq!(st.get(), Some(7));
        assert!(stopper.is_stopping());
        assert_eq!(stopper.eventfd().read().unwrap(), 2);
        p.write(0, &0x1_03u32.to_le_bytes());
        assert_eq!(st.get(), Some(7));
    }
}
