//! The agent protocol: how a guest agent and daxvisor talk over the virtio-console port
//! [`PORT_NAME`] (docs/agent-protocol.md is the prose version of this module).
//!
//! A session is one opening of the port by the guest. Frames are a 16-byte header and a fixed-layout
//! little-endian payload of at most [`MAX_PAYLOAD`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic [`MAGIC`] (`"DXAG"`) |
//! | 4 | 1 | version ([`VERSION`]) |
//! | 5 | 1 | message type ([`MsgType`]) |
//! | 6 | 2 | payload length |
//! | 8 | 4 | request id (replies echo it; notices carry 0) |
//! | 12 | 4 | CRC-32 of bytes 0..12 and the payload |
//!
//! The guest sends requests, the host answers each with exactly one final reply (a typed success reply or
//! [`Message::Error`] with an errno from [`errno`]), and sends notices ([`Message::BreakNotice`],
//! [`Message::Revoked`]) when it needs a range back. [`encode`] writes frames, [`decode`] reads one from a
//! buffer, and [`FrameReader`] reads a stream, resynchronising after anything malformed.

pub mod crc;
mod message;
#[cfg(test)]
mod proptests;
mod reader;
mod wire;

pub use message::{
    decode, encode, encoded_len, hello_flags, name_field, name_str, region_flags, region_kind,
    Acquire, BreakNotice, BreakReason, ErrorReply, Frame, Granted, Handle, Hello, HelloReply,
    LeaseMode, Message, MsgType, OpenOwner, Progress, RangeRequest, RegionInfo, RegionList,
    Revoked, MAX_REGIONS, NAME_LEN, REGION_INFO_LEN,
};
pub use reader::{FrameReader, ReadEvent, ReaderStats};

/// The name of the virtio-console port that carries the protocol (the guest sees
/// `/dev/virtio-ports/org.daxvisor.agent.0`).
pub const PORT_NAME: &str = "org.daxvisor.agent.0";

/// `"DXAG"` little-endian: the first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DXAG");

/// The protocol version this code speaks (the only one so far).
pub const VERSION: u8 = 1;

/// Size of the frame header.
pub const HEADER_LEN: usize = 16;

/// Largest payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 4096;

/// Largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// Error codes in [`ErrorReply::errno`]: Linux x86-64 errno values, so a Linux agent can hand them to
/// applications as they are.
pub mod errno {
    /// The owner may not do this (pin without an exclusive lease; another owner's lease or pin).
    pub const EPERM: u32 = 1;
    /// Unknown region, owner, lease or pin.
    pub const ENOENT: u32 = 2;
    /// Host I/O error.
    pub const EIO: u32 = 5;
    /// A break is in progress on the range: no new leases there until it ends.
    pub const EAGAIN: u32 = 11;
    /// The session's limits (owners, leases) are reached.
    pub const ENOMEM: u32 = 12;
    /// A lease with pins under it; a range already DMA-mapped.
    pub const EBUSY: u32 = 16;
    /// The region is being removed: no new leases or pins on it.
    pub const ENODEV: u32 = 19;
    /// A malformed field (bad mode, reserved bits set, no owner).
    pub const EINVAL: u32 = 22;
    /// The range is held by another owner's pin or exclusive lease.
    pub const ETXTBSY: u32 = 26;
    /// No space to prepare the range.
    pub const ENOSPC: u32 = 28;
    /// The range lies outside the region.
    pub const ERANGE: u32 = 34;
    /// The requester holds the range itself.
    pub const EDEADLK: u32 = 35;
    /// A message type the host does not handle (unknown, or not a request).
    pub const ENOSYS: u32 = 38;
    /// A frame that is not one (bad check, bad length for its type), or a request before hello.
    pub const EPROTO: u32 = 71;
    /// A payload longer than [`super::MAX_PAYLOAD`].
    pub const EMSGSIZE: u32 = 90;
    /// A frame or hello version the host does not speak.
    pub const EPROTONOSUPPORT: u32 = 93;
    /// Not supported on this region (device-DAX has no layout leases; a DMA pin the host kernel refuses).
    pub const EOPNOTSUPP: u32 = 95;
    /// A break deadline passed.
    pub const ETIMEDOUT: u32 = 110;

    /// The symbolic name, "EUNKNOWN" for codes not listed here.
    pub fn name(e: u32) -> &'static str {
        match e {
            EPERM => "EPERM",
            ENOENT => "ENOENT",
            EIO => "EIO",
            EAGAIN => "EAGAIN",
            ENOMEM => "ENOMEM",
            EBUSY => "EBUSY",
            ENODEV => "ENODEV",
            EINVAL => "EINVAL",
            ETXTBSY => "ETXTBSY",
            ENOSPC => "ENOSPC",
            ERANGE => "ERANGE",
            EDEADLK => "EDEADLK",
            ENOSYS => "ENOSYS",
            EPROTO => "EPROTO",
            EMSGSIZE => "EMSGSIZE",
            EPROTONOSUPPORT => "EPROTONOSUPPORT",
            EOPNOTSUPP => "EOPNOTSUPP",
            ETIMEDOUT => "ETIMEDOUT",
            _ => "EUNKNOWN",
        }
    }
}

/// Why bytes are not a frame (or not a usable one). [`DecodeError::errno`] is what the host answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header or its payload length ([`decode`] only; the reader waits instead).
    Incomplete,
    /// The buffer does not start with [`MAGIC`] ([`decode`] only).
    BadMagic,
    /// Bytes that were not part of any frame, dropped while looking for a magic.
    Garbage {
        /// How many.
        skipped: u32,
    },
    /// The header claims a payload over [`MAX_PAYLOAD`].
    TooLong(u16),
    /// The CRC does not match: not a frame (or a damaged one).
    BadCheck,
    /// A version this code does not speak.
    BadVersion(u8),
    /// A type code this version does not know.
    UnknownType(u8),
    /// A payload length that does not fit its type.
    BadLength {
        /// The type code.
        msg_type: u8,
        /// The length it came with.
        len: u16,
    },
    /// A field with a value outside its set.
    BadField(&'static str),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Incomplete => f.write_str("incomplete frame"),
            DecodeError::BadMagic => f.write_str("no frame magic"),
            DecodeError::Garbage { skipped } => write!(f, "{skipped} bytes outside any frame"),
            DecodeError::TooLong(n) => write!(f, "payload length {n} over {MAX_PAYLOAD}"),
            DecodeError::BadCheck => f.write_str("frame check mismatch"),
            DecodeError::BadVersion(v) => write!(f, "protocol version {v} not spoken"),
            DecodeError::UnknownType(t) => write!(f, "unknown message type {t:#04x}"),
            DecodeError::BadLength { msg_type, len } => {
                write!(
                    f,
                    "payload length {len} wrong for message type {msg_type:#04x}"
                )
            }
            DecodeError::BadField(name) => write!(f, "invalid value in field {name}"),
        }
    }
}

/// Why a frame could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is shorter than the frame.
    BufferTooSmall {
        /// The frame's length.
        need: usize,
    },
    /// A region list longer than [`MAX_REGIONS`].
    TooManyRegions(usize),
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::BufferTooSmall { need } => write!(f, "frame needs {need} bytes"),
            EncodeError::TooManyRegions(n) => write!(f, "{n} regions, at most {MAX_REGIONS} fit"),
        }
    }
}
