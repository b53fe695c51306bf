//! `GET /events`: the VM's event log ([`crate::events`]) as JSON lines, and its followers.

use serde::Deserialize;
use tokio::sync::broadcast;

use crate::events::{Event, EventKind};

/// `GET /events` query.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events with a larger `seq`.
    #[serde(default)]
    pub after: Option<u64>,
    /// Keep the response open and send each new event as it happens.
    #[serde(default)]
    pub follow: Option<bool>,
}

/// The event log as JSON lines (`application/x-ndjson`), one event per line; with `follow=true` the response
/// stays open (chunked) and every new event is sent as it happens.
#[utoipa::path(get, operation_id = "get_events", path = "/events", tag = "events", params(EventsQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = Event,
        description = "one Event per line"),
        (status = 400, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody, description = "too many followers")))]
pub async fn get(
    axum::extract::State(ctx): axum::extract::State<std::sync::Arc<super::context::ApiContext>>,
    busy: Option<axum::Extension<super::limits::ConnBusy>>,
    super::json::ApiQuery(q): super::json::ApiQuery<EventsQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let after = q.after.unwrap_or(0);
    let header = [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow.unwrap_or(false) {
        let body: String = ctx.events.since(after).iter().map(line).collect();
        return (header, body).into_response();
    }
    let Some(slot) = ctx.limits.follower() else {
        return super::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} clients follow the events already; try again later, or read without follow",
                super::limits::MAX_FOLLOWERS
            ),
        )
        .into_response();
    };
    // The stream holds the follower's place and keeps its connection from being closed for a new client.
    let held = (slot, busy.map(|b| b.0.hold()));
    let (history, rx, follower) = ctx.events.follow(after);
    // The stream ends after `vm-stopped`: a follower reads to a clean end when the VM stops.
    let stopped = history.iter().any(|e| e.kind == EventKind::VmStopped);
    let first = futures_util::stream::iter(
        history
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(line(&e))),
    );
    // The follower token and the API's follower slot live in the stream's state: they go when the stream ends
    // or the client leaves.
    let live = futures_util::stream::unfold(
        (rx, stopped, (follower, held)),
        |(mut rx, stopped, (follower, held))| async move {
            if stopped {
                return None;
            }
            let (text, stopped) = match rx.recv().await {
                Ok(e) => (line(&e), e.kind == EventKind::VmStopped),
                Err(broadcast::error::RecvError::Lagged(n)) => (
                    line(&Event {
                        seq: 0,
                        at_ms: 0,
                        kind: EventKind::EventsLost,
                        region: None,
                        owners: Vec::new(),
                        offset: None,
                        length: None,
                        errno: None,
                        message: format!("this follower fell behind and lost {n} events"),
                    }),
                    false,
                ),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(text), (rx, stopped, (follower, held))))
        },
    );
    use futures_util::StreamExt;
    (header, axum::body::Body::from_stream(first.chain(live))).into_response()
}

fn line(e: &Event) -> String {
    let mut s = serde_json::to_string(e).unwrap_or_default();
    s.push('\n');
    s
}
