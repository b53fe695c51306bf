//! What must hold before a device is opened for passthrough, read from sysfs so that each failure names its
//! cause and its remedy: the device exists, it is bound to vfio-pci, the host has an IOMMU (the device has an
//! IOMMU group), and the group holds no other device (a group is assigned whole).

use std::fs;
use std::path::{Path, PathBuf};

/// Why a device cannot be assigned, found before anything is opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "--device vfio={path}: no such PCI device; remedy: give its sysfs directory, e.g. /sys/bus/pci/devices/0000:01:00.0"
    )]
    NoDevice { path: PathBuf },
    #[error(
        "--device vfio={path}: the device is {bound}, not bound to vfio-pci; remedy: `echo vfio-pci > {path}/driver_override`, {unbind}`echo {bdf} > /sys/bus/pci/drivers_probe` (modprobe vfio-pci first)"
    )]
    NotVfioPci {
        path: PathBuf,
        bdf: String,
        bound: String,
        unbind: String,
    },
    #[error(
        "--device vfio={path}: the device has no IOMMU group: the host runs without an IOMMU; remedy: enable VT-d (AMD-Vi) in the firmware and boot with intel_iommu=on (amd_iommu=on)"
    )]
    NoIommu { path: PathBuf },
    #[error(
        "--device vfio={path}: IOMMU group {group} also holds {others}: a group is assigned whole, and those devices would share the guest's DMA view; remedy: put the device in a slot with a group of its own (or behind an ACS-capable port)"
    )]
    GroupShared {
        path: PathBuf,
        group: u32,
        others: String,
    },
}

/// The device's IOMMU group number, once everything above holds for the device at `path` (its sysfs
/// directory).
pub fn check(path: &Path) -> Result<u32, PreflightError> {
    let dev = fs::canonicalize(path).map_err(|_| PreflightError::NoDevice {
        path: path.to_owned(),
    })?;
    if !dev.join("config").exists() {
        return Err(PreflightError::NoDevice {
            path: path.to_owned(),
        });
    }
    let bdf = name_of(&dev);
    match fs::read_link(dev.join("driver")).ok().map(|d| name_of(&d)) {
        Some(d) if d == "vfio-pci" => {}
        driver => {
            let (bound, unbind) = match driver {
                Some(d) => (
                    format!("bound to {d}"),
                    format!("`echo {bdf} > /sys/bus/pci/drivers/{d}/unbind`, "),
                ),
                None => ("bound to no driver".to_owned(), String::new()),
            };
            return Err(PreflightError::NotVfioPci {
                path: path.to_owned(),
                bdf,
                bound,
                unbind,
            });
        }
    }
    let group_dir =
        fs::canonicalize(dev.join("iommu_group")).map_err(|_| PreflightError::NoIommu {
            path: path.to_owned(),
        })?;
    let group: u32 = name_of(&group_dir)
        .parse()
        .map_err(|_| PreflightError::NoIommu {
            path: path.to_owned(),
        })?;
    let mut others: Vec<String> = fs::read_dir(group_dir.join("devices"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| *n != bdf)
                .collect()
        })
        .unwrap_or_default();
    if !others.is_empty() {
        others.sort();
        return Err(PreflightError::GroupShared {
            path: path.to_owned(),
            group,
            others: others.join(", "),
        });
    }
    Ok(group)
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// This machine's real PCI devices are bound to virtio-pci or to nothing, and it has no IOMMU: the error
    /// names the driver and how to rebind.
    #[test]
    fn a_real_device_not_bound_to_vfio_pci_is_refused_naming_its_driver() {
        let Some(dev) = fs::read_dir("/sys/bus/pci/devices")
            .ok()
            .and_then(|mut rd| rd.find_map(|e| e.ok()))
            .map(|e| e.path())
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "prerequisite missing under CI=true: a PCI device in /sys/bus/pci/devices"
            );
            eprintln!("SKIP: no PCI device in sysfs");
            return;
        };
        match check(&dev) {
            Err(PreflightError::NotVfioPci { .. }) => {}
            Err(PreflightError::NoIommu { .. }) => {}
            other => panic!("{}: {other:?}", dev.display()),
        }
        if let Err(e @ PreflightError::NotVfioPci { .. }) = check(&dev) {
            let msg = e.to_string();
            assert!(
                msg.contains("not bound to vfio-pci") && msg.contains("driver_override"),
                "{msg}"
            );
        }
        let e = check(Path::new("/sys/bus/pci/devices/0000:ff:1f.7")).unwrap_err();
        assert!(matches!(e, PreflightError::NoDevice { .. }), "{e}");
    }

    /// A sysfs-shaped tree in a temporary directory stands in for a device bound to vfio-pci (this machine has
    /// no IOMMU, so no real device can be): no group, a shared group and a group of its own.
    #[test]
    fn iommu_and_group_checks_name_cause_and_remedy() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("drivers/vfio-pci")).unwrap();
        let dev = root.join("devices/0000:00:04.0");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("config"), [0u8; 64]).unwrap();
        symlink(root.join("drivers/vfio-pci"), dev.join("driver")).unwrap();
        let e = check(&dev).unwrap_err();
        assert!(matches!(e, PreflightError::NoIommu { .. }), "{e}");
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");

        let group = root.join("iommu_groups/9");
        fs::create_dir_all(group.join("devices")).unwrap();
        symlink(&dev, group.join("devices/0000:00:04.0")).unwrap();
        symlink(&group, dev.join("iommu_group")).unwrap();
        assert_eq!(check(&dev), Ok(9));

        fs::create_dir_all(root.join("devices/0000:00:05.0")).unwrap();
        symlink(
            root.join("devices/0000:00:05.0"),
            group.join("devices/0000:00:05.0"),
        )
        .unwrap();
        let e = check(&dev).unwrap_err();
        assert!(
            matches!(&e, PreflightError::GroupShared { group: 9, others, .. } if others == "0000:00:05.0"),
            "{e}"
        );
    }
}
