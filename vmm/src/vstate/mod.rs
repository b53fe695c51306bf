//! KVM state: the VM (memory slots, interrupt controllers), CPUID, and vCPU threads.

pub mod cpuid;
pub mod pre_fault;
pub mod vcpu;
pub mod vm;
