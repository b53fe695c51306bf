//! The built guest ELF is what daxvisor's loader and the ring-0 emulator need: an ET_EXEC for x86_64 entered at
//! 1 MiB, every segment identity-placed at or above 1 MiB and small enough for the smallest VM, and ring-0 code
//! free of SSE (checked by disassembling it with check-ring0.sh, which needs binutils' objdump and nm).

use std::path::Path;
use std::process::Command;

const LOAD_ADDR: u64 = 0x10_0000;
/// daxvisor refuses less than 16 MiB of guest memory; the whole image (with .bss) must fit well below.
const MAX_END: u64 = 8 << 20;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn elf_is_a_static_executable_entered_at_one_mib() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_daxvisor-testguest")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "64-bit");
    assert_eq!(elf[5], 1, "little endian");
    assert_eq!(u16_at(&elf, 0x10), 2, "ET_EXEC, not a PIE");
    assert_eq!(u16_at(&elf, 0x12), 62, "x86_64");
    assert_eq!(u64_at(&elf, 0x18), LOAD_ADDR, "entry (_start) at 1 MiB");

    let phoff = u64_at(&elf, 0x20) as usize;
    let phentsize = u16_at(&elf, 0x36) as usize;
    let phnum = u16_at(&elf, 0x38) as usize;
    let mut loads = 0;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        if u32_at(ph, 0) != 1 {
            continue; // not PT_LOAD
        }
        loads += 1;
        let (vaddr, paddr, memsz) = (u64_at(ph, 0x10), u64_at(ph, 0x18), u64_at(ph, 0x28));
        assert_eq!(vaddr, paddr, "identity placed");
        assert!(paddr >= LOAD_ADDR, "segment at {paddr:#x} below 1 MiB");
        assert!(
            paddr + memsz <= MAX_END,
            "segment ends at {:#x}",
            paddr + memsz
        );
    }
    assert!(loads >= 1);
}

#[test]
fn ring0_code_has_no_sse() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("check-ring0.sh");
    let out = Command::new("sh")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_daxvisor-testguest"))
        .output()
        .expect("run check-ring0.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-ring0.sh failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no SSE"), "{stdout}");
}
