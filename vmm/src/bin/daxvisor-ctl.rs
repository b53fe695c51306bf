//! `daxvisor-ctl`: the operator's command line for a running daxvisor's API socket (`daxvisor run
//! --api-socket PATH`). Every read and action of the API; tables by default, `--json` for the API's own JSON.
//!
//! Exit status: 0 done; 1 the API could not be reached or failed; 2 bad usage; 3 the action was refused by the
//! layout-lease manager (the errno name and the holder are printed); 4 the API rejected the request (bad
//! input, unknown region or lease).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use daxvisor::api::changes::{ChangeBody, ChangeResult, Policy};
use daxvisor::api::error::ErrorBody;
use daxvisor::api::events::Event;
use daxvisor::api::holds::{BreakView, LeaseBody, LeaseView, Mode, OwnerView};
use daxvisor::api::reclaim::{PolicyBody, ReclaimResult, RegionOffers};
use daxvisor::api::regions::{describe, Bucket, RateLimit, RegionView};
use daxvisor::api::vm::VmView;
use daxvisor::reclaim::{Offer, ReclaimPolicy};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

const EXIT_UNREACHABLE: u8 = 1;
const EXIT_REFUSED: u8 = 3;
const EXIT_REJECTED: u8 = 4;

#[derive(Parser)]
#[command(
    name = "daxvisor-ctl",
    version,
    about = "Operate a running daxvisor through its API socket"
)]
struct Cli {
    /// The socket given to `daxvisor run --api-socket`.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The VM: state, uptime, configuration.
    Vm,
    /// pmem regions: backing, placement, flush counters, rate limits, guard, holds.
    Regions {
        /// Only this region.
        id: Option<String>,
    },
    /// Owners with their leases and pins.
    Owners,
    /// Breaks in progress: range, reason, time left, who still holds.
    Breaks,
    /// The event log; with --follow, keep printing events as they happen.
    Events {
        #[arg(long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Prometheus metrics (text).
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
    /// Set a region's flush rate limits (omitted buckets become unlimited).
    RateLimit {
        region: String,
        /// Flush requests: SIZE/REFILL_MS, e.g. 100/1000 for a burst of 100 refilled every second.
        #[arg(long, value_name = "SIZE/MS", value_parser = parse_bucket)]
        ops: Option<Bucket>,
        /// Bytes (each sync costs the region size): SIZE/REFILL_MS; SIZE takes K, M, G.
        #[arg(long, value_name = "SIZE/MS", value_parser = parse_bucket)]
        bytes: Option<Bucket>,
    },
    /// Ranges guests offered back for reclaim (of one region, with its policy, when named).
    Offers { region: Option<String> },
    /// Punch every offered range of a region now.
    Reclaim { region: String },
    /// Set what happens to a region's offers: listed until `reclaim` (manual) or punched at once (auto).
    ReclaimPolicy {
        region: String,
        #[arg(value_enum)]
        policy: ReclaimPolicyArg,
    },
    /// Stop the VM gracefully.
    Stop,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReclaimPolicyArg {
    Manual,
    Auto,
}

#[derive(clap::Args)]
struct ChangeArgs {
    region: String,
    /// Region-relative offset (K, M, G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Bytes; 0 = to the end of the region (K, M, G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    length: u64,
    /// Milliseconds holders get to release.
    #[arg(long)]
    deadline_ms: Option<u64>,
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
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// 0 = to the end of the region.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        length: u64,
        #[arg(long, value_enum)]
        mode: ModeArg,
    },
    /// Release one of the operator's leases.
    Release { id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Shared,
    Exclusive,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n = match num.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => num.parse(),
    }
    .map_err(|e| format!("'{s}': {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_bucket(s: &str) -> Result<Bucket, String> {
    let (size, ms) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}': expected SIZE/REFILL_MS"))?;
    Ok(Bucket {
        size: parse_size(size)?,
        refill_ms: ms.parse().map_err(|e| format!("'{ms}': {e}"))?,
    })
}

/// What went wrong, and the exit status it means.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn unreachable(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_UNREACHABLE,
            message: message.into(),
        }
    }
}

struct Client {
    socket: PathBuf,
}

impl Client {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), Failure> {
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
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::unreachable(format!("request failed: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// A request whose success body is `T`; an error body becomes a [`Failure`] with its exit status.
    async fn call<T: DeserializeOwned>(
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
    let mut message = match &err.errno {
        Some(errno) => format!("refused: {errno}: {}", err.error),
        None => format!("rejected: {}", err.error),
    };
    if let Some(h) = &err.holder {
        message.push_str(&format!(
            "\nholder: owner {} ({}) with a {} on [{:#x}, +{:#x})",
            h.owner, h.name, h.kind, h.offset, h.length
        ));
    }
    if !err.holders.is_empty() {
        message.push_str(&format!("\nnot released by owners: {:?}", err.holders));
    }
    let code = if status == StatusCode::CONFLICT {
        EXIT_REFUSED
    } else if status.is_client_error() {
        EXIT_REJECTED
    } else {
        EXIT_UNREACHABLE
    };
    Failure { code, message }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn range(offset: u64, length: u64) -> String {
    if length == 0 {
        format!("[{offset:#x}, end)")
    } else {
        format!("[{offset:#x}, {:#x})", offset.saturating_add(length))
    }
}

fn print_json(bytes: &[u8]) {
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("daxvisor-ctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let c = Client {
        socket: cli.api_socket,
    };
    let json = cli.json;
    match cli.command {
        Cmd::Vm => {
            let (v, raw): (VmView, _) = c.call(Method::GET, "/vm", None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&[
                    "state", "uptime", "pid", "kernel", "cmdline", "memory", "cpus", "pmem",
                ]);
                t.add_row(vec![
                    v.state,
                    format!("{:.1}s", v.uptime_ms as f64 / 1000.0),
                    v.pid.to_string(),
                    v.config.kernel,
                    v.config.cmdline,
                    format!("{} MiB", v.config.memory_mib),
                    v.config.cpus.to_string(),
                    v.config.pmem.join(", "),
                ]);
                println!("{t}");
            }
        }
        Cmd::Regions { id } => {
            let path = id.map_or_else(|| "/regions".to_owned(), |i| format!("/regions/{i}"));
            let (_, raw): (serde_json::Value, _) = c.call(Method::GET, &path, None::<&()>).await?;
            if json {
                print_json(&raw);
            } else {
                let regions: Vec<RegionView> = serde_json::from_slice::<Vec<RegionView>>(&raw)
                    .or_else(|_| serde_json::from_slice::<RegionView>(&raw).map(|r| vec![r]))
                    .map_err(|e| Failure::unreachable(format!("unexpected answer: {e}")))?;
                let mut t = table(&[
                    "id",
                    "path",
                    "kind",
                    "size",
                    "guest addr",
                    "flush req/sync/err",
                    "throttled",
                    "rate limit",
                    "leases",
                    "pins",
                    "leased",
                    "pinned",
                    "guard",
                    "dma pinnable",
                ]);
                for r in regions {
                    t.add_row(vec![
                        r.id,
                        r.path,
                        format!("{}{}", r.kind, if r.readonly { " (ro)" } else { "" }),
                        r.size.to_string(),
                        format!("{:#x}", r.guest_addr),
                        format!("{}/{}/{}", r.flush.requests, r.flush.syncs, r.flush.errors),
                        r.flush.throttled.to_string(),
                        describe(&r.rate_limit),
                        r.leases.to_string(),
                        r.pins.to_string(),
                        r.bytes_leased.to_string(),
                        r.bytes_pinned.to_string(),
                        format!("{} event(s)", r.guard.events),
                        r.dma_pinnable
                            .split([':', ' '])
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    ]);
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
                            if p.dma_revoked {
                                "dma revoked".into()
                            } else {
                                String::new()
                            },
                        ]);
                    }
                }
                println!("{t}");
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
                        format!("{} ms", b.deadline_in_ms),
                        format!("{:?}", b.waiting_on),
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
            print!("{}", String::from_utf8_lossy(&bytes));
        }
        Cmd::Punch(a) => change(&c, "punch", a, json).await?,
        Cmd::Zero(a) => change(&c, "zero", a, json).await?,
        Cmd::Break(a) => change(&c, "break", a, json).await?,
        Cmd::Lease(LeaseCmd::Acquire {
            region,
            offset,
            length,
            mode,
        }) => {
            let body = LeaseBody {
                region,
                offset,
                length,
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
        Cmd::RateLimit { region, ops, bytes } => {
            let body = RateLimit { ops, bytes };
            let (l, raw): (RateLimit, _) = c
                .call(
                    Method::PUT,
                    &format!("/regions/{region}/rate-limit"),
                    Some(&body),
                )
                .await?;
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
                let mut t = table(&["offer", "region", "range", "owner", "session"]);
                for o in offers {
                    t.add_row(vec![
                        o.id.to_string(),
                        o.region,
                        range(o.offset, o.length),
                        o.owner.to_string(),
                        o.session.to_string(),
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
                println!("{}: {} bytes reclaimed", r.region, r.reclaimed_bytes);
            }
            if r.outcomes.iter().any(|o| !o.punched) {
                return Err(Failure {
                    code: EXIT_REFUSED,
                    message: "some offers were not punched (they stay listed)".into(),
                });
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
    let stream = tokio::net::UnixStream::connect(&c.socket)
        .await
        .map_err(|e| {
            Failure::unreachable(format!("cannot connect to {}: {e}", c.socket.display()))
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::unreachable(format!("HTTP handshake: {e}")))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "daxvisor")
        .body(Full::new(Bytes::new()))
        .map_err(|e| Failure::unreachable(format!("request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Failure::unreachable(format!("request failed: {e}")))?;
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
    // Frames may split lines: print whole lines as they complete.
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::unreachable(format!("event stream: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            print_event(&line[..line.len() - 1], json);
        }
    }
    Ok(())
}

fn print_event(line: &[u8], json: bool) {
    if json {
        println!("{}", String::from_utf8_lossy(line));
        return;
    }
    match serde_json::from_slice::<Event>(line) {
        Ok(e) => {
            let region = e.region.map(|r| format!(" [{r}]")).unwrap_or_default();
            let errno = e.errno.map(|r| format!(" {r}")).unwrap_or_default();
            println!("{:>5} {:<16}{region}{errno} {}", e.seq, e.kind, e.message);
        }
        Err(_) => println!("{}", String::from_utf8_lossy(line)),
    }
}

async fn change(c: &Client, what: &str, a: ChangeArgs, json: bool) -> Result<(), Failure> {
    let body = ChangeBody {
        offset: a.offset,
        length: a.length,
        deadline_ms: a.deadline_ms,
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
                                "\r\x1b[2K{what} {}: waiting on owners {:?}, {:.1}s left",
                                range(b.offset, b.length),
                                b.waiting_on,
                                b.deadline_in_ms as f64 / 1000.0
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
        "{what} {} {} done in {} ms{}{}",
        r.region,
        range(r.offset, r.length),
        r.total_ms,
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
                h.released_after_ms
                    .map_or_else(|| "-".into(), |m| format!("{m} ms")),
                if h.revoked { "yes" } else { "no" }.into(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
