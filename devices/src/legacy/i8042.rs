//! i8042 keyboard controller, only for its CPU reset line (command 0xFE on port 0x64): Linux's `reboot`
//! ends the VM through it.

use super::VmStopper;
use crate::bus::BusDevice;

pub struct I8042 {
    inner: vm_superio::I8042Device<VmStopper>,
}

impl I8042 {
    /// `reset` ends the VM when the guest asks for a CPU reset.
    pub fn new(reset: VmStopper) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.inner.write(off, value) {
            tracing::warn!("i8042 reset signal failed: {e}");
        }
    }
}
