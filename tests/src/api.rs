//! Support for the operator-API tests: a VM started with `--api-socket`, `daxvisor-ctl` runs against it, and a
//! deliberately small raw HTTP/1.1 client for what a well-behaved client would never send (malformed requests,
//! oversized bodies, idle and slow connections).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{daxvisor_bin, run_with_timeout, RunOutcome, RunningVm};

/// A running VM with its API socket. Killed on drop if it is still running.
pub struct ApiVm {
    vm: RunningVm,
    pub socket: PathBuf,
    /// The serial lines up to the ready line.
    pub started: Vec<String>,
}

/// The daxvisor-ctl binary next to daxvisor (built with it).
pub fn ctl_bin() -> PathBuf {
    daxvisor_bin().with_file_name("daxvisor-ctl")
}

impl ApiVm {
    /// `daxvisor run --api-socket <dir>/api.sock <args>`; returns once the guest printed a line ending in `ready`
    /// (e.g. "spinning until killed") and the API answers.
    pub fn start(dir: &Path, args: &[&str], ready: &str) -> ApiVm {
        let socket = dir.join("api.sock");
        let mut vm = RunningVm::spawn_with(
            Command::new(daxvisor_bin())
                .arg("run")
                .arg("--api-socket")
                .arg(&socket)
                .args(args),
        );
        vm.wait_for_line(ready);
        let started = vm.seen.clone();
        let vm = ApiVm {
            vm,
            socket,
            started,
        };
        assert_eq!(vm.http("GET", "/vm", None).0, 200);
        vm
    }

    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The guest's next serial line after the ready line, if one comes within `timeout`.
    pub fn serial_line(&mut self, timeout: Duration) -> Option<String> {
        self.vm.line_within(timeout)
    }

    /// Run `daxvisor-ctl --api-socket <socket> <args>`.
    pub fn ctl(&self, args: &[&str]) -> RunOutcome {
        run_with_timeout(
            Command::new(ctl_bin())
                .arg("--api-socket")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(60),
        )
    }

    /// `ctl` that must succeed; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let r = self.ctl(args);
        assert_eq!(r.code, Some(0), "daxvisor-ctl {args:?}: {r:?}");
        r.stdout
    }

    /// `ctl --json` parsed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
    }

    /// One raw request on a fresh connection: (status, body).
    pub fn http(&self, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: daxvisor\r\nConnection: close\r\n");
        if let Some(b) = json {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        raw(&self.socket, req.as_bytes())
    }

    /// Wait for the VM to exit (after a stop) and return its exit code and stderr.
    pub fn wait(self, timeout: Duration) -> (Option<i32>, String) {
        let r = self.vm.finish(timeout);
        (r.code, r.stderr)
    }
}

/// Send `bytes` on a new connection to `socket`, read the whole answer: (status, body). Chunked bodies are
/// decoded.
pub fn raw(socket: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(bytes).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

/// (status, body) of one HTTP/1.1 response.
pub fn parse_response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text.into_owned());
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return (status, body.to_owned());
    }
    let mut rest = body;
    let mut decoded = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        decoded.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (status, decoded)
}

/// Allocated bytes of a file (st_blocks * 512), read with stat so the host guard sees no open.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}
