//! Property tests: a hostile driver on the virtio-mmio register block of a real virtio-pmem device (real
//! fdatasync on a temporary file, real guest memory, the real event-loop subscriber).
//!
//! Each case is a random sequence of MMIO accesses (any offset below 0x1000, widths 1/2/4/8, any value),
//! register writes with edge values (feature and queue selects out of range, queue sizes 0 / not a power of two
//! / too big, ring addresses at region ends, in holes or overflowing 64 bits, QueueReady toggles), status writes
//! in any order, notifications before anything is ready, full driver bring-ups, flush requests, event-loop
//! turns, and resets while a flush is held in the backend. Checked after every step:
//! - nothing panics or hangs (a watchdog turns a hang into a failure);
//! - magic, version, device id and vendor id always read the same;
//! - a read changes nothing (all registers and config read the same before and after it);
//! - the device is active only with ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK set, and the device model is
//!   only ever activated after a FEATURES_OK in the same session that accepted VERSION_1;
//! - right after a reset (status 0), every register reads as on a freshly built transport;
//! - a flush still in flight at a reset never touches guest memory afterwards.
//!
//! And at the end of every case, a driver that resets and brings the device up properly gets a flush
//! answered with status 0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, SubscriberOps};
use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::hostile_guest::{
    changed_bytes, eventually, guest_memory, hostile_addr, snapshot, within, HeldFileFlush, Rings,
    Snapshot, R1_END, R2, TOP,
};
use super::mmio::{lock, reg, MmioSubscriber, MmioTransport, MMIO_MAGIC, MMIO_VERSION, VENDOR_ID};
use super::pmem::{Pmem, PmemConfig, VIRTIO_ID_PMEM, VIRTIO_PMEM_RESP_TYPE_OK};
use super::{
    status, ActivateError, GuestMemory, QueueError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Buffers of the flushes the test offers (R0, away from every ring placement).
const REQ: u64 = 0x8000;
const RESP: u64 = 0x9000;
const OFFER_INDIRECT: u64 = 0xa000;
/// Where the end-of-case driver puts its rings and buffers (R1), away from everything the case used.
const FINAL_RINGS: u64 = 0x1_4000;
const FINAL_REQ: u64 = 0x1_6000;
const FINAL_RESP: u64 = 0x1_6010;

const WATCHDOG: Duration = Duration::from_secs(60);

/// What the transport did to the device model, checked against the rules.
#[derive(Default)]
struct SpyLog {
    /// Features accepted at a FEATURES_OK since the test last reset the device.
    acked: Option<u64>,
    activations: u64,
    violations: Vec<String>,
}

/// The real pmem device, watched.
struct Spy {
    inner: Pmem,
    log: Arc<Mutex<SpyLog>>,
}

impl VirtioDevice for Spy {
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }
    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }
    fn ack_features(&mut self, features: u64) {
        self.log.lock().unwrap().acked = Some(features);
        self.inner.ack_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data)
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        match log.acked {
            Some(f) if f & (1 << VIRTIO_F_VERSION_1) != 0 => {}
            other => log
                .violations
                .push(format!("activated with accepted features {other:?}")),
        }
        log.activations += 1;
        drop(log);
        self.inner.activate(mem, interrupt, queues)
    }
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        self.inner.process_queue(index)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn init_host_events(&mut self, ops: &mut EventOps) {
        self.inner.init_host_events(ops)
    }
    fn process_host_event(&mut self, events: Events, ops: &mut EventOps) {
        self.inner.process_host_event(events, ops)
    }
}

/// Where a driver bring-up puts queue 0.
#[derive(Clone, Debug)]
enum Placement {
    /// Proper rings at this base (recorded so flushes can be offered on them).
    Good(u64),
    /// Whatever addresses the guest likes.
    Hostile { desc: u64, avail: u64, used: u64 },
}

#[derive(Clone, Debug)]
enum Op {
    Read {
        offset: u64,
        width: usize,
    },
    Write {
        offset: u64,
        width: usize,
        value: u64,
    },
    /// A 4-byte write to a real register with an edge value.
    Reg {
        offset: u64,
        value: u32,
    },
    Status(u32),
    /// A whole, correct driver initialisation sequence (whatever state the device is in).
    Bringup {
        placement: Placement,
        size: u32,
    },
    /// Put a good flush in the rings of the last good bring-up and notify.
    OfferFlush,
    Notify(u32),
    /// One turn of the event loop.
    Pump,
    Hold,
    Release,
    /// Bring up, offer a flush held in the backend, run it to the worker, reset.
    FlushThenReset,
}

const REGISTERS: &[u64] = &[
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_SEL,
    reg::SHM_LEN_LOW,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
];

fn edge_value() -> impl Strategy<Value = u32> {
    let addr_half =
        hostile_addr().prop_flat_map(|a| prop::sample::select(vec![a as u32, (a >> 32) as u32]));
    prop_oneof![
        4 => prop::sample::select(vec![
            0u32, 1, 2, 3, 4, 7, 8, 12, 16, 31, 32, 255, 256, 257, 512, 0xffff, 0x1_0000,
            0x7fff_ffff, 0x8000_0000, u32::MAX - 15, u32::MAX,
        ]),
        2 => addr_half,
        1 => any::<u32>(),
    ]
}

fn status_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => prop::sample::select(vec![
            0u32,
            status::ACKNOWLEDGE,
            status::ACKNOWLEDGE | status::DRIVER,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            ALL_OK,
            status::DRIVER_OK,
            status::FEATURES_OK,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
            ALL_OK | status::DEVICE_NEEDS_RESET,
            ALL_OK | status::FAILED,
            status::FAILED,
            status::DEVICE_NEEDS_RESET,
        ]),
        1 => any::<u32>(),
    ]
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        3 => prop::sample::select(vec![0x1000u64, 0x1_0000 - 0x800, R1_END - 0x2000, R2, TOP])
            .prop_map(Placement::Good),
        2 => (hostile_addr(), hostile_addr(), hostile_addr())
            .prop_map(|(desc, avail, used)| Placement::Hostile { desc, avail, used }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let width = prop::sample::select(vec![1usize, 2, 4, 8]);
    prop_oneof![
        3 => (0u64..0x1000, width.clone()).prop_map(|(offset, width)| Op::Read { offset, width }),
        3 => (0u64..0x1000, width, any::<u64>())
            .prop_map(|(offset, width, value)| Op::Write { offset, width, value }),
        6 => (prop::sample::select(REGISTERS), edge_value())
            .prop_map(|(offset, value)| Op::Reg { offset, value }),
        3 => status_value().prop_map(Op::Status),
        3 => (placement(), prop_oneof![3 => Just(16u32), 1 => Just(256), 1 => edge_value()])
            .prop_map(|(placement, size)| Op::Bringup { placement, size }),
        3 => Just(Op::OfferFlush),
        2 => prop_oneof![Just(0u32), Just(1), any::<u32>()].prop_map(Op::Notify),
        3 => Just(Op::Pump),
        1 => Just(Op::Hold),
        1 => Just(Op::Release),
        2 => Just(Op::FlushThenReset),
    ]
}

struct Guest {
    mem: GuestMemory,
    transport: Arc<Mutex<MmioTransport>>,
    em: EventManager<MmioSubscriber>,
    log: Arc<Mutex<SpyLog>>,
    flush: Arc<HeldFileFlush>,
    /// Registers of a freshly built transport.
    initial: Vec<u32>,
    /// Base and size of the rings of the last good bring-up.
    rings: Option<(u64, u16)>,
    /// Guest memory at the last reset, kept while nothing but reads has happened since.
    at_reset: Option<Snapshot>,
}

fn new_transport(
    mem: &GuestMemory,
    flush: Arc<HeldFileFlush>,
) -> (MmioTransport, Arc<Mutex<SpyLog>>) {
    let pmem = Pmem::new(
        "prop",
        PmemConfig {
            start: 0x1_0000_0000,
            size: 0x20_0000,
        },
        flush,
    )
    .expect("pmem device");
    let log = Arc::new(Mutex::new(SpyLog::default()));
    let spy = Spy {
        inner: pmem,
        log: log.clone(),
    };
    (
        MmioTransport::new(mem.clone(), Box::new(spy)).expect("transport"),
        log,
    )
}

/// Every register (at the current selectors) and the config window, as 4-byte reads. CONFIG_GENERATION is
/// left out: it counts config writes across resets by design (virtio 1.2, 4.2.2 only asks that it change
/// when the config may have).
fn registers(t: &mut MmioTransport) -> Vec<u32> {
    (0..0x200u64)
        .step_by(4)
        .filter(|&o| o != reg::CONFIG_GENERATION)
        .map(|o| rd(t, o))
        .collect()
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Ring addresses for `size` entries at `base`, as [`Rings`] lays them out.
fn layout(base: u64, size: u16) -> (u64, u64, u64) {
    let s = u64::from(size);
    // Wrapping: a hostile base near 2^64 is the transport's problem, not the test's.
    (
        base,
        base.wrapping_add(16 * s),
        base.wrapping_add((18 * s + 6).next_multiple_of(4)),
    )
}

impl Guest {
    fn new() -> Self {
        let mem = guest_memory();
        let flush = Arc::new(HeldFileFlush::new());
        let (mut t, log) = new_transport(&mem, flush.clone());
        let initial = registers(&mut t);
        let transport = Arc::new(Mutex::new(t));
        let mut em = EventManager::<MmioSubscriber>::new().expect("event manager");
        em.add_subscriber(MmioSubscriber::new(transport.clone()));
        Guest {
            mem,
            transport,
            em,
            log,
            flush,
            initial,
            rings: None,
            at_reset: None,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let is_reset = offset == reg::STATUS && data == [0, 0, 0, 0];
        if is_reset {
            // The test knows the driver starts a new session; the spy must see a new FEATURES_OK.
            self.log.lock().unwrap().acked = None;
        }
        lock(&self.transport).write(offset, data);
        self.at_reset = None;
        if is_reset {
            let mut t = lock(&self.transport);
            assert!(!t.is_activated(), "active after reset");
            assert_eq!(
                registers(&mut t),
                self.initial,
                "registers after reset differ from a fresh transport"
            );
            drop(t);
            self.at_reset = Some(snapshot(&self.mem));
        }
    }

    fn w32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn pump(&mut self) {
        self.em.run_with_timeout(0).expect("event loop");
    }

    fn bringup(&mut self, placement: &Placement, size: u32) {
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, 0);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, 1); // VERSION_1
        self.w32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.w32(reg::QUEUE_SEL, 0);
        self.w32(reg::QUEUE_NUM, size);
        let (desc, avail, used) = match *placement {
            Placement::Good(base) => {
                let size = u16::try_from(size).unwrap_or(0);
                let fits = size.is_power_of_two()
                    && size <= 256
                    && self
                        .mem
                        .check_range(GuestAddress(base), Rings::len(size) as usize);
                if fits {
                    // A driver hands the device zeroed rings.
                    let _ = Rings::new(&self.mem, base, size);
                    self.rings = Some((base, size));
                } else {
                    self.rings = None;
                }
                layout(base, size.max(1))
            }
            Placement::Hostile { desc, avail, used } => {
                self.rings = None;
                (desc, avail, used)
            }
        };
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            self.w32(low, addr as u32);
            self.w32(low + 4, (addr >> 32) as u32);
        }
        self.w32(reg::QUEUE_READY, 1);
        self.w32(reg::STATUS, ALL_OK);
    }

    /// Offer one good flush in the recorded rings and notify queue 0. Returns the avail index it used.
    fn offer_flush(&mut self) -> Option<(u64, u16, u16)> {
        let (base, size) = self.rings?;
        let (desc, avail, used) = layout(base, size);
        let m = &self.mem;
        let idx: u16 = m.read_obj(GuestAddress(avail + 2)).ok()?;
        let resp = RESP + 4 * u64::from(idx % 64);
        m.write_obj(0u32, GuestAddress(REQ)).ok()?;
        m.write_obj(u32::MAX, GuestAddress(resp)).ok()?;
        let raw =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let head = if size >= 2 {
            let d0 = (2 * idx) % size;
            let d1 = (d0 + 1) % size;
            m.write_obj(
                raw(REQ, 4, NEXT, d1),
                GuestAddress(desc + 16 * u64::from(d0)),
            )
            .ok()?;
            m.write_obj(
                raw(resp, 4, WRITE, 0),
                GuestAddress(desc + 16 * u64::from(d1)),
            )
            .ok()?;
            d0
        } else {
            m.write_obj(raw(REQ, 4, NEXT, 1), GuestAddress(OFFER_INDIRECT))
                .ok()?;
            m.write_obj(raw(resp, 4, WRITE, 0), GuestAddress(OFFER_INDIRECT + 16))
                .ok()?;
            m.write_obj(raw(OFFER_INDIRECT, 32, INDIRECT, 0), GuestAddress(desc))
                .ok()?;
            0
        };
        m.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % size)))
            .ok()?;
        m.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .ok()?;
        self.at_reset = None;
        self.w32(reg::QUEUE_NOTIFY, 0);
        Some((used, idx, size))
    }

    fn check(&mut self) {
        let mut t = lock(&self.transport);
        assert_eq!(rd(&mut t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), MMIO_VERSION);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), VIRTIO_ID_PMEM);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        if t.is_activated() {
            assert_eq!(
                t.status() & ALL_OK,
                ALL_OK,
                "active with status {:#x}",
                t.status()
            );
        }
        drop(t);
        let log = self.log.lock().unwrap();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Read { offset, width } => {
                let before = registers_without_irq(&mut lock(&self.transport));
                let mut buf = [0u8; 8];
                lock(&self.transport).read(offset, &mut buf[..width]);
                let after = registers_without_irq(&mut lock(&self.transport));
                assert_eq!(
                    before, after,
                    "a {width}-byte read at {offset:#x} changed state"
                );
            }
            Op::Write {
                offset,
                width,
                value,
            } => self.write(offset, &value.to_le_bytes()[..width]),
            Op::Reg { offset, value } => self.w32(offset, value),
            Op::Status(v) => self.w32(reg::STATUS, v),
            Op::Bringup {
                ref placement,
                size,
            } => self.bringup(placement, size),
            Op::OfferFlush => {
                self.offer_flush();
            }
            Op::Notify(q) => self.w32(reg::QUEUE_NOTIFY, q),
            Op::Pump => self.pump(),
            Op::Hold => self.flush.hold(),
            Op::Release => self.flush.release(),
            Op::FlushThenReset => {
                self.w32(reg::STATUS, 0);
                self.bringup(&Placement::Good(0x1000), 16);
                self.flush.hold();
                let idle = self.flush.started() == self.flush.finished();
                let started = self.flush.started();
                self.offer_flush();
                self.pump();
                if idle {
                    // Wait until the worker is inside the held flush (if it is busy with an older one, the
                    // new request is queued behind it: in flight all the same).
                    let inside =
                        eventually(Duration::from_secs(10), || self.flush.started() > started);
                    assert!(inside, "a good flush never reached the backend");
                }
                self.w32(reg::STATUS, 0);
            }
        }
    }

    /// End of case: reset, bring up on fresh rings, one flush, answered OK. Also checks that nothing in
    /// flight at the case's last reset wrote guest memory (the fresh rings and buffers excepted).
    fn finish(mut self) {
        let quiet = self.at_reset.take();
        self.flush.release();
        self.w32(reg::STATUS, 0);
        self.at_reset = None;
        let size = 16u16;
        let mem = self.mem.clone();
        let rings = Rings::new(&mem, FINAL_RINGS, size);
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, 1);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, 0);
        self.w32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.w32(reg::QUEUE_SEL, 0);
        self.w32(reg::QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, rings.desc_addr),
            (reg::QUEUE_DRIVER_LOW, rings.avail_addr),
            (reg::QUEUE_DEVICE_LOW, rings.used_addr),
        ] {
            self.w32(low, addr as u32);
            self.w32(low + 4, (addr >> 32) as u32);
        }
        self.w32(reg::QUEUE_READY, 1);
        self.w32(reg::STATUS, ALL_OK);
        assert_eq!(lock(&self.transport).status(), ALL_OK);
        assert!(lock(&self.transport).is_activated());

        self.mem.write_obj(0u32, GuestAddress(FINAL_REQ)).unwrap();
        self.mem
            .write_obj(u32::MAX, GuestAddress(FINAL_RESP))
            .unwrap();
        let raw =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        rings.desc.store(0, raw(FINAL_REQ, 4, NEXT, 1)).unwrap();
        rings.desc.store(1, raw(FINAL_RESP, 4, WRITE, 0)).unwrap();
        rings.avail.ring().ref_at(0).unwrap().store(0);
        rings.avail.idx().store(1);
        self.w32(reg::QUEUE_NOTIFY, 0);
        self.pump();
        let answered = eventually(Duration::from_secs(10), || rings.used.idx().load() != 0);
        assert!(
            answered,
            "flush after a proper reset and bring-up not answered"
        );
        assert_eq!(
            rings.used.idx().load(),
            1,
            "more answers than requests on the fresh queue (a stale answer from before the reset?)"
        );
        let elem = rings.used.ring().ref_at(0).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (0, 4));
        let ret: u32 = self.mem.read_obj(GuestAddress(FINAL_RESP)).unwrap();
        assert_eq!(u32::from_le(ret), VIRTIO_PMEM_RESP_TYPE_OK);
        self.check();

        if let Some(before) = quiet {
            // The final flush was served by the single worker after any older completion had finished, so
            // every late write from before would be visible by now.
            let fresh = [
                (FINAL_RINGS, FINAL_RINGS + Rings::len(size)),
                (FINAL_REQ, FINAL_RESP + 4),
            ];
            for addr in changed_bytes(&self.mem, &before) {
                assert!(
                    fresh.iter().any(|&(s, e)| (s..e).contains(&addr)),
                    "guest byte {addr:#x} written after the device was reset"
                );
            }
        }
    }
}

fn registers_without_irq(t: &mut MmioTransport) -> Vec<u32> {
    let mut r = registers(t);
    // The flush worker raises interrupts on its own schedule.
    r[(reg::INTERRUPT_STATUS / 4) as usize] = 0;
    r
}

fn run(ops: Vec<Op>) {
    within(WATCHDOG, "mmio op sequence", move || {
        let mut g = Guest::new();
        for op in &ops {
            g.apply(op);
            g.check();
        }
        g.finish();
    });
}

proptest! {
    #![proptest_config(super::hostile_guest::proptest_config())]

    #[test]
    fn hostile_driver_never_breaks_the_transport(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}
