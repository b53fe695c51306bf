//! What a virtual IOMMU MAP becomes on the host ([`ViommuDma`], the device's `IommuMapper`):
//!
//! - **guest RAM**: mapped directly in the VFIO container at the guest's IOVA (guest RAM is the VMM's anonymous
//!   memory, mapped for the VM's life);
//! - **pmem** of a region with `iommu=refuse|recall`: the endpoint's owner takes an exclusive lease of exactly
//!   that extent and pins it for DMA at the guest's IOVA (a range that cannot be pinned as it is, holes and
//!   unwritten extents, is made pinnable first: written, data unchanged) (`Mapper::pin_dma_at`), which maps it in the container. UNMAP: unpin (container unmap,
//!   munlock), then the lease goes. So the pinned bytes of an endpoint are exactly what its guest has mapped,
//!   and a layout change over a mapped range meets a pin naming the endpoint;
//! - anything else (MMIO, holes in the address space, a pmem region without `iommu=`, a range straddling two
//!   regions or RAM and pmem): refused, the guest reads status RANGE.
//!
//! While a recall and the layout change behind it run over a range ([`ViommuDma::hold_off`]), a MAP of pmem
//! there is refused with NOMEM: Linux's DMA API fails that mapping and the block layer retries the request
//! later, once the change is done. Without it, a MAP between the fence and the change would pin the range again
//! and the change would be refused by the very device it recalled.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use daxvisor_devices::virtio::iommu::{DmaMap, IommuMapper, MapRefusal};
use daxvisor_mapper::{LeaseId, LeaseMode, Mapper, MapperError, OwnerId, PinId, RegionId};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::pmem::IommuPolicy;
use crate::region_registry::RegionRegistry;

/// Guest RAM's side of the container (the VFIO container in a VM; a recorder in tests).
pub trait RamDma: Send + Sync {
    /// Map `len` bytes at host address `host` for DMA at `iova`.
    ///
    /// # Safety
    /// `[host, host + len)` is guest RAM, mapped for as long as the container lives.
    unsafe fn map_ram(&self, iova: u64, len: u64, host: *mut u8) -> io::Result<()>;
    /// Remove what one `map_ram` mapped.
    fn unmap_ram(&self, iova: u64, len: u64) -> io::Result<()>;
}

impl RamDma for crate::vfio::VfioDma {
    unsafe fn map_ram(&self, iova: u64, len: u64, host: *mut u8) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { crate::vfio::VfioDma::map_ram(self, iova, len, host) }
    }
    fn unmap_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        daxvisor_mapper::DmaMapper::unmap(self, iova, len)
    }
}

/// One endpoint behind the virtual IOMMU.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its id as the guest names it (PCI requester id: bus << 8 | device << 3 | function).
    pub id: u32,
    /// The passthrough device's name (`--device id=`).
    pub name: String,
    /// The owner its pins are held by (`viommu:NAME`).
    pub owner: OwnerId,
}

/// What one live mapping holds on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Ram,
    Pmem {
        region: RegionId,
        lease: LeaseId,
        pin: PinId,
    },
}

/// Bytes and counts per endpoint and per region (`None`: guest RAM).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct MapCounters {
    /// MAPs accepted.
    pub maps: u64,
    /// Mappings removed (UNMAP, DETACH, reset, fence).
    pub unmaps: u64,
    /// Bytes mapped right now.
    pub mapped_bytes: u64,
    /// Bytes mapped by all MAPs accepted so far (what a guest's own trace of its maps adds up to).
    pub mapped_bytes_total: u64,
    /// MAPs the host refused (outside RAM and pmem, a pin refused, a range under recall).
    pub refused: u64,
    /// Bytes of the MAPs refused (a guest's trace of its maps counts them too: its driver records a map before
    /// the device answers it).
    pub refused_bytes: u64,
}

#[derive(Default)]
struct Book {
    /// (endpoint, iova) -> (len, what it holds).
    live: BTreeMap<(u32, u64), (u64, Held)>,
    by_endpoint: BTreeMap<u32, MapCounters>,
    /// Region name ("ram" for guest RAM) -> counters.
    by_region: BTreeMap<String, MapCounters>,
}

/// Counters and pinned bytes of one moment ([`ViommuDma::sample`]).
pub struct ViommuSample {
    /// Endpoint name -> counters.
    pub endpoints: BTreeMap<String, MapCounters>,
    /// Region name ("ram" for guest RAM) -> counters.
    pub regions: BTreeMap<String, MapCounters>,
    /// Endpoint id -> pmem bytes pinned.
    pub pinned: BTreeMap<u32, u64>,
}

/// The virtual IOMMU's host side: pins and container mappings per endpoint.
pub struct ViommuDma {
    mapper: Mapper,
    regions: Arc<RegionRegistry>,
    ram: GuestMemoryMmap,
    ram_dma: Arc<dyn RamDma>,
    endpoints: BTreeMap<u32, Endpoint>,
    book: Mutex<Book>,
    /// Held across each MAP and UNMAP (pin and booking) and across [`ViommuDma::sample`], so a sample's pinned
    /// bytes and mapped bytes are of one moment.
    transition: Mutex<()>,
    /// Guest-physical ranges under a recall and its change (start, end), one entry per [`HoldOff`].
    held_off: Arc<Mutex<Vec<(u64, u64)>>>,
}

/// MAPs over a guest-physical range are refused while this lives ([`ViommuDma::hold_off`]).
pub struct HoldOff {
    range: (u64, u64),
    held_off: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Drop for HoldOff {
    fn drop(&mut self) {
        let mut h = self.held_off.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = h.iter().position(|r| *r == self.range) {
            h.swap_remove(i);
        }
    }
}

impl ViommuDma {
    /// Endpoints `(id, name)` each get an owner `viommu:NAME` in `mapper`.
    pub fn new(
        mapper: Mapper,
        regions: Arc<RegionRegistry>,
        ram: GuestMemoryMmap,
        ram_dma: Arc<dyn RamDma>,
        endpoints: &[(u32, String)],
    ) -> Self {
        let endpoints = endpoints
            .iter()
            .map(|(id, name)| {
                let owner = mapper.add_owner(&format!("viommu:{name}"));
                (
                    *id,
                    Endpoint {
                        id: *id,
                        name: name.clone(),
                        owner,
                    },
                )
            })
            .collect();
        ViommuDma {
            mapper,
            regions,
            ram,
            ram_dma,
            endpoints,
            book: Mutex::default(),
            transition: Mutex::default(),
            held_off: Arc::default(),
        }
    }

    /// Refuses MAPs of pmem over guest-physical `[gpa, gpa + len)` until the returned guard is dropped.
    pub fn hold_off(&self, gpa: u64, len: u64) -> HoldOff {
        let range = (gpa, gpa.saturating_add(len));
        self.held_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(range);
        HoldOff {
            range,
            held_off: self.held_off.clone(),
        }
    }

    fn is_held_off(&self, start: u64, end: u64) -> bool {
        self.held_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&(s, e)| start < e && s < end)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoints, by id.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints.values().cloned().collect()
    }

    /// The endpoint whose owner is `owner`.
    pub fn endpoint_of(&self, owner: OwnerId) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| e.owner == owner)
    }

    /// Counters per endpoint name and per region name ("ram" for guest RAM).
    pub fn counters(&self) -> (BTreeMap<String, MapCounters>, BTreeMap<String, MapCounters>) {
        let b = self.book();
        let eps = b
            .by_endpoint
            .iter()
            .map(|(id, c)| {
                let name = self
                    .endpoints
                    .get(id)
                    .map_or_else(|| format!("{id:#x}"), |e| e.name.clone());
                (name, *c)
            })
            .collect();
        (eps, b.by_region.clone())
    }

    /// Counters per endpoint and per region with the pmem bytes pinned per endpoint id, all of one moment (no
    /// MAP or UNMAP halfway): an endpoint's pinned bytes equal its regions' mapped bytes in every sample.
    pub fn sample(&self) -> ViommuSample {
        let _moment = self.transition();
        let (endpoints, regions) = self.counters();
        let pinned = self
            .endpoints
            .keys()
            .map(|&id| (id, self.pinned_bytes(id)))
            .collect();
        ViommuSample {
            endpoints,
            regions,
            pinned,
        }
    }

    fn transition(&self) -> MutexGuard<'_, ()> {
        self.transition.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of pmem pinned for `endpoint` right now, as the layout-lease manager counts its pins.
    pub fn pinned_bytes(&self, endpoint: u32) -> u64 {
        let Some(e) = self.endpoints.get(&endpoint) else {
            return 0;
        };
        self.mapper
            .snapshot()
            .owner(e.owner)
            .map_or(0, |o| o.pins.iter().map(|p| p.range.len()).sum())
    }

    fn count(&self, endpoint: u32, region: &str, f: impl Fn(&mut MapCounters)) {
        let mut b = self.book();
        f(b.by_endpoint.entry(endpoint).or_default());
        f(b.by_region.entry(region.to_owned()).or_default());
    }

    fn map_ram(&self, m: &DmaMap) -> Result<Option<()>, MapRefusal> {
        let Some(r) = self.ram.find_region(GuestAddress(m.phys)) else {
            return Ok(None);
        };
        let off = m.phys - r.start_addr().0;
        if off.checked_add(m.len).is_none_or(|end| end > r.len()) {
            // Straddles the end of a RAM block.
            return Err(MapRefusal::Outside);
        }
        // SAFETY: `off + len` lies inside this guest RAM region (checked above); its host mapping lives as long
        // as the VM, and the container (unmapping everything) goes before guest memory does.
        let host = unsafe { r.as_ptr().add(off as usize) };
        // SAFETY: guest RAM, see above.
        unsafe { self.ram_dma.map_ram(m.iova, m.len, host) }.map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ENOMEM) | Some(libc::ENOSPC) => {
                    MapRefusal::NoResources(format!("container map of RAM: {e}"))
                }
                _ => MapRefusal::Failed(format!("container map of RAM: {e}")),
            }
        })?;
        Ok(Some(()))
    }

    /// The pmem region that holds all of guest-physical `[phys, phys + len)`, if one does.
    fn region_at(&self, phys: u64, len: u64) -> Option<Arc<crate::region_registry::Region>> {
        let end = phys.checked_add(len)?;
        self.regions
            .all()
            .into_iter()
            .find(|r| r.guest_addr <= phys && end <= r.guest_addr + r.size())
    }

    fn map_pmem(&self, e: &Endpoint, m: &DmaMap) -> Result<Held, MapRefusal> {
        let region = self.region_at(m.phys, m.len).ok_or(MapRefusal::Outside)?;
        let end = m.phys + m.len;
        if region.config.iommu == IommuPolicy::Off {
            tracing::debug!(region = %region.name(), "MAP of a region without iommu=: refused");
            return Err(MapRefusal::Outside);
        }
        if self.is_held_off(m.phys, end) {
            tracing::debug!(region = %region.name(), phys = format_args!("{:#x}", m.phys), len = m.len, "MAP during a recall of that range: refused for now");
            return Err(MapRefusal::NoResources(format!(
                "{} is being recalled for a layout change: map it again when the change is done",
                region.name()
            )));
        }
        let off = m.phys - region.guest_addr;
        let refusal = |what: &str, err: MapperError| {
            let msg = format!(
                "{what} of {} {off:#x}+{:#x} for {}: {err}",
                region.name(),
                m.len,
                e.name
            );
            match err.errno() {
                libc::ENOMEM => MapRefusal::NoResources(msg),
                _ => MapRefusal::Failed(msg),
            }
        };
        let lease = self
            .mapper
            .acquire(e.owner, region.id, off, m.len, LeaseMode::Exclusive)
            .map_err(|err| refusal("lease", err))?;
        let undo = |err| {
            if let Err(x) = self.mapper.release(e.owner, lease) {
                tracing::error!(error = %x, "releasing the lease of a failed MAP");
            }
            err
        };
        // Pin first: extents already written (the common case once the guest has used the file) need no
        // prepare, whose writeback would cost two fdatasyncs on the event loop per MAP. Only a range that cannot
        // be pinned as it is (holes, unwritten extents: a create=on file) is prepared, then pinned again.
        let pin = match self
            .mapper
            .pin_dma_at(e.owner, region.id, off, m.len, m.iova)
        {
            Ok(p) => p,
            Err(MapperError::Unpinnable { .. }) => {
                self.mapper
                    .prepare(e.owner, region.id, off, m.len, &mut |_| {})
                    .map_err(|err| undo(refusal("prepare", err)))?;
                self.mapper
                    .pin_dma_at(e.owner, region.id, off, m.len, m.iova)
                    .map_err(|err| undo(refusal("pin", err)))?
            }
            Err(err) => return Err(undo(refusal("pin", err))),
        };
        Ok(Held::Pmem {
            region: region.id,
            lease,
            pin,
        })
    }
}

impl IommuMapper for ViommuDma {
    fn map(&self, m: &DmaMap) -> Result<(), MapRefusal> {
        let _moment = self.transition();
        let Some(e) = self.endpoints.get(&m.endpoint) else {
            return Err(MapRefusal::Failed(format!("no endpoint {:#x}", m.endpoint)));
        };
        let result = match self.map_ram(m) {
            Ok(Some(())) => Ok(("ram".to_owned(), Held::Ram)),
            Ok(None) => self.map_pmem(e, m).map(|h| {
                let name = match h {
                    Held::Pmem { region, .. } => self.regions.name_of(region),
                    Held::Ram => "ram".to_owned(),
                };
                (name, h)
            }),
            Err(r) => Err(r),
        };
        match result {
            Ok((region, held)) => {
                self.book().live.insert((m.endpoint, m.iova), (m.len, held));
                self.count(m.endpoint, &region, |c| {
                    c.maps += 1;
                    c.mapped_bytes += m.len;
                    c.mapped_bytes_total += m.len;
                });
                tracing::debug!(endpoint = %e.name, iova = format_args!("{:#x}", m.iova), len = m.len, phys = format_args!("{:#x}", m.phys), %region, "viommu map");
                Ok(())
            }
            Err(r) => {
                // Counted per region too where the range lies in one (a refusal for being outside has none).
                let region = self.region_at(m.phys, m.len);
                let refused = |c: &mut MapCounters| {
                    c.refused += 1;
                    c.refused_bytes += m.len;
                };
                match region {
                    Some(g) => self.count(m.endpoint, g.name(), refused),
                    None => refused(self.book().by_endpoint.entry(m.endpoint).or_default()),
                }
                Err(r)
            }
        }
    }

    fn unmap(&self, m: &DmaMap) {
        let _moment = self.transition();
        let Some((len, held)) = self.book().live.remove(&(m.endpoint, m.iova)) else {
            tracing::error!(
                endpoint = m.endpoint,
                iova = m.iova,
                "viommu unmap of an IOVA not mapped here"
            );
            return;
        };
        let region = match held {
            Held::Ram => {
                if let Err(e) = self.ram_dma.unmap_ram(m.iova, len) {
                    tracing::error!(iova = m.iova, len, error = %e, "container unmap of RAM failed");
                }
                "ram".to_owned()
            }
            Held::Pmem { region, lease, pin } => {
                if let Some(e) = self.endpoints.get(&m.endpoint) {
                    // Unpin first (container unmap, munlock), then the lease goes.
                    if let Err(x) = self.mapper.unpin(e.owner, pin) {
                        tracing::error!(error = %x, "viommu unpin failed");
                    }
                    if let Err(x) = self.mapper.release(e.owner, lease) {
                        tracing::error!(error = %x, "viommu lease release failed");
                    }
                }
                self.regions.name_of(region)
            }
        };
        self.count(m.endpoint, &region, |c| {
            c.unmaps += 1;
            c.mapped_bytes = c.mapped_bytes.saturating_sub(len);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daxvisor_mapper::{DmaMapper, RecordingDma};

    /// Records RAM mappings (iova -> len) as a container would.
    #[derive(Default)]
    struct RamRecorder(Mutex<BTreeMap<u64, u64>>);

    impl RamDma for RamRecorder {
        unsafe fn map_ram(&self, iova: u64, len: u64, _host: *mut u8) -> io::Result<()> {
            self.0.lock().unwrap().insert(iova, len);
            Ok(())
        }
        fn unmap_ram(&self, iova: u64, len: u64) -> io::Result<()> {
            assert_eq!(self.0.lock().unwrap().remove(&iova), Some(len));
            Ok(())
        }
    }

    const EP: u32 = 0x20;

    /// One `--pmem` region (`extra`: its options) of `size` bytes in `dir` and `ram_size` bytes of guest RAM, with
    /// the endpoint `nvme0` behind a `ViommuDma`; the recorders stand in for the VFIO container.
    struct Rig {
        mapper: Mapper,
        pmem_dma: Arc<RecordingDma>,
        ram_dma: Arc<RamRecorder>,
        region: Arc<crate::region_registry::Region>,
        v: ViommuDma,
    }

    fn rig(dir: &std::path::Path, name: &str, size: u64, extra: &str, ram_size: usize) -> Rig {
        let pmem_dma = Arc::new(RecordingDma::new());
        let mapper = Mapper::new(
            Arc::new(crate::lease_manager::LogNotifier),
            Some(pmem_dma.clone() as Arc<dyn DmaMapper>),
        );
        let regions = RegionRegistry::new();
        let region = regions.insert(crate::region_registry::test_region_with(
            &mapper, dir, name, size, extra,
        ));
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_size)]).unwrap();
        let ram_dma = Arc::new(RamRecorder::default());
        let v = ViommuDma::new(
            mapper.clone(),
            regions,
            ram,
            ram_dma.clone(),
            &[(EP, "nvme0".to_owned())],
        );
        Rig {
            mapper,
            pmem_dma,
            ram_dma,
            region,
            v,
        }
    }
    const PG: u64 = 4096;

    fn map(iova: u64, len: u64, phys: u64) -> DmaMap {
        DmaMap {
            endpoint: EP,
            domain: 1,
            iova,
            len,
            phys,
            write: true,
        }
    }

    /// A MAP of guest RAM goes to the container at the guest's IOVA; a MAP of an `iommu=refuse` region pins exactly
    /// that extent for the endpoint (pinned bytes == mapped bytes), a punch over it is refused naming the endpoint
    /// while a punch beside it proceeds; UNMAP unpins and the punch then proceeds. A region without `iommu=`, a
    /// range straddling a region's end and an address that is neither RAM nor pmem are refused as Outside.
    #[test]
    fn maps_of_ram_go_to_the_container_and_maps_of_pmem_are_pins_of_exactly_that_extent() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let Rig {
            mapper,
            pmem_dma,
            ram_dma,
            region: r,
            v,
        } = rig(dir.path(), "data", 4 << 20, ",iommu=refuse", 16 << 20);
        v.map(&map(0x1000_0000, 4 * PG, 0x10_0000)).unwrap();
        assert_eq!(
            *ram_dma.0.lock().unwrap(),
            BTreeMap::from([(0x1000_0000, 4 * PG)])
        );
        assert_eq!(
            v.pinned_bytes(EP),
            0,
            "guest RAM is not pinned by the mapper"
        );

        let at = r.guest_addr + (1 << 20);
        v.map(&map(0x2000_0000, 2 * PG, at)).unwrap();
        assert_eq!(v.pinned_bytes(EP), 2 * PG);
        let maps: Vec<_> = pmem_dma
            .mappings()
            .into_iter()
            .map(|(i, _, l)| (i, l))
            .collect();
        assert_eq!(maps, vec![(0x2000_0000, 2 * PG)]);
        let e = mapper.punch(None, r.id, (1 << 20) + PG, PG).unwrap_err();
        assert_eq!(e.errno(), libc::ETXTBSY);
        assert!(e.to_string().contains("viommu:nvme0"), "{e}");
        mapper.punch(None, r.id, 2 << 20, 1 << 20).unwrap();

        let (eps, regs) = v.counters();
        assert_eq!(eps["nvme0"].mapped_bytes, 6 * PG);
        assert_eq!(regs["data"].mapped_bytes, 2 * PG);
        assert_eq!(regs["ram"].mapped_bytes, 4 * PG);

        v.unmap(&map(0x2000_0000, 2 * PG, at));
        assert_eq!(v.pinned_bytes(EP), 0);
        assert!(pmem_dma.mappings().is_empty());
        mapper.punch(None, r.id, 1 << 20, 2 * PG).unwrap();
        v.unmap(&map(0x1000_0000, 4 * PG, 0x10_0000));
        assert!(ram_dma.0.lock().unwrap().is_empty());
        let moment = v.sample();
        assert_eq!(moment.regions["data"].mapped_bytes, 0);
        assert_eq!(
            moment.regions["data"].mapped_bytes_total,
            2 * PG,
            "what was ever mapped stays counted"
        );
        assert_eq!(moment.pinned[&EP], 0);

        // Straddling the region's end, RAM's end, and nothing at all.
        let end = r.guest_addr + r.size();
        for phys in [end - PG, (16 << 20) - PG, 0x8000_0000] {
            assert_eq!(
                v.map(&map(0, 2 * PG, phys)),
                Err(MapRefusal::Outside),
                "{phys:#x}"
            );
        }
        assert_eq!(v.counters().0["nvme0"].refused, 3);
        assert!(pmem_dma.mappings().is_empty());
        assert!(mapper
            .snapshot()
            .owner(v.endpoints()[0].owner)
            .unwrap()
            .leases
            .is_empty());
    }

    /// A `create=on` file on a disk filesystem is all unwritten: the first MAP of a range makes it pinnable
    /// (written, still reading as zeros) and pins it; a second MAP of a range already written pins directly.
    #[test]
    fn a_map_of_unwritten_pmem_is_prepared_then_pinned() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let Rig {
            pmem_dma,
            region: r,
            v,
            ..
        } = rig(dir.path(), "disk", 4 << 20, ",iommu=recall", 1 << 20);
        v.map(&map(0x4000_0000, 16 * PG, r.guest_addr)).unwrap();
        v.unmap(&map(0x4000_0000, 16 * PG, r.guest_addr));
        v.map(&map(0x5000_0000, 16 * PG, r.guest_addr)).unwrap();
        assert_eq!(v.pinned_bytes(EP), 16 * PG);
        let maps: Vec<_> = pmem_dma
            .mappings()
            .into_iter()
            .map(|(i, _, l)| (i, l))
            .collect();
        assert_eq!(maps, vec![(0x5000_0000, 16 * PG)]);
        let mut b = vec![0xffu8; 16 * PG as usize];
        std::os::unix::fs::FileExt::read_exact_at(r.backing.file(), &mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "prepare changed what the range reads as"
        );
    }

    #[test]
    fn a_region_without_iommu_is_not_reachable() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let Rig { region: r, v, .. } = rig(dir.path(), "plain", 2 << 20, "", 1 << 20);
        assert_eq!(v.map(&map(0, PG, r.guest_addr)), Err(MapRefusal::Outside));
    }
}
