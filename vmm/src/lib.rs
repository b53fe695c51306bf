//! daxvisor: a KVM VMM giving guests file-backed persistent memory with layout leases.
//!
//! - [`config`]: the validated VM configuration.
//! - [`config_spec`]: the configuration as data (`GET /vm`, `daxvisor run --config FILE`).
//! - [`socket_dir`]: where a host's VMs keep their API sockets (`--name`, `daxvisor-ctl list`).
//! - [`console`]: the virtio-console device (guest console and agent port).
//! - [`builder`]: builds a VM from its configuration (the order of start-up).
//! - [`vmm`]: the running VM as one object ([`vmm::Vmm`]): run, and the order of shutdown.
//! - [`region_registry`]: every fact about the VM's pmem regions, once.
//! - [`actions`]: everything that changes a running VM, as typed calls (the API's handlers call them).
//! - [`events`]: the VM's event log, with typed event kinds.
//! - [`threads`]: the one way a VMM thread starts (name, seccomp, capabilities) and the panic policy.
//! - [`layout`]: every guest physical address.
//! - [`boot`]: kernel images and boot protocols (Linux, the test guest).
//! - [`vstate`]: KVM VM, CPUID, vCPU threads.
//! - [`device_manager`]: which device sits where; irqfd/ioeventfd wiring.
//! - [`pci`]: the PCI root bus, BAR/GSI allocation and MSI-X routing for `--transport pci`.
//! - [`event_loop`]: the event-manager loop.
//! - [`pmem`]: persistent-memory backings.
//! - [`host_files`]: kernel, initrd and serial files; the undo list of a refused start.
//! - [`signals`]: SIGINT/SIGTERM stop the VM cleanly.
//! - [`seccomp`]: the per-thread seccomp filters.
//! - [`malloc_prime`]: what glibc reads lazily, read before any filter.
//! - [`lease_manager`]: drives the layout-lease library (the `daxvisor-mapper` crate) for a running VM.
//! - [`log_burst`]: repeated log lines folded into one per burst, with a count.
//! - [`api`]: the operator API (REST over a Unix socket, OpenAPI, metrics).
//! - [`acpi`]: the guest's ACPI tables (RSDP, XSDT, FADT, MADT, MCFG, DSDT).
//! - [`agent`]: the agent service between the virtio-console agent port and the mapper.

/// `--version` of every daxvisor binary: the package version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("DAXVISOR_COMMIT"),
    ")"
);

pub mod acpi;
pub mod actions;
pub mod agent;
pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
pub mod config_spec;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod events;
pub mod host_files;
pub mod hotplug;
pub mod layout;
pub mod lease_manager;
pub mod log_burst;
pub mod malloc_prime;
pub mod pci;
pub mod pmem;
pub mod privileges;
pub mod reclaim;
pub mod region_registry;
pub mod seccomp;
pub mod signals;
pub mod socket_dir;
pub mod threads;
pub mod vfio;
pub mod viommu;
pub mod vmm;
pub mod vstate;
