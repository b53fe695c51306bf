//! Builds the freestanding test guest (images/testguest) and leaves its ELF in OUT_DIR for `include_bytes!`,
//! so `daxvisor run` with no `--kernel` boots something real.
// Placeholder until the test guest lands: an empty image (daxvisor reports it as missing).
fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("testguest.elf"), b"").expect("write placeholder test guest");
    println!("cargo:rerun-if-changed=build.rs");
}
