//! The freestanding test guest: its image (built by build.rs from images/testguest and embedded here) and the
//! BootInfo block it reads at entry (`proto::boot`).

use std::io::Cursor;

use daxvisor_proto::boot::{
    BootInfo, MemKind, MemRange, MmioDeviceInfo, MAX_CMDLINE, MAX_DEVICES, MAX_MEM_RANGES,
};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootEntry, BootError};
use crate::layout::{self, BOOT_INFO_ADDR, BOOT_STACK_TOP, HIMEM_START};

/// The test guest ELF, embedded at build time. Empty if the build could not produce it.
pub static EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// What the VMM tells the guest about its machine.
pub struct MachineInfo<'a> {
    pub mem_bytes: u64,
    pub cpus: u8,
    /// (guest physical base, size) of each pmem window.
    pub pmem: &'a [(u64, u64)],
    /// (base, size, irq, virtio device id) of each virtio-mmio window.
    pub devices: &'a [(u64, u64, u32, u32)],
    pub cmdline: &'a str,
    /// (base, size) of PCI ECAM when the virtio devices are on PCI.
    pub pci_ecam: Option<(u64, u64)>,
}

/// Load a freestanding ELF (the embedded test guest when `image` is None) and write its BootInfo.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    info: &MachineInfo<'_>,
) -> Result<BootEntry, BootError> {
    if image.is_empty() {
        return Err(BootError::NoTestGuest);
    }
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| BootError::Load {
        path: "<test guest>".into(),
        source,
    })?;
    let boot_info = boot_info(info)?;
    mem.write_slice(boot_info.as_bytes(), GuestAddress(BOOT_INFO_ADDR))?;
    Ok(BootEntry {
        rip: result.kernel_load.0,
        rsp: BOOT_STACK_TOP,
        rsi: 0,
        rdi: BOOT_INFO_ADDR,
    })
}

fn boot_info(info: &MachineInfo<'_>) -> Result<BootInfo, BootError> {
    let mut b = BootInfo {
        num_cpus: u32::from(info.cpus),
        ..Default::default()
    };
    let mut ranges: Vec<MemRange> = layout::ram_ranges(info.mem_bytes)
        .into_iter()
        .map(|(base, size)| MemRange {
            base,
            size,
            kind: MemKind::Ram as u32,
            _pad: 0,
        })
        .collect();
    ranges.push(MemRange {
        base: layout::MMIO_HOLE_START,
        size: layout::MMIO_HOLE_END - layout::MMIO_HOLE_START,
        kind: MemKind::Mmio as u32,
        _pad: 0,
    });
    ranges.extend(info.pmem.iter().map(|&(base, size)| MemRange {
        base,
        size,
        kind: MemKind::Pmem as u32,
        _pad: 0,
    }));
    ranges.extend(info.pci_ecam.map(|(base, size)| MemRange {
        base,
        size,
        kind: MemKind::PciEcam as u32,
        _pad: 0,
    }));
    if ranges.len() > MAX_MEM_RANGES || info.devices.len() > MAX_DEVICES {
        return Err(BootError::TestGuestLimits(format!(
            "{} memory ranges (RAM, the device window, the pmem regions) and {} devices: the test guest takes \
             at most {MAX_MEM_RANGES} and {MAX_DEVICES}",
            ranges.len(),
            info.devices.len()
        )));
    }
    b.mem_ranges[..ranges.len()].copy_from_slice(&ranges);
    b.num_mem_ranges = ranges.len() as u32;
    for (slot, &(base, size, irq, device_id)) in b.devices.iter_mut().zip(info.devices) {
        *slot = MmioDeviceInfo {
            base,
            size,
            irq,
            device_id,
        };
    }
    b.num_devices = info.devices.len() as u32;
    let cmd = info.cmdline.as_bytes();
    if cmd.len() > MAX_CMDLINE {
        return Err(BootError::Cmdline(format!(
            "test guest command line is {} bytes; at most {MAX_CMDLINE}",
            cmd.len()
        )));
    }
    b.cmdline[..cmd.len()].copy_from_slice(cmd);
    b.cmdline_len = cmd.len() as u32;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_lists_ram_hole_pmem_and_devices() {
        let info = MachineInfo {
            mem_bytes: 256 << 20,
            cpus: 2,
            pmem: &[(1 << 32, 64 << 20)],
            devices: &[(0xd000_0000, 0x1000, 5, 27)],
            cmdline: "exit=3",
            pci_ecam: None,
        };
        let b = boot_info(&info).unwrap();
        assert!(b.is_valid());
        assert_eq!(b.mem_ranges().len(), 3);
        assert_eq!(b.mem_ranges()[2].kind, MemKind::Pmem as u32);
        assert_eq!(b.devices()[0].device_id, 27);
        assert_eq!(b.cmdline(), b"exit=3");
        assert_eq!(b.num_cpus, 2);
        let pci = boot_info(&MachineInfo {
            devices: &[],
            pci_ecam: Some((0xe000_0000, 1 << 20)),
            ..info
        })
        .unwrap();
        assert_eq!(pci.mem_ranges()[3].kind, MemKind::PciEcam as u32);
        assert_eq!(pci.num_devices, 0);
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert!(boot_info(&MachineInfo {
            cmdline: &long,
            ..info
        })
        .is_err());
    }
}
