//! Ending the VM: one 32-bit `out` of the status to the exit port; daxvisor exits with its low 8 bits.
//!
//! The status codes are listed in the crate documentation ([`crate`]).

use crate::port::outl;
use daxvisor_proto::boot::EXIT_PORT;

/// Failure codes. Success is 0 or the `exit=N` of the command line.
pub mod code {
    /// The BootInfo block is missing or invalid (magic, version, size, counts).
    pub const BAD_BOOT_INFO: u32 = 10;
    /// Ring 0 could not map every memory range (out of page-table pages, or a range past 128 TiB).
    pub const MAP_FAILED: u32 = 11;
    /// The command line does not parse.
    pub const BAD_CMDLINE: u32 = 12;
    /// A virtio-mmio window listed in the BootInfo does not probe as a virtio 1.x device of the listed id.
    pub const PROBE_MISMATCH: u32 = 20;
    /// A pmem mode was asked for and there is no virtio-pmem device.
    pub const NO_PMEM: u32 = 30;
    /// The virtio-pmem device could not be initialised (feature negotiation, queue setup).
    pub const PMEM_INIT: u32 = 31;
    /// A flush was answered with an error status, or not answered.
    pub const FLUSH_FAILED: u32 = 32;
    /// The pattern read back differs from the one written.
    pub const READBACK_MISMATCH: u32 = 33;
    /// After the malformed requests the device no longer answers a good flush, even after a reset.
    pub const DEVICE_STOPPED_SERVING: u32 = 34;
    /// The pmem window from the device config is not inside a BootInfo memory range (so it is not mapped).
    pub const PMEM_NOT_MAPPED: u32 = 35;
    /// Over virtio-pci: an MSI-X vector was not delivered, or a masked one was (or lost its pending bit).
    pub const MSIX: u32 = 36;
    /// hotplug: no device added or no eject request in time, or the added slot is not virtio-pmem.
    pub const HOTPLUG: u32 = 37;
    /// The virtio-console or its agent port could not be set up (no device, feature negotiation, handshake).
    pub const AGENT_INIT: u32 = 50;
    /// The host answered an agent request with an error or an unexpected reply.
    pub const AGENT_PROTOCOL: u32 = 51;
    /// No reply, or no break notice, in time.
    pub const AGENT_TIMEOUT: u32 = 52;
    /// A Rust panic in the guest (a bug in the guest).
    pub const PANIC: u32 = 40;
}

/// Stop the VM with `status`. Never returns: if the VMM does not stop the vCPU, spin.
pub fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    loop {
        core::hint::spin_loop();
    }
}
