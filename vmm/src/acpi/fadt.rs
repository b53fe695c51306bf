//! FADT ("FACP"): ACPI fixed hardware, boot architecture flags and the pointer to the DSDT.
//!
//! Hardware-reduced ACPI (FADT flag HW_REDUCED_ACPI), as Firecracker and Cloud Hypervisor use on x86. The
//! alternative, full fixed-hardware ACPI, obliges the platform to implement the PM1a event/control register
//! blocks, the PM timer and an SCI interrupt: Linux's ACPICA reads and writes PM1 registers while enabling the
//! subsystem and installs an SCI handler, and without those registers ACPI initialisation fails and the kernel
//! disables ACPI altogether, losing the DSDT devices. We emulate none of that hardware. Hardware-reduced mode
//! does not remove our legacy devices: the IOAPIC is still described by the MADT and used for every device
//! interrupt; the i8042 and COM1 are described in the DSDT and flagged in IAPC_BOOT_ARCH; the only behaviour Linux
//! changes is that it leaves the 8259 PIC and the PIT alone (null legacy PIC, LAPIC timer), which KVM's
//! irqchip does not need.
//!
//! - PWR_BUTTON / SLP_BUTTON set: no fixed-feature power or sleep button.
//! - RESET_REG_SUP with RESET_REG = port 0x64, value 0xFE: the i8042 "pulse reset line" command, which our i8042
//!   turns into a clean VM exit. Linux's default reboot path tries the ACPI reset register first and the
//!   keyboard controller second, so both lead to the same port.
//! - IAPC_BOOT_ARCH: LEGACY_DEVICES and 8042 (COM1 and the i8042 exist; without the 8042 bit Linux marks the
//!   controller firmware-absent and only finds it through PNP); VGA not present; PCIe ASPM controls off; MSI not
//!   supported unless the VM has a PCI bus (`--transport pci`), whose functions use MSI-X; CMOS RTC not present (nothing answers at ports 0x70/0x71; drop
//!   this bit if an RTC is ever added).
//! - SLEEP_CONTROL_REG / SLEEP_STATUS_REG at ports 0x600/0x601 with `_S5_` in the DSDT: the hardware-reduced
//!   way to power off; without them a guest's `poweroff` halts its CPUs and the VM never ends.
//! - No FACS: optional on hardware-reduced platforms (it only serves firmware waking vectors and the global
//!   lock, neither of which exist here).
//! - Hypervisor Vendor Identity "DAXVISOR" tells the guest who built the tables.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::Aml;

use daxvisor_devices::legacy::acpi_sleep::SLEEP_CONTROL_PORT;

use super::{OEM_ID, OEM_REVISION};

/// i8042 command/status port and its "pulse CPU reset line" command.
pub(super) const RESET_PORT: u16 = 0x64;
pub(super) const RESET_VALUE: u8 = 0xfe;

pub(super) const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
pub(super) const IAPC_8042: u16 = 1 << 1;
pub(super) const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
pub(super) const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
pub(super) const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
pub(super) const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const HYPERVISOR_VENDOR: [u8; 8] = *b"DAXVISOR";

/// The FADT bytes, pointing (X_DSDT) at the DSDT at `dsdt_addr`.
pub(super) fn build(dsdt_addr: u64, pci: bool) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"DAXVFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    // Hardware-reduced power-off: SLP_TYP/SLP_EN go to the sleep control register (devices::legacy::acpi_sleep).
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT + 1),
    );
    // With a PCI bus its functions interrupt by MSI-X (Linux honours "MSI not supported" for every device, and
    // a virtio-pci or passthrough function without MSI-X has no interrupt at all here).
    let msi = if pci { 0 } else { IAPC_MSI_NOT_SUPPORTED };
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES
        | IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | msi
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    // finalize() computes the checksum over the fields set above.
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}
