//! The virtio-iommu device with a recording mapper, driven by a guest that sends well-formed requests with
//! arbitrary fields (ATTACH, DETACH, MAP, UNMAP, PROBE, unknown types), corrupts its own rings and descriptors,
//! posts event buffers, and by a VMM that fences ranges and resets the device. Nothing may panic or hang, the
//! mapper must never be asked to map what is mapped or unmap what is not, and after every step what the device
//! says is mapped is exactly what the mapper holds, with `mapped_bytes` their sum.

#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use daxvisor_devices::virtio::iommu::{DmaMap, Iommu, IommuConfig, IommuMapper, MapRefusal};
use daxvisor_devices::virtio::{IrqfdInterrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x20000;
const QSIZE: u16 = 16;
const PAGE: u64 = 0x1000;
/// (descriptor table, available ring, used ring) of the request and event queues.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x400, 0x800), (0x1000, 0x1400, 0x1800)];
/// Request and answer buffers: one 256-byte slot per descriptor index.
const BUFS: u64 = 0x4000;
const ENDPOINTS: [u32; 3] = [8, 16, 99];
const RAM_END: u64 = 0x100_0000;
const PMEM: (u64, u64) = (0x1_0000_0000, 0x1_0020_0000);

#[derive(Default)]
struct Recorder(Mutex<BTreeSet<(u32, u64, u64, u64)>>);

impl IommuMapper for Recorder {
    fn map(&self, m: &DmaMap) -> Result<(), MapRefusal> {
        let end = m.phys + m.len;
        if !(end <= RAM_END || (m.phys >= PMEM.0 && end <= PMEM.1)) {
            return Err(MapRefusal::Outside);
        }
        let fresh = self
            .0
            .lock()
            .unwrap()
            .insert((m.endpoint, m.iova, m.len, m.phys));
        assert!(fresh, "mapped twice: {m:?}");
        Ok(())
    }
    fn unmap(&self, m: &DmaMap) {
        let was = self
            .0
            .lock()
            .unwrap()
            .remove(&(m.endpoint, m.iova, m.len, m.phys));
        assert!(was, "unmap of what is not mapped: {m:?}");
    }
}

fn queues() -> Vec<Queue> {
    RINGS
        .iter()
        .map(|&(d, a, u)| {
            let mut q = Queue::new(QSIZE).expect("queue");
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(d as u32), Some(0));
            q.set_avail_ring_address(Some(a as u32), Some(0));
            q.set_used_ring_address(Some(u as u32), Some(0));
            q.set_ready(true);
            q
        })
        .collect()
}

struct Driver {
    mem: GuestMemoryMmap,
    next: [u16; 2],
    avail: [u16; 2],
}

impl Driver {
    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = RINGS[q].0 + u64::from(i % QSIZE) * 16;
        let _ = self.mem.write_obj(addr, GuestAddress(at));
        let _ = self.mem.write_obj(len, GuestAddress(at + 8));
        let _ = self.mem.write_obj(flags, GuestAddress(at + 12));
        let _ = self.mem.write_obj(next % QSIZE, GuestAddress(at + 14));
    }

    fn publish(&mut self, q: usize, head: u16) {
        let a = RINGS[q].1;
        let slot = a + 4 + u64::from(self.avail[q] % QSIZE) * 2;
        let _ = self.mem.write_obj(head % QSIZE, GuestAddress(slot));
        self.avail[q] = self.avail[q].wrapping_add(1);
        let _ = self.mem.write_obj(self.avail[q], GuestAddress(a + 2));
    }

    /// A chain of a readable request and a writable answer of `wlen` bytes.
    fn request(&mut self, body: &[u8], wlen: u32) {
        let h = self.next[0];
        self.next[0] = self.next[0].wrapping_add(2);
        let rbuf = BUFS + u64::from(h % QSIZE) * 256;
        let wbuf = BUFS + u64::from((h + 1) % QSIZE) * 256;
        let _ = self.mem.write_slice(body, GuestAddress(rbuf));
        self.desc(0, h, rbuf, body.len() as u32, 1, h + 1);
        self.desc(0, h + 1, wbuf, wlen.min(256), 2, 0);
        self.publish(0, h % QSIZE);
    }

    fn event_buffer(&mut self, len: u32) {
        let h = self.next[1];
        self.next[1] = self.next[1].wrapping_add(1);
        let buf = BUFS + 0x1000 + u64::from(h % QSIZE) * 32;
        self.desc(1, h, buf, len.min(32), 2, 0);
        self.publish(1, h % QSIZE);
    }
}

fn body(op: &[u8]) -> (Vec<u8>, u32) {
    let t = [1u8, 2, 3, 4, 5, 9][usize::from(op[1] % 6)];
    let domain = u32::from(op[2] % 4) * if op[2] & 0x80 != 0 { 1000 } else { 1 };
    let endpoint = ENDPOINTS[usize::from(op[3] % 3)];
    let iova = u64::from(u16::from_le_bytes([op[4], op[5]]) % 64) * PAGE;
    let len = (u64::from(op[6] % 8) + 1) * PAGE - u64::from(op[7] & 1);
    let phys = match op[6] >> 4 {
        0..=9 => u64::from(op[5] % 32) * PAGE,
        10..=13 => PMEM.0 + u64::from(op[5] % 32) * PAGE,
        14 => RAM_END - PAGE,
        _ => PMEM.1 - PAGE,
    };
    let mut b = vec![t, 0, 0, 0];
    match t {
        1 | 2 => {
            b.extend(domain.to_le_bytes());
            b.extend(endpoint.to_le_bytes());
            b.extend(u32::from(op[7] >> 6).to_le_bytes());
            b.extend([0; 4]);
        }
        3 => {
            b.extend(domain.to_le_bytes());
            b.extend(iova.to_le_bytes());
            b.extend((iova + len - 1).to_le_bytes());
            b.extend(phys.to_le_bytes());
            b.extend(u32::from(op[7] >> 5).to_le_bytes());
        }
        4 => {
            b.extend(domain.to_le_bytes());
            b.extend(iova.to_le_bytes());
            b.extend((iova + len - 1).to_le_bytes());
            b.extend([0; 4]);
        }
        5 => {
            b.extend(endpoint.to_le_bytes());
            b.extend([0; 64]);
        }
        _ => {}
    }
    // Sometimes cut short.
    if op[7] & 0x10 != 0 {
        b.truncate(usize::from(op[4]) % b.len().max(1));
    }
    let wlen = if t == 5 { 68 } else { 4 };
    (
        b,
        if op[7] & 0x08 != 0 {
            u32::from(op[3] % 8)
        } else {
            wlen
        },
    )
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let mapper = Arc::new(Recorder::default());
    let config = IommuConfig {
        page_size_mask: !(PAGE - 1),
        input_range: (0, 0x3f_ffff),
        domain_range: (0, 3),
        endpoints: ENDPOINTS[..2].to_vec(),
        msi_range: Some((0xfee0_0000, 0xfeef_ffff)),
        max_mappings: 24,
    };
    let mut dev = Iommu::new("fuzz", config, mapper.clone());
    let handle = dev.handle();
    let irq = Arc::new(IrqfdInterrupt::new().expect("eventfd"));
    dev.ack_features(dev.device_features());
    dev.activate(mem.clone(), irq.clone(), queues())
        .expect("activate");
    let mut drv = Driver {
        mem: mem.clone(),
        next: [0; 2],
        avail: [0; 2],
    };
    for op in data.chunks_exact(8).take(256) {
        match op[0] % 8 {
            0..=2 => {
                let (b, w) = body(op);
                drv.request(&b, w);
                let _ = dev.process_queue(0);
            }
            3 => {
                drv.event_buffer(u32::from(op[1]));
                let _ = dev.process_queue(1);
            }
            4 => {
                let phys = if op[1] & 1 == 0 { 0 } else { PMEM.0 };
                let at = phys + u64::from(op[2] % 32) * PAGE;
                handle.fence(at, u64::from(op[3] % 8 + 1) * PAGE);
            }
            5 => {
                // Corrupt the rings, descriptors or buffers.
                let at = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x6000;
                let _ = mem.write_slice(&op[3..8], GuestAddress(at));
                let _ = dev.process_queue(usize::from(op[3] % 3));
            }
            6 => {
                dev.reset();
                drv.next = [0; 2];
                drv.avail = [0; 2];
                for &(d, a, u) in &RINGS {
                    let _ = mem.write_slice(&[0u8; 0x400], GuestAddress(d));
                    let _ = mem.write_slice(&[0u8; 0x400], GuestAddress(a));
                    let _ = mem.write_slice(&[0u8; 0x400], GuestAddress(u));
                }
                dev.activate(mem.clone(), irq.clone(), queues())
                    .expect("activate after reset");
            }
            _ => {
                let _ = dev.process_queue(0);
            }
        }
        let said: BTreeSet<_> = handle
            .mappings()
            .iter()
            .map(|m| (m.endpoint, m.iova, m.len, m.phys))
            .collect();
        assert_eq!(
            said,
            *mapper.0.lock().unwrap(),
            "device and mapper disagree"
        );
        let per_domain: BTreeSet<_> = handle
            .mappings()
            .iter()
            .map(|m| (m.domain, m.iova, m.len))
            .collect();
        let bytes: u64 = per_domain.iter().map(|&(_, _, l)| l).sum();
        assert_eq!(handle.metrics().mapped_bytes, bytes);
    }
});
