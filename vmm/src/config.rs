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

#[derive(Clone, Debug)]
pub struct VmConfig {
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
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * MIB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
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
    }
}
