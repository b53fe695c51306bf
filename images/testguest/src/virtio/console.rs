//! A polling virtio-console driver with `VIRTIO_CONSOLE_F_MULTIPORT` (virtio 1.x, section 5.3) over virtio-mmio:
//! the multiport handshake, the console port (0) and the port named `org.daxvisor.agent.0`.
//!
//! Queues: 0/1 port 0 receive/transmit, 2/3 control receive/transmit, 4/5 port 1 receive/transmit. Each receive
//! queue keeps [`RX_BUFS`] buffers of [`RX_BUF_LEN`] bytes posted (slices of its queue's buffer page); each
//! transmit sends one buffer at a time from its page and waits for it to be used.

use daxvisor_proto::agent::PORT_NAME;

use super::mmio::{reg, status, Mmio, F_VERSION_1_HIGH};
use super::queue::{Desc, Queue, CONSOLE_QUEUE_SLOT, DESC_F_WRITE, QUEUE_CAPACITY};
use crate::tsc::{relax, Deadline, CYCLES_PER_SECOND_MIN};

pub const DEVICE_ID_CONSOLE: u32 = 3;
/// VIRTIO_CONSOLE_F_MULTIPORT (feature bit 1).
const F_MULTIPORT: u32 = 1 << 1;
const QUEUES: usize = 6;
/// Receive buffers per receive queue.
pub const RX_BUFS: usize = 4;
/// Size of each receive buffer.
pub const RX_BUF_LEN: usize = 1024;
/// Most bytes one transmit buffer carries (the queue's buffer page).
pub const TX_MAX: usize = 4096;
/// Waiting for the device to take a transmit buffer or a register to change.
const DEVICE_TIMEOUT_CYCLES: u64 = 10 * CYCLES_PER_SECOND_MIN;

/// Control events (virtio 1.2, 5.3.6.2).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const PORT_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleError {
    ResetTimeout,
    NoMultiport {
        features: u32,
    },
    FeaturesRejected {
        status: u32,
    },
    NoQueue(usize),
    /// The device did not use a transmit buffer in time (or asked for a reset).
    TxStuck(usize),
    /// The handshake did not name and open the agent port in time.
    NoAgentPort,
}

impl core::fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ConsoleError::ResetTimeout => write!(f, "device status did not read 0 after reset"),
            ConsoleError::NoMultiport { features } => {
                write!(
                    f,
                    "VIRTIO_CONSOLE_F_MULTIPORT not offered (features {features:#x})"
                )
            }
            ConsoleError::FeaturesRejected { status } => {
                write!(f, "FEATURES_OK not accepted (status {status:#x})")
            }
            ConsoleError::NoQueue(q) => write!(f, "queue {q} has QueueNumMax 0"),
            ConsoleError::TxStuck(q) => write!(f, "queue {q}: transmit buffer not used in time"),
            ConsoleError::NoAgentPort => write!(f, "no port named {PORT_NAME} opened"),
        }
    }
}

pub struct ConsoleDevice {
    mmio: Mmio,
    queues: [Queue; QUEUES],
    /// The agent port's id, once the device named it.
    pub agent_port: Option<u32>,
    /// The port the device marked as a console, once it did.
    pub console_port: Option<u32>,
}

impl ConsoleDevice {
    /// Takes the console's queue slots. Call once.
    pub fn new(mmio: Mmio) -> Option<Self> {
        let q = |i| Queue::take(CONSOLE_QUEUE_SLOT + i);
        Some(ConsoleDevice {
            mmio,
            queues: [q(0)?, q(1)?, q(2)?, q(3)?, q(4)?, q(5)?],
            agent_port: None,
            console_port: None,
        })
    }

    fn set_status(&self, s: u32) {
        self.mmio.write(reg::STATUS, s);
    }

    pub fn status(&self) -> u32 {
        self.mmio.read(reg::STATUS)
    }

    /// Reset, negotiate VERSION_1 + MULTIPORT, set up all six queues, DRIVER_OK, post receive buffers.
    pub fn init(&mut self) -> Result<(), ConsoleError> {
        self.set_status(0);
        let deadline = Deadline::after(DEVICE_TIMEOUT_CYCLES);
        while self.status() != 0 {
            if deadline.passed() {
                return Err(ConsoleError::ResetTimeout);
            }
            relax();
        }
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.mmio.write(reg::DEVICE_FEATURES_SEL, 0);
        let features = self.mmio.read(reg::DEVICE_FEATURES);
        if features & F_MULTIPORT == 0 {
            self.set_status(status::FAILED);
            return Err(ConsoleError::NoMultiport { features });
        }
        self.mmio.write(reg::DRIVER_FEATURES_SEL, 0);
        self.mmio.write(reg::DRIVER_FEATURES, F_MULTIPORT);
        self.mmio.write(reg::DRIVER_FEATURES_SEL, 1);
        self.mmio.write(reg::DRIVER_FEATURES, F_VERSION_1_HIGH);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let s = self.status();
        if s & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(ConsoleError::FeaturesRejected { status: s });
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            self.mmio.write(reg::QUEUE_SEL, i as u32);
            let max = self.mmio.read(reg::QUEUE_NUM_MAX);
            if max == 0 {
                self.set_status(status::FAILED);
                return Err(ConsoleError::NoQueue(i));
            }
            let size = 1u32 << (31 - max.min(QUEUE_CAPACITY as u32).leading_zeros());
            q.reset(size as u16);
            self.mmio.write(reg::QUEUE_NUM, size);
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, q.desc_addr()),
                (reg::QUEUE_DRIVER_LOW, q.avail_addr()),
                (reg::QUEUE_DEVICE_LOW, q.used_addr()),
            ] {
                self.mmio.write(low, addr as u32);
                self.mmio.write(low + 4, (addr >> 32) as u32);
            }
            self.mmio.write(reg::QUEUE_READY, 1);
        }
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        for rx in [0, 2, 4] {
            let q = &mut self.queues[rx];
            for d in 0..RX_BUFS {
                q.set_desc(
                    d,
                    Desc {
                        addr: q.buf_addr(d * RX_BUF_LEN / 4),
                        len: RX_BUF_LEN as u32,
                        flags: DESC_F_WRITE,
                        next: 0,
                    },
                );
                q.push_avail(d as u16);
            }
            self.notify(rx);
        }
        Ok(())
    }

    fn notify(&self, q: usize) {
        self.mmio.write(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Sends `data` on transmit queue `q`, in buffers of at most [`TX_MAX`] bytes, each waited for.
    pub fn send(&mut self, q: usize, data: &[u8]) -> Result<(), ConsoleError> {
        for chunk in data.chunks(TX_MAX) {
            let queue = &mut self.queues[q];
            queue.buf_write_bytes(0, chunk);
            queue.set_desc(
                0,
                Desc {
                    addr: queue.buf_addr(0),
                    len: chunk.len() as u32,
                    flags: 0,
                    next: 0,
                },
            );
            queue.push_avail(0);
            self.notify(q);
            let deadline = Deadline::after(DEVICE_TIMEOUT_CYCLES);
            loop {
                if self.queues[q].poll_used().is_some() {
                    break;
                }
                if deadline.passed() || self.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(ConsoleError::TxStuck(q));
                }
                relax();
            }
        }
        Ok(())
    }

    /// Takes one filled receive buffer of queue `q`, hands its bytes to `f`, and posts it again. `false` when
    /// none was filled.
    pub fn recv(&mut self, q: usize, f: &mut dyn FnMut(&[u8])) -> bool {
        let Some(elem) = self.queues[q].poll_used() else {
            return false;
        };
        let d = (elem.id as usize) % RX_BUFS;
        let len = (elem.len as usize).min(RX_BUF_LEN);
        let mut buf = [0u8; RX_BUF_LEN];
        self.queues[q].buf_read_bytes(d * RX_BUF_LEN, &mut buf[..len]);
        f(&buf[..len]);
        self.queues[q].push_avail(d as u16);
        self.notify(q);
        true
    }

    /// Sends a control message.
    pub fn control(&mut self, id: u32, ev: u16, value: u16) -> Result<(), ConsoleError> {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&ev.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        self.send(3, &m)
    }

    /// Handles the control messages the device sent so far; `true` if there were any.
    pub fn poll_control(&mut self) -> Result<bool, ConsoleError> {
        let mut msgs = [[0u8; 64]; RX_BUFS];
        let mut lens = [0usize; RX_BUFS];
        let mut n = 0;
        while n < RX_BUFS
            && self.recv(2, &mut |b| {
                let l = b.len().min(64);
                msgs[n][..l].copy_from_slice(&b[..l]);
                lens[n] = l;
            })
        {
            n += 1;
        }
        for (m, &len) in msgs.iter().zip(&lens).take(n) {
            if len < 8 {
                continue;
            }
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let ev = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            match ev {
                event::PORT_ADD => self.control(id, event::PORT_READY, 1)?,
                event::CONSOLE_PORT => {
                    self.console_port = Some(id);
                    self.control(id, event::PORT_OPEN, 1)?;
                }
                event::PORT_NAME if &m[8..len] == PORT_NAME.as_bytes() => {
                    self.agent_port = Some(id)
                }
                event::PORT_OPEN if value == 1 && Some(id) == self.agent_port => {}
                _ => {}
            }
        }
        Ok(n > 0)
    }

    /// The multiport handshake: DEVICE_READY, then answer PORT_ADD with PORT_READY, open the console port, and
    /// wait until the agent port is named.
    pub fn handshake(&mut self) -> Result<(), ConsoleError> {
        self.control(0, event::DEVICE_READY, 1)?;
        let deadline = Deadline::after(DEVICE_TIMEOUT_CYCLES);
        while self.agent_port.is_none() || self.console_port.is_none() {
            if deadline.passed() {
                return Err(ConsoleError::NoAgentPort);
            }
            if !self.poll_control()? {
                relax();
            }
        }
        Ok(())
    }

    /// Opens (`true`) or closes the agent port: a new session on the host, or the end of it.
    pub fn open_agent(&mut self, open: bool) -> Result<(), ConsoleError> {
        let id = self.agent_port.ok_or(ConsoleError::NoAgentPort)?;
        self.control(id, event::PORT_OPEN, u16::from(open))
    }

    /// Writes to the console port (hvc0).
    pub fn write_console(&mut self, data: &[u8]) -> Result<(), ConsoleError> {
        self.send(1, data)
    }

    /// Sends bytes on the agent port.
    pub fn send_agent(&mut self, data: &[u8]) -> Result<(), ConsoleError> {
        self.send(5, data)
    }

    /// Takes one filled receive buffer of the agent port.
    pub fn recv_agent(&mut self, f: &mut dyn FnMut(&[u8])) -> bool {
        self.recv(4, f)
    }
}
