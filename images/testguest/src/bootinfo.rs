//! Reading and checking the BootInfo block the VMM leaves for the guest (proto::boot), and what ring 0 managed
//! to map of it.

use daxvisor_proto::boot::{BootInfo, MemKind, MemRange};

/// Guest physical space mapped by the static page tables, whatever the BootInfo says.
pub const LOW_MAPPED_END: u64 = 1 << 32;

/// What ring 0 reports (in RSI) about mapping the BootInfo memory ranges above 4 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapStatus {
    Mapped,
    /// The BootInfo magic or range count was wrong, so nothing above 4 GiB was mapped.
    BootInfoRejected,
    /// The page-table pool ran out.
    OutOfPageTables,
    /// A range wraps around or ends above 128 TiB (past what an identity map can reach).
    RangeTooHigh,
    Unknown(u64),
}

impl MapStatus {
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            0 => MapStatus::Mapped,
            1 => MapStatus::BootInfoRejected,
            2 => MapStatus::OutOfPageTables,
            3 => MapStatus::RangeTooHigh,
            other => MapStatus::Unknown(other),
        }
    }
}

impl core::fmt::Display for MapStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MapStatus::Mapped => write!(f, "all memory ranges mapped"),
            MapStatus::BootInfoRejected => {
                write!(f, "BootInfo rejected, nothing above 4 GiB mapped")
            }
            MapStatus::OutOfPageTables => write!(
                f,
                "out of page-table pages: at most about {} GiB above 4 GiB can be mapped",
                PT_POOL_PAGES
            ),
            MapStatus::RangeTooHigh => write!(f, "a memory range wraps or ends above 128 TiB"),
            MapStatus::Unknown(raw) => write!(f, "unknown ring-0 status {raw}"),
        }
    }
}

/// Page-table pages ring 0 can allocate for ranges above 4 GiB (one page directory per GiB). Must match the
/// pool in src/boot/ring0.rs, which uses this constant.
pub const PT_POOL_PAGES: usize = 128;

/// Why the BootInfo is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// RDI does not point into low RAM.
    BadAddress(u64),
    BadHeader {
        magic: u64,
        version: u32,
        size: u32,
    },
    BadCounts {
        ranges: u32,
        devices: u32,
        cmdline: u32,
    },
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BootInfoError::BadAddress(a) => write!(f, "BootInfo address {a:#x} is not in low memory"),
            BootInfoError::BadHeader { magic, version, size } => {
                write!(f, "bad BootInfo header: magic {magic:#018x} version {version} size {size}")
            }
            BootInfoError::BadCounts { ranges, devices, cmdline } => write!(
                f,
                "bad BootInfo counts: {ranges} memory ranges, {devices} devices, cmdline {cmdline} bytes"
            ),
        }
    }
}

/// Copy the BootInfo at `addr` out of guest memory and check it.
///
/// # Safety
/// `addr` must be readable for `size_of::<BootInfo>()` bytes if it passes the range check (it is below 4 GiB,
/// which the static page tables map).
pub unsafe fn load(addr: u64) -> Result<BootInfo, BootInfoError> {
    let len = core::mem::size_of::<BootInfo>() as u64;
    if addr < 0x1000 || !addr.is_multiple_of(8) || addr + len > LOW_MAPPED_END {
        return Err(BootInfoError::BadAddress(addr));
    }
    // SAFETY: per the function contract; read_volatile because the VMM wrote it behind the compiler's back.
    let info = unsafe { core::ptr::read_volatile(addr as *const BootInfo) };
    check(&info)?;
    Ok(info)
}

pub fn check(info: &BootInfo) -> Result<(), BootInfoError> {
    let header_ok = info.magic == daxvisor_proto::boot::BOOT_INFO_MAGIC
        && info.version == daxvisor_proto::boot::BOOT_INFO_VERSION
        && info.size as usize == core::mem::size_of::<BootInfo>();
    if !header_ok {
        return Err(BootInfoError::BadHeader {
            magic: info.magic,
            version: info.version,
            size: info.size,
        });
    }
    if !info.is_valid() {
        return Err(BootInfoError::BadCounts {
            ranges: info.num_mem_ranges,
            devices: info.num_devices,
            cmdline: info.cmdline_len,
        });
    }
    Ok(())
}

pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        k if k == MemKind::Ram as u32 => "ram",
        k if k == MemKind::Pmem as u32 => "pmem",
        k if k == MemKind::Mmio as u32 => "mmio",
        k if k == MemKind::PciEcam as u32 => "pci-ecam",
        _ => "unknown",
    }
}

/// Whether `[start, start + size)` is mapped: below 4 GiB, or inside one of the BootInfo ranges (ring 0 mapped
/// all of them when it reported [`MapStatus::Mapped`]).
pub fn is_mapped(ranges: &[MemRange], start: u64, size: u64) -> bool {
    let Some(end) = start.checked_add(size) else {
        return false;
    };
    end <= LOW_MAPPED_END
        || ranges
            .iter()
            .any(|r| r.base <= start && r.base.checked_add(r.size).is_some_and(|re| end <= re))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ranges() {
        let ranges = [MemRange {
            base: 1 << 32,
            size: 2 << 20,
            kind: MemKind::Pmem as u32,
            _pad: 0,
        }];
        assert!(is_mapped(&ranges, 0x1000, 0x1000));
        assert!(is_mapped(&ranges, 1 << 32, 2 << 20));
        assert!(!is_mapped(&ranges, 1 << 32, (2 << 20) + 1));
        assert!(!is_mapped(&ranges, 5 << 30, 4096));
        assert!(!is_mapped(&ranges, u64::MAX, 2));
    }

    #[test]
    fn header_and_counts_are_checked() {
        let mut b = BootInfo::default();
        assert!(check(&b).is_ok());
        b.num_mem_ranges = 9;
        assert!(matches!(
            check(&b),
            Err(BootInfoError::BadCounts { ranges: 9, .. })
        ));
        b = BootInfo {
            magic: 1,
            ..Default::default()
        };
        assert!(matches!(
            check(&b),
            Err(BootInfoError::BadHeader { magic: 1, .. })
        ));
    }

    #[test]
    fn map_status_codes_match_ring0() {
        assert_eq!(MapStatus::from_raw(0), MapStatus::Mapped);
        assert_eq!(MapStatus::from_raw(2), MapStatus::OutOfPageTables);
        assert_eq!(MapStatus::from_raw(9), MapStatus::Unknown(9));
    }
}
