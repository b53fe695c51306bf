//! The virtio-iommu device driven as a guest driver drives it: real queues in guest memory, requests laid out as
//! Linux lays them out, a mapper that records what it was asked (and refuses what is not RAM or pmem), and a
//! guest that asks for what it may not have.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::{GuestMemory, IrqfdInterrupt, VirtioDevice};

const QSIZE: u16 = 64;
const BUF: u64 = 0x8_0000;
const PAGE: u64 = 0x1000;
/// What the mapper accepts: "RAM" below 1 GiB and a "pmem region" at 4 GiB.
const RAM_END: u64 = 0x4000_0000;
const PMEM: (u64, u64) = (0x1_0000_0000, 0x1_0010_0000);
const EP: u32 = 0x10;
const EP2: u32 = 0x18;

/// Records live mappings (endpoint, iova, len, phys) and refuses guest physical ranges that are neither.
#[derive(Default)]
struct Recorder {
    live: Mutex<BTreeSet<(u32, u64, u64, u64)>>,
    fail_next: Mutex<bool>,
}

impl IommuMapper for Recorder {
    fn map(&self, m: &DmaMap) -> Result<(), MapRefusal> {
        if std::mem::take(&mut *self.fail_next.lock().unwrap()) {
            return Err(MapRefusal::Failed("refused by the test".into()));
        }
        let end = m.phys + m.len;
        let ram = end <= RAM_END;
        let pmem = m.phys >= PMEM.0 && end <= PMEM.1;
        if !ram && !pmem {
            return Err(MapRefusal::Outside);
        }
        assert!(
            self.live
                .lock()
                .unwrap()
                .insert((m.endpoint, m.iova, m.len, m.phys)),
            "mapped twice: {m:?}"
        );
        Ok(())
    }
    fn unmap(&self, m: &DmaMap) {
        assert!(
            self.live
                .lock()
                .unwrap()
                .remove(&(m.endpoint, m.iova, m.len, m.phys)),
            "unmap of what is not mapped: {m:?}"
        );
    }
}

impl Recorder {
    fn live(&self) -> Vec<(u32, u64, u64, u64)> {
        self.live.lock().unwrap().iter().copied().collect()
    }
}

fn config(max_mappings: usize) -> IommuConfig {
    IommuConfig {
        page_size_mask: !(PAGE - 1),
        input_range: (0, (1 << 39) - 1),
        domain_range: (0, 1023),
        endpoints: vec![EP, EP2],
        msi_range: Some((0xfee0_0000, 0xfeef_ffff)),
        max_mappings,
    }
}

struct Guest<'a> {
    mem: &'a GuestMemory,
    queues: Vec<MockSplitQueue<'a, GuestMemory>>,
    next_desc: [u16; 2],
    consumed: [u16; 2],
    next_buf: u64,
    dev: Iommu,
    mapper: Arc<Recorder>,
}

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn guest(mem: &GuestMemory, max_mappings: usize) -> Guest<'_> {
    let mapper = Arc::new(Recorder::default());
    let mut dev = Iommu::new("viommu0", config(max_mappings), mapper.clone());
    assert_eq!(dev.device_type(), VIRTIO_ID_IOMMU);
    dev.ack_features(dev.device_features());
    let queues: Vec<_> = (0..2)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 + i * 0x4000), QSIZE))
        .collect();
    dev.activate(
        mem.clone(),
        Arc::new(IrqfdInterrupt::new().unwrap()),
        queues.iter().map(|q| q.create_queue().unwrap()).collect(),
    )
    .unwrap();
    Guest {
        mem,
        queues,
        next_desc: [0; 2],
        consumed: [0; 2],
        next_buf: BUF,
        dev,
        mapper,
    }
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

impl Guest<'_> {
    fn buf(&mut self, bytes: &[u8], len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += 0x1000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let _ = len;
        addr
    }

    /// Sends `descs` as one chain on the request queue and returns the used length and the writable bytes.
    fn chain(&mut self, descs: &[(u64, u32, bool)]) -> (u32, Vec<u8>) {
        let at = self.next_desc[0] % QSIZE;
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == descs.len();
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                d(addr, len, flags, at + i as u16 + 1)
            })
            .collect();
        self.queues[0].add_desc_chains(&raw, at).unwrap();
        self.next_desc[0] += descs.len() as u16;
        self.dev.process_queue(0).unwrap();
        let used = self.used(0);
        assert_eq!(used.len(), 1, "one answer per request");
        let (_, len) = used[0];
        let wr = descs.iter().rev().find(|x| x.2).copied();
        let bytes = match wr {
            Some((addr, l, _)) => {
                let mut b = vec![0u8; l as usize];
                let _ = self.mem.read_slice(&mut b, GuestAddress(addr));
                b
            }
            None => Vec::new(),
        };
        (len, bytes)
    }

    /// Sends one request laid out as Linux does: the request readable, `extra` bytes then the tail writable.
    fn request(&mut self, req: &[u8], extra: u32) -> (u8, Vec<u8>) {
        let r = self.buf(req, req.len() as u32);
        let w = self.buf(&[0xff; 4], extra + 4);
        let (len, bytes) = self.chain(&[(r, req.len() as u32, false), (w, extra + 4, true)]);
        assert_eq!(len, extra + 4, "the used length covers the writable part");
        (bytes[extra as usize], bytes)
    }

    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.queues[q].used().idx().load();
        let mut out = Vec::new();
        while self.consumed[q] != idx {
            let e = self.queues[q]
                .used()
                .ring()
                .ref_at((self.consumed[q] % QSIZE) as usize)
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.consumed[q] = self.consumed[q].wrapping_add(1);
        }
        out
    }

    fn attach(&mut self, domain: u32, endpoint: u32) -> u8 {
        self.request(&attach_req(domain, endpoint, 0), 0).0
    }

    fn detach(&mut self, domain: u32, endpoint: u32) -> u8 {
        let mut r = vec![req_type::DETACH, 0, 0, 0];
        r.extend(domain.to_le_bytes());
        r.extend(endpoint.to_le_bytes());
        r.extend([0; 8]);
        self.request(&r, 0).0
    }

    fn map(&mut self, domain: u32, iova: u64, len: u64, phys: u64) -> u8 {
        self.request(
            &map_req(domain, iova, len, phys, map_flags::READ | map_flags::WRITE),
            0,
        )
        .0
    }

    fn unmap(&mut self, domain: u32, iova: u64, len: u64) -> u8 {
        let mut r = vec![req_type::UNMAP, 0, 0, 0];
        r.extend(domain.to_le_bytes());
        r.extend(iova.to_le_bytes());
        r.extend((iova + len - 1).to_le_bytes());
        r.extend([0; 4]);
        self.request(&r, 0).0
    }
}

fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut r = vec![req_type::ATTACH, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(endpoint.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r.extend([0; 4]);
    r
}

fn map_req(domain: u32, iova: u64, len: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut r = vec![req_type::MAP, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(iova.to_le_bytes());
    r.extend(iova.wrapping_add(len).wrapping_sub(1).to_le_bytes());
    r.extend(phys.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r
}

#[test]
fn config_space_advertises_the_granule_ranges_and_probe_size() {
    let m = mem();
    let g = guest(&m, 16);
    let mut b = [0u8; 40];
    g.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), !0xfff);
    assert_eq!(
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
        (1 << 39) - 1
    );
    assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 1023);
    assert_eq!(
        u32::from_le_bytes(b[32..36].try_into().unwrap()),
        probe::SIZE
    );
    assert_eq!(b[36], 0, "no bypass");
    assert_eq!(
        g.dev.device_features(),
        features::INPUT_RANGE | features::DOMAIN_RANGE | features::MAP_UNMAP | features::PROBE
    );
}

#[test]
fn attach_map_unmap_detach_reach_the_mapper_and_the_counters() {
    let m = mem();
    let mut g = guest(&m, 16);
    assert_eq!(g.attach(1, EP), status::OK);
    assert_eq!(g.map(1, 0x10_0000, 4 * PAGE, 0x20_0000), status::OK);
    assert_eq!(g.map(1, 0x20_0000, 2 * PAGE, PMEM.0 + PAGE), status::OK);
    assert_eq!(
        g.mapper.live(),
        vec![
            (EP, 0x10_0000, 4 * PAGE, 0x20_0000),
            (EP, 0x20_0000, 2 * PAGE, PMEM.0 + PAGE)
        ]
    );
    let h = g.dev.handle();
    assert_eq!(h.metrics().mapped_bytes, 6 * PAGE);
    assert_eq!(h.mapped_over(PMEM.0, PMEM.1 - PMEM.0).len(), 1);
    // Unmapping a range with the first mapping in it (and nothing else) removes exactly that one.
    assert_eq!(g.unmap(1, 0x0f_0000, 0x10_0000 + 4 * PAGE), status::OK);
    assert_eq!(
        g.mapper.live(),
        vec![(EP, 0x20_0000, 2 * PAGE, PMEM.0 + PAGE)]
    );
    // Unmapping nothing is fine.
    assert_eq!(g.unmap(1, 0x80_0000, PAGE), status::OK);
    // A second endpoint joining the domain gets its mappings; the last one leaving frees them.
    assert_eq!(g.attach(1, EP2), status::OK);
    assert_eq!(g.mapper.live().len(), 2);
    assert_eq!(g.detach(1, EP), status::OK);
    assert_eq!(
        g.mapper.live(),
        vec![(EP2, 0x20_0000, 2 * PAGE, PMEM.0 + PAGE)]
    );
    assert_eq!(g.detach(1, EP2), status::OK);
    assert!(g.mapper.live().is_empty());
    let s = h.metrics();
    assert_eq!((s.maps, s.unmaps, s.mapped_bytes), (2, 2, 0));
    assert_eq!(s.by_status[status::OK as usize], 8);
    // The domain went with its last endpoint.
    assert_eq!(g.map(1, 0, PAGE, 0), status::NOENT);
}

#[test]
fn bad_domains_and_endpoints_get_their_status_and_map_nothing() {
    let m = mem();
    let mut g = guest(&m, 16);
    assert_eq!(g.map(7, 0, PAGE, 0), status::NOENT, "domain never attached");
    assert_eq!(g.unmap(7, 0, PAGE), status::NOENT);
    assert_eq!(
        g.attach(1024, EP),
        status::RANGE,
        "domain outside domain_range"
    );
    assert_eq!(g.attach(1, 0x99), status::NOENT, "no such endpoint");
    assert_eq!(
        g.request(&attach_req(1, EP, 1), 0).0,
        status::INVAL,
        "bypass not offered"
    );
    assert_eq!(g.attach(1, EP), status::OK);
    assert_eq!(g.detach(2, EP), status::NOENT, "domain 2 does not exist");
    assert_eq!(g.attach(2, EP2), status::OK);
    assert_eq!(g.detach(2, EP), status::INVAL, "EP is in domain 1");
    assert_eq!(g.detach(1, 0x99), status::NOENT);
    // Unknown type, a request cut short.
    assert_eq!(g.request(&[42, 0, 0, 0], 0).0, status::UNSUPP);
    assert_eq!(
        g.request(&[req_type::MAP, 0, 0, 0, 1, 0], 0).0,
        status::INVAL
    );
    assert!(g.mapper.live().is_empty());
    let s = g.dev.handle().metrics();
    assert_eq!(s.by_status[status::NOENT as usize], 5);
    assert_eq!(s.by_status[status::INVAL as usize], 3);
    assert_eq!(s.by_status[status::RANGE as usize], 1);
    assert_eq!(s.by_status[status::UNSUPP as usize], 1);
    assert_eq!(s.maps, 0);
}

#[test]
fn overlapping_maps_are_inval_and_split_unmaps_range_with_nothing_removed() {
    let m = mem();
    let mut g = guest(&m, 16);
    assert_eq!(g.attach(1, EP), status::OK);
    assert_eq!(g.map(1, 0x10_0000, 4 * PAGE, 0x20_0000), status::OK);
    for (iova, len) in [
        (0x10_0000, PAGE),
        (0x0f_f000, 2 * PAGE),
        (0x10_3000, 8 * PAGE),
        (0x0f_0000, 0x10_0000),
    ] {
        assert_eq!(
            g.map(1, iova, len, 0x40_0000),
            status::INVAL,
            "{iova:#x}+{len:#x}"
        );
    }
    assert_eq!(g.unmap(1, 0x10_1000, PAGE), status::RANGE);
    assert_eq!(g.unmap(1, 0x0f_0000, 0x1_1000), status::RANGE);
    assert_eq!(g.mapper.live(), vec![(EP, 0x10_0000, 4 * PAGE, 0x20_0000)]);
    // Adjacent maps are fine.
    assert_eq!(g.map(1, 0x10_4000, PAGE, 0x40_0000), status::OK);
    assert_eq!(g.map(1, 0x0f_f000, PAGE, 0x40_1000), status::OK);
}

#[test]
fn out_of_range_and_misaligned_requests_map_nothing() {
    let m = mem();
    let mut g = guest(&m, 16);
    assert_eq!(g.attach(1, EP), status::OK);
    // Guest physical: past RAM, straddling RAM's end, between RAM and pmem, past pmem.
    for phys in [RAM_END, RAM_END - PAGE, 0x8000_0000, PMEM.1 - PAGE] {
        assert_eq!(g.map(1, 0, 2 * PAGE, phys), status::RANGE, "{phys:#x}");
    }
    // IOVA past input_range, misaligned IOVA, length, physical address.
    assert_eq!(g.map(1, 1 << 39, PAGE, 0), status::RANGE);
    assert_eq!(g.map(1, (1 << 39) - PAGE, 2 * PAGE, 0), status::RANGE);
    assert_eq!(g.map(1, 0x800, PAGE, 0), status::RANGE);
    assert_eq!(g.map(1, 0, PAGE + 1, 0), status::RANGE);
    assert_eq!(g.map(1, 0, PAGE, 0x10), status::RANGE);
    // The whole of u64 (its length does not fit in 64 bits).
    let mut whole = map_req(1, 0, 0, 0, 1);
    whole[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(g.request(&whole, 0).0, status::RANGE);
    // virt_end before virt_start; unknown flags; MMIO (not offered).
    assert_eq!(g.request(&map_req(1, 0x2000, 0, 0, 1), 0).0, status::INVAL);
    assert_eq!(
        g.request(&map_req(1, 0, PAGE, 0, 1 << 7), 0).0,
        status::INVAL
    );
    assert_eq!(
        g.request(&map_req(1, 0, PAGE, 0, map_flags::MMIO), 0).0,
        status::INVAL
    );
    // The host refusing (a pin refused): DEVERR.
    *g.mapper.fail_next.lock().unwrap() = true;
    assert_eq!(g.map(1, 0, PAGE, 0), status::DEVERR);
    assert!(g.mapper.live().is_empty());
    assert_eq!(g.dev.handle().metrics().maps, 0);
    assert_eq!(g.map(1, 0, PAGE, 0), status::OK);
}

#[test]
fn a_flood_of_maps_stops_at_the_limit_with_nomem() {
    let m = mem();
    let mut g = guest(&m, 8);
    assert_eq!(g.attach(1, EP), status::OK);
    let statuses: Vec<u8> = (0..12)
        .map(|i| g.map(1, i * PAGE, PAGE, i * PAGE))
        .collect();
    assert_eq!(&statuses[..8], &[status::OK; 8]);
    assert_eq!(&statuses[8..], &[status::NOMEM; 4]);
    assert_eq!(g.mapper.live().len(), 8);
    assert_eq!(
        g.dev.handle().metrics().by_status[status::NOMEM as usize],
        4
    );
    // Room again after an unmap.
    assert_eq!(g.unmap(1, 0, PAGE), status::OK);
    assert_eq!(g.map(1, 100 * PAGE, PAGE, 0), status::OK);
    // A burst of requests in one notification is answered in full (domain 2 does not exist: NOENT each).
    for i in 0..30u64 {
        let r = g.buf(&map_req(2, i * PAGE, PAGE, 0, 1), 36);
        let w = g.buf(&[0xff; 4], 4);
        let at = g.next_desc[0] % QSIZE;
        g.queues[0]
            .add_desc_chains(
                &[
                    d(r, 36, VRING_DESC_F_NEXT as u16, at + 1),
                    d(w, 4, VRING_DESC_F_WRITE as u16, 0),
                ],
                at,
            )
            .unwrap();
        g.next_desc[0] += 2;
    }
    g.dev.process_queue(0).unwrap();
    assert_eq!(g.used(0).len(), 30);
    assert_eq!(
        g.dev.handle().metrics().by_status[status::NOENT as usize],
        30
    );
}

#[test]
fn probe_reports_the_msi_doorbell_and_unknown_endpoints_are_noent() {
    let m = mem();
    let mut g = guest(&m, 8);
    let mut r = vec![req_type::PROBE, 0, 0, 0];
    r.extend(EP.to_le_bytes());
    r.extend([0; 64]);
    let (s, bytes) = g.request(&r, probe::SIZE);
    assert_eq!(s, status::OK);
    assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), probe::RESV_MEM);
    assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), 20);
    assert_eq!(bytes[4], probe::RESV_MEM_MSI);
    assert_eq!(
        u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
        0xfee0_0000
    );
    assert_eq!(
        u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
        0xfeef_ffff
    );
    assert_eq!(&bytes[24..28], &[0; 4], "properties end with type NONE");
    r[4] = 0x99;
    assert_eq!(g.request(&r, probe::SIZE).0, status::NOENT);
    // No room for the properties.
    r[4] = EP as u8;
    assert_eq!(g.request(&r, 8).0, status::INVAL);
}

#[test]
fn a_fence_unmaps_and_reports_a_fault_event_per_endpoint() {
    let m = mem();
    let mut g = guest(&m, 8);
    assert_eq!(g.attach(1, EP), status::OK);
    assert_eq!(g.map(1, 0x10_0000, 2 * PAGE, PMEM.0), status::OK);
    assert_eq!(g.map(1, 0x20_0000, PAGE, PMEM.0 + 0x8000), status::OK);
    // One event buffer posted; the fence touches only the first mapping's pages.
    let ev = g.buf(&[0; 24], 24);
    g.queues[1]
        .add_desc_chains(&[d(ev, 24, VRING_DESC_F_WRITE as u16, 0)], 0)
        .unwrap();
    g.dev.process_queue(1).unwrap();
    assert!(g.used(1).is_empty(), "no event before a fault");
    let h = g.dev.handle();
    let fenced = h.fence(PMEM.0 + PAGE, PAGE);
    assert_eq!(fenced.len(), 1);
    assert_eq!(
        (fenced[0].map.endpoint, fenced[0].map.iova),
        (EP, 0x10_0000)
    );
    assert_eq!(
        g.mapper.live(),
        vec![(EP, 0x20_0000, PAGE, PMEM.0 + 0x8000)]
    );
    assert_eq!(g.used(1), vec![(0, 24)]);
    let mut e = [0u8; 24];
    m.read_slice(&mut e, GuestAddress(ev)).unwrap();
    assert_eq!(e[0], fault::REASON_MAPPING);
    assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), EP);
    assert_eq!(u64::from_le_bytes(e[16..24].try_into().unwrap()), 0x10_0000);
    let s = h.metrics();
    assert_eq!(
        (s.fences, s.fenced_bytes, s.faults_reported),
        (1, 2 * PAGE, 1)
    );
    assert_eq!(s.mapped_bytes, PAGE);
    // The guest's own UNMAP of the fenced range afterwards finds nothing, and says OK.
    assert_eq!(g.unmap(1, 0x10_0000, 2 * PAGE), status::OK);
    // A second fence with no event buffer posted is kept until one is.
    assert_eq!(h.fence(PMEM.0 + 0x8000, PAGE).len(), 1);
    assert!(g.used(1).is_empty());
    let ev2 = g.buf(&[0; 24], 24);
    g.queues[1]
        .add_desc_chains(&[d(ev2, 24, VRING_DESC_F_WRITE as u16, 0)], 1)
        .unwrap();
    g.dev.process_queue(1).unwrap();
    assert_eq!(g.used(1), vec![(1, 24)]);
}

#[test]
fn reset_and_reattach_unmap_everything_the_guest_had() {
    let m = mem();
    let mut g = guest(&m, 8);
    assert_eq!(g.attach(1, EP), status::OK);
    assert_eq!(g.map(1, 0, PAGE, 0), status::OK);
    assert_eq!(g.attach(2, EP2), status::OK);
    assert_eq!(g.map(2, 0, PAGE, PMEM.0), status::OK);
    // EP moving to domain 2 frees domain 1 and takes domain 2's mapping.
    assert_eq!(g.attach(2, EP), status::OK);
    assert_eq!(
        g.mapper.live(),
        vec![(EP, 0, PAGE, PMEM.0), (EP2, 0, PAGE, PMEM.0)]
    );
    g.dev.reset();
    assert!(g.mapper.live().is_empty());
    assert_eq!(g.dev.handle().metrics().mapped_bytes, 0);
}

#[test]
fn chains_without_room_for_a_status_are_returned_empty_and_counted() {
    let m = mem();
    let mut g = guest(&m, 8);
    let r = g.buf(&attach_req(1, EP, 0), 20);
    // No writable descriptor; a 2-byte one; one outside guest memory.
    assert_eq!(g.chain(&[(r, 20, false)]).0, 0);
    let w = g.buf(&[0xff; 4], 2);
    assert_eq!(g.chain(&[(r, 20, false), (w, 2, true)]).0, 0);
    assert_eq!(g.chain(&[(r, 20, false), (0x200_0000, 4, true)]).0, 0);
    // A request outside guest memory with room for the tail: IOERR.
    let w = g.buf(&[0xff; 4], 4);
    let (len, b) = g.chain(&[(0x200_0000, 20, false), (w, 4, true)]);
    assert_eq!((len, b[0]), (4, status::IOERR));
    let s = g.dev.handle().metrics();
    assert_eq!(
        (s.unanswerable, s.by_status[status::IOERR as usize]),
        (3, 1)
    );
    assert!(g.mapper.live().is_empty());
}
