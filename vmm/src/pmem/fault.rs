//! Explaining a `KVM_RUN` that failed with EFAULT: a guest access to a pmem window whose page the host could
//! not provide. That happens when the backing file shrank under the VM (the page is past its end), when its
//! file system is full (a write into a hole cannot allocate a block), or when it was made immutable
//! (`chattr +i`) and the host guard could not clear the flag. The message names the region as the operator
//! named it, the file, the guest address and the file offset, and which it was; the host facts come from the
//! mapper ([`daxvisor_mapper::window_health`]).
//!
//! KVM reports the faulting guest address (`KVM_EXIT_MEMORY_FAULT`) only on some paths; without it the address
//! is inferred: the first page past the new end of a shrunk file, or the first unallocated offset of a file
//! whose file system is full.

use daxvisor_mapper::{BackingKind, WindowHealth};

use crate::region_registry::RegionRegistry;

/// One sentence about the fault, or `None` if no pmem window explains it. `gpa` is the faulting guest physical
/// address when KVM reported it.
pub fn explain(regions: &RegionRegistry, gpa: Option<u64>) -> Option<String> {
    for r in regions.all() {
        match r.kind() {
            // Device-DAX has no file to shrink or fill.
            BackingKind::DevDax => continue,
            BackingKind::Regular | BackingKind::FsDax | BackingKind::Ram => {}
        }
        if let Some(a) = gpa {
            if a < r.guest_addr || a >= r.guest_addr + r.size() {
                continue;
            }
        }
        let file = r.backing.file();
        let health = daxvisor_mapper::window_health(file, r.size()).ok()?;
        let page = daxvisor_mapper::page_size();
        let offset = match (gpa, &health) {
            (_, WindowHealth::Intact) => continue,
            (Some(a), _) => a - r.guest_addr,
            (None, WindowHealth::Shrunk { len }) => len / page * page,
            (None, WindowHealth::FsFull { .. }) => {
                daxvisor_mapper::first_hole(file, r.size()).unwrap_or(0)
            }
            (None, WindowHealth::Immutable { .. }) => 0,
        };
        let how = if gpa.is_some() {
            "reported by KVM"
        } else {
            "inferred"
        };
        let why = match health {
            WindowHealth::Shrunk { len } => format!(
                "the file shrank to {len} bytes under the VM (the guest sees {} bytes)",
                r.size()
            ),
            WindowHealth::FsFull { free } => format!(
                "its file system is full ({free} bytes free) and the page was not allocated"
            ),
            WindowHealth::Immutable { flags } => format!(
                "the file has the {flags} flag (chattr), set while the VM ran; the host guard's log line names who set it"
            ),
            WindowHealth::Intact => continue,
        };
        return Some(format!(
            "pmem {id}: guest access at {gpa:#x} (file {path} offset {offset:#x}, {how}) failed: {why}",
            id = r.name(),
            gpa = r.guest_addr + offset,
            path = r.path().display(),
        ));
    }
    None
}
