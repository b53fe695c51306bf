//! What the operator asked for, validated: the VM's configuration as the rest of the VMM sees it.

use std::path::PathBuf;

use crate::layout::{MIB, MIN_MEMORY_MIB};

/// Where a guest console goes (`--serial`, `--console`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    None,
}

impl std::str::FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::None),
            "" => Err("empty value; use stdout, none or a file path".into()),
            path => Ok(SerialOutput::File(PathBuf::from(path))),
        }
    }
}

/// Which CPUID features to hide from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuidMask {
    /// Hide the nested-emulation gaps when the host itself runs under a hypervisor, else none.
    Auto,
    /// Always hide the features nested KVM emulators get wrong (see vstate/cpuid.rs).
    Nested,
    /// Pass KVM's supported CPUID through unchanged.
    None,
}

/// How virtio devices reach the guest (`--transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// virtio-mmio windows described in the ACPI DSDT, one IOAPIC line each (the default).
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI root bus (ECAM + MCFG, a PNP0A08 host bridge), MSI-X interrupts.
    Pci,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    /// `--name`: the VM's socket in the socket directory (`crate::socket_dir`) and its metrics' `vm` label.
    pub name: Option<String>,
    /// None = the test guest embedded in the binary.
    pub kernel: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u64,
    pub cpus: u8,
    pub serial: SerialOutput,
    /// Where the guest's virtio console (hvc0) goes; with `stdout`, host stdin reaches it too.
    pub console: SerialOutput,
    pub cpuid_mask: CpuidMask,
    /// What a syscall outside a thread's seccomp list does.
    pub seccomp: crate::seccomp::SeccompMode,
    /// `--pmem` regions, in order (guest addresses and virtio-mmio windows are assigned in this order).
    pub pmem: Vec<crate::pmem::PmemConfig>,
    /// `--api-socket`: serve the operator API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// `--transport`: virtio-mmio or virtio-pci for every virtio device of the VM.
    pub transport: Transport,
    /// `--metrics-addr`: serve `GET /metrics` on this loopback TCP address too.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--pmem-hotplug`: bytes of guest-physical space reserved for regions added while the VM runs (0: none).
    pub pmem_hotplug: u64,
    /// `--device vfio=`: host PCI devices passed through.
    pub devices: Vec<crate::vfio::DeviceConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--memory {0} MiB is too little: at least {MIN_MEMORY_MIB} MiB is needed")]
    TooLittleMemory(u64),
    #[error("--memory {0} MiB is more than this VMM supports (1 TiB)")]
    TooMuchMemory(u64),
    #[error("--cpus {0}: must be between 1 and 254")]
    BadCpus(u32),
    #[error("--initrd needs a Linux --kernel (the built-in test guest takes no initrd)")]
    InitrdWithoutKernel,
    #[error(
        "{given} --pmem regions: the built-in test guest takes at most {max} with --memory {memory_mib} MiB (its \
         boot block holds {ranges} memory ranges: RAM, the device window and one per pmem region); give fewer, \
         or a Linux --kernel"
    )]
    TooManyPmemForTestGuest {
        given: usize,
        max: usize,
        memory_mib: u64,
        ranges: usize,
    },
    #[error("--metrics-addr {0}: must be a loopback address (127.0.0.1:PORT or [::1]:PORT); the metrics are not for the network")]
    MetricsNotLoopback(std::net::SocketAddr),
    #[error("--pmem-hotplug needs --transport pci (added regions are virtio-pci functions)")]
    HotplugWithoutPci,
    #[error("--pmem-hotplug {0:#x}: must be a multiple of 2 MiB and at most 1 TiB")]
    BadHotplugSize(u64),
    #[error("--device vfio= needs --transport pci (a passthrough device is a PCI function)")]
    DeviceNeedsPci,
    #[error("--pmem id={0}: dma=agent|whole needs a passthrough device (--device vfio=...)")]
    DmaWithoutDevice(String),
    /// A virtual IOMMU configuration that cannot work (`crate::viommu::setup::wanted` names why).
    #[error("{0}")]
    Viommu(String),
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory_mib));
        }
        if self.memory_mib > (1 << 20) {
            return Err(ConfigError::TooMuchMemory(self.memory_mib));
        }
        if self.cpus == 0 || self.cpus == 255 {
            return Err(ConfigError::BadCpus(self.cpus.into()));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(ConfigError::InitrdWithoutKernel);
        }
        if self.kernel.is_none() {
            let ranges = daxvisor_proto::boot::MAX_MEM_RANGES;
            let fixed = crate::layout::ram_ranges(self.memory_bytes()).len() + 1;
            let max = ranges.saturating_sub(fixed);
            if self.pmem.len() > max {
                return Err(ConfigError::TooManyPmemForTestGuest {
                    given: self.pmem.len(),
                    max,
                    memory_mib: self.memory_mib,
                    ranges,
                });
            }
        }
        if let Some(a) = self.metrics_addr {
            if !a.ip().is_loopback() {
                return Err(ConfigError::MetricsNotLoopback(a));
            }
        }
        if self.pmem_hotplug > 0 {
            if self.transport != Transport::Pci {
                return Err(ConfigError::HotplugWithoutPci);
            }
            if !self.pmem_hotplug.is_multiple_of(crate::layout::PMEM_ALIGN)
                || self.pmem_hotplug > 1 << 40
            {
                return Err(ConfigError::BadHotplugSize(self.pmem_hotplug));
            }
        }
        if !self.devices.is_empty() && self.transport != Transport::Pci {
            return Err(ConfigError::DeviceNeedsPci);
        }
        if self.devices.is_empty() {
            if let Some((i, p)) = self
                .pmem
                .iter()
                .enumerate()
                .find(|(_, p)| p.dma != crate::pmem::DmaPolicy::Off)
            {
                return Err(ConfigError::DmaWithoutDevice(
                    p.id.clone().unwrap_or_else(|| format!("pmem{i}")),
                ));
            }
        }
        crate::viommu::setup::wanted(&self.devices, &self.pmem, self.transport == Transport::Pci)
            .map_err(|e| ConfigError::Viommu(e.to_string()))?;
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * MIB
    }
}

/// `--memory`: a bare number is MiB (`256`); otherwise the size syntax of every command (`1G`, `512MiB`),
/// which must be whole MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    if let Ok(mib) = s.trim().parse::<u64>() {
        return Ok(mib);
    }
    let bytes = daxvisor_proto::units::parse_size(s).map_err(|e| {
        format!(
            "'{s}': {e}; expected MiB or {}",
            daxvisor_proto::units::SIZE_SYNTAX
        )
    })?;
    if bytes % MIB != 0 {
        return Err(format!("'{s}': guest RAM must be whole MiB"));
    }
    Ok(bytes / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            name: None,
            metrics_addr: None,
            kernel: None,
            cmdline: None,
            initrd: None,
            memory_mib: 128,
            cpus: 1,
            serial: SerialOutput::Stdout,
            console: SerialOutput::None,
            cpuid_mask: CpuidMask::Auto,
            pmem: Vec::new(),
            seccomp: crate::seccomp::SeccompMode::On,
            api_socket: None,
            transport: Transport::Mmio,
            pmem_hotplug: 0,
            devices: Vec::new(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(base().validate().is_ok());
        let e = VmConfig {
            memory_mib: 4,
            ..base()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("too little"));
        assert!(VmConfig { cpus: 0, ..base() }.validate().is_err());
        assert!(VmConfig {
            initrd: Some("x".into()),
            ..base()
        }
        .validate()
        .is_err());
        assert_eq!("stdout".parse::<SerialOutput>(), Ok(SerialOutput::Stdout));
        assert_eq!(
            "/tmp/x".parse::<SerialOutput>(),
            Ok(SerialOutput::File("/tmp/x".into()))
        );
        assert!("".parse::<SerialOutput>().is_err());
        assert!(VmConfig {
            metrics_addr: Some("0.0.0.0:9100".parse().unwrap()),
            ..base()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn memory_takes_mib_or_a_size() {
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert_eq!(parse_memory_mib("1G"), Ok(1024));
        assert_eq!(parse_memory_mib("512MiB"), Ok(512));
        assert!(parse_memory_mib("1000K").is_err());
        assert!(parse_memory_mib("1X").is_err());
    }
}
