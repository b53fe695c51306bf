//! Link the test guest as a freestanding static ELF: no C runtime, no libc, loaded at 1 MiB by its own linker
//! script (daxvisor's ELF loader puts segments at their physical addresses).
//!
//! The linker script is copied into OUT_DIR and linked from there: cargo keeps this script's output across a
//! moved checkout (path dependencies hash relative to the workspace), so an absolute path into the source tree
//! could go stale, while OUT_DIR lives as long as the build it belongs to.
use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("linker.ld");
    std::fs::copy(dir.join("linker.ld"), &script).expect("copy linker.ld into OUT_DIR");
    // `-static` also overrides the `-pie` rustc passes for the (PIE by default) host target: the image must sit
    // at the addresses in the linker script, nobody relocates it.
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
