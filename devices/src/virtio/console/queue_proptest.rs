//! Property tests: a hostile guest's descriptors on any of the console's six queues, against the real device
//! with both ports open and host bytes waiting for the guest.
//!
//! Each case writes a random descriptor table (addresses anywhere, lengths up to `u32::MAX`, random NEXT and
//! WRITE flags and `next` indices, loops included), random available-ring heads, notifies one queue, and checks:
//! processing returns (no panic, no hang); guest memory changes only inside device-writable descriptors of that
//! queue and its used ring; a guest write reaches the port's backend at most [`MAX_TX_CHAIN`] bytes per chain.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::control::{event, Control};
use super::{Console, PortBackend, PortSpec, MAX_TX_CHAIN};
use crate::virtio::hostile_guest::{
    changed_bytes, fill, guest_memory, hostile_addr, hostile_len, proptest_config, snapshot,
    within, Rings, R1,
};
use crate::virtio::{IrqfdInterrupt, VirtioDevice};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const SIZE: u16 = 8;
/// Where the good control messages that open the ports sit.
const OPEN_MSGS: u64 = 0x8000;

/// Largest write the backends saw.
struct Largest(Arc<Mutex<usize>>);

impl PortBackend for Largest {
    fn guest_wrote(&mut self, data: &[u8]) {
        let mut l = self.0.lock().unwrap();
        *l = (*l).max(data.len());
    }
}

fn ring_base(q: usize) -> u64 {
    R1 + q as u64 * 0x400
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn hostile_desc() -> impl Strategy<Value = Desc> {
    let flags = prop_oneof![
        4 => prop::sample::select(vec![0, NEXT, WRITE, NEXT | WRITE]),
        1 => any::<u16>().prop_map(|f| f & !(VRING_DESC_F_INDIRECT as u16)),
    ];
    (
        hostile_addr(),
        hostile_len(),
        flags,
        prop_oneof![4 => 0..SIZE, 1 => any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Desc {
            addr,
            len,
            flags,
            next,
        })
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn hostile_descriptors_on_any_console_queue_never_panic_nor_write_outside_writable_buffers(
        queue in 0usize..6,
        descs in prop::collection::vec(hostile_desc(), SIZE as usize),
        heads in prop::collection::vec(prop_oneof![4 => 0..SIZE, 1 => any::<u16>()], 1..=SIZE as usize),
        host_bytes in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2000), 0..4),
        seed in any::<u64>(),
    ) {
        let largest = within(Duration::from_secs(30), "hostile console queue", move || {
            let mem = guest_memory();
            fill(&mem, seed);
            let seen = Arc::new(Mutex::new(0usize));
            let port = |name: Option<&str>, console| PortSpec {
                name: name.map(str::to_owned),
                console,
                backend: Box::new(Largest(seen.clone())),
            };
            let mut dev = Console::new("hostile", vec![port(None, true), port(Some("agent"), false)]).unwrap();
            dev.ack_features(dev.device_features());
            let rings: Vec<Rings<'_>> = (0..6).map(|q| Rings::new(&mem, ring_base(q), SIZE)).collect();
            dev.activate(
                mem.clone(),
                Arc::new(IrqfdInterrupt::new().unwrap()),
                rings.iter().map(Rings::queue).collect(),
            )
            .unwrap();
            // The guest opens both ports with two good control messages.
            let ctl = &rings[3];
            for p in 0..2u16 {
                let addr = OPEN_MSGS + u64::from(p) * 8;
                let msg = Control { id: u32::from(p), event: event::PORT_OPEN, value: 1 };
                mem.write_slice(&msg.to_bytes(), GuestAddress(addr)).unwrap();
                ctl.desc.store(p, RawDescriptor::from(Descriptor::new(addr, 8, 0, 0))).unwrap();
                ctl.avail.ring().ref_at(p as usize).unwrap().store(p);
            }
            ctl.avail.idx().store(2);
            dev.process_queue(3).unwrap();
            for (i, b) in host_bytes.iter().enumerate() {
                dev.sender(i % 2).unwrap().send(b);
            }

            // The hostile part.
            let r = &rings[queue];
            let start = r.avail.idx().load();
            for (i, d) in descs.iter().enumerate() {
                r.desc
                    .store(i as u16, RawDescriptor::from(Descriptor::new(d.addr, d.len, d.flags, d.next)))
                    .unwrap();
            }
            for (i, h) in heads.iter().enumerate() {
                let slot = (start as usize + i) % SIZE as usize;
                r.avail.ring().ref_at(slot).unwrap().store(*h);
            }
            r.avail.idx().store(start.wrapping_add(heads.len() as u16));
            let before = snapshot(&mem);
            let _ = dev.process_queue(queue);

            let used = (r.used_addr, r.used_addr + 6 + 8 * u64::from(SIZE));
            for a in changed_bytes(&mem, &before) {
                let in_used = (used.0..used.1).contains(&a);
                let in_writable = descs.iter().any(|d| {
                    d.flags & WRITE != 0 && a >= d.addr && a - d.addr < u64::from(d.len)
                });
                assert!(in_used || in_writable, "queue {queue}: byte {a:#x} changed outside writable buffers");
            }
            let largest = *seen.lock().unwrap();
            largest
        });
        prop_assert!(largest <= MAX_TX_CHAIN);
    }
}
