//! `/devices`: the passthrough devices (`--device vfio=`) and what each can reach by DMA: guest RAM, and the
//! pmem ranges pinned for DMA (with the owner holding each pin).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::context::ApiContext;
use crate::vfio::MappingKind;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DmaMappingView {
    pub iova: u64,
    pub length: u64,
    /// "ram" (guest RAM, mapped at start) or "pin" (a pmem range pinned for DMA).
    pub kind: String,
    /// For a pin: the region, the region-relative offset, and the owner holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceView {
    pub name: String,
    /// Its sysfs directory on the host.
    pub path: String,
    pub iommu_group: u32,
    /// Its slot on the guest's PCI bus 0.
    #[serde(default)]
    pub pci_slot: Option<u8>,
    /// What its container maps (shared by every device of the VM), by IOVA.
    pub dma: Vec<DmaMappingView>,
}

/// The assigned devices with their DMA mappings.
#[utoipa::path(get, operation_id = "list_devices", path = "/devices", tag = "devices", responses((status = 200, body = [DeviceView])))]
pub async fn list(State(ctx): State<Arc<ApiContext>>) -> Json<Vec<DeviceView>> {
    let Some(devices) = &ctx.devices else {
        return Json(Vec::new());
    };
    let snap = ctx.mapper.snapshot();
    let pins = snap.pins();
    let mappings: Vec<DmaMappingView> = devices
        .dma
        .mappings()
        .into_iter()
        .map(|m| {
            let pin = pins
                .iter()
                .find(|(_, p)| p.dma.is_some_and(|(iova, _)| iova == m.iova));
            DmaMappingView {
                iova: m.iova,
                length: m.len,
                kind: match m.kind {
                    MappingKind::Ram => "ram",
                    MappingKind::Pin => "pin",
                }
                .to_owned(),
                region: pin.map(|(_, p)| ctx.region_name(p.region)),
                offset: pin.map(|(_, p)| p.range.start),
                owner: pin.map(|(o, _)| ctx.owner_name(o.to_raw())),
            }
        })
        .collect();
    Json(
        devices
            .devices
            .iter()
            .map(|d| DeviceView {
                name: d.name.clone(),
                path: d.path.display().to_string(),
                iommu_group: d.group,
                pci_slot: d.slot,
                dma: mappings.clone(),
            })
            .collect(),
    )
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IovaProbe {
    pub iova: u64,
    /// What the container itself answers (a scratch page mapped at the IOVA is refused while something is).
    pub mapped: bool,
}

/// Ask the VFIO container whether anything is mapped at an IOVA (after an unpin: that the mapping is gone).
#[utoipa::path(get, operation_id = "probe_iova", path = "/devices/iova/{iova}", tag = "devices",
    params(("iova" = u64, Path, description = "the IO virtual address (decimal)")),
    responses((status = 200, body = IovaProbe), (status = 404, body = super::error::ErrorBody)))]
pub async fn probe(
    State(ctx): State<Arc<ApiContext>>,
    Path(iova): Path<u64>,
) -> Result<Json<IovaProbe>, super::error::ApiError> {
    let Some(devices) = &ctx.devices else {
        return Err(super::error::ApiError::not_found(
            "this VM has no passthrough device",
        ));
    };
    let dma = devices.dma.clone();
    let mapped = tokio::task::spawn_blocking(move || dma.container_maps(iova))
        .await
        .map_err(|e| super::error::ApiError::internal(e.to_string()))?
        .map_err(|e| super::error::ApiError::internal(format!("probing IOVA {iova:#x}: {e}")))?;
    Ok(Json(IovaProbe { iova, mapped }))
}

/// One mapping the guest made through the virtual IOMMU.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ViommuMappingView {
    /// The endpoint's name (`--device id=`).
    pub endpoint: String,
    pub domain: u32,
    pub iova: u64,
    pub length: u64,
    /// The guest-physical address it translates to.
    pub guest_addr: u64,
    pub write: bool,
}

/// One endpoint behind the virtual IOMMU.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ViommuEndpointView {
    pub name: String,
    /// Its PCI name in the guest (`0000:00:DD.F`); VIOT names it by this requester id.
    pub pci: String,
    /// The owner its pins are held by (`viommu:NAME`).
    pub owner: String,
    /// pmem bytes pinned for it right now (the layout-lease manager's count).
    pub pinned_bytes: u64,
    pub counters: crate::viommu::MapCounters,
}

/// The virtual IOMMU: where it is, its endpoints, what the guest has mapped, and the counters.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ViommuView {
    /// The virtio-iommu's PCI name in the guest.
    pub pci: String,
    pub endpoints: Vec<ViommuEndpointView>,
    /// Counters per region name (`ram` for guest RAM).
    pub regions: std::collections::BTreeMap<String, crate::viommu::MapCounters>,
    pub mappings: Vec<ViommuMappingView>,
    /// Requests answered, by the status the guest read (`ok`, `inval`, `range`, `noent`, `nomem`, ...).
    pub requests_by_status: std::collections::BTreeMap<String, u64>,
    pub recalls: u64,
    pub fences: u64,
    pub fenced_bytes: u64,
    pub faults_reported: u64,
}

fn pci_name(rid: u16) -> String {
    format!(
        "0000:{:02x}:{:02x}.{}",
        rid >> 8,
        (rid >> 3) & 0x1f,
        rid & 7
    )
}

/// The virtual IOMMU (`--device ...,iommu=on`).
#[utoipa::path(get, operation_id = "get_viommu", path = "/devices/viommu", tag = "devices",
    responses((status = 200, body = ViommuView), (status = 404, body = super::error::ErrorBody)))]
pub async fn viommu(
    State(ctx): State<Arc<ApiContext>>,
) -> Result<Json<ViommuView>, super::error::ApiError> {
    let Some(v) = ctx.actions.viommu() else {
        return Err(super::error::ApiError::not_found(
            "this VM has no virtual IOMMU (--device vfio=PATH,iommu=on)",
        ));
    };
    let moment = v.dma.sample();
    let (eps, regions) = (moment.endpoints, moment.regions);
    let endpoints: Vec<_> = v.dma.endpoints();
    let name_of = |id: u32| {
        endpoints
            .iter()
            .find(|e| e.id == id)
            .map_or_else(|| format!("{id:#x}"), |e| e.name.clone())
    };
    let m = v.handle.metrics();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Json(ViommuView {
        pci: pci_name(v.bdf),
        endpoints: endpoints
            .iter()
            .map(|e| ViommuEndpointView {
                name: e.name.clone(),
                pci: pci_name(e.id as u16),
                owner: format!("viommu:{}", e.name),
                pinned_bytes: moment.pinned.get(&e.id).copied().unwrap_or_default(),
                counters: eps.get(&e.name).copied().unwrap_or_default(),
            })
            .collect(),
        regions,
        mappings: v
            .handle
            .mappings()
            .into_iter()
            .map(|d| ViommuMappingView {
                endpoint: name_of(d.endpoint),
                domain: d.domain,
                iova: d.iova,
                length: d.len,
                guest_addr: d.phys,
                write: d.write,
            })
            .collect(),
        requests_by_status: m
            .by_status
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    daxvisor_devices::virtio::iommu::status::name(i as u8).to_owned(),
                    n,
                )
            })
            .collect(),
        recalls: load(&v.counters.recalls),
        fences: load(&v.counters.fences),
        fenced_bytes: m.fenced_bytes,
        faults_reported: m.faults_reported,
    }))
}
