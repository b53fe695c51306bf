//! Request bodies and queries: axum's extractors, with every rejection turned into the API's JSON error naming
//! the problem (malformed JSON, a body that is not a JSON object, an unknown field, a wrong type, a body over
//! the size bound, a body that does not arrive within [`super::limits::BODY_TIMEOUT`]).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body the API reads.
pub const MAX_BODY: usize = 16 * 1024;

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`",
            ));
        }
        let limits = req
            .extensions()
            .get::<std::sync::Arc<super::limits::LimitCounts>>()
            .cloned();
        // Until the body is in, this request does nothing for anyone: its connection may be closed for a
        // new client.
        let reading = req
            .extensions()
            .get::<super::limits::ConnBusy>()
            .map(super::limits::ConnBusy::reading);
        let read = Bytes::from_request(req, state);
        let read = tokio::time::timeout(super::limits::BODY_TIMEOUT, read).await;
        drop(reading);
        let bytes = match read {
            Ok(r) => r.map_err(bytes_rejection)?,
            Err(_) => {
                if let Some(l) = limits {
                    l.body_timeouts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s of its headers",
                        super::limits::BODY_TIMEOUT.as_secs()
                    ),
                )
                .closing());
            }
        };
        parse_body(&bytes).map(ApiJson)
    }
}

/// A request body's bytes into `T`, or the API's error naming what is wrong (malformed JSON, an unknown field, a
/// wrong type): what every handler taking a JSON body runs on it (and what the fuzz target `api_json` calls).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body is an object: serde would take an array for a struct, field by field (`[1,2]` as
    // `{"offset":1,"length":2}`).
    if let Some(&first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        if first != b'{' {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object ({...})",
            ));
        }
    }
    match Json::<T>::from_bytes(bytes) {
        Ok(Json(v)) => Ok(v),
        Err(r) => Err(ApiError::bad_request(r.body_text())),
    }
}

/// `application/json` or `application/*+json`, as axum's `Json` extractor accepts.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(mime) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
    else {
        return false;
    };
    mime.type_() == "application"
        && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"))
}

fn bytes_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        )
    } else {
        ApiError::bad_request(r.body_text())
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::bad_request(r.body_text())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;
    use crate::api::changes::ChangeBody;

    #[test]
    fn a_body_parses_or_is_refused_with_a_400_naming_the_problem() {
        let ok: ChangeBody = parse_body(br#"{"offset":4096}"#).unwrap();
        assert_eq!((ok.offset, ok.length), (4096, 0));
        let cases: [(&[u8], &str); 7] = [
            (b"{not json", "JSON"),
            (br#"{"offset":0,"bogus":1}"#, "unknown field `bogus`"),
            (br#"{"offset":"zero"}"#, "invalid type"),
            (b"", "EOF"),
            (b" [4096, 4096]", "must be a JSON object"),
            (b"4096", "must be a JSON object"),
            (br#""offset""#, "must be a JSON object"),
        ];
        for (body, want) in cases {
            let e = parse_body::<ChangeBody>(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.body.error.contains(want), "{want}: {}", e.body.error);
        }
    }

    #[test]
    fn json_and_plus_json_content_types_are_json() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
