//! The event log: what happened to leases, breaks, layout changes, limits and the host guard, in order. The
//! last [`HISTORY`] events are kept for `GET /events`; followers get every new one as it happens.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// Events kept for readers that were not following.
pub const HISTORY: usize = 1024;
/// Events a slow follower may fall behind by before it is told it lost some.
const FOLLOW_BUFFER: usize = 256;

/// One thing that happened. `kind` is one of: `api-started`, `lease-acquired`, `lease-released` (the
/// operator's leases), `change-started`, `break-started`, `holder-released`, `holder-revoked`, `change-done`,
/// `change-refused` (operator changes), `break-notice`, `revoked` (every break, whoever started it), `guard`
/// (a foreign open of a backing file), `rate-limit-set`, `stop-requested`, `events-lost` (a slow follower).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: String,
    /// The region, as the operator named it, when the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Owners the event is about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<u64>,
    /// The errno name, for refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// One line in words.
    pub message: String,
}

/// What a producer says; the log stamps `seq` and `at_ms`.
#[derive(Clone, Debug, Default)]
pub struct NewEvent {
    pub kind: &'static str,
    pub region: Option<String>,
    pub owners: Vec<u64>,
    pub errno: Option<String>,
    pub message: String,
}

#[derive(Debug)]
pub struct EventLog {
    state: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            state: Mutex::new((0, VecDeque::new())),
            tx: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }
}

impl EventLog {
    pub fn push(&self, e: NewEvent) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // The history lock is held while broadcasting so followers see events in `seq` order.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        let ev = Event {
            seq: st.0,
            at_ms,
            kind: e.kind.to_owned(),
            region: e.region,
            owners: e.owners,
            errno: e.errno,
            message: e.message,
        };
        tracing::info!(
            kind = e.kind,
            region = ev.region.as_deref().unwrap_or("-"),
            "{}",
            ev.message
        );
        if st.1.len() == HISTORY {
            st.1.pop_front();
        }
        st.1.push_back(ev.clone());
        // No follower is not an error.
        let _ = self.tx.send(ev);
    }

    /// Events with `seq > after`.
    pub fn since(&self, after: u64) -> Vec<Event> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1.iter().filter(|e| e.seq > after).cloned().collect()
    }

    /// The history and a receiver for everything after it, taken atomically (no event lost or repeated).
    pub fn follow(&self, after: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let history = st.1.iter().filter(|e| e.seq > after).cloned().collect();
        (history, rx)
    }
}

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
        (status = 400, body = super::error::ErrorBody)))]
pub async fn get(
    axum::extract::State(ctx): axum::extract::State<std::sync::Arc<super::context::ApiContext>>,
    super::json::ApiQuery(q): super::json::ApiQuery<EventsQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let after = q.after.unwrap_or(0);
    let header = [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow.unwrap_or(false) {
        let body: String = ctx.events.since(after).iter().map(line).collect();
        return (header, body).into_response();
    }
    let (history, rx) = ctx.events.follow(after);
    let first = futures_util::stream::iter(
        history
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(line(&e))),
    );
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        let text = match rx.recv().await {
            Ok(e) => line(&e),
            Err(broadcast::error::RecvError::Lagged(n)) => line(&Event {
                seq: 0,
                at_ms: 0,
                kind: "events-lost".into(),
                region: None,
                owners: Vec::new(),
                errno: None,
                message: format!("this follower fell behind and lost {n} events"),
            }),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(text), rx))
    });
    use futures_util::StreamExt;
    (header, axum::body::Body::from_stream(first.chain(live))).into_response()
}

fn line(e: &Event) -> String {
    let mut s = serde_json::to_string(e).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_followers_get_what_comes_after_it() {
        let log = EventLog::default();
        for i in 0..(HISTORY + 10) {
            log.push(NewEvent {
                kind: "test",
                message: format!("{i}"),
                ..NewEvent::default()
            });
        }
        let all = log.since(0);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].seq, 11);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let (hist, mut rx) = log.follow(HISTORY as u64 + 8);
        assert_eq!(hist.iter().map(|e| e.seq).collect::<Vec<_>>(), [1033, 1034]);
        log.push(NewEvent {
            kind: "next",
            ..NewEvent::default()
        });
        let e = rx.try_recv().unwrap();
        assert_eq!((e.seq, e.kind.as_str()), (1035, "next"));
    }
}
