//! A passthrough device's BARs mapped straight into the guest: the device's MMIO pages, mmapped from the VFIO
//! device, become KVM memory slots, so the guest's register accesses (an NVMe doorbell write per I/O) reach the
//! device without an exit to the VMM. The pages holding the MSI-X table and pending bits stay out of the slots:
//! the VMM emulates them, so their accesses exit and reach [`super::VfioPciDevice`] as before, and so does any
//! part of a BAR the kernel does not let us mmap.
//!
//! A slot is present only while its BAR decodes at the address the VMM placed it: Linux turns memory decoding
//! off while it sizes the BARs at boot, and a guest may move a BAR; then the slot goes (the trapped path serves
//! the BAR wherever it decodes) and comes back when the BAR is where it was placed. Placing slots only at the
//! VMM's own addresses means a guest can never lay one over RAM, pmem or the hotplug space.

use std::os::fd::AsRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};

use crate::vstate::vm::Vm;

const PAGE: u64 = 4096;

/// One mmapped piece of a BAR and its memory slot.
struct Area {
    bar: usize,
    /// Offset in the BAR.
    offset: u64,
    len: u64,
    host: *mut libc::c_void,
    slot: u32,
    /// Guest-physical address the slot maps now, if present.
    at: Option<u64>,
}

/// The mapped pieces of one device's BARs.
pub struct BarMap {
    device: String,
    /// A duplicate of the VM descriptor: the vCPU thread that writes the configuration space moves the slots.
    vm: VmFd,
    areas: Vec<Area>,
}

// SAFETY: the raw pointers are mmaps this object owns; they are only passed to KVM and munmap, never
// dereferenced, so moving the object to another thread is sound.
unsafe impl Send for BarMap {}

/// The parts of `[0, bar_len)` that can be slots: the kernel's mmappable areas (the whole region, or its
/// sparse-mmap list), less the pages of `trapped` (offset, len) ranges, each page-aligned and non-empty.
pub fn mappable(
    flags: u32,
    bar_len: u64,
    caps: &[VfioRegionInfoCap],
    trapped: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Vec::new();
    }
    let mut areas: Vec<(u64, u64)> = caps
        .iter()
        .find_map(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => Some(
                s.areas
                    .iter()
                    .map(|a| (a.offset, a.offset.saturating_add(a.size)))
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_else(|| vec![(0, bar_len)]);
    for &(start, len) in trapped {
        let cut_start = start & !(PAGE - 1);
        let cut_end = start
            .saturating_add(len)
            .checked_next_multiple_of(PAGE)
            .unwrap_or(u64::MAX);
        areas = areas
            .into_iter()
            .flat_map(|(s, e)| {
                if cut_end <= s || cut_start >= e {
                    vec![(s, e)]
                } else {
                    vec![(s, cut_start.max(s)), (cut_end.min(e), e)]
                }
            })
            .collect();
    }
    areas
        .into_iter()
        .filter_map(|(s, e)| {
            Some((
                s.checked_next_multiple_of(PAGE)?,
                e.min(bar_len) & !(PAGE - 1),
            ))
        })
        .filter(|&(s, e)| e > s)
        .map(|(s, e)| (s, e - s))
        .collect()
}

impl BarMap {
    /// mmap every mappable piece of `bars` ((index, placed address, size)) and make each a memory slot at its
    /// placed address. `trapped` gives, per BAR, the ranges the VMM emulates (the MSI-X table and PBA). A piece
    /// the kernel refuses to mmap stays trapped (logged); a slot KVM refuses is an error.
    pub fn new(
        device_name: &str,
        device: &VfioDevice,
        vm: &mut Vm,
        bars: &[(usize, u64, u64)],
        trapped: &[(usize, u64, u64)],
    ) -> std::io::Result<Self> {
        // SAFETY: dup of a live descriptor; the result is checked before use and owned by the new VmFd.
        let fd = unsafe { libc::dup(vm.fd().as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM descriptor that nothing else owns.
        let dup = unsafe { vm.kvm().create_vmfd_from_rawfd(fd) }.map_err(std::io::Error::from)?;
        let mut map = BarMap {
            device: device_name.to_owned(),
            vm: dup,
            areas: Vec::new(),
        };
        for &(bar, gpa, size) in bars {
            let index = bar as u32;
            let cut: Vec<(u64, u64)> = trapped
                .iter()
                .filter(|t| t.0 == bar)
                .map(|&(_, o, l)| (o, l))
                .collect();
            let region_len = device.get_region_size(index).min(size);
            let pieces = mappable(
                device.get_region_flags(index),
                region_len,
                &device.get_region_caps(index),
                &cut,
            );
            for (offset, len) in pieces {
                let file_offset = device.get_region_offset(index) + offset;
                // SAFETY: a new shared mapping of the device's region at an offset the kernel declared
                // mmappable; checked below, owned by `map` and unmapped in its Drop after its slot is gone.
                let host = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        device.as_raw_fd(),
                        file_offset as libc::off_t,
                    )
                };
                if host == libc::MAP_FAILED {
                    let e = std::io::Error::last_os_error();
                    tracing::warn!(
                        device = device_name,
                        bar,
                        offset,
                        len,
                        "BAR piece not mmappable, its accesses stay trapped: {e}"
                    );
                    continue;
                }
                let slot = match vm.add_slot(gpa + offset, len, host as u64, false) {
                    Ok(slot) => slot,
                    Err(e) => {
                        // SAFETY: the mapping made just above, never given to KVM.
                        unsafe { libc::munmap(host, len as usize) };
                        return Err(std::io::Error::other(e.to_string()));
                    }
                };
                map.areas.push(Area {
                    bar,
                    offset,
                    len,
                    host,
                    slot,
                    at: Some(gpa + offset),
                });
            }
        }
        tracing::info!(
            device = device_name,
            pieces = map.areas.len(),
            bytes = map.areas.iter().map(|a| a.len).sum::<u64>(),
            "passthrough BARs mapped into the guest (MSI-X table and PBA trapped)"
        );
        Ok(map)
    }

    /// Bytes of BAR space the guest reaches without exits now.
    pub fn mapped_bytes(&self) -> u64 {
        self.areas
            .iter()
            .filter(|a| a.at.is_some())
            .map(|a| a.len)
            .sum()
    }

    /// Put each piece where it belongs now: at `placed(bar) + offset` when `decodes_at_placed(bar)`, else
    /// nowhere. Called after every configuration write to a BAR or the command register.
    pub fn sync(&mut self, decodes_at_placed: impl Fn(usize) -> Option<u64>) {
        for a in &mut self.areas {
            let want = decodes_at_placed(a.bar).map(|base| base + a.offset);
            if want == a.at {
                continue;
            }
            if let Some(gpa) = a.at.take() {
                if let Err(e) = set_slot(&self.vm, a.slot, gpa, 0, std::ptr::null_mut()) {
                    tracing::error!(device = %self.device, bar = a.bar, "removing a BAR slot: {e}");
                    a.at = Some(gpa);
                    continue;
                }
            }
            if let Some(gpa) = want {
                match set_slot(&self.vm, a.slot, gpa, a.len, a.host) {
                    Ok(()) => a.at = Some(gpa),
                    Err(e) => {
                        tracing::warn!(device = %self.device, bar = a.bar, gpa = format_args!("{gpa:#x}"), "BAR slot not put back, its accesses stay trapped: {e}")
                    }
                }
            }
            tracing::debug!(device = %self.device, bar = a.bar, at = ?a.at, "BAR slot follows the BAR");
        }
    }
}

fn set_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host: *mut libc::c_void,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: either a deletion (size 0), or the piece's own live mapping, which outlives the slot (Drop
    // deletes the slot before unmapping).
    unsafe { vm.set_user_memory_region(region) }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        for a in &self.areas {
            if let Some(gpa) = a.at {
                if let Err(e) = set_slot(&self.vm, a.slot, gpa, 0, std::ptr::null_mut()) {
                    // KVM still maps it: leave the mapping in place rather than free memory it points into.
                    tracing::error!(device = %self.device, bar = a.bar, "removing a BAR slot at the end: {e}");
                    continue;
                }
            }
            // SAFETY: our own mapping; no slot points into it any more.
            unsafe { libc::munmap(a.host, a.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};

    const MMAP: u32 = VFIO_REGION_INFO_FLAG_MMAP;

    #[test]
    fn the_msix_pages_and_what_the_kernel_will_not_mmap_stay_trapped() {
        // Not mmappable at all.
        assert!(mappable(0, 0x4000, &[], &[]).is_empty());
        // A 16 KiB BAR with the MSI-X table at 0x2000 (256 bytes) and the PBA at 0x3000: two pages mapped.
        assert_eq!(
            mappable(MMAP, 0x4000, &[], &[(0x2000, 0x100), (0x3000, 8)]),
            vec![(0, 0x2000)]
        );
        // The table in the middle of a page: the whole page stays out.
        assert_eq!(
            mappable(MMAP, 0x4000, &[], &[(0x1800, 0x10)]),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
        // The kernel's sparse list wins over the whole region; pieces past the BAR are cut.
        let sparse = VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
            areas: vec![
                VfioRegionSparseMmapArea {
                    offset: 0,
                    size: 0x1000,
                },
                VfioRegionSparseMmapArea {
                    offset: 0x3000,
                    size: 0x3000,
                },
            ],
        });
        assert_eq!(
            mappable(MMAP, 0x4000, &[sparse], &[]),
            vec![(0, 0x1000), (0x3000, 0x1000)]
        );
        // A BAR smaller than a page (or a trapped range covering all of it) maps nothing.
        assert!(mappable(MMAP, 0x800, &[], &[]).is_empty());
        assert!(mappable(MMAP, 0x2000, &[], &[(0, 0x2000)]).is_empty());
        // A hostile length does not wrap.
        assert_eq!(
            mappable(MMAP, 0x4000, &[], &[(0x3000, u64::MAX)]),
            vec![(0, 0x3000)]
        );
    }
}
