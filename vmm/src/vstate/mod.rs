//! KVM state: the VM (memory slots, interrupt controllers), CPUID, and vCPU threads.

pub mod cpuid;
pub mod kvm_page_tables;
pub mod vcpu;
pub mod vm;
