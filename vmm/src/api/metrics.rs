//! `GET /metrics`: Prometheus text (prometheus-client). Per region: flush requests, syncs, errors, coalescing,
//! the flush latency histogram, rate-limiter throttles, leases and pins and the bytes under them, guard events.
//! Operator changes: their duration histogram and outcomes. The guest agent channel: sessions and rejected
//! frames. Offer-reclaim: offers received, bytes offered, bytes reclaimed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::context::ApiContext;
use super::error::ApiError;
use super::regions::holds;
use daxvisor_devices::virtio::pmem::metrics::LATENCY_BUCKETS;

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ChangeLabels = Vec<(&'static str, String)>;

/// What the API itself measures (the rest is read from the devices and the mapper at each scrape).
pub struct ApiMetrics {
    change_seconds: Family<ChangeLabels, Histogram>,
    change_outcomes: Family<ChangeLabels, Counter>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            // 1 ms .. ~9 h.
            change_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 13))
            }),
            change_outcomes: Family::default(),
        }
    }
}

impl ApiMetrics {
    /// One operator change (punch, zero, break) ended with `outcome` (done, revoked, conflict, timed_out,
    /// error) after `took`.
    pub fn record_change(
        &self,
        change: &'static str,
        outcome: &'static str,
        took: std::time::Duration,
    ) {
        self.change_seconds
            .get_or_create(&vec![("change", change.to_owned())])
            .observe(took.as_secs_f64());
        self.change_outcomes
            .get_or_create(&vec![
                ("change", change.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }
}

/// A scrape's copy of everything read from the devices and the mapper.
#[derive(Debug)]
struct Sample {
    regions: Vec<RegionSample>,
    breaks_in_progress: u64,
    agent_sessions: u64,
    agent_sessions_total: u64,
    agent_frames_rejected: u64,
    reclaim_offers: u64,
    reclaim_bytes_offered: u64,
    reclaim_bytes_reclaimed: u64,
    limits: LimitSample,
    viommu: Option<ViommuSample>,
}

/// The virtual IOMMU's counters: per endpoint and per region (`ram` for guest RAM), the device's by status.
#[derive(Debug)]
struct ViommuSample {
    endpoints: Vec<(String, crate::viommu::MapCounters, u64)>,
    regions: Vec<(String, crate::viommu::MapCounters)>,
    device: daxvisor_devices::virtio::iommu::IommuMetricsSnapshot,
    recalls: u64,
    fences: u64,
}

impl ViommuSample {
    fn take(v: &crate::viommu::Viommu) -> Self {
        let moment = v.dma.sample();
        let endpoints = v
            .dma
            .endpoints()
            .into_iter()
            .map(|e| {
                let c = moment.endpoints.get(&e.name).copied().unwrap_or_default();
                let pinned = moment.pinned.get(&e.id).copied().unwrap_or_default();
                (e.name.clone(), c, pinned)
            })
            .collect();
        let regions = moment.regions;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ViommuSample {
            endpoints,
            regions: regions.into_iter().collect(),
            device: v.handle.metrics(),
            recalls: load(&v.counters.recalls),
            fences: load(&v.counters.fences),
        }
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Get = fn(&crate::viommu::MapCounters) -> u64;
        let per: [(&str, &str, Get, MetricType); 6] = [
            ("maps", "MAPs accepted", |c| c.maps, MetricType::Counter),
            (
                "unmaps",
                "Mappings removed (UNMAP, DETACH, reset, fence)",
                |c| c.unmaps,
                MetricType::Counter,
            ),
            (
                "mapped_bytes",
                "Bytes mapped right now",
                |c| c.mapped_bytes,
                MetricType::Gauge,
            ),
            (
                "bytes_mapped",
                "Bytes mapped by all MAPs accepted",
                |c| c.mapped_bytes_total,
                MetricType::Counter,
            ),
            (
                "refused",
                "MAPs the host refused (outside RAM and pmem, a pin refused, a range under recall)",
                |c| c.refused,
                MetricType::Counter,
            ),
            (
                "bytes_refused",
                "Bytes of the MAPs the host refused",
                |c| c.refused_bytes,
                MetricType::Counter,
            ),
        ];
        for (suffix, help, get, kind) in per {
            let name = format!("daxvisor_viommu_endpoint_{suffix}");
            let mut family = encoder.encode_descriptor(&name, help, None, kind)?;
            for (ep, c, _) in &self.endpoints {
                let labels = [("endpoint", ep.as_str())];
                let enc = family.encode_family(&labels)?;
                match kind {
                    MetricType::Gauge => ConstGauge::new(get(c) as i64).encode(enc)?,
                    _ => ConstCounter::new(get(c)).encode(enc)?,
                }
            }
            let name = format!("daxvisor_viommu_region_{suffix}");
            let mut family = encoder.encode_descriptor(&name, help, None, kind)?;
            for (region, c) in &self.regions {
                let labels = [("region", region.as_str())];
                let enc = family.encode_family(&labels)?;
                match kind {
                    MetricType::Gauge => ConstGauge::new(get(c) as i64).encode(enc)?,
                    _ => ConstCounter::new(get(c)).encode(enc)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "daxvisor_viommu_endpoint_pinned_bytes",
            "pmem bytes pinned for the endpoint, as the layout-lease manager counts its pins (equals its pmem mapped bytes)",
            None,
            MetricType::Gauge,
        )?;
        for (ep, _, pinned) in &self.endpoints {
            ConstGauge::new(*pinned as i64)
                .encode(family.encode_family(&[("endpoint", ep.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "daxvisor_viommu_requests_answered",
            "virtio-iommu requests answered, by the status the guest read",
            None,
            MetricType::Counter,
        )?;
        for (i, &n) in self.device.by_status.iter().enumerate() {
            let st = daxvisor_devices::virtio::iommu::status::name(i as u8);
            ConstCounter::new(n).encode(family.encode_family(&[("status", st)])?)?;
        }
        let counters: [(&str, &str, u64); 5] = [
            (
                "daxvisor_viommu_unanswerable",
                "virtio-iommu chains with no room for a status",
                self.device.unanswerable,
            ),
            (
                "daxvisor_viommu_recalls",
                "Layout changes that recalled mapped ranges (iommu=recall)",
                self.recalls,
            ),
            (
                "daxvisor_viommu_fences",
                "Recalls that fenced mappings at the deadline",
                self.fences,
            ),
            (
                "daxvisor_viommu_fenced_bytes",
                "Bytes of mappings fenced",
                self.device.fenced_bytes,
            ),
            (
                "daxvisor_viommu_faults_reported",
                "Fault events written to the virtio-iommu event queue",
                self.device.faults_reported,
            ),
        ];
        for (name, help, v) in counters {
            let enc = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(enc)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct RegionSample {
    name: String,
    flush: daxvisor_devices::virtio::pmem::PmemMetricsSnapshot,
    leases: u64,
    pins: u64,
    bytes_leased: u64,
    bytes_pinned: u64,
    guard_events: u64,
    guard_denied: u64,
    reclaim: crate::reclaim::RegionReclaimBytes,
}

/// The API limits' counters ([`super::limits`]).
#[derive(Debug)]
struct LimitSample {
    body_timeouts: u64,
    followers_refused: u64,
    connections_evicted: u64,
    connections_refused: u64,
}

impl Sample {
    fn take(ctx: &ApiContext) -> Self {
        let snap = ctx.mapper.snapshot();
        let regions = ctx
            .regions
            .all()
            .iter()
            .map(|r| {
                let (leases, pins, bytes_leased, bytes_pinned) = holds(&snap, r);
                RegionSample {
                    name: r.name().to_owned(),
                    flush: r.metrics.snapshot(),
                    leases,
                    pins,
                    bytes_leased,
                    bytes_pinned,
                    guard_events: snap.guard_counts.get(&r.id).map_or(0, |c| c.events),
                    guard_denied: snap.guard_counts.get(&r.id).map_or(0, |c| c.denied),
                    reclaim: ctx.reclaim.region_bytes(r.id),
                }
            })
            .collect();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        Sample {
            viommu: ctx.actions.viommu().map(|v| ViommuSample::take(v)),
            regions,
            breaks_in_progress: snap.breaks.len() as u64,
            agent_sessions: load(&ctx.agent.sessions_open),
            agent_sessions_total: load(&ctx.agent.sessions_total),
            agent_frames_rejected: load(&ctx.agent.frames_rejected),
            reclaim_offers: load(&ctx.reclaim.counters.offers),
            reclaim_bytes_offered: load(&ctx.reclaim.counters.bytes_offered),
            reclaim_bytes_reclaimed: load(&ctx.reclaim.counters.bytes_reclaimed),
            limits: LimitSample {
                body_timeouts: load(&ctx.limits.body_timeouts),
                followers_refused: load(&ctx.limits.followers_refused),
                connections_evicted: load(&ctx.limits.connections_evicted),
                connections_refused: load(&ctx.limits.connections_refused),
            },
        }
    }
}

/// One per-region metric: name, help, type, value.
type PerRegion = (&'static str, &'static str, fn(&RegionSample) -> Value);

enum Value {
    Counter(u64),
    CounterF(f64),
    Gauge(i64),
}

const PER_REGION: &[PerRegion] = &[
    (
        "daxvisor_pmem_flush_requests",
        "Flush requests taken from the queue",
        |r| Value::Counter(r.flush.requests),
    ),
    (
        "daxvisor_pmem_flush_syncs",
        "Syncs of the backing (each answers a whole batch)",
        |r| Value::Counter(r.flush.syncs),
    ),
    (
        "daxvisor_pmem_flush_errors",
        "Requests answered with an error or not answerable",
        |r| Value::Counter(r.flush.errors),
    ),
    (
        "daxvisor_pmem_flush_coalesced",
        "Requests answered by a sync they shared with an earlier request of the batch",
        |r| {
            Value::Counter(
                r.flush
                    .requests
                    .saturating_sub(r.flush.errors)
                    .saturating_sub(r.flush.syncs),
            )
        },
    ),
    (
        "daxvisor_pmem_flush_throttled",
        "Flush requests that waited for the rate limiter",
        |r| Value::Counter(r.flush.throttled),
    ),
    (
        "daxvisor_pmem_flush_throttle_wait_seconds",
        "Time flush batches waited for the rate limiter",
        |r| Value::CounterF(r.flush.throttle_wait_us as f64 / 1e6),
    ),
    (
        "daxvisor_pmem_readonly_writes_dropped",
        "Guest writes to a read-only region, dropped",
        |r| Value::Counter(r.flush.readonly_writes_dropped),
    ),
    (
        "daxvisor_guard_events",
        "Foreign accesses of the backing file the host guard saw (opens, and truncates the kernel lease saw)",
        |r| Value::Counter(r.guard_events),
    ),
    (
        "daxvisor_guard_denied",
        "Foreign opens of the backing file the host guard refused (EPERM)",
        |r| Value::Counter(r.guard_denied),
    ),
    ("daxvisor_leases", "Layout leases on the region", |r| {
        Value::Gauge(r.leases as i64)
    }),
    ("daxvisor_pins", "Pins on the region", |r| {
        Value::Gauge(r.pins as i64)
    }),
    ("daxvisor_leased_bytes", "Bytes under layout leases", |r| {
        Value::Gauge(r.bytes_leased as i64)
    }),
    ("daxvisor_pinned_bytes", "Bytes under pins", |r| {
        Value::Gauge(r.bytes_pinned as i64)
    }),
    (
        "daxvisor_region_reclaim_offered_bytes",
        "Bytes the guest offered back for reclaim in the region (accepted offers)",
        |r| Value::Counter(r.reclaim.offered),
    ),
    (
        "daxvisor_region_reclaim_reclaimed_bytes",
        "Bytes of the region's offered ranges punched",
        |r| Value::Counter(r.reclaim.reclaimed),
    ),
];

impl Collector for Sample {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, get) in PER_REGION {
            let Some(first) = self.regions.first() else {
                break;
            };
            let kind = match get(first) {
                Value::Counter(_) | Value::CounterF(_) => MetricType::Counter,
                Value::Gauge(_) => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for r in &self.regions {
                let labels = [("region", r.name.as_str())];
                let enc = family.encode_family(&labels)?;
                match get(r) {
                    Value::Counter(v) => ConstCounter::new(v).encode(enc)?,
                    Value::CounterF(v) => ConstCounter::new(v).encode(enc)?,
                    Value::Gauge(v) => ConstGauge::new(v).encode(enc)?,
                }
            }
        }
        if !self.regions.is_empty() {
            let mut family = encoder.encode_descriptor(
                "daxvisor_pmem_flush_latency_seconds",
                "Flush request arrival to answer",
                None,
                MetricType::Histogram,
            )?;
            for r in &self.regions {
                let labels = [("region", r.name.as_str())];
                let mut enc = family.encode_family(&labels)?;
                // Bucket i holds [2^i, 2^(i+1)) us; the last takes everything slower.
                let buckets: Vec<(f64, u64)> = r
                    .flush
                    .latency_us_log2
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let le = if i + 1 == LATENCY_BUCKETS {
                            f64::MAX
                        } else {
                            (1u64 << (i + 1)) as f64 / 1e6
                        };
                        (le, n)
                    })
                    .collect();
                let count = buckets.iter().map(|b| b.1).sum();
                enc.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    r.flush.latency_sum_us as f64 / 1e6,
                    count,
                    &buckets,
                    None,
                )?;
            }
        }
        let gauges: [(&str, &str, i64); 2] = [
            (
                "daxvisor_breaks_in_progress",
                "Breaks waiting for holders",
                self.breaks_in_progress as i64,
            ),
            (
                "daxvisor_agent_sessions",
                "Guest agent sessions open",
                self.agent_sessions as i64,
            ),
        ];
        for (name, help, v) in gauges {
            let enc = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(enc)?;
        }
        let counters: [(&str, &str, u64); 9] = [
            (
                "daxvisor_api_body_timeouts",
                "Requests whose body did not arrive in time (408, connection closed)",
                self.limits.body_timeouts,
            ),
            (
                "daxvisor_api_followers_refused",
                "Event follow requests over the follower limit (503)",
                self.limits.followers_refused,
            ),
            (
                "daxvisor_api_connections_evicted",
                "Idle connections closed to make room for a new client",
                self.limits.connections_evicted,
            ),
            (
                "daxvisor_api_connections_refused",
                "New connections closed because every connection was busy",
                self.limits.connections_refused,
            ),
            (
                "daxvisor_agent_sessions_started",
                "Guest agent sessions started",
                self.agent_sessions_total,
            ),
            (
                "daxvisor_agent_frames_rejected",
                "Malformed agent frames answered with an error and skipped",
                self.agent_frames_rejected,
            ),
            (
                "daxvisor_reclaim_offers",
                "Ranges guests offered back for reclaim (accepted offers)",
                self.reclaim_offers,
            ),
            (
                "daxvisor_reclaim_offered_bytes",
                "Bytes in accepted reclaim offers",
                self.reclaim_bytes_offered,
            ),
            (
                "daxvisor_reclaim_reclaimed_bytes",
                "Bytes of offered ranges punched",
                self.reclaim_bytes_reclaimed,
            ),
        ];
        for (name, help, v) in counters {
            let enc = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(enc)?;
        }
        if let Some(v) = &self.viommu {
            v.encode(&mut encoder)?;
        }
        let mut info = encoder.encode_descriptor(
            "daxvisor_build_info",
            "The daxvisor serving these metrics: version and commit (always 1)",
            None,
            MetricType::Gauge,
        )?;
        let labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("DAXVISOR_COMMIT")),
        ];
        ConstGauge::new(1).encode(info.encode_family(&labels)?)?;
        Ok(())
    }
}

/// Prometheus metrics.
#[utoipa::path(get, operation_id = "get_metrics", path = "/metrics", tag = "metrics",
    responses((status = 200, content_type = "application/openmetrics-text", body = String,
        description = "Prometheus/OpenMetrics text")))]
pub async fn get(State(ctx): State<Arc<ApiContext>>) -> Result<Response, ApiError> {
    // Every series carries the VM's name: one Prometheus scrapes many VMs of a host.
    let mut registry = Registry::with_labels(
        [(
            std::borrow::Cow::Borrowed("vm"),
            std::borrow::Cow::Owned(ctx.vm_label.clone()),
        )]
        .into_iter(),
    );
    registry.register(
        "daxvisor_change_duration_seconds",
        "Operator layout changes (punch, zero, break), request to answer, breaks included",
        ctx.metrics.change_seconds.clone(),
    );
    registry.register(
        "daxvisor_change_outcomes",
        "Operator layout changes by outcome",
        ctx.metrics.change_outcomes.clone(),
    );
    registry.register_collector(Box::new(Sample::take(&ctx)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    Ok(([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], text).into_response())
}
