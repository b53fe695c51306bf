//! Link the test guest as a freestanding static ELF: no C runtime, no libc, loaded at 1 MiB by its own linker
//! script (daxvisor's ELF loader puts segments at their physical addresses).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("linker.ld");
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
