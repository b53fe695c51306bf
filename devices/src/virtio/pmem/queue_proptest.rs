//! Property tests: a hostile guest's request queue against the real virtio-pmem device (real fdatasync on a
//! temporary file, real guest memory mappings).
//!
//! Each case builds a random descriptor table (addresses anywhere, including outside guest memory, across
//! region ends and near 2^64; lengths 0..=u32::MAX; random flags including NEXT loops and INDIRECT), a random
//! indirect table, a random available ring and a random starting ring position, notifies once, and checks:
//! - processing returns (no panic, no hang; a watchdog turns a hang into a failure);
//! - the used index advances only by entries whose ids are heads the guest offered (as a multiset), with a
//!   length of 0 or 4, and never for more entries than were offered;
//! - when processing succeeds, every offered chain is answered;
//! - guest memory outside the used ring and the first 4 bytes of device-writable descriptors with room for a
//!   status is byte-for-byte unchanged;
//! - a good flush offered afterwards is answered with status 0 (directly, or after a reset when the queue was
//!   reported broken).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{Pmem, PmemConfig, VIRTIO_PMEM_RESP_TYPE_OK};
use crate::virtio::hostile_guest::{
    changed_bytes, eventually, fill, guest_memory, hostile_addr, hostile_len, snapshot, within,
    HeldFileFlush, Rings, R1, R1_END, TOP, TOP_END,
};
use crate::virtio::{GuestMemory, IrqfdInterrupt, VirtioDevice};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Where the hostile indirect table is written (R1).
const INDIRECT_TABLE: u64 = 0x1_8000;
/// Buffers of the good flush offered after the hostile batch, and its indirect table (for 1-entry queues).
const GOOD_REQ: u64 = 0x1_c000;
const GOOD_RESP: u64 = 0x1_c010;
const GOOD_INDIRECT: u64 = 0x1_c100;
/// A fresh queue for the good flush after a reset.
const FRESH_QUEUE: u64 = 0x1_4000;
const FRESH_SIZE: u16 = 16;

/// Generous bound for "terminates": normal cases take well under a millisecond.
const WATCHDOG: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn raw(self) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(self.addr, self.len, self.flags, self.next))
    }
}

/// A descriptor anything could be in.
fn hostile_desc(size: u16) -> impl Strategy<Value = Desc> {
    let flags = prop_oneof![
        4 => prop::sample::select(vec![
            0,
            NEXT,
            WRITE,
            NEXT | WRITE,
            INDIRECT,
            INDIRECT | NEXT,
            INDIRECT | WRITE,
        ]),
        1 => any::<u16>(),
    ];
    let next = prop_oneof![4 => 0..size, 1 => any::<u16>()];
    let addr = prop_oneof![5 => hostile_addr(), 1 => Just(INDIRECT_TABLE)];
    // Multiples of 16 make plausible indirect table lengths.
    let len = prop_oneof![4 => hostile_len(), 1 => (0u32..=40).prop_map(|n| n * 16)];
    (addr, len, flags, next).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

/// Descriptor `index` of a table that is mostly what Linux sends (request at an even index chained to a
/// response right after it), so that the device gets past its first checks and actually writes statuses;
/// the rest is hostile.
fn desc(size: u16, index: u16) -> impl Strategy<Value = Desc> {
    let plausible = (0x8000u64..0xf000, prop::sample::select(vec![4u32, 4, 8, 3])).prop_map(
        move |(addr, len)| Desc {
            addr: addr & !3,
            len,
            flags: if index.is_multiple_of(2) { NEXT } else { WRITE },
            next: index.wrapping_add(1),
        },
    );
    prop_oneof![3 => plausible, 2 => hostile_desc(size)]
}

#[derive(Clone, Debug)]
struct Case {
    size: u16,
    /// Where the rings sit (see [`queue_base`]).
    spot: u8,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    /// The whole available ring, slot by slot.
    heads: Vec<u16>,
    /// How far the available index is ahead of the device (may exceed the queue size).
    delta: u16,
    /// Ring position the device starts at (tests index wrap-around).
    start: u16,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (0u32..=8).prop_flat_map(|log2| {
        let size = 1u16 << log2;
        // Heads: usually even (where the plausible chains start); a corrupt ring (any u16) in a fifth of
        // the cases, since one bad head makes the whole batch a queue error.
        let in_range = prop_oneof![3 => (0..size.div_ceil(2)).prop_map(|h| h * 2), 1 => 0..size];
        let heads = prop_oneof![
            4 => prop::collection::vec(in_range, size as usize),
            1 => prop::collection::vec(any::<u16>(), size as usize),
        ];
        let table: Vec<_> = (0..size).map(|i| desc(size, i)).collect();
        let delta = prop_oneof![8 => 0..=size, 1 => size + 1..=size + 3, 1 => any::<u16>()];
        let start = prop_oneof![2 => Just(0u16), 1 => Just(u16::MAX), 2 => any::<u16>()];
        (
            table,
            prop::collection::vec(hostile_desc(size), 0..24),
            heads,
            delta,
            start,
            0u8..5,
            any::<u64>(),
        )
            .prop_map(
                move |(table, indirect, heads, delta, start, spot, seed)| Case {
                    size,
                    spot,
                    table,
                    indirect,
                    heads,
                    delta,
                    start,
                    seed,
                },
            )
    })
}

/// Ring placements: low RAM, the descriptor table straddling the R0/R1 boundary, ending flush against the
/// hole after R1, ending flush against the end of the top region, mid-R0.
fn queue_base(spot: u8, size: u16) -> u64 {
    let total = Rings::len(size);
    match spot {
        0 => 0,
        1 => R1 - 16 * u64::from(size).div_ceil(2),
        // The top region is 4 KiB: only small queues fit there.
        3 if total <= TOP_END - TOP => (TOP_END - total) & !0xf,
        2 | 3 => (R1_END - total) & !0xf,
        _ => 0x2000,
    }
}

/// Guest-memory ranges the device may legitimately write: the used ring's index and elements, and the first 4
/// bytes of every device-writable descriptor long enough for a status.
fn writable_ranges(case: &Case, used_ring: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![(used_ring + 2, used_ring + 4 + 8 * u64::from(case.size))];
    for d in case.table.iter().chain(&case.indirect) {
        if d.flags & WRITE != 0 && d.len >= 4 {
            if let Some(end) = d.addr.checked_add(4) {
                ranges.push((d.addr, end));
            }
        }
    }
    ranges
}

fn new_pmem(flush: Arc<HeldFileFlush>) -> Pmem {
    Pmem::new(
        "prop",
        PmemConfig {
            start: 0x1_0000_0000,
            size: 0x20_0000,
        },
        flush,
    )
    .expect("pmem device")
}

/// The driver offers one well-formed flush at ring position `pos`, using descriptor 0 (and 1, or an indirect
/// table when the queue has a single entry).
fn offer_good_flush(mem: &GuestMemory, vq: &Rings, size: u16, pos: u16) {
    mem.write_obj(0u32, GuestAddress(GOOD_REQ)).unwrap();
    mem.write_obj(0xdead_beefu32, GuestAddress(GOOD_RESP))
        .unwrap();
    let req = Desc {
        addr: GOOD_REQ,
        len: 4,
        flags: NEXT,
        next: 1,
    };
    let resp = Desc {
        addr: GOOD_RESP,
        len: 4,
        flags: WRITE,
        next: 0,
    };
    if size >= 2 {
        vq.desc.store(0, req.raw()).unwrap();
        vq.desc.store(1, resp.raw()).unwrap();
    } else {
        mem.write_obj(req.raw(), GuestAddress(GOOD_INDIRECT))
            .unwrap();
        mem.write_obj(resp.raw(), GuestAddress(GOOD_INDIRECT + 16))
            .unwrap();
        let ind = Desc {
            addr: GOOD_INDIRECT,
            len: 32,
            flags: INDIRECT,
            next: 0,
        };
        vq.desc.store(0, ind.raw()).unwrap();
    }
    vq.avail
        .ring()
        .ref_at(usize::from(pos % size))
        .unwrap()
        .store(0);
    vq.avail.idx().store(pos.wrapping_add(1));
}

/// Notify, then wait for the good flush at `pos` to come back with status OK.
fn expect_good_flush_answered(mut pmem: Pmem, mem: &GuestMemory, vq: &Rings, size: u16, pos: u16) {
    let pmem = within(WATCHDOG, "good flush", move || {
        pmem.process_queue(0)
            .expect("a good flush is not a queue error");
        pmem
    });
    let answered = eventually(Duration::from_secs(10), || {
        vq.used.idx().load() == pos.wrapping_add(1)
    });
    assert!(answered, "good flush not answered");
    let elem = vq
        .used
        .ring()
        .ref_at(usize::from(pos % size))
        .unwrap()
        .load();
    assert_eq!((elem.id(), elem.len()), (0, 4));
    let ret = u32::from_le(mem.read_obj(GuestAddress(GOOD_RESP)).unwrap());
    assert_eq!(ret, VIRTIO_PMEM_RESP_TYPE_OK);
    drop(pmem); // joins the flush worker
}

fn run(case: Case) {
    let size = case.size;
    let mem = guest_memory();
    fill(&mem, case.seed);
    let vq = Rings::new(&mem, queue_base(case.spot, size), size);
    for (i, d) in case.table.iter().enumerate() {
        vq.desc.store(i as u16, d.raw()).unwrap();
    }
    for (i, d) in case.indirect.iter().enumerate() {
        mem.write_obj(d.raw(), GuestAddress(INDIRECT_TABLE + 16 * i as u64))
            .unwrap();
    }
    for (slot, &h) in case.heads.iter().enumerate() {
        vq.avail.ring().ref_at(slot).unwrap().store(h);
    }
    vq.avail.idx().store(case.start.wrapping_add(case.delta));
    vq.used.idx().store(case.start);
    let mut queue = vq.queue();
    queue.set_next_avail(case.start);
    queue.set_next_used(case.start);

    let flush = Arc::new(HeldFileFlush::new());
    let mut pmem = new_pmem(flush.clone());
    let irq = Arc::new(IrqfdInterrupt::new().unwrap());
    pmem.activate(mem.clone(), irq.clone(), vec![queue])
        .unwrap();
    let before = snapshot(&mem);

    let (pmem, result) = within(WATCHDOG, "process_queue", move || {
        let r = pmem.process_queue(0);
        (pmem, r)
    });

    // Offered heads, as a multiset: only when the available index is plausible does the device pop any.
    let offered_n = if case.delta <= size { case.delta } else { 0 };
    let mut offered: HashMap<u16, u32> = HashMap::new();
    for k in 0..offered_n {
        let slot = case.start.wrapping_add(k) % size;
        *offered.entry(case.heads[usize::from(slot)]).or_default() += 1;
    }
    let used_now = || vq.used.idx().load().wrapping_sub(case.start);
    if result.is_ok() {
        // Every popped chain is answered: bad ones at once, flushes by the worker.
        let all = eventually(Duration::from_secs(10), || used_now() == offered_n);
        assert!(all, "{} of {offered_n} offered chains answered", used_now());
    }
    let answered = used_now();
    assert!(
        answered <= offered_n,
        "used index advanced by {answered}, only {offered_n} chains offered"
    );
    // A guest may point a response buffer at its own used ring; the device then writes a status over an
    // entry it already returned. That corrupts only the guest's view, so such slots are not checked.
    let allowed = writable_ranges(&case, vq.used_addr);
    let guest_aimed_at = |slot: u16| {
        let at = vq.used_addr + 4 + 8 * u64::from(slot);
        allowed[1..].iter().any(|&(s, e)| s < at + 8 && at < e)
    };
    let mut seen: HashMap<u16, u32> = HashMap::new();
    for k in 0..answered {
        let slot = case.start.wrapping_add(k) % size;
        if guest_aimed_at(slot) {
            continue;
        }
        let elem = vq.used.ring().ref_at(usize::from(slot)).unwrap().load();
        let id = u16::try_from(elem.id()).expect("used id fits a u16");
        let n = seen.entry(id).or_default();
        *n += 1;
        assert!(
            *n <= offered.get(&id).copied().unwrap_or(0),
            "used entry for head {id} that was not offered (or answered twice)"
        );
        assert!(
            elem.len() == 0 || elem.len() == 4,
            "used len {}",
            elem.len()
        );
    }

    for addr in changed_bytes(&mem, &before) {
        assert!(
            allowed.iter().any(|&(s, e)| (s..e).contains(&addr)),
            "device wrote guest byte {addr:#x} outside the used ring and the writable buffers"
        );
    }

    // A good flush afterwards is served: on the same queue if it is intact, else after the driver's reset.
    let mut pmem = pmem;
    if result.is_ok() {
        let pos = case.start.wrapping_add(case.delta);
        offer_good_flush(&mem, &vq, size, pos);
        expect_good_flush_answered(pmem, &mem, &vq, size, pos);
    } else {
        pmem.reset();
        let zero = vec![0u8; Rings::len(FRESH_SIZE) as usize];
        mem.write_slice(&zero, GuestAddress(FRESH_QUEUE)).unwrap();
        let fresh = Rings::new(&mem, FRESH_QUEUE, FRESH_SIZE);
        pmem.activate(mem.clone(), irq, vec![fresh.queue()])
            .unwrap();
        offer_good_flush(&mem, &fresh, FRESH_SIZE, 0);
        expect_good_flush_answered(pmem, &mem, &fresh, FRESH_SIZE, 0);
    }
}

proptest! {
    #![proptest_config(crate::virtio::hostile_guest::proptest_config())]

    #[test]
    fn hostile_request_queue_never_breaks_the_device(c in case()) {
        run(c);
    }
}
