//! daxvisor: a KVM VMM giving guests file-backed persistent memory with layout leases.
//!
//! - [`config`]: the validated VM configuration.
//! - [`console`]: the virtio-console device (guest console and agent port).
//! - [`vm`]: builds and runs a VM (the order of operations).
//! - [`layout`]: every guest physical address.
//! - [`boot`]: kernel images and boot protocols (Linux, the test guest).
//! - [`vstate`]: KVM VM, CPUID, vCPU threads.
//! - [`device_manager`]: which device sits where; irqfd/ioeventfd wiring.
//! - [`event_loop`]: the event-manager loop.
//! - [`pmem`]: persistent-memory backings.
//! - [`host_files`]: kernel, initrd and serial files; the undo list of a refused start.
//! - [`signals`]: SIGINT/SIGTERM stop the VM cleanly.
//! - [`seccomp`]: the per-thread seccomp filters.
//! - [`lease_manager`]: drives the layout-lease library (the `daxvisor-mapper` crate) for a running VM.
//! - [`api`]: the operator API (REST over a Unix socket, OpenAPI, metrics).
//! - [`acpi`]: the guest's ACPI tables (RSDP, XSDT, FADT, MADT, DSDT).
//! - [`agent`]: the agent service between the virtio-console agent port and the mapper.

pub mod acpi;
pub mod agent;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod host_files;
pub mod layout;
pub mod lease_manager;
pub mod pmem;
pub mod privileges;
pub mod reclaim;
pub mod seccomp;
pub mod signals;
pub mod vm;
pub mod vstate;
