//! `daxvisor-ctl list`: every VM of the host, from the sockets in the socket directory. Each is asked for
//! its VM, regions and owners; a socket nobody answers on is listed as such (a daxvisor that died without
//! removing it), not an error.

use hyper::Method;
use serde::Serialize;

use daxvisor::api::holds::OwnerView;
use daxvisor::api::regions::RegionView;
use daxvisor::api::vm::VmView;
use daxvisor::socket_dir;

use crate::human::{duration_ms, table, Sizes};
use crate::{print_json, Client, Failure};

/// One VM as `list` shows it (`--json`: an array of these).
#[derive(Serialize)]
struct Listed {
    name: String,
    socket: String,
    /// "running", "stopping", or "not answering".
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_ms: Option<u64>,
    regions: Vec<String>,
    /// Guest-visible bytes of its pmem regions.
    bytes_mapped: u64,
    /// Bytes the filesystem allocated to their backing files.
    bytes_allocated: u64,
    /// Owners holding a lease or a pin.
    holders: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn ask(name: String, socket: std::path::PathBuf) -> Listed {
    let c = Client {
        socket: socket.clone(),
    };
    let mut l = Listed {
        name,
        socket: socket.display().to_string(),
        state: "not answering".into(),
        pid: None,
        uptime_ms: None,
        regions: Vec::new(),
        bytes_mapped: 0,
        bytes_allocated: 0,
        holders: Vec::new(),
        error: None,
    };
    let answer = async {
        let (vm, _) = c.call::<VmView>(Method::GET, "/vm", None::<&()>).await?;
        let (regions, _) = c
            .call::<Vec<RegionView>>(Method::GET, "/regions", None::<&()>)
            .await?;
        let (owners, _) = c
            .call::<Vec<OwnerView>>(Method::GET, "/owners", None::<&()>)
            .await?;
        Ok::<_, Failure>((vm, regions, owners))
    };
    match answer.await {
        Ok((vm, regions, owners)) => {
            l.state = vm.state;
            l.pid = Some(vm.pid);
            l.uptime_ms = Some(vm.uptime_ms);
            l.bytes_mapped = regions.iter().map(|r| r.size).sum();
            l.bytes_allocated = regions.iter().map(|r| r.bytes_allocated).sum();
            l.regions = regions.into_iter().map(|r| r.id).collect();
            l.holders = owners
                .into_iter()
                .filter(|o| !o.leases.is_empty() || !o.pins.is_empty())
                .map(|o| o.name)
                .collect();
        }
        Err(f) => l.error = Some(f.message),
    }
    l
}

pub async fn run(json: bool, sizes: Sizes) -> Result<(), Failure> {
    let dir = socket_dir::dir();
    let sockets = socket_dir::list(&dir).map_err(|e| Failure::unreachable(e.to_string()))?;
    let mut listed = Vec::new();
    for (name, socket) in sockets {
        listed.push(ask(name, socket).await);
    }
    if json {
        print_json(&serde_json::to_vec(&listed).unwrap_or_default());
        return Ok(());
    }
    let mut t = table(&[
        "name",
        "pid",
        "uptime",
        "regions",
        "mapped",
        "allocated",
        "holders",
    ]);
    for l in &listed {
        if l.error.is_some() {
            t.add_row(vec![l.name.clone(), "-".into(), l.state.clone()]);
            continue;
        }
        t.add_row(vec![
            l.name.clone(),
            l.pid.map(|p| p.to_string()).unwrap_or_default(),
            l.uptime_ms.map(duration_ms).unwrap_or_default(),
            l.regions.join(", "),
            sizes.bytes(l.bytes_mapped),
            sizes.bytes(l.bytes_allocated),
            if l.holders.is_empty() {
                "-".to_owned()
            } else {
                l.holders.join(", ")
            },
        ]);
    }
    println!("{t}");
    println!("{} VM(s) in {}", listed.len(), dir.display());
    Ok(())
}
