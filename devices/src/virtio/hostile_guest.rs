//! Test support for the hostile-guest property tests ([`super::mmio_proptest`],
//! [`super::pmem::queue_proptest`]): a guest memory shaped to catch bounds mistakes, byte-exact snapshots of it,
//! a flush backend on a real file that a test can hold mid-flush, and a watchdog that turns a hang into a
//! failure.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::pmem::Flush;
use super::GuestMemory;

/// Guest RAM: two adjacent regions (buffers may straddle from one into the other, which is legal), a hole,
/// a small region after it, and a region that ends 4 KiB below 2^64 so address arithmetic near the top is
/// exercised on real memory.
pub const R0: u64 = 0;
pub const R1: u64 = 0x1_0000;
pub const R1_END: u64 = 0x2_0000;
pub const R2: u64 = 0x4_0000;
pub const R2_END: u64 = 0x4_1000;
pub const TOP: u64 = 0xffff_ffff_ffff_e000;
pub const TOP_END: u64 = 0xffff_ffff_ffff_f000;

/// Case count and shrinking limits shared by the hostile-guest property tests.
pub fn proptest_config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: 1024,
        failure_persistence: None,
        // A failing case can wait out an answer that never comes; keep shrinking from taking minutes.
        max_shrink_time: 30_000,
        ..proptest::test_runner::Config::default()
    }
}

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(R0), (R1 - R0) as usize),
        (GuestAddress(R1), (R1_END - R1) as usize),
        (GuestAddress(R2), (R2_END - R2) as usize),
        (GuestAddress(TOP), (TOP_END - TOP) as usize),
    ])
    .expect("test guest memory")
}

/// Every byte of guest memory, region by region.
pub struct Snapshot(Vec<(u64, Vec<u8>)>);

pub fn snapshot(mem: &GuestMemory) -> Snapshot {
    Snapshot(
        mem.iter()
            .map(|r| {
                let base = r.start_addr().0;
                let mut bytes = vec![0u8; r.len() as usize];
                mem.read_slice(&mut bytes, GuestAddress(base))
                    .expect("read own region");
                (base, bytes)
            })
            .collect(),
    )
}

/// Guest addresses whose byte differs from `before`.
pub fn changed_bytes(mem: &GuestMemory, before: &Snapshot) -> Vec<u64> {
    let now = snapshot(mem);
    let mut changed = Vec::new();
    for ((base, old), (_, new)) in before.0.iter().zip(&now.0) {
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            if a != b {
                changed.push(base + i as u64);
            }
        }
    }
    changed
}

/// Fill all of guest memory from `seed`: half the 32-bit words zero (a FLUSH request type), the rest noise.
pub fn fill(mem: &GuestMemory, seed: u64) {
    let mut x = seed | 1;
    for r in mem.iter() {
        let base = r.start_addr().0;
        let mut bytes = vec![0u8; r.len() as usize];
        for w in bytes.chunks_mut(4) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x & 1 == 1 {
                w.copy_from_slice(&(x >> 32).to_le_bytes()[..w.len()]);
            }
        }
        mem.write_slice(&bytes, GuestAddress(base))
            .expect("write own region");
    }
}

/// Addresses a hostile guest would pick: region edges (both sides, a few bytes off), the hole, the top of
/// the address space, or anything at all.
pub fn hostile_addr() -> impl Strategy<Value = u64> {
    let edges = prop::sample::select(vec![
        R0,
        0x8000,
        R1 - 2,
        R1,
        R1_END - 4,
        R1_END - 2,
        R1_END,
        R2 - 4,
        R2,
        R2_END - 4,
        R2_END,
        TOP,
        TOP_END - 4,
        TOP_END,
        u64::MAX - 3,
        u64::MAX,
    ]);
    prop_oneof![
        4 => (edges, -8i64..8).prop_map(|(a, d)| a.wrapping_add_signed(d)),
        2 => R0..R1_END,
        1 => any::<u64>(),
    ]
}

/// Lengths: tiny, exactly the 4 bytes pmem needs, around powers of two, or up to `u32::MAX`.
pub fn hostile_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..=8,
        1 => prop::sample::select(vec![16, 0x1000, 0x1_0000, u32::MAX - 3, u32::MAX]),
        1 => any::<u32>(),
    ]
}

/// fdatasync on a real temporary file, which a test can hold so that a flush is provably in flight.
pub struct HeldFileFlush {
    file: File,
    held: Mutex<bool>,
    release: Condvar,
    started: AtomicU64,
    finished: AtomicU64,
}

impl HeldFileFlush {
    pub fn new() -> Self {
        // Nothing written: the fdatasync is real but has no data to push, which keeps hundreds of cases fast.
        let file = tempfile::tempfile().expect("temp file");
        HeldFileFlush {
            file,
            held: Mutex::new(false),
            release: Condvar::new(),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// Flushes that start from now on wait in the backend until [`HeldFileFlush::release`].
    pub fn hold(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn release(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.release.notify_all();
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::SeqCst)
    }
}

impl Flush for HeldFileFlush {
    fn flush(&self) -> std::io::Result<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.release.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
        let r = self.file.sync_data();
        self.finished.fetch_add(1, Ordering::SeqCst);
        r
    }
}

/// Run `f` on its own thread and fail (instead of hanging the suite) if it has not returned after `limit`.
/// Not a performance assertion: the limit is orders of magnitude above the normal run time.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = worker.join();
            v
        }
        // The thread panicked: re-raise its panic so proptest sees (and shrinks) it.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{what}: worker ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {limit:?} (hang)")
        }
    }
}

/// Poll `cond` for up to `limit` (for answers that come from the flush worker thread).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A split virtqueue laid out in guest memory as the spec does it (virtio 1.2, 2.7): descriptor table at
/// `base`, available ring right after it, used ring after that at 4-byte alignment.
///
/// Built from virtio-queue's mock accessors but not with `MockSplitQueue::create`: in virtio-queue 0.18 that
/// places the used ring `size` *bytes* after the start of the available ring elements instead of after the
/// whole ring, so the two rings overlap and a device's used entries overwrite the driver's available entries.
pub struct Rings<'a> {
    pub size: u16,
    pub desc: DescriptorTable<'a, GuestMemory>,
    pub avail: AvailRing<'a, GuestMemory>,
    pub used: UsedRing<'a, GuestMemory>,
    pub desc_addr: u64,
    pub avail_addr: u64,
    pub used_addr: u64,
}

impl<'a> Rings<'a> {
    /// Bytes from the descriptor table to the end of the used ring.
    pub fn len(size: u16) -> u64 {
        let s = u64::from(size);
        (18 * s + 6).next_multiple_of(4) + 6 + 8 * s
    }

    /// Rings at `base` (16-byte aligned, all of it in guest memory); indices and flags start at zero.
    pub fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
        let s = u64::from(size);
        let avail_addr = base + 16 * s;
        let used_addr = base + (18 * s + 6).next_multiple_of(4);
        Rings {
            size,
            desc: DescriptorTable::new(mem, GuestAddress(base), size),
            avail: AvailRing::new(mem, GuestAddress(avail_addr), size),
            used: UsedRing::new(mem, GuestAddress(used_addr), size),
            desc_addr: base,
            avail_addr,
            used_addr,
        }
    }

    /// A ready queue configured for these rings, as a driver would set it up.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two queue size");
        q.set_size(self.size);
        q.set_ready(true);
        q.try_set_desc_table_address(GuestAddress(self.desc_addr))
            .expect("aligned descriptor table");
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr))
            .expect("aligned available ring");
        q.try_set_used_ring_address(GuestAddress(self.used_addr))
            .expect("aligned used ring");
        q
    }
}
