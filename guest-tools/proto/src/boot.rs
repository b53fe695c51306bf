//! Boot ABI between daxvisor and the freestanding test guest (`images/testguest`).
//!
//! Entry state (set by the VMM when it starts an ELF that is not a Linux kernel):
//! - 64-bit long mode, ring 0, interrupts disabled, no IDT loaded.
//! - CS = [`CODE64_SELECTOR`] (64-bit code), DS/ES/SS/FS/GS = [`DATA_SELECTOR`]; GDT at [`GDT_ADDR`].
//! - Paging on: the first 4 GiB of guest physical space are identity mapped with 2 MiB pages (RAM and the
//!   MMIO hole). Anything above 4 GiB (pmem regions) is the guest's job to map.
//! - RIP = ELF entry, RDI = guest physical address of the [`BootInfo`] block ([`BOOT_INFO_ADDR`]),
//!   RSP = [`BOOT_STACK_TOP`] (a small stack below the boot info; the guest should switch to its own).
//!
//! The guest ends the VM by writing its exit status with one 32-bit `out` to [`EXIT_PORT`]; daxvisor exits with
//! the low 8 bits of that value as its own exit code. Serial output goes to the 16550 at [`SERIAL_PORT`].

/// "DAXBOOT1" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"DAXBOOT1");
/// Version of the [`BootInfo`] layout this code speaks; checked by [`BootInfo::is_valid`].
pub const BOOT_INFO_VERSION: u32 = 1;
/// Guest physical address where the VMM writes the [`BootInfo`] block (passed to the guest in RDI).
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Initial RSP: top of the small boot stack just below the boot info.
pub const BOOT_STACK_TOP: u64 = 0x6ff0;
/// Guest physical address of the GDT the VMM sets up for long mode.
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the 64-bit code segment, loaded in CS at entry.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment, loaded in DS/ES/SS/FS/GS at entry.
pub const DATA_SELECTOR: u16 = 0x10;
/// Port for the guest's exit status (32-bit write). Same number as QEMU's isa-debug-exit default.
pub const EXIT_PORT: u16 = 0x501;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;

/// Capacity of [`BootInfo::mem_ranges`].
pub const MAX_MEM_RANGES: usize = 8;
/// Capacity of [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 16;
/// Capacity of [`BootInfo::cmdline`] in bytes; a longer `--cmdline` is refused by the VMM.
pub const MAX_CMDLINE: usize = 512;

/// What a [`MemRange`] holds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// Guest RAM.
    Ram = 1,
    /// A virtio-pmem region's window; the guest learns which device it belongs to from the device's config.
    Pmem = 2,
    /// The MMIO hole below 4 GiB, where device windows live; not RAM.
    Mmio = 3,
    /// PCI ECAM (MMCONFIG) for the buses it covers (1 MiB per bus from bus 0). Present when the VM's virtio
    /// devices are virtio-pci functions (`--transport pci`); `devices` then lists no virtio-mmio window and the
    /// guest enumerates the bus.
    PciEcam = 4,
}

/// One range of guest physical address space, as listed in [`BootInfo::mem_ranges`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRange {
    /// Guest physical start address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// A [`MemKind`] value.
    pub kind: u32,
    /// Explicit padding so every byte of the layout is defined; zero.
    pub _pad: u32,
}

/// One virtio-mmio device window. `device_id` is what the VMM placed there; the guest still probes
/// (magic, version, device id registers) and must not trust this field alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest physical address of the register window.
    pub base: u64,
    /// Length of the window in bytes.
    pub size: u64,
    /// Interrupt line (GSI) the device signals on.
    pub irq: u32,
    /// Virtio device id of the device the VMM placed in this window.
    pub device_id: u32,
}

/// The block at [`BOOT_INFO_ADDR`]. Plain data, fixed layout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()` as the VMM built it.
    pub size: u32,
    /// How many entries of `mem_ranges` are filled.
    pub num_mem_ranges: u32,
    /// How many entries of `devices` are filled.
    pub num_devices: u32,
    /// How many bytes of `cmdline` are filled.
    pub cmdline_len: u32,
    /// Number of vCPUs the VM was started with.
    pub num_cpus: u32,
    /// The guest physical memory map: RAM, the MMIO hole, pmem windows.
    pub mem_ranges: [MemRange; MAX_MEM_RANGES],
    /// The virtio-mmio device windows.
    pub devices: [MmioDeviceInfo; MAX_DEVICES],
    /// The `--cmdline` given to daxvisor, UTF-8, not NUL-terminated; the test guest reads its mode from it.
    pub cmdline: [u8; MAX_CMDLINE],
}

impl Default for BootInfo {
    fn default() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: core::mem::size_of::<BootInfo>() as u32,
            num_mem_ranges: 0,
            num_devices: 0,
            cmdline_len: 0,
            num_cpus: 1,
            mem_ranges: [MemRange::default(); MAX_MEM_RANGES],
            devices: [MmioDeviceInfo::default(); MAX_DEVICES],
            cmdline: [0; MAX_CMDLINE],
        }
    }
}

impl BootInfo {
    /// Whether the header is one this code understands.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.version == BOOT_INFO_VERSION
            && self.size as usize == core::mem::size_of::<BootInfo>()
            && self.num_mem_ranges as usize <= MAX_MEM_RANGES
            && self.num_devices as usize <= MAX_DEVICES
            && self.cmdline_len as usize <= MAX_CMDLINE
    }

    /// The filled memory ranges (`num_mem_ranges`, capped at the array size).
    pub fn mem_ranges(&self) -> &[MemRange] {
        &self.mem_ranges[..(self.num_mem_ranges as usize).min(MAX_MEM_RANGES)]
    }

    /// The filled device windows (`num_devices`, capped at the array size).
    pub fn devices(&self) -> &[MmioDeviceInfo] {
        &self.devices[..(self.num_devices as usize).min(MAX_DEVICES)]
    }

    /// The command line bytes (`cmdline_len`, capped at the array size).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..(self.cmdline_len as usize).min(MAX_CMDLINE)]
    }

    /// View as bytes, for the VMM to write into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is repr(C) plain old data made only of integers and arrays of integers with explicit
        // padding fields, so every byte is initialised.
        unsafe {
            core::slice::from_raw_parts(
                self as *const Self as *const u8,
                core::mem::size_of::<Self>(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::size_of::<MemRange>(), 24);
        assert_eq!(core::mem::size_of::<MmioDeviceInfo>(), 24);
        assert_eq!(
            core::mem::size_of::<BootInfo>(),
            32 + 8 * 24 + 16 * 24 + 512
        );
        let b = BootInfo::default();
        assert!(b.is_valid());
        assert_eq!(&b.as_bytes()[..8], b"DAXBOOT1");
    }

    #[test]
    fn invalid_counts_are_rejected() {
        let b = BootInfo {
            num_devices: 99,
            ..Default::default()
        };
        assert!(!b.is_valid());
        assert!(b.devices().len() <= MAX_DEVICES);
    }
}
