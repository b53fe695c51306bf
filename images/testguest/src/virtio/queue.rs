//! A split virtqueue (virtio 1.x, section 2.7) in guest memory the test guest owns, plus a page of request and
//! response buffers. Guest physical addresses equal virtual ones (identity map), so a pointer is a device
//! address.
//!
//! Everything the device reads or writes is accessed with volatile loads and stores, and x86's ordering (stores
//! are not reordered with older stores) plus compiler fences gives the order the spec asks for: descriptors, then
//! the avail ring entry, then the avail index, then the notify.

use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

/// The largest queue the guest sets up (a power of two, as split queues require).
pub const QUEUE_CAPACITY: usize = 16;
/// Descriptor table entries in memory: twice the queue, so a descriptor index just past the queue size still
/// lands in guest memory we own (the device must reject it anyway).
pub const DESC_SLOTS: usize = 2 * QUEUE_CAPACITY;
/// Queue memory blocks: slots below [`PMEM_QUEUES`] for the pmem devices (one each), the rest for the
/// console's six queues.
pub const MAX_QUEUES: usize = 14;
/// At most this many pmem devices are driven.
pub const PMEM_QUEUES: usize = 8;
/// The first of the console's queue slots.
pub const CONSOLE_QUEUE_SLOT: usize = PMEM_QUEUES;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Avail ring flag: the driver does not want interrupts (it polls).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

#[repr(C, align(4096))]
struct DescTable([Desc; DESC_SLOTS]);

#[repr(C, align(4096))]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_CAPACITY],
    used_event: u16,
}

#[repr(C, align(4096))]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_CAPACITY],
    avail_event: u16,
}

/// Request and response words.
pub const BUF_WORDS: usize = 1024;

#[repr(C, align(4096))]
struct Buffers([u32; BUF_WORDS]);

#[repr(C)]
pub struct QueueMem {
    desc: DescTable,
    avail: AvailRing,
    used: UsedRing,
    buf: Buffers,
}

/// The queue memory of every driven device, in .bss (zeroed by the loader; re-zeroed on every queue setup).
struct QueueStore(UnsafeCell<[QueueMem; MAX_QUEUES]>);

// SAFETY: the guest runs on one vCPU in one thread; each QueueMem is handed out once (see `Queue::take`).
unsafe impl Sync for QueueStore {}

static QUEUES: QueueStore = QueueStore(UnsafeCell::new(
    // SAFETY: QueueMem is plain integers; all-zero is a valid (empty) value.
    unsafe { core::mem::MaybeUninit::zeroed().assume_init() },
));

/// The driver's view of one queue.
pub struct Queue {
    mem: *mut QueueMem,
    size: u16,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    /// The queue memory number `slot`, or `None` past [`MAX_QUEUES`]. Each slot must be taken at most once.
    pub fn take(slot: usize) -> Option<Queue> {
        if slot >= MAX_QUEUES {
            return None;
        }
        // SAFETY: in bounds; the pointer stays valid for the whole run (static), and slots are not shared.
        let mem = unsafe { (QUEUES.0.get() as *mut QueueMem).add(slot) };
        Some(Queue {
            mem,
            size: 0,
            next_avail: 0,
            next_used: 0,
        })
    }

    /// Forget all state and zero the rings, for a queue of `size` entries (a power of two <= QUEUE_CAPACITY).
    pub fn reset(&mut self, size: u16) {
        // SAFETY: `mem` points to a QueueMem we own; zero is a valid bit pattern for it. The device does not use
        // it now (the caller reset the device or has not enabled the queue yet).
        unsafe { core::ptr::write_bytes(self.mem, 0, 1) };
        self.size = size;
        self.next_avail = 0;
        self.next_used = 0;
        // SAFETY: field of our QueueMem.
        unsafe { write_volatile(addr_of_mut!((*self.mem).avail.flags), AVAIL_F_NO_INTERRUPT) };
        compiler_fence(Ordering::SeqCst);
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ask the device for used-buffer interrupts (or not: the default after [`Queue::reset`], this guest polls).
    pub fn want_interrupts(&mut self, want: bool) {
        let flags = if want { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: field of our QueueMem.
        unsafe { write_volatile(addr_of_mut!((*self.mem).avail.flags), flags) };
        compiler_fence(Ordering::SeqCst);
    }

    pub fn desc_addr(&self) -> u64 {
        // SAFETY: address computation only.
        unsafe { addr_of!((*self.mem).desc) as u64 }
    }

    pub fn avail_addr(&self) -> u64 {
        // SAFETY: address computation only.
        unsafe { addr_of!((*self.mem).avail) as u64 }
    }

    pub fn used_addr(&self) -> u64 {
        // SAFETY: address computation only.
        unsafe { addr_of!((*self.mem).used) as u64 }
    }

    /// Guest physical address of buffer word `i` (modulo the buffer size).
    pub fn buf_addr(&self, i: usize) -> u64 {
        // SAFETY: address computation only; index reduced into bounds.
        unsafe { addr_of!((*self.mem).buf.0[i % BUF_WORDS]) as u64 }
    }

    pub fn buf_read(&self, i: usize) -> u32 {
        // SAFETY: in-bounds word of our buffer page; the device may write it, hence volatile.
        unsafe { read_volatile(addr_of!((*self.mem).buf.0[i % BUF_WORDS])) }
    }

    pub fn buf_write(&mut self, i: usize, v: u32) {
        // SAFETY: as for `buf_read`.
        unsafe { write_volatile(addr_of_mut!((*self.mem).buf.0[i % BUF_WORDS]), v) }
    }

    /// Bytes of the buffer page (4 KiB) from byte `off`, wrapping at its end.
    pub fn buf_write_bytes(&mut self, off: usize, data: &[u8]) {
        let base = self.buf_addr(0) as *mut u8;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: the offset is reduced into our 4 KiB buffer page; the device may read it, hence volatile.
            unsafe { write_volatile(base.add((off + i) % (BUF_WORDS * 4)), *b) }
        }
    }

    /// Reads buffer-page bytes from byte `off` into `out`, wrapping at its end.
    pub fn buf_read_bytes(&self, off: usize, out: &mut [u8]) {
        let base = self.buf_addr(0) as *const u8;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: as for `buf_write_bytes`; the device may have written it.
            *b = unsafe { read_volatile(base.add((off + i) % (BUF_WORDS * 4))) };
        }
    }

    /// Write descriptor slot `i` (any slot of the table, even past the queue size).
    pub fn set_desc(&mut self, i: usize, d: Desc) {
        // SAFETY: index reduced into the table we own.
        unsafe { write_volatile(addr_of_mut!((*self.mem).desc.0[i % DESC_SLOTS]), d) }
    }

    /// Offer the chain starting at descriptor `head` (which may be out of range on purpose).
    pub fn push_avail(&mut self, head: u16) {
        let slot = (self.next_avail % self.size.max(1)) as usize;
        compiler_fence(Ordering::SeqCst);
        // SAFETY: slot < size <= QUEUE_CAPACITY; fields of our QueueMem.
        unsafe { write_volatile(addr_of_mut!((*self.mem).avail.ring[slot]), head) };
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    /// Publish `idx` as the avail index (normally via `push_avail`; directly to test a bogus index).
    pub fn set_avail_idx(&mut self, idx: u16) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: field of our QueueMem.
        unsafe { write_volatile(addr_of_mut!((*self.mem).avail.idx), idx) };
        compiler_fence(Ordering::SeqCst);
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used element the device published, if any.
    pub fn poll_used(&mut self) -> Option<UsedElem> {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: field of our QueueMem, written by the device.
        let idx = unsafe { read_volatile(addr_of!((*self.mem).used.idx)) };
        if idx == self.next_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let slot = (self.next_used % self.size.max(1)) as usize;
        // SAFETY: slot < size <= QUEUE_CAPACITY.
        let elem = unsafe { read_volatile(addr_of!((*self.mem).used.ring[slot])) };
        self.next_used = self.next_used.wrapping_add(1);
        Some(elem)
    }
}
