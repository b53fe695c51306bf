//! The `daxvisor` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use daxvisor::config::{CpuidMask, SerialOutput, VmConfig};
use daxvisor::vmm::{self, VmExit};

/// Exit code for anything wrong before the guest runs: bad input, missing /dev/kvm, no permission.
const EXIT_START_ERROR: u8 = 2;
/// Exit code when the guest crashes or the VMM fails while it runs.
const EXIT_RUNTIME_ERROR: u8 = 1;

#[derive(Parser)]
#[command(
    name = "daxvisor",
    version = daxvisor::VERSION,
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
    Run(Box<RunArgs>),
    /// Print the operator API's OpenAPI 3 document (what docs/openapi.json holds).
    Openapi,
    /// Print a shell completion script for daxvisor (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for daxvisor and its subcommands into DIR (daxvisor.1, daxvisor-run.1, ...).
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// The options a `--config FILE` replaces (it describes the whole VM).
const CONFIG_REPLACES: [&str; 10] = [
    "kernel",
    "cmdline",
    "initrd",
    "memory",
    "cpus",
    "serial",
    "console",
    "cpuid_mask",
    "pmem",
    "seccomp",
];

#[derive(clap::Args)]
struct RunArgs {
    /// The whole VM from a JSON file, in the schema `GET /vm` reports as `config` (docs/operator-api.md);
    /// --name, --api-socket and --metrics-addr given here override the file's.
    #[arg(long, value_name = "FILE", conflicts_with_all = CONFIG_REPLACES)]
    config: Option<PathBuf>,
    /// The VM's name: it serves the operator API on DIR/NAME.sock in the socket directory (/run/daxvisor for
    /// root, $XDG_RUNTIME_DIR/daxvisor otherwise, $DAXVISOR_SOCKET_DIR if set; created mode 0700), where
    /// `daxvisor-ctl --name NAME` and `daxvisor-ctl list` find it; and it labels its metrics.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
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
    /// Guest RAM: MiB (256), or a size (1G, 512MiB).
    #[arg(long, value_name = "SIZE", default_value = "256", value_parser = daxvisor::config::parse_memory_mib)]
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
    /// file=PATH[,size=SIZE][,readonly=on][,discard_writes=on][,id=NAME][,create=on][,prefault=on][,guard=deny|hold|log][,shared=on][,dma=off|agent|whole][,iommu=refuse|recall].
    /// SIZE defaults to the file's size and must be a multiple of 2 MiB. prefault=on populates the whole
    /// region before the guest starts (slower start, no first-touch faults in the guest). guard= says what a
    /// foreign process opening the file for writing meets: deny (EPERM, the default), hold (a whole-file break
    /// first, then allowed unless a pin or exclusive lease holds the file) or log (allowed); read-only opens are
    /// allowed and logged. Needs CAP_SYS_ADMIN (fanotify); without it opens are only delayed (docs/security.md).
    /// shared=on: the file may be open for writing elsewhere at start (under deny such a start is refused).
    /// dma= says what a passthrough device may reach: off (default), agent (ranges the guest agent pins with
    /// DMA), whole (the region, pinned at start); a backing the kernel will not pin for DMA is refused.
    /// iommu= makes the region mappable by a device behind the virtual IOMMU (--device ...,iommu=on) and says
    /// what a change over a mapped range does: refuse (ETXTBSY naming the device) or recall (the guest agent is
    /// told; at the deadline daxvisor unmaps it itself and the change proceeds).
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
    /// How virtio devices (pmem, console) reach the guest: mmio (virtio-mmio windows in the ACPI DSDT, the
    /// default) or pci (virtio-pci functions on a PCI root bus with ECAM and MSI-X; docs/architecture.md).
    #[arg(long, value_enum, default_value_t = daxvisor::config::Transport::Mmio)]
    transport: daxvisor::config::Transport,
    /// A host PCI device passed through to the guest (repeatable): vfio=SYSFS_PATH[,id=NAME][,iommu=on]. The
    /// device must be bound to vfio-pci, alone in its IOMMU group, and needs --transport pci. Guest RAM is
    /// mapped for its DMA; pmem only as --pmem dma= says (docs/dma.md). iommu=on (one device): behind a
    /// virtio-iommu (ACPI VIOT) instead, nothing is mapped until the guest maps it; pmem as --pmem iommu= says.
    #[arg(long, value_name = "vfio=SYSFS_PATH[,id=NAME][,iommu=on]")]
    device: Vec<daxvisor::vfio::DeviceConfig>,
    /// Also serve GET /metrics (Prometheus text, every series labelled with the VM's name) over HTTP on this
    /// loopback address, e.g. 127.0.0.1:9464, for a Prometheus scrape. Loopback only.
    #[arg(long, value_name = "127.0.0.1:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Reserve this much guest-physical space (e.g. 1G) for pmem regions added while the VM runs
    /// (`POST /regions`, `daxvisor-ctl add-pmem`). Needs --transport pci. Shown in `GET /vm`.
    #[arg(long, value_name = "SIZE", value_parser = parse_hotplug_size)]
    pmem_hotplug: Option<u64>,
}

fn parse_hotplug_size(s: &str) -> Result<u64, String> {
    daxvisor_proto::units::parse_size(s).map_err(|e| e.to_string())
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
        Command::Run(args) => run(*args),
        Command::Openapi => {
            print!("{}", daxvisor::api::routes::openapi_text());
            ExitCode::SUCCESS
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "daxvisor",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => {
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
            });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("daxvisor: writing man pages to {}: {e}", dir.display());
                    ExitCode::from(EXIT_START_ERROR)
                }
            }
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    // Before start-up creates anything: a SIGINT/SIGTERM now waits for the signal thread, which undoes the
    // start (daxvisor::signals), instead of killing daxvisor with a half-made VM's files left behind.
    if let Err(e) = daxvisor::signals::leave_to_signal_thread() {
        eprintln!("daxvisor: cannot block SIGINT/SIGTERM: {e}");
        return ExitCode::from(EXIT_START_ERROR);
    }
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("daxvisor: {e}");
            return ExitCode::from(EXIT_START_ERROR);
        }
    };
    daxvisor::malloc_prime::prime();
    match vmm::run(&config) {
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
        Err(daxvisor::builder::StartError::Interrupted(i)) => {
            eprintln!("daxvisor: {i}");
            ExitCode::from(daxvisor::signals::exit_status_for(i.0))
        }
        Err(e) => {
            eprintln!("daxvisor: {e}");
            ExitCode::from(EXIT_START_ERROR)
        }
    }
}

/// The VM's configuration: from `--config FILE` or the options, with `--name`'s socket.
fn config(args: RunArgs) -> Result<VmConfig, String> {
    let mut config = match &args.config {
        Some(file) => VmConfig::from_file(file).map_err(|e| e.to_string())?,
        None => VmConfig {
            name: None,
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
            api_socket: None,
            metrics_addr: None,
            transport: args.transport,
            pmem_hotplug: 0,
            devices: args.device,
        },
    };
    if let Some(size) = args.pmem_hotplug {
        config.pmem_hotplug = size;
    }
    if args.name.is_some() {
        config.name = args.name;
    }
    if args.api_socket.is_some() {
        config.api_socket = args.api_socket;
    }
    if args.metrics_addr.is_some() {
        config.metrics_addr = args.metrics_addr;
    }
    if let (Some(name), None) = (&config.name, &config.api_socket) {
        config.api_socket =
            Some(daxvisor::socket_dir::socket_for_run(name).map_err(|e| e.to_string())?);
    }
    Ok(config)
}
