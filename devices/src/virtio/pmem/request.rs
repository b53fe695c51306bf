//! Turning an untrusted descriptor chain into a pmem request.
//!
//! Expected layout (what Linux's virtio_pmem sends): a device-readable descriptor holding
//! `struct virtio_pmem_req { le32 type; }`, then a device-writable one for `struct virtio_pmem_resp { le32 ret; }`.
//! Everything is checked against guest memory before it is used; a bad chain becomes a [`BadRequest`] that
//! still says where (if anywhere) an error status can safely be written.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{QUEUE_SIZE, VIRTIO_PMEM_REQ_TYPE_FLUSH};
use crate::virtio::GuestMemory;

/// Size of both the request header and the response.
const FIELD_LEN: u32 = 4;

/// Most descriptors read from one chain. The spec bounds a chain by the queue size (virtio 1.2, 2.7.5.3.1);
/// virtio-queue enforces that for direct chains but follows an indirect table for up to 65535 entries, so
/// without this cap 256 heads pointing at one big indirect table cost 16M descriptor reads per notify.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// What is wrong with a descriptor chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// No descriptor could be read (head index out of range or unreadable descriptor table).
    #[error("empty descriptor chain (head index out of range or unreadable descriptor table)")]
    Empty,
    /// The chain is cyclic, too long, or cut short.
    #[error("descriptor chain loops, is longer than the queue or has a dangling next index")]
    Broken,
    /// The request header descriptor is device-writable.
    #[error("request descriptor is device-writable")]
    RequestWritable,
    /// The request header descriptor (its length given) is shorter than 4 bytes.
    #[error("request descriptor has {0} bytes, needs 4")]
    RequestTooShort(u32),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// There is no device-writable descriptor for the response.
    #[error("no device-writable descriptor for the response")]
    NoResponse,
    /// The first device-writable descriptor (its length given) is shorter than the 4-byte response.
    #[error("response descriptor has {0} bytes, needs 4")]
    ResponseTooShort(u32),
    /// A descriptor does not lie inside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the descriptor.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The request type is not [`VIRTIO_PMEM_REQ_TYPE_FLUSH`].
    #[error("unknown request type {0}")]
    UnknownType(u32),
}

/// A well-formed flush request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    /// Where the 4-byte response goes (checked to lie in guest memory).
    pub status: GuestAddress,
}

/// A chain that is not a well-formed request, and how it can still be answered.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    /// What is wrong with it.
    pub error: RequestError,
    /// A checked, device-writable place for an error status, if the chain has one.
    pub status: Option<GuestAddress>,
}

fn in_memory(mem: &GuestMemory, d: &Descriptor) -> bool {
    // A zero-length descriptor touches nothing; check_range(.., 0) is false for an address outside memory,
    // which is still what we want to refuse.
    GuestMemoryBackend::check_range(mem, d.addr(), d.len().max(1) as usize)
}

/// Parse one chain popped from the queue.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemory) -> Result<Request, BadRequest>
where
    M: Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    // The iterator stops by itself after queue-size descriptors (loops), at an out-of-range next index or an
    // unreadable descriptor; a last descriptor that still says "next" tells us the chain was cut short. One
    // descriptor past MAX_CHAIN is read only to tell that the chain is too long.
    let mut descs: Vec<Descriptor> = chain.take(MAX_CHAIN + 1).collect();
    let too_long = descs.len() > MAX_CHAIN;
    descs.truncate(MAX_CHAIN);
    let bad = |error, status| BadRequest {
        head,
        error,
        status,
    };

    // The response follows the request: never write a status into the first (request) descriptor, even when
    // the guest marked it writable.
    let status = descs
        .iter()
        .skip(1)
        .find(|d| d.is_write_only())
        .filter(|d| d.len() >= FIELD_LEN && in_memory(mem, d))
        .map(|d| d.addr());

    let Some(first) = descs.first() else {
        return Err(bad(RequestError::Empty, None));
    };
    if too_long || descs.last().is_some_and(|d| d.has_next()) {
        return Err(bad(RequestError::Broken, status));
    }
    if first.is_write_only() {
        return Err(bad(RequestError::RequestWritable, status));
    }
    if first.len() < FIELD_LEN {
        return Err(bad(RequestError::RequestTooShort(first.len()), status));
    }
    let writable_at = descs.iter().position(|d| d.is_write_only());
    if let Some(w) = writable_at {
        if descs[w..].iter().any(|d| !d.is_write_only()) {
            return Err(bad(RequestError::ReadableAfterWritable, status));
        }
    }
    let Some(resp) = writable_at.map(|w| descs[w]) else {
        return Err(bad(RequestError::NoResponse, None));
    };
    if resp.len() < FIELD_LEN {
        return Err(bad(RequestError::ResponseTooShort(resp.len()), None));
    }
    if let Some(d) = descs.iter().find(|d| !in_memory(mem, d)) {
        return Err(bad(
            RequestError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            },
            status,
        ));
    }
    let req_type = match mem.read_obj::<u32>(first.addr()) {
        Ok(v) => u32::from_le(v),
        Err(_) => {
            return Err(bad(
                RequestError::OutsideMemory {
                    addr: first.addr().0,
                    len: first.len(),
                },
                status,
            ))
        }
    };
    if req_type != VIRTIO_PMEM_REQ_TYPE_FLUSH {
        return Err(bad(RequestError::UnknownType(req_type), status));
    }
    match status {
        Some(status) => Ok(Request { head, status }),
        // Unreachable given the checks above, but never trust that with guest input.
        None => Err(bad(
            RequestError::OutsideMemory {
                addr: resp.addr().0,
                len: resp.len(),
            },
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const REQ: u64 = 0x1_0000;
    const RESP: u64 = 0x2_0000;
    const MEM_END: u64 = 0x10_0000;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn parse_chain(descs: &[RawDescriptor], req_type: u32) -> Result<Request, BadRequest> {
        let m = mem();
        m.write_obj(req_type.to_le(), GuestAddress(REQ)).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        parse(chain, &m)
    }

    fn err(r: Result<Request, BadRequest>) -> (RequestError, Option<GuestAddress>) {
        let b = r.unwrap_err();
        (b.error, b.status)
    }

    #[test]
    fn well_formed_flush() {
        let r = parse_chain(&[d(REQ, 4, 0), d(RESP, 4, W)], 0).unwrap();
        assert_eq!(r.status, GuestAddress(RESP));
    }

    #[test]
    fn malformed_chains_are_classified_with_a_safe_status_address() {
        let s = Some(GuestAddress(RESP));
        // Unknown request type: error status can be written.
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0), d(RESP, 4, W)], 7)),
            (RequestError::UnknownType(7), s)
        );
        // Too short: only a request, or a request of 2 bytes, or a response of 2 bytes.
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0)], 0)),
            (RequestError::NoResponse, None)
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 2, 0), d(RESP, 4, W)], 0)),
            (RequestError::RequestTooShort(2), s)
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0), d(RESP, 2, W)], 0)),
            (RequestError::ResponseTooShort(2), None)
        );
        // Wrong direction.
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, W), d(RESP, 4, W)], 0)),
            (RequestError::RequestWritable, s)
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, W), d(RESP, 4, 0)], 0)),
            (RequestError::RequestWritable, None)
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0), d(RESP, 4, 0)], 0)),
            (RequestError::NoResponse, None)
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0), d(RESP, 4, W), d(REQ, 4, 0)], 0)),
            (RequestError::ReadableAfterWritable, s)
        );
        // Outside guest memory: the request, the response, or a request straddling the end.
        assert_eq!(
            err(parse_chain(&[d(MEM_END + 0x1000, 4, 0), d(RESP, 4, W)], 0)).0,
            RequestError::OutsideMemory {
                addr: MEM_END + 0x1000,
                len: 4
            }
        );
        assert_eq!(
            err(parse_chain(&[d(REQ, 4, 0), d(MEM_END - 2, 4, W)], 0)),
            (
                RequestError::OutsideMemory {
                    addr: MEM_END - 2,
                    len: 4
                },
                None
            )
        );
        assert_eq!(
            err(parse_chain(&[d(MEM_END - 2, 4, 0), d(RESP, 4, W)], 0)).0,
            RequestError::OutsideMemory {
                addr: MEM_END - 2,
                len: 4
            }
        );
    }

    /// Chains built by hand in the descriptor table: loops and chains longer than the queue.
    fn parse_raw(table: &[RawDescriptor], queue_size: u16) -> Result<Request, BadRequest> {
        let m = mem();
        m.write_obj(0u32, GuestAddress(REQ)).unwrap();
        let vq = MockSplitQueue::new(&m, queue_size);
        for (i, desc) in table.iter().enumerate() {
            vq.desc_table().store(i as u16, *desc).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        parse(chain, &m)
    }

    fn linked(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags | N, next))
    }

    #[test]
    fn loops_and_overlong_chains_are_refused() {
        // 0 -> 1 -> 0 -> ...
        let looped = [linked(REQ, 4, 0, 1), linked(RESP, 4, W, 0)];
        assert_eq!(
            err(parse_raw(&looped, 4)),
            (RequestError::Broken, Some(GuestAddress(RESP)))
        );
        // Five descriptors chained in a queue of four (the fifth index is past the table).
        let long: Vec<_> = (0..4).map(|i| linked(REQ, 4, 0, i + 1)).collect();
        assert_eq!(err(parse_raw(&long, 4)).0, RequestError::Broken);
        // A next index beyond the queue.
        let dangling = [linked(REQ, 4, 0, 200), d(RESP, 4, W)];
        assert_eq!(err(parse_raw(&dangling, 4)).0, RequestError::Broken);
    }

    /// An indirect table may hold 65535 descriptors; a chain is cut at MAX_CHAIN. Here the chain would be a
    /// well-formed flush (request, empty readable fillers, response) if it were not longer than the cap.
    #[test]
    fn indirect_chain_longer_than_the_queue_size_is_refused() {
        const TABLE: u64 = 0x4_0000;
        let chain_with = |fillers: usize| {
            let m = mem();
            m.write_obj(0u32, GuestAddress(REQ)).unwrap();
            let n = fillers + 2;
            for i in 0..n {
                let desc = match i {
                    0 => linked(REQ, 4, 0, 1),
                    _ if i + 1 == n => d(RESP, 4, W),
                    _ => linked(REQ, 0, 0, i as u16 + 1),
                };
                m.write_obj(desc, GuestAddress(TABLE + 16 * i as u64))
                    .unwrap();
            }
            let vq = MockSplitQueue::new(&m, 16);
            let indirect = RawDescriptor::from(Descriptor::new(
                TABLE,
                16 * n as u32,
                VRING_DESC_F_INDIRECT as u16,
                0,
            ));
            let chain = vq.build_desc_chain(&[indirect]).unwrap();
            parse(chain, &m)
        };
        assert!(
            chain_with(MAX_CHAIN - 2).is_ok(),
            "exactly MAX_CHAIN descriptors"
        );
        // One more: the response is past the cap, so there is no place for a status either.
        assert_eq!(err(chain_with(MAX_CHAIN - 1)), (RequestError::Broken, None));
        assert_eq!(err(chain_with(4000)).0, RequestError::Broken);
    }
}
