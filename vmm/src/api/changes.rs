//! Layout changes the operator asks for: punch, zero, and break (evacuate: holders give the range back, the
//! file is not changed). Each runs through the mapper (pins and exclusive leases refuse it with ETXTBSY naming
//! the holder; shared leases are broken with notice and a deadline; the policy says what happens after it) on
//! a blocking thread, while a watcher reports the break's progress: who was asked, when each released.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use super::error::{ApiError, ErrorBody};
use super::events::NewEvent;
use super::json::ApiJson;
use super::range_len;
use daxvisor_mapper::{BreakPolicy, ChangeRequest, LayoutChange};

/// Longest deadline the API accepts (the mapper's own cap).
pub const MAX_DEADLINE_MS: u64 = 24 * 3600 * 1000;
/// Deadline when the request names none.
pub const DEFAULT_DEADLINE_MS: u64 = 5000;
/// How often the watcher looks at a break in progress: often at first (most holders answer fast), then less
/// (a snapshot copies the tables; a break may wait a day).
const WATCH_FAST: Duration = Duration::from_millis(5);
const WATCH_SLOW: Duration = Duration::from_millis(50);
const WATCH_FAST_FOR: Duration = Duration::from_secs(1);

/// What happens when holders have not released by the deadline.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The change is refused with ETIMEDOUT; nothing changed, leases kept.
    #[default]
    Fail,
    /// The remaining holders' leases are revoked (DMA mappings torn down first) and the change proceeds.
    Revoke,
}

/// A range of a region and how to treat its holders.
impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fail => "fail",
            Policy::Revoke => "revoke",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    /// Region-relative byte offset.
    pub offset: u64,
    /// Bytes; 0 = to the end of the region.
    #[serde(default)]
    pub length: u64,
    /// Milliseconds holders of shared leases get to release (default 5000, at most one day).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub policy: Policy,
}

/// One holder that was asked to release.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HolderOutcome {
    pub owner: u64,
    pub name: String,
    /// Milliseconds from the request to its release, as the API saw it (it looks every 5 ms for the first second,
    /// every 50 ms after); none when revoked.
    #[serde(default)]
    pub released_after_ms: Option<u64>,
    pub revoked: bool,
}

/// The change report: what was checked, who was asked, when each released, how long it all took.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeResult {
    /// "punch", "zero" or "break".
    pub change: String,
    pub region: String,
    pub offset: u64,
    pub length: u64,
    /// The page-rounded range the mapper checked (region-relative).
    pub checked_offset: u64,
    /// 0 = to the end.
    pub checked_length: u64,
    pub holders: Vec<HolderOutcome>,
    pub waited_for_transient: bool,
    pub queued_behind_break: bool,
    pub total_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Punch,
    Zero,
    Break,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Punch => "punch",
            Kind::Zero => "zero",
            Kind::Break => "break",
        }
    }
}

/// Punch a range: deallocate it (it reads back as zeros and its blocks return to the filesystem).
#[utoipa::path(post, operation_id = "punch", path = "/regions/{id}/punch", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "the change was applied"),
        (status = 400, body = ErrorBody, description = "bad request (range outside the region, bad JSON, ...)"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused: ETXTBSY/EDEADLK naming the holder, ETIMEDOUT, EAGAIN")))]
pub async fn punch(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, Kind::Punch).await
}

/// Zero a range, keeping its blocks allocated.
#[utoipa::path(post, operation_id = "zero", path = "/regions/{id}/zero", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "the change was applied"),
        (status = 400, body = ErrorBody, description = "bad request"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused, with errno and holder")))]
pub async fn zero(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, Kind::Zero).await
}

/// Break (evacuate) a range: every holder is asked to give it back; the file is not changed.
#[utoipa::path(post, operation_id = "break_range", path = "/regions/{id}/break", tag = "changes",
    params(("id" = String, Path, description = "region id as given to --pmem")),
    request_body = ChangeBody,
    responses((status = 200, body = ChangeResult, description = "every holder released (or was revoked)"),
        (status = 400, body = ErrorBody, description = "bad request"),
        (status = 404, body = ErrorBody, description = "no such region"),
        (status = 409, body = ErrorBody, description = "refused, with errno and holder")))]
pub async fn evacuate(
    State(ctx): State<Arc<ApiContext>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChangeBody>,
) -> Result<Json<ChangeResult>, ApiError> {
    run(ctx, id, body, Kind::Break).await
}

/// Check the request against the region (nothing is asked of the mapper for bad input); returns the explicit
/// `(offset, length)` inside the window.
pub fn window_range(size: u64, offset: u64, length: u64) -> Result<(u64, u64), ApiError> {
    if offset >= size {
        return Err(range_error(format!(
            "offset {offset:#x} is outside the region (size {size:#x})"
        )));
    }
    let length = if length == 0 { size - offset } else { length };
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok((offset, length)),
        _ => Err(range_error(format!(
            "{offset:#x}+{length:#x} runs past the end of the region (size {size:#x})"
        ))),
    }
}

fn range_error(msg: String) -> ApiError {
    let mut e = ApiError::bad_request(msg);
    e.body.errno = Some("ERANGE".into());
    e
}

async fn run(
    ctx: Arc<ApiContext>,
    name: String,
    body: ChangeBody,
    kind: Kind,
) -> Result<Json<ChangeResult>, ApiError> {
    let reg = ctx.region(&name)?;
    let (offset, length) = window_range(reg.size, body.offset, body.length)?;
    let deadline_ms = body.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS);
    if deadline_ms > MAX_DEADLINE_MS {
        return Err(ApiError::bad_request(format!(
            "deadline_ms {deadline_ms} is above the maximum {MAX_DEADLINE_MS}"
        )));
    }
    let change = match kind {
        Kind::Punch => LayoutChange::Punch {
            off: offset,
            len: length,
        },
        Kind::Zero => LayoutChange::Zero {
            off: offset,
            len: length,
        },
        Kind::Break => LayoutChange::Evacuate {
            off: offset,
            len: length,
        },
    };
    let req = ChangeRequest {
        requester: None,
        deadline: Duration::from_millis(deadline_ms),
        policy: match body.policy {
            Policy::Fail => BreakPolicy::Fail,
            Policy::Revoke => BreakPolicy::Revoke,
        },
        ..ChangeRequest::new(reg.region, change)
    };
    let region = reg.region;
    ctx.event(NewEvent {
        kind: "change-started",
        region: Some(name.clone()),
        message: format!(
            "{} {name} [{offset:#x}, +{length:#x}) deadline {deadline_ms} ms policy {}",
            kind.name(),
            body.policy.name()
        ),
        ..NewEvent::default()
    });
    let start = Instant::now();
    let mapper = ctx.mapper.clone();
    let mut task = tokio::task::spawn_blocking(move || mapper.change(req));
    let mut watch = BreakWatch::new(start, Duration::from_millis(deadline_ms));
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            () = tokio::time::sleep(if start.elapsed() < WATCH_FAST_FOR { WATCH_FAST } else { WATCH_SLOW }) => {
                watch.look(&ctx, region, (offset, length), &name)
            }
        }
    };
    // Releases in the last interval (the change may end right after them); revokes happen at the deadline, where
    // the watcher no longer counts anything as released.
    watch.look(&ctx, region, (offset, length), &name);
    let elapsed = start.elapsed();
    let outcome = result.map_err(|e| ApiError::internal(format!("change task failed: {e}")))?;
    let (label, res) = match outcome {
        Ok(report) => {
            let holders = watch.outcomes(&ctx, &name, &report.notified, &report.revoked);
            let (checked_offset, checked_length) = report
                .range
                .map_or((offset, length), |r| (r.start, range_len(&r)));
            let label = if report.revoked.is_empty() {
                "done"
            } else {
                "revoked"
            };
            ctx.event(NewEvent {
                kind: "change-done",
                region: Some(name.clone()),
                owners: holders.iter().map(|h| h.owner).collect(),
                message: format!(
                    "{} {name} [{offset:#x}, +{length:#x}) done in {} ms ({} holder(s) asked, {} revoked)",
                    kind.name(),
                    elapsed.as_millis(),
                    holders.len(),
                    report.revoked.len()
                ),
                ..NewEvent::default()
            });
            (
                label,
                Ok(Json(ChangeResult {
                    change: kind.name().to_owned(),
                    region: name.clone(),
                    offset,
                    length,
                    checked_offset,
                    checked_length,
                    holders,
                    waited_for_transient: report.waited_for_transient,
                    queued_behind_break: report.queued_behind_break,
                    total_ms: elapsed.as_millis() as u64,
                })),
            )
        }
        Err(e) => {
            let err = ApiError::from_mapper(&e, |o| ctx.owner_name(o));
            let mut owners: Vec<u64> = err.body.holder.iter().map(|h| h.owner).collect();
            owners.extend(&err.body.holders);
            ctx.event(NewEvent {
                kind: "change-refused",
                region: Some(name.clone()),
                owners,
                errno: Some(e.errno_name().to_owned()),
                message: format!(
                    "{} {name} [{offset:#x}, +{length:#x}) refused: {} ({e})",
                    kind.name(),
                    e.errno_name()
                ),
            });
            let label = match e.errno() {
                libc::ETIMEDOUT => "timed_out",
                libc::ETXTBSY | libc::EDEADLK => "conflict",
                _ => "error",
            };
            (label, Err(err))
        }
    };
    ctx.metrics.record_change(kind.name(), label, elapsed);
    res
}

/// Follows the break a change started, from outside the mapper: its holders, and when each gave back the
/// leases it was asked for (before the deadline: what goes at the deadline was revoked).
struct BreakWatch {
    start: Instant,
    deadline: Duration,
    /// Owner -> (name, leases asked for, released after).
    holders: BTreeMap<u64, (String, Vec<u64>, Option<Duration>)>,
    announced: bool,
}

impl BreakWatch {
    fn new(start: Instant, deadline: Duration) -> Self {
        BreakWatch {
            start,
            deadline,
            holders: BTreeMap::new(),
            announced: false,
        }
    }

    fn look(
        &mut self,
        ctx: &ApiContext,
        region: daxvisor_mapper::RegionId,
        (offset, length): (u64, u64),
        name: &str,
    ) {
        let snap = ctx.mapper.snapshot();
        let end = offset.saturating_add(length);
        for b in snap
            .breaks
            .iter()
            .filter(|b| b.region == region && b.range.start < end && b.range.end > offset)
        {
            for (lease, owner) in &b.waiting_on {
                let o = owner.to_raw();
                let entry = self.holders.entry(o).or_insert_with(|| {
                    let n = snap
                        .owner(*owner)
                        .map(|v| v.name.clone())
                        .unwrap_or_default();
                    (n, Vec::new(), None)
                });
                let l = lease.to_raw();
                if !entry.1.contains(&l) {
                    entry.1.push(l);
                }
            }
        }
        if !self.announced && !self.holders.is_empty() {
            self.announced = true;
            ctx.event(NewEvent {
                kind: "break-started",
                region: Some(name.to_owned()),
                owners: self.holders.keys().copied().collect(),
                message: format!(
                    "break of {name} [{offset:#x}, +{length:#x}): waiting on {}",
                    self.names()
                ),
                ..NewEvent::default()
            });
        }
        let elapsed = self.start.elapsed();
        if elapsed >= self.deadline {
            return;
        }
        let held: Vec<u64> = snap.leases().iter().map(|(_, l)| l.id.to_raw()).collect();
        for (o, (n, leases, released)) in &mut self.holders {
            if released.is_none() && !leases.iter().any(|l| held.contains(l)) {
                *released = Some(elapsed);
                ctx.event(NewEvent {
                    kind: "holder-released",
                    region: Some(name.to_owned()),
                    owners: vec![*o],
                    message: format!("owner {o} ({n}) released after {} ms", elapsed.as_millis()),
                    ..NewEvent::default()
                });
            }
        }
    }

    fn names(&self) -> String {
        self.holders
            .iter()
            .map(|(o, (n, _, _))| format!("{o} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every holder the mapper notified, with what the watcher saw of it; revoked holders get an event.
    fn outcomes(
        &self,
        ctx: &ApiContext,
        name: &str,
        notified: &[daxvisor_mapper::OwnerId],
        revoked: &[daxvisor_mapper::OwnerId],
    ) -> Vec<HolderOutcome> {
        let mut owners: Vec<u64> = notified.iter().map(|o| o.to_raw()).collect();
        owners.sort_unstable();
        owners.dedup();
        owners
            .into_iter()
            .map(|o| {
                let was_revoked = revoked.iter().any(|r| r.to_raw() == o);
                let (holder_name, released) = self
                    .holders
                    .get(&o)
                    .map(|(n, _, r)| (n.clone(), *r))
                    .unwrap_or_else(|| (ctx.owner_name(o), None));
                if !was_revoked && released.is_none() {
                    // Released before the watcher ever saw the break.
                    ctx.event(NewEvent {
                        kind: "holder-released",
                        region: Some(name.to_owned()),
                        owners: vec![o],
                        message: format!(
                            "owner {o} ({holder_name}) released within {} ms",
                            self.start.elapsed().as_millis()
                        ),
                        ..NewEvent::default()
                    });
                }
                if was_revoked {
                    ctx.event(NewEvent {
                        kind: "holder-revoked",
                        region: Some(name.to_owned()),
                        owners: vec![o],
                        message: format!(
                            "owner {o} ({holder_name}) did not release by the deadline; its leases were revoked"
                        ),
                        ..NewEvent::default()
                    });
                }
                HolderOutcome {
                    owner: o,
                    name: holder_name,
                    // A release faster than the watcher looks is bounded by the change's end.
                    released_after_ms: (!was_revoked).then(|| {
                        released.unwrap_or_else(|| self.start.elapsed()).as_millis() as u64
                    }),
                    revoked: was_revoked,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_must_lie_inside_the_window_and_length_zero_runs_to_its_end() {
        assert_eq!(window_range(8192, 0, 0).unwrap(), (0, 8192));
        assert_eq!(window_range(8192, 4096, 0).unwrap(), (4096, 4096));
        assert_eq!(window_range(8192, 4096, 4096).unwrap(), (4096, 4096));
        for (off, len) in [(8192, 0), (4096, 4097), (1, u64::MAX), (u64::MAX, 1)] {
            let e = window_range(8192, off, len).unwrap_err();
            assert_eq!(e.body.errno.as_deref(), Some("ERANGE"), "{off} {len}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
