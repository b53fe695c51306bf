//! The API's one error answer: an HTTP status and a JSON body naming the problem, with the errno name and the
//! holder when the mapper refused.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use daxvisor_mapper::MapperError;

/// Who holds a range against a change.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    /// Owner id (as listed by `GET /owners`).
    pub owner: u64,
    /// The owner's name ("operator", an agent session, a DMA context).
    pub name: String,
    /// "pin" or "exclusive lease".
    pub kind: String,
    /// Region-relative byte offset of the held range.
    pub offset: u64,
    /// Length of the held range (0 = to the end).
    pub length: u64,
}

/// Every 4xx/5xx body.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What was wrong, in words.
    pub error: String,
    /// The errno the mapper answered with, when it refused ("ETXTBSY", "ERANGE", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// Who holds the range (ETXTBSY, EDEADLK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    /// Owners that did not release before the deadline (ETIMEDOUT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<u64>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Boxed: errors travel through every handler's `Result`.
    pub body: Box<ErrorBody>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            body: Box::new(ErrorBody {
                error: error.into(),
                errno: None,
                holder: None,
                holders: Vec::new(),
            }),
        }
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }

    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }

    pub fn internal(error: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error)
    }

    /// The mapper's refusal, with `name_of` turning owner ids into names for the holder.
    pub fn from_mapper(e: &MapperError, name_of: impl Fn(u64) -> String) -> Self {
        let errno = e.errno();
        let status = match errno {
            libc::ENOENT => StatusCode::NOT_FOUND,
            libc::EINVAL | libc::ERANGE | libc::EOPNOTSUPP | libc::EPERM => StatusCode::BAD_REQUEST,
            libc::ETXTBSY | libc::EDEADLK | libc::EAGAIN | libc::EBUSY | libc::ETIMEDOUT => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut err = ApiError::new(status, e.to_string());
        err.body.errno = Some(e.errno_name().to_owned());
        match e {
            MapperError::TextBusy {
                holder,
                holder_name,
                kind,
                range,
            } => {
                err.body.holder = Some(Holder {
                    owner: holder.to_raw(),
                    name: holder_name.clone(),
                    kind: kind.to_string(),
                    offset: range.start,
                    length: super::range_len(range),
                })
            }
            MapperError::Deadlock {
                holder,
                kind,
                range,
            } => {
                let owner = holder.to_raw();
                err.body.holder = Some(Holder {
                    owner,
                    name: name_of(owner),
                    kind: kind.to_string(),
                    offset: range.start,
                    length: super::range_len(range),
                })
            }
            MapperError::TimedOut { holders, .. } => {
                err.body.holders = holders.iter().map(|h| h.to_raw()).collect();
            }
            _ => {}
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(*self.body)).into_response()
    }
}
