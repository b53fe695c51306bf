//! The pmem modes: find every virtio-pmem device, initialise it, check its window is mapped, and run the mode on
//! each in turn (pmem0, pmem1, ... in BootInfo order).

use daxvisor_proto::boot::BootInfo;

use super::probe::Found;
use crate::bootinfo::is_mapped;
use crate::cmdline::{Options, PmemMode};
use crate::exit::code;
use crate::say;
use crate::tsc::{relax, Deadline, CYCLES_PER_SECOND_MIN};
use crate::virtio::mmio::DEVICE_ID_PMEM;
use crate::virtio::pci::{self, PciRegs};
use crate::virtio::pmem::{FlushResult, PmemDevice};
use crate::virtio::queue::Queue;

/// Run `mode` on every pmem device. Returns 0 on success or a failure code. `WriteFlushSpin` and `FlushFlood`
/// (which floods the first device only) never return.
pub fn run(mode: PmemMode, opts: &Options, info: &BootInfo, devices: &[Found]) -> u32 {
    let mut count = 0;
    for dev in devices {
        let is_pmem = dev.probed.is_some_and(|p| p.device_id == DEVICE_ID_PMEM);
        if !is_pmem {
            continue;
        }
        let n = count;
        count += 1;
        let Some(queue) = Queue::take(n).filter(|_| n < crate::virtio::queue::PMEM_QUEUES) else {
            say!(
                "pmem{n}: not driven, the guest drives at most {} pmem devices",
                crate::virtio::queue::PMEM_QUEUES
            );
            continue;
        };
        // SAFETY: the probe found this device.
        let mmio = unsafe { dev.registers() };
        let mut pmem = PmemDevice::new(mmio, queue);
        if let Err(e) = pmem.init() {
            say!("FAIL pmem{n}: init: {e}");
            return code::PMEM_INIT;
        }
        say!(
            "pmem{n} at {} {}: start={:#x} size={:#x} queue={}",
            dev.transport(),
            dev.slot,
            pmem.start,
            pmem.size,
            pmem.queue.size()
        );
        if pmem.size == 0
            || !pmem.start.is_multiple_of(8)
            || !is_mapped(info.mem_ranges(), pmem.start, pmem.size)
        {
            say!(
                "FAIL pmem{n}: window start={:#x} size={:#x} is not a mapped memory range",
                pmem.start,
                pmem.size
            );
            return code::PMEM_NOT_MAPPED;
        }
        let rc = match mode {
            PmemMode::Write => super::write::write_flush_verify(n, &mut pmem, opts),
            PmemMode::WriteFlushSpin => super::write::write_flush(n, &mut pmem, opts),
            PmemMode::WriteLoop => super::write::write_loop(n, &mut pmem, opts),
            PmemMode::ReadonlyWrite => super::readonly::run(n, &mut pmem, opts),
            PmemMode::Malformed => super::malformed::run(n, &mut pmem),
            PmemMode::Bench => super::bench::run(n, &mut pmem, opts),
            PmemMode::FlushFlood => super::flood::run(n, &mut pmem),
        };
        if rc != 0 {
            return rc;
        }
        if let Some(regs) = pmem.mmio.pci() {
            if let Err(rc) = msix_delivery(n, &mut pmem, &regs) {
                return rc;
            }
        }
    }
    if count == 0 {
        say!("FAIL pmem={}: no virtio-pmem device", mode.name());
        return code::NO_PMEM;
    }
    if mode == PmemMode::WriteFlushSpin {
        say!("spinning until killed");
        loop {
            core::hint::spin_loop();
        }
    }
    0
}

/// Vector an MSI-X check moves the queue's entry to while it is masked (unused by the enumeration).
const MASKED_CHECK_VECTOR: u8 = 0xe0;

/// Over virtio-pci: the queue's MSI-X vector reaches the local APIC, and a masked entry holds its interrupt as
/// pending until it is unmasked. Prints `pmem{n} msix vector 0x.. delivered`, `pmem{n} msix masked: pending
/// bit set, not delivered` and `pmem{n} msix unmasked: delivered, pending bit clear`.
fn msix_delivery(n: usize, pmem: &mut PmemDevice, regs: &PciRegs) -> Result<(), u32> {
    let wait_irr = |vector: u8| {
        let deadline = Deadline::after(10 * CYCLES_PER_SECOND_MIN);
        while !pci::lapic_irr_has(vector) {
            if deadline.passed() {
                return false;
            }
            relax();
        }
        true
    };
    pmem.queue.want_interrupts(true);
    flush_or_fail(n, pmem)?;
    if !wait_irr(regs.first_vector) {
        say!(
            "FAIL pmem{n} msix vector {:#x} not delivered",
            regs.first_vector
        );
        return Err(code::MSIX);
    }
    say!("pmem{n} msix vector {:#x} delivered", regs.first_vector);
    // Entry 0 masked and moved to a fresh vector: the flush's interrupt must wait in the PBA.
    pci::msix_mask(regs, 0, true);
    pci::msix_set_vector(regs, 0, MASKED_CHECK_VECTOR);
    flush_or_fail(n, pmem)?;
    let deadline = Deadline::after(10 * CYCLES_PER_SECOND_MIN);
    while !pci::msix_pending(regs, 0) {
        if deadline.passed() {
            say!("FAIL pmem{n} msix masked: pending bit never set");
            return Err(code::MSIX);
        }
        relax();
    }
    if pci::lapic_irr_has(MASKED_CHECK_VECTOR) {
        say!("FAIL pmem{n} msix masked: delivered anyway");
        return Err(code::MSIX);
    }
    say!("pmem{n} msix masked: pending bit set, not delivered");
    pci::msix_mask(regs, 0, false);
    if !wait_irr(MASKED_CHECK_VECTOR) || pci::msix_pending(regs, 0) {
        say!("FAIL pmem{n} msix unmasked: pending interrupt not delivered");
        return Err(code::MSIX);
    }
    say!("pmem{n} msix unmasked: delivered, pending bit clear");
    pci::msix_set_vector(regs, 0, regs.first_vector);
    pmem.queue.want_interrupts(false);
    Ok(())
}

/// Flush and print `pmem{n} flush ok`, or `FAIL pmem{n} flush: <why>`.
pub fn flush_or_fail(n: usize, pmem: &mut PmemDevice) -> Result<u64, u32> {
    match pmem.flush() {
        FlushResult::Ok { cycles } => {
            say!("pmem{n} flush ok");
            Ok(cycles)
        }
        other => {
            say!("FAIL pmem{n} flush: {other}");
            Err(code::FLUSH_FAILED)
        }
    }
}

/// Bytes to touch: `size=` if given, else `default` (whole region when `None`), capped to the region, rounded
/// down to 8.
pub fn byte_count(opts: &Options, region: u64, default: Option<u64>) -> u64 {
    let want = opts.size.or(default).unwrap_or(region);
    want.min(region) & !7
}
