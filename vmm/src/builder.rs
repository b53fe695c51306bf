//! Building one VM from a [`VmConfig`] into an owned [`Vmm`]: the order of start-up lives here and nowhere
//! else (the order of shutdown is [`Vmm::stop`]'s).
//!
//! Everything that can be wrong with the operator's input (config, kernel, initrd, /dev/kvm) is checked before
//! anything is created on the host. What later steps create or extend (the serial file, `create=on` backings)
//! is recorded in a [`StartUndo`] that puts it back if any step before the guest runs fails, so a refused start
//! leaves nothing behind.

use std::path::PathBuf;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::acpi;
use crate::actions::Actions;
use crate::api::metrics_listener::MetricsListener;
use crate::api::{ApiContext, ApiServer, VmConfigView};
use crate::boot::image::{self, ImageKind};
use crate::boot::{linux, long_mode, testguest, BootEntry, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::events::EventLog;
use crate::host_files::{self, HostFileError, StartUndo};
use crate::layout;
use crate::lease_manager::LeaseManager;
use crate::pmem::{self, PmemError};
use crate::reclaim::Reclaim;
use crate::region_registry::RegionRegistry;
use crate::seccomp::{self, SeccompError};
use crate::vmm::Vmm;
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
    Interrupted(#[from] crate::signals::Interrupted),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiSocketError),
    #[error(transparent)]
    Metrics(#[from] crate::api::metrics_listener::MetricsListenerError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error(transparent)]
    Hotplug(#[from] crate::hotplug::HotplugError),
    #[error(transparent)]
    Passthrough(#[from] crate::vfio::PassthroughError),
    #[error(transparent)]
    Viommu(#[from] crate::viommu::ViommuError),
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

/// Build the VM `config` describes: everything but the running vCPUs. Nothing the guest can see has run yet;
/// if any step fails, what earlier steps created is put back (`create=on` files, the serial file).
pub fn build(config: &VmConfig) -> Result<Vmm, StartError> {
    config.validate()?;
    seccomp::init(config.seccomp)?;
    // Threads started from here on drop the capabilities start-up needed when they begin (privileges.rs).
    crate::privileges::init();
    let kernel = resolve_kernel(config)?;
    if let Some(initrd) = &config.initrd {
        host_files::open_regular(initrd, "--initrd")?;
    }
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
    // Before any thread starts: a panic anywhere from now on stops this VM cleanly.
    crate::threads::install_panic_policy(&state);
    let serial_out = host_files::open_output(&config.serial, "--serial", &mut undo)?;
    let mut devices = DeviceManager::new(vm.fd(), serial_out, state.stopper())?;
    if config.transport == crate::config::Transport::Pci {
        devices.enable_pci(vm.kvm(), vm.fd())?;
    }
    let mut event_loop = EventLoop::new(state.clone())?;
    // The VM's event log and region registry; the lease manager records notices and guard events under the
    // regions' names. Before pmem::attach: its flush workers must inherit the host guard's blocked signal, and
    // the guard's fanotify group and marks are made here, during setup (before capabilities are dropped).
    let events = Arc::new(EventLog::default());
    let regions = RegionRegistry::new();
    let routes = crate::agent::Routes::new();
    let agent_counters = Arc::new(crate::agent::AgentCounters::default());
    let viommu_on = crate::viommu::setup::wanted(
        &config.devices,
        &config.pmem,
        config.transport == crate::config::Transport::Pci,
    )?;
    // Passthrough devices before the lease manager: its pins for DMA go through their container.
    let mut passthrough = crate::vfio::Passthrough::open(&config.devices, vm.fd())?;
    if let Some(p) = &passthrough {
        crate::vfio::Passthrough::check_memlock(
            mem_bytes
                + config
                    .pmem
                    .iter()
                    .filter(|c| c.dma == pmem::DmaPolicy::Whole)
                    .filter_map(|c| c.size)
                    .sum::<u64>(),
        )?;
        // Behind the virtual IOMMU nothing is mapped until the guest's driver maps it.
        if !viommu_on {
            p.map_ram(&mem)?;
        }
    }
    let leases = LeaseManager::with_dma(
        Arc::new(crate::agent::AgentNotifier::new(routes.clone())),
        passthrough
            .as_ref()
            .map(|p| p.dma() as Arc<dyn daxvisor_mapper::DmaMapper>),
        events.clone(),
        regions.clone(),
    )?;
    let stopper = state.clone();
    leases.stop_vm_with(Box::new(move |why| {
        stopper.request_stop(StopReason::VmmError(why))
    }));
    pmem::attach(
        &config.pmem,
        mem_bytes,
        &mut pmem::attach::VmParts {
            vm: &mut vm,
            devices: &mut devices,
            event_loop: &mut event_loop,
            mem: &mem,
            leases: &leases,
        },
        &regions,
        &mut undo,
    )?;
    if let Some(p) = &mut passthrough {
        p.pin_whole(leases.mapper(), &regions)?;
        if let Some(pci) = &mut devices.pci {
            p.place(&mut vm, pci)?;
        }
    }
    let viommu = match (&passthrough, viommu_on) {
        (Some(p), true) => {
            let endpoints: Vec<(u32, String)> = p
                .devices()
                .iter()
                .filter_map(|d| d.slot.map(|s| (u32::from(s) << 3, d.name.clone())))
                .collect();
            let dma = Arc::new(crate::viommu::ViommuDma::new(
                leases.mapper().clone(),
                regions.clone(),
                mem.clone(),
                p.dma(),
                &endpoints,
            ));
            let bdfs: Vec<u16> = endpoints.iter().map(|(e, _)| *e as u16).collect();
            Some(Arc::new(crate::viommu::setup::attach(
                dma,
                &bdfs,
                routes.clone(),
                vm.fd(),
                &mem,
                &mut devices,
                &mut event_loop,
            )?))
        }
        _ => None,
    };
    let reclaim = Reclaim::start(leases.mapper().clone(), events.clone(), regions.clone())
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
            regions: regions.clone(),
            routes: routes.clone(),
            counters: agent_counters.clone(),
            reclaim: reclaim.clone(),
        },
    )?;
    let pmem_windows: Vec<(u64, u64)> = regions
        .all()
        .iter()
        .map(|r| (r.guest_addr, r.size()))
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
    let mut highest = pmem_windows
        .iter()
        .map(|&(a, l)| a + l)
        .max()
        .unwrap_or(0)
        .max(layout::pmem_start(mem_bytes));
    // The hotplug space follows the `--pmem` regions (1 GiB aligned, so a device-DAX region of any alignment
    // fits); the PCI 64-bit window follows it.
    let mut boot_windows = pmem_windows.clone();
    let hotplug = if config.pmem_hotplug > 0 {
        let base = layout::align_up(highest, 1 << 30);
        highest = base + config.pmem_hotplug;
        if highest > pmem::attach::GUEST_PHYS_LIMIT {
            return Err(PmemError::AddressSpace { end: highest }.into());
        }
        boot_windows.push((base, config.pmem_hotplug));
        // The generic event device's interrupt: an irqfd pulses its line when a slot changes.
        let ged = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        vm.fd()
            .register_irqfd(&ged, layout::HOTPLUG_GED_IRQ)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let (hp, server) = crate::hotplug::setup(
            base,
            config.pmem_hotplug,
            &mut devices.pio,
            &mut event_loop,
            leases.guard(),
            routes.clone(),
            Some(ged),
        )?;
        tracing::info!(
            base = format_args!("{base:#x}"),
            size = config.pmem_hotplug,
            "guest-physical space reserved for pmem hot add"
        );
        Some((hp, server))
    } else {
        None
    };
    let pci_layout = devices.finish_pci(highest)?.map(|mut l| {
        if hotplug.is_some() {
            l.hotplug_irq = Some(layout::HOTPLUG_GED_IRQ);
        }
        l.viot = viommu.as_ref().and_then(|v| {
            v.endpoints.first().map(|&endpoint| acpi::viot::Topology {
                iommu: v.bdf,
                endpoint,
            })
        });
        l
    });
    let rsdp =
        acpi::create_acpi_tables_with_pci(&mem, config.cpus, &acpi_devices, pci_layout.as_ref())?;
    let entry = load_kernel(config, &kernel, &mem, &devices, &boot_windows, rsdp.0)?;

    let base_cpuid = cpuid::supported(vm.kvm()).map_err(StartError::Cpuid)?;
    let nested = cpuid::apply_nested_mask(config.cpuid_mask);
    tracing::info!(
        nested_cpuid_mask = nested,
        cpus = config.cpus,
        memory_mib = config.memory_mib,
        "starting VM"
    );
    let actions = Actions::new(
        leases.mapper().clone(),
        regions.clone(),
        events.clone(),
        reclaim.clone(),
        state.clone(),
    );
    if let Some(v) = &viommu {
        actions.set_viommu(v.clone());
    }
    let hotplug = hotplug.map(|(hp, server)| {
        actions.set_hotplug(hp);
        server
    });
    let ctx = (config.api_socket.is_some() || config.metrics_addr.is_some()).then(|| {
        ApiContext::new(
            actions.clone(),
            config_view(config, &regions),
            agent_counters,
            passthrough.as_ref().map(|p| p.list()),
        )
    });
    let api = match (&config.api_socket, &ctx) {
        (Some(path), Some(ctx)) => Some(ApiServer::start(path, ctx.clone())?),
        _ => None,
    };
    let metrics = match (config.metrics_addr, &ctx) {
        (Some(addr), Some(ctx)) => Some(MetricsListener::start(addr, ctx.clone())?),
        _ => None,
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
        pre_fault_in_kvm(vm.fd(), boot, &regions);
    }
    Ok(Vmm {
        config: config.clone(),
        state,
        regions,
        actions,
        leases,
        console: Some(console),
        api,
        metrics,
        event_loop: Some(event_loop),
        devices,
        passthrough,
        vcpus,
        vcpu_threads: Vec::new(),
        signals: None,
        loop_error: None,
        hotplug,
        _mem: mem,
        _vm: vm,
        undo,
    })
}

/// prefault=on regions into KVM's own page tables, where KVM offers it (see [`crate::vstate::kvm_page_tables`]). A
/// failure costs only speed, so it is logged and the VM starts.
fn pre_fault_in_kvm(vm: &kvm_ioctls::VmFd, vcpu: &Vcpu, regions: &RegionRegistry) {
    let wanted: Vec<_> = regions
        .all()
        .into_iter()
        .filter(|r| r.config.prefault)
        .collect();
    if wanted.is_empty() {
        return;
    }
    if !crate::vstate::kvm_page_tables::offered_by(vm) {
        tracing::info!(
            "KVM_PRE_FAULT_MEMORY not offered (it needs EPT/NPT; shadow paging here): the guest's first touch of \
             each page of a prefault=on region is still a KVM fault"
        );
        return;
    }
    for r in wanted {
        let started = std::time::Instant::now();
        match crate::vstate::kvm_page_tables::pre_fault(vcpu.fd(), r.guest_addr, r.size()) {
            Ok(()) => tracing::info!(
                id = %r.name(),
                ms = format_args!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "pmem region pre-faulted in KVM (KVM_PRE_FAULT_MEMORY)"
            ),
            Err(e) => tracing::warn!(
                id = %r.name(),
                "KVM_PRE_FAULT_MEMORY failed ({e}); the guest faults the region in as it touches it"
            ),
        }
    }
}

/// The configuration as `GET /vm` reports it.
fn config_view(config: &VmConfig, regions: &RegionRegistry) -> VmConfigView {
    config.view(&regions.names())
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
                    pci_ecam: devices
                        .pci
                        .as_ref()
                        .map(|_| (layout::PCI_ECAM_BASE, layout::PCI_ECAM_SIZE)),
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
