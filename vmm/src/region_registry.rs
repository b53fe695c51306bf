//! The region registry: every fact about a VM's pmem regions, once. A [`Region`] owns its backing (the host
//! file and its mapping: dropping the last reference unmaps it) and records where the VM put it (the mapper's
//! id, the guest physical window, the virtio transport slot) and what its device counts. The agent service,
//! the operator API, the reclaim table, the lease manager's event names and the fault explanation all read
//! regions from here, by the operator's name or by the mapper's id; nothing keeps a copy.
//!
//! Regions are added as they are attached (at start, and later by hot add), so the registry is shared
//! (`Arc`) and its list is behind a lock held only to look a region up.

use std::path::Path;
use std::sync::{Arc, RwLock};

use daxvisor_devices::virtio::pmem::{FlushRateLimit, PmemMetrics};
use daxvisor_mapper::{BackingKind, FileKey, RegionId};

use crate::device_manager::VirtioSlot;
use crate::pmem::{Backing, PmemConfig};

/// One pmem region of the VM.
pub struct Region {
    /// The host file and its mapping; its name is the operator's (`--pmem id=`, default `pmemN`).
    pub backing: Backing,
    /// The options it was given.
    pub config: PmemConfig,
    /// The file's identity (device, inode), as the mapper keys its holds.
    pub file: FileKey,
    /// The region as the layout-lease manager knows it (the id guests name in requests).
    pub id: RegionId,
    /// Guest physical address of the window.
    pub guest_addr: u64,
    /// Where its virtio-pmem device sits on the transport.
    pub slot: VirtioSlot,
    /// Its device's flush counters.
    pub metrics: Arc<PmemMetrics>,
    /// Its device's flush rate limiter (the operator changes it).
    pub rate_limit: Arc<FlushRateLimit>,
}

impl Region {
    /// The operator's name for it.
    pub fn name(&self) -> &str {
        self.backing.id()
    }

    pub fn path(&self) -> &Path {
        self.backing.path()
    }

    pub fn kind(&self) -> BackingKind {
        self.backing.kind()
    }

    /// Window size in bytes.
    pub fn size(&self) -> u64 {
        self.backing.size()
    }

    /// Bytes the filesystem has allocated to the backing file (fstat's blocks; 0 when unknown).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.backing
            .file()
            .metadata()
            .map_or(0, |m| m.blocks().saturating_mul(512))
    }

    /// Mapped read-only into the guest.
    pub fn readonly(&self) -> bool {
        self.backing.readonly()
    }

    /// At VM end, after the devices are gone: one last fdatasync where a flush means one, so writes the guest
    /// never flushed still reach the disk on a clean stop. A failure is logged with the region named.
    /// Then a file that lost its last name while the VM ran is copied to a recovery file
    /// ([`crate::pmem::recovery`]).
    pub fn final_sync(&self) {
        if crate::pmem::FlushAction::for_backing(&self.backing)
            == crate::pmem::FlushAction::Fdatasync
        {
            match self.backing.file().sync_data() {
                Ok(()) => tracing::info!(id = %self.name(), "final fdatasync done"),
                Err(e) => {
                    tracing::error!(id = %self.name(), path = %self.path().display(), "final fdatasync failed: {e}")
                }
            }
        }
        if !self.backing.discard_writes() && !self.backing.readonly() {
            self.recover_if_nameless();
        }
    }

    fn recover_if_nameless(&self) {
        let old = self.path();
        match crate::pmem::recovery::recover_if_nameless(self.backing.file(), old) {
            Ok(None) => {}
            Ok(Some((path, bytes))) => {
                tracing::warn!(id = %self.name(), old = %old.display(), recovery = %path.display(), bytes,
                "the backing file lost its last name while the VM ran; its data was copied to the recovery file and fsynced")
            }
            Err(e) => tracing::error!(id = %self.name(), old = %old.display(),
                "the backing file lost its last name while the VM ran and its data could not be copied to a recovery file: {e}; it is lost when daxvisor exits"),
        }
    }

    /// One info line with the device's counters (at VM end; `/metrics` exports the same).
    pub fn log_summary(&self) {
        let m = self.metrics.snapshot();
        tracing::info!(
            id = %self.name(),
            requests = m.requests,
            syncs = m.syncs,
            errors = m.errors,
            throttled = m.throttled,
            readonly_writes_dropped = m.readonly_writes_dropped,
            "pmem counters"
        );
    }
}

/// Every region of the VM.
#[derive(Default)]
pub struct RegionRegistry {
    regions: RwLock<Vec<Arc<Region>>>,
}

impl RegionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Adds an attached region.
    pub fn insert(&self, region: Region) -> Arc<Region> {
        let r = Arc::new(region);
        self.write().push(r.clone());
        r
    }

    /// Takes a region out (hot remove); the caller drops the last reference once it is synced.
    pub fn remove(&self, id: RegionId) -> Option<Arc<Region>> {
        let mut list = self.write();
        let at = list.iter().position(|r| r.id == id)?;
        Some(list.remove(at))
    }

    /// Every region, in the order they were attached.
    pub fn all(&self) -> Vec<Arc<Region>> {
        self.read().clone()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// The region the operator named.
    pub fn by_name(&self, name: &str) -> Option<Arc<Region>> {
        self.read().iter().find(|r| r.name() == name).cloned()
    }

    /// The region the mapper knows as `id`.
    pub fn by_id(&self, id: RegionId) -> Option<Arc<Region>> {
        self.read().iter().find(|r| r.id == id).cloned()
    }

    /// The operator's name for a mapper id (the id itself for a region not, or no longer, here).
    pub fn name_of(&self, id: RegionId) -> String {
        self.by_id(id)
            .map_or_else(|| id.to_string(), |r| r.name().to_owned())
    }

    /// The names, in order (for "no region X (regions: ...)" messages and `GET /vm`).
    pub fn names(&self) -> Vec<String> {
        self.read().iter().map(|r| r.name().to_owned()).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Region>>> {
        self.regions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Region>>> {
        self.regions.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Unit tests of the services that read the registry: a real region on a temporary file, registered with
/// `mapper`, without a VM.
#[cfg(test)]
pub(crate) fn test_region(
    mapper: &daxvisor_mapper::Mapper,
    dir: &Path,
    name: &str,
    size: u64,
) -> Region {
    test_region_with(mapper, dir, name, size, "")
}

/// As [`test_region`], with more `--pmem` options (`extra`, e.g. `,dma=agent`); its IOVA is its guest address.
#[cfg(test)]
pub(crate) fn test_region_with(
    mapper: &daxvisor_mapper::Mapper,
    dir: &Path,
    name: &str,
    size: u64,
    extra: &str,
) -> Region {
    let path = dir.join(format!("{name}.img"));
    let config: PmemConfig = format!(
        "file={},size={size},create=on,id={name},guard=log{extra}",
        path.display()
    )
    .parse()
    .unwrap();
    let backing = Backing::open(&config, name).unwrap();
    let file = Arc::new(backing.file().try_clone().unwrap());
    let id = mapper
        .add_region(
            daxvisor_mapper::RegionDesc::new(file, 0, size, backing.kind())
                .with_mapping(backing.mapping().clone())
                .with_iova(1 << 32)
                .with_name(name),
        )
        .unwrap();
    let pmem = daxvisor_devices::virtio::pmem::Pmem::new(
        name,
        daxvisor_devices::virtio::pmem::PmemConfig {
            start: 1 << 32,
            size,
        },
        Arc::new(crate::pmem::BackingFlush::new(&backing, None).unwrap()),
    )
    .unwrap();
    Region {
        file: FileKey::of(backing.file()).unwrap(),
        config,
        id,
        guest_addr: 1 << 32,
        slot: VirtioSlot {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
            device_id: 27,
        },
        metrics: pmem.metrics(),
        rate_limit: pmem.rate_limit(),
        backing,
    }
}
