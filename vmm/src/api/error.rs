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
    /// The connection is closed after this answer (`Connection: close`): the request was not read whole.
    pub close: bool,
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
            close: false,
        }
    }

    /// This answer closes the connection.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
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
            libc::ETXTBSY
            | libc::EDEADLK
            | libc::EAGAIN
            | libc::EBUSY
            | libc::ETIMEDOUT
            | libc::ENODEV => StatusCode::CONFLICT,
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

impl ApiError {
    /// An action's refusal: 404 for an unknown region or lease, 400 (ERANGE) for a range outside the region,
    /// 400 for other bad input, the mapper's refusal with its errno and holder.
    pub fn from_action(e: crate::actions::ActionError, name_of: impl Fn(u64) -> String) -> Self {
        use crate::actions::ActionError as A;
        match e {
            A::NoRegion { .. } | A::NoLease(_) => ApiError::not_found(e.to_string()),
            A::OutOfRange(msg) => {
                let mut err = ApiError::bad_request(msg);
                err.body.errno = Some("ERANGE".into());
                err
            }
            A::Invalid(msg) => ApiError::bad_request(msg),
            A::Refused(m) => ApiError::from_mapper(&m, name_of),
            A::Internal(msg) => ApiError::internal(msg),
            A::Busy { errno, message } => {
                let mut err = ApiError::new(StatusCode::CONFLICT, message);
                err.body.errno = Some(errno.to_owned());
                err
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.close {
            let close = [(axum::http::header::CONNECTION, "close")];
            return (self.status, close, Json(*self.body)).into_response();
        }
        (self.status, Json(*self.body)).into_response()
    }
}
