//! Arbitrary bytes into the one-shot decoder and, cut at fuzzer-chosen points, into the stream reader: neither may
//! panic, the reader's buffer stays bounded, and a frame the decoder accepts re-encodes to the same bytes.
#![no_main]

use daxvisor_proto::agent::{decode, encode, FrameReader, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = decode(data) {
        let mut out = [0u8; MAX_FRAME];
        let n =
            encode(&frame.message, frame.request_id, &mut out).expect("a decoded frame re-encodes");
        assert_eq!(&out[..n], &data[..used]);
    }
    // The first byte picks the piece size, so the fuzzer explores how the stream is cut.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut reader = FrameReader::new();
    for piece in data.chunks(step) {
        let mut rest = piece;
        while !rest.is_empty() {
            let took = reader.push(rest);
            rest = &rest[took..];
            while reader.next_event().is_some() {}
            assert!(reader.buffered() <= MAX_FRAME);
        }
    }
});
