//! The virtio-mmio transport with the real virtio-console device behind it, set up as daxvisor sets it up (the
//! guest console on port 0, the agent port `org.daxvisor.agent.0` on port 1 with the VMM's own `AgentPort`
//! backend), driven as a hostile guest driver would: the multiport bring-up, buffers posted on any queue with
//! the fuzzer's bytes (control messages on the control queue, data on the ports), notifications, raw register
//! and memory writes, bytes the host sends to either port, and turns of the event loop. Nothing may panic or
//! hang, and the device never reports more used buffers than the guest made available.
//!
//! Input: a sequence of operations, each a tag byte then its arguments (see `Op`). The seeds in
//! `fuzz/seeds/virtio_console` are the multiport handshake of the device tests (`DEVICE_READY`, `PORT_READY`,
//! `PORT_OPEN` on the agent port) followed by data both ways.

#![no_main]

use std::sync::{Arc, Mutex};

use daxvisor::agent::AgentPort;
use daxvisor_devices::bus::BusDevice;
use daxvisor_devices::virtio::console::{Console, PortBackend, PortSpec};
use daxvisor_devices::virtio::mmio::lock;
use daxvisor_devices::virtio::{MmioSubscriber, MmioTransport};
use daxvisor_proto::virtio_mmio::reg;
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x10_0000;
const QUEUES: u16 = 6;
const QSIZE: u16 = 16;
/// Operations per input: bounds the time of one execution.
const MAX_OPS: usize = 256;
/// Bytes of one posted buffer, at most.
const BUF: u64 = 0x400;

fn desc_table(q: u16) -> u64 {
    0x1000 * (u64::from(q) + 1)
}
fn avail_ring(q: u16) -> u64 {
    desc_table(q) + 0x100
}
fn used_ring(q: u16) -> u64 {
    desc_table(q) + 0x200
}
fn buffer(q: u16, slot: u16) -> u64 {
    0x1_0000 + (u64::from(q) * u64::from(QSIZE) + u64::from(slot)) * BUF
}

/// The guest console's output: counted, not kept.
struct Sink;

impl PortBackend for Sink {
    fn guest_wrote(&mut self, _data: &[u8]) {}
}

/// The bytes of one input, taken front to back; an exhausted input reads as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8().unwrap_or(0), self.u8().unwrap_or(0)])
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

struct Driver {
    mem: GuestMemoryMmap,
    transport: Arc<Mutex<MmioTransport>>,
    /// The next available-ring index per queue (what the driver made available so far).
    avail: [u16; QUEUES as usize],
}

impl Driver {
    fn write_reg(&self, offset: u64, value: u32) {
        lock(&self.transport).write(offset, &value.to_le_bytes());
    }

    /// The driver's bring-up (virtio 1.2, 3.1.1), queues at fixed places; `features` low 32 bits offered back.
    fn bring_up(&mut self, features: u32) {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, 1);
        self.write_reg(reg::STATUS, 1 | 2);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, features);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        self.write_reg(reg::STATUS, 1 | 2 | 8);
        for q in 0..QUEUES {
            let _ = self
                .mem
                .write_slice(&[0u8; 0x300], GuestAddress(desc_table(q)));
            self.write_reg(reg::QUEUE_SEL, u32::from(q));
            self.write_reg(reg::QUEUE_NUM, u32::from(QSIZE));
            self.write_reg(reg::QUEUE_DESC_LOW, desc_table(q) as u32);
            self.write_reg(reg::QUEUE_DESC_HIGH, 0);
            self.write_reg(reg::QUEUE_DRIVER_LOW, avail_ring(q) as u32);
            self.write_reg(reg::QUEUE_DRIVER_HIGH, 0);
            self.write_reg(reg::QUEUE_DEVICE_LOW, used_ring(q) as u32);
            self.write_reg(reg::QUEUE_DEVICE_HIGH, 0);
            self.write_reg(reg::QUEUE_READY, 1);
        }
        self.avail = [0; QUEUES as usize];
        self.write_reg(reg::STATUS, 1 | 2 | 8 | 4);
    }

    /// Make one descriptor (or a chain of two) available on queue `q`: device-writable for receive queues
    /// (even numbers), holding `data` for transmit queues.
    fn post(&mut self, q: u16, len: u32, chain: bool, data: &[u8]) {
        let slot = self.avail[usize::from(q)] % QSIZE;
        let writable = q.is_multiple_of(2);
        let flags_write = if writable { 2u16 } else { 0 };
        let addr = buffer(q, slot);
        let _ = self.mem.write_slice(data, GuestAddress(addr));
        let mut descs = vec![(addr, len, flags_write)];
        if chain {
            // A second part in the next slot's buffer: the chain the device must walk.
            let next = (slot + 1) % QSIZE;
            descs[0].2 |= 1; // NEXT
            descs.push((buffer(q, next), len / 2, flags_write));
        }
        for (i, &(a, l, f)) in descs.iter().enumerate() {
            let idx = (slot + i as u16) % QSIZE;
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&a.to_le_bytes());
            d[8..12].copy_from_slice(&l.to_le_bytes());
            d[12..14].copy_from_slice(&f.to_le_bytes());
            d[14..16].copy_from_slice(&((idx + 1) % QSIZE).to_le_bytes());
            let _ = self
                .mem
                .write_slice(&d, GuestAddress(desc_table(q) + u64::from(idx) * 16));
        }
        let a = self.avail[usize::from(q)];
        let ring = GuestAddress(avail_ring(q) + 4 + u64::from(a % QSIZE) * 2);
        let _ = self.mem.write_obj(slot, ring);
        let a = a.wrapping_add(1);
        self.avail[usize::from(q)] = a;
        let _ = self.mem.write_obj(a, GuestAddress(avail_ring(q) + 2));
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .expect("guest memory");
    let agent = AgentPort::new();
    let console = Console::new(
        "fuzz",
        vec![
            PortSpec {
                name: None,
                console: true,
                backend: Box::new(Sink),
            },
            PortSpec {
                name: Some(daxvisor_proto::agent::PORT_NAME.into()),
                console: false,
                backend: Box::new(agent.clone()),
            },
        ],
    )
    .expect("console device");
    let senders = [
        console.sender(0).expect("port 0"),
        console.sender(1).expect("port 1"),
    ];
    agent.set_sender(senders[1].clone());
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(console)).expect("transport"),
    ));
    let mut em = EventManager::<MmioSubscriber>::new().expect("event manager");
    em.add_subscriber(MmioSubscriber::new(transport.clone()));
    let mut driver = Driver {
        mem: mem.clone(),
        transport,
        avail: [0; QUEUES as usize],
    };
    // Raw register or memory writes may move or overwrite the rings: the final check is then meaningless.
    let mut scribbled = false;

    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(tag) = input.u8() else { break };
        match tag % 8 {
            0 => {
                let features = input.u32();
                driver.bring_up(features);
            }
            1 => {
                let q = u16::from(input.u8().unwrap_or(0)) % QUEUES;
                let shape = input.u8().unwrap_or(0);
                let len = u32::from(input.u16()) % (BUF as u32 + 1);
                let n = if q.is_multiple_of(2) { 0 } else { len as usize };
                let bytes = input.bytes(n).to_vec();
                driver.post(q, len, shape & 1 == 1, &bytes);
            }
            2 => {
                let q = u32::from(input.u8().unwrap_or(0));
                driver.write_reg(reg::QUEUE_NOTIFY, q % 8);
                let _ = em.run_with_timeout(0);
            }
            3 => {
                let offset = u64::from(input.u16()) & 0x1ff;
                let width = [1usize, 2, 4, 8][usize::from(input.u8().unwrap_or(0) & 3)];
                let value = u64::from(input.u32()).to_le_bytes();
                scribbled = true;
                lock(&driver.transport).write(offset, &value[..width]);
            }
            4 => {
                let offset = u64::from(input.u16()) & 0x1ff;
                let width = [1usize, 2, 4, 8][usize::from(input.u8().unwrap_or(0) & 3)];
                let mut buf = [0u8; 8];
                lock(&driver.transport).read(offset, &mut buf[..width]);
            }
            5 => {
                let at = u64::from(input.u32()) % MEM;
                let value = input.u32().to_le_bytes();
                scribbled = true;
                let _ = mem.write_slice(&value, GuestAddress(at));
            }
            6 => {
                let port = usize::from(input.u8().unwrap_or(0) & 1);
                let n = usize::from(input.u16() % 0x800);
                let bytes = input.bytes(n).to_vec();
                let _ = senders[port].send(&bytes);
                let _ = em.run_with_timeout(0);
            }
            _ => {
                let _ = em.run_with_timeout(0);
            }
        }
    }
    let _ = em.run_with_timeout(0);
    // The used rings: never ahead of what the driver made available.
    if !scribbled {
        for q in 0..QUEUES {
            let used: u16 = mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap_or(0);
            let avail = driver.avail[usize::from(q)];
            assert!(
                avail.wrapping_sub(used) < 0x8000,
                "queue {q}: used index {used} ahead of available {avail}"
            );
        }
    }
});
