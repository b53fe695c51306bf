//! The stream reader: turns the bytes of a port, in whatever pieces they arrive, into frames, and recovers from
//! anything else.
//!
//! Rules (docs/agent-protocol.md, "Resynchronisation"):
//! - bytes before a magic are garbage: dropped, counted, reported once per run;
//! - a header whose length is over [`MAX_PAYLOAD`], or a frame whose check fails, was not a frame: its magic is
//!   dropped and the search for the next magic starts at the byte after it (so a real frame that a truncated one
//!   swallowed is still found);
//! - a frame whose check passes but whose version, type, length or fields are wrong was a real frame from a
//!   confused peer: it is skipped whole and reported with its request id.
//!
//! The buffer holds one largest frame ([`MAX_FRAME`]); nothing else is ever allocated.

use super::message::{decode_payload, frame_crc, Frame, RawHeader};
use super::{DecodeError, HEADER_LEN, MAGIC, MAX_FRAME, MAX_PAYLOAD, VERSION};

/// What the reader found next.
#[derive(Debug, PartialEq)]
pub enum ReadEvent<'a> {
    /// A well-formed frame.
    Frame(Frame<'a>),
    /// Something that was not a usable frame. `request_id` is the frame's when its header was readable, else 0.
    Malformed {
        /// The request id to answer with an error.
        request_id: u32,
        /// What was wrong.
        error: DecodeError,
    },
}

/// Counters of one reader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Well-formed frames returned.
    pub frames: u64,
    /// Malformed frames and garbage runs reported.
    pub malformed: u64,
    /// Bytes dropped while resynchronising.
    pub skipped_bytes: u64,
}

/// Reassembles frames from a byte stream. See the module documentation for the recovery rules.
pub struct FrameReader {
    buf: [u8; MAX_FRAME],
    len: usize,
    /// Bytes of what [`FrameReader::next_event`] last returned, dropped on the next call (the returned frame
    /// borrows them until then).
    pending: usize,
    /// Dropping bytes after a failure: further garbage is counted but not reported again until a frame passes
    /// its check.
    resyncing: bool,
    stats: ReaderStats,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// An empty reader.
    pub const fn new() -> Self {
        FrameReader {
            buf: [0; MAX_FRAME],
            len: 0,
            pending: 0,
            resyncing: false,
            stats: ReaderStats {
                frames: 0,
                malformed: 0,
                skipped_bytes: 0,
            },
        }
    }

    /// Forgets buffered bytes (a new session); counters are kept.
    pub fn clear(&mut self) {
        self.len = 0;
        self.pending = 0;
        self.resyncing = false;
    }

    /// Counters so far.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.len - self.pending
    }

    /// Takes as many bytes of `data` as fit and returns how many it took. Call [`FrameReader::next_event`] until
    /// it returns `None` before pushing the rest: a full buffer always yields an event.
    pub fn push(&mut self, data: &[u8]) -> usize {
        self.drop_pending();
        let n = data.len().min(MAX_FRAME - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// The next frame or error in the buffered bytes, `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<ReadEvent<'_>> {
        self.drop_pending();
        loop {
            let start = find_magic(&self.buf[..self.len]);
            if start > 0 {
                self.skip(start);
                if !self.resyncing {
                    self.resyncing = true;
                    self.stats.malformed += 1;
                    return Some(ReadEvent::Malformed {
                        request_id: 0,
                        error: DecodeError::Garbage {
                            skipped: start as u32,
                        },
                    });
                }
                continue;
            }
            if self.len < HEADER_LEN {
                return None;
            }
            let head: [u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
            let h = RawHeader::read(&head);
            let plen = h.payload_len as usize;
            if plen > MAX_PAYLOAD {
                if let Some(ev) =
                    self.not_a_frame(h.request_id, DecodeError::TooLong(h.payload_len))
                {
                    return Some(ev);
                }
                continue;
            }
            let total = HEADER_LEN + plen;
            if self.len < total {
                return None;
            }
            if frame_crc(&head, &self.buf[HEADER_LEN..total]) != h.crc {
                if let Some(ev) = self.not_a_frame(h.request_id, DecodeError::BadCheck) {
                    return Some(ev);
                }
                continue;
            }
            // A real frame: whatever is wrong with it, it is skipped whole.
            self.resyncing = false;
            self.pending = total;
            let decoded = if h.version != VERSION {
                Err(DecodeError::BadVersion(h.version))
            } else {
                decode_payload(h.msg_type, &self.buf[HEADER_LEN..total])
            };
            return Some(match decoded {
                Ok(message) => {
                    self.stats.frames += 1;
                    ReadEvent::Frame(Frame {
                        request_id: h.request_id,
                        message,
                    })
                }
                Err(error) => {
                    self.stats.malformed += 1;
                    ReadEvent::Malformed {
                        request_id: h.request_id,
                        error,
                    }
                }
            });
        }
    }

    /// The bytes at the start looked like a header but were not a frame: drop the magic's first byte and look
    /// again from the next one. Reported only when not already resynchronising.
    fn not_a_frame(&mut self, request_id: u32, error: DecodeError) -> Option<ReadEvent<'static>> {
        self.skip(1);
        if self.resyncing {
            return None;
        }
        self.resyncing = true;
        self.stats.malformed += 1;
        Some(ReadEvent::Malformed { request_id, error })
    }

    fn drop_pending(&mut self) {
        if self.pending > 0 {
            let n = self.pending;
            self.pending = 0;
            self.buf.copy_within(n..self.len, 0);
            self.len -= n;
        }
    }

    fn skip(&mut self, n: usize) {
        let n = n.min(self.len);
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
        self.stats.skipped_bytes += n as u64;
    }
}

/// Where the first magic starts; when there is none, where the longest tail that could begin one starts (so a
/// magic split across two pushes is kept).
fn find_magic(b: &[u8]) -> usize {
    let m = MAGIC.to_le_bytes();
    if let Some(p) = b.windows(4).position(|w| w == m) {
        return p;
    }
    let keep = (1..4)
        .rev()
        .find(|&k| b.len() >= k && b[b.len() - k..] == m[..k])
        .unwrap_or(0);
    b.len() - keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::message::{encode, Message};
    use crate::agent::{errno, Hello};

    fn frame(msg: &Message<'_>, id: u32) -> ([u8; MAX_FRAME], usize) {
        let mut b = [0u8; MAX_FRAME];
        let n = encode(msg, id, &mut b).unwrap();
        (b, n)
    }

    fn hello() -> Message<'static> {
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            flags: 0,
        })
    }

    #[test]
    fn frames_split_into_single_bytes_reassemble() {
        let (b, n) = frame(&Message::Heartbeat { seq: 7 }, 3);
        let mut r = FrameReader::new();
        for (i, byte) in b[..n].iter().enumerate() {
            assert_eq!(r.push(&[*byte]), 1);
            let ev = r.next_event();
            if i + 1 < n {
                assert_eq!(ev, None, "frame complete after {} of {n} bytes", i + 1);
            } else {
                assert_eq!(
                    ev,
                    Some(ReadEvent::Frame(Frame {
                        request_id: 3,
                        message: Message::Heartbeat { seq: 7 }
                    }))
                );
            }
        }
        assert_eq!(r.next_event(), None);
        assert_eq!(r.stats().frames, 1);
    }

    #[test]
    fn garbage_before_a_frame_is_reported_once_and_the_frame_still_read() {
        let (b, n) = frame(&hello(), 9);
        let mut r = FrameReader::new();
        r.push(b"not a frame at all, just noise");
        r.push(&b[..n]);
        assert_eq!(
            r.next_event(),
            Some(ReadEvent::Malformed {
                request_id: 0,
                error: DecodeError::Garbage { skipped: 30 }
            })
        );
        assert!(matches!(r.next_event(), Some(ReadEvent::Frame(f)) if f.request_id == 9));
        assert_eq!(r.next_event(), None);
    }

    #[test]
    fn a_truncated_frame_does_not_swallow_the_frame_after_it() {
        let (acq, _) = frame(
            &Message::Pin(crate::agent::RangeRequest {
                owner: 1,
                region: 2,
                offset: 0,
                len: 0,
            }),
            5,
        );
        let (good, gn) = frame(&Message::Heartbeat { seq: 1 }, 6);
        let mut r = FrameReader::new();
        // Header and 10 of 32 payload bytes, then a whole good frame, then enough good frames to complete the
        // truncated one's claimed length.
        r.push(&acq[..HEADER_LEN + 10]);
        for _ in 0..3 {
            r.push(&good[..gn]);
        }
        assert_eq!(
            r.next_event(),
            Some(ReadEvent::Malformed {
                request_id: 5,
                error: DecodeError::BadCheck
            })
        );
        let mut ids = 0;
        while let Some(ev) = r.next_event() {
            if let ReadEvent::Frame(f) = ev {
                assert_eq!(f.message, Message::Heartbeat { seq: 1 });
                ids += 1;
            }
        }
        assert_eq!(ids, 3);
    }

    #[test]
    fn oversized_and_wrong_version_frames_are_answered_with_their_request_id() {
        let mut r = FrameReader::new();
        let (mut b, n) = frame(&Message::ListRegions, 11);
        b[6..8].copy_from_slice(&((MAX_PAYLOAD as u16) + 1).to_le_bytes());
        r.push(&b[..n]);
        let ev = r.next_event();
        assert_eq!(
            ev,
            Some(ReadEvent::Malformed {
                request_id: 11,
                error: DecodeError::TooLong(MAX_PAYLOAD as u16 + 1)
            })
        );
        // The rest of that header is resync garbage, not reported again.
        assert_eq!(r.next_event(), None);

        // A frame with a valid check but version 2: skipped whole, answered EPROTONOSUPPORT.
        let (mut v2, vn) = frame(&Message::ListRegions, 12);
        v2[4] = 2;
        let crc = frame_crc(&v2[..HEADER_LEN], &[]);
        v2[12..16].copy_from_slice(&crc.to_le_bytes());
        r.push(&v2[..vn]);
        match r.next_event() {
            Some(ReadEvent::Malformed { request_id, error }) => {
                assert_eq!(request_id, 12);
                assert_eq!(error.errno(), errno::EPROTONOSUPPORT);
            }
            other => panic!("expected a version error, got {other:?}"),
        }
        let (h, hn) = frame(&hello(), 13);
        r.push(&h[..hn]);
        assert!(matches!(r.next_event(), Some(ReadEvent::Frame(f)) if f.request_id == 13));
    }

    #[test]
    fn a_magic_split_across_pushes_is_kept() {
        let (b, n) = frame(&hello(), 1);
        let mut r = FrameReader::new();
        r.push(b"xx");
        r.push(&b[..2]);
        assert!(matches!(r.next_event(), Some(ReadEvent::Malformed { .. })));
        assert_eq!(r.next_event(), None);
        r.push(&b[2..n]);
        assert!(matches!(r.next_event(), Some(ReadEvent::Frame(f)) if f.request_id == 1));
    }
}
