//! The pmem modes: find every virtio-pmem device, initialise it, check its window is mapped, and run the mode on
//! each in turn (pmem0, pmem1, ... in BootInfo order).

use daxvisor_proto::boot::BootInfo;

use super::probe::Found;
use crate::bootinfo::is_mapped;
use crate::cmdline::{Options, PmemMode};
use crate::exit::code;
use crate::say;
use crate::virtio::mmio::{Mmio, DEVICE_ID_PMEM};
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
        // SAFETY: the probe found a virtio-mmio device in this mapped window.
        let mmio = unsafe { Mmio::new(dev.info.base) };
        let mut pmem = PmemDevice::new(mmio, queue);
        if let Err(e) = pmem.init() {
            say!("FAIL pmem{n}: init: {e}");
            return code::PMEM_INIT;
        }
        say!(
            "pmem{n} at virtio-mmio {}: start={:#x} size={:#x} queue={}",
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
