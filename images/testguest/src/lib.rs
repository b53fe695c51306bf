//! daxvisor's freestanding test guest.
//!
//! A `no_std` ELF for the host target, linked without libc at 1 MiB (`linker.ld`), that daxvisor starts
//! directly in long mode (boot ABI: `daxvisor_proto::boot`). A few hand-written ring-0 instructions
//! (`src/boot/ring0.rs`) set up page tables with the USER bit and drop to ring 3 with IOPL = 3; everything else
//! runs in ring 3, where nested KVM runs code natively and port I/O and MMIO still exit to the VMM. The guest
//! never takes an exception: a fault is a triple fault, which daxvisor reports.
//!
//! # What it does
//! 1. Prints `daxvisor-testguest: hello`.
//! 2. Checks the BootInfo and prints it: `bootinfo ok: R memory ranges, D devices, C cpus`, one
//!    `mem base=0x.. size=0x.. ram|pmem|mmio|unknown` line per range, `cmdline "..."`.
//! 3. Parses the command line ([`cmdline`]).
//! 4. Probes every listed virtio-mmio window (magic, version 2, device id as listed, vendor):
//!    `virtio-mmio N base=0x.. irq=I: version 2 device D (name) vendor 0x..`, then `probed D virtio-mmio devices`.
//!    When the BootInfo lists a `pci-ecam` range instead (`--transport pci`), it enumerates PCI bus 0 there,
//!    sizes BAR 0, finds the virtio capabilities and programs MSI-X ([`virtio::pci`]):
//!    `pci 00:DD.0 vendor 0x1af4 device 0x10XX bar0=0x.. size=0x.. msix=N vectors from 0x..: virtio device D
//!    (name)`, then `probed D virtio-pci devices`; the modes below then run over virtio-pci.
//! 5. With `pmem=MODE`, runs the mode on every virtio-pmem device (pmem0, pmem1, ... in BootInfo order), after
//!    `pmemK at virtio-mmio N: start=0x.. size=0x.. queue=Q`:
//!    - `write`: `pmemK wrote B bytes seed S`, `pmemK flush ok`, `pmemK readback ok`.
//!    - `write-flush-spin`: `pmemK wrote B bytes seed S`, `pmemK flush ok`, `pmemK flush acknowledged`; after
//!      every device `spinning until killed`, then it spins forever (never exits).
//!    - `readonly-write`: `pmemK readonly-write: wrote B bytes seed S`, then one of
//!      `pmemK readonly-write: read back unchanged` / `... read back the pattern` /
//!      `... read back changed, M of W words match the pattern`, then `pmemK flush ok` or
//!      `pmemK flush failed: <why>` (not fatal in this mode).
//!    - `malformed`: per case (see [`modes::malformed::CASES`])
//!      `pmemK malformed <case>: <outcome>; good flush ok[ after reset]`, then `pmemK flush ok` and
//!      `pmemK malformed: 11 cases done, device still serving`.
//!    - `bench`: `pmemK flush ok`, `pmemK bench bytes=B cold_cycles=C warm_cycles=W read_cycles=R flush_cycles=F`
//!      (TSC cycles for the first and second pass of `rep stosq` over B bytes, a read pass over them, and the
//!      flush after them).
//!
//!    - `flush-flood`: `pmem0 flush ok`, then flushes pmem0 back to back forever, printing
//!      `pmem0 flood: N flushes answered` after every 100.
//!
//!    Over virtio-pci, after each device's mode: `pmemK msix vector 0x.. delivered` (the queue's vector is
//!    pending in the local APIC after a flush), `pmemK msix masked: pending bit set, not delivered` and
//!    `pmemK msix unmasked: delivered, pending bit clear`.
//!
//!    The pattern is [`pattern::word`]: the u64 at offset `off` is `0xda85_0000_0000_0000 ^ (seed << 32) ^ off`.
//!
//!    With `pci=hostile`, before the pmem modes: `pci hostile: C config writes, B BAR writes, T MSI-X table
//!    writes to N functions` ([`modes::pci_hostile`]).
//!    With `hotplug=N`, after the pmem modes: N rounds of hot add and remove ([`modes::hotplug`]).
//! 6. With `agent=MODE`, speaks the agent protocol on the virtio-console port `org.daxvisor.agent.0` (see
//!    [`modes::agent`]); it also writes one line to the console port (hvc0).
//! 7. Prints `exit N` and exits with N (`exit=N`, default 0) through the exit port.
//!
//! Every line starts with `daxvisor-testguest: `. A failure prints a line starting `daxvisor-testguest: FAIL `
//! and exits with its code:
//!
//! | code | meaning |
//! |---|---|
//! | 10 | BootInfo missing or invalid |
//! | 11 | ring 0 could not map every memory range (about 128 GiB above 4 GiB at most, below 128 TiB) |
//! | 12 | bad command line |
//! | 20 | a virtio-mmio window does not probe as listed, or a virtio-pci function does not set up |
//! | 30 | pmem mode but no virtio-pmem device |
//! | 31 | virtio-pmem initialisation failed |
//! | 32 | a flush failed or was not answered |
//! | 33 | pattern read back differs |
//! | 34 | after malformed requests the device no longer answers a good flush |
//! | 35 | the pmem window is not inside a BootInfo memory range |
//! | 36 | virtio-pci: an MSI-X vector not delivered, or delivered while masked |
//! | 37 | hotplug: no device added or no eject request in time, or the added slot is not virtio-pmem |
//! | 50 | virtio-console or agent port setup failed |
//! | 51 | the host refused an agent request or answered unexpectedly |
//! | 52 | no agent reply or break notice in time |
//! | 40 | panic in the guest |
#![cfg_attr(not(test), no_std)]

pub mod bootinfo;
pub mod cmdline;
pub mod exit;
pub mod modes;
pub mod pattern;
pub mod port;
pub mod serial;
pub mod tsc;
pub mod virtio;

use bootinfo::MapStatus;
use exit::code;

/// The whole run, in ring 3. `boot_info` is the address the VMM passed in RDI, `map_status` what ring 0
/// reported. Returns the exit status (unless a mode spins forever).
pub fn run(boot_info: u64, map_status: u64) -> u32 {
    say!("hello");
    // SAFETY: `load` only reads below 4 GiB, which the static page tables map.
    let info = match unsafe { bootinfo::load(boot_info) } {
        Ok(info) => info,
        Err(e) => {
            say!("FAIL {e}");
            return code::BAD_BOOT_INFO;
        }
    };
    say!(
        "bootinfo ok: {} memory ranges, {} devices, {} cpus",
        info.num_mem_ranges,
        info.num_devices,
        info.num_cpus
    );
    for r in info.mem_ranges() {
        say!(
            "mem base={:#x} size={:#x} {}",
            r.base,
            r.size,
            bootinfo::kind_name(r.kind)
        );
    }
    match MapStatus::from_raw(map_status) {
        MapStatus::Mapped => {}
        other => {
            say!("FAIL page tables: {other}");
            return code::MAP_FAILED;
        }
    }
    let raw_cmdline = info.cmdline();
    match core::str::from_utf8(raw_cmdline) {
        Ok(text) => say!("cmdline \"{text}\""),
        Err(_) => say!("cmdline is not UTF-8"),
    }
    let opts = match cmdline::parse(raw_cmdline) {
        Ok(o) => o,
        Err(e) => {
            say!("FAIL cmdline: {e}");
            return code::BAD_CMDLINE;
        }
    };
    let (found, n) = match modes::probe::probe_all(&info) {
        Ok(f) => f,
        Err(rc) => return rc,
    };
    if opts.pci_hostile {
        let ecam = info
            .mem_ranges()
            .iter()
            .find(|r| r.kind == daxvisor_proto::boot::MemKind::PciEcam as u32);
        match ecam {
            Some(r) => modes::pci_hostile::run(r.base, &found[..n], opts.seed),
            None => {
                say!("FAIL pci=hostile: no PCI bus (the VM runs with --transport mmio)");
                return code::BAD_CMDLINE;
            }
        }
    }
    if let Some(mode) = opts.pmem {
        let rc = modes::pmem::run(mode, &opts, &info, &found[..n]);
        if rc != 0 {
            return rc;
        }
    }
    if opts.hotplug > 0 {
        let ecam = info
            .mem_ranges()
            .iter()
            .find(|r| r.kind == daxvisor_proto::boot::MemKind::PciEcam as u32);
        let Some(ecam) = ecam else {
            say!("FAIL hotplug: no PCI bus (the VM runs with --transport mmio)");
            return code::BAD_CMDLINE;
        };
        let pmem_count = found[..n]
            .iter()
            .filter(|d| {
                d.probed
                    .is_some_and(|p| p.device_id == virtio::mmio::DEVICE_ID_PMEM)
            })
            .count();
        let rc = modes::hotplug::run(opts.hotplug, &opts, ecam.base, pmem_count, &found[..n]);
        if rc != 0 {
            return rc;
        }
    }
    if let Some(mode) = opts.agent {
        let rc = modes::agent::run(mode, &opts, &info, &found[..n]);
        if rc != 0 {
            return rc;
        }
    }
    say!("exit {}", opts.exit);
    opts.exit
}
