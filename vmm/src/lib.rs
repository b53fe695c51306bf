//! daxvisor: a KVM VMM giving guests file-backed persistent memory with layout leases.
pub mod acpi;
pub mod layout;
pub mod pmem;
