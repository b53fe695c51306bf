//! A host with several VMs, as an operator runs it: VMs started by name, `daxvisor-ctl list` over all of them,
//! one selected by name or by `DAXVISOR_API_SOCKET`, a real Prometheus scraping their loopback metrics, every
//! `--json` document checked against the OpenAPI schemas (refusals included), event followers that end when the
//! VM stops, and the operator's own leases.

// Test code: a failed step fails the test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daxvisor_tests::api::ctl_bin;
use daxvisor_tests::{daxvisor_bin, missing_prerequisite, run_with_timeout, RunOutcome, RunningVm};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A VM started with `--name` in a private socket directory.
struct NamedVm {
    vm: RunningVm,
    metrics_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_named(sockets: &Path, dir: &Path, name: &str) -> NamedVm {
    let port = free_port();
    let img = dir.join(format!("{name}.img"));
    let mut vm = RunningVm::spawn_with(
        Command::new(daxvisor_bin())
            .env("DAXVISOR_SOCKET_DIR", sockets)
            .args(["run", "--name", name, "--memory", "128M"])
            .arg("--pmem")
            .arg(format!("file={},size=4M,create=on,id=data", img.display()))
            .args(["--cmdline", "pmem=write-flush-spin"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}")),
    );
    vm.wait_for_line("spinning until killed");
    NamedVm {
        vm,
        metrics_port: port,
    }
}

/// `daxvisor-ctl <args>` with the socket directory `sockets` and extra environment.
fn ctl(sockets: &Path, env: &[(&str, &str)], args: &[&str]) -> RunOutcome {
    let mut cmd = Command::new(ctl_bin());
    cmd.env("DAXVISOR_SOCKET_DIR", sockets)
        .env_remove("DAXVISOR_API_SOCKET")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

fn ctl_ok(sockets: &Path, args: &[&str]) -> String {
    let r = ctl(sockets, &[], args);
    assert_eq!(r.code, Some(0), "daxvisor-ctl {args:?}: {r:?}");
    r.stdout
}

/// One plain HTTP GET over TCP: the body.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    daxvisor_tests::api::parse_response(&out).1
}

#[test]
fn three_named_vms_are_one_list_each_reached_by_name_and_prometheus_scrapes_them_by_vm() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("run");
    let names = ["vm1", "vm2", "vm3"];
    let vms: Vec<NamedVm> = names
        .iter()
        .map(|n| start_named(&sockets, dir.path(), n))
        .collect();

    // The socket directory is the operator's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sockets).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    // One view of the host.
    let table = ctl_ok(&sockets, &["list"]);
    for n in names {
        assert!(table.contains(n), "{table}");
    }
    assert!(table.contains("3 VM(s)"), "{table}");
    assert!(table.contains("4 MiB"), "sizes are humanised: {table}");
    let list: Value = serde_json::from_str(&ctl_ok(&sockets, &["--json", "list"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for (entry, vm) in list.iter().zip(&vms) {
        assert_eq!(entry["state"], "running", "{entry}");
        assert_eq!(entry["pid"], vm.vm.pid(), "{entry}");
        assert_eq!(entry["regions"], serde_json::json!(["data"]));
        assert_eq!(entry["bytes_mapped"], 4 * MIB);
        assert!(
            entry["bytes_allocated"].as_u64().unwrap() >= 4 * MIB,
            "{entry}"
        );
    }

    // One VM by name, or by DAXVISOR_API_SOCKET.
    let v: Value =
        serde_json::from_str(&ctl_ok(&sockets, &["--name", "vm2", "--json", "vm"])).unwrap();
    assert_eq!(v["pid"], vms[1].vm.pid());
    assert_eq!(v["config"]["name"], "vm2");
    let vm3_socket = sockets.join("vm3.sock");
    let r = ctl(
        &sockets,
        &[("DAXVISOR_API_SOCKET", vm3_socket.to_str().unwrap())],
        &["--json", "vm"],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["pid"], vms[2].vm.pid());

    // Errors say what is wrong, and --json prints the error object.
    let r = ctl(&sockets, &[], &["--name", "vm9", "vm"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("no VM named vm9"), "{}", r.stderr);
    assert!(r.stderr.contains("vm1, vm2, vm3"), "{}", r.stderr);
    let r = ctl(
        &dir.path().join("nowhere"),
        &[],
        &["--json", "--name", "vm1", "vm"],
    );
    assert!(r.stderr.contains("no such directory"), "{}", r.stderr);
    let e: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(e["error"].as_str().unwrap().contains("no such directory"));
    let not_a_socket = dir.path().join("vm1.img");
    let r = ctl(
        &sockets,
        &[],
        &["--api-socket", not_a_socket.to_str().unwrap(), "vm"],
    );
    assert!(r.stderr.contains("is not a socket"), "{}", r.stderr);
    let r = ctl(&sockets, &[], &["vm"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("--name"), "{}", r.stderr);

    // Every series carries the VM's name, on the loopback listener Prometheus scrapes.
    for (n, vm) in names.iter().zip(&vms) {
        let text = http_get(vm.metrics_port, "/metrics");
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(samples.len() > 10, "{text}");
        let label = format!("vm=\"{n}\"");
        assert!(samples.iter().all(|l| l.contains(&label)), "{text}");
        assert!(
            samples
                .iter()
                .any(|l| l.starts_with("daxvisor_build_info{") && l.contains("commit=")),
            "{text}"
        );
    }
    scraped_by_prometheus(dir.path(), &vms, &names);

    for n in names {
        assert!(ctl_ok(&sockets, &["--name", n, "stop"]).contains("stopping"));
    }
    for vm in vms {
        let r = vm.vm.finish(Duration::from_secs(30));
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
    assert!(ctl_ok(&sockets, &["list"]).contains("0 VM(s)"));
}

/// Debian's Prometheus scrapes the three listeners; its query API answers with one `daxvisor_build_info`
/// series per VM, labelled with the VM's name.
fn scraped_by_prometheus(dir: &Path, vms: &[NamedVm], names: &[&str]) {
    let Some(prometheus) = which("prometheus") else {
        missing_prerequisite("prometheus (Debian's package; scripts/setup-host.sh installs it)");
        return;
    };
    let targets: Vec<String> = vms
        .iter()
        .map(|v| format!("\"127.0.0.1:{}\"", v.metrics_port))
        .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: daxvisor\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let port = free_port();
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    let mut last = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if TcpStream::connect(("127.0.0.1", port)).is_err() {
            continue;
        }
        last = http_get(port, "/api/v1/query?query=daxvisor_build_info");
        let Ok(v) = serde_json::from_str::<Value>(&last) else {
            continue;
        };
        seen = v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["metric"]["vm"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        seen.sort();
        if seen.len() == names.len() {
            break;
        }
    }
    let _ = server.kill();
    let mut log = String::new();
    if let Some(mut e) = server.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    let _ = server.wait();
    assert_eq!(seen, names, "Prometheus query: {last}\n{log}");
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// The OpenAPI document's schema `name` (or an array of it), as a JSON Schema validator; references resolve
/// within the document's components.
fn schema(name: &str, array: bool) -> jsonschema::Validator {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    let reference = serde_json::json!({"$ref": format!("#/components/schemas/{name}")});
    let mut root = if array {
        serde_json::json!({"type": "array", "items": reference})
    } else {
        reference
    };
    root["components"] = doc["components"].clone();
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {name}: {e}"))
}

/// `daxvisor-ctl --json <args>` printed one document valid against the schema `name` (an array of it with
/// `array`), with exit status `code`.
fn check(socket: &Path, args: &[&str], code: i32, name: &str, array: bool) -> Value {
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .env_remove("DAXVISOR_API_SOCKET")
            .arg("--api-socket")
            .arg(socket)
            .arg("--json")
            .args(args),
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(code), "daxvisor-ctl {args:?}: {r:?}");
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("daxvisor-ctl {args:?} printed no JSON document: {e}: {r:?}"));
    let errors: Vec<String> = schema(name, array)
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "daxvisor-ctl {args:?} against {name}: {errors:?}\n{v:#}"
    );
    v
}

#[test]
fn every_json_document_matches_the_openapi_schemas_refusals_included() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let socket = dir.path().join("api.sock");
    let mut vm = RunningVm::spawn_with(
        Command::new(daxvisor_bin())
            .args(["run", "--api-socket"])
            .arg(&socket)
            .args(["--transport", "pci", "--pmem-hotplug", "64M"])
            .arg("--pmem")
            .arg(format!("file={},size=8M,create=on,id=data", img.display()))
            .args(["--cmdline", "pmem=write-flush-spin"]),
    );
    vm.wait_for_line("spinning until killed");
    let s = socket.as_path();

    check(s, &["vm"], 0, "VmView", false);
    check(s, &["regions"], 0, "RegionView", true);
    check(s, &["regions", "data"], 0, "RegionView", false);
    let lease = check(
        s,
        &[
            "lease",
            "acquire",
            "data",
            "--length",
            "1M",
            "--mode",
            "exclusive",
        ],
        0,
        "LeaseView",
        false,
    );
    check(s, &["owners"], 0, "OwnerView", true);
    check(s, &["breaks"], 0, "BreakView", true);
    check(
        s,
        &["rate-limit", "data", "--ops", "100/1s"],
        0,
        "RateLimit",
        false,
    );
    check(s, &["rate-limit", "data"], 0, "RateLimit", false);
    check(
        s,
        &["punch", "data", "--offset", "2M", "--length", "1M"],
        0,
        "ChangeResult",
        false,
    );
    check(
        s,
        &["zero", "data", "--offset", "3M", "--length", "1M"],
        0,
        "ChangeResult",
        false,
    );
    check(
        s,
        &["break", "data", "--offset", "4M", "--length", "1M"],
        0,
        "ChangeResult",
        false,
    );
    check(s, &["devices"], 0, "DeviceView", true);
    // No virtual IOMMU on this VM: the 404 is the error object, naming the option that gives one.
    let e = check(s, &["viommu"], 4, "ErrorBody", false);
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("iommu=on")),
        "{e}"
    );
    check(s, &["reclaim-stats"], 0, "ReclaimStats", false);
    let hot = dir.path().join("hot.img");
    let added = check(
        s,
        &[
            "add-pmem",
            "--file",
            hot.to_str().unwrap(),
            "--size",
            "2M",
            "--create",
            "--id",
            "hot",
        ],
        0,
        "RegionView",
        false,
    );
    assert_eq!(added["id"], "hot", "{added}");
    // This guest does not eject: the removal's refusal is the error object.
    let e = check(
        s,
        &["remove-pmem", "hot", "--eject-timeout-ms", "200"],
        3,
        "ErrorBody",
        false,
    );
    assert_eq!(e["errno"], "ETIMEDOUT", "{e}");
    check(s, &["offers"], 0, "Offer", true);
    check(s, &["offers", "data"], 0, "RegionOffers", false);
    check(s, &["reclaim", "data"], 0, "ReclaimResult", false);
    check(
        s,
        &["reclaim-policy", "data", "manual"],
        0,
        "PolicyBody",
        false,
    );

    // Refusals: the API's error object on stdout, the exit status unchanged.
    let e = check(
        s,
        &["punch", "data", "--length", "64K"],
        3,
        "ErrorBody",
        false,
    );
    assert_eq!(e["errno"], "EDEADLK", "{e}");
    assert_eq!(e["holder"]["name"], "operator", "{e}");
    let e = check(
        s,
        &["punch", "data", "--offset", "64M"],
        4,
        "ErrorBody",
        false,
    );
    assert_eq!(e["errno"], "ERANGE", "{e}");
    let e = check(s, &["regions", "nope"], 4, "ErrorBody", false);
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    let e = check(s, &["lease", "release", "999"], 4, "ErrorBody", false);
    assert!(e["error"].is_string());
    check(
        &dir.path().join("missing.sock"),
        &["vm"],
        1,
        "ErrorBody",
        false,
    );

    // The event log: one JSON line per event, each an Event, ranges as fields.
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .arg("--api-socket")
            .arg(s)
            .args(["--json", "events"]),
        Duration::from_secs(60),
    );
    let event = schema("Event", false);
    let mut ranged = 0;
    for line in r.stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(event.is_valid(&v), "{v}");
        if v["kind"] == "change-done" {
            // The punch at 2 MiB, the zero at 3 MiB and the break at 4 MiB, each 1 MiB.
            assert_eq!(
                (v["offset"].as_u64(), v["length"].as_u64()),
                (Some((2 + ranged) * MIB), Some(MIB)),
                "{v}"
            );
            ranged += 1;
        }
    }
    assert_eq!(ranged, 3, "{}", r.stdout);

    // Metrics as JSON: one object per sample.
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .arg("--api-socket")
            .arg(s)
            .args(["--json", "metrics"]),
        Duration::from_secs(60),
    );
    let m: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(m
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "daxvisor_build_info" && x["value"] == 1.0));

    let id = lease["id"].as_u64().unwrap().to_string();
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .arg("--api-socket")
            .arg(s)
            .args(["--json", "lease", "release", &id]),
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let _: Value = serde_json::from_str(&r.stdout).unwrap();
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .arg("--api-socket")
            .arg(s)
            .args(["--json", "stop"]),
        Duration::from_secs(60),
    );
    let _: Value = serde_json::from_str(&r.stdout).unwrap();
    let r = vm.finish(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn an_event_follower_ends_with_exit_0_when_the_vm_stops() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let socket = dir.path().join("api.sock");
    let mut vm = RunningVm::spawn_with(
        Command::new(daxvisor_bin())
            .args(["run", "--api-socket"])
            .arg(&socket)
            .arg("--pmem")
            .arg(format!("file={},size=4M,create=on,id=data", img.display()))
            .args(["--cmdline", "pmem=write-flush-spin"]),
    );
    vm.wait_for_line("spinning until killed");
    let mut follower = Command::new(ctl_bin())
        .arg("--api-socket")
        .arg(&socket)
        .args(["events", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("api-started"), "{first}");
    // Timestamps lead each line: 2026-12-07T03:39:41.532Z.
    assert_eq!(first.as_bytes()[10], b'T', "{first}");
    let r = run_with_timeout(
        Command::new(ctl_bin())
            .arg("--api-socket")
            .arg(&socket)
            .arg("stop"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = follower.wait().unwrap();
    let mut stderr = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        rest.last().is_some_and(|l| l.contains("vm-stopped")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("the operator stopped it")),
        "{rest:?}"
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    let r = vm.finish(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn the_operators_own_leases_never_make_it_wait_on_itself() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let socket = dir.path().join("api.sock");
    let mut vm = RunningVm::spawn_with(
        Command::new(daxvisor_bin())
            .args(["run", "--api-socket"])
            .arg(&socket)
            .arg("--pmem")
            .arg(format!("file={},size=4M,create=on,id=data", img.display()))
            .args(["--cmdline", "pmem=write-flush-spin"]),
    );
    vm.wait_for_line("spinning until killed");
    let ctl = |args: &[&str]| {
        run_with_timeout(
            Command::new(ctl_bin())
                .arg("--api-socket")
                .arg(&socket)
                .args(args),
            Duration::from_secs(60),
        )
    };
    // Its own shared lease: a punch there is done without a break (nobody else holds it) and the lease stays.
    let r = ctl(&[
        "--json", "lease", "acquire", "data", "--length", "1M", "--mode", "shared",
    ]);
    let shared: Value = serde_json::from_str(&r.stdout).unwrap();
    let r = ctl(&[
        "--json",
        "punch",
        "data",
        "--length",
        "64K",
        "--deadline",
        "60s",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let done: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(done["holders"], serde_json::json!([]), "{done}");
    assert!(ctl(&["owners"]).stdout.contains("shared"));
    let id = shared["id"].as_u64().unwrap().to_string();
    assert_eq!(ctl(&["lease", "release", &id]).code, Some(0));
    // Its own exclusive lease: EDEADLK, naming itself; someone else's would be ETXTBSY.
    let r = ctl(&[
        "--json",
        "lease",
        "acquire",
        "data",
        "--length",
        "1M",
        "--mode",
        "exclusive",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ctl(&["--json", "punch", "data", "--length", "64K"]);
    assert_eq!(r.code, Some(3), "{r:?}");
    let e: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["errno"], "EDEADLK", "{e}");
    assert_eq!(e["holder"]["name"], "operator", "{e}");
    assert_eq!(ctl(&["stop"]).code, Some(0));
    let r = vm.finish(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn a_vm_runs_from_the_configuration_another_reports() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("run");
    let first = start_named(&sockets, dir.path(), "first");
    let v: Value =
        serde_json::from_str(&ctl_ok(&sockets, &["--name", "first", "--json", "vm"])).unwrap();
    // GET /vm's configuration is a --config file: the same VM under another name, region and port.
    let mut config = v["config"].clone();
    config["name"] = "second".into();
    config["api_socket"] = Value::Null;
    config["metrics_addr"] = format!("127.0.0.1:{}", free_port()).into();
    config["pmem"][0]["file"] = dir.path().join("second.img").display().to_string().into();
    let file = dir.path().join("second.json");
    std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut second = RunningVm::spawn_with(
        Command::new(daxvisor_bin())
            .env("DAXVISOR_SOCKET_DIR", &sockets)
            .args(["run", "--config"])
            .arg(&file),
    );
    second.wait_for_line("spinning until killed");
    let v2: Value =
        serde_json::from_str(&ctl_ok(&sockets, &["--name", "second", "--json", "vm"])).unwrap();
    config["api_socket"] = sockets.join("second.sock").display().to_string().into();
    assert_eq!(v2["config"], config);
    assert_eq!(v2["config"]["memory_mib"], 128);
    assert_eq!(v2["config"]["pmem"][0]["size"], 4 * MIB);
    // --config describes the whole VM: the options it replaces are refused beside it.
    let r = run_with_timeout(
        Command::new(daxvisor_bin())
            .args(["run", "--memory", "1G", "--config"])
            .arg(&file),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
    for n in ["first", "second"] {
        ctl_ok(&sockets, &["--name", n, "stop"]);
    }
    assert_eq!(first.vm.finish(Duration::from_secs(30)).code, Some(0));
    assert_eq!(second.finish(Duration::from_secs(30)).code, Some(0));
}
