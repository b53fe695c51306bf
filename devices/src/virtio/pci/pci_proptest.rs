//! Property tests: a hostile driver on a virtio-pci function with a real virtio-pmem device behind it (real
//! fdatasync on a temporary file, real guest memory, real EventFds standing in for KVM's irqfds), reached the
//! way a guest reaches it: configuration space through ECAM and BAR 0 through the PCI memory window.
//!
//! Each case is a random sequence of configuration writes (any offset, widths 1/2/4/8, edge values: BAR sizing,
//! BARs moved or zeroed, memory decoding off, capability fields, MSI-X enable and function mask), BAR writes
//! and reads (common configuration with out-of-range selects, queue sizes and vectors, ring addresses anywhere,
//! status in any order; notifications for any queue; MSI-X table entries and the PBA), writes anywhere in the
//! window, event-loop turns and full bring-ups. Checked after every step:
//! - nothing panics or hangs (a watchdog turns a hang into a failure); the MSI-X sink is only ever asked for
//!   vectors inside the table (it panics otherwise);
//! - vendor and device id, the class code and the capability chain always read the same;
//! - the device is active only with ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK set;
//! - queue and config MSI-X vectors always read as a vector of the table or NO_VECTOR.
//!
//! And at the end of every case, a driver that restores BAR 0, resets the device and brings it up properly
//! gets a flush answered and its queue vector raised.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::transport::tests::{Driver, BAR};
use super::{
    common, lock, VirtioPciSubscriber, COMMON_CFG, MSIX_PBA, MSIX_TABLE, NOTIFY_CFG, NO_VECTOR,
};
use crate::pci::msix::tests::EventFdSink;
use crate::pci::PciDevice;
use crate::virtio::status;

const WATCHDOG: Duration = Duration::from_secs(60);
const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[derive(Clone, Debug)]
enum Op {
    CfgWrite { off: u64, width: usize, value: u64 },
    CfgRead { off: u64, width: usize },
    BarWrite { off: u64, width: usize, value: u64 },
    BarRead { off: u64, width: usize },
    WindowWrite { off: u64, width: usize, value: u64 },
    Turn,
    BringUp { rings: u64 },
}

fn width() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 4, 8])
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![0u64, 1, 2, 3, 7, 8, 0xb, 0xf, 0x40, 0x4000, 0x8000, 0xc000, 0xffff,
            0xffff_ffff, 0xffff_fff0, u64::MAX, BAR, BAR + 0x1000, 0xfee0_0000]),
        1 => any::<u64>(),
    ]
}

fn cfg_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x100,
        1 => prop::sample::select(vec![0x04u64, 0x10, 0x14, 0x18, 0x34, 0x3c]),
        1 => 0u64..0x1000,
    ]
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => COMMON_CFG..COMMON_CFG + 0x40,
        1 => Just(super::ISR_CFG),
        1 => 0x2000u64..0x2020,
        2 => NOTIFY_CFG..NOTIFY_CFG + 0x10,
        3 => MSIX_TABLE..MSIX_TABLE + 0x30,
        1 => MSIX_PBA..MSIX_PBA + 0x10,
        1 => 0u64..0x8000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (cfg_offset(), width(), value()).prop_map(|(off, width, value)| Op::CfgWrite { off, width, value }),
        2 => (cfg_offset(), width()).prop_map(|(off, width)| Op::CfgRead { off, width }),
        10 => (bar_offset(), width(), value()).prop_map(|(off, width, value)| Op::BarWrite { off, width, value }),
        2 => (bar_offset(), width()).prop_map(|(off, width)| Op::BarRead { off, width }),
        1 => (0u64..0x10_0000, width(), value()).prop_map(|(off, width, value)| Op::WindowWrite { off, width, value }),
        2 => Just(Op::Turn),
        1 => prop::sample::select(vec![0x1_0000u64, 0xf_f000, 0x10_0000, 0x1_0001, u64::MAX - 0xfff])
            .prop_map(|rings| Op::BringUp { rings }),
    ]
}

struct Guest {
    d: Driver,
    sink: Arc<EventFdSink>,
    em: EventManager<VirtioPciSubscriber>,
    header: Vec<u64>,
    caps: Vec<(u64, u8, u8)>,
}

impl Guest {
    fn new() -> Self {
        let sink = EventFdSink::new(2);
        let mut d = Driver::new(sink.clone());
        let mut em = EventManager::<VirtioPciSubscriber>::new().unwrap();
        em.add_subscriber(VirtioPciSubscriber::new(d.dev.clone()));
        let header = vec![d.cfg_read(0, 4), d.cfg_read(8, 4), d.cfg_read(0x2c, 4)];
        let caps = d.capabilities();
        Guest {
            d,
            sink,
            em,
            header,
            caps,
        }
    }

    fn apply(&mut self, op: &Op) {
        let d = &mut self.d;
        match *op {
            Op::CfgWrite { off, width, value } => d.cfg_write(off, value, width),
            Op::CfgRead { off, width } => {
                d.cfg_read(off, width);
            }
            Op::BarWrite { off, width, value } => d.bar_write(off, value, width),
            Op::BarRead { off, width } => {
                d.bar_read(off, width);
            }
            Op::WindowWrite { off, width, value } => {
                let mut b = value.to_le_bytes();
                crate::bus::BusDevice::write(&mut d.window, off, &b[..width]);
                crate::bus::BusDevice::read(&mut d.window, off, &mut b[..width]);
            }
            Op::Turn => {
                let _ = self.em.run_with_timeout(0);
            }
            Op::BringUp { rings } => {
                d.bring_up(rings);
            }
        }
    }

    fn check(&mut self) {
        let header = vec![
            self.d.cfg_read(0, 4),
            self.d.cfg_read(8, 4),
            self.d.cfg_read(0x2c, 4),
        ];
        assert_eq!(header, self.header, "identity changed");
        assert_eq!(self.d.capabilities(), self.caps, "capability chain changed");
        let t = lock(&self.d.dev);
        if t.is_activated() {
            assert_eq!(t.status() & ALL_OK, ALL_OK, "active without DRIVER_OK");
        }
        drop(t);
        // Vectors read back only through a decoding BAR; check them when BAR 0 is where the driver left it.
        if lock(&self.d.dev).config().decoded_bar(0) == Some((BAR, super::BAR_SIZE)) {
            let selected = self.d.bar_read(COMMON_CFG + common::QUEUE_SELECT, 2);
            for q in 0..3u64 {
                self.d.bar_write(COMMON_CFG + common::QUEUE_SELECT, q, 2);
                let v = self.d.bar_read(COMMON_CFG + common::QUEUE_MSIX_VECTOR, 2) as u16;
                assert!(v < 2 || v == NO_VECTOR, "queue {q} vector {v}");
            }
            let v = self.d.bar_read(COMMON_CFG + common::CONFIG_MSIX_VECTOR, 2) as u16;
            assert!(v < 2 || v == NO_VECTOR, "config vector {v}");
            self.d
                .bar_write(COMMON_CFG + common::QUEUE_SELECT, selected, 2);
        }
    }

    /// A well-behaved driver takes over: BAR 0 back in place with decoding on, reset, bring-up, one flush.
    fn finish(mut self) {
        let d = &mut self.d;
        d.cfg_write(0x10, BAR, 4);
        d.cfg_write(0x14, 0, 4);
        d.cfg_write(0x04, 0x6, 2);
        let msix = self.caps.iter().find(|c| c.1 == 0x11).map(|c| c.0).unwrap();
        d.cfg_write(msix + 2, 0, 2);
        let rings = 0x4_0000;
        assert_eq!(
            d.bring_up(rings) as u32,
            ALL_OK,
            "clean bring-up after the hostile sequence"
        );
        let m = lock(&d.dev).mem_for_tests();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&b, GuestAddress(rings + i * 16)).unwrap();
        };
        desc(0, 0x5_0000, 4, 1, 1);
        desc(1, 0x5_1000, 4, 2, 0);
        m.write_obj(0u32, GuestAddress(0x5_0000)).unwrap();
        m.write_obj(0xffu32, GuestAddress(0x5_1000)).unwrap();
        m.write_obj(0u16, GuestAddress(rings + 0x1000 + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(rings + 0x1000 + 2)).unwrap();
        // Interrupts raised during the hostile part are not the ones we wait for.
        self.sink.fired(0);
        d.bar_write(NOTIFY_CFG, 0, 2);
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.read_obj::<u16>(GuestAddress(rings + 0x2000 + 2)).unwrap() == 0 {
            assert!(Instant::now() < deadline, "flush never answered");
            let _ = self.em.run_with_timeout(10);
        }
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x5_1000)).unwrap(),
            0,
            "flush OK"
        );
        while self.sink.fired(0) == 0 {
            assert!(Instant::now() < deadline, "queue vector never raised");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn run(ops: Vec<Op>) {
    crate::virtio::hostile_guest::within(WATCHDOG, "virtio-pci op sequence", move || {
        let mut g = Guest::new();
        for op in &ops {
            g.apply(op);
            g.check();
        }
        g.finish();
    });
}

proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 512,
        ..crate::virtio::hostile_guest::proptest_config()
    })]

    #[test]
    fn hostile_driver_never_breaks_the_pci_function(ops in prop::collection::vec(op(), 1..48)) {
        run(ops);
    }
}
