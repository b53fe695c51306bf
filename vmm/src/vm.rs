//! Building and running one VM from a [`VmConfig`]: the order of operations lives here and nowhere else.
//!
//! Everything that can be wrong with the operator's input (config, kernel, initrd, /dev/kvm) is checked before
//! anything is created on the host. What later steps create or extend (the serial file, `create=on` backings)
//! is recorded in a [`StartUndo`] that puts it back if any step before the guest runs fails, so a refused start
//! leaves nothing behind.

use std::path::PathBuf;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::acpi;
use crate::api::{ApiContext, ApiServer, RegionHandle, VmConfigView};
use crate::boot::image::{self, ImageKind};
use crate::boot::{linux, long_mode, testguest, BootEntry, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::host_files::{self, HostFileError, StartUndo};
use crate::layout;
use crate::lease_manager::LeaseManager;
use crate::pmem::fault::FaultMap;
use crate::pmem::{self, PmemError};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::signals::StopSignals;
use crate::vstate::cpuid;
use crate::vstate::vcpu::{self, RunState, StopReason, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use std::sync::Arc;

/// Errors before the guest runs: the operator's input or the host environment. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot start the reclaim thread: {0}")]
    Reclaim(std::io::Error),
    #[error("cannot read CPUID from KVM: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("layout-lease manager: {0}")]
    Leases(#[from] daxvisor_mapper::MapperError),
    #[error(transparent)]
    Pmem(#[from] PmemError),
    #[error(transparent)]
    HostFile(#[from] HostFileError),
    #[error("cannot watch SIGINT/SIGTERM: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiSocketError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
}

/// How a VM that ran came to an end.
#[derive(Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the exit port.
    Status(i32),
    /// The guest reset or powered off (Linux `reboot`, i8042): a clean end.
    Reset,
    /// The guest could not continue.
    Crash {
        vcpu: u8,
        reason: String,
        detail: String,
    },
    /// KVM or the VMM failed while the guest ran.
    VmmError(String),
    /// SIGINT or SIGTERM (the number) stopped the VM; the stop was clean.
    Signal(i32),
}

/// The kernel the config names, read and classified up front so bad input fails before anything is created.
enum Kernel {
    Linux { path: PathBuf, kind: ImageKind },
    Freestanding(Vec<u8>),
}

/// Largest freestanding ELF read into memory (the test guest is a few hundred KiB).
const FREESTANDING_MAX: u64 = 64 << 20;

fn resolve_kernel(config: &VmConfig) -> Result<Kernel, StartError> {
    let Some(path) = &config.kernel else {
        if testguest::EMBEDDED.is_empty() {
            return Err(BootError::NoTestGuest.into());
        }
        return Ok(Kernel::Freestanding(testguest::EMBEDDED.to_vec()));
    };
    let mut file = host_files::open_regular(path, "--kernel")?;
    let Some(kind) = image::classify_file(&file) else {
        let magic = host_files::read_head(&mut file, 4).unwrap_or_default();
        return Err(BootError::UnknownFormat {
            path: path.clone(),
            magic,
        }
        .into());
    };
    Ok(match kind {
        ImageKind::FreestandingElf => Kernel::Freestanding(host_files::read_bounded(
            &mut file,
            path,
            "--kernel",
            FREESTANDING_MAX,
        )?),
        kind => Kernel::Linux {
            path: path.clone(),
            kind,
        },
    })
}

/// Build the VM described by `config`, run it to its end, and say how it ended.
pub fn run(config: &VmConfig) -> Result<VmExit, StartError> {
    config.validate()?;
    seccomp::init(config.seccomp)?;
    // Threads started from here on drop the capabilities start-up needed when they begin (privileges.rs).
    crate::privileges::init();
    let kernel = resolve_kernel(config)?;
    if let Some(initrd) = &config.initrd {
        host_files::open_regular(initrd, "--initrd")?;
    }
    // Declared first so it is dropped last: after the regions are unmapped and the VM is gone.
    let mut undo = StartUndo::new();

    let mut vm = Vm::new()?;
    let mem_bytes = config.memory_bytes();
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| StartError::Memory {
        mib: config.memory_mib,
        source,
    })?;
    vm.register_memory(&mem)?;

    let state = RunState::new()?;
    let serial_out = host_files::open_output(&config.serial, "--serial", &mut undo)?;
    let mut devices = DeviceManager::new(vm.fd(), serial_out, state.stopper())?;
    let mut event_loop = EventLoop::new(state.clone())?;
    // Before pmem::attach: its flush workers must inherit the host guard's blocked signal, and the guard's
    // fanotify group and marks are made here, during setup (before capabilities are dropped).
    // The VM's event log: the lease manager records notices and guard events; the operator API serves it.
    let events = Arc::new(crate::api::events::EventLog::default());
    let routes = crate::agent::Routes::new();
    let agent_counters = Arc::new(crate::agent::AgentCounters::default());
    let leases = LeaseManager::with_notifier(
        Arc::new(crate::agent::AgentNotifier::new(routes.clone())),
        events.clone(),
    )?;
    // Kept alive until the VM is gone: dropping a region unmaps its backing.
    let pmem_regions = pmem::attach(
        &config.pmem,
        mem_bytes,
        &mut vm,
        &mut devices,
        &mut event_loop,
        &mem,
        &leases,
    )?;
    pmem::attach::record_undo(&pmem_regions, &mut undo)?;
    let faults = FaultMap::new(&pmem_regions)?;
    let reclaim = crate::reclaim::Reclaim::start(
        leases.mapper().clone(),
        events.clone(),
        pmem_regions
            .iter()
            .map(|r| crate::reclaim::ReclaimRegion {
                id: r.region,
                name: r.id().to_owned(),
                kind: r.backing.kind(),
                size: r.backing.size(),
            })
            .collect(),
    )
    .map_err(StartError::Reclaim)?;
    // After the pmem devices, so their virtio-mmio windows keep their places.
    let console_out = host_files::open_output(&config.console, "--console", &mut undo)?;
    let console = crate::console::attach(
        &config.console,
        console_out,
        vm.fd(),
        &mem,
        &mut devices,
        &mut event_loop,
        crate::console::AgentSetup {
            mapper: leases.mapper().clone(),
            regions: pmem_regions
                .iter()
                .map(crate::agent::RegionEntry::from)
                .collect(),
            routes,
            counters: agent_counters.clone(),
            reclaim: reclaim.clone(),
        },
    )?;
    let pmem_windows: Vec<(u64, u64)> = pmem_regions
        .iter()
        .map(|r| (r.guest_addr, r.backing.size()))
        .collect();

    long_mode::write_tables(&mem).map_err(BootError::from)?;
    let acpi_devices: Vec<acpi::VirtioMmioAcpi> = devices
        .virtio_slots
        .iter()
        .map(|s| acpi::VirtioMmioAcpi {
            base: s.base,
            size: s.size,
            irq: s.irq,
        })
        .collect();
    let rsdp = acpi::create_acpi_tables(&mem, config.cpus, &acpi_devices)?;
    let entry = load_kernel(config, &kernel, &mem, &devices, &pmem_windows, rsdp.0)?;

    let base_cpuid = cpuid::supported(vm.kvm()).map_err(StartError::Cpuid)?;
    let nested = cpuid::apply_nested_mask(config.cpuid_mask);
    tracing::info!(
        nested_cpuid_mask = nested,
        cpus = config.cpus,
        memory_mib = config.memory_mib,
        "starting VM"
    );
    // Dropped when this function returns: the server stops and its socket is removed.
    let _api = match &config.api_socket {
        Some(path) => Some(ApiServer::start(
            path,
            api_context(
                config,
                &leases,
                events.clone(),
                agent_counters.clone(),
                reclaim.clone(),
                &pmem_regions,
                &state,
            ),
        )?),
        None => None,
    };
    vcpu::install_kick_handler()?;
    let mut vcpus = Vec::new();
    for index in 0..config.cpus {
        let mut v = Vcpu::new(
            vm.fd(),
            index,
            devices.pio.clone(),
            devices.mmio.clone(),
            state.clone(),
        )?;
        v.configure(
            &cpuid::for_vcpu(&base_cpuid, index, config.cpus, nested),
            (index == 0).then_some(&entry),
        )?;
        vcpus.push(v);
    }
    if let Some(boot) = vcpus.first() {
        pre_fault_in_kvm(vm.fd(), boot, &config.pmem, &pmem_regions);
    }
    let signals = StopSignals::install(state.clone()).map_err(StartError::Signals)?;
    let mut threads = Vec::new();
    for v in vcpus {
        threads.push(v.spawn()?);
    }
    undo.commit();
    // The end of start-up. The main thread now only runs the event loop and the stop sequence: it drops the
    // capabilities start-up needed (every other thread did so when it began) and installs its filter.
    seccomp::apply_for_thread(ThreadKind::EventLoop)?;

    let loop_result = event_loop.run();
    vcpu::stop_all(&state, threads);
    // The agent session ends with the VM: its owners release everything.
    console.log_summary();
    drop(console);
    // The devices own the flush workers: dropping them answers every flush still queued.
    drop(event_loop);
    drop(devices.mmio);
    leases.end_owners();
    pmem_regions.iter().for_each(pmem::PmemRegion::final_sync);
    pmem_regions.iter().for_each(pmem::PmemRegion::log_summary);
    drop(signals);
    if let Err(e) = loop_result {
        return Ok(VmExit::VmmError(e.to_string()));
    }

    Ok(match (devices.exit_status.get(), state.reason()) {
        (_, Some(StopReason::Signal(signal))) => VmExit::Signal(signal),
        (None, Some(StopReason::MemoryFault { vcpu, gpa })) => VmExit::VmmError(format!(
            "KVM_RUN on vCPU {vcpu}: Bad address (EFAULT): {}",
            faults
                .explain(gpa)
                .unwrap_or_else(|| "the guest touched memory the host cannot provide".into())
        )),
        (Some(status), _) => VmExit::Status(status),
        (
            None,
            Some(StopReason::GuestCrash {
                vcpu,
                reason,
                detail,
            }),
        ) => VmExit::Crash {
            vcpu,
            reason,
            detail,
        },
        (None, Some(StopReason::VmmError(e))) => VmExit::VmmError(e),
        (None, Some(StopReason::GuestRequest | StopReason::Operator) | None) => VmExit::Reset,
    })
}

/// What the operator API works on: the mapper and the regions under the names the operator gave them.
/// prefault=on regions into KVM's own page tables, where KVM offers it (see [`crate::vstate::pre_fault`]). A
/// failure costs only speed, so it is logged and the VM starts.
fn pre_fault_in_kvm(
    vm: &kvm_ioctls::VmFd,
    vcpu: &Vcpu,
    configs: &[pmem::PmemConfig],
    regions: &[pmem::PmemRegion],
) {
    let wanted: Vec<&pmem::PmemRegion> = configs
        .iter()
        .zip(regions)
        .filter(|(c, _)| c.prefault)
        .map(|(_, r)| r)
        .collect();
    if wanted.is_empty() {
        return;
    }
    if !crate::vstate::pre_fault::offered_by(vm) {
        tracing::info!(
            "KVM_PRE_FAULT_MEMORY not offered (it needs EPT/NPT; shadow paging here): the guest's first touch of \
             each page of a prefault=on region is still a KVM fault"
        );
        return;
    }
    for r in wanted {
        let started = std::time::Instant::now();
        match crate::vstate::pre_fault::pre_fault(vcpu.fd(), r.guest_addr, r.backing.size()) {
            Ok(()) => tracing::info!(
                id = %r.id(),
                ms = format_args!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "pmem region pre-faulted in KVM (KVM_PRE_FAULT_MEMORY)"
            ),
            Err(e) => tracing::warn!(
                id = %r.id(),
                "KVM_PRE_FAULT_MEMORY failed ({e}); the guest faults the region in as it touches it"
            ),
        }
    }
}

fn api_context(
    config: &VmConfig,
    leases: &LeaseManager,
    events: Arc<crate::api::events::EventLog>,
    agent: Arc<crate::agent::AgentCounters>,
    reclaim: Arc<crate::reclaim::Reclaim>,
    regions: &[pmem::PmemRegion],
    state: &Arc<RunState>,
) -> Arc<ApiContext> {
    let handles = regions
        .iter()
        .map(|r| RegionHandle {
            name: r.id().to_owned(),
            region: r.region,
            path: r.backing.path().to_owned(),
            kind: r.backing.kind(),
            size: r.backing.size(),
            guest_addr: r.guest_addr,
            readonly: r.backing.readonly(),
            metrics: r.metrics.clone(),
            rate_limit: r.rate_limit.clone(),
        })
        .collect();
    let view = VmConfigView {
        kernel: config.kernel.as_ref().map_or_else(
            || "built-in test guest".to_owned(),
            |k| k.display().to_string(),
        ),
        cmdline: config.cmdline.clone().unwrap_or_default(),
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        pmem: regions.iter().map(|r| r.id().to_owned()).collect(),
    };
    let state = state.clone();
    ApiContext::new(
        leases.mapper().clone(),
        handles,
        view,
        events,
        agent,
        reclaim,
        Box::new(move || state.request_stop(StopReason::Operator)),
    )
}

fn load_kernel(
    config: &VmConfig,
    kernel: &Kernel,
    mem: &GuestMemoryMmap,
    devices: &DeviceManager,
    pmem_windows: &[(u64, u64)],
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    match kernel {
        Kernel::Linux { path, kind } => {
            let base = config.cmdline.as_deref().unwrap_or(linux::DEFAULT_CMDLINE);
            let cmdline = linux::with_kernel_args(base, &devices.virtio_cmdline_args());
            linux::load(
                mem,
                &linux::LinuxBoot {
                    kernel: path,
                    kind: *kind,
                    initrd: config.initrd.as_deref(),
                    cmdline: &cmdline,
                    mem_bytes: config.memory_bytes(),
                    rsdp,
                },
            )
        }
        Kernel::Freestanding(image) => {
            let slots: Vec<_> = devices
                .virtio_slots
                .iter()
                .map(|s| (s.base, s.size, s.irq, s.device_id))
                .collect();
            testguest::load(
                mem,
                image,
                &testguest::MachineInfo {
                    mem_bytes: config.memory_bytes(),
                    cpus: config.cpus,
                    pmem: pmem_windows,
                    devices: &slots,
                    cmdline: config.cmdline.as_deref().unwrap_or(""),
                },
            )
            .map_err(|e| match (e, &config.kernel) {
                // Name the operator's file, not the built-in guest.
                (BootError::Load { source, .. }, Some(path)) => BootError::Load {
                    path: path.clone(),
                    source,
                },
                (e, _) => e,
            })
        }
    }
}
