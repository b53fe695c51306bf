//! The mapper is a library other VMMs can adopt: used from outside the workspace as a path dependency it
//! builds without the VMM or the test guest, pulls in no KVM, virtio or guest-memory crate, and does what its
//! docs say (a region at a nonzero file offset, a lease, a pin, a refused punch naming the holder).

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use daxvisor_tests::lab::repo_root;

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

#[test]
fn the_mapper_depends_on_no_kvm_virtio_or_guest_memory_crate() {
    let out = cargo()
        .current_dir(repo_root())
        .args([
            "tree",
            "-p",
            "daxvisor-mapper",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("daxvisor-mapper"), "{tree}");
    for banned in [
        "kvm-",
        "virtio-",
        "vm-memory",
        "event-manager",
        "daxvisor v",
        "daxvisor-devices",
    ] {
        assert!(
            !tree.contains(banned),
            "daxvisor-mapper depends on {banned}:\n{tree}"
        );
    }
}

#[test]
fn a_program_outside_the_workspace_uses_the_mapper_as_a_path_dependency() {
    let manifest = repo_root().join("vmm/mapper/examples/outside-user/Cargo.toml");
    let target = repo_root().join("target/outside-user");
    let build = cargo()
        .args(["build", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "{log}");
    for banned in [
        "Compiling daxvisor v",
        "daxvisor-testguest",
        "kvm-ioctls",
        "vm-memory",
    ] {
        assert!(
            !log.contains(banned),
            "building the outside user built {banned}:\n{log}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(target.join("debug/mapper-outside-user"))
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for want in [
        "at file offset 0x200000",
        "punch: ETXTBSY [0x1000, 0x2000) is held by owner:2 (nic-dma) with a pin",
        "punch past the window: ERANGE",
        "punch after release: ok",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
