//! The `daxvisor` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use daxvisor::config::{CpuidMask, SerialOutput, VmConfig};
use daxvisor::vm::{self, VmExit};

/// Exit code for anything wrong before the guest runs: bad input, missing /dev/kvm, no permission.
const EXIT_START_ERROR: u8 = 2;
/// Exit code when the guest crashes or the VMM fails while it runs.
const EXIT_RUNTIME_ERROR: u8 = 1;

#[derive(Parser)]
#[command(
    name = "daxvisor",
    version,
    about = "A KVM VMM that gives guests persistent memory backed by host files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest exits; daxvisor exits with the guest's status.
    ///
    /// With no --kernel, boots the test guest built into this binary. Exit codes: the status the guest wrote to
    /// the exit port (0-255); 0 when the guest resets or powers off; 1 when the guest crashes (triple fault,
    /// emulation failure) or the VMM fails while it runs; 2 when the VM cannot start (bad input, no /dev/kvm);
    /// 128+N after SIGINT/SIGTERM (N) stopped the VM cleanly; 3 when a second signal forced an immediate exit.
    Run(RunArgs),
    /// Print the operator API's OpenAPI 3 document (what docs/openapi.json holds).
    Openapi,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: a Linux bzImage or ELF vmlinux, or a freestanding ELF on the daxvisor boot ABI.
    /// Default: the test guest built into this binary.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Kernel command line. Linux default: "console=ttyS0 reboot=k panic=1 ..."; virtio_mmio.device= entries are
    /// appended. For the test guest it selects its mode (e.g. "exit=3").
    #[arg(long)]
    cmdline: Option<String>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Where the guest's serial console goes: stdout, none, or a file path (appended to).
    #[arg(long, value_name = "stdout|none|FILE", default_value = "stdout")]
    serial: SerialOutput,
    /// Where the guest's virtio console (port 0 of the virtio-console device, hvc0 in Linux) goes: stdout,
    /// none, or a file path (appended to). With stdout, host stdin is the console's input.
    #[arg(long, value_name = "stdout|none|FILE", default_value = "none")]
    console: SerialOutput,
    /// Hide CPU features that nested KVM emulators get wrong (CX16, XSAVE and what depends on it).
    /// auto: only when daxvisor itself runs under a hypervisor.
    #[arg(long, value_enum, default_value_t = CpuidMask::Auto)]
    cpuid_mask: CpuidMask,
    /// Persistent memory backed by a host file or device-DAX, as a virtio-pmem device (repeatable):
    /// file=PATH[,size=SIZE][,readonly=on][,discard_writes=on][,id=NAME][,create=on][,prefault=on][,guard=deny|hold|log].
    /// SIZE defaults to the file's size and must be a multiple of 2 MiB. prefault=on populates the whole
    /// region before the guest starts (slower start, no first-touch faults in the guest). guard= says what a
    /// foreign process opening the file for writing meets: deny (EPERM, the default), hold (a whole-file break
    /// first, then allowed unless a pin or exclusive lease holds the file) or log (allowed); read-only opens are
    /// allowed and logged. Needs CAP_SYS_ADMIN (fanotify); without it opens are only delayed (docs/security.md).
    #[arg(long, value_name = "file=PATH[,...]")]
    pmem: Vec<daxvisor::pmem::PmemConfig>,
    /// Seccomp filters per thread: on (a syscall outside the thread's list kills daxvisor), log (allowed and
    /// logged by the kernel: dmesg), off. Lists: docs/security.md.
    #[arg(long, value_enum, default_value_t = daxvisor::seccomp::SeccompMode::On)]
    seccomp: daxvisor::seccomp::SeccompMode,
    /// Serve the operator API (HTTP/1.1 + JSON, see docs/operator-api.md) on this Unix socket, mode 0600.
    /// A stale socket is replaced; one another process serves on is refused. Removed when daxvisor exits.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAXVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Openapi => {
            print!("{}", daxvisor::api::routes::openapi_text());
            ExitCode::SUCCESS
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = VmConfig {
        kernel: args.kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        memory_mib: args.memory,
        cpus: args.cpus,
        serial: args.serial,
        console: args.console,
        cpuid_mask: args.cpuid_mask,
        pmem: args.pmem,
        seccomp: args.seccomp,
        api_socket: args.api_socket,
    };
    match vm::run(&config) {
        Ok(VmExit::Status(s)) => ExitCode::from((s & 0xff) as u8),
        Ok(VmExit::Reset) => ExitCode::SUCCESS,
        Ok(VmExit::Crash {
            vcpu,
            reason,
            detail,
        }) => {
            eprintln!("daxvisor: guest crashed on vCPU {vcpu}: {reason}\n{detail}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
        Ok(VmExit::Signal(signal)) => ExitCode::from(daxvisor::signals::exit_status_for(signal)),
        Ok(VmExit::VmmError(e)) => {
            eprintln!("daxvisor: VM failed: {e}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
        Err(e) => {
            eprintln!("daxvisor: {e}");
            ExitCode::from(EXIT_START_ERROR)
        }
    }
}
