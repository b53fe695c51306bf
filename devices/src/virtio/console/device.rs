//! The virtio-console device model.
//!
//! Queue layout with `VIRTIO_CONSOLE_F_MULTIPORT` (virtio 1.2, 5.3.2): port 0 receive/transmit are queues 0/1,
//! the control receive/transmit queues are 2/3, port `p >= 1` uses `2p + 2` / `2p + 3`. Without the feature only
//! port 0 exists (queues 0/1) and it is open from activation on.
//!
//! Everything runs on the VMM's event loop. Work per call is bounded by the queue size (the transport's queue
//! iterator refuses an available index that jumps further), by [`MAX_TX_CHAIN`] bytes per transmit chain and by
//! [`PORT_RX_LIMIT`] bytes buffered per port. A malformed control message is counted and ignored; a broken
//! queue is reported to the transport (DEVICE_NEEDS_RESET).

use std::collections::VecDeque;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::{event, Control, CONTROL_LEN};
use super::metrics::ConsoleMetrics;
use super::port::{PortBackend, PortSender, Shared};
use super::{
    MAX_TX_CHAIN, PORT_RX_LIMIT, QUEUE_SIZE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_ID_CONSOLE,
};
use crate::virtio::device::{read_config_bytes, QueueError};
use crate::virtio::{ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt};

/// Control messages waiting for the guest's control receive buffers; more are dropped (counted). The device only
/// sends control messages in answer to the guest's, so a driver that works never comes near this.
const MAX_CONTROL_PENDING: usize = 64;

/// Longest control message the device reads from the guest (the fixed part; drivers send nothing after it).
const MAX_CONTROL_IN: usize = 64;

/// One port as the VMM describes it.
pub struct PortSpec {
    /// The name the guest sees (`/dev/virtio-ports/NAME` in Linux); `None` for the console.
    pub name: Option<String>,
    /// The port is a console (hvc in Linux).
    pub console: bool,
    /// Where the guest's output goes.
    pub backend: Box<dyn PortBackend>,
}

struct Port {
    name: Option<String>,
    console: bool,
    backend: Box<dyn PortBackend>,
    shared: Arc<Shared>,
    guest_open: bool,
}

/// What a queue index is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Rx(usize),
    Tx(usize),
    ControlRx,
    ControlTx,
}

fn role(index: usize) -> Role {
    match index {
        0 => Role::Rx(0),
        1 => Role::Tx(0),
        2 => Role::ControlRx,
        3 => Role::ControlTx,
        i if i % 2 == 0 => Role::Rx(i / 2 - 1),
        i => Role::Tx(i / 2 - 1),
    }
}

fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
}

impl Active {
    /// Interrupt the driver if queue `q` wants to hear about used buffers now.
    fn notify(&mut self, q: usize) {
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        if queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger_queue(q) {
                tracing::warn!("cannot signal console interrupt: {e}");
            }
        }
    }
}

/// A virtio-console device with one or more ports.
pub struct Console {
    id: String,
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    multiport: bool,
    active: Option<Active>,
    control_out: VecDeque<Vec<u8>>,
    wake: Arc<EventFd>,
    metrics: Arc<ConsoleMetrics>,
    /// A bad control message was already logged at warn level.
    warned: bool,
}

impl Console {
    /// A device with `ports` (port 0 first; more than one port offers `VIRTIO_CONSOLE_F_MULTIPORT`). `id` names
    /// it in logs.
    pub fn new(id: &str, ports: Vec<PortSpec>) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let metrics = Arc::new(ConsoleMetrics::default());
        let n = ports.len().max(1);
        let queues = if n > 1 { 2 * n + 2 } else { 2 };
        let ports = ports
            .into_iter()
            .map(|p| Port {
                name: p.name,
                console: p.console,
                backend: p.backend,
                shared: Arc::new(Shared::new(PORT_RX_LIMIT, wake.clone(), metrics.clone())),
                guest_open: false,
            })
            .collect();
        Ok(Console {
            id: id.to_owned(),
            ports,
            queue_sizes: vec![QUEUE_SIZE; queues],
            multiport: false,
            active: None,
            control_out: VecDeque::new(),
            wake,
            metrics,
            warned: false,
        })
    }

    /// The sender for port `port`'s guest-bound bytes.
    pub fn sender(&self, port: usize) -> Option<PortSender> {
        self.ports.get(port).map(|p| PortSender(p.shared.clone()))
    }

    /// Counters.
    pub fn metrics(&self) -> Arc<ConsoleMetrics> {
        self.metrics.clone()
    }

    fn set_guest_open(&mut self, port: usize, open: bool) {
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        if p.guest_open == open {
            return;
        }
        p.guest_open = open;
        p.shared.set_open(open);
        tracing::debug!(device = %self.id, port, name = p.name.as_deref().unwrap_or(""), open, "console port");
        p.backend.guest_open(open);
    }

    fn bad_control(&mut self, what: std::fmt::Arguments<'_>) {
        self.metrics.add_bad_control();
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(device = %self.id, "bad console control message: {what} (further ones at debug level)");
        } else {
            tracing::debug!(device = %self.id, "bad console control message: {what}");
        }
    }

    fn queue_control(&mut self, c: Control, extra: &[u8]) {
        if self.control_out.len() >= MAX_CONTROL_PENDING {
            self.metrics.add_rx_dropped(CONTROL_LEN + extra.len());
            return;
        }
        let mut msg = c.to_bytes().to_vec();
        msg.extend_from_slice(extra);
        self.control_out.push_back(msg);
    }

    fn handle_control(&mut self, c: Control) {
        let id = c.id as usize;
        if c.event != event::DEVICE_READY && id >= self.ports.len() {
            self.bad_control(format_args!("port {} does not exist", c.id));
            return;
        }
        match c.event {
            event::DEVICE_READY => {
                if c.value != 1 {
                    tracing::warn!(device = %self.id, "guest console driver failed to start");
                    return;
                }
                for p in 0..self.ports.len() {
                    self.queue_control(
                        Control {
                            id: p as u32,
                            event: event::PORT_ADD,
                            value: 1,
                        },
                        &[],
                    );
                }
            }
            event::PORT_READY => {
                if c.value != 1 {
                    tracing::warn!(device = %self.id, port = id, "guest failed to set up console port");
                    return;
                }
                let (console, name) = match self.ports.get(id) {
                    Some(p) => (p.console, p.name.clone()),
                    None => return,
                };
                if console {
                    self.queue_control(
                        Control {
                            id: c.id,
                            event: event::CONSOLE_PORT,
                            value: 1,
                        },
                        &[],
                    );
                }
                if let Some(name) = name {
                    self.queue_control(
                        Control {
                            id: c.id,
                            event: event::PORT_NAME,
                            value: 1,
                        },
                        name.as_bytes(),
                    );
                }
                // The host end of every port is always connected.
                self.queue_control(
                    Control {
                        id: c.id,
                        event: event::PORT_OPEN,
                        value: 1,
                    },
                    &[],
                );
            }
            event::PORT_OPEN => self.set_guest_open(id, c.value != 0),
            other => self.bad_control(format_args!("event {other} is not a driver event")),
        }
    }

    /// Copies queued control messages into the guest's control receive buffers.
    fn flush_control(&mut self) -> Result<(), QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let q = 2;
        let mut used = false;
        {
            let mem = active.mem.clone();
            let Some(queue) = active.queues.get_mut(q) else {
                return Ok(());
            };
            while !self.control_out.is_empty() {
                let Some(chain) = queue
                    .iter(&mem)
                    .map_err(|e| QueueError {
                        queue: q,
                        reason: e.to_string(),
                    })?
                    .next()
                else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0u32;
                if let Some(msg) = self.control_out.pop_front() {
                    // One message per buffer (the driver parses each buffer as one message).
                    if let Some(d) = chain.clone().writable().next() {
                        if (d.len() as usize) >= msg.len()
                            && mem.write_slice(&msg, d.addr()).is_ok()
                        {
                            written = msg.len() as u32;
                        }
                    }
                    if written == 0 {
                        self.metrics.add_rx_dropped(msg.len());
                    }
                }
                queue
                    .add_used(&mem, head, written)
                    .map_err(|e| QueueError {
                        queue: q,
                        reason: format!("head {head}: {e}"),
                    })?;
                used = true;
            }
        }
        if used {
            active.notify(q);
        }
        Ok(())
    }

    /// Reads the guest's control messages.
    fn drain_control(&mut self) -> Result<(), QueueError> {
        let msgs = match self.take_tx_chains(3, MAX_CONTROL_IN)? {
            Some(m) => m,
            None => return Ok(()),
        };
        for (bytes, _) in msgs {
            match Control::parse(&bytes) {
                Some(c) => self.handle_control(c),
                None => self.bad_control(format_args!(
                    "{} bytes, expected {CONTROL_LEN}",
                    bytes.len()
                )),
            }
        }
        self.flush_control()
    }

    /// Takes every available chain of transmit queue `q`, returns each chain's readable bytes (at most `limit`)
    /// and how many bytes past the limit it had; every chain is returned to the guest used (length 0).
    #[allow(clippy::type_complexity)]
    fn take_tx_chains(
        &mut self,
        q: usize,
        limit: usize,
    ) -> Result<Option<Vec<(Vec<u8>, usize)>>, QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(None);
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(q) else {
            return Ok(None);
        };
        let qerr = |reason: String| QueueError { queue: q, reason };
        let chains: Vec<_> = queue.iter(&mem).map_err(|e| qerr(e.to_string()))?.collect();
        let mut out = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            let mut over = 0usize;
            for d in chain.readable() {
                let len = d.len() as usize;
                let room = limit - bytes.len();
                let take = len.min(room);
                over = over.saturating_add(len - take);
                if take == 0 {
                    continue;
                }
                let start = bytes.len();
                bytes.resize(start + take, 0);
                if mem.read_slice(&mut bytes[start..], d.addr()).is_err() {
                    // A buffer outside guest memory: what it would have held is lost.
                    bytes.truncate(start);
                    over = over.saturating_add(take);
                }
            }
            queue
                .add_used(&mem, head, 0)
                .map_err(|e| qerr(format!("head {head}: {e}")))?;
            out.push((bytes, over));
        }
        if !out.is_empty() {
            active.notify(q);
        }
        Ok(Some(out))
    }

    fn drain_port(&mut self, port: usize, q: usize) -> Result<(), QueueError> {
        let Some(chains) = self.take_tx_chains(q, MAX_TX_CHAIN)? else {
            return Ok(());
        };
        let Some(p) = self.ports.get_mut(port) else {
            return Ok(());
        };
        for (bytes, over) in chains {
            if over > 0 {
                self.metrics.add_tx_truncated(over);
            }
            if bytes.is_empty() {
                continue;
            }
            self.metrics.add_tx(bytes.len());
            if p.guest_open || !self.multiport {
                p.backend.guest_wrote(&bytes);
            }
        }
        Ok(())
    }

    /// Copies what the host queued for `port` into the guest's receive buffers, as far as they go.
    fn fill_port(&mut self, port: usize) -> Result<(), QueueError> {
        let q = rx_queue(port);
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(p) = self.ports.get(port) else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(q) else {
            return Ok(());
        };
        let qerr = |reason: String| QueueError { queue: q, reason };
        let mut used = false;
        {
            let mut inbox = p.shared.lock();
            while !inbox.bytes.is_empty() {
                let Some(chain) = queue.iter(&mem).map_err(|e| qerr(e.to_string()))?.next() else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0usize;
                for d in chain.writable() {
                    if inbox.bytes.is_empty() {
                        break;
                    }
                    let n = (d.len() as usize).min(inbox.bytes.len());
                    let chunk: Vec<u8> = inbox.bytes.iter().take(n).copied().collect();
                    if mem.write_slice(&chunk, d.addr()).is_err() {
                        break;
                    }
                    inbox.bytes.drain(..n);
                    written += n;
                }
                queue
                    .add_used(&mem, head, written as u32)
                    .map_err(|e| qerr(format!("head {head}: {e}")))?;
                self.metrics.add_rx(written);
                used = true;
            }
        }
        if used {
            active.notify(q);
        }
        Ok(())
    }

    pub(super) fn fill_all(&mut self) -> Result<(), QueueError> {
        let n = if self.multiport { self.ports.len() } else { 1 };
        for port in 0..n {
            self.fill_port(port)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        if self.ports.len() > 1 {
            1 << VIRTIO_CONSOLE_F_MULTIPORT
        } else {
            0
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.multiport = features & (1 << VIRTIO_CONSOLE_F_MULTIPORT) != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Only emerg_wr is writable, and VIRTIO_CONSOLE_F_EMERG_WRITE is not offered.
        tracing::debug!(device = %self.id, "guest write to console config ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        let needed = if self.multiport { queues.len() } else { 2 };
        if let Some(i) = queues.iter().take(needed).position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        if !self.multiport {
            self.set_guest_open(0, true);
        }
        tracing::debug!(device = %self.id, multiport = self.multiport, "virtio-console activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        if index >= self.queue_sizes.len() || (!self.multiport && index > 1) {
            return Err(QueueError {
                queue: index,
                reason: "no such console queue".into(),
            });
        }
        match role(index) {
            Role::Rx(p) => self.fill_port(p),
            Role::Tx(p) => self.drain_port(p, index),
            Role::ControlRx => self.flush_control(),
            Role::ControlTx => self.drain_control(),
        }
    }

    fn reset(&mut self) {
        for p in 0..self.ports.len() {
            self.set_guest_open(p, false);
        }
        self.active = None;
        self.multiport = false;
        self.control_out.clear();
    }

    fn init_host_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.wake.as_ref(), EventSet::IN)) {
            tracing::error!(device = %self.id, "cannot poll console host input: {e:?}");
        }
    }

    fn process_host_event(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading clears the counter; one pass serves every message queued before it.
        let _ = self.wake.read();
        if let Err(e) = self.fill_all() {
            tracing::warn!(device = %self.id, "console receive queue broken: {e}");
        }
    }
}
