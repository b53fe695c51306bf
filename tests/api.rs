//! End-to-end: the operator API and daxvisor-ctl against the real binary on real KVM, with the test guest and
//! real files. Each test reads like an operator's session.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daxvisor_tests::api::{allocated, ctl_bin, parse_response, raw, ApiVm};
use daxvisor_tests::daxvisor;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Blocks a filesystem may allocate for its own metadata when a punch splits an extent.
const SLACK: u64 = 64 << 10;

fn pmem(dir: &std::path::Path, name: &str, size: &str) -> (std::path::PathBuf, String) {
    let img = dir.join(format!("{name}.img"));
    let arg = format!("file={},size={size},create=on,id={name}", img.display());
    (img, arg)
}

/// A VM whose guest wrote its pattern over the whole 8 MiB region `data`, flushed, and spins.
fn spinning_vm(dir: &std::path::Path) -> (ApiVm, std::path::PathBuf) {
    let (img, arg) = pmem(dir, "data", "8M");
    let vm = ApiVm::start(
        dir,
        &["--pmem", &arg, "--cmdline", "pmem=write-flush-spin"],
        "spinning until killed",
    );
    (vm, img)
}

fn events(vm: &ApiVm) -> Vec<Value> {
    let (status, body) = vm.http("GET", "/events", None);
    assert_eq!(status, 200);
    body.lines()
        .map(|l| serde_json::from_str(l).expect("event line is JSON"))
        .collect()
}

fn kinds(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The value of the first sample whose line starts with `line_start`, the VM's `vm` label left out (every
/// series carries it; it is checked on its own).
fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .map(without_vm_label)
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no metric line {line_start}:\n{text}"))
}

fn without_vm_label(line: &str) -> String {
    let Some(start) = line.find("vm=\"") else {
        return line.to_owned();
    };
    let end = line[start + 4..]
        .find('"')
        .map_or(line.len(), |e| start + 4 + e + 1);
    let rest = &line[end..];
    let (head, rest) = match rest.strip_prefix(',') {
        Some(r) => (&line[..start], r.to_owned()),
        None => match line[..start].strip_suffix('{') {
            Some(h) => (h, rest.trim_start_matches('}').to_owned()),
            None => (&line[..start], rest.to_owned()),
        },
    };
    format!("{head}{rest}")
}

#[test]
fn an_operator_holds_punches_and_reclaims_space_and_every_step_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());

    // The socket is the operator's alone.
    let meta = std::fs::symlink_metadata(&vm.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Reads: the VM and its region, as tables and as JSON.
    let table = vm.ctl_ok(&["vm"]);
    assert!(
        table.contains("running") && table.contains("built-in test guest"),
        "{table}"
    );
    let v = vm.ctl_json(&["vm"]);
    assert_eq!(v["state"], "running");
    assert_eq!(v["config"]["pmem"][0]["id"], "data");
    let table = vm.ctl_ok(&["regions"]);
    assert!(
        table.contains("data") && table.contains("regular"),
        "{table}"
    );
    let r = vm.ctl_json(&["regions", "data"]);
    assert_eq!(r["size"], 8 * MIB);
    assert_eq!(r["kind"], "regular");
    assert!(r["flush"]["requests"].as_u64().unwrap() >= 1);
    assert!(r["flush"]["syncs"].as_u64().unwrap() >= 1);
    assert_eq!(r["guard"]["watched"], true);
    let full = allocated(&img);
    assert!(full >= 8 * MIB, "the guest wrote the whole region: {full}");

    // The operator's job `backup` holds [0, 1M) exclusive: a punch there is refused at once, naming the holder.
    let l = vm.ctl_json(&[
        "lease",
        "acquire",
        "data",
        "--length",
        "1M",
        "--mode",
        "exclusive",
        "--owner",
        "backup",
    ]);
    let excl = l["id"].as_u64().unwrap().to_string();
    assert_eq!(
        (l["offset"].as_u64(), l["length"].as_u64()),
        (Some(0), Some(MIB))
    );
    let owners = vm.ctl_ok(&["owners"]);
    assert!(
        owners.contains("operator") && owners.contains("exclusive"),
        "{owners}"
    );
    let refused = vm.ctl(&["punch", "data", "--offset", "64K", "--length", "64K"]);
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert!(refused.stderr.contains("ETXTBSY"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("holder: owner") && refused.stderr.contains("(operator:backup)"),
        "{}",
        refused.stderr
    );
    let (status, body) = vm.http(
        "POST",
        "/regions/data/punch",
        Some(r#"{"offset":65536,"length":65536}"#),
    );
    assert_eq!(status, 409);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["errno"], "ETXTBSY");
    assert_eq!(e["holder"]["name"], "operator:backup");
    assert_eq!(e["holder"]["kind"], "exclusive lease");
    assert_eq!(allocated(&img), full, "a refused punch changed the file");
    assert!(vm.ctl_ok(&["lease", "release", &excl]).contains("released"));

    // A shared lease is asked first: with policy fail, a holder that never answers makes the punch time out
    // and nothing changes; with policy revoke, the lease goes at the deadline and the punch is done.
    let l = vm.ctl_json(&[
        "lease", "acquire", "data", "--mode", "shared", "--owner", "backup",
    ]);
    assert_eq!(l["length"], 8 * MIB);
    let timed_out = vm.ctl(&[
        "punch",
        "data",
        "--offset",
        "1M",
        "--length",
        "1M",
        "--deadline-ms",
        "300",
    ]);
    assert_eq!(timed_out.code, Some(3), "{timed_out:?}");
    assert!(
        timed_out.stderr.contains("ETIMEDOUT"),
        "{}",
        timed_out.stderr
    );
    assert_eq!(allocated(&img), full);
    let done = vm.ctl_json(&[
        "punch",
        "data",
        "--offset",
        "1M",
        "--length",
        "1M",
        "--deadline-ms",
        "300",
        "--policy",
        "revoke",
    ]);
    assert_eq!(done["change"], "punch");
    assert_eq!(done["holders"][0]["name"], "operator:backup");
    assert_eq!(done["holders"][0]["revoked"], true);
    assert!(done["total_ms"].as_u64().unwrap() >= 300);
    let after = allocated(&img);
    assert!(
        after <= full - MIB,
        "punch of 1 MiB: allocated {full} -> {after}"
    );
    assert_eq!(
        vm.ctl_json(&["owners"])[0]["leases"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "the lease was revoked"
    );

    // Zero keeps blocks; a punch with nobody holding is immediate, and the table says so.
    let z = vm.ctl_json(&["zero", "data", "--offset", "4M", "--length", "64K"]);
    assert_eq!(z["holders"].as_array().unwrap().len(), 0);
    assert_eq!(allocated(&img), after, "zero changed the allocation");
    let out = vm.ctl_ok(&["punch", "data", "--offset", "6M", "--length", "1M"]);
    assert!(
        out.contains("punch data [0x600000, 0x700000) done in"),
        "{out}"
    );
    let last = allocated(&img);
    assert!(
        last <= after - MIB + SLACK,
        "punch of 1 MiB: allocated {after} -> {last}"
    );
    assert!(vm.ctl_json(&["breaks"]).as_array().unwrap().is_empty());

    // A break (evacuate) asks holders to give a range back without touching the file.
    vm.ctl_json(&[
        "lease", "acquire", "data", "--offset", "2M", "--length", "2M", "--mode", "shared",
        "--owner", "backup",
    ]);
    let before_break = allocated(&img);
    let b = vm.ctl_json(&[
        "break",
        "data",
        "--offset",
        "2M",
        "--length",
        "1M",
        "--deadline-ms",
        "200",
        "--policy",
        "revoke",
    ]);
    assert_eq!(b["change"], "break");
    assert_eq!(b["holders"][0]["revoked"], true);
    assert_eq!(allocated(&img), before_break, "a break changed the file");

    // The event stream tells the story in order.
    let evs = events(&vm);
    let k = kinds(&evs);
    let story = [
        "api-started",
        "lease-acquired",
        "change-started",
        "change-refused",
        "lease-released",
        "lease-acquired",
        "change-started",
        "break-started",
        "change-refused",
        "change-started",
        "break-started",
        "holder-revoked",
        "change-done",
        "change-started",
        "change-done",
        "change-started",
        "change-done",
        "lease-acquired",
        "change-started",
        "break-started",
        "holder-revoked",
        "change-done",
    ];
    let mut at = 0;
    for want in story {
        at += k[at..]
            .iter()
            .position(|x| x == want)
            .unwrap_or_else(|| panic!("no {want} after {at}: {k:?}"))
            + 1;
    }
    let refused: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "change-refused")
        .collect();
    // The same conflict asked twice (daxvisor-ctl, then plain HTTP), then the timeout.
    assert_eq!(refused[0]["errno"], "ETXTBSY");
    assert_eq!(refused[1]["errno"], "ETXTBSY");
    assert_eq!(refused[2]["errno"], "ETIMEDOUT");
    assert!(vm.ctl_ok(&["events"]).contains("holder-revoked"));
    // The lease manager's own records: every notice and revoke, whoever started the break.
    assert!(k.iter().any(|x| x == "break-notice"), "{k:?}");
    assert!(k.iter().any(|x| x == "revoked"), "{k:?}");

    // The metrics agree.
    let m = vm.ctl_ok(&["metrics"]);
    for (line, want) in [
        (
            r#"daxvisor_change_outcomes_total{change="break",outcome="revoked"}"#,
            1.0,
        ),
        (
            r#"daxvisor_change_outcomes_total{change="punch",outcome="conflict"}"#,
            2.0,
        ),
        (
            r#"daxvisor_change_outcomes_total{change="punch",outcome="timed_out"}"#,
            1.0,
        ),
        (
            r#"daxvisor_change_outcomes_total{change="punch",outcome="revoked"}"#,
            1.0,
        ),
        (
            r#"daxvisor_change_outcomes_total{change="punch",outcome="done"}"#,
            1.0,
        ),
        (
            r#"daxvisor_change_outcomes_total{change="zero",outcome="done"}"#,
            1.0,
        ),
        (
            r#"daxvisor_change_duration_seconds_count{change="punch"}"#,
            5.0,
        ),
    ] {
        assert_eq!(metric(&m, line), want, "{line}");
    }
    assert!(metric(&m, r#"daxvisor_pmem_flush_requests_total{region="data"}"#) >= 1.0);
    assert_eq!(metric(&m, r#"daxvisor_leases{region="data"}"#), 0.0);
    assert_eq!(metric(&m, "daxvisor_agent_sessions "), 0.0);
    assert!(
        m.lines().map(without_vm_label).any(|l| l
            .starts_with(r#"daxvisor_pmem_flush_latency_seconds_bucket{le="+Inf",region="data"}"#)),
        "{m}"
    );

    // A graceful stop: daxvisor exits 0 and removes its socket.
    assert!(vm.ctl_ok(&["stop"]).contains("stopping"));
    let socket = vm.socket.clone();
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!socket.exists(), "the socket outlived daxvisor");
    assert!(
        stderr.contains("the operator asked the VM to stop"),
        "{stderr}"
    );
}

#[test]
fn a_foreign_open_of_a_backing_file_shows_in_events_regions_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());
    // This process is the foreign opener.
    let f = std::fs::File::open(&img).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let guard = loop {
        if let Some(e) = events(&vm).into_iter().find(|e| e["kind"] == "guard") {
            break e;
        }
        assert!(Instant::now() < deadline, "no guard event");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(f);
    assert_eq!(guard["region"], "data");
    assert!(
        guard["message"]
            .as_str()
            .unwrap()
            .contains("foreign process opened"),
        "{guard}"
    );
    let r = vm.ctl_json(&["regions", "data"]);
    assert_eq!(r["guard"]["events"], 1);
    let m = vm.ctl_ok(&["metrics"]);
    assert_eq!(
        metric(&m, r#"daxvisor_guard_events_total{region="data"}"#),
        1.0
    );
}

#[test]
fn events_can_be_followed_live() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = spinning_vm(dir.path());
    let mut follower = Command::new(ctl_bin())
        .arg("--api-socket")
        .arg(&vm.socket)
        .args(["--json", "events", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["kind"], "api-started");
    vm.ctl_ok(&["rate-limit", "data", "--ops", "100/1000"]);
    let next: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(next["kind"], "rate-limit-set");
    assert_eq!(next["region"], "data");
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn bad_input_gets_a_4xx_naming_the_problem_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());
    let before = allocated(&img);
    let punch = "/regions/data/punch";
    let cases: [(&str, &str, Option<&str>, u16, &str); 12] = [
        ("POST", punch, Some("{not json"), 400, "JSON"),
        (
            "POST",
            punch,
            Some(r#"{"offset":0,"bogus":1}"#),
            400,
            "unknown field `bogus`",
        ),
        (
            "POST",
            punch,
            Some(r#"{"offset":"zero"}"#),
            400,
            "invalid type",
        ),
        (
            "POST",
            punch,
            Some(r#"{"offset":0,"policy":"maybe"}"#),
            400,
            "unknown variant `maybe`",
        ),
        (
            "POST",
            punch,
            Some(r#"{"offset":8388608}"#),
            400,
            "outside the region",
        ),
        (
            "POST",
            punch,
            Some(r#"{"offset":4096,"length":8388608}"#),
            400,
            "past the end of the region",
        ),
        (
            "POST",
            punch,
            Some(r#"{"offset":0,"deadline_ms":99999999999}"#),
            400,
            "deadline_ms",
        ),
        (
            "POST",
            "/regions/nope/punch",
            Some(r#"{"offset":0}"#),
            404,
            "no region 'nope'",
        ),
        ("DELETE", "/leases/12345", None, 404, "no lease 12345"),
        (
            "PUT",
            "/regions/data/rate-limit",
            Some(r#"{"ops":{"size":0,"refill_ms":1}}"#),
            400,
            "at least 1",
        ),
        ("GET", "/no/such/thing", None, 404, "no such endpoint"),
        ("DELETE", "/vm", None, 405, "method not allowed"),
    ];
    for (method, path, body, status, says) in cases {
        let (got, text) = vm.http(method, path, body);
        assert_eq!(got, status, "{method} {path} {body:?}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(
            e["error"].as_str().unwrap().contains(says),
            "{method} {path} {body:?}: {text}"
        );
    }
    // An out-of-range punch carries ERANGE, like the mapper's own refusals.
    let (_, text) = vm.http("POST", punch, Some(r#"{"offset":8388608}"#));
    assert!(text.contains(r#""errno":"ERANGE""#), "{text}");
    // A body over the bound.
    let big = format!(r#"{{"offset":0,"pad":"{}"}}"#, "x".repeat(64 * 1024));
    let (got, text) = vm.http("POST", punch, Some(&big));
    assert_eq!(got, 413, "{text}");
    assert!(text.contains("larger than"), "{text}");
    // No content type.
    let (got, _) = raw(
        &vm.socket,
        b"POST /regions/data/punch HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 12\r\n\r\n{\"offset\":0}",
    );
    assert_eq!(got, 415);
    // Not HTTP at all.
    let (got, _) = raw(&vm.socket, b"\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(got, 400);

    // Nothing changed: no lease, no break, the file's blocks as they were.
    assert_eq!(allocated(&img), before);
    assert!(vm.ctl_json(&["owners"]).as_array().unwrap().is_empty());
    assert_eq!(
        vm.ctl_json(&["regions", "data"])["rate_limit"]["ops"],
        Value::Null
    );

    // Idle and slow clients hold nobody up: one connects and sends nothing, one sends half a request line.
    let _idle = UnixStream::connect(&vm.socket).unwrap();
    let mut slow = UnixStream::connect(&vm.socket).unwrap();
    slow.write_all(b"GET /vm HT").unwrap();
    let (got, _) = vm.http("GET", "/regions", None);
    assert_eq!(got, 200);
    // The slow one finishes its request later and is served.
    slow.write_all(b"TP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut slow, &mut out).unwrap();
    assert_eq!(parse_response(&out).0, 200);
}

#[test]
fn the_socket_is_exclusive_stale_ones_are_replaced_and_other_files_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    // A stale socket (its server is gone) is replaced.
    let sock = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (vm, _) = spinning_vm(dir.path());
    // A second VM on the live socket is refused before it starts.
    let (_, arg) = pmem(dir.path(), "other", "2M");
    let s = sock.display().to_string();
    let second = daxvisor(&[
        "run",
        "--api-socket",
        &s,
        "--pmem",
        &arg,
        "--cmdline",
        "exit=0",
    ]);
    assert_eq!(second.code, Some(2), "{second:?}");
    assert!(
        second.stderr.contains("another process is serving on it"),
        "{}",
        second.stderr
    );
    assert_eq!(
        vm.http("GET", "/vm", None).0,
        200,
        "the live server kept serving"
    );
    // A path that is not a socket is never replaced.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"data").unwrap();
    let f = file.display().to_string();
    let third = daxvisor(&["run", "--api-socket", &f, "--cmdline", "exit=0"]);
    assert_eq!(third.code, Some(2), "{third:?}");
    assert!(third.stderr.contains("not a socket"), "{}", third.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // SIGTERM stops the VM cleanly: exit 128+15 (docs/security.md), socket removed.
    let pid = vm.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(143), "{stderr}");
    assert!(stderr.contains("SIGTERM: stopping the VM"), "{stderr}");
    assert!(!sock.exists(), "the socket outlived daxvisor");
}

#[test]
fn a_guest_flush_flood_is_throttled_never_failed_and_the_api_answers_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (_, arg) = pmem(dir.path(), "data", "2M");
    let vm = ApiVm::start(
        dir.path(),
        &["--pmem", &arg, "--cmdline", "pmem=flush-flood"],
        "flushes answered",
    );
    // 50 flushes per second, burst 50.
    let out = vm.ctl_ok(&["rate-limit", "data", "--ops", "50/1000"]);
    assert!(out.contains("requests 50 per 1000 ms"), "{out}");
    std::thread::sleep(Duration::from_millis(1200)); // the burst is spent
    let flush = |vm: &ApiVm| vm.ctl_json(&["regions", "data"])["flush"].clone();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let a = flush(&vm);
    // The API answers while the guest is throttled (what is asserted is that it answers, not how fast).
    for _ in 0..20 {
        assert_eq!(vm.http("GET", "/vm", None).0, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = flush(&vm);
    eprintln!("throttled flood: {a} -> {b}");
    assert!(
        n(&b, "syncs") > n(&a, "syncs"),
        "the guest was starved, not throttled: {a} -> {b}"
    );
    assert!(n(&b, "throttled") > n(&a, "throttled"), "{a} -> {b}");
    assert_eq!(n(&b, "errors"), 0, "throttling never fails a request");
    // Metrics say the same.
    let m = vm.ctl_ok(&["metrics"]);
    assert!(
        metric(&m, r#"daxvisor_pmem_flush_throttled_total{region="data"}"#)
            >= n(&b, "throttled") as f64
    );
    assert!(
        metric(
            &m,
            r#"daxvisor_pmem_flush_throttle_wait_seconds_total{region="data"}"#
        ) > 0.0,
        "throttled requests waited"
    );
    // Lifting the limit: the flood goes on and no request waits for tokens any more.
    vm.ctl_ok(&["rate-limit", "data", "--clear", "ops"]);
    std::thread::sleep(Duration::from_millis(500));
    let c = flush(&vm);
    std::thread::sleep(Duration::from_millis(500));
    let d = flush(&vm);
    assert!(n(&d, "syncs") > n(&c, "syncs"), "{c} -> {d}");
    assert_eq!(n(&d, "throttled"), n(&c, "throttled"), "{c} -> {d}");
    vm.ctl_ok(&["stop"]);
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    // The final summary counts at least what the API saw, with every request answered.
    let summary = stderr
        .lines()
        .find(|l| l.contains("pmem counters"))
        .expect("summary line");
    assert!(summary.contains("errors=0"), "{summary}");
    let field = |k: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert!(field("requests=") >= n(&d, "requests"));
    assert!(field("throttled=") >= n(&b, "throttled"));
}

#[test]
fn the_served_openapi_document_is_the_checked_in_one_and_every_path_in_it_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = spinning_vm(dir.path());
    let (status, served) = vm.http("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&served).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, file,
        "docs/openapi.json differs from the served document"
    );
    let mut stop = None;
    let paths = file["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{:?}", paths.keys());
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace(
                "{id}",
                if path.starts_with("/leases") {
                    "999"
                } else {
                    "data"
                },
            );
            if path == "/vm/stop" {
                stop = Some(concrete);
                continue;
            }
            let body = matches!(method.as_str(), "post" | "put").then_some("{}");
            let (status, text) = vm.http(&method.to_uppercase(), &concrete, body);
            assert!(
                status != 405 && !text.contains("no such endpoint"),
                "{method} {path}: {status} {text}"
            );
        }
    }
    let (status, _) = vm.http("POST", &stop.expect("/vm/stop is documented"), None);
    assert_eq!(status, 202);
    assert_eq!(vm.wait(Duration::from_secs(30)).0, Some(0));
}

#[test]
fn on_a_terminal_daxvisor_ctl_shows_who_still_holds_while_a_break_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = spinning_vm(dir.path());
    let lease = vm.ctl_json(&[
        "lease", "acquire", "data", "--mode", "shared", "--owner", "backup",
    ]);
    let owner = vm.ctl_json(&["owners"])[0]["id"].as_u64().unwrap();
    assert_eq!(lease["mode"], "shared");
    // `script` gives daxvisor-ctl a terminal (util-linux, in every Debian install).
    let cmd = format!(
        "{} --api-socket {} punch data --length 1M --deadline-ms 1500",
        ctl_bin().display(),
        vm.socket.display()
    );
    let out = daxvisor_tests::run_with_timeout(
        Command::new("script").args(["-qec", &cmd, "/dev/null"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    let screen = out.stdout;
    assert!(
        screen.contains(&format!(
            "punch [0x0, 0x100000): waiting on owner {owner}, "
        )),
        "{screen}"
    );
    assert!(screen.contains(" left"), "{screen}");
    assert!(screen.contains("refused: ETIMEDOUT"), "{screen}");
}

#[test]
fn a_holder_that_releases_during_the_break_lets_the_punch_through_and_the_report_says_when() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());
    let full = allocated(&img);
    let lease = vm.ctl_json(&[
        "lease", "acquire", "data", "--mode", "shared", "--owner", "backup",
    ])["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let socket = vm.socket.clone();
    let punch = std::thread::spawn(move || {
        daxvisor_tests::run_with_timeout(
            Command::new(ctl_bin())
                .arg("--api-socket")
                .arg(&socket)
                .args([
                    "--json", "punch", "data", "--offset", "2M", "--length", "2M",
                ])
                .args(["--deadline-ms", "30000"]),
            Duration::from_secs(60),
        )
    });
    // The break shows while it waits; the range takes no new lease meanwhile (EAGAIN).
    let deadline = Instant::now() + Duration::from_secs(20);
    let b = loop {
        let b = vm.ctl_json(&["breaks"]);
        if !b.as_array().unwrap().is_empty() {
            break b;
        }
        assert!(Instant::now() < deadline, "no break appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(b[0]["region"], "data");
    assert_eq!(b[0]["reason"], "punch");
    assert!(b[0]["deadline_in_ms"].as_u64().unwrap() > 1000);
    let again = vm.ctl(&[
        "lease", "acquire", "data", "--offset", "2M", "--length", "4K", "--mode", "shared",
    ]);
    assert_eq!(again.code, Some(3), "{again:?}");
    assert!(again.stderr.contains("EAGAIN"), "{}", again.stderr);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        allocated(&img),
        full,
        "the punch went ahead while the lease was held"
    );
    vm.ctl_ok(&["lease", "release", &lease]);
    let out = punch.join().unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    let h = &r["holders"][0];
    assert_eq!(h["name"], "operator:backup");
    assert_eq!(h["revoked"], false);
    assert!(h["released_after_ms"].as_u64().unwrap() >= 200, "{r}");
    assert!(r["total_ms"].as_u64().unwrap() >= h["released_after_ms"].as_u64().unwrap());
    assert!(allocated(&img) <= full - 2 * MIB + SLACK);
    let k = kinds(&events(&vm));
    for want in [
        "break-notice",
        "break-started",
        "lease-released",
        "holder-released",
        "change-done",
    ] {
        assert!(k.iter().any(|x| x == want), "no {want}: {k:?}");
    }
}

/// With the agent channel: the test guest holds the whole region shared; an operator punch sends it a break
/// notice, it releases, the punch is done and the file's blocks drop. A guest's exclusive lease with a pin
/// refuses the punch at once with ETXTBSY naming the guest's owner.
#[test]
fn a_guest_holding_a_range_shared_is_asked_releases_and_the_punch_drops_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    std::fs::write(&img, vec![0x5au8; 8 * MIB as usize]).unwrap();
    let arg = format!("file={},id=data", img.display());
    // breaks=2: the guest re-acquires after the first break and waits, so the VM outlives the punch.
    let mut vm = ApiVm::start(
        dir.path(),
        &["--pmem", &arg, "--cmdline", "agent=shared breaks=2"],
        "agent waiting for a break",
    );
    let full = allocated(&img);
    let owners = vm.ctl_json(&["owners"]);
    let guest = owners
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "agent:testguest")
        .unwrap_or_else(|| panic!("{owners}"));
    assert_eq!(guest["leases"][0]["mode"], "shared");
    let r = vm.ctl_json(&[
        "punch",
        "data",
        "--offset",
        "1M",
        "--length",
        "1M",
        "--deadline-ms",
        "20000",
    ]);
    let h = &r["holders"][0];
    assert_eq!(h["name"], "agent:testguest", "{r}");
    assert_eq!(h["revoked"], false, "{r}");
    assert!(h["released_after_ms"].is_u64(), "{r}");
    let after = allocated(&img);
    assert!(after <= full - MIB + SLACK, "allocated {full} -> {after}");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.contains("agent released")) {
        assert!(Instant::now() < deadline, "{seen:?}");
        if let Some(l) = vm.serial_line(Duration::from_millis(100)) {
            seen.push(l);
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("agent notice") && l.contains("reason=punch")),
        "{seen:?}"
    );
    let k = kinds(&events(&vm));
    for want in ["break-notice", "holder-released", "change-done"] {
        assert!(k.iter().any(|x| x == want), "no {want}: {k:?}");
    }
    let m = vm.ctl_ok(&["metrics"]);
    assert_eq!(metric(&m, "daxvisor_agent_sessions "), 1.0);
    assert_eq!(metric(&m, "daxvisor_agent_sessions_started_total"), 1.0);
    assert_eq!(metric(&m, "daxvisor_agent_frames_rejected_total"), 0.0);
    vm.ctl_ok(&["stop"]);
    assert_eq!(vm.wait(Duration::from_secs(30)).0, Some(0));
}

#[test]
fn a_guest_pin_refuses_an_operator_punch_naming_the_guest_owner() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    std::fs::write(&img, vec![0x5au8; 2 * MIB as usize]).unwrap();
    let arg = format!("file={},id=data", img.display());
    let vm = ApiVm::start(
        dir.path(),
        &["--pmem", &arg, "--cmdline", "agent=exclusive-pin hold=30"],
        "agent holding",
    );
    let out = vm.ctl(&["punch", "data", "--length", "64K"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("ETXTBSY"), "{}", out.stderr);
    assert!(
        out.stderr.contains("(agent:testguest-dma) with a pin"),
        "{}",
        out.stderr
    );
    assert!(vm.ctl_ok(&["owners"]).contains("pin"));
}

#[test]
fn the_operator_revokes_a_guest_owner_holding_a_pin_and_the_punch_then_proceeds() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    std::fs::write(&img, vec![0x5au8; 2 * MIB as usize]).unwrap();
    let arg = format!("file={},id=data", img.display());
    let vm = ApiVm::start(
        dir.path(),
        &["--pmem", &arg, "--cmdline", "agent=exclusive-pin hold=30"],
        "agent holding",
    );
    let (code, body) = vm.http(
        "POST",
        "/regions/data/punch",
        Some(r#"{"offset":0,"length":65536}"#),
    );
    assert_eq!(code, 409, "{body}");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    let holder = refusal["holder"]["owner"].as_u64().unwrap();
    assert_eq!(refusal["holder"]["name"], "agent:testguest-dma");

    // Bad input changes nothing.
    assert_eq!(vm.http("POST", "/owners/abc/revoke", None).0, 400);
    assert_eq!(vm.http("POST", "/owners/999999/revoke", None).0, 404);

    // The operator's command for it: `daxvisor-ctl revoke OWNER` (POST /owners/{id}/revoke).
    let revoked = vm.ctl_json(&["revoke", &holder.to_string()]);
    assert_eq!(revoked["name"], "agent:testguest-dma");
    assert_eq!(revoked["regions"][0], "data");
    assert!(revoked["leases"].as_u64().unwrap() >= 1, "{revoked}");
    let again = vm.ctl(&["revoke", &holder.to_string()]);
    assert_eq!(again.code, Some(4), "{again:?}");
    assert!(
        again.stderr.contains("ENOENT") || again.stderr.contains("no such"),
        "{again:?}"
    );

    let owners = vm.ctl_ok(&["owners"]);
    assert!(!owners.contains("agent:testguest-dma"), "{owners}");
    let before = allocated(&img);
    let (code, body) = vm.http(
        "POST",
        "/regions/data/punch",
        Some(r#"{"offset":0,"length":65536}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert!(allocated(&img) < before, "the punch freed no blocks");
    let k = kinds(&events(&vm));
    assert!(k.iter().any(|x| x == "owner-revoked"), "{k:?}");
    assert!(k.iter().any(|x| x == "revoked"), "{k:?}");
}

/// A VM whose guest wrote its pattern over the 4 MiB region `data`, then offered its second half back (and an
/// offer past the region's end, refused with ERANGE), keeping its agent session open.
fn offering_vm(dir: &std::path::Path) -> (ApiVm, std::path::PathBuf) {
    let (img, arg) = pmem(dir, "data", "4M");
    let vm = ApiVm::start(
        dir,
        &[
            "--pmem",
            &arg,
            "--cmdline",
            "pmem=write agent=offer hold=600",
        ],
        "agent offered",
    );
    assert!(
        vm.started
            .iter()
            .any(|l| l.ends_with("agent offer outside: ERANGE")),
        "{:?}",
        vm.started
    );
    (vm, img)
}

/// After the VM stopped: the offered half reads zeros, the first half still holds the guest's data.
fn assert_second_half_punched(img: &std::path::Path) {
    let bytes = std::fs::read(img).unwrap();
    let half = bytes.len() / 2;
    assert_eq!(bytes.len() as u64, 4 * MIB);
    assert_eq!(daxvisor_tests::pattern_mismatches(&bytes, 0, half), 0);
    assert!(
        bytes[half..].iter().all(|&b| b == 0),
        "the offered range does not read zeros"
    );
}

/// The guest offers a range back; the operator lists it and punches it by hand (policy manual, the default):
/// the file's blocks drop and the range reads zeros. Bad reclaim requests are 4xx and change nothing.
#[test]
fn a_range_the_guest_offered_is_listed_and_the_operator_reclaims_it() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = offering_vm(dir.path());
    let full = allocated(&img);
    let offers = vm.ctl_json(&["offers"]);
    let o = &offers[0];
    assert_eq!(offers.as_array().unwrap().len(), 1, "{offers}");
    assert_eq!(
        (&o["region"], &o["offset"], &o["length"]),
        (
            &Value::from("data"),
            &Value::from(2 * MIB),
            &Value::from(2 * MIB)
        ),
        "{offers}"
    );
    let table = vm.ctl_ok(&["offers", "data"]);
    assert!(table.contains("reclaim policy manual"), "{table}");
    assert!(table.contains(&o["id"].to_string()), "{table}");
    // Bad input: nothing changes.
    for (method, path, body, want) in [
        (
            "PUT",
            "/regions/data/reclaim-policy",
            Some(r#"{"policy":"sometimes"}"#),
            400,
        ),
        (
            "PUT",
            "/regions/data/reclaim-policy",
            Some(r#"{"policy":"auto","x":1}"#),
            400,
        ),
        ("PUT", "/regions/data/reclaim-policy", Some("{"), 400),
        (
            "PUT",
            "/regions/nope/reclaim-policy",
            Some(r#"{"policy":"auto"}"#),
            404,
        ),
        ("GET", "/regions/nope/reclaim", None, 404),
        ("POST", "/regions/nope/reclaim", None, 404),
    ] {
        let (status, text) = vm.http(method, path, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    assert_eq!(vm.ctl_json(&["offers", "data"])["policy"], "manual");
    assert_eq!(allocated(&img), full, "bad requests punched something");
    let out = vm.ctl(&["reclaim-policy", "data", "sometimes"]);
    assert_eq!(out.code, Some(2), "{out:?}");

    let r = vm.ctl_json(&["reclaim", "data"]);
    assert_eq!(r["reclaimed_bytes"], 2 * MIB, "{r}");
    assert_eq!(r["outcomes"][0]["punched"], true, "{r}");
    let after = allocated(&img);
    assert!(
        after <= full - 2 * MIB + SLACK,
        "allocated {full} -> {after}"
    );
    assert_eq!(vm.ctl_json(&["offers"]), Value::Array(Vec::new()));
    let k = kinds(&events(&vm));
    for want in ["offer", "reclaim-done"] {
        assert!(k.iter().any(|x| x == want), "no {want}: {k:?}");
    }
    let m = vm.ctl_ok(&["metrics"]);
    assert_eq!(metric(&m, "daxvisor_reclaim_offers_total"), 1.0);
    assert_eq!(
        metric(&m, "daxvisor_reclaim_offered_bytes_total"),
        (2 * MIB) as f64
    );
    assert_eq!(
        metric(&m, "daxvisor_reclaim_reclaimed_bytes_total"),
        (2 * MIB) as f64
    );
    vm.ctl_ok(&["stop"]);
    assert_eq!(vm.wait(Duration::from_secs(30)).0, Some(0));
    assert_second_half_punched(&img);
}

/// Policy auto: the offers listed are punched at once on the reclaim thread, as a layout change through the
/// mapper; the blocks drop and the range reads zeros.
#[test]
fn with_policy_auto_the_offered_range_is_punched_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = offering_vm(dir.path());
    let full = allocated(&img);
    let out = vm.ctl_ok(&["reclaim-policy", "data", "auto"]);
    assert!(out.contains("data: reclaim policy auto"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.ctl_json(&["offers"]) != Value::Array(Vec::new()) {
        assert!(Instant::now() < deadline, "the offer was not reclaimed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = allocated(&img);
    assert!(
        after <= full - 2 * MIB + SLACK,
        "allocated {full} -> {after}"
    );
    let k = kinds(&events(&vm));
    for want in ["offer", "reclaim-policy-set", "reclaim-done"] {
        assert!(k.iter().any(|x| x == want), "no {want}: {k:?}");
    }
    vm.ctl_ok(&["stop"]);
    assert_eq!(vm.wait(Duration::from_secs(30)).0, Some(0));
    assert_second_half_punched(&img);
}

/// Sixty-four clients each announce a 100-byte punch body and send two bytes of it. A new client is still served
/// at once (the slow client that came first is closed for it); every other slow client gets 408 when its body has
/// not arrived within 10 s, and its connection is closed. Nothing was punched; the metrics count each.
#[test]
fn slow_bodies_time_out_and_never_lock_out_a_new_client() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());
    let before = allocated(&img);
    let partial =
        "POST /regions/data/punch HTTP/1.1\r\nHost: daxvisor\r\nContent-Type: application/json\r\n\
                   Content-Length: 100\r\n\r\n{\"";
    let mut slow: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut s = UnixStream::connect(&vm.socket).unwrap();
            s.write_all(partial.as_bytes()).unwrap();
            s
        })
        .collect();
    let (status, body) = vm.http("GET", "/vm", None);
    assert_eq!(status, 200, "a new client was locked out: {body}");
    let (mut timed_out, mut closed) = (0, 0);
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut out = Vec::new();
        // Closed for the new client with its body unread: the peer sees a reset.
        match s.read_to_end(&mut out) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => out.clear(),
            r => {
                r.unwrap();
            }
        }
        if out.is_empty() {
            closed += 1;
            continue;
        }
        let (code, body) = parse_response(&out);
        assert_eq!(code, 408, "{body}");
        assert!(body.contains("did not arrive within 10 s"), "{body}");
        timed_out += 1;
    }
    assert_eq!((closed, timed_out), (1, 63));
    let (_, m) = vm.http("GET", "/metrics", None);
    assert_eq!(metric(&m, "daxvisor_api_body_timeouts_total"), 63.0);
    assert_eq!(metric(&m, "daxvisor_api_connections_evicted_total"), 1.0);
    assert_eq!(metric(&m, "daxvisor_api_connections_refused_total"), 0.0);
    assert_eq!(allocated(&img), before, "a partial body punched");
}

/// Sixteen clients follow the events; the seventeenth gets 503 naming the limit, and the API still answers
/// everyone else.
#[test]
fn followers_are_bounded_and_the_api_still_answers() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = spinning_vm(dir.path());
    let follow = b"GET /events?follow=true HTTP/1.1\r\nHost: daxvisor\r\n\r\n";
    let followers: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut s = UnixStream::connect(&vm.socket).unwrap();
            s.write_all(follow).unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            s
        })
        .collect();
    let mut over = follow.to_vec();
    over.splice(over.len() - 2..over.len() - 2, *b"Connection: close\r\n");
    let (code, body) = raw(&vm.socket, &over);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("16 clients follow the events already"),
        "{body}"
    );
    assert_eq!(vm.http("GET", "/vm", None).0, 200);
    let (_, m) = vm.http("GET", "/metrics", None);
    assert_eq!(metric(&m, "daxvisor_api_followers_refused_total"), 1.0);
    drop(followers);
}

/// A JSON array whose values would fit a punch's fields is not a punch: 400, nothing punched.
#[test]
fn a_body_that_is_not_a_json_object_is_refused_and_punches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, img) = spinning_vm(dir.path());
    let before = allocated(&img);
    for body in ["[0, 1048576]", "[1,2]", "1048576", "\"offset\""] {
        let (code, text) = vm.http("POST", "/regions/data/punch", Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains("must be a JSON object"), "{body}: {text}");
    }
    assert_eq!(allocated(&img), before);
}
