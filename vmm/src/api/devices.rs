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
