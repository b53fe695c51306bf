//! Wire formats shared by daxvisor and the code that runs inside its guests.
//!
//! `no_std`, no allocation, little-endian fixed layouts, so the freestanding test guest, the Linux guest agent
//! and the VMM all speak exactly the same bytes.
//!
//! - [`boot`]: the boot ABI between daxvisor and the freestanding test guest (entry state, boot-info block,
//!   exit port).
//! - [`virtio_mmio`]: the virtio-mmio register layout, shared by the device model and the test guest's driver.
//! - [`agent`]: the agent protocol spoken over the virtio-console port `org.daxvisor.agent.0`.
//! - [`units`]: the size and duration syntax of every daxvisor command line, and sizes in human form.
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod agent;
pub mod boot;
pub mod units;
pub mod virtio_mmio;
