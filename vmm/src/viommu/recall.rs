//! `iommu=recall`: a layout change over a range a device has mapped. The guest agent is told (a break notice
//! with reason `dma-recall` naming the device by its PCI requester id, the guest-physical range and the
//! deadline); its hook stops whatever does DMA there and the guest's driver unmaps. Whatever is still mapped at
//! the deadline is fenced: the VMM removes the mapping itself (container unmap, unpin), the virtio-iommu reports
//! a fault event for it, and the change proceeds with the endpoint recorded as revoked. This is the
//! recall-then-fence model of NFS layout recalls.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daxvisor_mapper::OwnerId;

use super::dma::HoldOff;
use super::Viommu;
use crate::events::{EventKind, EventLog, NewEvent};

/// How often the recall looks whether the guest has unmapped.
const POLL: Duration = Duration::from_millis(2);

/// Recalls and fences, for the metrics.
#[derive(Default)]
pub struct RecallCounters {
    pub recalls: AtomicU64,
    pub fences: AtomicU64,
}

/// What happened to one endpoint's mappings over the range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecallOutcome {
    /// The endpoint's requester id.
    pub endpoint: u32,
    /// The endpoint's owner (`viommu:NAME`) and its name.
    pub owner: OwnerId,
    pub name: String,
    /// The agent was told.
    pub told: bool,
    /// The guest unmapped everything in time, after this long.
    pub released_after: Option<Duration>,
    /// Mappings were still there at the deadline and were fenced.
    pub fenced: bool,
}

impl Viommu {
    /// Recalls every mapping over guest-physical `[gpa, gpa + len)` of `region` (blocks up to `deadline`). New
    /// MAPs over the range are refused until the returned guard goes: the caller keeps it until its layout
    /// change is done, so the guest cannot map the range again between the fence and the change.
    pub fn recall(
        &self,
        region: &str,
        gpa: u64,
        len: u64,
        deadline: Duration,
        events: &EventLog,
    ) -> (Vec<RecallOutcome>, HoldOff) {
        // Before the mapped ranges are listed: a MAP the device is answering now is booked before the listing
        // (both under the device's lock), and every later one is refused.
        let hold = self.dma.hold_off(gpa, len);
        (self.recall_held(region, gpa, len, deadline, events), hold)
    }

    fn recall_held(
        &self,
        region: &str,
        gpa: u64,
        len: u64,
        deadline: Duration,
        events: &EventLog,
    ) -> Vec<RecallOutcome> {
        let mapped = self.handle.mapped_over(gpa, len);
        let endpoints: BTreeSet<u32> = mapped.iter().map(|m| m.endpoint).collect();
        if endpoints.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let recall_id = self.counters.recalls.fetch_add(1, Ordering::Relaxed) + 1;
        let deadline_ms = deadline.as_millis().min(u128::from(u32::MAX)) as u32;
        let mut out = Vec::new();
        for &ep in &endpoints {
            let Some(e) = self.dma.endpoints().into_iter().find(|e| e.id == ep) else {
                continue;
            };
            let told = self.routes.dma_recall(recall_id, ep, gpa, len, deadline_ms);
            let bdf = format!("0000:00:{:02x}.{}", (ep >> 3) & 0x1f, ep & 7);
            tracing::info!(device = %e.name, %bdf, region, gpa = format_args!("{gpa:#x}"), len, deadline_ms, told, "DMA recall");
            events.push(NewEvent {
                kind: EventKind::DmaRecall,
                region: Some(region.to_owned()),
                owners: vec![e.owner.to_raw()],
                message: format!(
                    "device {} ({bdf}) has guest-physical {gpa:#x}+{len:#x} mapped: recalled, deadline {deadline_ms} ms ({})",
                    e.name,
                    if told { "guest agent told" } else { "no guest agent to tell" }
                ),
                ..NewEvent::default()
            });
            out.push(RecallOutcome {
                endpoint: ep,
                owner: e.owner,
                name: format!("viommu:{}", e.name),
                told,
                released_after: None,
                fenced: false,
            });
        }
        // Wait for the guest to unmap, endpoint by endpoint.
        let end = started + deadline;
        loop {
            let still: BTreeSet<u32> = self
                .handle
                .mapped_over(gpa, len)
                .iter()
                .map(|m| m.endpoint)
                .collect();
            for o in out.iter_mut() {
                if o.released_after.is_none() && !still.contains(&o.endpoint) {
                    o.released_after = Some(started.elapsed());
                }
            }
            if still.is_empty() || Instant::now() >= end {
                break;
            }
            std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
        }
        let fenced = self.handle.fence(gpa, len);
        if !fenced.is_empty() {
            self.counters.fences.fetch_add(1, Ordering::Relaxed);
        }
        for o in out.iter_mut() {
            let mine: Vec<_> = fenced
                .iter()
                .filter(|f| f.map.endpoint == o.endpoint)
                .collect();
            if mine.is_empty() {
                continue;
            }
            o.fenced = true;
            o.released_after = None;
            let bytes: u64 = mine.iter().map(|f| f.map.len).sum();
            tracing::warn!(device = %o.name, region, mappings = mine.len(), bytes, "DMA recall deadline passed: mappings fenced, fault reported to the guest");
            events.push(NewEvent {
                kind: EventKind::DmaFenced,
                region: Some(region.to_owned()),
                owners: vec![o.owner.to_raw()],
                message: format!(
                    "{} did not unmap guest-physical {gpa:#x}+{len:#x} by the deadline: {} mapping(s), {bytes} bytes fenced; later DMA there faults",
                    o.name,
                    mine.len()
                ),
                ..NewEvent::default()
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use daxvisor_devices::virtio::iommu::{req_type, status, Iommu};
    use daxvisor_devices::virtio::{IrqfdInterrupt, VirtioDevice};
    use daxvisor_mapper::{DmaMapper, Mapper, RecordingDma};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::region_registry::RegionRegistry;
    use crate::viommu::{setup, RamDma, ViommuDma};

    const EP: u16 = 4 << 3;
    const PG: u64 = 4096;
    const QSIZE: u16 = 64;

    struct NoRam;
    impl RamDma for NoRam {
        unsafe fn map_ram(&self, _: u64, _: u64, _: *mut u8) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap_ram(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A guest driver for the device: requests on queue 0 laid out as Linux lays them out.
    struct Driver {
        mem: GuestMemoryMmap,
        dev: Iommu,
        next: u16,
        buf: u64,
    }

    impl Driver {
        fn send(&mut self, req: &[u8], q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u8 {
            let (r, w) = (self.buf, self.buf + 0x800);
            self.buf += 0x1000;
            self.mem.write_slice(req, GuestAddress(r)).unwrap();
            let at = self.next % QSIZE;
            q.add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(r, req.len() as u32, 1, at + 1)),
                    RawDescriptor::from(Descriptor::new(w, 4, 2, 0)),
                ],
                at,
            )
            .unwrap();
            self.next += 2;
            self.dev.process_queue(0).unwrap();
            self.mem.read_obj::<u8>(GuestAddress(w)).unwrap()
        }
    }

    fn attach(ep: u16) -> Vec<u8> {
        let mut r = vec![req_type::ATTACH, 0, 0, 0];
        r.extend(1u32.to_le_bytes());
        r.extend(u32::from(ep).to_le_bytes());
        r.extend([0; 8]);
        r
    }

    fn map_unmap(t: u8, iova: u64, len: u64, phys: u64) -> Vec<u8> {
        let mut r = vec![t, 0, 0, 0];
        r.extend(1u32.to_le_bytes());
        r.extend(iova.to_le_bytes());
        r.extend((iova + len - 1).to_le_bytes());
        if t == req_type::MAP {
            r.extend(phys.to_le_bytes());
            r.extend(3u32.to_le_bytes());
        } else {
            r.extend([0; 4]);
        }
        r
    }

    /// One `iommu=recall` region with 8 pages mapped by the device at IOVA 0x10000000.
    fn setup_vm(
        dir: &std::path::Path,
    ) -> (
        Mapper,
        Arc<crate::region_registry::Region>,
        Arc<Viommu>,
        Driver,
        GuestMemoryMmap,
    ) {
        let mapper = Mapper::new(
            Arc::new(crate::lease_manager::LogNotifier),
            Some(Arc::new(RecordingDma::new()) as Arc<dyn DmaMapper>),
        );
        let regions = RegionRegistry::new();
        let r = regions.insert(crate::region_registry::test_region_with(
            &mapper,
            dir,
            "data",
            4 << 20,
            ",iommu=recall",
        ));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dma = Arc::new(ViommuDma::new(
            mapper.clone(),
            regions,
            mem.clone(),
            Arc::new(NoRam),
            &[(u32::from(EP), "nvme0".into())],
        ));
        let dev = Iommu::new("viommu0", setup::device_config(&[EP]), dma.clone());
        let v = Arc::new(Viommu {
            handle: dev.handle(),
            dma,
            bdf: 5 << 3,
            endpoints: vec![EP],
            routes: crate::agent::Routes::new(),
            counters: RecallCounters::default(),
        });
        let drv = Driver {
            mem: mem.clone(),
            dev,
            next: 0,
            buf: 0x10_0000,
        };
        (mapper, r, v, drv, mem)
    }

    /// The guest unmaps within the deadline: nothing is fenced, the endpoint is recorded as released and the
    /// punch then proceeds; a `dma-recall` event names the device.
    #[test]
    fn a_recall_the_guest_answers_by_unmapping_needs_no_fence() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let (mapper, r, v, mut drv, mem) = setup_vm(dir.path());
        let queues: Vec<_> = (0..2)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 + i * 0x4000), QSIZE))
            .collect();
        drv.dev
            .activate(
                mem.clone(),
                Arc::new(IrqfdInterrupt::new().unwrap()),
                queues.iter().map(|q| q.create_queue().unwrap()).collect(),
            )
            .unwrap();
        assert_eq!(drv.send(&attach(EP), &queues[0]), status::OK);
        let at = r.guest_addr + (1 << 20);
        assert_eq!(
            drv.send(
                &map_unmap(req_type::MAP, 0x1000_0000, 8 * PG, at),
                &queues[0]
            ),
            status::OK
        );
        assert_eq!(v.dma.pinned_bytes(u32::from(EP)), 8 * PG);
        let events = EventLog::default();
        // The "guest" unmaps 30 ms into the recall (its hook stopped the reader; its driver unmaps).
        let outcomes = std::thread::scope(|s| {
            let recall = s.spawn(|| {
                v.recall("data", at, 8 * PG, Duration::from_secs(5), &events)
                    .0
            });
            std::thread::sleep(Duration::from_millis(30));
            let st = drv.send(
                &map_unmap(req_type::UNMAP, 0x1000_0000, 8 * PG, 0),
                &queues[0],
            );
            assert_eq!(st, status::OK);
            recall.join().unwrap()
        });
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].name, "viommu:nvme0");
        assert!(!outcomes[0].fenced);
        assert!(outcomes[0].released_after.is_some());
        assert!(!outcomes[0].told, "no agent session in this test");
        mapper.punch(None, r.id, 1 << 20, 8 * PG).unwrap();
        let ev = events.since(0);
        assert!(ev
            .iter()
            .any(|e| e.kind == EventKind::DmaRecall && e.message.contains("nvme0")));
        assert!(!ev.iter().any(|e| e.kind == EventKind::DmaFenced));
        assert_eq!(v.handle.metrics().fences, 0);
    }

    /// The guest ignores the recall: at the deadline the VMM fences (the pin and its lease go, a fault event is
    /// written into the driver's event buffer naming the endpoint and IOVA), the endpoint is recorded as
    /// revoked, and the punch proceeds. Mappings outside the range stay.
    #[test]
    fn a_recall_the_guest_ignores_is_fenced_at_the_deadline() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let (mapper, r, v, mut drv, mem) = setup_vm(dir.path());
        let queues: Vec<_> = (0..2)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 + i * 0x4000), QSIZE))
            .collect();
        drv.dev
            .activate(
                mem.clone(),
                Arc::new(IrqfdInterrupt::new().unwrap()),
                queues.iter().map(|q| q.create_queue().unwrap()).collect(),
            )
            .unwrap();
        assert_eq!(drv.send(&attach(EP), &queues[0]), status::OK);
        let at = r.guest_addr + (1 << 20);
        assert_eq!(
            drv.send(
                &map_unmap(req_type::MAP, 0x1000_0000, 8 * PG, at),
                &queues[0]
            ),
            status::OK
        );
        assert_eq!(
            drv.send(
                &map_unmap(req_type::MAP, 0x2000_0000, PG, r.guest_addr),
                &queues[0]
            ),
            status::OK
        );
        // The driver's event buffer.
        let ev_buf = 0x30_0000;
        queues[1]
            .add_desc_chains(&[RawDescriptor::from(Descriptor::new(ev_buf, 24, 2, 0))], 0)
            .unwrap();
        drv.dev.process_queue(1).unwrap();
        let events = EventLog::default();
        let (out, held_off) = v.recall("data", at, 8 * PG, Duration::from_millis(50), &events);
        assert_eq!(out.len(), 1);
        assert!(out[0].fenced && out[0].released_after.is_none());
        assert_eq!(
            v.dma.pinned_bytes(u32::from(EP)),
            PG,
            "only the mapping outside the range stays"
        );
        // Until the change is done the guest cannot map the range again (NOMEM: its DMA API retries later),
        // so nothing between the fence and the punch pins it and refuses the punch; RAM and the rest map.
        assert_eq!(
            drv.send(
                &map_unmap(req_type::MAP, 0x3000_0000, PG, at + PG),
                &queues[0]
            ),
            status::NOMEM
        );
        assert_eq!(v.dma.pinned_bytes(u32::from(EP)), PG);
        let refused = v.dma.sample().regions["data"];
        assert_eq!((refused.refused, refused.refused_bytes), (1, PG));
        mapper.punch(None, r.id, 1 << 20, 8 * PG).unwrap();
        drop(held_off);
        assert_eq!(
            drv.send(
                &map_unmap(req_type::MAP, 0x3000_0000, PG, at + PG),
                &queues[0]
            ),
            status::OK,
            "after the change the range maps again"
        );
        let mut fault = [0u8; 24];
        mem.read_slice(&mut fault, GuestAddress(ev_buf)).unwrap();
        assert_eq!(fault[0], 2, "reason MAPPING");
        assert_eq!(
            u32::from_le_bytes(fault[8..12].try_into().unwrap()),
            u32::from(EP)
        );
        assert_eq!(
            u64::from_le_bytes(fault[16..24].try_into().unwrap()),
            0x1000_0000
        );
        let ev = events.since(0);
        assert!(ev
            .iter()
            .any(|e| e.kind == EventKind::DmaFenced && e.message.contains("viommu:nvme0")));
        assert_eq!(v.counters.fences.load(Ordering::Relaxed), 1);
        assert_eq!(v.handle.metrics().fenced_bytes, 8 * PG);
        // The guest's own UNMAP afterwards finds nothing and is answered OK; the device serves on.
        assert_eq!(
            drv.send(
                &map_unmap(req_type::UNMAP, 0x1000_0000, 8 * PG, 0),
                &queues[0]
            ),
            status::OK
        );
    }
}
