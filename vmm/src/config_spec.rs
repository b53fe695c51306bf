//! The VM's configuration as data: what `GET /vm` reports and what `daxvisor run --config FILE` reads, one
//! schema (`VmConfigView` in the OpenAPI document). A file may leave out anything that has a default and may
//! give sizes as numbers or in the size syntax of the command line (`64M`); `GET /vm` fills in every default.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::config::{CpuidMask, SerialOutput, VmConfig};
use crate::pmem::PmemConfig;
use crate::seccomp::SeccompMode;

/// The VM configuration (what `GET /vm` reports and `daxvisor run --config FILE` reads).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfigView {
    /// The VM's name (`--name`): its socket in the socket directory and the `vm` label of its metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// A Linux bzImage or ELF vmlinux, or a freestanding ELF; null = the test guest built into daxvisor.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// `stdout`, `none` or a file path.
    #[serde(default = "default_serial")]
    pub serial: String,
    /// `stdout`, `none` or a file path.
    #[serde(default = "default_console")]
    pub console: String,
    /// `auto`, `nested` or `none`.
    #[serde(default = "default_auto")]
    pub cpuid_mask: String,
    /// `on`, `log` or `off`.
    #[serde(default = "default_on")]
    pub seccomp: String,
    /// The pmem regions, in order.
    #[serde(default)]
    pub pmem: Vec<PmemView>,
    /// The operator API's socket.
    #[serde(default)]
    pub api_socket: Option<String>,
    /// The loopback address Prometheus scrapes (`127.0.0.1:PORT`).
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// How virtio devices reach the guest: `mmio` (default) or `pci`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// Bytes of guest-physical space reserved for regions added while the VM runs (`--pmem-hotplug`; 0: none).
    #[serde(default)]
    pub pmem_hotplug: u64,
}

fn default_dma() -> String {
    "off".into()
}

fn default_transport() -> String {
    "mmio".into()
}

/// One pmem region as configured (`--pmem` as data).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PmemView {
    /// The region's name; default `pmemN`.
    #[serde(default)]
    pub id: Option<String>,
    pub file: String,
    /// Bytes (a number, or a size such as "64M"); null = the file's size.
    #[serde(default, deserialize_with = "size_or_text")]
    #[schema(value_type = Option<u64>)]
    pub size: Option<u64>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub discard_writes: bool,
    #[serde(default)]
    pub create: bool,
    #[serde(default)]
    pub prefault: bool,
    /// `deny`, `hold` or `log`.
    #[serde(default = "default_guard")]
    pub guard: String,
    /// What a passthrough device may reach by DMA: `off` (default), `agent` or `whole`.
    #[serde(default = "default_dma")]
    pub dma: String,
    /// Another process may keep the file open for writing at start (`shared=on`).
    #[serde(default)]
    pub shared: bool,
    /// Mappable through the virtual IOMMU, and what a change over a mapped range does: `off` (default),
    /// `refuse` or `recall`.
    #[serde(default = "default_dma")]
    pub iommu: String,
}

fn default_memory_mib() -> u64 {
    256
}
fn default_cpus() -> u8 {
    1
}
fn default_serial() -> String {
    "stdout".into()
}
fn default_console() -> String {
    "none".into()
}
fn default_auto() -> String {
    "auto".into()
}
fn default_on() -> String {
    "on".into()
}
fn default_guard() -> String {
    "deny".into()
}

fn size_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(s)) => daxvisor_proto::units::parse_size(&s)
            .map(Some)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "size {s:?}: {e}; expected {}",
                    daxvisor_proto::units::SIZE_SYNTAX
                ))
            }),
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("--config {path}: {field}: {message}")]
    Value {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

fn output_text(o: &SerialOutput) -> String {
    match o {
        SerialOutput::Stdout => "stdout".into(),
        SerialOutput::None => "none".into(),
        SerialOutput::File(p) => p.display().to_string(),
    }
}

fn value_enum_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

impl VmConfig {
    /// The configuration as data; `region_names` are the regions' names in order (defaults filled in).
    pub fn view(&self, region_names: &[String]) -> VmConfigView {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        VmConfigView {
            name: self.name.clone(),
            kernel: path(&self.kernel),
            cmdline: self.cmdline.clone(),
            initrd: path(&self.initrd),
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            serial: output_text(&self.serial),
            console: output_text(&self.console),
            cpuid_mask: value_enum_name(&self.cpuid_mask),
            seccomp: value_enum_name(&self.seccomp),
            pmem: self
                .pmem
                .iter()
                .enumerate()
                .map(|(i, p)| PmemView {
                    id: region_names.get(i).cloned().or_else(|| p.id.clone()),
                    file: p.file.display().to_string(),
                    size: p.size,
                    readonly: p.readonly,
                    discard_writes: p.discard_writes,
                    create: p.create,
                    prefault: p.prefault,
                    guard: p.guard.as_str().to_owned(),
                    dma: p.dma.as_str().to_owned(),
                    shared: p.shared,
                    iommu: p.iommu.as_str().to_owned(),
                })
                .collect(),
            api_socket: path(&self.api_socket),
            metrics_addr: self.metrics_addr.map(|a| a.to_string()),
            transport: match self.transport {
                crate::config::Transport::Mmio => "mmio",
                crate::config::Transport::Pci => "pci",
            }
            .to_owned(),
            pmem_hotplug: self.pmem_hotplug,
        }
    }

    /// The configuration in `path` (JSON, the schema of `GET /vm`'s `config`).
    pub fn from_file(path: &std::path::Path) -> Result<VmConfig, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let view: VmConfigView =
            serde_json::from_str(&text).map_err(|source| ConfigFileError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let bad = |field: &'static str, message: String| ConfigFileError::Value {
            path: path.to_owned(),
            field,
            message,
        };
        let output = |field, s: &str| s.parse::<SerialOutput>().map_err(|e| bad(field, e));
        let pmem = view
            .pmem
            .iter()
            .map(|p| {
                let guard = daxvisor_mapper::GuardPolicy::ALL
                    .into_iter()
                    .find(|g| g.as_str() == p.guard)
                    .ok_or_else(|| {
                        bad(
                            "pmem.guard",
                            format!("{:?}: expected deny, hold or log", p.guard),
                        )
                    })?;
                Ok(PmemConfig {
                    file: PathBuf::from(&p.file),
                    size: p.size,
                    readonly: p.readonly,
                    discard_writes: p.discard_writes,
                    id: p.id.clone(),
                    create: p.create,
                    prefault: p.prefault,
                    guard,
                    dma: crate::pmem::DmaPolicy::ALL
                        .into_iter()
                        .find(|d| d.as_str() == p.dma)
                        .ok_or_else(|| {
                            bad(
                                "pmem.dma",
                                format!("{:?}: expected off, agent or whole", p.dma),
                            )
                        })?,
                    shared: p.shared,
                    iommu: crate::pmem::IommuPolicy::ALL
                        .into_iter()
                        .find(|d| d.as_str() == p.iommu)
                        .ok_or_else(|| {
                            bad(
                                "pmem.iommu",
                                format!("{:?}: expected off, refuse or recall", p.iommu),
                            )
                        })?,
                })
            })
            .collect::<Result<Vec<_>, ConfigFileError>>()?;
        if let Some(name) = &view.name {
            crate::socket_dir::check_name(name).map_err(|e| bad("name", e.to_string()))?;
        }
        Ok(VmConfig {
            name: view.name.clone(),
            kernel: view.kernel.as_ref().map(PathBuf::from),
            cmdline: view.cmdline.clone(),
            initrd: view.initrd.as_ref().map(PathBuf::from),
            memory_mib: view.memory_mib,
            cpus: view.cpus,
            serial: output("serial", &view.serial)?,
            console: output("console", &view.console)?,
            cpuid_mask: <CpuidMask as clap::ValueEnum>::from_str(&view.cpuid_mask, false)
                .map_err(|e| bad("cpuid_mask", e))?,
            seccomp: <SeccompMode as clap::ValueEnum>::from_str(&view.seccomp, false)
                .map_err(|e| bad("seccomp", e))?,
            pmem,
            api_socket: view.api_socket.as_ref().map(PathBuf::from),
            metrics_addr: view
                .metrics_addr
                .as_deref()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| bad("metrics_addr", format!("{a:?}: {e}")))
                })
                .transpose()?,
            transport: <crate::config::Transport as clap::ValueEnum>::from_str(
                &view.transport,
                false,
            )
            .map_err(|e| bad("transport", e))?,
            pmem_hotplug: view.pmem_hotplug,
            // Passthrough devices are given on the command line (`--device`), not in the file.
            devices: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_defaults_left_out_reads_back_as_the_full_view() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vm.json");
        std::fs::write(
            &f,
            r#"{"name":"vm1","memory_mib":128,"pmem":[{"file":"/tmp/x.img","size":"64M","id":"data","create":true}]}"#,
        )
        .unwrap();
        let c = VmConfig::from_file(&f).unwrap();
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.pmem[0].size, Some(64 << 20));
        let v = c.view(&["data".into()]);
        assert_eq!(v.seccomp, "on");
        assert_eq!(v.serial, "stdout");
        assert_eq!(v.pmem[0].guard, "deny");
        // What GET /vm reports reads back as the same configuration.
        std::fs::write(&f, serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(VmConfig::from_file(&f).unwrap().view(&["data".into()]), v);
    }

    #[test]
    fn a_bad_file_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vm.json");
        std::fs::write(&f, r#"{"memory":"1G"}"#).unwrap();
        assert!(VmConfig::from_file(&f)
            .unwrap_err()
            .to_string()
            .contains("unknown field `memory`"));
        std::fs::write(&f, r#"{"seccomp":"maybe"}"#).unwrap();
        assert!(VmConfig::from_file(&f)
            .unwrap_err()
            .to_string()
            .contains("seccomp"));
        std::fs::write(&f, r#"{"pmem":[{"file":"x","size":"12X"}]}"#).unwrap();
        assert!(VmConfig::from_file(&f)
            .unwrap_err()
            .to_string()
            .contains("12X"));
    }
}
