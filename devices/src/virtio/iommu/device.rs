//! The virtio-iommu device model.
//!
//! Requests are answered on the VMM's event loop, in queue order, each with the specification's status code.
//! Domains exist while an endpoint is attached: ATTACH creates one, the last DETACH (or an ATTACH elsewhere) frees
//! it with its mappings (the Linux driver replays its mappings when it attaches a domain again). A mapping of a
//! domain is made for every endpoint attached to it through the [`IommuMapper`]; nothing is recorded unless the
//! mapper accepted it for all of them. What the guest cannot do: map outside guest RAM and pmem (RANGE, the
//! mapper's answer), map over a mapping (INVAL), name a domain or endpoint that does not exist (NOENT), a domain
//! outside `domain_range` or an IOVA outside `input_range` or off the page granule (RANGE), split a mapping with
//! UNMAP (RANGE, nothing removed), or hold more than `max_mappings` mappings (NOMEM). Every answer is counted.
//!
//! The VMM keeps an [`IommuHandle`]: it lists mappings by guest physical range (who maps what the operator wants
//! to change) and fences them (removes them itself, unmaps through the mapper, and reports a fault event per
//! endpoint on the event queue).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::metrics::IommuMetrics;
use super::request::{self, Request};
use super::{
    fault, features, map_flags, probe, req_type, status, IommuMetricsSnapshot, QUEUE_SIZE,
    VIRTIO_ID_IOMMU,
};
use crate::virtio::device::{read_config_bytes, QueueError};
use crate::virtio::{ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt};

/// Fault events kept while the driver has no event buffer posted; older ones are dropped (and counted).
const MAX_PENDING_FAULTS: usize = 64;

/// One mapping as the mapper sees it: for `endpoint`, `[iova, iova + len)` -> guest physical `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// The endpoint (its PCI requester id, as VIOT describes it).
    pub endpoint: u32,
    /// Domain the mapping belongs to.
    pub domain: u32,
    /// First I/O virtual address.
    pub iova: u64,
    /// Length in bytes (a multiple of the page granule, never 0).
    pub len: u64,
    /// Guest physical address the IOVA translates to.
    pub phys: u64,
    /// Whether the endpoint may write (it may always read what is mapped).
    pub write: bool,
}

/// Why the mapper would not map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapRefusal {
    /// The guest physical range is not (entirely) guest RAM or one pmem region: status RANGE.
    #[error("guest physical range is neither guest RAM nor one pmem region")]
    Outside,
    /// The host could not map it (a pin refused, the container refused): status DEVERR.
    #[error("{0}")]
    Failed(String),
    /// Out of a host resource (memlock limit, container limits): status NOMEM.
    #[error("{0}")]
    NoResources(String),
}

impl MapRefusal {
    fn status(&self) -> u8 {
        match self {
            MapRefusal::Outside => status::RANGE,
            MapRefusal::Failed(_) => status::DEVERR,
            MapRefusal::NoResources(_) => status::NOMEM,
        }
    }
}

/// What the VMM does for each mapping: make `[iova, iova + len)` reach `phys` for the endpoint, and undo it.
/// Called with the device's state locked: an implementation must not call back into the device.
pub trait IommuMapper: Send + Sync {
    /// Map; nothing may be left mapped on `Err`.
    fn map(&self, m: &DmaMap) -> Result<(), MapRefusal>;
    /// Remove one mapping made by [`IommuMapper::map`] (errors are the implementation's to log).
    fn unmap(&self, m: &DmaMap);
}

/// What the device advertises and allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// Page sizes the mappings may use; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// IOVAs the endpoints can use, inclusive.
    pub input_range: (u64, u64),
    /// Domain ids the driver may use, inclusive.
    pub domain_range: (u32, u32),
    /// The endpoint ids behind this IOMMU.
    pub endpoints: Vec<u32>,
    /// A guest physical range reported by PROBE as the MSI doorbell (x86: 0xfee00000-0xfeefffff), inclusive.
    pub msi_range: Option<(u64, u64)>,
    /// Most mappings at once, over all domains.
    pub max_mappings: usize,
}

impl IommuConfig {
    fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }

    /// `struct virtio_iommu_config`: page_size_mask, input_range, domain_range, probe_size, bypass.
    fn bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_range.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_range.1.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_range.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_range.1.to_le_bytes());
        b[32..36].copy_from_slice(&probe::SIZE.to_le_bytes());
        // bypass (byte 36) is 0: unattached endpoints do no DMA.
        b
    }
}

/// One mapping of a domain: IOVA `[start, end]` (inclusive, the key is `start`) -> `phys`.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    end: u64,
    phys: u64,
    flags: u32,
}

#[derive(Default)]
struct Domain {
    endpoints: BTreeSet<u32>,
    mappings: BTreeMap<u64, Mapping>,
}

fn dma(endpoint: u32, domain: u32, start: u64, m: &Mapping) -> DmaMap {
    DmaMap {
        endpoint,
        domain,
        iova: start,
        len: m.end - start + 1,
        phys: m.phys,
        write: m.flags & map_flags::WRITE != 0,
    }
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    requests: Queue,
    events: Queue,
}

/// Domains, endpoints and the queues: what the event loop and the VMM's handle share.
struct State {
    /// endpoint -> the domain it is attached to.
    endpoints: BTreeMap<u32, Option<u32>>,
    domains: BTreeMap<u32, Domain>,
    mappings: usize,
    active: Option<Active>,
    faults: VecDeque<[u8; fault::LEN]>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves State consistent; keep serving after a panic elsewhere.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mapping the VMM removed with [`IommuHandle::fence`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fenced {
    /// What was mapped (one entry per endpoint of the domain).
    pub map: DmaMap,
}

/// The VMM's side of the device: list and fence mappings, read metrics. Cheap to clone.
#[derive(Clone)]
pub struct IommuHandle {
    state: Arc<Mutex<State>>,
    mapper: Arc<dyn IommuMapper>,
    metrics: Arc<IommuMetrics>,
    config: Arc<IommuConfig>,
}

impl IommuHandle {
    /// Every live mapping, one per endpoint, by domain and IOVA.
    pub fn mappings(&self) -> Vec<DmaMap> {
        let st = lock(&self.state);
        let mut out = Vec::new();
        for (&d, dom) in &st.domains {
            for (&start, m) in &dom.mappings {
                for &ep in &dom.endpoints {
                    out.push(dma(ep, d, start, m));
                }
            }
        }
        out
    }

    /// The live mappings (one per endpoint) whose guest physical range overlaps `[phys, phys + len)`.
    pub fn mapped_over(&self, phys: u64, len: u64) -> Vec<DmaMap> {
        let end = phys.saturating_add(len);
        self.mappings()
            .into_iter()
            .filter(|m| m.phys < end && phys < m.phys.saturating_add(m.len))
            .collect()
    }

    /// Removes every mapping over `[phys, phys + len)` (whole mappings: a mapping partly over it goes), unmaps
    /// it through the mapper for each endpoint, and reports a fault event per endpoint and mapping on the
    /// event queue so the guest's driver hears that later accesses there fault.
    pub fn fence(&self, phys: u64, len: u64) -> Vec<Fenced> {
        let end = phys.saturating_add(len);
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut removed = 0;
        for (&d, dom) in st.domains.iter_mut() {
            let hit: Vec<u64> = dom
                .mappings
                .iter()
                .filter(|(&s, m)| m.phys < end && phys < m.phys.saturating_add(m.end - s + 1))
                .map(|(&s, _)| s)
                .collect();
            for start in hit {
                let Some(m) = dom.mappings.remove(&start) else {
                    continue;
                };
                removed += 1;
                let len = m.end - start + 1;
                self.metrics.add_fence(len);
                for &ep in &dom.endpoints {
                    let map = dma(ep, d, start, &m);
                    self.mapper.unmap(&map);
                    out.push(Fenced { map });
                }
            }
        }
        st.mappings = st.mappings.saturating_sub(removed);
        for f in &out {
            let mut e = [0u8; fault::LEN];
            e[0] = fault::REASON_MAPPING;
            let flags = fault::FLAG_READ | fault::FLAG_WRITE | fault::FLAG_ADDRESS;
            e[4..8].copy_from_slice(&flags.to_le_bytes());
            e[8..12].copy_from_slice(&f.map.endpoint.to_le_bytes());
            e[16..24].copy_from_slice(&f.map.iova.to_le_bytes());
            if st.faults.len() >= MAX_PENDING_FAULTS {
                st.faults.pop_front();
                self.metrics.add_fault(false);
            }
            st.faults.push_back(e);
        }
        deliver_faults(&mut st, &self.metrics);
        out
    }

    /// Counters.
    pub fn metrics(&self) -> IommuMetricsSnapshot {
        self.metrics.snapshot()
    }

    /// What the device advertises.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }
}

/// Writes pending fault events into the driver's event buffers, as many as it posted.
fn deliver_faults(st: &mut State, metrics: &IommuMetrics) {
    let State { active, faults, .. } = st;
    let Some(a) = active.as_mut() else {
        return;
    };
    let mut used = false;
    while let Some(ev) = faults.front().copied() {
        let mem = a.mem.clone();
        let Some(chain) = a.events.iter(&mem).ok().and_then(|mut it| it.next()) else {
            break;
        };
        faults.pop_front();
        let head = chain.head_index();
        let len = match request::parse(chain, &mem) {
            Ok(r) if r.writable.len() >= fault::LEN as u64 && r.writable.write(&mem, 0, &ev) => {
                metrics.add_fault(true);
                fault::LEN as u32
            }
            _ => {
                metrics.add_fault(false);
                0
            }
        };
        if a.events.add_used(&mem, head, len).is_err() {
            break;
        }
        used = true;
    }
    if used && a.events.needs_notification(&a.mem).unwrap_or(true) {
        if let Err(e) = a.interrupt.trigger_queue(1) {
            tracing::warn!("cannot signal virtio-iommu event interrupt: {e}");
        }
    }
}

/// A virtio-iommu device.
pub struct Iommu {
    id: String,
    config: Arc<IommuConfig>,
    state: Arc<Mutex<State>>,
    mapper: Arc<dyn IommuMapper>,
    metrics: Arc<IommuMetrics>,
    acked: u64,
    /// A refused request was already logged at warn level.
    warned: bool,
}

impl Iommu {
    /// A device named `id` with `config`, mapping through `mapper`.
    pub fn new(id: &str, config: IommuConfig, mapper: Arc<dyn IommuMapper>) -> Self {
        let endpoints = config.endpoints.iter().map(|&e| (e, None)).collect();
        Iommu {
            id: id.to_owned(),
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                endpoints,
                domains: BTreeMap::new(),
                mappings: 0,
                active: None,
                faults: VecDeque::new(),
            })),
            mapper,
            metrics: Arc::new(IommuMetrics::default()),
            acked: 0,
            warned: false,
        }
    }

    /// The VMM's handle: list and fence mappings, metrics.
    pub fn handle(&self) -> IommuHandle {
        IommuHandle {
            state: self.state.clone(),
            mapper: self.mapper.clone(),
            metrics: self.metrics.clone(),
            config: self.config.clone(),
        }
    }

    fn refused(&mut self, what: &str, s: u8) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(device = %self.id, status = status::name(s), "virtio-iommu {what} refused (further ones at debug level)");
        } else {
            tracing::debug!(device = %self.id, status = status::name(s), "virtio-iommu {what} refused");
        }
    }

    /// Answers one well-formed chain; returns the status.
    fn handle_request(&mut self, st: &mut State, mem: &GuestMemory, req: &Request) -> u8 {
        let Some(t) = req.req_type() else {
            return status::INVAL;
        };
        let r = match t {
            req_type::ATTACH => self.attach(st, req),
            req_type::DETACH => self.detach(st, req),
            req_type::MAP => self.map(st, req),
            req_type::UNMAP => self.unmap(st, req),
            req_type::PROBE => self.probe(st, mem, req),
            _ => Err(status::UNSUPP),
        };
        match r {
            Ok(()) => status::OK,
            Err(s) => {
                let what = match t {
                    req_type::ATTACH => "ATTACH",
                    req_type::DETACH => "DETACH",
                    req_type::MAP => "MAP",
                    req_type::UNMAP => "UNMAP",
                    req_type::PROBE => "PROBE",
                    _ => "request of unknown type",
                };
                self.refused(what, s);
                s
            }
        }
    }

    /// Removes `endpoint` from its domain (unmapping the domain's mappings for it), freeing the domain with
    /// its mappings when it was the last one.
    fn leave_domain(&self, st: &mut State, endpoint: u32) {
        let Some(Some(d)) = st.endpoints.get(&endpoint).copied() else {
            return;
        };
        st.endpoints.insert(endpoint, None);
        let Some(dom) = st.domains.get_mut(&d) else {
            return;
        };
        dom.endpoints.remove(&endpoint);
        let last = dom.endpoints.is_empty();
        for (&start, m) in &dom.mappings {
            self.mapper.unmap(&dma(endpoint, d, start, m));
        }
        if last {
            if let Some(dom) = st.domains.remove(&d) {
                for (&start, m) in &dom.mappings {
                    self.metrics.add_unmap(m.end - start + 1);
                }
                st.mappings = st.mappings.saturating_sub(dom.mappings.len());
            }
        }
    }

    fn attach(&mut self, st: &mut State, req: &Request) -> Result<(), u8> {
        let (Some(domain), Some(endpoint), Some(flags)) =
            (req.u32_at(4), req.u32_at(8), req.u32_at(12))
        else {
            return Err(status::INVAL);
        };
        if flags != 0 {
            // BYPASS (bit 0) is not offered; no other flag exists.
            return Err(status::INVAL);
        }
        let (lo, hi) = self.config.domain_range;
        if domain < lo || domain > hi {
            return Err(status::RANGE);
        }
        let current = *st.endpoints.get(&endpoint).ok_or(status::NOENT)?;
        if current == Some(domain) {
            return Ok(());
        }
        self.leave_domain(st, endpoint);
        let dom = st.domains.entry(domain).or_default();
        // The domain's mappings, made for the new endpoint too.
        let mut done = Vec::new();
        for (&start, m) in &dom.mappings {
            let map = dma(endpoint, domain, start, m);
            if let Err(e) = self.mapper.map(&map) {
                for m in &done {
                    self.mapper.unmap(m);
                }
                if dom.endpoints.is_empty() {
                    // Created by this ATTACH (or left with no endpoint): a domain lives only while attached.
                    let freed = st.domains.remove(&domain).map_or(0, |d| d.mappings.len());
                    st.mappings = st.mappings.saturating_sub(freed);
                }
                tracing::warn!(device = %self.id, endpoint, domain, "ATTACH: cannot map the domain's mappings for the endpoint: {e}");
                return Err(e.status());
            }
            done.push(map);
        }
        dom.endpoints.insert(endpoint);
        st.endpoints.insert(endpoint, Some(domain));
        tracing::debug!(device = %self.id, endpoint, domain, "virtio-iommu attach");
        Ok(())
    }

    fn detach(&mut self, st: &mut State, req: &Request) -> Result<(), u8> {
        let (Some(domain), Some(endpoint)) = (req.u32_at(4), req.u32_at(8)) else {
            return Err(status::INVAL);
        };
        let current = *st.endpoints.get(&endpoint).ok_or(status::NOENT)?;
        if !st.domains.contains_key(&domain) {
            return Err(status::NOENT);
        }
        if current != Some(domain) {
            return Err(status::INVAL);
        }
        self.leave_domain(st, endpoint);
        tracing::debug!(device = %self.id, endpoint, domain, "virtio-iommu detach");
        Ok(())
    }

    fn map(&mut self, st: &mut State, req: &Request) -> Result<(), u8> {
        let (Some(domain), Some(start), Some(end), Some(phys), Some(flags)) = (
            req.u32_at(4),
            req.u64_at(8),
            req.u64_at(16),
            req.u64_at(24),
            req.u32_at(32),
        ) else {
            return Err(status::INVAL);
        };
        if flags & !(map_flags::READ | map_flags::WRITE) != 0 {
            // MMIO is not offered; nothing else exists.
            return Err(status::INVAL);
        }
        if end < start {
            return Err(status::INVAL);
        }
        let g = self.config.granule();
        let (lo, hi) = self.config.input_range;
        // end >= start; the whole of u64 has no length that fits.
        let Some(len) = (end - start).checked_add(1) else {
            return Err(status::RANGE);
        };
        if start < lo || end > hi {
            return Err(status::RANGE);
        }
        if start % g != 0 || len % g != 0 || phys % g != 0 || phys.checked_add(len - 1).is_none() {
            return Err(status::RANGE);
        }
        let max = self.config.max_mappings;
        let total = st.mappings;
        let dom = st.domains.get_mut(&domain).ok_or(status::NOENT)?;
        let overlap = dom
            .mappings
            .range(..=end)
            .next_back()
            .is_some_and(|(_, m)| m.end >= start);
        if overlap {
            return Err(status::INVAL);
        }
        if total >= max {
            return Err(status::NOMEM);
        }
        let m = Mapping { end, phys, flags };
        let mut done = Vec::new();
        for &ep in &dom.endpoints {
            let map = dma(ep, domain, start, &m);
            if let Err(e) = self.mapper.map(&map) {
                for m in &done {
                    self.mapper.unmap(m);
                }
                tracing::debug!(device = %self.id, endpoint = ep, domain, iova = format_args!("{start:#x}"), len, phys = format_args!("{phys:#x}"), "MAP refused by the host: {e}");
                return Err(e.status());
            }
            done.push(map);
        }
        dom.mappings.insert(start, m);
        st.mappings += 1;
        self.metrics.add_map(len);
        Ok(())
    }

    fn unmap(&mut self, st: &mut State, req: &Request) -> Result<(), u8> {
        let (Some(domain), Some(start), Some(end)) = (req.u32_at(4), req.u64_at(8), req.u64_at(16))
        else {
            return Err(status::INVAL);
        };
        if end < start {
            return Err(status::INVAL);
        }
        let dom = st.domains.get_mut(&domain).ok_or(status::NOENT)?;
        // The mapping starting before `start` that reaches into the range would be split.
        let split_before = dom
            .mappings
            .range(..start)
            .next_back()
            .is_some_and(|(_, m)| m.end >= start);
        let inside: Vec<u64> = dom.mappings.range(start..=end).map(|(&s, _)| s).collect();
        let split_after = inside
            .last()
            .and_then(|s| dom.mappings.get(s))
            .is_some_and(|m| m.end > end);
        if split_before || split_after {
            return Err(status::RANGE);
        }
        let mut removed = 0;
        for s in inside {
            if let Some(m) = dom.mappings.remove(&s) {
                for &ep in &dom.endpoints {
                    self.mapper.unmap(&dma(ep, domain, s, &m));
                }
                self.metrics.add_unmap(m.end - s + 1);
                removed += 1;
            }
        }
        st.mappings = st.mappings.saturating_sub(removed);
        Ok(())
    }

    fn probe(&mut self, st: &mut State, mem: &GuestMemory, req: &Request) -> Result<(), u8> {
        let endpoint = req.u32_at(4).ok_or(status::INVAL)?;
        if !st.endpoints.contains_key(&endpoint) {
            return Err(status::NOENT);
        }
        if req.writable.len() < u64::from(probe::SIZE) + request::HEAD_LEN as u64 {
            return Err(status::INVAL);
        }
        let mut props = [0u8; probe::SIZE as usize];
        if let Some((start, end)) = self.config.msi_range {
            props[0..2].copy_from_slice(&probe::RESV_MEM.to_le_bytes());
            props[2..4].copy_from_slice(&20u16.to_le_bytes());
            props[4] = probe::RESV_MEM_MSI;
            props[8..16].copy_from_slice(&start.to_le_bytes());
            props[16..24].copy_from_slice(&end.to_le_bytes());
        }
        if !req.writable.write(mem, 0, &props) {
            return Err(status::DEVERR);
        }
        Ok(())
    }

    /// Removes every mapping and attachment (reset).
    fn clear(&self, st: &mut State) {
        let attached: Vec<u32> = st
            .endpoints
            .iter()
            .filter(|(_, d)| d.is_some())
            .map(|(&e, _)| e)
            .collect();
        for e in attached {
            self.leave_domain(st, e);
        }
        st.domains.clear();
        st.mappings = 0;
        st.faults.clear();
    }
}

impl VirtioDevice for Iommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        features::INPUT_RANGE | features::DOMAIN_RANGE | features::MAP_UNMAP | features::PROBE
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // bypass is writable only with VIRTIO_IOMMU_F_BYPASS_CONFIG, which is not offered.
        tracing::debug!(device = %self.id, "guest write to read-only virtio-iommu config ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [requests, events] = crate::virtio::device::ready_queues(queues)?;
        lock(&self.state).active = Some(Active {
            mem,
            interrupt,
            requests,
            events,
        });
        tracing::debug!(device = %self.id, "virtio-iommu activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        let queue_error = |reason: String| QueueError {
            queue: index,
            reason,
        };
        let state = self.state.clone();
        let mut st = lock(&state);
        if index == 1 {
            deliver_faults(&mut st, &self.metrics);
            return Ok(());
        }
        if index != 0 {
            return Err(queue_error("virtio-iommu has two queues".into()));
        }
        let Some(active) = st.active.as_mut() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let chains: Vec<_> = active
            .requests
            .iter(&mem)
            .map_err(|e| queue_error(e.to_string()))?
            .collect();
        let mut answers = Vec::with_capacity(chains.len());
        for chain in chains {
            self.metrics.add_request();
            match request::parse(chain, &mem) {
                Ok(req) => {
                    let s = self.handle_request(&mut st, &mem, &req);
                    self.metrics.add_status(s);
                    answers.push((req.head, req.writable.write_tail(&mem, s)));
                }
                Err(bad) => {
                    let len = match &bad.writable {
                        Some(w) => {
                            self.metrics.add_status(status::IOERR);
                            w.write_tail(&mem, status::IOERR)
                        }
                        None => {
                            self.metrics.add_unanswerable();
                            0
                        }
                    };
                    self.refused(&format!("chain ({})", bad.error), status::IOERR);
                    answers.push((bad.head, len));
                }
            }
        }
        let Some(active) = st.active.as_mut() else {
            return Ok(());
        };
        for &(head, len) in &answers {
            active
                .requests
                .add_used(&mem, head, len)
                .map_err(|e| queue_error(format!("head {head}: {e}")))?;
        }
        if !answers.is_empty() && active.requests.needs_notification(&mem).unwrap_or(true) {
            if let Err(e) = active.interrupt.trigger_queue(0) {
                tracing::warn!("cannot signal virtio-iommu interrupt: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        let state = self.state.clone();
        let mut st = lock(&state);
        self.clear(&mut st);
        st.active = None;
    }
}
