//! Builds the freestanding test guest (images/testguest) and leaves its ELF in OUT_DIR as `testguest.elf`, so
//! `daxvisor run` with no `--kernel` boots something real (embedded with `include_bytes!`).
//!
//! The guest is its own cargo workspace with its own linker script and profiles. It is built by a nested cargo
//! with its own target directory under OUT_DIR and with none of the outer build's flags: the outer build may be
//! static (`-C target-feature=+crt-static`), cross-configured, or run under clippy, and none of that applies to a
//! freestanding guest.
// A build script reports failure by panicking: cargo prints the message and stops the build.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest is built for the host target (no other target can be installed); it links without libc.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_BIN: &str = "daxvisor-testguest";

/// Environment variables of the outer build that would leak into the nested cargo and change how the guest is
/// built. Everything named `CARGO_*` goes too, except what locates cargo's home and shares its jobserver.
const CLEARED: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
];

fn keep_cargo_var(name: &str) -> bool {
    name == "CARGO_HOME"
        || name == "CARGO_MAKEFLAGS"
        || name.starts_with("CARGO_NET_")
        || name.starts_with("CARGO_HTTP_")
        || name.starts_with("CARGO_REGISTRIES_")
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let repo = manifest_dir
        .parent()
        .expect("vmm/ is inside the repository")
        .to_path_buf();
    let guest_dir = repo.join("images/testguest");

    // Relative to vmm/ (cargo resolves them against the package directory), so a moved checkout or a target
    // directory shared by two checkouts watches the right files.
    for path in [
        "../images/testguest/Cargo.toml",
        "../images/testguest/Cargo.lock",
        "../images/testguest/build.rs",
        "../images/testguest/linker.ld",
        "../images/testguest/src",
        "../guest-tools/proto/Cargo.toml",
        "../guest-tools/proto/src",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    commit(&repo);

    let target_dir = out_dir.join("testguest-target");
    build_guest(&guest_dir, &target_dir);

    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    let dest = out_dir.join("testguest.elf");
    std::fs::copy(&built, &dest).unwrap_or_else(|e| {
        panic!(
            "copying the test guest {} to {}: {e}",
            built.display(),
            dest.display()
        )
    });
}

fn build_guest(guest_dir: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest_dir)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "--manifest-path",
        ])
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if CLEARED.contains(&name)
            || name.starts_with("__CARGO")
            || (name.starts_with("CARGO_") && !keep_cargo_var(name))
        {
            cmd.env_remove(name);
        }
    }
    // Set (empty) so no `[build] rustflags` from a .cargo/config.toml above the guest applies either: the guest
    // needs no flags, its build.rs passes its link arguments.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "");
    // Cargo reads build-script stdout for directives: the nested build's output goes to stderr.
    cmd.stdout(Stdio::from(std::io::stderr()));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build the test guest: {e}"));
    if !status.success() {
        panic!(
            "building the test guest ({}) failed: {status}",
            guest_dir.display()
        );
    }
}

/// `--version` names the commit it was built from: DAXVISOR_COMMIT (short hash; `unknown` outside a git
/// checkout). Rerun when HEAD moves.
fn commit(repo: &Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(repo)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let hash = git(&["rev-parse", "--short=12", "HEAD"]);
    for watched in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", watched]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!(
        "cargo:rustc-env=DAXVISOR_COMMIT={}",
        hash.as_deref().unwrap_or("unknown")
    );
}
