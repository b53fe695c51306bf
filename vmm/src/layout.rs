//! Guest physical memory layout (x86_64). One place for every fixed address the VMM uses.
//!
//! ```text
//! 0x0000_0500  GDT                       (proto::boot::GDT_ADDR)
//! 0x0000_6ff0  boot stack top            (test guest only)
//! 0x0000_7000  Linux zero page / test guest BootInfo
//! 0x0000_9000  boot page tables: PML4, PDPT, 4 PDs (identity map of the first 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI RSDP (inside the BIOS area Linux scans), tables follow
//! 0x0010_0000  kernel / test guest load address (1 MiB)
//! ...          RAM up to min(memory, 3 GiB)
//! 0xc000_0000  MMIO hole: PCI 32-bit BAR window 0xc000_0000..0xd000_0000, virtio-mmio windows from
//!              0xd000_0000 (4 KiB apart), PCI ECAM (bus 0) at 0xe000_0000
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000 RAM above 4 GiB (if memory > 3 GiB)
//! then         pmem regions, each 2 MiB aligned (so the host can back them with huge pages)
//! then         the PCI 64-bit window (1 GiB aligned, after the last pmem region; described in ACPI only)
//! ```

pub const GDT_ADDR: u64 = daxvisor_proto::boot::GDT_ADDR;
pub const ZERO_PAGE_ADDR: u64 = daxvisor_proto::boot::BOOT_INFO_ADDR;
pub const BOOT_INFO_ADDR: u64 = daxvisor_proto::boot::BOOT_INFO_ADDR;
pub const BOOT_STACK_TOP: u64 = daxvisor_proto::boot::BOOT_STACK_TOP;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000; // four pages: 0xb000..0xf000
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
pub const RSDP_ADDR: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
/// Linux boots with at least this much free RAM below the MMIO hole for its own use; we refuse less.
pub const MIN_MEMORY_MIB: u64 = 16;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ line given to virtio-mmio devices (4 is COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQ lines 5..=23 on the IOAPIC.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// PCI memory window below 4 GiB: BARs are allocated here (virtio-pci BAR 0 is 64-bit but fits anywhere).
pub const PCI_MMIO32_BASE: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// ECAM (MMCONFIG) for bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// The PCI 64-bit window: where it starts relative to the end of the pmem regions, and its size.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
pub const PCI_MMIO64_SIZE: u64 = 4 << 30;
/// GSIs for MSI-X vectors (above the IOAPIC's 24 lines; KVM takes up to 4096 routes).
pub const MSI_GSI_FIRST: u32 = 24;
pub const MSI_GSI_LAST: u32 = 1023;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const SERIAL_IRQ: u32 = 4;
/// The ACPI generic event device's line (PCI hotplug notifications). Hotplug needs `--transport pci`, where no
/// virtio-mmio device takes a line.
pub const HOTPLUG_GED_IRQ: u32 = 23;

pub const PMEM_ALIGN: u64 = 2 << 20;

pub const MIB: u64 = 1 << 20;

/// RAM ranges `(start, len)` for a guest with `mem_bytes` of memory, split around the MMIO hole.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// First guest physical address free for pmem regions: above RAM and the MMIO hole, 2 MiB aligned.
pub fn pmem_start(mem_bytes: u64) -> u64 {
    let ram_end = ram_ranges(mem_bytes)
        .last()
        .map(|&(s, l)| s + l)
        .unwrap_or(0);
    align_up(ram_end.max(MMIO_HOLE_END), PMEM_ALIGN)
}

pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The PCI 64-bit window `(base, size)` for a VM whose highest guest-physical address in use (RAM or pmem)
/// ends at `end`.
pub fn pci_mmio64_window(end: u64) -> (u64, u64) {
    (
        align_up(end.max(MMIO_HOLE_END), PCI_MMIO64_ALIGN),
        PCI_MMIO64_SIZE,
    )
}

/// Guest physical window of the `index`th virtio-mmio device.
pub fn virtio_mmio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole_and_pmem_sits_above() {
        assert_eq!(ram_ranges(512 * MIB), vec![(0, 512 * MIB)]);
        assert_eq!(
            ram_ranges(4096 * MIB),
            vec![(0, 3072 * MIB), (1 << 32, 1024 * MIB)]
        );
        assert_eq!(pmem_start(512 * MIB), 1 << 32);
        assert_eq!(pmem_start(4096 * MIB), 5 << 30);
        assert_eq!(pmem_start(4096 * MIB + 1) % PMEM_ALIGN, 0);
        assert_eq!(virtio_mmio_slot(1), (0xd000_1000, 6));
        assert_eq!(pci_mmio64_window(5 << 30), (5 << 30, 4 << 30));
        assert_eq!(pci_mmio64_window((5 << 30) + 1).0, 6 << 30);
    }

    #[test]
    fn pci_windows_sit_in_the_hole_apart_from_everything_else() {
        let ranges = [
            (PCI_MMIO32_BASE, PCI_MMIO32_SIZE),
            (
                VIRTIO_MMIO_BASE,
                VIRTIO_MMIO_SIZE * MAX_VIRTIO_DEVICES as u64,
            ),
            (PCI_ECAM_BASE, PCI_ECAM_SIZE),
            (IOAPIC_ADDR, 0x1000),
            (LAPIC_ADDR, 0x1000),
        ];
        for (i, &(a, al)) in ranges.iter().enumerate() {
            assert!(a >= MMIO_HOLE_START && a + al <= MMIO_HOLE_END);
            for &(b, bl) in &ranges[i + 1..] {
                assert!(a + al <= b || b + bl <= a, "{a:#x} overlaps {b:#x}");
            }
        }
    }
}
