//! Property tests of the codec and the stream reader: every message round-trips through encode/decode and
//! through the reader however the stream is cut, and no byte sequence makes either panic or lose a later frame.

use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// The generated parts of one message (which variant, region entries, u64 and u32 fields, a name, a range, a
/// grant); [`build`] borrows the message from them.
type Parts = (
    u8,
    Vec<RegionInfo>,
    [u64; 6],
    [u32; 4],
    [u8; NAME_LEN],
    RangeRequest,
    Granted,
);

fn range() -> impl Strategy<Value = RangeRequest> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(owner, region, offset, len)| RangeRequest {
            owner,
            region,
            offset,
            len,
        },
    )
}

fn granted() -> impl Strategy<Value = Granted> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(id, region, offset, len)| Granted {
            id,
            region,
            offset,
            len,
        },
    )
}

fn region_info() -> impl Strategy<Value = RegionInfo> {
    (
        any::<[u64; 3]>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u8; NAME_LEN]>(),
    )
        .prop_map(
            |([region, guest_addr, size], kind, flags, name)| RegionInfo {
                region,
                guest_addr,
                size,
                kind,
                flags,
                name,
            },
        )
}

/// Every message the protocol has; the region list's entries live in the returned vector.
fn message_parts() -> impl Strategy<Value = Parts> {
    (
        0u8..22,
        proptest::collection::vec(region_info(), 0..=MAX_REGIONS),
        any::<[u64; 6]>(),
        any::<[u32; 4]>(),
        any::<[u8; NAME_LEN]>(),
        range(),
        granted(),
    )
}

fn build<'a>((which, regions, u, w, name, r, g): &'a Parts) -> Message<'a> {
    let mode = if w[0] & 1 == 0 {
        LeaseMode::Shared
    } else {
        LeaseMode::Exclusive
    };
    match which {
        0 => Message::Hello(Hello {
            min_version: w[0] as u16,
            max_version: w[1] as u16,
            flags: w[2],
        }),
        1 => Message::ListRegions,
        2 => Message::OpenOwner(OpenOwner { name: *name }),
        3 => Message::CloseOwner { owner: u[0] },
        4 => Message::Acquire(Acquire {
            range: *r,
            mode,
            flags: w[1],
        }),
        5 => Message::Release(Handle {
            owner: u[0],
            id: u[1],
        }),
        6 => Message::Pin(*r),
        7 => Message::Unpin(Handle {
            owner: u[0],
            id: u[1],
        }),
        8 => Message::Prepare(*r),
        9 => Message::OfferReclaim(*r),
        10 => Message::Heartbeat { seq: u[0] },
        11 => Message::Error(ErrorReply {
            errno: w[0],
            reserved: w[1],
            holder: u[0],
        }),
        12 => Message::HelloReply(HelloReply {
            version: w[0] as u16,
            reserved: w[1] as u16,
            max_payload: w[2],
            session: u[0],
        }),
        13 => Message::Regions(RegionList::new(regions)),
        14 => Message::OwnerOpened { owner: u[0] },
        15 => Message::Ok { value: u[0] },
        16 => Message::LeaseGranted(*g),
        17 => Message::Pinned(*g),
        18 => Message::PrepareProgress(Progress {
            done: u[0],
            total: u[1],
        }),
        19 => Message::BreakNotice(BreakNotice {
            break_id: u[0],
            owner: u[1],
            lease: u[2],
            region: u[3],
            offset: u[4],
            len: u[5],
            deadline_ms: w[0],
            reason: w[1],
        }),
        20 if !regions.is_empty() => Message::RegionAdded(regions[0]),
        _ => Message::Revoked(Revoked {
            break_id: u[0],
            owner: u[1],
            lease: u[2],
            region: u[3],
            offset: u[4],
            len: u[5],
        }),
    }
}

proptest! {
    #[test]
    fn every_message_round_trips(parts in message_parts(), id in any::<u32>()) {
        let msg = build(&parts);
        let mut buf = [0u8; MAX_FRAME];
        let n = encode(&msg, id, &mut buf).unwrap();
        prop_assert_eq!(n, encoded_len(&msg));
        prop_assert!(n <= MAX_FRAME);
        let (frame, used) = decode(&buf[..n]).unwrap();
        prop_assert_eq!(used, n);
        prop_assert_eq!(frame.request_id, id);
        prop_assert_eq!(frame.message, msg);
    }

    #[test]
    fn frames_cut_anywhere_come_out_of_the_reader_in_order(
        parts in proptest::collection::vec(message_parts(), 1..6),
        cuts in proptest::collection::vec(1usize..300, 1..40),
    ) {
        let msgs: Vec<Message<'_>> = parts.iter().map(build).collect();
        let mut stream = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let mut buf = [0u8; MAX_FRAME];
            let n = encode(m, i as u32, &mut buf).unwrap();
            stream.extend_from_slice(&buf[..n]);
        }
        let mut r = FrameReader::new();
        let mut seen = 0usize;
        let mut at = 0usize;
        let mut cut = cuts.iter().cycle();
        while at < stream.len() {
            let step = (*cut.next().unwrap()).min(stream.len() - at);
            let mut piece = &stream[at..at + step];
            at += step;
            while !piece.is_empty() {
                let took = r.push(piece);
                piece = &piece[took..];
                while let Some(ev) = r.next_event() {
                    match ev {
                        ReadEvent::Frame(f) => {
                            prop_assert_eq!(f.request_id as usize, seen);
                            prop_assert_eq!(f.message, msgs[seen]);
                            seen += 1;
                        }
                        ReadEvent::Malformed { error, .. } => prop_assert!(false, "spurious {:?}", error),
                    }
                }
            }
        }
        prop_assert_eq!(seen, msgs.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = decode(&bytes);
        // Also with a real magic in front, so the later checks get exercised.
        let mut b = MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&bytes);
        let _ = decode(&b);
    }

    #[test]
    fn garbage_never_panics_the_reader_nor_hides_the_frame_after_it(
        garbage in proptest::collection::vec(any::<u8>(), 0..9000),
        with_magic in any::<bool>(),
    ) {
        let mut r = FrameReader::new();
        let mut junk = Vec::new();
        if with_magic {
            junk.extend_from_slice(&MAGIC.to_le_bytes());
        }
        junk.extend_from_slice(&garbage);
        // A peer that lost sync pads with a full frame's worth of zeros before its next frame, so even a
        // truncated frame claiming the largest payload is complete (and fails its check) before it.
        junk.extend_from_slice(&[0u8; MAX_FRAME]);
        let mut good = [0u8; MAX_FRAME];
        let gn = encode(&Message::Heartbeat { seq: 42 }, 77, &mut good).unwrap();
        junk.extend_from_slice(&good[..gn]);
        let mut piece = &junk[..];
        let mut found = false;
        let mut events = 0usize;
        while !piece.is_empty() {
            let took = r.push(piece);
            piece = &piece[took..];
            while let Some(ev) = r.next_event() {
                events += 1;
                if let ReadEvent::Frame(f) = ev {
                    if f.request_id == 77 && f.message == (Message::Heartbeat { seq: 42 }) {
                        found = true;
                    }
                }
            }
        }
        prop_assert!(found, "the good frame after the garbage was lost");
        // Reports are bounded by the input: at most one per four bytes (each needs its own magic).
        prop_assert!(events <= junk.len() / 4 + 2);
        prop_assert!(r.buffered() <= MAX_FRAME);
    }
}
