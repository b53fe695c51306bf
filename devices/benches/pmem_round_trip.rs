//! A guest flush's round trip through the virtio-pmem device when the host flush costs nothing (tmpfs, MAP_SYNC
//! fs-dax, device-DAX): the request answered on the queue path ([`Flush::try_now`], what the device does since
//! the peer table showed daxvisor behind QEMU on tmpfs) against the same request sent through the flush worker
//! thread (what it did before).
//!
//! Three threads as in the VMM: a "guest" that offers one flush request at a time (depth 1, as an ext4 guest's
//! journal keeps it), kicks the queue's notify EventFd and waits for the interrupt EventFd; the "event loop",
//! which blocks on the kick and runs `process_queue`; and, on the worker path, the device's flush worker. The
//! cases alternate in short rounds; it prints the median requests/s of each and their ratio.
//!
//! cargo bench -p daxvisor-devices --bench pmem_round_trip [-- SECONDS_PER_CASE_PER_ROUND] (default 0.3; env
//! ROUND_TRIP_ROUNDS, default 10)

// A benchmark program: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daxvisor_devices::virtio::pmem::{Flush, Pmem, PmemConfig};
use daxvisor_devices::virtio::{GuestMemory, IrqfdInterrupt, VirtioDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const REQ: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const QUEUE: u16 = 16;

/// A flush with nothing to write back; `inline` says whether it offers to answer on the queue path.
struct Free {
    inline: bool,
}

impl Flush for Free {
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn try_now(&self) -> Option<std::io::Result<()>> {
        self.inline.then_some(Ok(()))
    }
}

/// Requests per second at depth 1 for `secs`.
fn run(inline: bool, secs: f64) -> f64 {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    mem.write_obj(0u32, GuestAddress(REQ)).unwrap(); // VIRTIO_PMEM_REQ_TYPE_FLUSH
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let mut pmem = Pmem::new(
        "bench",
        PmemConfig {
            start: 0x1_0000_0000,
            size: 0x20_0000,
        },
        Arc::new(Free { inline }),
    )
    .unwrap();
    let irq = Arc::new(IrqfdInterrupt::new().unwrap());
    pmem.activate(mem.clone(), irq.clone(), vec![vq.create_queue().unwrap()])
        .unwrap();
    // One chain (request, status) at descriptors 0-1, offered again and again.
    vq.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(REQ, 4, 1, 1)),
            RawDescriptor::from(Descriptor::new(STATUS, 4, 2, 0)),
        ],
        0,
    )
    .unwrap();
    let kick = EventFd::new(0).unwrap();
    let stop = AtomicBool::new(false);
    let mut done = 0u64;
    let elapsed = std::thread::scope(|s| {
        s.spawn(|| {
            while kick.read().is_ok() && !stop.load(Ordering::Acquire) {
                pmem.process_queue(0).unwrap();
            }
        });
        let start = Instant::now();
        let limit = Duration::from_secs_f64(secs);
        let mut pfd = libc::pollfd {
            fd: irq.irqfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while start.elapsed() < limit {
            let n = done as u16;
            if done > 0 {
                vq.avail()
                    .ring()
                    .ref_at(usize::from(n % QUEUE))
                    .unwrap()
                    .store(0);
                vq.avail().idx().store(n.wrapping_add(1));
            }
            kick.write(1).unwrap();
            while vq.used().idx().load() != n.wrapping_add(1) {
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
                let _ = irq.irqfd().read();
            }
            done += 1;
        }
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Release);
        kick.write(1).unwrap();
        elapsed
    });
    done as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(0.3);
    let rounds: usize = std::env::var("ROUND_TRIP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (mut inline, mut worker) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate which case goes first.
        if r % 2 == 0 {
            inline.push(run(true, secs));
            worker.push(run(false, secs));
        } else {
            worker.push(run(false, secs));
            inline.push(run(true, secs));
        }
    }
    let (i, w) = (median(inline), median(worker));
    println!("pmem round trip, depth 1, a free host flush ({rounds} rounds of {secs} s per case, medians):");
    println!(
        "  queue path (try_now)   {i:>10.0} req/s  {:>7.1} us/req",
        1e6 / i
    );
    println!(
        "  flush worker           {w:>10.0} req/s  {:>7.1} us/req",
        1e6 / w
    );
    println!("  ratio queue path / worker: {:.2}", i / w);
}
