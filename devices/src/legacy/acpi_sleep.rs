//! The hardware-reduced ACPI sleep control register (FADT SLEEP_CONTROL_REG): writing SLP_EN with the `_S5`
//! sleep type is how an ACPI guest powers off (Linux `poweroff`). It ends the VM through the exit event, as a
//! reset does. Without it, a guest's power-off would halt its CPUs forever and the VM would never end.

use super::VmStopper;
use crate::bus::BusDevice;

/// Port of the sleep control register; the status register is the next port.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_TYP the DSDT's `_S5_` package advertises for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// The sleep control/status register pair at [`SLEEP_CONTROL_PORT`]; an S5 request ends the VM.
pub struct AcpiSleep {
    stopper: VmStopper,
}

impl AcpiSleep {
    /// `stopper` ends the VM when the guest enters S5.
    pub fn new(stopper: VmStopper) -> Self {
        AcpiSleep { stopper }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status register: never "woken"; nothing ever sleeps and comes back.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&v)) = (offset, data.first()) else {
            return;
        };
        if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE {
            tracing::info!("guest powered off (ACPI S5)");
            self.stopper.stop();
        } else {
            tracing::debug!(
                value = v,
                "ignored ACPI sleep request (only S5 is supported)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_ends_the_vm() {
        let stopper = VmStopper::new().unwrap();
        let mut d = AcpiSleep::new(stopper.clone());
        d.write(0, &[(3 << 2) | SLP_EN]); // S3: ignored
        d.write(0, &[5 << 2]); // no SLP_EN: ignored
        d.write(1, &[(5 << 2) | SLP_EN]); // status register: ignored
        assert!(!stopper.is_stopping(), "nothing signalled yet");
        assert!(stopper.eventfd().read().is_err());
        d.write(0, &[(5 << 2) | SLP_EN]);
        assert!(stopper.is_stopping());
        assert_eq!(stopper.eventfd().read().unwrap(), 1);
    }
}
