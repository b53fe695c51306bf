//! vCPU threads: configure each vCPU, run it, and dispatch its exits to the port-I/O and MMIO buses.
//!
//! A vCPU never decides alone that the VM is over: it records why it stopped in the shared [`RunState`] and
//! raises the stop flag (as devices do for reset and power-off; every vCPU checks it after each exit); the event loop then stops every vCPU (by kicking it out of KVM_RUN with a signal).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use daxvisor_devices::bus::Bus;
use daxvisor_devices::legacy::VmStopper;
use kvm_bindings::{kvm_regs, kvm_sregs, CpuId, KVM_SYSTEM_EVENT_CRASH};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{long_mode, BootEntry};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {index} ({what}): {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start vCPU thread {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot build the boot MSR list for vCPU {index}: {source:?}")]
    Msrs {
        index: u8,
        source: vmm_sys_util::fam::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Why the VM stopped, as the first vCPU to stop saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset or power-off (i8042, ACPI, KVM system event) or wrote the exit port.
    GuestRequest,
    /// The guest cannot continue: triple fault, emulation failure, failed entry. `detail` holds the registers.
    GuestCrash {
        vcpu: u8,
        reason: String,
        detail: String,
    },
    /// KVM itself failed.
    VmmError(String),
    /// KVM_RUN failed with EFAULT: the host could not provide a page of guest memory (a pmem backing that
    /// shrank or whose file system is full). `gpa` when KVM reported it (KVM_EXIT_MEMORY_FAULT).
    MemoryFault { vcpu: u8, gpa: Option<u64> },
    /// The VMM was asked to stop (SIGINT/SIGTERM: the signal number).
    Signal(i32),
    /// The operator asked for a graceful stop (operator API).
    Operator,
    /// A VMM thread panicked (its name and the panic): the VM stops cleanly, exit 1.
    ThreadPanic { thread: String, message: String },
}

/// Shared between the vCPU threads, the devices that end the VM, and the event loop.
pub struct RunState {
    stopper: VmStopper,
    reason: Mutex<Option<StopReason>>,
}

impl RunState {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(RunState {
            stopper: VmStopper::new()?,
            reason: Mutex::new(None),
        }))
    }

    /// What devices use to end the VM (reset, power-off, exit port).
    pub fn stopper(&self) -> &VmStopper {
        &self.stopper
    }

    /// Record why the VM stops (the first reason wins) and wake the event loop.
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stopper.stop();
    }

    pub fn stopping(&self) -> bool {
        self.stopper.is_stopping()
    }

    pub fn mark_stopping(&self) {
        self.stopper.mark_stopping();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    state: Arc<RunState>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts KVM_RUN so a vCPU notices it must stop.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

impl Vcpu {
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        index: u8,
        pio: Bus,
        mmio: Bus,
        state: Arc<RunState>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu {
            index,
            fd,
            pio,
            mmio,
            state,
        })
    }

    /// The vCPU's KVM file descriptor (for VM-wide ioctls that go through a vCPU before it runs).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Set CPUID, MSRs, FPU, LAPIC LINT pins, and (boot vCPU only) the 64-bit entry registers.
    pub fn configure(&mut self, cpuid: &CpuId, entry: Option<&BootEntry>) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |what| configure_error(index, what);
        self.fd.set_cpuid2(cpuid).map_err(err("cpuid"))?;
        let msrs = long_mode::msrs().map_err(|e| VcpuError::Msrs { index, source: e })?;
        self.fd.set_msrs(&msrs).map_err(err("msrs"))?;
        self.fd.set_fpu(&long_mode::fpu()).map_err(err("fpu"))?;
        self.configure_lint()?;
        if let Some(entry) = entry {
            let sregs = self.fd.get_sregs().map_err(err("get sregs"))?;
            self.fd
                .set_sregs(&long_mode::sregs(sregs))
                .map_err(err("sregs"))?;
            let regs = long_mode::regs(entry.rip, entry.rsp, entry.rsi, entry.rdi);
            self.fd.set_regs(&regs).map_err(err("regs"))?;
        }
        Ok(())
    }

    /// LINT0 = ExtINT (the legacy PIC), LINT1 = NMI, as a PC's BIOS leaves them.
    fn configure_lint(&mut self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_EXTINT: u32 = 0x7;
        const DELIVERY_NMI: u32 = 0x4;
        let err = |what| configure_error(self.index, what);
        let mut lapic = self.fd.get_lapic().map_err(err("get lapic"))?;
        for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
            let bytes: [u8; 4] = lapic.regs[reg..reg + 4]
                .iter()
                .map(|&b| b as u8)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap_or([0; 4]);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(err("set lapic"))
    }

    pub fn spawn(self) -> Result<JoinHandle<Option<()>>, VcpuError> {
        let index = self.index;
        crate::threads::spawn(
            &format!("vcpu{index}"),
            crate::seccomp::ThreadKind::Vcpu,
            move || self.run(),
        )
        .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self) {
        /// KVM_RUN tries after an EFAULT before the VM stops on it, and the wait before each.
        const EFAULT_RETRIES: u32 = 3;
        const EFAULT_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);
        let mut efaults: u32 = 0;
        while !self.state.stopping() {
            let outcome = match self.fd.run() {
                Ok(exit) => {
                    efaults = 0;
                    handle_exit(self.index, exit, &self.pio, &self.mmio)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                // A fault the host repairs at once (the host guard clearing an immutable flag `chattr +i` set a
                // moment before) passes on a second try; a lasting one (a shrunk file) fails every time.
                Err(e) if e.errno() == libc::EFAULT && efaults < EFAULT_RETRIES => {
                    efaults += 1;
                    std::thread::sleep(EFAULT_RETRY_WAIT * efaults);
                    None
                }
                Err(e) if e.errno() == libc::EFAULT => Some(StopReason::MemoryFault {
                    vcpu: self.index,
                    gpa: self.memory_fault_gpa(),
                }),
                Err(e) => Some(StopReason::VmmError(format!(
                    "KVM_RUN on vCPU {}: {e}",
                    self.index
                ))),
            };
            if let Some(reason) = outcome {
                let reason = self.with_registers(reason);
                self.state.request_stop(reason);
                break;
            }
        }
        tracing::debug!(vcpu = self.index, "vCPU thread ends");
    }

    /// The guest physical address KVM reported with the last EFAULT, if it filled in `memory_fault`.
    fn memory_fault_gpa(&mut self) -> Option<u64> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_MEMORY_FAULT {
            return None;
        }
        // SAFETY: exit_reason says the `memory_fault` member of the union is the one KVM filled in.
        Some(unsafe { run.__bindgen_anon_1.memory_fault.gpa })
    }

    /// Attach the register dump to a crash report (after the exit borrow of the vCPU has ended).
    fn with_registers(&mut self, reason: StopReason) -> StopReason {
        match reason {
            StopReason::GuestCrash { vcpu, reason, .. } => {
                let regs = (self.fd.get_regs(), self.fd.get_sregs());
                let mut detail = match &regs {
                    (Ok(r), Ok(s)) => format_registers(r, s),
                    (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
                };
                let run = self.fd.get_kvm_run();
                if let (kvm_bindings::KVM_EXIT_SHUTDOWN, (Ok(r), Ok(s))) = (run.exit_reason, &regs)
                {
                    // KVM on AMD's SVM puts the vCPU through INIT after a shutdown (its VMCB is undefined then),
                    // so what it hands back is the reset state; Intel's VMX keeps the registers of the fault.
                    if r.rip == 0xfff0 && s.cs.selector == 0xf000 {
                        detail.push_str(
                            "\n(these are the reset state: KVM reset the vCPU after the triple fault, as it \
                             does on AMD hosts, so they do not say where the guest was)",
                        );
                    }
                }
                if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the `internal` member of the union is the one KVM filled in.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    detail.push_str(&format!(
                        "\ninternal error suberror={} data={:x?}",
                        internal.suberror,
                        &internal.data[..n]
                    ));
                }
                StopReason::GuestCrash {
                    vcpu,
                    reason,
                    detail,
                }
            }
            other => other,
        }
    }
}

fn handle_exit(index: u8, exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<StopReason> {
    let crash = |reason: String| {
        Some(StopReason::GuestCrash {
            vcpu: index,
            reason,
            detail: String::new(),
        })
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            let claimed = pio.read(u64::from(port), data);
            log_unclaimed(claimed, "port read", u64::from(port), data.len())
        }
        VcpuExit::IoOut(port, data) => {
            let claimed = pio.write(u64::from(port), data);
            log_unclaimed(claimed, "port write", u64::from(port), data.len())
        }
        VcpuExit::MmioRead(addr, data) => {
            log_unclaimed(mmio.read(addr, data), "MMIO read", addr, data.len())
        }
        VcpuExit::MmioWrite(addr, data) => {
            log_unclaimed(mmio.write(addr, data), "MMIO write", addr, data.len())
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; an exit here means nothing to do.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => crash(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
        )),
        VcpuExit::InternalError => {
            crash("KVM_EXIT_INTERNAL_ERROR: KVM could not emulate an instruction".into())
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_CRASH => {
            crash("guest reported a crash".into())
        }
        VcpuExit::SystemEvent(..) => Some(StopReason::GuestRequest),
        other => crash(format!("unexpected vCPU exit {other:?}")),
    }
}

/// Maps a failed KVM configuration ioctl to the error naming the vCPU and the step.
fn configure_error(index: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Configure {
        index,
        what,
        source,
    }
}

/// A guest poking space no device claims is not an error (probing does it); it is worth a debug line.
fn log_unclaimed(claimed: bool, what: &str, addr: u64, len: usize) -> Option<StopReason> {
    if !claimed {
        tracing::debug!(addr = format_args!("{addr:#x}"), len, "unclaimed {what}");
    }
    None
}

fn format_registers(r: &kvm_regs, s: &kvm_sregs) -> String {
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#x}\nrax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         rbp={:#x}\nr8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(dpl {}) ss={:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.dpl, s.ss.selector
    )
}

/// Stop every vCPU thread: mark the VM stopping and keep kicking each thread out of KVM_RUN until it ends
/// (a kick that lands just before KVM_RUN is entered would otherwise be lost).
pub fn stop_all(state: &RunState, threads: Vec<JoinHandle<Option<()>>>) {
    state.mark_stopping();
    for t in threads {
        while !t.is_finished() {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::debug!("kick failed: {e}");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = t.join();
    }
}
