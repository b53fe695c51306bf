//! `daxvisor-agent`: the Linux guest agent for daxvisor's layout leases (docs/agent-protocol.md).
//!
//! `daxvisor-agent daemon` owns the virtio-console port `/dev/virtio-ports/org.daxvisor.agent.0` and serves
//! applications on a Unix socket, one owner per connection (JSON lines, see [`ipc`]); the other subcommands are
//! such applications, for people and scripts: `regions`, `lease`, `pin`, `prepare`, `release`, `status`, with
//! tables or `--json`; `reclaim` gives the free space of pmem filesystems back to the host ([`thin`]).

mod config;
mod daemon;
mod freeze;
mod fsmap;
mod ipc;
mod port;
mod thin;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use comfy_table::Table;

use ipc::{Event, Line, Request, Response};

#[derive(Parser)]
#[command(
    name = "daxvisor-agent",
    version,
    about = "daxvisor guest agent: layout leases for guest applications"
)]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/run/daxvisor-agent.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Own the agent port and serve applications.
    Daemon {
        /// The agent port.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/dev/virtio-ports/org.daxvisor.agent.0"
        )]
        port: PathBuf,
        /// Run with `sh -c` on every break notice, with DAXVISOR_REGION, DAXVISOR_OFFSET, DAXVISOR_LENGTH,
        /// DAXVISOR_DEADLINE_MS, DAXVISOR_REASON, DAXVISOR_LEASE in its environment; exit 0 releases the lease.
        /// On a DMA recall (DAXVISOR_EVENT=dma-recall): DAXVISOR_DEVICE (PCI name), DAXVISOR_GUEST_ADDR,
        /// DAXVISOR_LENGTH, DAXVISOR_DEADLINE_MS; the hook stops the device's DMA there, nothing is released.
        #[arg(long, value_name = "COMMAND")]
        hook: Option<String>,
        /// The configuration file (periodic reclaim: `every=`, `mount=`, `min-size=`, `timeout=`); missing =
        /// defaults (no periodic reclaim).
        #[arg(long, value_name = "PATH", default_value = "/etc/daxvisor-agent.conf")]
        config: PathBuf,
    },
    /// Give the free space of filesystems on pmem back to the host: freeze, offer the free ranges, thaw.
    Reclaim {
        /// Only this mount (default: every filesystem on a pmem device).
        #[arg(long, value_name = "PATH")]
        mount: Option<PathBuf>,
        /// Free ranges shorter than this are not offered (K, M, G suffixes).
        #[arg(long, value_name = "SIZE", default_value = "2M", value_parser = thin::parse_size)]
        min_size: u64,
        /// How long the host may take to answer while the filesystem is frozen (s, m suffixes).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// The pmem regions of this VM.
    Regions,
    /// Take a lease and hold it until the host asks for it back (or until killed).
    Lease {
        #[command(flatten)]
        range: RangeArgs,
        /// Unbreakable: the host's conflicting changes fail instead of asking.
        #[arg(long)]
        exclusive: bool,
    },
    /// Take an exclusive lease, make the range pinnable and pin it; hold until killed.
    Pin {
        #[command(flatten)]
        range: RangeArgs,
        /// Pin for DMA: the host maps exactly the range for the VM's passthrough devices (at its guest
        /// physical address) until the pin ends. Needs a region given with dma=agent on the host.
        #[arg(long)]
        dma: bool,
    },
    /// Make a range pinnable (under a temporary exclusive lease).
    Prepare {
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Release a lease held by any application of this guest.
    Release {
        /// The lease id.
        lease: u64,
    },
    /// Session, applications, leases and pins as the agent sees them.
    Status,
}

#[derive(clap::Args, Clone)]
struct RangeArgs {
    /// Region: its name (the host's `--pmem id=`, from `regions`) or its number.
    #[arg(long)]
    region: String,
    /// Offset in the region: a size (`1M`, `0x100000`, `4096`; docs: daxvisor_proto::units).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Length: a size; 0 = to the end of the region.
    #[arg(long, visible_alias = "len", default_value = "0", value_parser = parse_size)]
    length: u64,
}

/// A size on the command line, in the syntax every daxvisor command shares.
fn parse_size(s: &str) -> Result<u64, String> {
    daxvisor_proto::units::parse_size(s).map_err(|e| {
        format!(
            "'{s}': {e}; expected {}",
            daxvisor_proto::units::SIZE_SYNTAX
        )
    })
}

/// A range with its region resolved to the number the daemon speaks.
#[derive(Clone, Copy)]
struct Range {
    region: u64,
    offset: u64,
    len: u64,
}

impl RangeArgs {
    /// Resolve the region name against the daemon's region list (a number is taken as is).
    fn resolve(&self, c: &mut Conn) -> Result<Range, String> {
        let region = match self.region.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                let regions = c.call(&Request::Regions)?.regions.unwrap_or_default();
                regions
                    .iter()
                    .find(|r| r.name == self.region)
                    .map(|r| r.id)
                    .ok_or_else(|| {
                        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
                        format!(
                            "no region named {}; this VM has: {}",
                            self.region,
                            names.join(", ")
                        )
                    })?
            }
        };
        Ok(Range {
            region,
            offset: self.offset,
            len: self.length,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Daemon { port, hook, config } => config::load(&config).and_then(|reclaim| {
            daemon::run(daemon::Config {
                port,
                socket: cli.socket.clone(),
                hook,
                reclaim,
            })
            .map_err(|e| format!("daemon: {e}"))
        }),
        cmd => client(&cli.socket, cli.json, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("daxvisor-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A connection to the daemon.
struct Conn {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Conn {
    fn open(socket: &PathBuf) -> Result<Conn, String> {
        let out = UnixStream::connect(socket)
            .map_err(|e| format!("cannot reach the daemon at {}: {e}", socket.display()))?;
        let lines = BufReader::new(out.try_clone().map_err(|e| e.to_string())?);
        Ok(Conn { out, lines })
    }

    fn next(&mut self) -> Result<Line, String> {
        let mut s = String::new();
        match self.lines.read_line(&mut s) {
            Ok(0) => Err("the daemon closed the connection (session with daxvisor lost?)".into()),
            Ok(_) => serde_json::from_str(&s).map_err(|e| format!("bad line from the daemon: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn call(&mut self, req: &Request) -> Result<Response, String> {
        let mut s = serde_json::to_string(req).map_err(|e| e.to_string())?;
        s.push('\n');
        self.out
            .write_all(s.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            if let Line::Response(r) = self.next()? {
                if !r.ok {
                    return Err(format!(
                        "{}: {}{}",
                        r.errno.as_deref().unwrap_or("error"),
                        r.error.as_deref().unwrap_or(""),
                        r.holder
                            .map(|h| format!(" (held by owner {h})"))
                            .unwrap_or_default()
                    ));
                }
                return Ok(r);
            }
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    if let Ok(s) = serde_json::to_string_pretty(v) {
        println!("{s}");
    }
}

fn client(socket: &PathBuf, json: bool, cmd: Cmd) -> Result<(), String> {
    let mut c = Conn::open(socket)?;
    match cmd {
        Cmd::Daemon { .. } => Ok(()),
        Cmd::Regions => {
            let r = c.call(&Request::Regions)?;
            let regions = r.regions.unwrap_or_default();
            if json {
                print_json(&regions);
            } else {
                let mut t = Table::new();
                t.set_header([
                    "id",
                    "name",
                    "guest addr",
                    "size",
                    "kind",
                    "read-only",
                    "DMA-pinnable",
                ]);
                for r in &regions {
                    t.add_row([
                        r.id.to_string(),
                        r.name.clone(),
                        format!("{:#x}", r.guest_addr),
                        daxvisor_proto::units::HumanBytes(r.size).to_string(),
                        r.kind.clone(),
                        r.readonly.to_string(),
                        r.dma_pinnable.to_string(),
                    ]);
                }
                println!("{t}");
            }
            Ok(())
        }
        Cmd::Lease { range, exclusive } => {
            let range = range.resolve(&mut c)?;
            let r = c.call(&Request::Lease {
                region: range.region,
                offset: range.offset,
                len: range.len,
                exclusive,
            })?;
            let lease = r.id.unwrap_or(0);
            report(json, &r, "lease");
            hold_lease(&mut c, json, lease)
        }
        Cmd::Pin { range, dma } => {
            let range = range.resolve(&mut c)?;
            c.call(&Request::Lease {
                region: range.region,
                offset: range.offset,
                len: range.len,
                exclusive: true,
            })?;
            c.call(&Request::Prepare {
                region: range.region,
                offset: range.offset,
                len: range.len,
            })?;
            let r = c.call(&Request::Pin {
                region: range.region,
                offset: range.offset,
                len: range.len,
                dma,
            })?;
            report(json, &r, "pin");
            // Held while this connection lives.
            loop {
                c.next()?;
            }
        }
        Cmd::Prepare { range } => {
            let range = range.resolve(&mut c)?;
            c.call(&Request::Lease {
                region: range.region,
                offset: range.offset,
                len: range.len,
                exclusive: true,
            })?;
            let r = c.call(&Request::Prepare {
                region: range.region,
                offset: range.offset,
                len: range.len,
            })?;
            report(json, &r, "prepared");
            Ok(())
        }
        Cmd::Release { lease } => {
            let r = c.call(&Request::Release { lease })?;
            report(json, &r, "released");
            Ok(())
        }
        Cmd::Reclaim {
            mount,
            min_size,
            timeout,
        } => {
            let r = c.call(&Request::Reclaim {
                mount: mount.map(|m| m.display().to_string()),
                min_size,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            })?;
            let reports = r.reclaim.unwrap_or_default();
            if json {
                print_json(&reports);
            } else {
                for r in &reports {
                    println!("{}", thin::summary(r));
                }
            }
            if reports.is_empty() {
                return Err("no filesystem on a pmem device".into());
            }
            match reports.iter().find_map(|r| r.error.as_deref()) {
                Some(e) => Err(format!("reclaim: {e}")),
                None => Ok(()),
            }
        }
        Cmd::Status => {
            let st = c.call(&Request::Status)?.status.unwrap_or_default();
            if json {
                print_json(&st);
            } else {
                println!(
                    "session {} on {}; {} connection(s); {} break(s) seen, {} hook run(s)",
                    st.session, st.port, st.clients, st.breaks_seen, st.hooks_run
                );
                let mut t = Table::new();
                t.set_header([
                    "id", "what", "owner", "client", "region", "offset", "length",
                ]);
                for h in &st.holds {
                    t.add_row([
                        h.id.to_string(),
                        h.what.clone(),
                        h.owner.to_string(),
                        h.client.clone(),
                        h.region.to_string(),
                        format!("{:#x}", h.offset),
                        format!("{:#x}", h.len),
                    ]);
                }
                println!("{t}");
            }
            Ok(())
        }
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    thin::parse_every(s)?.ok_or_else(|| "the timeout must be more than 0".to_owned())
}

fn report(json: bool, r: &Response, what: &str) {
    if json {
        print_json(r);
    } else {
        println!(
            "{what} {} offset {:#x} length {:#x}",
            r.id.map(|i| i.to_string()).unwrap_or_default(),
            r.offset.unwrap_or(0),
            r.len.unwrap_or(0)
        );
    }
}

/// Holds the lease until it is released (by the daemon's hook, or by this process after a break notice when
/// no hook releases it within the deadline) or revoked.
fn hold_lease(c: &mut Conn, json: bool, lease: u64) -> Result<(), String> {
    loop {
        match c.next()? {
            Line::Event(ev @ Event::Break { deadline_ms, .. }) => {
                if json {
                    print_json(&ev);
                } else if let Event::Break {
                    offset,
                    len,
                    reason,
                    ..
                } = &ev
                {
                    println!(
                        "break: lease {lease} offset {offset:#x} length {len:#x} reason {reason}"
                    );
                }
                // Give the daemon's hook the first half of the deadline, then release from here.
                let wait = Duration::from_millis(u64::from(deadline_ms) / 2);
                c.out
                    .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                    .ok();
                c.lines
                    .get_ref()
                    .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                    .ok();
                match c.next() {
                    Ok(Line::Event(Event::Released { .. })) => {
                        println!("released lease {lease} (hook)");
                        return Ok(());
                    }
                    _ => {
                        c.lines.get_ref().set_read_timeout(None).ok();
                        c.call(&Request::Release { lease })?;
                        println!("released lease {lease}");
                        return Ok(());
                    }
                }
            }
            Line::Event(Event::Released { .. }) => {
                println!("released lease {lease} (hook)");
                return Ok(());
            }
            Line::Event(Event::Revoked { .. }) => return Err(format!("lease {lease} revoked")),
            Line::Response(_) => {}
        }
    }
}
