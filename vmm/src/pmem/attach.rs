//! Putting the `--pmem` regions into a VM: open every backing, place each at a 2 MiB-aligned guest physical
//! address from `layout::pmem_start`, register its memslot (KVM_MEM_READONLY for `readonly=on`), and add a
//! virtio-pmem device for it on the virtio-mmio bus.
//!
//! All backings are opened and checked before any is attached. What `create=on` did to each file is recorded in
//! the start's [`StartUndo`] as soon as it is done (the one place a refused start is put back), so a step that
//! fails later (another backing, a bad kernel, a command line too long) removes the files this run created and
//! gives the files it extended their old length back.
//! `prefault=on` regions are populated after that check and before any memslot exists.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use daxvisor_devices::virtio::pmem::{
    FlushRateLimit, Pmem, PmemConfig as DeviceConfig, PmemMetrics, ReadonlyWindow,
};
use daxvisor_mapper::FileKey;
use vm_memory::GuestMemoryMmap;

use super::backing::{Backing, BackingError};
use super::config::PmemConfig;
use super::flush::BackingFlush;
use crate::device_manager::{DeviceError, DeviceManager, VirtioSlot};
use crate::event_loop::EventLoop;
use crate::host_files::StartUndo;
use crate::layout;
use crate::lease_manager::LeaseManager;
use crate::region_registry::{Region, RegionRegistry};
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

/// What attaching a region changes in the VM: its memslots, its device buses, the event loop its device's
/// queue notifications go to, guest RAM (the device's view) and the lease manager the region registers with.
pub struct VmParts<'a> {
    pub vm: &'a mut Vm,
    pub devices: &'a mut DeviceManager,
    pub event_loop: &'a mut EventLoop,
    pub mem: &'a GuestMemoryMmap,
    pub leases: &'a LeaseManager,
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

/// Attach every configured region and add it to `registry`. `mem` is guest RAM (the devices' view; pmem windows
/// are not in it). If any fails, the start's undo list (`undo`) puts back what `create=on` did.
pub fn attach(
    configs: &[PmemConfig],
    mem_bytes: u64,
    vm: &mut VmParts<'_>,
    registry: &RegionRegistry,
    undo: &mut StartUndo,
) -> Result<(), PmemError> {
    let mut backings: Vec<Backing> = Vec::new();
    let result = open_all(configs, &mut backings, undo).and_then(|()| {
        let geometry: Vec<(u64, u64)> = backings
            .iter()
            .map(|b| (b.size(), b.dev_dax().map_or(0, |d| d.align)))
            .collect();
        let addrs = place(mem_bytes, &geometry)?;
        // Last, once everything else is known to fit: a failed prefault undoes itself, then the start's undo
        // list puts back what the opens did.
        for (cfg, backing) in configs.iter().zip(&backings) {
            if cfg.prefault {
                super::prefault::prefault(backing)?;
            }
        }
        Ok(addrs)
    });
    let addrs = result?;

    let mut regions: Vec<Region> = Vec::new();
    for ((backing, gpa), config) in backings.into_iter().zip(addrs).zip(configs) {
        let attached = attach_one(&backing, gpa, vm).and_then(|a| {
            let file = FileKey::of(backing.file()).map_err(|source| BackingError::Stat {
                path: backing.path().to_owned(),
                source,
            })?;
            Ok((a, file))
        });
        // On failure the backings drop here (unmapped) and the start's undo list puts their files back.
        let (a, file) = attached?;
        regions.push(Region {
            backing,
            config: config.clone(),
            file,
            id: a.region,
            guest_addr: gpa,
            slot: a.slot,
            metrics: a.metrics,
            rate_limit: a.rate_limit,
        });
    }
    for r in regions {
        registry.insert(r);
    }
    Ok(())
}

/// Hand what `create=on` did to `b`'s file to the start's undo list: the one place a refused start is put back.
pub(crate) fn record_undo(b: &Backing, undo: &mut StartUndo) -> Result<(), PmemError> {
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
    Ok(())
}

fn open_all(
    configs: &[PmemConfig],
    backings: &mut Vec<Backing>,
    undo: &mut StartUndo,
) -> Result<(), PmemError> {
    let mut ids = HashSet::new();
    let names: Vec<String> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| cfg.id.clone().unwrap_or_else(|| format!("pmem{i}")))
        .collect();
    if let Some(dup) = names.iter().find(|id| !ids.insert(*id)) {
        return Err(PmemError::DuplicateId(dup.clone()));
    }
    // Every region's file checked before any is opened or created.
    for cfg in configs {
        super::backing::check_before_open(cfg)?;
    }
    let mut files = HashSet::new();
    for (cfg, id) in configs.iter().zip(names) {
        // Before the open: the second open of one file would otherwise meet this VMM's own lock.
        if FileKey::of_path(&cfg.file).is_ok_and(|k| files.contains(&k)) {
            return Err(PmemError::DuplicateFile(cfg.file.clone()));
        }
        let backing = Backing::open(cfg, &id)?;
        record_undo(&backing, undo)?;
        let key = FileKey::of(backing.file()).map_err(|source| BackingError::Stat {
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

/// What attaching one backing produced (the backing itself stays with the caller, for undo on failure).
pub struct Attached {
    pub slot: VirtioSlot,
    pub metrics: Arc<PmemMetrics>,
    pub region: daxvisor_mapper::RegionId,
    pub rate_limit: Arc<FlushRateLimit>,
    /// What a hot remove takes back: the KVM memory slot, the event loop subscriber, the PCI device number.
    pub memslot: u32,
    pub subscriber: event_manager::SubscriberId,
    pub pci_device: Option<u8>,
}

/// Attach one opened backing at `gpa`: memslot, lease manager, virtio-pmem device. On failure what this call
/// did is taken back (memslot, lease-manager region), so a refused hot add leaves the running VM as it was.
pub fn attach_one(
    backing: &Backing,
    gpa: u64,
    parts: &mut VmParts<'_>,
) -> Result<Attached, PmemError> {
    let memslot = add_memslot(backing, gpa, parts)?;
    let mut region = None;
    let result = attach_device(backing, gpa, memslot, &mut region, parts);
    if result.is_err() {
        if let Some(id) = region {
            parts.leases.remove_pmem_region(id);
        }
        if let Err(e) = parts.vm.remove_slot(memslot, gpa) {
            tracing::warn!(id = %backing.id(), "taking back the memory slot of a failed attach: {e}");
        }
    }
    result
}

fn add_memslot(backing: &Backing, gpa: u64, parts: &mut VmParts<'_>) -> Result<u32, PmemError> {
    let slot = backing.memslot(gpa);
    parts
        .vm
        .add_slot(
            slot.guest_phys_addr,
            slot.memory_size,
            slot.userspace_addr,
            slot.readonly,
        )
        .map_err(|source| PmemError::Memslot {
            id: backing.id().to_owned(),
            source,
        })
}

fn attach_device(
    backing: &Backing,
    gpa: u64,
    memslot: u32,
    registered: &mut Option<daxvisor_mapper::RegionId>,
    parts: &mut VmParts<'_>,
) -> Result<Attached, PmemError> {
    let VmParts {
        vm,
        devices,
        event_loop,
        mem,
        leases,
    } = parts;
    let id = backing.id().to_owned();
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
    *registered = Some(region);
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
    let pci_device = devices
        .pci
        .as_ref()
        .and_then(|p| p.functions.last())
        .map(|f| f.device);
    let subscriber = event_loop.add_subscriber(subscriber);
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
        // The virtio-mmio window, or BAR 0 of the virtio-pci function (irq 0: MSI-X).
        device_base = format_args!("{:#x}", vslot.base),
        irq = vslot.irq,
        "pmem region attached"
    );
    Ok(Attached {
        slot: vslot,
        metrics,
        region,
        rate_limit,
        memslot,
        subscriber,
        pci_device,
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
        let mut undo = StartUndo::new();
        let err = open_all(&cfgs, &mut backings, &mut undo).expect_err("third is missing");
        assert!(err.to_string().contains("missing.img"));
        // Every file is checked before any is created or extended.
        assert!(!created.exists(), "created before every file was checked");
        assert_eq!(std::fs::metadata(&existing).unwrap().len(), 2 * MIB);
        assert!(backings.is_empty());

        // A start that fails after the opens (a later step): the start's undo list puts both files back.
        let mut undo = StartUndo::new();
        open_all(&cfgs[..2], &mut backings, &mut undo).unwrap();
        assert!(created.exists());
        assert_eq!(std::fs::metadata(&existing).unwrap().len(), 4 * MIB);
        drop(std::mem::take(&mut backings));
        drop(undo);
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
            open_all(&dup, &mut backings, &mut StartUndo::new()),
            Err(PmemError::DuplicateFile(_))
        ));
        drop(backings);
        let ids: Vec<PmemConfig> = [
            format!("file={},id=a", existing.display()),
            format!("file={},id=a", created.display()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut backings = Vec::new();
        assert!(matches!(
            open_all(&ids, &mut backings, &mut StartUndo::new()),
            Err(PmemError::DuplicateId(_))
        ));
    }
}
