//! Putting the `--pmem` regions into a VM: open every backing, place each at a 2 MiB-aligned guest physical
//! address from `layout::pmem_start`, register its memslot (KVM_MEM_READONLY for `readonly=on`), and add a
//! virtio-pmem device for it on the virtio-mmio bus.
//!
//! All backings are opened and checked before any is attached; if anything fails, files this run created are
//! removed again and files it extended get their old length back. Once attached, the same undo is recorded in
//! the start's [`StartUndo`], so a step that fails later (a bad kernel, a command line too long) undoes it too.
//! `prefault=on` regions are populated after that check and before any memslot exists.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use daxvisor_devices::virtio::pmem::{
    FlushRateLimit, Pmem, PmemConfig as DeviceConfig, PmemMetrics, ReadonlyWindow,
};
use vm_memory::GuestMemoryMmap;

use super::backing::{Backing, BackingError};
use super::config::PmemConfig;
use super::flush::BackingFlush;
use crate::device_manager::{DeviceError, DeviceManager, VirtioSlot};
use crate::event_loop::EventLoop;
use crate::host_files::StartUndo;
use crate::layout;
use crate::lease_manager::LeaseManager;
use crate::vstate::vm::{Vm, VmError};

/// Linux with 4-level paging cannot address guest physical memory above 2^46 (64 TiB).
pub const GUEST_PHYS_LIMIT: u64 = 1 << 46;

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("pmem id '{0}' is used twice")]
    DuplicateId(String),
    #[error("pmem {0}: the same file is given twice (two writable views of one file would alias)")]
    DuplicateFile(std::path::PathBuf),
    #[error(
        "pmem regions need guest addresses up to {end:#x}, beyond the 64 TiB guest physical limit"
    )]
    AddressSpace { end: u64 },
    #[error("pmem {id}: {source}")]
    Memslot {
        id: String,
        #[source]
        source: VmError,
    },
    #[error("pmem {id}: {source}")]
    Device {
        id: String,
        #[source]
        source: DeviceError,
    },
    #[error(transparent)]
    Prefault(#[from] super::prefault::PrefaultError),
    #[error("pmem {id}: cannot register with the layout-lease manager: {source}")]
    Leases {
        id: String,
        #[source]
        source: daxvisor_mapper::MapperError,
    },
    #[error("pmem {id}: cannot set up the flush worker: {source}")]
    Worker {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// One attached region. Keep it alive as long as the VM: dropping it unmaps the backing.
pub struct PmemRegion {
    pub backing: Backing,
    /// Guest physical address of the window.
    pub guest_addr: u64,
    pub slot: VirtioSlot,
    pub metrics: Arc<PmemMetrics>,
    /// The region as the layout-lease manager knows it.
    pub region: daxvisor_mapper::RegionId,
    /// The device's flush rate limiter (the operator API changes it).
    pub rate_limit: Arc<FlushRateLimit>,
}

impl PmemRegion {
    pub fn id(&self) -> &str {
        self.backing.id()
    }

    /// At VM end, after the devices are gone: one last fdatasync where a flush means one, so writes the guest
    /// never flushed still reach the disk on a clean stop. A failure is logged with the region named.
    pub fn final_sync(&self) {
        if super::flush::FlushAction::for_backing(&self.backing) != super::FlushAction::Fdatasync {
            return;
        }
        match self.backing.file().sync_data() {
            Ok(()) => tracing::info!(id = %self.id(), "final fdatasync done"),
            Err(e) => {
                tracing::error!(id = %self.id(), path = %self.backing.path().display(), "final fdatasync failed: {e}")
            }
        }
    }

    /// One info line with the device's counters (at VM end; the metrics endpoint will export the same).
    pub fn log_summary(&self) {
        let m = self.metrics.snapshot();
        tracing::info!(
            id = %self.id(),
            requests = m.requests,
            syncs = m.syncs,
            errors = m.errors,
            throttled = m.throttled,
            readonly_writes_dropped = m.readonly_writes_dropped,
            "pmem counters"
        );
    }
}

/// Guest physical placement: each window aligned to 2 MiB (or the device-DAX alignment, so the host can map it
/// with pages of that size), one after the other from `layout::pmem_start(mem_bytes)`.
pub fn place(mem_bytes: u64, sizes_aligns: &[(u64, u64)]) -> Result<Vec<u64>, PmemError> {
    let mut cursor = layout::pmem_start(mem_bytes);
    let mut out = Vec::new();
    for &(size, align) in sizes_aligns {
        let align = align.max(layout::PMEM_ALIGN);
        let gpa = cursor
            .checked_next_multiple_of(align)
            .ok_or(PmemError::AddressSpace { end: u64::MAX })?;
        let end = gpa
            .checked_add(size)
            .ok_or(PmemError::AddressSpace { end: u64::MAX })?;
        if end > GUEST_PHYS_LIMIT {
            return Err(PmemError::AddressSpace { end });
        }
        out.push(gpa);
        cursor = end;
    }
    Ok(out)
}

/// Attach every configured region. `mem` is guest RAM (the devices' view; pmem windows are not in it). If any
/// fails, what `create=on` did is undone; after success, [`record_undo`] hands that job to the start's undo list.
pub fn attach(
    configs: &[PmemConfig],
    mem_bytes: u64,
    vm: &mut Vm,
    devices: &mut DeviceManager,
    event_loop: &mut EventLoop,
    mem: &GuestMemoryMmap,
    leases: &LeaseManager,
) -> Result<Vec<PmemRegion>, PmemError> {
    let mut backings: Vec<Backing> = Vec::new();
    let result = open_all(configs, &mut backings).and_then(|()| {
        let geometry: Vec<(u64, u64)> = backings
            .iter()
            .map(|b| (b.size(), b.dev_dax().map_or(0, |d| d.align)))
            .collect();
        let addrs = place(mem_bytes, &geometry)?;
        // Last, once everything else is known to fit: a failed prefault undoes itself, then the caller undoes
        // the opens.
        for (cfg, backing) in configs.iter().zip(&backings) {
            if cfg.prefault {
                super::prefault::prefault(backing)?;
            }
        }
        Ok(addrs)
    });
    let addrs = match result {
        Ok(a) => a,
        Err(e) => {
            undo_opened(backings);
            return Err(e);
        }
    };

    let mut regions: Vec<PmemRegion> = Vec::new();
    let mut pending = backings.into_iter().zip(addrs);
    while let Some((backing, gpa)) = pending.next() {
        let a = match attach_one(&backing, gpa, vm, devices, event_loop, mem, leases) {
            Ok(r) => r,
            Err(e) => {
                let all = regions.into_iter().map(|r| r.backing);
                undo_opened(
                    all.chain([backing])
                        .chain(pending.map(|(b, _)| b))
                        .collect(),
                );
                return Err(e);
            }
        };
        regions.push(PmemRegion {
            backing,
            guest_addr: gpa,
            slot: a.slot,
            metrics: a.metrics,
            region: a.region,
            rate_limit: a.rate_limit,
        });
    }
    Ok(regions)
}

/// Record in `undo` what `create=on` did to the regions' files, for a start that fails after they were attached
/// (a bad kernel, a command line too long).
pub fn record_undo(regions: &[PmemRegion], undo: &mut StartUndo) -> Result<(), PmemError> {
    for b in regions.iter().map(|r| &r.backing) {
        if b.created() {
            undo.remove_on_failure(b.path());
        } else if let Some(len) = b.extended_from() {
            let file = b.file().try_clone().map_err(|source| BackingError::Io {
                path: b.path().to_owned(),
                what: "duplicate its descriptor",
                source,
            })?;
            undo.truncate_on_failure(file, b.path(), len);
        }
    }
    Ok(())
}

fn open_all(configs: &[PmemConfig], backings: &mut Vec<Backing>) -> Result<(), PmemError> {
    let mut ids = HashSet::new();
    let mut files = HashSet::new();
    for (i, cfg) in configs.iter().enumerate() {
        let id = cfg.id.clone().unwrap_or_else(|| format!("pmem{i}"));
        if !ids.insert(id.clone()) {
            return Err(PmemError::DuplicateId(id));
        }
        // Before the open: the second open of one file would otherwise meet this VMM's own lock.
        if let Ok(m) = std::fs::metadata(&cfg.file) {
            if files.contains(&(m.dev(), m.ino(), m.rdev())) {
                return Err(PmemError::DuplicateFile(cfg.file.clone()));
            }
        }
        let backing = Backing::open(cfg, &id)?;
        let key = backing
            .file()
            .metadata()
            .map(|m| (m.dev(), m.ino(), m.rdev()))
            .map_err(|source| BackingError::Stat {
                path: cfg.file.clone(),
                source,
            })?;
        let dup = !files.insert(key);
        backings.push(backing);
        if dup {
            return Err(PmemError::DuplicateFile(cfg.file.clone()));
        }
    }
    Ok(())
}

/// Start failed before the guest ran: remove what `create=on` created, shrink what it extended.
fn undo_opened(backings: Vec<Backing>) {
    for b in backings.into_iter().rev() {
        b.undo_create();
    }
}

/// What attaching one backing produced (the backing itself stays with the caller, for undo on failure).
struct Attached {
    slot: VirtioSlot,
    metrics: Arc<PmemMetrics>,
    region: daxvisor_mapper::RegionId,
    rate_limit: Arc<FlushRateLimit>,
}

fn attach_one(
    backing: &Backing,
    gpa: u64,
    vm: &mut Vm,
    devices: &mut DeviceManager,
    event_loop: &mut EventLoop,
    mem: &GuestMemoryMmap,
    leases: &LeaseManager,
) -> Result<Attached, PmemError> {
    let id = backing.id().to_owned();
    let slot = backing.memslot(gpa);
    vm.add_slot(
        slot.guest_phys_addr,
        slot.memory_size,
        slot.userspace_addr,
        slot.readonly,
    )
    .map_err(|source| PmemError::Memslot {
        id: id.clone(),
        source,
    })?;
    let worker_err = |source| PmemError::Worker {
        id: id.clone(),
        source,
    };
    // Registered before the device exists, so every flush batch runs under a transient pin of the region.
    let region = leases
        .add_pmem_region(backing, gpa)
        .map_err(|source| PmemError::Leases {
            id: id.clone(),
            source,
        })?;
    let flush = BackingFlush::new(backing, Some(leases.fence(region))).map_err(worker_err)?;
    let pmem = Pmem::new(
        &id,
        DeviceConfig {
            start: gpa,
            size: backing.size(),
        },
        Arc::new(flush),
    )
    .map_err(worker_err)?;
    let metrics = pmem.metrics();
    let rate_limit = pmem.rate_limit();
    let device_err = |source| PmemError::Device {
        id: id.clone(),
        source,
    };
    let (vslot, subscriber) = devices
        .add_virtio_device(vm.fd(), mem, Box::new(pmem))
        .map_err(device_err)?;
    event_loop.add_subscriber(subscriber);
    if backing.readonly() {
        let window = ReadonlyWindow::new(&id, metrics.clone());
        devices
            .mmio
            .insert(Arc::new(Mutex::new(window)), gpa, backing.size())
            .map_err(|e| device_err(e.into()))?;
    }
    tracing::info!(
        id = %id,
        path = %backing.path().display(),
        kind = %backing.kind(),
        flags = %backing.mmap_flags_str(),
        huge_pages = backing.mapping().is_huge_advised(),
        readonly = backing.readonly(),
        guest_addr = format_args!("{gpa:#x}"),
        size = backing.size(),
        virtio_mmio = format_args!("{:#x}", vslot.base),
        irq = vslot.irq,
        "pmem region attached"
    );
    Ok(Attached {
        slot: vslot,
        metrics,
        region,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn windows_are_aligned_and_packed_above_ram() {
        let a = place(512 * MIB, &[(4 * MIB, 0), (2 * MIB, 0), (2 * MIB, 1 << 30)]).unwrap();
        assert_eq!(a, vec![1 << 32, (1 << 32) + 4 * MIB, (1 << 32) + (1 << 30)]);
        assert!(a.iter().all(|g| g % layout::PMEM_ALIGN == 0));
        assert!(matches!(
            place(512 * MIB, &[(GUEST_PHYS_LIMIT, 0)]),
            Err(PmemError::AddressSpace { .. })
        ));
        assert!(place(512 * MIB, &[(u64::MAX - 10, 0)]).is_err());
    }

    #[test]
    fn failed_start_removes_created_files_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let created = dir.path().join("new.img");
        let existing = dir.path().join("old.img");
        std::fs::write(&existing, vec![1u8; 2 * MIB as usize]).unwrap();
        let cfgs: Vec<PmemConfig> = [
            format!("file={},size=2M,create=on", created.display()),
            format!("file={},size=4M,create=on", existing.display()),
            format!("file={}", dir.path().join("missing.img").display()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut backings = Vec::new();
        let err = open_all(&cfgs, &mut backings).expect_err("third is missing");
        assert!(err.to_string().contains("missing.img"));
        assert!(created.exists(), "created before the failure");
        assert_eq!(std::fs::metadata(&existing).unwrap().len(), 4 * MIB);
        undo_opened(backings);
        assert!(!created.exists(), "removed again");
        assert_eq!(
            std::fs::read(&existing).unwrap(),
            vec![1u8; 2 * MIB as usize]
        );

        let dup: Vec<PmemConfig> = [
            format!("file={}", existing.display()),
            format!("file={},readonly=on", existing.display()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut backings = Vec::new();
        assert!(matches!(
            open_all(&dup, &mut backings),
            Err(PmemError::DuplicateFile(_))
        ));
        undo_opened(backings);
        let ids: Vec<PmemConfig> = [
            format!("file={},id=a", existing.display()),
            format!("file={},id=a", created.display()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut backings = Vec::new();
        assert!(matches!(
            open_all(&ids, &mut backings),
            Err(PmemError::DuplicateId(_))
        ));
    }
}
