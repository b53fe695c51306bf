//! Live capacity end to end: the real daxvisor binary with `--transport pci --pmem-hotplug`, on this machine's
//! KVM, the test guest polling the PCI hotplug registers from ring 3 (`hotplug=N`), `daxvisor-ctl add-pmem` and
//! `remove-pmem` against the API, real backing files and real OFD locks.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use daxvisor_tests::api::ApiVm;
use daxvisor_tests::pattern_mismatches;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The guest's next line containing `want` (earlier lines are skipped); fails after 60 s.
fn line_with(vm: &mut ApiVm, want: &str) -> String {
    for _ in 0..200 {
        match vm.serial_line(Duration::from_secs(60)) {
            Some(l) if l.contains(want) => return l,
            Some(l) => assert!(!l.contains("FAIL"), "guest failed: {l}"),
            None => break,
        }
    }
    panic!("the guest never printed {want:?}");
}

/// Whether another process (this test) can open the file and take its lock now (while daxvisor serves it, its
/// host guard refuses the open, or the lock is held).
fn lockable(path: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => daxvisor_mapper::lock_file(&f, path, true).is_ok(),
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            false
        }
    }
}

fn used(vm: &ApiVm) -> u64 {
    let (status, body) = vm.http("GET", "/vm", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["pmem_hotplug"]["used"].as_u64().unwrap()
}

fn start(dir: &Path, cmdline: &str) -> ApiVm {
    ApiVm::start(
        dir,
        &[
            "--transport",
            "pci",
            "--pmem-hotplug",
            "64M",
            "--cmdline",
            cmdline,
        ],
        "hotplug: waiting for a device",
    )
}

#[test]
fn the_guest_sees_an_added_region_writes_and_flushes_it_and_acknowledges_its_removal() {
    if !Path::new("/dev/kvm").exists() {
        daxvisor_tests::missing_prerequisite("/dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A third round never comes: the guest is still waiting for a device when the operator stops the VM.
    let mut vm = start(dir.path(), "hotplug=3 seed=5");
    let (status, body) = vm.http("GET", "/vm", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pmem_hotplug"]["size"], 64 * MIB, "{v}");
    assert_eq!(v["pmem_hotplug"]["used"], 0, "{v}");

    // Failed adds leave nothing behind: a bad size, a file another process holds, no hotplug space left.
    let bad = dir.path().join("bad.img");
    let r = vm.ctl(&[
        "add-pmem",
        "--file",
        bad.to_str().unwrap(),
        "--size",
        "3M",
        "--create",
    ]);
    assert_eq!(r.code, Some(4), "{r:?}");
    assert!(!bad.exists(), "a refused add removes the file it created");
    let held = dir.path().join("held.img");
    std::fs::write(&held, vec![0u8; 4 * MIB as usize]).unwrap();
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&held)
        .unwrap();
    daxvisor_mapper::lock_file(&holder, &held, true).unwrap();
    let r = vm.ctl(&["add-pmem", "--file", held.to_str().unwrap()]);
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(r.stderr.contains("EBUSY"), "{}", r.stderr);
    drop(holder);
    let big = dir.path().join("big.img");
    let r = vm.ctl(&[
        "add-pmem",
        "--file",
        big.to_str().unwrap(),
        "--size",
        "128M",
        "--create",
    ]);
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(r.stderr.contains("ENOSPC"), "{}", r.stderr);
    assert!(!big.exists(), "a refused add removes the file it created");
    assert_eq!(used(&vm), 0);
    let regions: Value = vm.ctl_json(&["regions"]);
    assert_eq!(regions.as_array().unwrap().len(), 0, "{regions}");

    for round in 0..2u32 {
        let img = dir.path().join(format!("hot{round}.img"));
        let out = vm.ctl_ok(&[
            "add-pmem",
            "--file",
            img.to_str().unwrap(),
            "--size",
            "4M",
            "--create",
            "--id",
            "hot",
        ]);
        assert!(out.contains("region hot added: 4194304 bytes"), "{out}");
        assert_eq!(used(&vm), 4 * MIB);
        line_with(&mut vm, "hotplug: slot");
        let at = line_with(&mut vm, &format!("hotplug pmem{round} at virtio-pci"));
        assert!(at.contains("size=0x400000"), "{at}");
        line_with(&mut vm, &format!("pmem{round} flush ok"));
        line_with(&mut vm, &format!("pmem{round} readback ok"));
        line_with(&mut vm, "hotplug: waiting for an eject request");
        assert!(
            !lockable(&img),
            "daxvisor holds the file while it is attached"
        );

        if round == 0 {
            // The operator's exclusive lease refuses the removal, naming the holder; the device stays.
            let l = vm.ctl_json(&["lease", "acquire", "hot", "--mode", "exclusive"]);
            let lease = l["id"].as_u64().unwrap().to_string();
            let r = vm.ctl(&["remove-pmem", "hot"]);
            assert_eq!(r.code, Some(3), "{r:?}");
            assert!(r.stderr.contains("ETXTBSY"), "{}", r.stderr);
            assert!(r.stderr.contains("(operator)"), "{}", r.stderr);
            assert_eq!(vm.ctl_json(&["regions", "hot"])["size"], 4 * MIB);
            vm.ctl_ok(&["lease", "release", &lease]);
        }

        let out = vm.ctl_ok(&["remove-pmem", "hot"]);
        assert!(out.contains("region hot removed"), "{out}");
        line_with(&mut vm, "ejected");
        assert_eq!(used(&vm), 0, "the window went back to the hotplug space");
        assert_eq!(vm.http("GET", "/regions/hot", None).0, 404);
        assert!(
            lockable(&img),
            "after removal another process can lock the file"
        );
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(
            pattern_mismatches(&bytes, 5 + round, 4 * MIB as usize),
            0,
            "the guest's flushed pattern is in the file"
        );
    }
    let (status, body) = vm.http("GET", "/events", None);
    assert_eq!(status, 200);
    for kind in [
        "region-added",
        "region-add-refused",
        "region-remove-started",
        "region-remove-refused",
        "region-removed",
    ] {
        assert!(body.contains(kind), "no {kind} event: {body}");
    }
    let metrics = vm.ctl_ok(&["metrics"]);
    assert!(metrics.contains("change=\"add\""), "{metrics}");
    assert!(metrics.contains("change=\"remove\""), "{metrics}");
    vm.ctl_ok(&["stop"]);
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_guest_that_does_not_eject_in_time_keeps_the_device_and_nothing_is_lost() {
    if !Path::new("/dev/kvm").exists() {
        daxvisor_tests::missing_prerequisite("/dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = start(dir.path(), "hotplug=1 hotplug-ignore=1 seed=9");
    let img = dir.path().join("stuck.img");
    vm.ctl_ok(&[
        "add-pmem",
        "--file",
        img.to_str().unwrap(),
        "--size",
        "2M",
        "--create",
    ]);
    line_with(&mut vm, "hotplug: waiting for an eject request");
    // While the removal waits for the eject, the region takes no new lease: one granted then would be dropped
    // with the device, unasked. (The test guest serves on for about a second after the eject request, so the
    // removal's eject timeout stays below that.)
    let (r, refused) = std::thread::scope(|s| {
        let socket = vm.socket.clone();
        let remove = s.spawn(move || {
            let mut cmd = std::process::Command::new(daxvisor_tests::api::ctl_bin());
            cmd.arg("--api-socket").arg(socket);
            cmd.args(["remove-pmem", "pmem0", "--eject-timeout-ms", "600"]);
            cmd.output().unwrap()
        });
        let mut refused = None;
        while !remove.is_finished() {
            let l = vm.ctl(&[
                "--json", "lease", "acquire", "pmem0", "--length", "4K", "--mode", "shared",
            ]);
            if l.code != Some(0) && format!("{}{}", l.stdout, l.stderr).contains("ENODEV") {
                refused = Some(l);
                break;
            }
            if l.code == Some(0) {
                // Before the removal began: give it back and ask again.
                let id: serde_json::Value =
                    serde_json::from_str(l.stdout.trim()).unwrap_or_default();
                if let Some(id) = id["id"].as_u64() {
                    vm.ctl_ok(&["lease", "release", &id.to_string()]);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (remove.join().unwrap(), refused)
    });
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(3), "{r:?}");
    assert!(stderr.contains("ETIMEDOUT"), "{stderr}");
    let refused = refused.expect("no lease was refused while the removal waited for the eject");
    assert!(
        format!("{}{}", refused.stdout, refused.stderr).contains("being removed"),
        "{refused:?}"
    );
    // The removal failed, so the region takes leases again.
    let l = vm.ctl_json(&[
        "lease", "acquire", "pmem0", "--length", "4K", "--mode", "shared",
    ]);
    vm.ctl_ok(&["lease", "release", &l["id"].as_u64().unwrap().to_string()]);
    // The device stays and still answers the guest's flushes.
    assert_eq!(vm.ctl_json(&["regions", "pmem0"])["size"], 2 * MIB);
    assert_eq!(used(&vm), 2 * MIB);
    line_with(&mut vm, "not acknowledging");
    line_with(&mut vm, "still served");
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(pattern_mismatches(&bytes, 9, 2 * MIB as usize), 0);
}

#[test]
fn a_guest_pin_refuses_the_removal_until_the_operator_revokes_its_owner() {
    if !Path::new("/dev/kvm").exists() {
        daxvisor_tests::missing_prerequisite("/dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A second round never comes: the guest is still waiting for a device when the operator stops the VM.
    let mut vm = start(dir.path(), "hotplug=2 hotplug-pin=1 seed=13");
    let img = dir.path().join("pinned.img");
    vm.ctl_ok(&[
        "add-pmem",
        "--file",
        img.to_str().unwrap(),
        "--size",
        "4M",
        "--create",
        "--id",
        "dma",
    ]);
    line_with(&mut vm, "pmem0 flush ok");
    let pinned = line_with(&mut vm, "agent pinned ");
    assert!(pinned.contains(" on dma "), "{pinned}");
    line_with(&mut vm, "hotplug: waiting for an eject request");

    // The guest's pin refuses the removal, naming the guest's owner; the device stays, nothing changes.
    let r = vm.ctl(&["--json", "remove-pmem", "dma"]);
    assert_eq!(r.code, Some(3), "{r:?}");
    let e: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(e["errno"], "ETXTBSY", "{e}");
    assert_eq!(e["holder"]["name"], "agent:testguest-hot", "{e}");
    assert_eq!(e["holder"]["kind"], "pin", "{e}");
    assert_eq!(vm.ctl_json(&["regions", "dma"])["size"], 4 * MIB);
    assert_eq!(used(&vm), 4 * MIB);

    // The operator's override: revoking the owner drops its pin and lease, and the removal then proceeds with
    // the guest's acknowledgement.
    let owner = e["holder"]["owner"].as_u64().unwrap().to_string();
    let out = vm.ctl_ok(&["revoke", &owner]);
    assert!(out.contains("revoked"), "{out}");
    let out = vm.ctl_ok(&["remove-pmem", "dma"]);
    assert!(out.contains("region dma removed"), "{out}");
    line_with(&mut vm, "ejected");
    assert_eq!(used(&vm), 0);
    assert!(
        lockable(&img),
        "after removal another process can lock the file"
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(pattern_mismatches(&bytes, 13, 4 * MIB as usize), 0);
    vm.ctl_ok(&["stop"]);
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("testguest-hot"), "{stderr}");
}
