//! The running VM as one owned object. [`crate::builder::build`] makes a [`Vmm`] from the configuration;
//! [`Vmm::run`] starts the vCPUs, runs the event loop until something ends the VM, then [`Vmm::stop`] takes it
//! down in the order written there. Everything a transport (the operator API, tests) may change while it runs
//! goes through its [`Actions`]; every fact about its regions is in its [`RegionRegistry`].

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::actions::Actions;
use crate::api::ApiServer;
use crate::builder::StartError;
use crate::config::VmConfig;
use crate::console::ConsoleHandles;
use crate::device_manager::DeviceManager;
use crate::event_loop::EventLoop;
use crate::host_files::StartUndo;
use crate::lease_manager::LeaseManager;
use crate::region_registry::RegionRegistry;
use crate::seccomp::{self, ThreadKind};
use crate::signals::StopSignals;
use crate::vstate::vcpu::{self, RunState, StopReason, Vcpu};
use crate::vstate::vm::Vm;

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
    /// KVM or the VMM failed while the guest ran (a VMM thread's panic included).
    VmmError(String),
    /// SIGINT or SIGTERM (the number) stopped the VM; the stop was clean.
    Signal(i32),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Status(s) => write!(f, "the guest exited with status {s}"),
            VmExit::Reset => f.write_str("the guest reset or powered off"),
            VmExit::Crash { vcpu, reason, .. } => {
                write!(f, "the guest crashed on vCPU {vcpu}: {reason}")
            }
            VmExit::VmmError(e) => write!(f, "the VMM failed: {e}"),
            VmExit::Signal(n) => write!(f, "signal {n} stopped it"),
        }
    }
}

/// One VM: what it runs on (KVM, guest memory, devices, event loop), what it serves (regions, leases, the
/// agent and the API) and what it started (threads).
pub struct Vmm {
    pub(crate) config: VmConfig,
    pub(crate) state: Arc<RunState>,
    pub(crate) regions: Arc<RegionRegistry>,
    pub(crate) actions: Arc<Actions>,
    pub(crate) leases: LeaseManager,
    pub(crate) console: Option<ConsoleHandles>,
    pub(crate) api: Option<ApiServer>,
    /// `--metrics-addr`: the loopback metrics listener.
    pub(crate) metrics: Option<crate::api::metrics_listener::MetricsListener>,
    pub(crate) event_loop: Option<EventLoop>,
    pub(crate) devices: DeviceManager,
    /// Passthrough devices and their container; torn down once every owner has ended.
    pub(crate) passthrough: Option<crate::vfio::Passthrough>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) vcpu_threads: Vec<std::thread::JoinHandle<Option<()>>>,
    pub(crate) signals: Option<StopSignals>,
    /// The event loop's own failure, if it had one.
    pub(crate) loop_error: Option<String>,
    /// The main thread's end of the hot add/remove queue (`--pmem-hotplug`).
    pub(crate) hotplug: Option<crate::hotplug::HotplugServer>,
    /// Guest RAM; the pmem windows are the regions'.
    pub(crate) _mem: GuestMemoryMmap,
    /// The KVM VM. Dropped after the devices and vCPUs that use its descriptors.
    pub(crate) _vm: Vm,
    /// What a refused start puts back; committed once the guest runs. Declared last: dropped last.
    pub(crate) undo: StartUndo,
}

impl Vmm {
    /// The VM's actions (what transports and tests call to change it).
    pub fn actions(&self) -> &Arc<Actions> {
        &self.actions
    }

    /// The VM's regions.
    pub fn regions(&self) -> &Arc<RegionRegistry> {
        &self.regions
    }

    /// Start the vCPUs, run the event loop until the VM ends, stop it, and say how it ended. Fails (and puts
    /// back what start-up created) only if the vCPUs cannot be started.
    pub fn run(mut self) -> Result<VmExit, StartError> {
        let signals = StopSignals::install(self.state.clone()).map_err(StartError::Signals)?;
        // A stop signal that came during start-up undoes the start (exit 128+signal, nothing left behind).
        signals.refuse_start_if_signalled()?;
        self.signals = Some(signals);
        for v in std::mem::take(&mut self.vcpus) {
            match v.spawn() {
                Ok(t) => self.vcpu_threads.push(t),
                Err(e) => {
                    vcpu::stop_all(&self.state, std::mem::take(&mut self.vcpu_threads));
                    return Err(e.into());
                }
            }
        }
        self.undo.commit();
        // The end of start-up. The main thread now only runs the event loop and the stop sequence: it drops the
        // capabilities start-up needed (every other thread did so when it began) and installs its filter.
        seccomp::apply_for_thread(ThreadKind::EventLoop)?;
        let Vmm {
            event_loop,
            hotplug,
            _vm: vm,
            devices,
            _mem: mem,
            leases,
            ..
        } = &mut self;
        let loop_result = event_loop.as_mut().map(|l| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                l.run_serving(|l| {
                    if let Some(server) = hotplug.as_mut() {
                        server.serve(&mut crate::pmem::attach::VmParts {
                            vm,
                            devices,
                            event_loop: l,
                            mem,
                            leases,
                        });
                    }
                })
            }))
        });
        self.loop_error = match loop_result {
            Some(Ok(Ok(()))) | None => None,
            Some(Ok(Err(e))) => Some(e.to_string()),
            // The panic hook logged it and recorded the stop reason.
            Some(Err(_)) => None,
        };
        Ok(self.stop())
    }

    /// The shutdown order, in one place:
    /// 1. vCPUs stopped and joined (no guest code runs, no device register is touched from here on);
    /// 2. the agent session ends with the VM (its owners release everything);
    /// 3. the event loop, then the devices: dropping the devices answers every flush still queued and joins
    ///    the flush workers;
    /// 4. the API stops serving (its socket is removed) and every owner left (the operator's) is ended; then the
    ///    passthrough devices: every IOVA unmapped, each device reset, the groups and container closed;
    /// 5. a final fdatasync of every writable region, and each region's counters logged;
    /// 6. the signal thread stops; the lease manager (host guard), regions and memory go as the `Vmm` drops.
    ///
    /// Also ends a VM that was built but never run.
    pub fn stop(mut self) -> VmExit {
        // Who stopped it, before this call records the operator as the reason: a guest that wrote the exit
        // port stops the vCPUs without a reason of its own.
        let guest_exited =
            self.state.reason().is_none() && self.devices.exit_status.get().is_some();
        self.state.request_stop(StopReason::Operator);
        vcpu::stop_all(&self.state, std::mem::take(&mut self.vcpu_threads));
        if let Some(console) = self.console.take() {
            console.log_summary();
        }
        drop(self.event_loop.take());
        self.devices.drop_buses();
        // Before the API goes: followers of the event stream see the stop and end cleanly.
        let how = match self.state.reason() {
            Some(StopReason::Operator) if !guest_exited => "the operator stopped it".to_owned(),
            _ => self.exit().to_string(),
        };
        self.actions.stopped(&how);
        drop(self.api.take());
        drop(self.metrics.take());
        self.leases.end_owners();
        if let Some(p) = self.passthrough.take() {
            p.teardown();
        }
        for r in self.regions.all() {
            r.final_sync();
            r.log_summary();
        }
        drop(self.signals.take());
        if let Some(e) = self.loop_error.take() {
            return VmExit::VmmError(e);
        }
        self.exit()
    }

    /// How the VM ended, from the exit port and the first stop reason.
    fn exit(&self) -> VmExit {
        match (self.devices.exit_status.get(), self.state.reason()) {
            (_, Some(StopReason::Signal(signal))) => VmExit::Signal(signal),
            (_, Some(StopReason::ThreadPanic { thread, message })) => {
                VmExit::VmmError(format!("thread '{thread}' panicked: {message}"))
            }
            (None, Some(StopReason::MemoryFault { vcpu, gpa })) => VmExit::VmmError(format!(
                "KVM_RUN on vCPU {vcpu}: Bad address (EFAULT): {}",
                crate::pmem::fault::explain(&self.regions, gpa)
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
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}

/// Build the VM described by `config`, run it to its end, and say how it ended.
pub fn run(config: &VmConfig) -> Result<VmExit, StartError> {
    crate::builder::build(config)?.run()
}
