//! Turning an untrusted descriptor chain into a virtio-iommu request.
//!
//! Layout (what Linux's virtio-iommu driver sends): device-readable descriptors holding the request (a 4-byte
//! head `{ u8 type; u8 reserved[3]; }` and the type's body), then device-writable descriptors holding, for PROBE,
//! `probe_size` bytes of properties, and for every type the 4-byte tail `{ u8 status; u8 reserved[3]; }` at the
//! very end. Every descriptor is checked against guest memory before anything is read or written; a chain that
//! has no room for the tail cannot be answered and is returned with length 0.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::QUEUE_SIZE;
use crate::virtio::GuestMemory;

/// The longest request body read (PROBE: head + endpoint + 64 reserved bytes = 72); longer readable parts are
/// read up to this many bytes, the rest ignored.
pub const MAX_REQUEST: usize = 128;
/// Size of the request head and of the tail.
pub const HEAD_LEN: usize = 4;
/// Most descriptors read from one chain (see the pmem parser for why indirect tables need a cap).
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// What makes a chain unusable as a request (answered with `VIRTIO_IOMMU_S_IOERR` where there is room).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor could be read.
    #[error("empty descriptor chain")]
    Empty,
    /// The chain loops, is longer than the queue or is cut short.
    #[error("descriptor chain loops, is longer than the queue or has a dangling next index")]
    Broken,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor lies outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The device-writable part is shorter than the 4-byte tail.
    #[error("device-writable part has {0} bytes, the tail needs 4")]
    NoTail(u64),
}

/// The device-writable part of a chain, written at logical offsets across its descriptors.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writable {
    descs: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Writable {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is no writable byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at logical offset `at`; bytes past the end are dropped. Returns false if guest memory
    /// refused a write (it was checked at parse time, so only a concurrent hot remove could do that).
    pub fn write(&self, mem: &GuestMemory, mut at: u64, mut data: &[u8]) -> bool {
        for &(addr, len) in &self.descs {
            let len = u64::from(len);
            if data.is_empty() {
                break;
            }
            if at >= len {
                at -= len;
                continue;
            }
            let n = usize::try_from(len - at)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let Some(dst) = addr.0.checked_add(at) else {
                return false;
            };
            if mem.write_slice(&data[..n], GuestAddress(dst)).is_err() {
                return false;
            }
            data = &data[n..];
            at = 0;
        }
        true
    }

    /// Writes the tail (status + 3 reserved bytes) in the last 4 bytes. Returns the used length to report.
    pub fn write_tail(&self, mem: &GuestMemory, status: u8) -> u32 {
        if self.len < HEAD_LEN as u64 {
            return 0;
        }
        if !self.write(mem, self.len - HEAD_LEN as u64, &[status, 0, 0, 0]) {
            return 0;
        }
        u32::try_from(self.len).unwrap_or(u32::MAX)
    }
}

/// One parsed chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    /// The device-readable bytes (up to [`MAX_REQUEST`]).
    pub body: Vec<u8>,
    /// Where the answer goes.
    pub writable: Writable,
}

impl Request {
    /// The request type, if the head is there.
    pub fn req_type(&self) -> Option<u8> {
        self.body.first().copied()
    }

    /// Little-endian u32 at byte `at` of the body.
    pub fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.body.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// Little-endian u64 at byte `at` of the body.
    pub fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.body.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// A chain that is not a usable request, and where (if anywhere) its IOERR status can go.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChain {
    /// Head descriptor index.
    pub head: u16,
    /// What is wrong.
    pub error: ChainError,
    /// The checked writable part, if it can hold the tail.
    pub writable: Option<Writable>,
}

fn in_memory(mem: &GuestMemory, d: &Descriptor) -> bool {
    GuestMemoryBackend::check_range(mem, d.addr(), d.len().max(1) as usize)
}

/// Parse one chain popped from the request queue.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemory) -> Result<Request, BadChain>
where
    M: Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    let mut descs: Vec<Descriptor> = chain.take(MAX_CHAIN + 1).collect();
    let too_long = descs.len() > MAX_CHAIN;
    descs.truncate(MAX_CHAIN);

    // The writable part, if every writable descriptor is in memory and there is room for the tail.
    let writable_at = descs.iter().position(|d| d.is_write_only());
    let writable = writable_at.and_then(|w| {
        let ws = &descs[w..];
        if ws.iter().any(|d| !d.is_write_only() || !in_memory(mem, d)) {
            return None;
        }
        let descs: Vec<_> = ws.iter().map(|d| (d.addr(), d.len())).collect();
        let len = descs.iter().map(|&(_, l)| u64::from(l)).sum();
        (len >= HEAD_LEN as u64).then_some(Writable { descs, len })
    });
    let bad = |error, writable| BadChain {
        head,
        error,
        writable,
    };
    if descs.is_empty() {
        return Err(bad(ChainError::Empty, None));
    }
    if too_long || descs.last().is_some_and(|d| d.has_next()) {
        return Err(bad(ChainError::Broken, writable));
    }
    let readable = &descs[..writable_at.unwrap_or(descs.len())];
    if let Some(w) = writable_at {
        if descs[w..].iter().any(|d| !d.is_write_only()) {
            return Err(bad(ChainError::ReadableAfterWritable, None));
        }
    }
    if let Some(d) = descs.iter().find(|d| !in_memory(mem, d)) {
        let error = ChainError::OutsideMemory {
            addr: d.addr().0,
            len: d.len(),
        };
        return Err(bad(error, writable));
    }
    let Some(writable) = writable else {
        let len = descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        return Err(bad(ChainError::NoTail(len), None));
    };
    let mut body = Vec::with_capacity(HEAD_LEN * 2);
    for d in readable {
        let room = MAX_REQUEST - body.len();
        if room == 0 {
            break;
        }
        let n = (d.len() as usize).min(room);
        let start = body.len();
        body.resize(start + n, 0);
        if mem.read_slice(&mut body[start..], d.addr()).is_err() {
            let error = ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            };
            return Err(bad(error, Some(writable)));
        }
    }
    Ok(Request {
        head,
        body,
        writable,
    })
}
