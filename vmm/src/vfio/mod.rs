//! PCI device passthrough through VFIO (`--device vfio=SYSFS_PATH[,id=NAME][,iommu=on]`).
//!
//! - [`preflight`]: the sysfs checks that name a cause and a remedy before anything is opened (bound to
//!   vfio-pci, an IOMMU, a group of its own).
//! - [`Passthrough`]: the VM's VFIO container (with the KVM VFIO device, so KVM knows about non-coherent DMA)
//!   and its devices, opened and reset at start; guest RAM mapped at IOVA = guest physical address; torn down at
//!   VM end (every IOVA unmapped, every device's MSI-X off and reset, the groups closed with the container).
//! - [`dma`]: the layout-lease manager's `DmaMapper` over that container: pmem reaches a device only through
//!   pins (`--pmem dma=agent|whole|off`).
//! - [`pci_device`]: the device as a function on the guest's PCI bus.

mod bar_map;
pub mod dma;
pub mod pci_device;
pub mod preflight;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use daxvisor_mapper::{LeaseMode, Mapper, OwnerId};
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use bar_map::BarMap;
pub use dma::{Mapping, MappingKind, VfioDma};
pub use pci_device::VfioPciDevice;
pub use preflight::PreflightError;

use crate::pmem::DmaPolicy;
use crate::region_registry::RegionRegistry;

/// `--device vfio=SYSFS_PATH[,id=NAME][,iommu=on]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The device's sysfs directory, e.g. /sys/bus/pci/devices/0000:01:00.0.
    pub path: PathBuf,
    /// Its name in logs, the API and as the owner of its pins; defaults to `vfioN`.
    pub id: Option<String>,
    /// Behind the virtual IOMMU (`crate::viommu`): nothing is mapped for it until the guest's driver maps it.
    pub iommu: bool,
}

impl FromStr for DeviceConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut id = None;
        let mut iommu = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("vfio", p)) if !p.is_empty() && path.is_none() => path = Some(PathBuf::from(p)),
                Some(("id", v)) if id.is_none() => {
                    let ok = !v.is_empty()
                        && v.len() <= 32
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !ok {
                        return Err(format!(
                            "--device: id={v}: expected 1-32 characters from A-Z a-z 0-9 - _"
                        ));
                    }
                    id = Some(v.to_owned());
                }
                Some(("iommu", v)) if iommu.is_none() => {
                    iommu = Some(match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("--device: iommu={v}: expected on or off")),
                    });
                }
                _ => {
                    return Err(format!(
                        "--device: '{part}' not understood (expected vfio=SYSFS_PATH[,id=NAME][,iommu=on], each key once)"
                    ))
                }
            }
        }
        Ok(DeviceConfig {
            path: path.ok_or("--device: missing vfio=SYSFS_PATH")?,
            id,
            iommu: iommu.unwrap_or(false),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("--device vfio={path}: cannot open the VFIO container /dev/vfio/vfio ({source}); remedy: `modprobe vfio-pci` and run as root (or give access to /dev/vfio)")]
    Container {
        path: PathBuf,
        source: vfio_ioctls::VfioError,
    },
    #[error("--device vfio={path}: cannot create KVM's VFIO device: {source}")]
    KvmDevice {
        path: PathBuf,
        source: kvm_ioctls::Error,
    },
    #[error("--device vfio={path}: cannot open the device through its group /dev/vfio/{group} ({source}); remedy: the group must be viable (every device in it bound to vfio-pci) and not in use by another process")]
    Device {
        path: PathBuf,
        group: u32,
        source: vfio_ioctls::VfioError,
    },
    #[error("--device: id {0} given twice")]
    DuplicateId(String),
    #[error("cannot map guest RAM at {gpa:#x} (+{len:#x}) for DMA: {source}")]
    MapRam {
        gpa: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("the memlock limit ({limit} bytes) is too small for passthrough: guest RAM and dma=whole regions need {needed} bytes locked; remedy: raise it (`ulimit -l {kib}`, LimitMEMLOCK=) or run with CAP_IPC_LOCK", kib = needed.div_ceil(1024))]
    Memlock { limit: u64, needed: u64 },
    #[error("--pmem id={region} dma=whole: {source}")]
    Whole {
        region: String,
        source: daxvisor_mapper::MapperError,
    },
    #[error(transparent)]
    Pci(#[from] crate::pci::PciError),
}

/// One assigned device.
pub struct Assigned {
    pub name: String,
    pub path: PathBuf,
    pub group: u32,
    device: Arc<VfioDevice>,
    function: Option<Arc<Mutex<VfioPciDevice>>>,
    /// The PCI slot on bus 0, once placed.
    pub slot: Option<u8>,
}

/// What the API shows of the assigned devices.
pub struct DeviceList {
    pub devices: Vec<DeviceFacts>,
    pub dma: Arc<VfioDma>,
}

/// One assigned device as placed.
pub struct DeviceFacts {
    pub name: String,
    pub path: PathBuf,
    pub group: u32,
    pub slot: Option<u8>,
}

/// The VM's container and assigned devices.
pub struct Passthrough {
    dma: Arc<VfioDma>,
    devices: Vec<Assigned>,
    /// The owner of the `dma=whole` pins (named after the first device), and the mapper it is in.
    whole_owner: Option<(Mapper, OwnerId)>,
    /// Held last: closing it (after the devices, so their groups leave it first) removes what is left mapped.
    _container: Arc<VfioContainer>,
}

impl Passthrough {
    /// Check and open every device of `configs` in one container, reset each. Nothing is left open on error.
    pub fn open(configs: &[DeviceConfig], vm: &VmFd) -> Result<Option<Self>, PassthroughError> {
        let Some(first) = configs.first() else {
            return Ok(None);
        };
        let mut checked = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let group = preflight::check(&c.path)?;
            let name = c.id.clone().unwrap_or_else(|| format!("vfio{i}"));
            if checked
                .iter()
                .any(|(n, _, _): &(String, u32, &Path)| *n == name)
            {
                return Err(PassthroughError::DuplicateId(name));
            }
            checked.push((name, group, c.path.as_path()));
        }
        let mut kvm_dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio =
            vm.create_device(&mut kvm_dev)
                .map_err(|source| PassthroughError::KvmDevice {
                    path: first.path.clone(),
                    source,
                })?;
        let container = Arc::new(
            VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio)))).map_err(
                |source| PassthroughError::Container {
                    path: first.path.clone(),
                    source,
                },
            )?,
        );
        let mut devices = Vec::with_capacity(checked.len());
        for (name, group, path) in checked {
            let device = VfioDevice::new(path, container.clone() as Arc<dyn VfioOps>, false)
                .map_err(|source| PassthroughError::Device {
                    path: path.to_owned(),
                    group,
                    source,
                })?;
            device.reset();
            tracing::info!(device = %name, path = %path.display(), group, "passthrough device opened and reset");
            devices.push(Assigned {
                name,
                path: path.to_owned(),
                group,
                device: Arc::new(device),
                function: None,
                slot: None,
            });
        }
        Ok(Some(Passthrough {
            dma: Arc::new(VfioDma::new(container.clone())),
            devices,
            whole_owner: None,
            _container: container,
        }))
    }

    /// The layout-lease manager's DMA mapper.
    pub fn dma(&self) -> Arc<VfioDma> {
        self.dma.clone()
    }

    pub fn devices(&self) -> &[Assigned] {
        &self.devices
    }

    /// What the API lists (after [`Passthrough::place`]).
    pub fn list(&self) -> Arc<DeviceList> {
        Arc::new(DeviceList {
            devices: self
                .devices
                .iter()
                .map(|d| DeviceFacts {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    group: d.group,
                    slot: d.slot,
                })
                .collect(),
            dma: self.dma.clone(),
        })
    }

    /// Refuse a memlock limit too small for guest RAM plus the `dma=whole` regions (the kernel counts what a
    /// container pins against it unless the process has CAP_IPC_LOCK).
    pub fn check_memlock(needed: u64) -> Result<(), PassthroughError> {
        let ipc_lock = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_IPC_LOCK,
        )
        .unwrap_or(false);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given, nothing else.
        let limit = (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
            && lim.rlim_cur != libc::RLIM_INFINITY)
            .then_some(lim.rlim_cur);
        memlock_enough(limit, ipc_lock, needed)
    }

    /// Guest RAM at IOVA = guest physical address, as every VMM gives its devices.
    pub fn map_ram(&self, mem: &GuestMemoryMmap) -> Result<(), PassthroughError> {
        for r in mem.iter() {
            let (gpa, len) = (r.start_addr().0, r.len());
            // SAFETY: guest RAM, mapped for the VM's life; the container (and with it the mapping) goes first.
            unsafe { self.dma.map_ram(gpa, len, r.as_ptr()) }
                .map_err(|source| PassthroughError::MapRam { gpa, len, source })?;
        }
        Ok(())
    }

    /// `dma=whole` regions: each pinned whole for DMA by one owner named after the device, at start. A backing
    /// the kernel will not let a DMA pin reach is refused here with the rule.
    pub fn pin_whole(
        &mut self,
        mapper: &Mapper,
        regions: &RegionRegistry,
    ) -> Result<(), PassthroughError> {
        let whole: Vec<_> = regions
            .all()
            .into_iter()
            .filter(|r| r.config.dma == DmaPolicy::Whole)
            .collect();
        if whole.is_empty() {
            return Ok(());
        }
        let name = self.devices.first().map_or("vfio", |d| d.name.as_str());
        let owner = mapper.add_owner(&format!("device:{name}"));
        self.whole_owner = Some((mapper.clone(), owner));
        for r in whole {
            pin_whole_region(mapper, owner, &r, true).map_err(|source| {
                PassthroughError::Whole {
                    region: r.name().to_owned(),
                    source,
                }
            })?;
            tracing::info!(region = %r.name(), iova = format_args!("{:#x}", r.guest_addr), len = r.size(), device = name, "dma=whole: region mapped for DMA");
        }
        Ok(())
    }

    /// Put every device on the guest's PCI bus.
    pub fn place(
        &mut self,
        vm: &mut crate::vstate::vm::Vm,
        pci: &mut crate::pci::PciBus,
    ) -> Result<(), PassthroughError> {
        for d in &mut self.devices {
            let (f, function) = pci.add_vfio_device(vm, &d.name, d.device.clone())?;
            d.slot = Some(f.device);
            d.function = Some(function);
        }
        Ok(())
    }

    /// The VM's end: the whole pins' owner ends, every IOVA still mapped is unmapped, each device's MSI-X is
    /// turned off and the device reset; the groups and the container close as this drops.
    pub fn teardown(mut self) {
        if let Some((mapper, owner)) = self.whole_owner.take() {
            if let Err(e) = mapper.owner_exit(owner) {
                tracing::error!(error = %e, "ending the dma=whole owner");
            }
        }
        let unmapped = self.dma.unmap_all();
        for d in &self.devices {
            if let Some(f) = &d.function {
                f.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
            }
            d.device.reset();
        }
        let left = self.dma.mappings().len();
        tracing::info!(
            devices = self.devices.len(),
            unmapped,
            left,
            "passthrough torn down: IOVAs unmapped, devices reset, groups closing"
        );
    }
}

/// The memlock rule: `limit` is RLIMIT_MEMLOCK (`None` when unlimited or unreadable); CAP_IPC_LOCK lifts it.
fn memlock_enough(limit: Option<u64>, ipc_lock: bool, needed: u64) -> Result<(), PassthroughError> {
    match limit {
        Some(limit) if !ipc_lock && limit < needed => {
            Err(PassthroughError::Memlock { limit, needed })
        }
        _ => Ok(()),
    }
}

/// `r` pinned whole by `owner` (and mapped for DMA when `dma`): an exclusive lease over it (device-DAX has no
/// layout to lease), its holes and unwritten extents written (a pin needs written extents, and a `create=on`
/// file is all unwritten), then one pin.
fn pin_whole_region(
    mapper: &Mapper,
    owner: OwnerId,
    r: &crate::region_registry::Region,
    dma: bool,
) -> Result<(), daxvisor_mapper::MapperError> {
    if r.kind() != daxvisor_mapper::BackingKind::DevDax {
        mapper.acquire(owner, r.id, 0, r.size(), LeaseMode::Exclusive)?;
        mapper.prepare(owner, r.id, 0, r.size(), &mut |_| {})?;
    }
    mapper.pin_with(owner, r.id, 0, r.size(), dma)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dma=whole` on a file `create=on` just made (all unwritten extents): the extents are written first, so the
    /// pin holds, and a punch over it is refused naming the device's owner. (The DMA mapping itself needs VFIO,
    /// which this machine lacks: the lab's NVMe scenario maps it.)
    #[test]
    fn a_memlock_limit_below_what_passthrough_pins_is_refused_with_the_remedy_unless_ipc_lock() {
        let mib = 1 << 20;
        let e = memlock_enough(Some(8 * mib), false, 256 * mib)
            .unwrap_err()
            .to_string();
        assert!(e.contains("8388608") && e.contains("268435456"), "{e}");
        assert!(
            e.contains("ulimit -l 262144") && e.contains("CAP_IPC_LOCK"),
            "{e}"
        );
        assert!(memlock_enough(Some(8 * mib), true, 256 * mib).is_ok());
        assert!(memlock_enough(Some(256 * mib), false, 256 * mib).is_ok());
        assert!(memlock_enough(None, false, 256 * mib).is_ok());
    }

    #[test]
    fn a_whole_pin_writes_a_new_files_extents_first_and_refuses_a_punch() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mapper = Mapper::new(Arc::new(crate::lease_manager::LogNotifier), None);
        let r = crate::region_registry::test_region(&mapper, dir.path(), "pcw", 4 << 20);
        let owner = mapper.add_owner("device:nvme0");
        pin_whole_region(&mapper, owner, &r, false).unwrap();
        let e = mapper.punch(None, r.id, 1 << 20, 1 << 20).unwrap_err();
        assert_eq!(e.errno(), libc::ETXTBSY);
        assert!(e.to_string().contains("device:nvme0"), "{e}");
    }

    #[test]
    fn device_option_parses_and_names_mistakes() {
        let c: DeviceConfig = "vfio=/sys/bus/pci/devices/0000:00:04.0,id=nvme0"
            .parse()
            .unwrap();
        assert_eq!(c.path, PathBuf::from("/sys/bus/pci/devices/0000:00:04.0"));
        assert_eq!(c.id.as_deref(), Some("nvme0"));
        assert_eq!("vfio=/x".parse::<DeviceConfig>().unwrap().id, None);
        assert!(!"vfio=/x".parse::<DeviceConfig>().unwrap().iommu);
        assert!("vfio=/x,iommu=on".parse::<DeviceConfig>().unwrap().iommu);
        for bad in [
            "id=a",
            "vfio=",
            "vfio=/x,id=has space",
            "vfio=/x,colour=red",
            "vfio=/x,vfio=/y",
            "vfio=/x,iommu=maybe",
        ] {
            assert!(bad.parse::<DeviceConfig>().is_err(), "{bad}");
        }
    }
}
