//! `daxvisor-ctl`: the operator's command line for running daxvisors. `list` shows every VM of the host (the
//! sockets in the socket directory, `daxvisor::socket_dir`); every other command talks to one VM's API socket,
//! chosen by `--name`, `--api-socket` or `DAXVISOR_API_SOCKET`. Tables by default (sizes humanised, `--exact`
//! for exact), `--json` for one JSON document on stdout per command, refusals included (the API's error
//! object).
//!
//! Exit status: 0 done; 1 the API could not be reached or failed; 2 bad usage; 3 the action was refused by the
//! layout-lease manager (the errno name and the holder are printed); 4 the API rejected the request (bad
//! input, unknown region or lease).

mod human;
mod list;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use daxvisor::api::changes::{ChangeBody, ChangeResult, Policy};
use daxvisor::api::devices::{DeviceView, IovaProbe, ViommuView};
use daxvisor::api::error::ErrorBody;
use daxvisor::api::holds::{BreakView, LeaseBody, LeaseView, Mode, OwnerView};
use daxvisor::api::reclaim::{PolicyBody, ReclaimResult, ReclaimStats, RegionOffers};
use daxvisor::api::regions::{describe, Bucket, RateLimit, RegionView};
use daxvisor::api::vm::VmView;
use daxvisor::events::{Event, EventKind};
use daxvisor::reclaim::{Offer, ReclaimPolicy};
use daxvisor::socket_dir;
use http_body_util::{BodyExt, Full};
use human::{duration_ms, fields, owners, range, table, timestamp, Sizes};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

const EXIT_UNREACHABLE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_REFUSED: u8 = 3;
const EXIT_REJECTED: u8 = 4;

#[derive(Parser)]
#[command(
    name = "daxvisor-ctl",
    version = daxvisor::VERSION,
    about = "Operate the daxvisors of this host through their API sockets"
)]
struct Cli {
    /// The VM's socket (`daxvisor run --api-socket`).
    #[arg(long, value_name = "PATH", env = socket_dir::SOCKET_ENV, global = true)]
    api_socket: Option<PathBuf>,
    /// The VM's name (`daxvisor run --name`): its socket in the socket directory.
    #[arg(
        long,
        value_name = "NAME",
        global = true,
        conflicts_with = "api_socket"
    )]
    name: Option<String>,
    /// Print one JSON document (the API's JSON; refusals as the API's error object) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Sizes in exact bytes instead of binary units (KiB, MiB, GiB).
    #[arg(long, global = true)]
    exact: bool,
    /// Wait up to this long for the VM's socket to appear and answer (a VM just started): 10s, 500ms.
    #[arg(long, value_name = "TIME", value_parser = parse_duration, global = true)]
    wait: Option<u64>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every VM on this host (the sockets in the socket directory): name, pid, uptime, regions, bytes mapped
    /// and allocated, holders.
    List,
    /// The VM: state, uptime, configuration.
    Vm,
    /// pmem regions, one line each; with a name, everything about that region.
    Regions {
        /// Only this region, in detail.
        id: Option<String>,
    },
    /// Owners with their leases and pins.
    Owners,
    /// Breaks in progress: range, reason, time left, who still holds.
    Breaks,
    /// Passthrough devices and what they can reach by DMA (guest RAM, pmem ranges pinned for DMA).
    Devices {
        /// Instead, ask the VFIO container whether anything is mapped at this IOVA (decimal or 0x hex).
        #[arg(long, value_name = "IOVA", value_parser = parse_iova)]
        probe: Option<u64>,
    },
    /// The virtual IOMMU (`--device vfio=...,iommu=on`): per endpoint the pmem pinned for it and its maps; per
    /// region what was mapped and refused; requests by status; recalls and fences; with --mappings every mapping
    Viommu {
        /// Also list every live mapping (endpoint, domain, IOVA range, guest address).
        #[arg(long)]
        mappings: bool,
    },
    /// The event log; with --follow, keep printing events as they happen (ends with exit 0 when the VM stops).
    Events {
        #[arg(long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Prometheus metrics (text; with --json, one object per sample).
    Metrics,
    /// Punch a range (deallocate; reads back as zeros), asking holders of shared leases first.
    Punch(ChangeArgs),
    /// Zero a range keeping it allocated, asking holders first.
    Zero(ChangeArgs),
    /// Break (evacuate) a range: holders give it back; the file is not changed.
    Break(ChangeArgs),
    /// The operator's own leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// A region's flush rate limits: change one bucket (the other is kept), clear one, or show both.
    RateLimit {
        region: String,
        /// Flush requests: SIZE/REFILL, e.g. 100/1s for a burst of 100 refilled every second.
        #[arg(long, value_name = "SIZE/TIME", value_parser = parse_bucket)]
        ops: Option<Bucket>,
        /// Bytes (each sync costs the region size): SIZE/REFILL, e.g. 1G/1s.
        #[arg(long, value_name = "SIZE/TIME", value_parser = parse_bucket)]
        bytes: Option<Bucket>,
        /// Remove a bucket (unlimited), e.g. --clear ops.
        #[arg(long, value_enum, value_name = "BUCKET")]
        clear: Vec<BucketName>,
    },
    /// Ranges guests offered back for reclaim (of one region, with its policy, when named).
    Offers { region: Option<String> },
    /// Punch every offered range of a region now.
    Reclaim { region: String },
    /// Bytes the guest offered back and bytes punched, per region and in all.
    ReclaimStats,
    /// Set what happens to a region's offers: listed until `reclaim` (manual) or punched at once (auto).
    ReclaimPolicy {
        region: String,
        #[arg(value_enum)]
        policy: ReclaimPolicyArg,
    },
    /// End one owner now (a guest holding capacity hostage): its DMA mappings go first, then its pins and
    /// leases; a guest owner is told. OWNER is its id from `owners`.
    Revoke {
        #[arg(value_name = "OWNER")]
        owner: u64,
    },
    /// Stop the VM gracefully.
    Stop,
    /// Print a shell completion script for daxvisor-ctl (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for daxvisor-ctl and its subcommands into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Add a pmem region to the running VM (needs `daxvisor run --transport pci --pmem-hotplug SIZE`).
    AddPmem(AddPmemArgs),
    /// Remove a region added while the VM runs: leases broken (reason remove), the guest ejects, then the file is
    /// synced, unlocked and closed.
    RemovePmem {
        region: String,
        /// Milliseconds holders of shared leases get to release.
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Milliseconds the guest gets to eject the device.
        #[arg(long)]
        eject_timeout_ms: Option<u64>,
    },
}

/// The `--pmem` keys, as options.
#[derive(clap::Args)]
struct AddPmemArgs {
    /// Host file or device-DAX path.
    #[arg(long)]
    file: String,
    /// Window size (K, M, G suffixes); default: the file's size.
    #[arg(long)]
    size: Option<String>,
    /// Region name (default pmemN).
    #[arg(long)]
    id: Option<String>,
    /// Create (or extend) the file; undone if the add is refused.
    #[arg(long)]
    create: bool,
    #[arg(long)]
    prefault: bool,
    /// Host guard policy (as `--pmem guard=`).
    #[arg(long)]
    guard: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BucketName {
    Ops,
    Bytes,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReclaimPolicyArg {
    Manual,
    Auto,
}

#[derive(clap::Args)]
struct ChangeArgs {
    region: String,
    /// Region-relative offset: a size (1M, 0x100000, 4096).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Bytes, a size; 0 = to the end of the region.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    length: u64,
    /// How long holders get to release: 500ms, 2s (a bare number is ms).
    #[arg(long, alias = "deadline-ms", value_name = "TIME", value_parser = parse_duration)]
    deadline: Option<u64>,
    /// What happens to holders that have not released by the deadline.
    #[arg(long, value_enum, default_value_t = PolicyArg::Fail)]
    policy: PolicyArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Fail,
    Revoke,
}

#[derive(Subcommand)]
enum LeaseCmd {
    /// Take a lease as owner "operator".
    Acquire {
        region: String,
        /// A size (1M, 0x100000, 4096).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// A size; 0 = to the end of the region.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        length: u64,
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Hold it as the job `operator:NAME` (a separate owner: your own changes then ask it like any
        /// other holder) instead of as `operator`.
        #[arg(long, value_name = "NAME")]
        owner: Option<String>,
    },
    /// Release one of the operator's leases.
    Release { id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Shared,
    Exclusive,
}

/// A size in the syntax every daxvisor command shares (`daxvisor_proto::units`).
fn parse_size(s: &str) -> Result<u64, String> {
    daxvisor_proto::units::parse_size(s).map_err(|e| {
        format!(
            "'{s}': {e}; expected {}",
            daxvisor_proto::units::SIZE_SYNTAX
        )
    })
}

/// A duration in milliseconds (`500ms`, `2s`, a bare number of ms).
fn parse_duration(s: &str) -> Result<u64, String> {
    daxvisor_proto::units::parse_duration_ms(s).map_err(|e| {
        format!(
            "'{s}': {e}; expected {}",
            daxvisor_proto::units::DURATION_SYNTAX
        )
    })
}

/// SIZE/REFILL: `100/1s`, `1G/500ms`, `100/1000` (ms).
fn parse_bucket(s: &str) -> Result<Bucket, String> {
    let (size, refill) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}': expected SIZE/TIME, e.g. 100/1s"))?;
    Ok(Bucket {
        size: parse_size(size)?,
        refill_ms: parse_duration(refill)?,
    })
}

/// What went wrong, and the exit status it means.
pub(crate) struct Failure {
    code: u8,
    message: String,
    /// The API's error object, as `--json` prints it (one made from `message` when the API gave none).
    body: Option<Box<ErrorBody>>,
    /// The command already printed its JSON document: print no error object.
    printed: bool,
}

impl Failure {
    pub(crate) fn unreachable(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_UNREACHABLE,
            message: message.into(),
            body: None,
            printed: false,
        }
    }

    /// The error object `--json` prints on stdout.
    fn json(&self) -> String {
        let body = self.body.clone().unwrap_or_else(|| {
            Box::new(ErrorBody {
                error: self.message.clone(),
                errno: None,
                holder: None,
                holders: Vec::new(),
            })
        });
        serde_json::to_string_pretty(&body).unwrap_or_default()
    }
}

pub(crate) struct Client {
    pub(crate) socket: PathBuf,
}

impl Client {
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let resp = self.request(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// One request on a new connection; the response's body is left to the caller (a followed event stream
    /// reads it as it comes).
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Failure> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                Failure::unreachable(format!("cannot connect to {}: {e}", self.socket.display()))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::unreachable(format!("HTTP handshake: {e}")))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "daxvisor");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Failure::unreachable(format!("request: {e}")))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| Failure::unreachable(format!("request failed: {e}")))
    }

    /// A request whose success body is `T`; an error body becomes a [`Failure`] with its exit status.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(T, Bytes), Failure> {
        let body = body
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Failure::unreachable(format!("encoding the request: {e}")))?;
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            return Err(api_failure(status, &bytes));
        }
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| Failure::unreachable(format!("unexpected answer from the API: {e}")))?;
        Ok((v, bytes))
    }
}

fn api_failure(status: StatusCode, bytes: &[u8]) -> Failure {
    let Ok(err) = serde_json::from_slice::<ErrorBody>(bytes) else {
        return Failure::unreachable(format!(
            "API answered {status}: {}",
            String::from_utf8_lossy(bytes)
        ));
    };
    let body = Some(Box::new(err.clone()));
    let mut message = match &err.errno {
        Some(errno) => format!("refused: {errno}: {}", err.error),
        None => format!("rejected: {}", err.error),
    };
    if let Some(h) = &err.holder {
        message.push_str(&format!(
            "\nholder: owner {} ({}) with {} {} on {}",
            h.owner,
            h.name,
            if h.kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            },
            h.kind,
            range(h.offset, h.length)
        ));
    }
    if !err.holders.is_empty() {
        message.push_str(&format!("\nnot released by: {}", owners(&err.holders)));
    }
    let code = if status == StatusCode::CONFLICT {
        EXIT_REFUSED
    } else if status.is_client_error() {
        EXIT_REJECTED
    } else {
        EXIT_UNREACHABLE
    };
    Failure {
        code,
        message,
        body,
        printed: false,
    }
}

pub(crate) fn print_json(bytes: &[u8]) {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => println!("{}", String::from_utf8_lossy(bytes)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("daxvisor-ctl: cannot start a runtime: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json && !f.printed {
                println!("{}", f.json());
            }
            eprintln!("daxvisor-ctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// [`socket`], waiting up to `--wait` for it to exist and accept a connection.
async fn reachable_socket(cli: &Cli) -> Result<PathBuf, Failure> {
    let deadline = std::time::Instant::now() + Duration::from_millis(cli.wait.unwrap_or(0));
    loop {
        let found = socket(cli);
        let answers = match &found {
            Ok(p) => tokio::net::UnixStream::connect(p).await.is_ok(),
            Err(_) => false,
        };
        if answers || std::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one VM a command is for: `--api-socket` (or `DAXVISOR_API_SOCKET`), else `--name` in the socket
/// directory.
fn socket(cli: &Cli) -> Result<PathBuf, Failure> {
    let found = match (&cli.api_socket, &cli.name) {
        (Some(path), _) => socket_dir::check_socket(path).map(|()| path.clone()),
        (None, Some(name)) => socket_dir::socket_of(name),
        (None, None) => {
            let dir = socket_dir::dir();
            let known: Vec<String> = socket_dir::list(&dir)
                .map(|l| l.into_iter().map(|(n, _)| n).collect())
                .unwrap_or_default();
            return Err(Failure {
                code: EXIT_USAGE,
                message: format!(
                    "which VM? give --name NAME or --api-socket PATH (or set {}); VMs in {}: {}",
                    socket_dir::SOCKET_ENV,
                    dir.display(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                body: None,
                printed: false,
            });
        }
    };
    found.map_err(|e| Failure::unreachable(e.to_string()))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    let sizes = Sizes { exact: cli.exact };
    match &cli.command {
        Cmd::List => return list::run(json, sizes).await,
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "daxvisor-ctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::Man { dir } => {
            return std::fs::create_dir_all(dir)
                .and_then(|()| {
                    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)
                })
                .map_err(|e| {
                    Failure::unreachable(format!("writing man pages to {}: {e}", dir.display()))
                });
        }
        _ => {}
    }
    let c = Client {
        socket: reachable_socket(&cli).await?,
    };
    match cli.command {
        Cmd::List | Cmd::Completions { .. } | Cmd::Man { .. } => {}
        Cmd::Vm => {
            let (v, raw): (VmView, _) = c.call(Method::GET, "/vm", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let cfg = &v.config;
                let rows: Vec<(&str, String)> = vec![
                    ("name", cfg.name.clone().unwrap_or_else(|| "-".into())),
                    ("state", v.state.clone()),
                    ("pid", v.pid.to_string()),
                    ("started", timestamp(v.started_at_ms)),
                    ("uptime", duration_ms(v.uptime_ms)),
                    (
                        "kernel",
                        cfg.kernel
                            .clone()
                            .unwrap_or_else(|| "built-in test guest".into()),
                    ),
                    ("cmdline", cfg.cmdline.clone().unwrap_or_default()),
                    ("memory", sizes.bytes(cfg.memory_mib << 20)),
                    ("cpus", cfg.cpus.to_string()),
                    (
                        "pmem",
                        cfg.pmem
                            .iter()
                            .map(|p| format!("{} ({})", p.id.as_deref().unwrap_or("?"), p.file))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                    ("api socket", cfg.api_socket.clone().unwrap_or_default()),
                    (
                        "metrics",
                        cfg.metrics_addr.clone().unwrap_or_else(|| "-".into()),
                    ),
                ];
                println!("{}", fields(rows));
            }
        }
        Cmd::Regions { id } => {
            let path = id
                .as_ref()
                .map_or_else(|| "/regions".to_owned(), |i| format!("/regions/{i}"));
            let (_, raw): (serde_json::Value, _) = c.call(Method::GET, &path, None::<&()>).await?;
            if json {
                print_json(&raw);
            } else if id.is_some() {
                let r: RegionView = serde_json::from_slice(&raw)
                    .map_err(|e| Failure::unreachable(format!("unexpected answer: {e}")))?;
                println!("{}", region_detail(&r, sizes));
            } else {
                let regions: Vec<RegionView> = serde_json::from_slice(&raw)
                    .map_err(|e| Failure::unreachable(format!("unexpected answer: {e}")))?;
                let mut t = table(&[
                    "region",
                    "kind",
                    "size",
                    "allocated",
                    "holds",
                    "flushes",
                    "limit",
                ]);
                for r in regions {
                    t.add_row(vec![
                        r.id,
                        format!("{}{}", r.kind, if r.readonly { " ro" } else { "" }),
                        sizes.bytes(r.size),
                        sizes.bytes(r.bytes_allocated),
                        format!("{} lease(s), {} pin(s)", r.leases, r.pins),
                        r.flush.requests.to_string(),
                        if r.rate_limit.ops.is_none() && r.rate_limit.bytes.is_none() {
                            "-".to_owned()
                        } else {
                            "yes".to_owned()
                        },
                    ]);
                }
                println!("{t}");
            }
        }
        Cmd::Devices { probe: Some(iova) } => {
            let (p, raw): (IovaProbe, _) = c
                .call(Method::GET, &format!("/devices/iova/{iova}"), None::<&()>)
                .await?;
            if json {
                print_json(&raw);
            } else {
                println!(
                    "iova {:#x}: {}",
                    p.iova,
                    if p.mapped { "mapped" } else { "not mapped" }
                );
            }
        }
        Cmd::Devices { probe: None } => {
            let (devices, raw): (Vec<DeviceView>, _) =
                c.call(Method::GET, "/devices", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["device", "group", "slot", "iova", "kind", "region", "owner"]);
                for d in devices {
                    let slot = d
                        .pci_slot
                        .map(|s| format!("00:{s:02x}.0"))
                        .unwrap_or_default();
                    if d.dma.is_empty() {
                        t.add_row(vec![
                            d.name.clone(),
                            d.iommu_group.to_string(),
                            slot.clone(),
                        ]);
                    }
                    for m in &d.dma {
                        t.add_row(vec![
                            d.name.clone(),
                            d.iommu_group.to_string(),
                            slot.clone(),
                            range(m.iova, m.length),
                            m.kind.clone(),
                            match (&m.region, m.offset) {
                                (Some(r), Some(o)) => format!("{r} {}", range(o, m.length)),
                                _ => String::new(),
                            },
                            m.owner.clone().unwrap_or_default(),
                        ]);
                    }
                }
                println!("{t}");
            }
        }
        Cmd::Owners => {
            let (owners, raw): (Vec<OwnerView>, _) =
                c.call(Method::GET, "/owners", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["owner", "name", "hold", "id", "region", "range", "mode"]);
                for o in owners {
                    if o.leases.is_empty() && o.pins.is_empty() {
                        t.add_row(vec![o.id.to_string(), o.name.clone(), "-".into()]);
                    }
                    for l in &o.leases {
                        t.add_row(vec![
                            o.id.to_string(),
                            o.name.clone(),
                            "lease".into(),
                            l.id.to_string(),
                            l.region.clone(),
                            range(l.offset, l.length),
                            l.mode.clone(),
                        ]);
                    }
                    for p in &o.pins {
                        t.add_row(vec![
                            o.id.to_string(),
                            o.name.clone(),
                            "pin".into(),
                            p.id.to_string(),
                            p.region.clone(),
                            range(p.offset, p.length),
                            match (p.dma_revoked, p.dma_iova) {
                                (true, _) => "dma revoked".into(),
                                (false, Some(iova)) => format!("dma @{iova:#x}"),
                                (false, None) => String::new(),
                            },
                        ]);
                    }
                }
                println!("{t}");
            }
        }
        Cmd::Viommu { mappings } => {
            let (v, raw): (ViommuView, _) =
                c.call(Method::GET, "/devices/viommu", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                println!("virtual IOMMU at {}", v.pci);
                let mut t = table(&[
                    "endpoint", "pci", "owner", "pinned", "maps", "unmaps", "mapped", "refused",
                ]);
                for e in &v.endpoints {
                    t.add_row(vec![
                        e.name.clone(),
                        e.pci.clone(),
                        e.owner.clone(),
                        sizes.bytes(e.pinned_bytes),
                        e.counters.maps.to_string(),
                        e.counters.unmaps.to_string(),
                        sizes.bytes(e.counters.mapped_bytes),
                        e.counters.refused.to_string(),
                    ]);
                }
                println!("{t}");
                let mut t = table(&[
                    "region",
                    "maps",
                    "unmaps",
                    "mapped",
                    "mapped in all",
                    "refused",
                ]);
                for (region, c) in &v.regions {
                    t.add_row(vec![
                        region.clone(),
                        c.maps.to_string(),
                        c.unmaps.to_string(),
                        sizes.bytes(c.mapped_bytes),
                        sizes.bytes(c.mapped_bytes_total),
                        format!("{} ({})", c.refused, sizes.bytes(c.refused_bytes)),
                    ]);
                }
                println!("{t}");
                let by_status: Vec<String> = v
                    .requests_by_status
                    .iter()
                    .filter(|(_, &n)| n > 0)
                    .map(|(s, n)| format!("{s} {n}"))
                    .collect();
                println!(
                    "requests: {}; recalls {}, fences {} ({} fenced), faults reported {}",
                    if by_status.is_empty() {
                        "none".to_owned()
                    } else {
                        by_status.join(", ")
                    },
                    v.recalls,
                    v.fences,
                    sizes.bytes(v.fenced_bytes),
                    v.faults_reported
                );
                if mappings {
                    let mut t = table(&["endpoint", "domain", "iova", "guest address", "write"]);
                    for m in &v.mappings {
                        t.add_row(vec![
                            m.endpoint.clone(),
                            m.domain.to_string(),
                            range(m.iova, m.length),
                            format!("{:#x}", m.guest_addr),
                            if m.write { "yes" } else { "no" }.to_owned(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        Cmd::Breaks => {
            let (breaks, raw): (Vec<BreakView>, _) =
                c.call(Method::GET, "/breaks", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&[
                    "break",
                    "region",
                    "range",
                    "reason",
                    "deadline in",
                    "waiting on",
                ]);
                for b in breaks {
                    t.add_row(vec![
                        b.id.to_string(),
                        b.region,
                        range(b.offset, b.length),
                        b.reason,
                        duration_ms(b.deadline_in_ms),
                        owners(&b.waiting_on),
                    ]);
                }
                println!("{t}");
            }
        }
        Cmd::Events { follow, after } => events(&c, follow, after, json).await?,
        Cmd::Metrics => {
            let (status, bytes) = c.send(Method::GET, "/metrics", None).await?;
            if !status.is_success() {
                return Err(api_failure(status, &bytes));
            }
            let text = String::from_utf8_lossy(&bytes);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&metric_samples(&text)).unwrap_or_default()
                );
            } else {
                print!("{text}");
            }
        }
        Cmd::Punch(a) => change(&c, "punch", a, json).await?,
        Cmd::Zero(a) => change(&c, "zero", a, json).await?,
        Cmd::Break(a) => change(&c, "break", a, json).await?,
        Cmd::Lease(LeaseCmd::Acquire {
            region,
            offset,
            length,
            mode,
            owner,
        }) => {
            let body = LeaseBody {
                region,
                offset,
                length,
                owner,
                mode: match mode {
                    ModeArg::Shared => Mode::Shared,
                    ModeArg::Exclusive => Mode::Exclusive,
                },
            };
            let (l, raw): (LeaseView, _) = c.call(Method::POST, "/leases", Some(&body)).await?;
            if json {
                print_json(&raw);
            } else {
                println!(
                    "lease {} ({}) on {} {}",
                    l.id,
                    l.mode,
                    l.region,
                    range(l.offset, l.length)
                );
            }
        }
        Cmd::Lease(LeaseCmd::Release { id }) => {
            let (status, bytes) = c
                .send(Method::DELETE, &format!("/leases/{id}"), None)
                .await?;
            if !status.is_success() {
                return Err(api_failure(status, &bytes));
            }
            if json {
                println!("{{\"released\":{id}}}");
            } else {
                println!("lease {id} released");
            }
        }
        Cmd::RateLimit {
            region,
            ops,
            bytes,
            clear,
        } => {
            // One bucket at a time: the region's current limits, with only what was named changed.
            let (current, raw): (RegionView, _) = c
                .call(Method::GET, &format!("/regions/{region}"), None::<&()>)
                .await?;
            let mut body = current.rate_limit;
            let changed = ops.is_some() || bytes.is_some() || !clear.is_empty();
            if clear.contains(&BucketName::Ops) {
                body.ops = None;
            }
            if clear.contains(&BucketName::Bytes) {
                body.bytes = None;
            }
            if ops.is_some() {
                body.ops = ops;
            }
            if bytes.is_some() {
                body.bytes = bytes;
            }
            let (l, raw) = if changed {
                c.call::<RateLimit>(
                    Method::PUT,
                    &format!("/regions/{region}/rate-limit"),
                    Some(&body),
                )
                .await?
            } else {
                let limits = serde_json::to_vec(&body).unwrap_or_default();
                let _ = raw;
                (body, limits.into())
            };
            if json {
                print_json(&raw);
            } else {
                println!("{region}: {}", describe(&l));
            }
        }
        Cmd::Offers { region } => {
            let (offers, raw) = match &region {
                None => {
                    c.call::<Vec<Offer>>(Method::GET, "/reclaim", None::<&()>)
                        .await?
                }
                Some(r) => {
                    let (o, raw): (RegionOffers, _) = c
                        .call(Method::GET, &format!("/regions/{r}/reclaim"), None::<&()>)
                        .await?;
                    if !json {
                        println!("{}: reclaim policy {}", o.region, o.policy.name());
                    }
                    (o.offers, raw)
                }
            };
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["offer", "region", "range", "owner", "session", "offered at"]);
                for o in offers {
                    t.add_row(vec![
                        o.id.to_string(),
                        o.region,
                        range(o.offset, o.length),
                        o.owner.to_string(),
                        o.session.to_string(),
                        timestamp(o.at_ms),
                    ]);
                }
                println!("{t}");
            }
        }
        Cmd::Reclaim { region } => {
            let (r, raw): (ReclaimResult, _) = c
                .call(
                    Method::POST,
                    &format!("/regions/{region}/reclaim"),
                    None::<&()>,
                )
                .await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["offer", "range", "owner", "outcome"]);
                for o in &r.outcomes {
                    t.add_row(vec![
                        o.offer.id.to_string(),
                        range(o.offer.offset, o.offer.length),
                        o.offer.owner.to_string(),
                        if o.punched {
                            "punched".to_owned()
                        } else {
                            o.message.clone()
                        },
                    ]);
                }
                println!("{t}");
                println!("{}: {} reclaimed", r.region, sizes.bytes(r.reclaimed_bytes));
            }
            if r.outcomes.iter().any(|o| !o.punched) {
                // With --json the result above is the one document; the exit status says the rest.
                return Err(Failure {
                    code: EXIT_REFUSED,
                    message: "some offers were not punched (they stay listed)".into(),
                    body: None,
                    printed: true,
                });
            }
        }
        Cmd::ReclaimStats => {
            let (st, raw): (ReclaimStats, _) =
                c.call(Method::GET, "/reclaim/stats", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["region", "policy", "offered bytes", "reclaimed bytes"]);
                for r in &st.regions {
                    t.add_row(vec![
                        r.region.clone().unwrap_or_default(),
                        r.policy.map(|p| p.name().to_owned()).unwrap_or_default(),
                        r.offered_bytes.to_string(),
                        r.reclaimed_bytes.to_string(),
                    ]);
                }
                t.add_row(vec![
                    "(guest)".to_owned(),
                    format!("{} offers", st.guest.offers.unwrap_or(0)),
                    st.guest.offered_bytes.to_string(),
                    st.guest.reclaimed_bytes.to_string(),
                ]);
                println!("{t}");
            }
        }
        Cmd::ReclaimPolicy { region, policy } => {
            let body = PolicyBody {
                policy: match policy {
                    ReclaimPolicyArg::Manual => ReclaimPolicy::Manual,
                    ReclaimPolicyArg::Auto => ReclaimPolicy::Auto,
                },
            };
            let (p, raw): (PolicyBody, _) = c
                .call(
                    Method::PUT,
                    &format!("/regions/{region}/reclaim-policy"),
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&raw);
            } else {
                println!("{region}: reclaim policy {}", p.policy.name());
            }
        }
        Cmd::AddPmem(a) => {
            let body = daxvisor::api::regions::AddRegion {
                file: a.file,
                size: a.size,
                id: a.id,
                create: a.create.then_some(true),
                prefault: a.prefault.then_some(true),
                guard: a.guard,
            };
            let (r, raw): (RegionView, _) = c.call(Method::POST, "/regions", Some(&body)).await?;
            if json {
                print_json(&raw);
            } else {
                println!(
                    "region {} added: {} bytes at {:#x} ({})",
                    r.id, r.size, r.guest_addr, r.path
                );
            }
        }
        Cmd::RemovePmem {
            region,
            deadline_ms,
            eject_timeout_ms,
        } => {
            let mut path = format!("/regions/{region}?");
            if let Some(d) = deadline_ms {
                path.push_str(&format!("deadline_ms={d}&"));
            }
            if let Some(t) = eject_timeout_ms {
                path.push_str(&format!("eject_timeout_ms={t}&"));
            }
            let (r, raw): (daxvisor::api::regions::RemovedView, _) = c
                .call(
                    Method::DELETE,
                    path.trim_end_matches(['?', '&']),
                    None::<&()>,
                )
                .await?;
            if json {
                print_json(&raw);
            } else {
                println!(
                    "region {} removed in {} ms ({} holder(s) asked)",
                    r.region, r.total_ms, r.holders
                );
            }
        }
        Cmd::Revoke { owner } => {
            let (r, raw): (daxvisor::api::holds::RevokedView, _) = c
                .call(
                    Method::POST,
                    &format!("/owners/{owner}/revoke"),
                    None::<&()>,
                )
                .await?;
            if json {
                print_json(&raw);
            } else {
                println!(
                    "owner {} ({}) revoked: {} lease(s) released, {} DMA mapping(s) torn down, regions: {}",
                    r.owner,
                    r.name,
                    r.leases,
                    r.dma_torn_down,
                    if r.regions.is_empty() {
                        "none".to_owned()
                    } else {
                        r.regions.join(", ")
                    }
                );
            }
        }
        Cmd::Stop => {
            let (status, bytes) = c.send(Method::POST, "/vm/stop", None).await?;
            if !status.is_success() {
                return Err(api_failure(status, &bytes));
            }
            if json {
                println!("{{\"stopping\":true}}");
            } else {
                println!("VM stopping");
            }
        }
    }
    Ok(())
}

async fn events(c: &Client, follow: bool, after: u64, json: bool) -> Result<(), Failure> {
    let path = format!("/events?after={after}&follow={follow}");
    let resp = c.request(Method::GET, &path, None).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(api_failure(status, &bytes));
    }
    let mut pending = Vec::new();
    let mut stopped = false;
    // Frames may split lines: print whole lines as they complete.
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            // The VM said it stopped: the stream's end is the VM's, not a failure.
            Err(_) if stopped => break,
            Err(e) => return Err(Failure::unreachable(format!("event stream: {e}"))),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            stopped |= print_event(&line[..line.len() - 1], json);
        }
    }
    Ok(())
}

/// Print one event line (JSON lines with `--json`); whether it was the VM's `vm-stopped`.
fn print_event(line: &[u8], json: bool) -> bool {
    let event = serde_json::from_slice::<Event>(line).ok();
    let stopped = event
        .as_ref()
        .is_some_and(|e| e.kind == EventKind::VmStopped);
    if json {
        println!("{}", String::from_utf8_lossy(line));
        return stopped;
    }
    match event {
        Some(e) => {
            let region = e.region.map(|r| format!(" {r}")).unwrap_or_default();
            let errno = e.errno.map(|r| format!(" {r}")).unwrap_or_default();
            println!(
                "{} {:>5} {:<16}{region}{errno} {}",
                timestamp(e.at_ms),
                e.seq,
                e.kind,
                e.message
            );
        }
        None => println!("{}", String::from_utf8_lossy(line)),
    }
    stopped
}

/// Everything about one region, a field per line.
fn region_detail(r: &RegionView, sizes: Sizes) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("region", r.id.clone()),
        ("path", r.path.clone()),
        (
            "kind",
            format!("{}{}", r.kind, if r.readonly { " (read-only)" } else { "" }),
        ),
        ("size", sizes.bytes(r.size)),
        ("allocated", sizes.bytes(r.bytes_allocated)),
        ("guest address", format!("{:#x}", r.guest_addr)),
        ("dma pinnable", r.dma_pinnable.clone()),
        (
            "flushes",
            format!(
                "{} requests, {} syncs, {} errors",
                r.flush.requests, r.flush.syncs, r.flush.errors
            ),
        ),
        (
            "throttled",
            format!(
                "{} requests, waited {}",
                r.flush.throttled,
                duration_ms(r.flush.throttle_wait_us / 1000)
            ),
        ),
        ("rate limit", describe(&r.rate_limit)),
        (
            "leases",
            format!("{} over {}", r.leases, sizes.bytes(r.bytes_leased)),
        ),
        (
            "pins",
            format!("{} over {}", r.pins, sizes.bytes(r.bytes_pinned)),
        ),
        (
            "guard",
            format!(
                "{}, {} event(s){}",
                if r.guard.watched {
                    "watching"
                } else {
                    "not watched"
                },
                r.guard.events,
                r.guard
                    .last
                    .as_ref()
                    .map(|l| format!("; last: {l}"))
                    .unwrap_or_default()
            ),
        ),
        (
            "read-only writes dropped",
            r.flush.readonly_writes_dropped.to_string(),
        ),
    ];
    fields(rows).to_string()
}

/// The samples of Prometheus text as JSON objects: `{"name", "labels", "value"}` (comments left out).
fn metric_samples(text: &str) -> serde_json::Value {
    let samples: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
                None => (series, ""),
            };
            let mut map = serde_json::Map::new();
            // Label values this VMM writes hold no '",' sequences (names, numbers, words).
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once("=\"") {
                    map.insert(k.to_owned(), v.trim_end_matches('"').into());
                }
            }
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            Some(serde_json::json!({"name": name, "labels": map, "value": value}))
        })
        .collect();
    serde_json::Value::Array(samples)
}

async fn change(c: &Client, what: &str, a: ChangeArgs, json: bool) -> Result<(), Failure> {
    let body = ChangeBody {
        offset: a.offset,
        length: a.length,
        deadline_ms: a.deadline,
        policy: match a.policy {
            PolicyArg::Fail => Policy::Fail,
            PolicyArg::Revoke => Policy::Revoke,
        },
    };
    let path = format!("/regions/{}/{what}", a.region);
    let call = c.call::<ChangeResult>(Method::POST, &path, Some(&body));
    let live = std::io::stderr().is_terminal();
    let (r, raw) = if live {
        tokio::pin!(call);
        let mut shown = false;
        loop {
            tokio::select! {
                r = &mut call => {
                    if shown {
                        eprint!("\r\x1b[2K");
                    }
                    break r?;
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Ok((breaks, _)) = c.call::<Vec<BreakView>>(Method::GET, "/breaks", None::<&()>).await {
                        if let Some(b) = breaks.iter().find(|b| b.region == a.region) {
                            eprint!(
                                "\r\x1b[2K{what} {}: waiting on {}, {} left",
                                range(b.offset, b.length),
                                owners(&b.waiting_on),
                                duration_ms(b.deadline_in_ms)
                            );
                            shown = true;
                        }
                    }
                }
            }
        }
    } else {
        call.await?
    };
    if json {
        print_json(&raw);
        return Ok(());
    }
    println!(
        "{what} {} {} done in {}{}{}",
        r.region,
        range(r.offset, r.length),
        duration_ms(r.total_ms),
        if r.waited_for_transient {
            ", waited for an in-flight flush"
        } else {
            ""
        },
        if r.queued_behind_break {
            ", queued behind another break"
        } else {
            ""
        },
    );
    if !r.holders.is_empty() {
        let mut t = table(&["owner", "name", "released after", "revoked"]);
        for h in r.holders {
            t.add_row(vec![
                h.owner.to_string(),
                h.name,
                h.released_after_ms.map_or_else(|| "-".into(), duration_ms),
                if h.revoked { "yes" } else { "no" }.into(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

fn parse_iova(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}
