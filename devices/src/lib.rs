//! Device models for daxvisor.
//!
//! Devices move bytes and requests; they know nothing of leases or KVM. The VMM places them on a [`bus::Bus`]
//! (port I/O or MMIO) and dispatches vCPU exits to them.
//!
//! - [`bus`]: address-range dispatch for port I/O and MMIO exits.
//! - [`legacy`]: the 16550 serial port and the exit/reset ports that end the VM.
//! - [`pci`]: PCI configuration space, the root bus (ECAM, 0xCF8/0xCFC) and MSI-X.
//! - [`virtio`]: the virtio-mmio and virtio-pci transports and the virtio device models (pmem, console).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;
