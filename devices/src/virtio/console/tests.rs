//! The console device driven the way a guest driver drives it: real queues in guest memory, the multiport
//! handshake, bytes both ways, and a guest that misbehaves.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::control::{event, Control};
use super::*;
use crate::virtio::{GuestMemory, IrqfdInterrupt, VirtioDevice, VirtioInterrupt};

const QSIZE: u16 = 16;
const BUF: u64 = 0x8_0000;

/// What a backend saw, in order.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Seen {
    Open(bool),
    Bytes(Vec<u8>),
}

struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl PortBackend for Recorder {
    fn guest_wrote(&mut self, data: &[u8]) {
        self.0.lock().unwrap().push(Seen::Bytes(data.to_vec()));
    }
    fn guest_open(&mut self, open: bool) {
        self.0.lock().unwrap().push(Seen::Open(open));
    }
}

struct Guest<'a> {
    mem: &'a GuestMemory,
    queues: Vec<MockSplitQueue<'a, GuestMemory>>,
    next_desc: Vec<u16>,
    consumed: Vec<u16>,
    next_buf: u64,
    dev: Console,
    seen: Vec<Arc<Mutex<Vec<Seen>>>>,
    irq: Arc<IrqfdInterrupt>,
}

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

/// A device with the console on port 0 and the agent port on 1, activated with or without multiport.
fn guest(mem: &GuestMemory, multiport: bool) -> Guest<'_> {
    let seen: Vec<_> = (0..2).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let mut dev = Console::new(
        "con0",
        vec![
            PortSpec {
                name: None,
                console: true,
                backend: Box::new(Recorder(seen[0].clone())),
            },
            PortSpec {
                name: Some("org.daxvisor.agent.0".into()),
                console: false,
                backend: Box::new(Recorder(seen[1].clone())),
            },
        ],
    )
    .unwrap();
    assert_eq!(dev.queue_max_sizes().len(), 6);
    assert_eq!(dev.device_features(), 1 << VIRTIO_CONSOLE_F_MULTIPORT);
    dev.ack_features(if multiport { dev.device_features() } else { 0 });
    let queues: Vec<_> = (0..6)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 + i * 0x2000), QSIZE))
        .collect();
    let irq = Arc::new(IrqfdInterrupt::new().unwrap());
    dev.activate(
        mem.clone(),
        irq.clone(),
        queues.iter().map(|q| q.create_queue().unwrap()).collect(),
    )
    .unwrap();
    Guest {
        mem,
        queues,
        next_desc: vec![0; 6],
        consumed: vec![0; 6],
        next_buf: BUF,
        dev,
        seen,
        irq,
    }
}

impl Guest<'_> {
    /// Posts one buffer on queue `q` (device-writable for receive queues) and returns its address.
    fn post(&mut self, q: usize, bytes: &[u8], len: u32, writable: bool) -> u64 {
        let addr = self.next_buf;
        self.next_buf += 0x1_0000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
        self.queues[q]
            .add_desc_chains(&[d], self.next_desc[q] % QSIZE)
            .unwrap();
        self.next_desc[q] += 1;
        addr
    }

    fn send(&mut self, q: usize, bytes: &[u8]) {
        self.post(q, bytes, bytes.len() as u32, false);
        self.dev.process_queue(q).unwrap();
    }

    fn control(&mut self, id: u32, ev: u16, value: u16) {
        let c = Control {
            id,
            event: ev,
            value,
        };
        self.send(3, &c.to_bytes());
    }

    /// Posts `n` receive buffers of `len` bytes on queue `q`; returns their addresses.
    fn post_rx(&mut self, q: usize, n: usize, len: u32) -> Vec<u64> {
        (0..n).map(|_| self.post(q, &[], len, true)).collect()
    }

    /// The used entries of queue `q` not read yet: (descriptor id, length).
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

    fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// The control messages the device delivered into `bufs` (per the used ring of queue 2).
    fn controls(&mut self, bufs: &[u64]) -> Vec<(Control, Vec<u8>)> {
        self.used(2)
            .into_iter()
            .map(|(id, len)| {
                let b = self.read(bufs[id as usize], len);
                (Control::parse(&b).unwrap(), b[8..].to_vec())
            })
            .collect()
    }

    fn seen(&self, port: usize) -> Vec<Seen> {
        self.seen[port].lock().unwrap().clone()
    }

    /// The multiport handshake as Linux does it, ending with the guest opening the agent port.
    fn handshake(&mut self) -> Vec<(Control, Vec<u8>)> {
        let bufs = self.post_rx(2, 8, 64);
        self.dev.process_queue(2).unwrap();
        self.control(0, event::DEVICE_READY, 1);
        self.control(0, event::PORT_READY, 1);
        self.control(1, event::PORT_READY, 1);
        self.control(1, event::PORT_OPEN, 1);
        self.controls(&bufs)
    }
}

fn c(id: u32, event: u16, value: u16) -> Control {
    Control { id, event, value }
}

#[test]
fn multiport_handshake_names_the_agent_port_and_marks_the_console() {
    let m = mem();
    let mut g = guest(&m, true);
    let msgs = g.handshake();
    assert_eq!(
        msgs,
        vec![
            (c(0, event::PORT_ADD, 1), vec![]),
            (c(1, event::PORT_ADD, 1), vec![]),
            (c(0, event::CONSOLE_PORT, 1), vec![]),
            (c(0, event::PORT_OPEN, 1), vec![]),
            (c(1, event::PORT_NAME, 1), b"org.daxvisor.agent.0".to_vec()),
            (c(1, event::PORT_OPEN, 1), vec![]),
        ]
    );
    assert_eq!(g.seen(1), vec![Seen::Open(true)]);
    assert_eq!(
        g.seen(0),
        vec![],
        "the guest has not opened the console yet"
    );
    assert_eq!(g.irq.status() & 1, 1);
}

#[test]
fn bytes_flow_both_ways_on_an_open_port() {
    let m = mem();
    let mut g = guest(&m, true);
    g.handshake();
    g.send(5, b"hello host");
    assert_eq!(
        g.seen(1),
        vec![Seen::Open(true), Seen::Bytes(b"hello host".to_vec())]
    );
    assert_eq!(g.used(5), vec![(0, 0)]);

    let tx = g.dev.sender(1).unwrap();
    assert!(tx.is_open());
    // Two messages, received through buffers smaller than them: a byte stream, in order.
    assert!(tx.send(b"first message;"));
    assert!(tx.send(b"second"));
    let bufs = g.post_rx(4, 4, 8);
    g.dev.process_queue(4).unwrap();
    let used = g.used(4);
    let mut got = Vec::new();
    for (id, len) in &used {
        got.extend(g.read(bufs[*id as usize], *len));
    }
    assert_eq!(got, b"first message;second");
    assert_eq!(tx.queued(), 0);
    let s = g.dev.metrics().snapshot();
    assert_eq!((s.tx_bytes, s.rx_bytes), (10, 20));
}

#[test]
fn host_messages_wait_for_buffers_and_arrive_on_the_wake_event() {
    let m = mem();
    let mut g = guest(&m, true);
    g.handshake();
    let tx = g.dev.sender(1).unwrap();
    let bufs = g.post_rx(4, 1, 64);
    g.dev.process_queue(4).unwrap();
    assert_eq!(g.used(4), vec![], "nothing to deliver yet");
    // From another thread, as the agent service sends.
    std::thread::spawn(move || assert!(tx.send(b"notice")))
        .join()
        .unwrap();
    // What the event loop does when the wake eventfd fires.
    g.dev.fill_all().unwrap();
    let used = g.used(4);
    assert_eq!(used, vec![(0, 6)]);
    assert_eq!(g.read(bufs[0], 6), b"notice");
}

#[test]
fn a_guest_that_never_drains_loses_messages_not_host_memory() {
    let m = mem();
    let mut g = guest(&m, true);
    g.handshake();
    let tx = g.dev.sender(1).unwrap();
    let msg = [0x5au8; 1000];
    let mut sent = 0usize;
    for _ in 0..1000 {
        if tx.send(&msg) {
            sent += 1;
        }
    }
    assert_eq!(sent, PORT_RX_LIMIT / 1000);
    assert!(tx.queued() <= PORT_RX_LIMIT);
    let s = g.dev.metrics().snapshot();
    assert_eq!(s.rx_dropped_messages, (1000 - sent) as u64);
    assert_eq!(s.rx_dropped_bytes, ((1000 - sent) * 1000) as u64);
}

#[test]
fn closing_the_port_or_resetting_the_device_ends_the_session() {
    let m = mem();
    let mut g = guest(&m, true);
    g.handshake();
    let tx = g.dev.sender(1).unwrap();
    assert!(tx.send(b"pending"));
    g.control(1, event::PORT_OPEN, 0);
    assert!(!tx.is_open());
    assert_eq!(
        tx.queued(),
        0,
        "what was queued for a closed session is dropped"
    );
    assert!(
        !tx.send(b"late"),
        "nothing is queued while the guest has it closed"
    );
    g.send(5, b"written while closed");
    assert_eq!(tx.session(), 1);
    g.control(1, event::PORT_OPEN, 1);
    assert_eq!(tx.session(), 2);
    assert!(!tx.send_in_session(1, b"answer for the old session"));
    assert!(tx.send_in_session(2, b"answer for this one"));
    assert_eq!(tx.queued(), 19);
    g.dev.reset();
    assert_eq!(
        g.seen(1),
        vec![
            Seen::Open(true),
            Seen::Open(false),
            Seen::Open(true),
            Seen::Open(false)
        ],
        "bytes written while the port was closed are not handed on"
    );
}

#[test]
fn bad_control_messages_are_counted_and_change_nothing() {
    let m = mem();
    let mut g = guest(&m, true);
    let bufs = g.post_rx(2, 4, 64);
    g.control(7, event::PORT_OPEN, 1); // no such port
    g.control(0, event::PORT_ADD, 1); // a device event sent by the driver
    g.send(3, &[1, 2, 3]); // short
    g.control(1, event::PORT_READY, 0); // the guest failed to set up the port
    assert_eq!(g.dev.metrics().snapshot().bad_control, 3);
    assert_eq!(g.controls(&bufs), vec![]);
    assert_eq!(g.seen(1), vec![]);
    // An overlong transmit buffer is cut at MAX_TX_CHAIN on a data port.
    g.control(1, event::PORT_OPEN, 1);
    let big = vec![7u8; MAX_TX_CHAIN + 100];
    g.send(5, &big);
    let s = g.dev.metrics().snapshot();
    assert_eq!(
        (s.tx_bytes, s.tx_truncated_bytes),
        (MAX_TX_CHAIN as u64, 100)
    );
}

#[test]
fn without_multiport_port_zero_is_a_plain_console_open_from_the_start() {
    let m = mem();
    let mut g = guest(&m, false);
    assert_eq!(g.seen(0), vec![Seen::Open(true)]);
    g.send(1, b"boot log");
    assert_eq!(g.seen(0)[1], Seen::Bytes(b"boot log".to_vec()));
    assert!(
        g.dev.process_queue(3).is_err(),
        "no control queue without multiport"
    );
    let tx = g.dev.sender(0).unwrap();
    assert!(tx.send(b"k"));
    let bufs = g.post_rx(0, 1, 16);
    g.dev.process_queue(0).unwrap();
    assert_eq!(g.used(0), vec![(0, 1)]);
    assert_eq!(g.read(bufs[0], 1), b"k");
}

#[test]
fn a_corrupt_available_index_is_a_queue_error() {
    let m = mem();
    let mut g = guest(&m, true);
    g.queues[5].avail().idx().store(100);
    assert!(g.dev.process_queue(5).is_err());
    assert!(g.dev.process_queue(9).is_err(), "no such queue");
}
