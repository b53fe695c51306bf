//! `pmem=malformed`: send the device requests a hostile guest could send, one case at a time on a freshly
//! initialised device, and check after each that the device still answers a good flush - on the same queue if
//! it can, else after a reset and re-initialisation (needed when the device set DEVICE_NEEDS_RESET).
//!
//! Per case one line: `pmem0 malformed <case>: <outcome>; good flush ok` (or `... ok after reset`), where
//! `<outcome>` is `answered used_len=L response=0x..|unwritten`, `needs-reset`, or `no answer`.

use super::pmem::flush_or_fail;
use crate::exit::code;
use crate::say;
use crate::tsc::CYCLES_PER_SECOND_MIN;
use crate::virtio::mmio::status;
use crate::virtio::pmem::{Completion, FlushResult, PmemDevice, REQ_TYPE_FLUSH, RESP_SENTINEL};
use crate::virtio::queue::{Desc, DESC_F_NEXT, DESC_F_WRITE};

/// A guest physical address far outside any guest memory (but a valid, canonical identity address).
pub const OUTSIDE_GUEST_MEMORY: u64 = 0x7fff_0000_0000;
/// A request type virtio-pmem does not define.
pub const UNKNOWN_REQ_TYPE: u32 = 7;
/// How long to wait for the answer to a malformed request (a device may rightly never answer).
const BAD_WAIT_CYCLES: u64 = 2 * CYCLES_PER_SECOND_MIN;
/// How long the follow-up flush on the same queue may take before falling back to a reset.
const GOOD_WAIT_CYCLES: u64 = 10 * CYCLES_PER_SECOND_MIN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Only the request descriptor, no response descriptor.
    TooShortChain,
    /// Request and response descriptors of 2 bytes instead of 4.
    ShortBuffers,
    /// Request device-writable, response device-readable.
    WrongDirection,
    RequestOutsideMemory,
    ResponseOutsideMemory,
    /// Descriptor 1 points back to descriptor 0.
    DescriptorLoop,
    /// Every descriptor of the queue chained, the last one pointing past the queue.
    ChainLongerThanQueue,
    /// The avail ring names a head index past the queue size.
    HeadOutOfRange,
    UnknownRequestType,
    /// The avail index jumps ahead by more than the queue size.
    AvailIndexOverrun,
    /// A request is offered and notified before QueueReady and DRIVER_OK.
    NotifyBeforeReady,
}

pub const CASES: [Case; 11] = [
    Case::TooShortChain,
    Case::ShortBuffers,
    Case::WrongDirection,
    Case::RequestOutsideMemory,
    Case::ResponseOutsideMemory,
    Case::DescriptorLoop,
    Case::ChainLongerThanQueue,
    Case::HeadOutOfRange,
    Case::UnknownRequestType,
    Case::AvailIndexOverrun,
    Case::NotifyBeforeReady,
];

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::TooShortChain => "too-short-chain",
            Case::ShortBuffers => "short-buffers",
            Case::WrongDirection => "wrong-direction",
            Case::RequestOutsideMemory => "request-outside-memory",
            Case::ResponseOutsideMemory => "response-outside-memory",
            Case::DescriptorLoop => "descriptor-loop",
            Case::ChainLongerThanQueue => "chain-longer-than-queue",
            Case::HeadOutOfRange => "head-out-of-range",
            Case::UnknownRequestType => "unknown-request-type",
            Case::AvailIndexOverrun => "avail-index-overrun",
            Case::NotifyBeforeReady => "notify-before-ready",
        }
    }
}

struct Outcome {
    completion: Completion,
    response: u32,
}

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.completion {
            Completion::Used { len, .. } if self.response == RESP_SENTINEL => {
                write!(f, "answered used_len={len} response=unwritten")
            }
            Completion::Used { len, .. } => {
                write!(f, "answered used_len={len} response={:#x}", self.response)
            }
            Completion::NeedsReset => write!(f, "needs-reset"),
            Completion::NoAnswer => write!(f, "no answer"),
        }
    }
}

/// Offer the malformed request of `case` (the device is initialised up to, not including, going live) and
/// notify. Returns the head to wait for and whether a follow-up flush on the same queue makes sense.
fn offer(pmem: &mut PmemDevice, case: Case) -> (u16, bool) {
    let qs = pmem.queue.size();
    let q = &mut pmem.queue;
    q.buf_write(
        0,
        if case == Case::UnknownRequestType {
            UNKNOWN_REQ_TYPE
        } else {
            REQ_TYPE_FLUSH
        },
    );
    q.buf_write(1, RESP_SENTINEL);
    let req = q.buf_addr(0);
    let resp = q.buf_addr(1);
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    let good_pair = |q: &mut crate::virtio::queue::Queue, at: u16| {
        q.set_desc(at as usize, d(req, 4, DESC_F_NEXT, at + 1));
        q.set_desc(at as usize + 1, d(resp, 4, DESC_F_WRITE, 0));
    };
    let mut head = 0;
    let mut same_queue = true;
    match case {
        Case::TooShortChain => q.set_desc(0, d(req, 4, 0, 0)),
        Case::ShortBuffers => {
            q.set_desc(0, d(req, 2, DESC_F_NEXT, 1));
            q.set_desc(1, d(resp, 2, DESC_F_WRITE, 0));
        }
        Case::WrongDirection => {
            q.set_desc(0, d(req, 4, DESC_F_NEXT | DESC_F_WRITE, 1));
            q.set_desc(1, d(resp, 4, 0, 0));
        }
        Case::RequestOutsideMemory => {
            q.set_desc(0, d(OUTSIDE_GUEST_MEMORY, 4, DESC_F_NEXT, 1));
            q.set_desc(1, d(resp, 4, DESC_F_WRITE, 0));
        }
        Case::ResponseOutsideMemory => {
            q.set_desc(0, d(req, 4, DESC_F_NEXT, 1));
            q.set_desc(1, d(OUTSIDE_GUEST_MEMORY, 4, DESC_F_WRITE, 0));
        }
        Case::DescriptorLoop => {
            q.set_desc(0, d(req, 4, DESC_F_NEXT, 1));
            q.set_desc(1, d(resp, 4, DESC_F_WRITE | DESC_F_NEXT, 0));
        }
        Case::ChainLongerThanQueue => {
            for i in 0..qs {
                q.set_desc(i as usize, d(req, 4, DESC_F_NEXT, i + 1));
            }
            same_queue = false;
        }
        Case::HeadOutOfRange => {
            // A well-formed flush in the slots just past the queue: a device that follows the head anyway
            // answers it, which the outcome line shows.
            head = qs + 1;
            good_pair(q, head);
        }
        Case::UnknownRequestType | Case::NotifyBeforeReady => good_pair(q, 0),
        Case::AvailIndexOverrun => {
            good_pair(q, 0);
            q.set_avail_idx(q.next_avail().wrapping_add(qs + 1));
            same_queue = false;
        }
    }
    if case != Case::AvailIndexOverrun {
        q.push_avail(head);
    }
    pmem.notify();
    (head, same_queue && qs >= 4)
}

fn run_case(n: usize, pmem: &mut PmemDevice, case: Case) -> Result<(), u32> {
    let init = pmem.init_until_queue_ready();
    if let Err(e) = init {
        say!("FAIL pmem{n} malformed {}: init: {e}", case.name());
        return Err(code::PMEM_INIT);
    }
    if case != Case::NotifyBeforeReady {
        pmem.go_live();
    }
    let (head, same_queue) = offer(pmem, case);
    let completion = pmem.wait_for(head, BAD_WAIT_CYCLES);
    let outcome = Outcome {
        completion,
        response: pmem.queue.buf_read(1),
    };
    if case == Case::NotifyBeforeReady {
        pmem.go_live();
    }

    let needs_reset = pmem.status() & status::DEVICE_NEEDS_RESET != 0;
    if !needs_reset && same_queue {
        let at = pmem.queue.size() - 2;
        if let FlushResult::Ok { .. } = pmem.flush_at(at, 8, GOOD_WAIT_CYCLES) {
            say!(
                "pmem{n} malformed {}: {outcome}; good flush ok",
                case.name()
            );
            return Ok(());
        }
    }
    let retry = match pmem.init() {
        Ok(()) => pmem.flush(),
        Err(e) => {
            say!(
                "FAIL pmem{n} malformed {}: {outcome}; re-init failed: {e}",
                case.name()
            );
            return Err(code::DEVICE_STOPPED_SERVING);
        }
    };
    match retry {
        FlushResult::Ok { .. } => {
            say!(
                "pmem{n} malformed {}: {outcome}; good flush ok after reset",
                case.name()
            );
            Ok(())
        }
        other => {
            say!(
                "FAIL pmem{n} malformed {}: {outcome}; good flush after reset: {other}",
                case.name()
            );
            Err(code::DEVICE_STOPPED_SERVING)
        }
    }
}

pub fn run(n: usize, pmem: &mut PmemDevice) -> u32 {
    for case in CASES {
        if let Err(rc) = run_case(n, pmem, case) {
            return rc;
        }
    }
    // Leave the device initialised and proven once more with a plain flush.
    if let Err(e) = pmem.init() {
        say!("FAIL pmem{n} malformed: final re-init: {e}");
        return code::DEVICE_STOPPED_SERVING;
    }
    if let Err(rc) = flush_or_fail(n, pmem) {
        return rc;
    }
    say!(
        "pmem{n} malformed: {} cases done, device still serving",
        CASES.len()
    );
    0
}
