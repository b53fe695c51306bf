//! MADT ("APIC"): the interrupt controllers KVM's in-kernel irqchip provides.
//!
//! - One Processor Local APIC per vCPU, APIC ID = ACPI processor UID = vCPU index (KVM gives vCPU n the APIC
//!   ID n, and Linux brings up exactly the CPUs listed here).
//! - The IOAPIC at `layout::IOAPIC_ADDR`, ID 0 (the reset value of KVM's IOAPIC ID register), GSI base 0, 24
//!   pins.
//! - A Local APIC NMI entry: LINT1 of every processor carries NMI, as on PCs (QEMU/SeaBIOS declare the same).
//! - No Interrupt Source Overrides. Real PCs route the PIT (ISA IRQ 0) to IOAPIC pin 2 and say so with an
//!   override, but KVM's default GSI routing wires GSI n to IOAPIC pin n, so the PIT arrives on pin 0 and the
//!   identity mapping Linux assumes without an override is the true one. (With the hardware-reduced FADT Linux
//!   does not drive its timer from the PIT at all.) Every other line is identity-mapped and edge/high, the ISA
//!   default, which is what our devices use.
//! - Flags: PCAT_COMPAT, because KVM_CREATE_IRQCHIP does create the dual 8259 next to the IOAPIC; an OS that
//!   uses the APIC must mask it.
//!
//! acpi_tables 0.2 has no LAPIC NMI entry and no way to set the MADT flags, so the table is assembled with its
//! generic `Sdt` from the crate's entry structures plus the one 6-byte NMI entry encoded here.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{AcpiError, OEM_ID, OEM_REVISION};
use crate::layout;

/// KVM's IOAPIC has 24 input pins (KVM_IOAPIC_NUM_PINS).
pub(super) const IOAPIC_PINS: u32 = 24;
/// At most 255 vCPUs (a `u8` count), so APIC IDs and UIDs stay within 0..=254: 0xFF is the xAPIC broadcast ID
/// and, as a processor UID, means "all processors" in the NMI entry.
pub(super) const MAX_CPUS: u8 = u8::MAX;

const IOAPIC_ID: u8 = 0;
/// MADT revision of ACPI 6.2 and later.
const MADT_REVISION: u8 = 5;
/// Header (36) + Local Interrupt Controller Address (4) + Flags (4).
const MADT_HEADER_LEN: u32 = 44;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;

const ENTRY_LOCAL_APIC_NMI: u8 = 4;
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags 0: polarity and trigger mode conform to the bus (NMI is edge/high).
const NMI_FLAGS: u16 = 0;
const NMI_LINT: u8 = 1;

pub(super) fn build(num_cpus: u8) -> Result<Sdt, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::CpuCount(num_cpus));
    }
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"DAXVMADT",
        OEM_REVISION,
    );
    madt.write_u32(36, layout::LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_FLAG_PCAT_COMPAT);

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, layout::IOAPIC_ADDR as u32, 0).to_aml_bytes(&mut entries);
    let [flags_lo, flags_hi] = NMI_FLAGS.to_le_bytes();
    entries.extend_from_slice(&[
        ENTRY_LOCAL_APIC_NMI,
        6,
        ALL_PROCESSORS,
        flags_lo,
        flags_hi,
        NMI_LINT,
    ]);
    madt.append_slice(&entries);
    Ok(madt)
}
