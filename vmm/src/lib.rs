//! daxvisor: a KVM VMM giving guests file-backed persistent memory with layout leases.
pub mod layout;
pub mod mapper;
pub mod pmem;
