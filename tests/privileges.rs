//! End-to-end: once a VM runs, every daxvisor thread holds only the capabilities the runtime needs
//! (CAP_IPC_LOCK, CAP_LEASE, CAP_SYS_PTRACE, and on the `host-guard` thread alone CAP_LINUX_IMMUTABLE:
//! `vmm/src/privileges.rs` says why), in its effective, permitted and bounding sets, nothing inheritable, and
//! no_new_privs set. A daxvisor started with fewer capabilities runs
//! as before and keeps what it had of that set.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use daxvisor_tests::api::ApiVm;
use daxvisor_tests::{daxvisor_bin, missing_prerequisite, RunningVm};

const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_LEASE: u32 = 28;
const CAP_LINUX_IMMUTABLE: u32 = 9;
/// The kept set, as /proc shows it (a bit per capability number).
const KEPT: u64 = (1 << CAP_IPC_LOCK) | (1 << CAP_SYS_PTRACE) | (1 << CAP_LEASE);

/// One thread's name and the lines of its /proc status that say what it may do.
#[derive(Debug)]
struct ThreadPrivileges {
    name: String,
    fields: BTreeMap<String, String>,
}

impl ThreadPrivileges {
    fn mask(&self, field: &str) -> u64 {
        u64::from_str_radix(&self.fields[field], 16).unwrap()
    }
}

/// Every thread of `pid`: /proc/PID/task/*/status.
fn threads(pid: u32) -> Vec<ThreadPrivileges> {
    let mut v = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let fields: BTreeMap<String, String> = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        v.push(ThreadPrivileges {
            name: fields["Name"].clone(),
            fields,
        });
    }
    v
}

/// The threads whose sets differ from `effective`/`bounding` (inheritable must be empty, no_new_privs 1); the
/// `host-guard` thread's hold `guard_extra` besides.
fn off_set(
    threads: &[ThreadPrivileges],
    effective: u64,
    bounding: u64,
    guard_extra: u64,
) -> Vec<String> {
    threads
        .iter()
        .filter(|t| {
            let extra = if t.name == "host-guard" {
                guard_extra
            } else {
                0
            };
            t.mask("CapEff") != effective | extra
                || t.mask("CapPrm") != effective | extra
                || t.mask("CapInh") != 0
                || t.mask("CapBnd") != bounding | extra
                || t.fields["NoNewPrivs"] != "1"
        })
        .map(|t| {
            format!(
                "{}: eff {:x} prm {:x} inh {:x} bnd {:x} nnp {}",
                t.name,
                t.mask("CapEff"),
                t.mask("CapPrm"),
                t.mask("CapInh"),
                t.mask("CapBnd"),
                t.fields["NoNewPrivs"]
            )
        })
        .collect()
}

/// The threads of `pid` once every one of them has dropped (the main thread drops at the end of start-up, which
/// can come a moment after the guest's first line); the offenders if some still differ after 10 s.
fn settled(
    pid: u32,
    effective: u64,
    bounding: u64,
    guard_extra: u64,
) -> (Vec<ThreadPrivileges>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = threads(pid);
        let off = off_set(&t, effective, bounding, guard_extra);
        if off.is_empty() || Instant::now() > deadline {
            return (t, off);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_thread_of_a_running_vm_holds_only_the_kept_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let arg = format!("file={},size=8M,create=on,id=data", img.display());
    let vm = ApiVm::start(
        dir.path(),
        &[
            "--cpus",
            "2",
            "--pmem",
            &arg,
            "--cmdline",
            "pmem=write-flush-spin",
        ],
        "spinning until killed",
    );
    // A layout change through the API: its runtime starts a blocking-pool thread for it.
    vm.ctl_ok(&["punch", "data", "--offset", "1M", "--length", "4K"]);
    let pid = vm.pid();
    let (threads, off) = settled(pid, KEPT, KEPT, 1 << CAP_LINUX_IMMUTABLE);
    assert!(off.is_empty(), "threads holding other sets: {off:#?}");
    let names: Vec<&str> = threads.iter().map(|t| t.name.as_str()).collect();
    for want in [
        "daxvisor",
        "vcpu0",
        "vcpu1",
        "pmem-flush-data",
        "host-guard",
        "signals",
        "api",
        "agent",
        "agent-slow",
        "reclaim",
    ] {
        assert!(names.contains(&want), "no thread {want}: {names:?}");
    }
    // The runtime still works with what it kept.
    vm.ctl_ok(&["punch", "data", "--offset", "2M", "--length", "4K"]);
}

/// Root with only CAP_IPC_LOCK (and so no CAP_SETPCAP to shrink the bounding set): the VM starts, its guest
/// writes and flushes, every thread keeps CAP_IPC_LOCK and nothing more, and SIGTERM stops it cleanly.
#[test]
fn a_daxvisor_with_fewer_capabilities_runs_and_keeps_what_it_had() {
    let probe = Command::new("setpriv")
        .args(["--bounding-set=-all,+ipc_lock", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        missing_prerequisite("setpriv cannot shrink the bounding set here (not root?)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let arg = format!("file={},size=2M,create=on,id=data", img.display());
    let ipc_lock = 1 << CAP_IPC_LOCK;
    let mut vm = RunningVm::spawn_with(
        Command::new("setpriv")
            .args(["--bounding-set=-all,+ipc_lock", "--inh-caps=-all"])
            .arg(daxvisor_bin())
            .args(["run", "--pmem", &arg, "--cmdline", "pmem=write-flush-spin"]),
    );
    vm.wait_for_line("spinning until killed");
    let (_, off) = settled(vm.pid(), ipc_lock, ipc_lock, 0);
    assert!(off.is_empty(), "threads holding other sets: {off:#?}");
    vm.signal(libc::SIGTERM);
    let r = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code, Some(128 + libc::SIGTERM), "{r:?}");
}
