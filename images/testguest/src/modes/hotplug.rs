//! `hotplug=N`: N rounds of live capacity, driven by the host's operator API. Each round the guest polls the
//! PCI hotplug registers (I/O port 0xae00: PCIU, PCID, B0EJ) from ring 3:
//! 1. `hotplug: waiting for a device`, then, when PCIU has a slot bit, `hotplug: slot D added`;
//! 2. it enumerates that function through ECAM (`pci 00:DD.0 ...` as in the probe), initialises the
//!    virtio-pmem device (`hotplug pmemK at virtio-pci D: start=0x.. size=0x..`), writes the pattern
//!    (seed + round), flushes and reads back (`pmemK wrote ..`, `pmemK flush ok`, `pmemK readback ok`);
//! 3. `hotplug: waiting for an eject request`, then, when PCID has the slot's bit, it resets the device, writes
//!    the bit to B0EJ (the guest's acknowledgement) and prints `hotplug: slot D ejected`.
//!
//! With `hotplug-pin=1`, in the first round, before it waits for the eject request, the guest pins the whole new
//! region through the agent port (exclusive lease and pin, owner `testguest-hot`) and keeps that session open, as
//! a guest whose device DMAs there would: the removal is refused until the operator revokes the owner.
//!
//! With `hotplug-ignore=1` it never acknowledges: `hotplug: eject of slot D requested, not acknowledging`, then
//! it keeps flushing the device (which must stay usable) and prints `hotplug: slot D still served` once the
//! host gave up (PCID read again after the host's timeout: the test removes with a short timeout).

use super::probe::Found;
use crate::cmdline::Options;
use crate::exit::code;
use crate::port::{inl, outl};
use crate::say;
use crate::tsc::{relax, Deadline, CYCLES_PER_SECOND_MIN};
use crate::virtio::mmio::{Mmio, DEVICE_ID_PMEM};
use crate::virtio::pci::{self, Ecam};
use crate::virtio::pmem::PmemDevice;
use crate::virtio::queue::{Queue, PMEM_QUEUES};

const PORT: u16 = 0xae00;
const PCIU: u16 = PORT;
const PCID: u16 = PORT + 4;
const B0EJ: u16 = PORT + 8;
/// Seconds to wait for the host to add or ask to remove.
const WAIT_S: u64 = 120;

fn wait_bit(port: u16) -> Option<u32> {
    let deadline = Deadline::after(WAIT_S * CYCLES_PER_SECOND_MIN);
    loop {
        let v = inl(port);
        if v != 0 {
            return Some(v);
        }
        if deadline.passed() {
            return None;
        }
        relax();
    }
}

/// Run `rounds` rounds. `ecam` is the ECAM base; `first_n` the next pmem index; `devices` what the boot-time
/// probe found (the console, for `hotplug-pin=1`).
pub fn run(rounds: u64, opts: &Options, ecam_base: u64, first_n: usize, devices: &[Found]) -> u32 {
    // SAFETY: the VMM lists ECAM as a PciEcam range below 4 GiB, which the static page tables map.
    let ecam = unsafe { Ecam::new(ecam_base) };
    let mut next_vector = pci::MSI_VECTOR_BASE + 0x20;
    for round in 0..rounds {
        let n = first_n + round as usize;
        say!("hotplug: waiting for a device");
        let Some(up) = wait_bit(PCIU) else {
            say!("FAIL hotplug: no device added in {WAIT_S} s");
            return code::HOTPLUG;
        };
        let dev = up.trailing_zeros() as u8;
        say!("hotplug: slot {dev} added");
        let f = match pci::probe_function(&ecam, dev, &mut next_vector) {
            Ok(Some(f)) if f.regs.device_id == DEVICE_ID_PMEM => f,
            Ok(_) => {
                say!("FAIL hotplug: slot {dev} holds no virtio-pmem function");
                return code::HOTPLUG;
            }
            Err(e) => {
                say!("FAIL pci 00:{dev:02x}.0: {e}");
                return code::HOTPLUG;
            }
        };
        say!(
            "pci 00:{dev:02x}.0 bar0={:#x} size={:#x} msix={}",
            f.bar0,
            f.bar0_size,
            f.msix_vectors
        );
        let Some(queue) = Queue::take(PMEM_QUEUES - 1) else {
            return code::HOTPLUG;
        };
        // SAFETY: the probe set this function up; its structures are in BAR 0.
        let mmio = unsafe { Mmio::new_pci(f.regs) };
        let mut pmem = PmemDevice::new(mmio, queue);
        if let Err(e) = pmem.init() {
            say!("FAIL pmem{n}: init: {e}");
            return code::PMEM_INIT;
        }
        say!(
            "hotplug pmem{n} at virtio-pci {dev}: start={:#x} size={:#x}",
            pmem.start,
            pmem.size
        );
        let round_opts = Options {
            seed: opts.seed.wrapping_add(round as u32),
            ..*opts
        };
        let rc = super::write::write_flush_verify(n, &mut pmem, &round_opts);
        if rc != 0 {
            return rc;
        }
        let _pin = if opts.hotplug_pin && round == 0 {
            match super::agent::pin_last_region(devices) {
                Ok(held) => Some(held),
                Err(rc) => return rc,
            }
        } else {
            None
        };
        say!("hotplug: waiting for an eject request");
        let Some(down) = wait_bit(PCID) else {
            say!("FAIL hotplug: no eject request in {WAIT_S} s");
            return code::HOTPLUG;
        };
        if down & (1 << dev) == 0 {
            say!("FAIL hotplug: eject request for {down:#x}, not slot {dev}");
            return code::HOTPLUG;
        }
        if opts.hotplug_ignore {
            say!("hotplug: eject of slot {dev} requested, not acknowledging");
            // The host times out and keeps the device: it must still answer flushes.
            let deadline = Deadline::after(3 * CYCLES_PER_SECOND_MIN);
            while !deadline.passed() {
                relax();
            }
            if let Err(rc) = super::pmem::flush_or_fail(n, &mut pmem) {
                return rc;
            }
            say!("hotplug: slot {dev} still served");
            return 0;
        }
        let _ = pmem.reset();
        outl(B0EJ, 1 << dev);
        say!("hotplug: slot {dev} ejected");
    }
    0
}
