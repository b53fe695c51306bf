//! The messages of the agent protocol: their type codes, their fixed little-endian payloads, and the frame
//! encoder and decoder.
//!
//! Every payload has one fixed size per message type (the region list: a fixed header plus fixed-size entries),
//! so a decoder checks one length and then reads fields; there are no optional fields and no variable strings.
//! Names are fixed 32-byte fields, NUL-padded.

use super::crc::Crc32;
use super::wire::{Get, Put};
use super::{errno, DecodeError, EncodeError, HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION};

/// Size of every name field (owner names, region ids), NUL-padded UTF-8 (not necessarily NUL-terminated).
pub const NAME_LEN: usize = 32;

/// Size of one [`RegionInfo`] entry on the wire.
pub const REGION_INFO_LEN: usize = 64;

/// Bytes before the entries in a [`Message::Regions`] payload (count, reserved).
const REGIONS_HEAD_LEN: usize = 8;

/// Most regions one [`Message::Regions`] reply can carry (what fits in [`MAX_PAYLOAD`]).
pub const MAX_REGIONS: usize = (MAX_PAYLOAD - REGIONS_HEAD_LEN) / REGION_INFO_LEN;

/// Message type codes. `0x01..=0x3f`: requests, guest to host. `0x40..=0x7f`: replies, host to guest, carrying the
/// request id of the request they answer. `0x80..=0xbf`: notices, host to guest, unsolicited (request id 0).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgType {
    /// Request: version negotiation ([`Hello`]).
    Hello = 0x01,
    /// Request: the regions the guest may name.
    ListRegions = 0x02,
    /// Request: register an owner ([`OpenOwner`]).
    OpenOwner = 0x03,
    /// Request: close an owner, releasing all it holds.
    CloseOwner = 0x04,
    /// Request: take a lease ([`Acquire`]).
    Acquire = 0x05,
    /// Request: release a lease ([`Handle`]).
    Release = 0x06,
    /// Request: pin a range ([`RangeRequest`]).
    Pin = 0x07,
    /// Request: unpin ([`Handle`]).
    Unpin = 0x08,
    /// Request: make a range pinnable ([`RangeRequest`]).
    Prepare = 0x09,
    /// Request: give a range back ([`RangeRequest`]).
    OfferReclaim = 0x0a,
    /// Request: liveness check (a sequence number).
    Heartbeat = 0x0b,
    /// Request: pin a range for DMA by the VM's passthrough devices ([`RangeRequest`]); a host without them,
    /// or one older than this type, answers `ENOSYS`/an error and maps nothing.
    PinDma = 0x0c,
    /// Reply: the request failed ([`ErrorReply`]).
    Error = 0x40,
    /// Reply to hello ([`HelloReply`]).
    HelloReply = 0x41,
    /// Reply to list regions ([`RegionList`]).
    Regions = 0x42,
    /// Reply to open owner: the owner id.
    OwnerOpened = 0x43,
    /// Reply: success with one value.
    Ok = 0x44,
    /// Reply to acquire ([`Granted`]).
    LeaseGranted = 0x45,
    /// Reply to pin ([`Granted`]).
    Pinned = 0x46,
    /// Progress of a prepare ([`Progress`]); not a final reply.
    PrepareProgress = 0x47,
    /// Notice: release a lease ([`BreakNotice`]).
    BreakNotice = 0x80,
    /// Notice: a lease was revoked ([`Revoked`]).
    Revoked = 0x81,
    /// Notice: a region was added to the running VM ([`RegionInfo`]). Sent only to guests whose [`Hello`] set
    /// [`hello_flags::REGION_NOTICES`].
    RegionAdded = 0x82,
}

/// [`Hello`] flags: what the guest understands beyond this version's requests and replies.
pub mod hello_flags {
    /// The guest takes [`super::MsgType::RegionAdded`] notices.
    pub const REGION_NOTICES: u32 = 1;
}

impl MsgType {
    /// The type for a wire code, `None` for codes this version does not know.
    pub fn from_u8(v: u8) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0x01 => Hello,
            0x02 => ListRegions,
            0x03 => OpenOwner,
            0x04 => CloseOwner,
            0x05 => Acquire,
            0x06 => Release,
            0x07 => Pin,
            0x08 => Unpin,
            0x09 => Prepare,
            0x0a => OfferReclaim,
            0x0b => Heartbeat,
            0x0c => PinDma,
            0x40 => Error,
            0x41 => HelloReply,
            0x42 => Regions,
            0x43 => OwnerOpened,
            0x44 => Ok,
            0x45 => LeaseGranted,
            0x46 => Pinned,
            0x47 => PrepareProgress,
            0x80 => BreakNotice,
            0x81 => Revoked,
            0x82 => RegionAdded,
            _ => return None,
        })
    }

    /// Guest-to-host requests; the host answers anything else a guest sends with `ENOSYS`.
    pub fn is_request(self) -> bool {
        (self as u8) < 0x40
    }

    /// The payload size of this type; `None` for the region list, whose size depends on its count.
    fn fixed_len(self) -> Option<usize> {
        use MsgType::*;
        Some(match self {
            ListRegions => 0,
            Hello | OwnerOpened | Ok | Heartbeat | CloseOwner => 8,
            Error | HelloReply | Release | Unpin | PrepareProgress => 16,
            OpenOwner => NAME_LEN,
            Pin | PinDma | Prepare | OfferReclaim | LeaseGranted | Pinned => 32,
            Acquire => 40,
            Revoked => 48,
            BreakNotice => 56,
            RegionAdded => REGION_INFO_LEN,
            Regions => return None,
        })
    }
}

/// Lease modes (DESIGN.md, "layout lease").
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseMode {
    /// Breakable: the holder gets a [`BreakNotice`] and releases.
    Shared = 1,
    /// Unbreakable: conflicting changes fail with `ETXTBSY`; required under a pin.
    Exclusive = 2,
}

impl LeaseMode {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(LeaseMode::Shared),
            2 => Some(LeaseMode::Exclusive),
            _ => None,
        }
    }
}

/// Why the host needs a range back (in a [`BreakNotice`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakReason {
    /// Anything this version has no code for.
    Other = 0,
    /// A hole punch.
    Punch = 1,
    /// Zeroing the range.
    Zero = 2,
    /// Shrinking the file under the range.
    Shrink = 3,
    /// A process on the host opened the backing file for writing.
    HostOpen = 4,
    /// The operator evacuates the range.
    Evacuate = 5,
    /// The device is about to be hot-removed: give the whole region back (unmount, sync, release).
    Remove = 6,
    /// A device behind the virtual IOMMU has the range mapped for DMA and the host needs it: stop the DMA there
    /// (the guest's driver then unmaps it). In such a notice `owner` is 0, `lease` is the device's PCI requester
    /// id (bus << 8 | device << 3 | function) and `offset`/`len` is the guest-physical range; nothing is to be
    /// released. At the deadline the host unmaps it itself (later DMA there faults).
    DmaRecall = 7,
}

impl BreakReason {
    /// Unknown codes read as [`BreakReason::Other`]: a newer host may add reasons.
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => BreakReason::Punch,
            2 => BreakReason::Zero,
            3 => BreakReason::Shrink,
            4 => BreakReason::HostOpen,
            5 => BreakReason::Evacuate,
            6 => BreakReason::Remove,
            7 => BreakReason::DmaRecall,
            _ => BreakReason::Other,
        }
    }

    /// The name used in logs and in the Linux agent's hook environment.
    pub fn name(self) -> &'static str {
        match self {
            BreakReason::Other => "other",
            BreakReason::Punch => "punch",
            BreakReason::Zero => "zero",
            BreakReason::Shrink => "shrink",
            BreakReason::DmaRecall => "dma-recall",
            BreakReason::HostOpen => "host-open",
            BreakReason::Evacuate => "evacuate",
            BreakReason::Remove => "remove",
        }
    }
}

/// Region kinds as the guest sees them (the host file's backing kind).
pub mod region_kind {
    /// Page-cache file on the host.
    pub const REGULAR: u32 = 1;
    /// File on a host DAX filesystem.
    pub const FS_DAX: u32 = 2;
    /// Host device-DAX (no layout leases: `EOPNOTSUPP`).
    pub const DEV_DAX: u32 = 3;
    /// tmpfs, memfd or hugetlbfs.
    pub const RAM: u32 = 4;
}

/// [`RegionInfo::flags`] bits.
pub mod region_flags {
    /// The guest maps the region read-only.
    pub const READONLY: u32 = 1 << 0;
    /// The host kernel allows long-term DMA pins of this backing.
    pub const DMA_PINNABLE: u32 = 1 << 1;
}

/// A fixed name field from a string: truncated at [`NAME_LEN`] bytes, NUL-padded.
pub fn name_field(s: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let n = s.len().min(NAME_LEN);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// The text of a name field up to its first NUL; `None` if it is not UTF-8.
pub fn name_str(field: &[u8; NAME_LEN]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    core::str::from_utf8(&field[..end]).ok()
}

/// `Hello` (request): the first message of a session. The host answers [`HelloReply`] with the highest version
/// both speak, or `Error(EPROTONOSUPPORT)` when the ranges do not meet. Other requests before a successful hello
/// are answered `EPROTO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the guest speaks.
    pub min_version: u16,
    /// Highest protocol version the guest speaks.
    pub max_version: u16,
    /// [`hello_flags`] bits (0 from guests that predate them).
    pub flags: u32,
}

/// `HelloReply` (reply to [`Hello`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// The version the session speaks from now on (frames carry it in their header).
    pub version: u16,
    /// Reserved, 0.
    pub reserved: u16,
    /// Largest payload the host accepts ([`MAX_PAYLOAD`]).
    pub max_payload: u32,
    /// The host's id for this session (new on every port open), for logs on both sides.
    pub session: u64,
}

/// `OpenOwner` (request): registers one guest application as an owner of leases and pins. Answered
/// [`Message::OwnerOpened`] with the owner id every later request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOwner {
    /// The application's name, for the operator's listings.
    pub name: [u8; NAME_LEN],
}

/// An owner id and one of its handles (a lease id for `Release`, a pin id for `Unpin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    /// The owner the request acts for (from [`Message::OwnerOpened`]).
    pub owner: u64,
    /// The lease or pin id.
    pub id: u64,
}

/// A range of a region, named by an owner: `Pin`, `Prepare`, `OfferReclaim`.
///
/// Offsets are region-relative; the range must lie inside the region (`ERANGE`); `len` 0 means to the end of the
/// region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// The owner the request acts for.
    pub owner: u64,
    /// The region id (from [`Message::Regions`]).
    pub region: u64,
    /// Region-relative byte offset.
    pub offset: u64,
    /// Length in bytes; 0 = to the end of the region.
    pub len: u64,
}

/// `Acquire` (request): a layout lease on a range. Answered [`Message::LeaseGranted`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquire {
    /// Owner, region and range.
    pub range: RangeRequest,
    /// Shared or exclusive.
    pub mode: LeaseMode,
    /// Reserved, 0.
    pub flags: u32,
}

/// `LeaseGranted` (reply to [`Acquire`]) and `Pinned` (reply to `Pin`): the new handle and the range it covers
/// (with `len` 0 resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// Lease id or pin id.
    pub id: u64,
    /// Region id.
    pub region: u64,
    /// Region-relative offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `Error` (reply to any request, or to a malformed frame with its request id, 0 when unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// A Linux errno value ([`errno`]).
    pub errno: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// For `ETXTBSY`/`EDEADLK`: the owner id that holds the range (0 when none or not known).
    pub holder: u64,
}

/// `PrepareProgress` (sent while a `Prepare` runs, with the request's id; the final answer is [`Message::Ok`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// `BreakNotice` (notice): the host needs `[offset, offset + len)` of the lease back before `deadline_ms`
/// milliseconds from sending. The guest answers by releasing the lease (`Release`); the change proceeds when
/// every holder has released. One notice per lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakNotice {
    /// The break, as the operator sees it.
    pub break_id: u64,
    /// The owner holding the lease.
    pub owner: u64,
    /// The lease to release.
    pub lease: u64,
    /// Its region.
    pub region: u64,
    /// Region-relative offset of the part of the lease the change needs.
    pub offset: u64,
    /// Length of that part.
    pub len: u64,
    /// Time left, in milliseconds, when the notice was sent.
    pub deadline_ms: u32,
    /// A [`BreakReason`] code.
    pub reason: u32,
}

/// `Revoked` (notice): the deadline passed under the `revoke` policy; the lease is gone (its DMA mappings were
/// torn down first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The break that revoked it.
    pub break_id: u64,
    /// The owner that held the lease.
    pub owner: u64,
    /// The lease that no longer exists.
    pub lease: u64,
    /// Its region.
    pub region: u64,
    /// Region-relative offset of the lease.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

/// One region in a [`Message::Regions`] reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The id requests name.
    pub region: u64,
    /// Guest physical address of the region's window.
    pub guest_addr: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// A [`region_kind`] value.
    pub kind: u32,
    /// [`region_flags`] bits.
    pub flags: u32,
    /// The operator's name for the device (`--pmem id=`).
    pub name: [u8; NAME_LEN],
}

impl RegionInfo {
    fn put(&self, w: &mut Put<'_>) {
        w.u64(self.region);
        w.u64(self.guest_addr);
        w.u64(self.size);
        w.u32(self.kind);
        w.u32(self.flags);
        w.bytes(&self.name);
    }

    fn get(r: &mut Get<'_>) -> Self {
        RegionInfo {
            region: r.u64(),
            guest_addr: r.u64(),
            size: r.u64(),
            kind: r.u32(),
            flags: r.u32(),
            name: r.array(),
        }
    }
}

/// The entries of a [`Message::Regions`] reply: either entries to send or the bytes of a received payload,
/// read entry by entry without copying the list.
#[derive(Clone, Copy, Debug)]
pub struct RegionList<'a>(RegionRepr<'a>);

#[derive(Clone, Copy, Debug)]
enum RegionRepr<'a> {
    Entries(&'a [RegionInfo]),
    Wire(&'a [u8]),
}

impl<'a> RegionList<'a> {
    /// A list to encode (at most [`MAX_REGIONS`]; the encoder refuses more).
    pub fn new(entries: &'a [RegionInfo]) -> Self {
        RegionList(RegionRepr::Entries(entries))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self.0 {
            RegionRepr::Entries(e) => e.len(),
            RegionRepr::Wire(b) => b.len() / REGION_INFO_LEN,
        }
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Option<RegionInfo> {
        match self.0 {
            RegionRepr::Entries(e) => e.get(i).copied(),
            RegionRepr::Wire(b) => b
                .get(i * REGION_INFO_LEN..(i + 1) * REGION_INFO_LEN)
                .map(|s| RegionInfo::get(&mut Get::new(s))),
        }
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = RegionInfo> + 'a {
        let list = *self;
        (0..list.len()).filter_map(move |i| list.get(i))
    }
}

impl PartialEq for RegionList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

/// One message of the protocol. See each payload type for its meaning; the variants without one:
/// `ListRegions` (request, no payload; answered [`Message::Regions`]), `CloseOwner` (request: the owner id; releases
/// everything it holds and answers [`Message::Ok`]), `OwnerOpened` (reply: the new owner id), `Ok` (reply: a
/// request succeeded; `value` is 0 except for `Heartbeat`, whose sequence number it echoes), `Heartbeat`
/// (request: a sequence number; proves the session alive both ways).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Message<'a> {
    /// Version negotiation (request).
    Hello(Hello),
    /// The regions the guest may name (request, no payload).
    ListRegions,
    /// Registers an owner (request).
    OpenOwner(OpenOwner),
    /// Closes an owner, releasing all it holds (request).
    CloseOwner {
        /// The owner.
        owner: u64,
    },
    /// Takes a lease (request).
    Acquire(Acquire),
    /// Releases a lease (also the answer to a [`BreakNotice`]). `EBUSY` while pins lie under it.
    Release(Handle),
    /// Pins a range under an exclusive lease of the same owner (`EPERM` otherwise). Answered `Pinned`.
    Pin(RangeRequest),
    /// As [`Message::Pin`], and the host maps exactly the range for its passthrough devices' DMA at the range's
    /// guest physical address until the unpin. Answered `Pinned`.
    PinDma(RangeRequest),
    /// Unpins.
    Unpin(Handle),
    /// Makes a range pinnable (allocates holes, converts unwritten extents); progress notices, then `Ok`.
    Prepare(RangeRequest),
    /// The guest gives a range back: it holds no data there the host must keep; the host may punch it.
    OfferReclaim(RangeRequest),
    /// Liveness check; answered `Ok` with the same value (request).
    Heartbeat {
        /// Echoed in the reply.
        seq: u64,
    },
    /// The request failed (reply).
    Error(ErrorReply),
    /// Hello accepted (reply).
    HelloReply(HelloReply),
    /// The region list (reply).
    Regions(RegionList<'a>),
    /// The new owner's id (reply).
    OwnerOpened {
        /// The owner id later requests name.
        owner: u64,
    },
    /// Success (reply).
    Ok {
        /// 0, or the heartbeat's sequence number.
        value: u64,
    },
    /// The new lease (reply).
    LeaseGranted(Granted),
    /// The new pin (reply).
    Pinned(Granted),
    /// Prepare progress (not a final reply).
    PrepareProgress(Progress),
    /// Release a lease (notice).
    BreakNotice(BreakNotice),
    /// A lease was revoked (notice).
    Revoked(Revoked),
    /// A region was added (notice).
    RegionAdded(RegionInfo),
}

impl Message<'_> {
    /// The type code this message is sent with.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Hello(_) => MsgType::Hello,
            Message::ListRegions => MsgType::ListRegions,
            Message::OpenOwner(_) => MsgType::OpenOwner,
            Message::CloseOwner { .. } => MsgType::CloseOwner,
            Message::Acquire(_) => MsgType::Acquire,
            Message::Release(_) => MsgType::Release,
            Message::Pin(_) => MsgType::Pin,
            Message::PinDma(_) => MsgType::PinDma,
            Message::Unpin(_) => MsgType::Unpin,
            Message::Prepare(_) => MsgType::Prepare,
            Message::OfferReclaim(_) => MsgType::OfferReclaim,
            Message::Heartbeat { .. } => MsgType::Heartbeat,
            Message::Error(_) => MsgType::Error,
            Message::HelloReply(_) => MsgType::HelloReply,
            Message::Regions(_) => MsgType::Regions,
            Message::OwnerOpened { .. } => MsgType::OwnerOpened,
            Message::Ok { .. } => MsgType::Ok,
            Message::LeaseGranted(_) => MsgType::LeaseGranted,
            Message::Pinned(_) => MsgType::Pinned,
            Message::PrepareProgress(_) => MsgType::PrepareProgress,
            Message::BreakNotice(_) => MsgType::BreakNotice,
            Message::Revoked(_) => MsgType::Revoked,
            Message::RegionAdded(_) => MsgType::RegionAdded,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Message::Regions(list) => REGIONS_HEAD_LEN + list.len() * REGION_INFO_LEN,
            m => m.msg_type().fixed_len().unwrap_or(0),
        }
    }

    fn put_payload(&self, w: &mut Put<'_>) {
        fn range(w: &mut Put<'_>, r: &RangeRequest) {
            w.u64(r.owner);
            w.u64(r.region);
            w.u64(r.offset);
            w.u64(r.len);
        }
        fn granted(w: &mut Put<'_>, g: &Granted) {
            w.u64(g.id);
            w.u64(g.region);
            w.u64(g.offset);
            w.u64(g.len);
        }
        match self {
            Message::Hello(h) => {
                w.u16(h.min_version);
                w.u16(h.max_version);
                w.u32(h.flags);
            }
            Message::ListRegions => {}
            Message::OpenOwner(o) => w.bytes(&o.name),
            Message::CloseOwner { owner } => w.u64(*owner),
            Message::Acquire(a) => {
                range(w, &a.range);
                w.u32(a.mode as u32);
                w.u32(a.flags);
            }
            Message::Release(h) | Message::Unpin(h) => {
                w.u64(h.owner);
                w.u64(h.id);
            }
            Message::Pin(r)
            | Message::PinDma(r)
            | Message::Prepare(r)
            | Message::OfferReclaim(r) => range(w, r),
            Message::Heartbeat { seq } => w.u64(*seq),
            Message::Error(e) => {
                w.u32(e.errno);
                w.u32(e.reserved);
                w.u64(e.holder);
            }
            Message::HelloReply(h) => {
                w.u16(h.version);
                w.u16(h.reserved);
                w.u32(h.max_payload);
                w.u64(h.session);
            }
            Message::Regions(list) => {
                w.u32(list.len() as u32);
                w.u32(0);
                for r in list.iter() {
                    r.put(w);
                }
            }
            Message::OwnerOpened { owner } => w.u64(*owner),
            Message::Ok { value } => w.u64(*value),
            Message::LeaseGranted(g) | Message::Pinned(g) => granted(w, g),
            Message::PrepareProgress(p) => {
                w.u64(p.done);
                w.u64(p.total);
            }
            Message::BreakNotice(n) => {
                w.u64(n.break_id);
                w.u64(n.owner);
                w.u64(n.lease);
                w.u64(n.region);
                w.u64(n.offset);
                w.u64(n.len);
                w.u32(n.deadline_ms);
                w.u32(n.reason);
            }
            Message::Revoked(n) => {
                w.u64(n.break_id);
                w.u64(n.owner);
                w.u64(n.lease);
                w.u64(n.region);
                w.u64(n.offset);
                w.u64(n.len);
            }
            Message::RegionAdded(info) => info.put(w),
        }
    }
}

/// A decoded frame: the message and the request id it carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame<'a> {
    /// The request id (a reply carries its request's id; notices carry 0).
    pub request_id: u32,
    /// The message.
    pub message: Message<'a>,
}

/// Size of the frame [`encode`] writes for `msg`.
pub fn encoded_len(msg: &Message<'_>) -> usize {
    HEADER_LEN + msg.payload_len()
}

/// Writes one frame (header + payload) for `msg` into `out`; returns its length.
pub fn encode(msg: &Message<'_>, request_id: u32, out: &mut [u8]) -> Result<usize, EncodeError> {
    if let Message::Regions(list) = msg {
        if list.len() > MAX_REGIONS {
            return Err(EncodeError::TooManyRegions(list.len()));
        }
    }
    let plen = msg.payload_len();
    let total = HEADER_LEN + plen;
    let frame = out
        .get_mut(..total)
        .ok_or(EncodeError::BufferTooSmall { need: total })?;
    {
        let mut w = Put::new(&mut frame[..HEADER_LEN]);
        w.u32(MAGIC);
        w.bytes(&[VERSION, msg.msg_type() as u8]);
        w.u16(plen as u16);
        w.u32(request_id);
        w.u32(0);
    }
    msg.put_payload(&mut Put::new(&mut frame[HEADER_LEN..]));
    let crc = frame_crc(&frame[..HEADER_LEN], &frame[HEADER_LEN..]);
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(total)
}

/// The frame check: CRC-32 over the header's first 12 bytes (everything but the check itself) and the payload.
pub(crate) fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(header.get(..12).unwrap_or(header));
    c.update(payload);
    c.finish()
}

/// The fields of a header, read without judging them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub magic: u32,
    pub version: u8,
    pub msg_type: u8,
    pub payload_len: u16,
    pub request_id: u32,
    pub crc: u32,
}

impl RawHeader {
    pub(crate) fn read(b: &[u8; HEADER_LEN]) -> Self {
        let mut r = Get::new(b);
        RawHeader {
            magic: r.u32(),
            version: r.array::<1>()[0],
            msg_type: r.array::<1>()[0],
            payload_len: r.u16(),
            request_id: r.u32(),
            crc: r.u32(),
        }
    }
}

/// Decodes the payload of a frame whose header and check were accepted.
pub(crate) fn decode_payload(code: u8, p: &[u8]) -> Result<Message<'_>, DecodeError> {
    let ty = MsgType::from_u8(code).ok_or(DecodeError::UnknownType(code))?;
    let bad_len = DecodeError::BadLength {
        msg_type: code,
        len: p.len() as u16,
    };
    match ty.fixed_len() {
        Some(n) if n != p.len() => return Err(bad_len),
        None => {
            let entries = p.len().checked_sub(REGIONS_HEAD_LEN).ok_or(bad_len)?;
            let mut head = Get::new(p);
            let count = head.u32() as usize;
            if entries % REGION_INFO_LEN != 0 || entries / REGION_INFO_LEN != count {
                return Err(bad_len);
            }
            if head.u32() != 0 {
                return Err(DecodeError::BadField("reserved"));
            }
        }
        Some(_) => {}
    }
    let mut r = Get::new(p);
    fn range(r: &mut Get<'_>) -> RangeRequest {
        RangeRequest {
            owner: r.u64(),
            region: r.u64(),
            offset: r.u64(),
            len: r.u64(),
        }
    }
    fn granted(r: &mut Get<'_>) -> Granted {
        Granted {
            id: r.u64(),
            region: r.u64(),
            offset: r.u64(),
            len: r.u64(),
        }
    }
    fn handle(r: &mut Get<'_>) -> Handle {
        Handle {
            owner: r.u64(),
            id: r.u64(),
        }
    }
    Ok(match ty {
        MsgType::Hello => Message::Hello(Hello {
            min_version: r.u16(),
            max_version: r.u16(),
            flags: r.u32(),
        }),
        MsgType::ListRegions => Message::ListRegions,
        MsgType::OpenOwner => Message::OpenOwner(OpenOwner { name: r.array() }),
        MsgType::CloseOwner => Message::CloseOwner { owner: r.u64() },
        MsgType::Acquire => {
            let range = range(&mut r);
            let mode = LeaseMode::from_u32(r.u32()).ok_or(DecodeError::BadField("mode"))?;
            Message::Acquire(Acquire {
                range,
                mode,
                flags: r.u32(),
            })
        }
        MsgType::Release => Message::Release(handle(&mut r)),
        MsgType::Pin => Message::Pin(range(&mut r)),
        MsgType::PinDma => Message::PinDma(range(&mut r)),
        MsgType::Unpin => Message::Unpin(handle(&mut r)),
        MsgType::Prepare => Message::Prepare(range(&mut r)),
        MsgType::OfferReclaim => Message::OfferReclaim(range(&mut r)),
        MsgType::Heartbeat => Message::Heartbeat { seq: r.u64() },
        MsgType::Error => Message::Error(ErrorReply {
            errno: r.u32(),
            reserved: r.u32(),
            holder: r.u64(),
        }),
        MsgType::HelloReply => Message::HelloReply(HelloReply {
            version: r.u16(),
            reserved: r.u16(),
            max_payload: r.u32(),
            session: r.u64(),
        }),
        MsgType::Regions => Message::Regions(RegionList(RegionRepr::Wire(
            p.get(REGIONS_HEAD_LEN..).unwrap_or(&[]),
        ))),
        MsgType::OwnerOpened => Message::OwnerOpened { owner: r.u64() },
        MsgType::Ok => Message::Ok { value: r.u64() },
        MsgType::LeaseGranted => Message::LeaseGranted(granted(&mut r)),
        MsgType::Pinned => Message::Pinned(granted(&mut r)),
        MsgType::PrepareProgress => Message::PrepareProgress(Progress {
            done: r.u64(),
            total: r.u64(),
        }),
        MsgType::BreakNotice => Message::BreakNotice(BreakNotice {
            break_id: r.u64(),
            owner: r.u64(),
            lease: r.u64(),
            region: r.u64(),
            offset: r.u64(),
            len: r.u64(),
            deadline_ms: r.u32(),
            reason: r.u32(),
        }),
        MsgType::Revoked => Message::Revoked(Revoked {
            break_id: r.u64(),
            owner: r.u64(),
            lease: r.u64(),
            region: r.u64(),
            offset: r.u64(),
            len: r.u64(),
        }),
        MsgType::RegionAdded => Message::RegionAdded(RegionInfo::get(&mut r)),
    })
}

/// Decodes one whole frame at the start of `buf`: the frame and how many bytes it took. Every check the stream
/// reader makes, made at once; for a byte stream use [`super::FrameReader`], which also resynchronises.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), DecodeError> {
    let head: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Incomplete)?;
    let h = RawHeader::read(head);
    if h.magic != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let plen = h.payload_len as usize;
    if plen > MAX_PAYLOAD {
        return Err(DecodeError::TooLong(h.payload_len));
    }
    let payload = buf
        .get(HEADER_LEN..HEADER_LEN + plen)
        .ok_or(DecodeError::Incomplete)?;
    if frame_crc(head, payload) != h.crc {
        return Err(DecodeError::BadCheck);
    }
    if h.version != VERSION {
        return Err(DecodeError::BadVersion(h.version));
    }
    let message = decode_payload(h.msg_type, payload)?;
    Ok((
        Frame {
            request_id: h.request_id,
            message,
        },
        HEADER_LEN + plen,
    ))
}

impl DecodeError {
    /// The errno the host answers this with.
    pub fn errno(&self) -> u32 {
        match self {
            DecodeError::TooLong(_) => errno::EMSGSIZE,
            DecodeError::BadVersion(_) => errno::EPROTONOSUPPORT,
            DecodeError::UnknownType(_) => errno::ENOSYS,
            DecodeError::BadField(_) => errno::EINVAL,
            DecodeError::Incomplete
            | DecodeError::BadMagic
            | DecodeError::BadCheck
            | DecodeError::BadLength { .. }
            | DecodeError::Garbage { .. } => errno::EPROTO,
        }
    }
}
