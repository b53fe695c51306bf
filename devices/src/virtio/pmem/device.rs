//! The virtio-pmem device model.
//!
//! Queue processing runs on the VMM's event loop and only parses chains; flush requests go to the
//! [`FlushWorker`] thread, which answers them once the backing's [`Flush`] returns, unless the flush can answer
//! at once without blocking ([`Flush::try_now`]: nothing to write back, as on tmpfs or MAP_SYNC fs-dax), in
//! which case the event loop answers them itself (no rate limit set, coalescing policy). Malformed chains are
//! answered at once (error status where the chain has a safe place for it, otherwise the buffer is returned
//! with length 0); a broken queue (avail index jumping past the queue size, a head index out of range) is
//! reported to the transport, which sets DEVICE_NEEDS_RESET. Nothing a guest puts in the queue can panic or
//! stall the event loop.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::flush::{Flush, FlushPolicy, FlushWorker};
use super::metrics::PmemMetrics;
use super::rate_limit::{Admission, FlushLimits, FlushRateLimit};
use super::request::{self, BadRequest};
use super::{QUEUE_SIZE, VIRTIO_ID_PMEM, VIRTIO_PMEM_RESP_TYPE_EIO, VIRTIO_PMEM_RESP_TYPE_OK};
use crate::virtio::device::{read_config_bytes, QueueError};
use crate::virtio::{ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt};

/// `struct virtio_pmem_config { le64 start; le64 size; }`: where the region sits in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmemConfig {
    /// Guest physical address of the region.
    pub start: u64,
    /// Length of the region in bytes.
    pub size: u64,
}

impl PmemConfig {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.start.to_le_bytes());
        b[8..].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// A flush request waiting for the worker.
struct PendingFlush {
    head: u16,
    status: GuestAddress,
    /// Device generation at arrival: answers for a generation that was reset away are dropped.
    generation: u64,
    arrived: Instant,
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
}

/// What the event loop, the vCPU (reset) and the flush worker share.
struct State {
    generation: u64,
    active: Option<Active>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves State consistent; keep serving after a panic elsewhere.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio-pmem device: one region and one request queue, flushes answered by a [`FlushWorker`].
pub struct Pmem {
    id: String,
    config: PmemConfig,
    state: Arc<Mutex<State>>,
    metrics: Arc<PmemMetrics>,
    rate_limit: Arc<FlushRateLimit>,
    worker: FlushWorker<PendingFlush>,
    /// Asked first, on the queue path, whether a request can be answered without the worker (see
    /// [`Pmem::answer_inline`]).
    flush: Arc<dyn Flush>,
    policy: FlushPolicy,
    /// A bad request was already logged at warn level.
    warned: bool,
}

impl Pmem {
    /// A device for the region at `config`, made durable by `flush`. `id` names it in logs and the worker
    /// thread.
    pub fn new(id: &str, config: PmemConfig, flush: Arc<dyn Flush>) -> std::io::Result<Self> {
        Self::with_policy(id, config, flush, FlushPolicy::Coalesce)
    }

    /// As [`Pmem::new`] with an explicit flush policy (the benchmark compares both).
    pub fn with_policy(
        id: &str,
        config: PmemConfig,
        flush: Arc<dyn Flush>,
        policy: FlushPolicy,
    ) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            generation: 0,
            active: None,
        }));
        let metrics = Arc::new(PmemMetrics::default());
        let completion = {
            let state = state.clone();
            let metrics = metrics.clone();
            let id = id.to_owned();
            Box::new(
                move |batch: Vec<PendingFlush>, result: &std::io::Result<()>| {
                    complete(&id, &state, &metrics, batch, result)
                },
            )
        };
        // Each sync costs the window size in the bytes bucket: the most one sync can have to write back.
        let rate_limit = Arc::new(FlushRateLimit::new(config.size));
        let on_admit = {
            let metrics = metrics.clone();
            Box::new(move |requests: u64, a: Admission| {
                if a.throttled {
                    metrics.add_throttled(requests, a.waited);
                }
            })
        };
        let worker = FlushWorker::spawn_limited(
            &format!("pmem-flush-{id}"),
            flush.clone(),
            policy,
            Some((rate_limit.clone(), on_admit)),
            completion,
        )?;
        Ok(Pmem {
            id: id.to_owned(),
            config,
            state,
            metrics,
            rate_limit,
            worker,
            flush,
            policy,
            warned: false,
        })
    }

    /// Whether the requests just taken from the queue can be answered here, on the queue path, instead of by a
    /// round trip through the flush worker thread: only under [`FlushPolicy::Coalesce`] (the benchmark's
    /// per-request policy keeps its worker), with no rate limit set (a limited flush must be admitted first),
    /// and when the flush itself says it can answer at once ([`Flush::try_now`]: nothing to write back, nothing
    /// to wait for). Where the host flush is free this saves the worker's wake-up and one thread hop per guest
    /// sync; the answer means what the worker's would (the flush ran after the requests arrived).
    fn answer_inline(&self) -> Option<std::io::Result<()>> {
        if self.policy != FlushPolicy::Coalesce
            || self.rate_limit.limits() != FlushLimits::default()
        {
            return None;
        }
        self.flush.try_now()
    }

    /// Counters for the metrics endpoint; the VMM also counts dropped read-only writes here.
    pub fn metrics(&self) -> Arc<PmemMetrics> {
        self.metrics.clone()
    }

    /// The flush rate limiter (unlimited until the VMM sets limits).
    pub fn rate_limit(&self) -> Arc<FlushRateLimit> {
        self.rate_limit.clone()
    }

    /// Where the region sits in guest physical memory, as the config space reports it.
    pub fn config(&self) -> PmemConfig {
        self.config
    }

    fn log_bad(&mut self, bad: &BadRequest) {
        // The first error per device at warn level; a guest repeating it must not flood the host log.
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(device = %self.id, "bad pmem request: {} (further ones at debug level)", bad.error);
        } else {
            tracing::debug!(device = %self.id, "bad pmem request: {}", bad.error);
        }
    }
}

/// Answer one flush's batch (worker thread).
fn complete(
    id: &str,
    state: &Mutex<State>,
    metrics: &PmemMetrics,
    batch: Vec<PendingFlush>,
    result: &std::io::Result<()>,
) {
    metrics.add_sync();
    let ret = match result {
        Ok(()) => VIRTIO_PMEM_RESP_TYPE_OK,
        Err(e) => {
            tracing::error!(device = %id, "pmem flush failed, answering {} requests with EIO: {e}", batch.len());
            metrics.add_errors(batch.len() as u64);
            VIRTIO_PMEM_RESP_TYPE_EIO
        }
    };
    let mut st = lock(state);
    let generation = st.generation;
    let Some(active) = st.active.as_mut() else {
        return; // reset while flushing: the driver no longer expects these
    };
    answer(active, metrics, batch, generation, ret);
}

/// Write `ret` into each request's status, return it to the used ring, and interrupt the driver if it wants.
/// Requests of another device generation (reset since) are dropped.
fn answer(
    active: &mut Active,
    metrics: &PmemMetrics,
    batch: Vec<PendingFlush>,
    generation: u64,
    ret: u32,
) {
    let mut used = false;
    for req in batch.into_iter().filter(|r| r.generation == generation) {
        let len = match active.mem.write_obj(ret.to_le(), req.status) {
            Ok(()) => 4,
            Err(_) => {
                metrics.add_errors(1);
                0
            }
        };
        if active.queue.add_used(&active.mem, req.head, len).is_err() {
            metrics.add_errors(1);
            continue;
        }
        used = true;
        metrics.record_latency(req.arrived.elapsed());
    }
    if used {
        notify(active);
    }
}

/// Interrupt the driver if it wants to hear about used buffers now.
fn notify(active: &mut Active) {
    let wanted = active.queue.needs_notification(&active.mem).unwrap_or(true);
    if wanted {
        if let Err(e) = active.interrupt.trigger_queue(0) {
            tracing::warn!("cannot signal pmem interrupt: {e}");
        }
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // VIRTIO_PMEM_F_SHMEM_REGION (bit 0) is not offered: the region is described in config space.
        0
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config.bytes();
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Config space is read-only for virtio-pmem.
        tracing::debug!(device = %self.id, "guest write to read-only pmem config ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [queue] = crate::virtio::device::ready_queues(queues)?;
        lock(&self.state).active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        tracing::debug!(device = %self.id, "virtio-pmem activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        let queue_error = |reason: String| QueueError {
            queue: index,
            reason,
        };
        if index != 0 {
            return Err(queue_error("virtio-pmem has one queue".into()));
        }
        let mut pending = Vec::new();
        let mut bad = Vec::new();
        {
            let mut st = lock(&self.state);
            let generation = st.generation;
            let Some(active) = st.active.as_mut() else {
                return Ok(());
            };
            let mem = active.mem.clone();
            let chains: Vec<_> = active
                .queue
                .iter(&mem)
                .map_err(|e| queue_error(e.to_string()))?
                .collect();
            self.metrics.add_requests(chains.len() as u64);
            let arrived = Instant::now();
            for chain in chains {
                match request::parse(chain, &mem) {
                    Ok(req) => pending.push(PendingFlush {
                        head: req.head,
                        status: req.status,
                        generation,
                        arrived,
                    }),
                    Err(b) => bad.push(b),
                }
            }
            for b in &bad {
                self.metrics.add_errors(1);
                let len = match b.status {
                    Some(addr) => match mem.write_obj(VIRTIO_PMEM_RESP_TYPE_EIO.to_le(), addr) {
                        Ok(()) => 4,
                        Err(_) => 0,
                    },
                    None => 0,
                };
                // A head index past the queue cannot be returned: the avail ring itself is corrupt.
                active
                    .queue
                    .add_used(&mem, b.head, len)
                    .map_err(|e| queue_error(format!("head {}: {e}", b.head)))?;
            }
            if !bad.is_empty() {
                notify(active);
            }
            if !pending.is_empty() {
                if let Some(result) = self.answer_inline() {
                    let batch = std::mem::take(&mut pending);
                    self.metrics.add_sync();
                    let ret = match result {
                        Ok(()) => VIRTIO_PMEM_RESP_TYPE_OK,
                        Err(e) => {
                            tracing::error!(device = %self.id, "pmem flush failed, answering {} requests with EIO: {e}", batch.len());
                            self.metrics.add_errors(batch.len() as u64);
                            VIRTIO_PMEM_RESP_TYPE_EIO
                        }
                    };
                    answer(active, &self.metrics, batch, generation, ret);
                }
            }
        }
        for b in &bad {
            self.log_bad(b);
        }
        if !pending.is_empty() {
            self.worker.submit(pending);
        }
        Ok(())
    }

    fn reset(&mut self) {
        let mut st = lock(&self.state);
        st.generation = st.generation.wrapping_add(1);
        st.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::IrqfdInterrupt;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const REQ: u64 = 0x1_0000;

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Checks `done` every millisecond for up to 2 s: the flush worker answers on its own thread. The caller
    /// asserts what it waited for.
    fn poll_until(done: impl Fn() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// fdatasync on a real temporary file, counted.
    struct FileFlush {
        file: std::fs::File,
        syncs: AtomicU64,
    }
    impl Flush for FileFlush {
        fn flush(&self) -> std::io::Result<()> {
            self.file.sync_data()?;
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Rig<'a> {
        mem: &'a GuestMemory,
        vq: MockSplitQueue<'a, GuestMemory>,
        pmem: Pmem,
        irq: Arc<IrqfdInterrupt>,
        flush: Arc<FileFlush>,
    }

    fn rig(mem: &GuestMemory) -> Rig<'_> {
        let vq = MockSplitQueue::new(mem, 16);
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"dirty", 0).unwrap();
        let flush = Arc::new(FileFlush {
            file,
            syncs: AtomicU64::new(0),
        });
        let mut pmem = Pmem::new(
            "t0",
            PmemConfig {
                start: 0x1_0000_0000,
                size: 0x20_0000,
            },
            flush.clone(),
        )
        .unwrap();
        let irq = Arc::new(IrqfdInterrupt::new().unwrap());
        pmem.activate(mem.clone(), irq.clone(), vec![vq.create_queue().unwrap()])
            .unwrap();
        Rig {
            mem,
            vq,
            pmem,
            irq,
            flush,
        }
    }

    impl Rig<'_> {
        /// Put chain `descs` at descriptor index `at` and make it available.
        fn offer(&self, descs: &[RawDescriptor], at: u16) {
            let chained: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let d = Descriptor::from(*r);
                    let last = i + 1 == descs.len();
                    let flags = if last { d.flags() } else { d.flags() | 1 };
                    RawDescriptor::from(Descriptor::new(
                        d.addr().0,
                        d.len(),
                        flags,
                        at + i as u16 + 1,
                    ))
                })
                .collect();
            self.vq.add_desc_chains(&chained, at).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.vq.used().idx().load()
        }

        fn wait_used(&self, n: u16) {
            poll_until(|| self.used_idx() >= n);
            assert!(
                self.used_idx() >= n,
                "only {} of {n} requests answered",
                self.used_idx()
            );
        }

        fn ret_at(&self, addr: u64) -> u32 {
            u32::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
        }
    }

    fn mem() -> GuestMemory {
        let m = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        m.write_obj(0u32, GuestAddress(REQ)).unwrap(); // FLUSH
        m.write_obj(9u32.to_le(), GuestAddress(REQ + 0x10)).unwrap(); // unknown type
        m
    }

    #[test]
    fn config_space_holds_start_and_size() {
        let m = mem();
        let r = rig(&m);
        let mut b = [0u8; 16];
        r.pmem.read_config(0, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x1_0000_0000
        );
        assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), 0x20_0000);
        let mut tail = [0xffu8; 4];
        r.pmem.read_config(10, &mut tail);
        assert_eq!(tail, [0x20, 0, 0, 0]);
        r.pmem.read_config(14, &mut tail);
        assert_eq!(tail, [0; 4], "past the end reads zero");
        r.pmem.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
    }

    #[test]
    fn flush_is_answered_ok_after_a_real_fdatasync() {
        let m = mem();
        let mut r = rig(&m);
        m.write_obj(0xffff_ffffu32, GuestAddress(0x2_0000)).unwrap();
        r.offer(&[d(REQ, 4, 0), d(0x2_0000, 4, W)], 0);
        r.pmem.process_queue(0).unwrap();
        r.wait_used(1);
        assert_eq!(r.ret_at(0x2_0000), VIRTIO_PMEM_RESP_TYPE_OK);
        assert_eq!(r.flush.syncs.load(Ordering::SeqCst), 1);
        let used = r.vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 4));
        assert_eq!(r.irq.status() & 1, 1, "used-buffer interrupt");
        let s = r.pmem.metrics().snapshot();
        assert_eq!((s.requests, s.syncs, s.errors), (1, 1, 0));
        assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 1);
    }

    #[test]
    fn malformed_requests_get_errors_and_good_ones_in_the_same_batch_are_served() {
        let m = mem();
        let mut r = rig(&m);
        // 0: unknown type (EIO written), 2: request only (returned with len 0),
        // 3: response outside memory, 5: a good flush.
        r.offer(&[d(REQ + 0x10, 4, 0), d(0x3_0000, 4, W)], 0);
        r.offer(&[d(REQ, 4, 0)], 2);
        r.offer(&[d(REQ, 4, 0), d(0x20_0000, 4, W)], 3);
        r.offer(&[d(REQ, 4, 0), d(0x3_0010, 4, W)], 5);
        r.pmem.process_queue(0).unwrap();
        r.wait_used(4);
        assert_eq!(r.ret_at(0x3_0000), VIRTIO_PMEM_RESP_TYPE_EIO);
        assert_eq!(r.ret_at(0x3_0010), VIRTIO_PMEM_RESP_TYPE_OK);
        let lens: Vec<(u32, u32)> = (0..4)
            .map(|i| {
                let e = r.vq.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        assert_eq!(&lens[..3], &[(0, 4), (2, 0), (3, 0)]);
        assert_eq!(lens[3], (5, 4));
        let s = r.pmem.metrics().snapshot();
        assert_eq!((s.requests, s.errors, s.syncs), (4, 3, 1));
    }

    #[test]
    fn avail_index_past_the_queue_size_is_a_queue_error() {
        let m = mem();
        let mut r = rig(&m);
        r.vq.avail().idx().store(100); // 100 new chains in a 16-entry queue
        assert!(r.pmem.process_queue(0).is_err());
        assert!(r.pmem.process_queue(1).is_err(), "no such queue");
    }

    #[test]
    fn head_index_past_the_queue_is_a_queue_error_not_a_panic() {
        let m = mem();
        let mut r = rig(&m);
        r.vq.avail().ring().ref_at(0).unwrap().store(500);
        r.vq.avail().idx().store(1);
        assert!(r.pmem.process_queue(0).is_err());
    }

    #[test]
    fn answers_for_a_reset_device_are_dropped() {
        let m = mem();
        let mut r = rig(&m);
        r.offer(&[d(REQ, 4, 0), d(0x2_0000, 4, W)], 0);
        r.pmem.process_queue(0).unwrap();
        r.pmem.reset();
        // Wait until the worker has done its flush, then check it did not touch the used ring.
        poll_until(|| r.pmem.metrics().snapshot().syncs == 1);
        assert_eq!(r.pmem.metrics().snapshot().syncs, 1);
        assert_eq!(r.used_idx(), 0);
        // Notifications after reset are ignored (not activated).
        r.pmem.process_queue(0).unwrap();
    }

    #[test]
    fn failing_flush_answers_eio() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let failing: Arc<dyn Flush> = Arc::new(|| -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        });
        let mut pmem = Pmem::new("bad", PmemConfig { start: 0, size: 0 }, failing).unwrap();
        let irq = Arc::new(IrqfdInterrupt::new().unwrap());
        pmem.activate(m.clone(), irq, vec![vq.create_queue().unwrap()])
            .unwrap();
        vq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(REQ, 4, 1, 1)),
                d(0x2_0000, 4, W),
            ],
            0,
        )
        .unwrap();
        pmem.process_queue(0).unwrap();
        poll_until(|| vq.used().idx().load() == 1);
        assert_eq!(vq.used().idx().load(), 1);
        let ret: u32 = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!(u32::from_le(ret), VIRTIO_PMEM_RESP_TYPE_EIO);
        assert_eq!(pmem.metrics().snapshot().errors, 1);
    }

    /// A flush with nothing to write back: answers inline (`try_now`) with `inline`, counts each path.
    struct FreeFlush {
        inline: Option<i32>,
        tried: AtomicU64,
        flushed: AtomicU64,
    }
    impl Flush for FreeFlush {
        fn flush(&self) -> std::io::Result<()> {
            self.flushed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn try_now(&self) -> Option<std::io::Result<()>> {
            self.tried.fetch_add(1, Ordering::SeqCst);
            self.inline.map(|errno| match errno {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            })
        }
    }

    fn free_rig(
        m: &GuestMemory,
        inline: Option<i32>,
    ) -> (MockSplitQueue<'_, GuestMemory>, Pmem, Arc<FreeFlush>) {
        let vq = MockSplitQueue::new(m, 16);
        let flush = Arc::new(FreeFlush {
            inline,
            tried: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        });
        let mut pmem = Pmem::new(
            "free",
            PmemConfig {
                start: 0,
                size: 0x20_0000,
            },
            flush.clone(),
        )
        .unwrap();
        let irq = Arc::new(IrqfdInterrupt::new().unwrap());
        pmem.activate(m.clone(), irq, vec![vq.create_queue().unwrap()])
            .unwrap();
        (vq, pmem, flush)
    }

    fn offer_flush(vq: &MockSplitQueue<'_, GuestMemory>, at: u16, status: u64) {
        vq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(REQ, 4, 1, at + 1)),
                d(status, 4, W),
            ],
            at,
        )
        .unwrap();
    }

    /// A flush that can answer at once is answered by process_queue itself: the used ring holds the answer
    /// when the call returns, and the worker's flush never ran. With a rate limit set the same request goes
    /// through the worker (it must be admitted first).
    #[test]
    fn a_free_flush_is_answered_on_the_queue_path_unless_rate_limited() {
        let m = mem();
        let (vq, mut pmem, flush) = free_rig(&m, Some(0));
        m.write_obj(0xffff_ffffu32, GuestAddress(0x2_0000)).unwrap();
        offer_flush(&vq, 0, 0x2_0000);
        pmem.process_queue(0).unwrap();
        assert_eq!(
            vq.used().idx().load(),
            1,
            "answered before process_queue returned"
        );
        let ret: u32 = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!(u32::from_le(ret), VIRTIO_PMEM_RESP_TYPE_OK);
        assert_eq!(flush.tried.load(Ordering::SeqCst), 1);
        assert_eq!(flush.flushed.load(Ordering::SeqCst), 0);
        let s = pmem.metrics().snapshot();
        assert_eq!((s.requests, s.syncs, s.errors), (1, 1, 0));

        pmem.rate_limit().set(FlushLimits {
            ops: Some(super::super::rate_limit::BucketConfig {
                size: 1000,
                refill: Duration::from_millis(1),
            }),
            bytes: None,
        });
        offer_flush(&vq, 2, 0x2_0010);
        pmem.process_queue(0).unwrap();
        poll_until(|| vq.used().idx().load() == 2);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(
            flush.tried.load(Ordering::SeqCst),
            1,
            "not asked under a limit"
        );
        assert_eq!(
            flush.flushed.load(Ordering::SeqCst),
            1,
            "the worker flushed"
        );
    }

    /// An inline answer that failed is EIO, like the worker's; a flush that cannot answer inline goes to the
    /// worker.
    #[test]
    fn an_inline_failure_answers_eio_and_no_inline_answer_uses_the_worker() {
        let m = mem();
        let (vq, mut pmem, flush) = free_rig(&m, Some(libc::EIO));
        offer_flush(&vq, 0, 0x2_0000);
        pmem.process_queue(0).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        let ret: u32 = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!(u32::from_le(ret), VIRTIO_PMEM_RESP_TYPE_EIO);
        assert_eq!(pmem.metrics().snapshot().errors, 1);
        assert_eq!(flush.flushed.load(Ordering::SeqCst), 0);

        let (vq, mut pmem, flush) = free_rig(&m, None);
        offer_flush(&vq, 0, 0x2_0010);
        pmem.process_queue(0).unwrap();
        poll_until(|| vq.used().idx().load() == 1);
        assert_eq!(vq.used().idx().load(), 1);
        let ret: u32 = m.read_obj(GuestAddress(0x2_0010)).unwrap();
        assert_eq!(u32::from_le(ret), VIRTIO_PMEM_RESP_TYPE_OK);
        assert_eq!(
            (
                flush.tried.load(Ordering::SeqCst),
                flush.flushed.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
    }

    #[test]
    fn activation_needs_exactly_one_ready_queue() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let noop: Arc<dyn Flush> = Arc::new(|| Ok(()));
        let mut pmem = Pmem::new("q", PmemConfig { start: 0, size: 0 }, noop).unwrap();
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(IrqfdInterrupt::new().unwrap());
        assert_eq!(
            pmem.activate(m.clone(), irq.clone(), vec![]),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        );
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_ready(false);
        assert_eq!(
            pmem.activate(m.clone(), irq, vec![q]),
            Err(ActivateError::QueueNotReady(0))
        );
    }
}
