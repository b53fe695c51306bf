//! The agent channel end to end: the real daxvisor binary on this machine's KVM, the test guest speaking the
//! agent protocol over the virtio-console port from ring 3, a real backing file, and this test process as the
//! host-side program that opens the file for writing (which the host guard turns into a whole-file break).

// Test code: a failed step fails the test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use daxvisor_tests::daxvisor_bin;

const PREFIX: &str = "daxvisor-testguest: ";

/// Every agent mode runs over both virtio transports: the port is the same virtio-console device on either.
const TRANSPORTS: [&str; 2] = ["mmio", "pci"];

/// A running VM: its guest's stdout lines as they come, and its stderr (the VMM's log) at the end.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Vm {
    fn start(img: &Path, transport: &str, extra: &[&str], cmdline: &str) -> Vm {
        eprintln!("transport {transport}: {cmdline}");
        // hold: a foreign open for writing is held for the whole-file break the guest answers.
        let pmem = format!("file={},size=2M,create=on,guard=hold", img.display());
        let mut child = Command::new(daxvisor_bin())
            .args([
                "run",
                "--transport",
                transport,
                "--pmem",
                &pmem,
                "--cmdline",
                cmdline,
            ])
            .args(extra)
            .env("DAXVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a guest line starting with `start` (after the prefix) and returns it.
    fn wait_for(&mut self, start: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let guest = l.strip_prefix(PREFIX).map(str::to_owned);
                self.seen.push(l);
                if let Some(g) = guest {
                    assert!(!g.starts_with("FAIL"), "guest failed: {:#?}", self.seen);
                    if g.starts_with(start) {
                        return g;
                    }
                }
            }
        }
        let _ = self.child.kill();
        panic!("no guest line starting {start:?}: {:#?}", self.seen);
    }

    /// Waits for the VM to end (killing it after 120 s); its exit code and the VMM's log.
    fn finish(mut self) -> (Option<i32>, String, Vec<String>) {
        let mut stderr = self.child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("VM did not end: {:#?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (code, log.join().unwrap(), self.seen)
    }
}

/// Opens the backing file for writing as a foreign host process would; returns how long the kernel held the
/// open (while daxvisor ran the whole-file break).
fn foreign_open_for_writing(img: &Path) -> Duration {
    let t0 = Instant::now();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img);
    let held = t0.elapsed();
    assert!(f.is_ok(), "{f:?}");
    held
}

#[test]
fn a_shared_lease_holder_gets_the_notice_for_the_range_releases_and_the_host_open_proceeds() {
    for transport in TRANSPORTS {
        a_shared_lease_holder_gets_the_notice_for_the_range_releases_and_the_host_open_proceeds_on(
            transport,
        );
    }
}

fn a_shared_lease_holder_gets_the_notice_for_the_range_releases_and_the_host_open_proceeds_on(
    transport: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shared.img");
    let mut vm = Vm::start(&img, transport, &[], "agent=shared");
    let lease = vm.wait_for("agent lease ");
    // The id is the mapper's (opaque); the rest of the session names it.
    let id = lease
        .strip_prefix("agent lease ")
        .and_then(|l| l.strip_suffix(" off=0 len=0x200000"))
        .unwrap_or_else(|| panic!("{lease}"));
    assert!(id.parse::<u64>().is_ok(), "{lease}");
    vm.wait_for("agent waiting for a break");
    let held = foreign_open_for_writing(&img);
    let notice = vm.wait_for("agent notice ");
    // The whole file: the guard cannot know which range the opener will touch.
    assert!(
        notice.contains(&format!("lease={id} off=0x0 len=0x200000 reason=host-open")),
        "{notice}"
    );
    vm.wait_for(&format!("agent released {id}"));
    let (code, log, _) = vm.finish();
    eprintln!("foreign open held for {held:?} while the guest answered");
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("break notice sent to guest agent") && log.contains("delivered=1"),
        "{log}"
    );
    assert!(
        log.contains("whole-file break done") && log.contains("notified=owner:2"),
        "the host change did not proceed after the release:\n{log}"
    );
}

#[test]
fn exclusive_lease_and_pin_refuse_the_break_naming_the_guest_owner_and_closing_the_port_releases_them(
) {
    for transport in TRANSPORTS {
        exclusive_lease_and_pin_refuse_the_break_naming_the_guest_owner_and_closing_the_port_releases_them_on(transport);
    }
}

fn exclusive_lease_and_pin_refuse_the_break_naming_the_guest_owner_and_closing_the_port_releases_them_on(
    transport: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pinned.img");
    let mut vm = Vm::start(&img, transport, &[], "agent=exclusive-pin hold=10");
    vm.wait_for("agent pinned ");
    vm.wait_for("agent holding");
    // Under guard=hold, a pin refuses the whole-file break, and so the open.
    let refused = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img);
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EPERM)),
        "a write-open got past the guest's pin"
    );
    vm.wait_for("agent port closed");
    let (code, log, _) = vm.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("while the file is held: ETXTBSY")
            && log.contains("held by owner:2 (agent:testguest-dma) with a pin"),
        "the break was not refused with the guest owner as holder:\n{log}"
    );
    // Closing the port ended the session and released the pin and the lease.
    assert!(
        log.contains("owner exited; everything it held released owner=owner:2"),
        "{log}"
    );
    assert!(
        log.contains("agent session ended (port closed or reopened)"),
        "{log}"
    );
}

#[test]
fn hostile_frames_leave_the_vmm_serving_a_second_session() {
    for transport in TRANSPORTS {
        hostile_frames_leave_the_vmm_serving_a_second_session_on(transport);
    }
}

fn hostile_frames_leave_the_vmm_serving_a_second_session_on(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("hostile.img");
    let mut vm = Vm::start(&img, transport, &[], "agent=hostile");
    vm.wait_for("agent hostile: sent garbage");
    vm.wait_for("agent hostile: second session served");
    let (code, log, _) = vm.finish();
    assert_eq!(code, Some(0), "{log}");
    let first = log
        .lines()
        .find(|l| l.contains("agent session ended") && l.contains("session=1"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        !first.contains("malformed=0") && !first.contains("skipped_bytes=0"),
        "{first}"
    );
    assert!(log.contains("agent session started session=2"), "{log}");
    // The flood's answers that did not fit the unread receive queue were dropped and counted, not buffered.
    let counters = log
        .lines()
        .find(|l| l.contains("virtio-console counters"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!counters.contains("rx_dropped_messages=0"), "{counters}");
}

#[test]
fn the_console_port_carries_the_guest_output_and_the_guest_lists_its_region() {
    for transport in TRANSPORTS {
        the_console_port_carries_the_guest_output_and_the_guest_lists_its_region_on(transport);
    }
}

fn the_console_port_carries_the_guest_output_and_the_guest_lists_its_region_on(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("hello.img");
    let console = dir.path().join("console.log");
    let console_arg = console.to_str().unwrap();
    let mut vm = Vm::start(&img, transport, &["--console", console_arg], "agent=hello");
    let hello = vm.wait_for("agent hello ");
    assert!(
        hello.starts_with("agent hello version=1 session=1"),
        "{hello}"
    );
    let region = vm.wait_for("agent region ");
    assert!(
        region.contains("size=0x200000 kind=1 name=pmem0"),
        "{region}"
    );
    let (code, log, _) = vm.finish();
    assert_eq!(code, Some(0), "{log}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(
        text, "daxvisor-testguest: hello on the virtio console\n",
        "console file"
    );
}
