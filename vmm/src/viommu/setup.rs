//! Building the virtual IOMMU at start: configuration checks, the device and its host side, its PCI function.

use std::sync::Arc;

use daxvisor_devices::virtio::iommu::{Iommu, IommuConfig, IommuHandle};
use vm_memory::GuestMemoryMmap;

use super::{ViommuDma, INPUT_BITS, MAX_MAPPINGS, MSI_RANGE};
use crate::pmem::{DmaPolicy, IommuPolicy, PmemConfig};
use crate::vfio::DeviceConfig;

#[derive(Debug, thiserror::Error)]
pub enum ViommuError {
    #[error("--device ...,iommu=on: every --device must say iommu=on, or none (they share one VFIO container, so one address space)")]
    Mixed,
    #[error("--device ...,iommu=on takes exactly one passthrough device ({0} given): endpoints share the VM's one VFIO container and so one IOVA space")]
    TooMany(usize),
    #[error("--device ...,iommu=on needs --transport pci (the virtual IOMMU and its endpoints are PCI functions)")]
    NotPci,
    #[error("--pmem id={0}: dma={1} is for devices without the virtual IOMMU; with --device ...,iommu=on use iommu=refuse|recall")]
    DmaPolicy(String, &'static str),
    #[error("--pmem id={0}: iommu={1} needs a passthrough device with iommu=on")]
    NoDevice(String, &'static str),
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
}

/// Whether the configuration asks for the virtual IOMMU, refusing mixtures that cannot work.
pub fn wanted(
    devices: &[DeviceConfig],
    pmem: &[PmemConfig],
    pci: bool,
) -> Result<bool, ViommuError> {
    let on = devices.iter().filter(|d| d.iommu).count();
    let name = |i: usize, p: &PmemConfig| p.id.clone().unwrap_or_else(|| format!("pmem{i}"));
    if on == 0 {
        if let Some((i, p)) = pmem
            .iter()
            .enumerate()
            .find(|(_, p)| p.iommu != IommuPolicy::Off)
        {
            return Err(ViommuError::NoDevice(name(i, p), p.iommu.as_str()));
        }
        return Ok(false);
    }
    if on != devices.len() {
        return Err(ViommuError::Mixed);
    }
    if on > 1 {
        return Err(ViommuError::TooMany(on));
    }
    if !pci {
        return Err(ViommuError::NotPci);
    }
    if let Some((i, p)) = pmem
        .iter()
        .enumerate()
        .find(|(_, p)| p.dma != DmaPolicy::Off)
    {
        return Err(ViommuError::DmaPolicy(name(i, p), p.dma.as_str()));
    }
    Ok(true)
}

/// The device as placed.
pub struct Viommu {
    /// List and fence mappings, metrics.
    pub handle: IommuHandle,
    /// Pins and container mappings per endpoint.
    pub dma: Arc<ViommuDma>,
    /// The virtio-iommu's own PCI requester id (VIOT's translation element).
    pub bdf: u16,
    /// The endpoints' requester ids (VIOT's PCI ranges).
    pub endpoints: Vec<u16>,
    /// Where recall notices go (the agent channel).
    pub routes: Arc<crate::agent::Routes>,
    /// Recalls and fences.
    pub counters: super::recall::RecallCounters,
}

/// The device config for `endpoints`.
pub fn device_config(endpoints: &[u16]) -> IommuConfig {
    IommuConfig {
        page_size_mask: !(daxvisor_mapper::page_size() - 1),
        input_range: (0, (1u64 << INPUT_BITS) - 1),
        domain_range: (0, 1023),
        endpoints: endpoints.iter().map(|&e| u32::from(e)).collect(),
        msi_range: Some(MSI_RANGE),
        max_mappings: MAX_MAPPINGS,
    }
}

/// Builds the device over `dma` for `endpoints` (requester id, name) and puts it on the PCI bus; its event-loop
/// subscriber is added to `event_loop`.
pub fn attach(
    dma: Arc<ViommuDma>,
    endpoints: &[u16],
    routes: Arc<crate::agent::Routes>,
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    devices: &mut crate::device_manager::DeviceManager,
    event_loop: &mut crate::event_loop::EventLoop,
) -> Result<Viommu, ViommuError> {
    let iommu = Iommu::new("viommu0", device_config(endpoints), dma.clone());
    let handle = iommu.handle();
    let (_slot, subscriber) = devices.add_virtio_device(vm, mem, Box::new(iommu))?;
    event_loop.add_subscriber(subscriber);
    let device = devices
        .pci
        .as_ref()
        .and_then(|p| p.functions.last())
        .map(|f| f.device)
        .ok_or(ViommuError::NotPci)?;
    let bdf = u16::from(device) << 3;
    tracing::info!(
        bdf = format_args!("00:{device:02x}.0"),
        endpoints = ?endpoints.iter().map(|e| format!("00:{:02x}.{}", e >> 3, e & 7)).collect::<Vec<_>>(),
        input_bits = INPUT_BITS,
        "virtual IOMMU on PCI"
    );
    Ok(Viommu {
        handle,
        dma,
        bdf,
        endpoints: endpoints.to_vec(),
        routes,
        counters: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceConfig {
        s.parse().unwrap()
    }

    fn pmem(s: &str) -> PmemConfig {
        s.parse().unwrap()
    }

    #[test]
    fn the_virtual_iommu_is_asked_for_by_iommu_on_and_mixtures_are_refused_naming_why() {
        let on = dev("vfio=/x,iommu=on,id=nvme0");
        let off = dev("vfio=/y");
        let recall = pmem("file=a,iommu=recall,id=data");
        assert!(!wanted(std::slice::from_ref(&off), &[], true).unwrap());
        assert!(wanted(
            std::slice::from_ref(&on),
            std::slice::from_ref(&recall),
            true
        )
        .unwrap());
        assert!(matches!(
            wanted(&[on.clone(), off.clone()], &[], true),
            Err(ViommuError::Mixed)
        ));
        assert!(matches!(
            wanted(&[on.clone(), on.clone()], &[], true),
            Err(ViommuError::TooMany(2))
        ));
        assert!(matches!(
            wanted(std::slice::from_ref(&on), &[], false),
            Err(ViommuError::NotPci)
        ));
        let e = wanted(&[off], std::slice::from_ref(&recall), true).unwrap_err();
        assert!(
            e.to_string().contains("id=data") && e.to_string().contains("iommu=recall"),
            "{e}"
        );
        let e = wanted(&[on], &[pmem("file=b,dma=whole")], true).unwrap_err();
        assert!(
            e.to_string().contains("id=pmem0") && e.to_string().contains("dma=whole"),
            "{e}"
        );
    }

    #[test]
    fn the_device_advertises_the_host_page_granule_39_bit_iovas_and_the_msi_doorbell() {
        let c = device_config(&[4 << 3]);
        assert_eq!(
            c.page_size_mask.trailing_zeros(),
            daxvisor_mapper::page_size().trailing_zeros()
        );
        assert_eq!(c.input_range, (0, (1 << 39) - 1));
        assert_eq!(c.endpoints, vec![32]);
        assert_eq!(c.msi_range, Some((0xfee0_0000, 0xfeef_ffff)));
    }
}
