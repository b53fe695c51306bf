//! virtio-console (virtio 1.2, 5.3; device id 3) with `VIRTIO_CONSOLE_F_MULTIPORT`: the guest's console (port 0,
//! hvc0 in Linux) and named ports that carry host-guest protocols (the agent channel is a port named
//! `org.daxvisor.agent.0`).
//!
//! - [`device`]: the device model ([`Console`]): queues, control messages, moving bytes.
//! - [`control`]: the control message format (`struct virtio_console_control`) and its events.
//! - [`port`]: the host side of a port: [`PortBackend`] receives what the guest writes and hears when it opens or
//!   closes the port; [`PortSender`] queues bytes for the guest, bounded, from any thread.
//! - [`metrics`]: what the device counts (bytes each way, drops).
//!
//! The device knows nothing of what the ports carry: the VMM gives it a backend per port.

pub mod control;
pub mod device;
pub mod metrics;
pub mod port;

#[cfg(test)]
mod queue_proptest;
#[cfg(test)]
mod tests;

pub use device::{Console, PortSpec};
pub use metrics::{ConsoleMetrics, ConsoleMetricsSnapshot};
pub use port::{PortBackend, PortSender};

/// virtio-console device id.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Feature bit: the device has a control queue pair and more than one port.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 128;
/// Most bytes taken from one guest transmit buffer chain (Linux writes at most 32 KiB per buffer); the rest is
/// dropped and counted.
pub const MAX_TX_CHAIN: usize = 32 * 1024;
/// Bytes a port buffers for the guest before it drops messages (per port).
pub const PORT_RX_LIMIT: usize = 64 * 1024;
