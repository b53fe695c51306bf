//! i8042 keyboard controller, only for its CPU reset line (command 0xFE on port 0x64): Linux's `reboot`
//! ends the VM through it.

use super::{ByteRegisters, VmStopper};

/// The i8042 controller (vm-superio), here for its CPU reset line.
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

impl ByteRegisters for I8042 {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            tracing::warn!("i8042 reset signal failed: {e}");
        }
    }
}
