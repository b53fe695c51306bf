//! The operator API's JSON request bodies, through the function every handler's body goes through
//! (`daxvisor::api::json::parse_body`, what the `ApiJson` extractor calls after checking the content type and the
//! size bound), for each body type the API takes; then the checks the handlers make next on what parsed (a
//! change's range inside a region, a rate limit's buckets). Nothing may panic; every refusal is a 400 with a
//! message; a body that parses re-serialises to one that parses to the same value.

#![no_main]

use std::fmt::Debug;

use daxvisor::actions::window_range;
use daxvisor::api::changes::ChangeBody;
use daxvisor::api::holds::LeaseBody;
use daxvisor::api::json::{parse_body, MAX_BODY};
use daxvisor::api::reclaim::PolicyBody;
use daxvisor::api::regions::{from_view, RateLimit};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parse `data` as a `T` body: a refusal is a 400 naming the problem; what parses round-trips.
fn body<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    match parse_body::<T>(data) {
        Ok(v) => {
            let again = serde_json::to_vec(&v).expect("a parsed body serialises");
            let back: T = parse_body(&again).expect("a re-serialised body parses");
            assert_eq!(back, v);
            Some(v)
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{e:?}");
            assert!(!e.body.error.is_empty());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The server refuses larger bodies before parsing.
    if data.len() > MAX_BODY {
        return;
    }
    if let Some(c) = body::<ChangeBody>(data) {
        for size in [0, 4096, 1 << 30, u64::MAX] {
            if let Ok((offset, length)) = window_range(size, c.offset, c.length) {
                assert!(offset < size && length <= size - offset);
            }
        }
    }
    body::<LeaseBody>(data);
    body::<PolicyBody>(data);
    if let Some(r) = body::<RateLimit>(data) {
        let _ = from_view(r);
    }
});
