//! Recognising what `--kernel` points at, from its bytes rather than its name.

/// What a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// x86 bzImage (setup header magic "HdrS" at 0x202): Linux 64-bit boot protocol.
    BzImage,
    /// ELF vmlinux (has a `.init.text` section, which every Linux vmlinux has): Linux 64-bit boot protocol.
    LinuxElf,
    /// Any other 64-bit x86 ELF: a freestanding guest on the daxvisor boot ABI (`proto::boot`).
    FreestandingElf,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Classify an image from its contents. `None` when it is neither a bzImage nor a 64-bit little-endian x86 ELF.
pub fn classify(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.len() >= 0x206 && &bytes[0x202..0x206] == b"HdrS" {
        return Some(ImageKind::BzImage);
    }
    if bytes.len() < 64 || &bytes[..4] != ELF_MAGIC {
        return None;
    }
    // ELFCLASS64, little-endian, EM_X86_64.
    if bytes[4] != 2 || bytes[5] != 1 || u16le(bytes, 0x12)? != 62 {
        return None;
    }
    if elf_has_section(bytes, b".init.text").unwrap_or(false) {
        Some(ImageKind::LinuxElf)
    } else {
        Some(ImageKind::FreestandingElf)
    }
}

fn u16le(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32le(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64le(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Look a section up by name. Every offset is bounds-checked: the file is operator input.
fn elf_has_section(b: &[u8], name: &[u8]) -> Option<bool> {
    let shoff = usize::try_from(u64le(b, 0x28)?).ok()?;
    let shentsize = usize::from(u16le(b, 0x3a)?);
    let shnum = usize::from(u16le(b, 0x3c)?);
    let shstrndx = usize::from(u16le(b, 0x3e)?);
    if shentsize < 64 || shstrndx >= shnum {
        return Some(false);
    }
    let sh = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = usize::try_from(u64le(b, sh(shstrndx)?.checked_add(0x18)?)?).ok()?;
    for i in 0..shnum {
        let name_off = usize::try_from(u32le(b, sh(i)?)?).ok()?;
        let start = strtab.checked_add(name_off)?;
        let Some(rest) = b.get(start..) else { continue };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_recognises_bzimage() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(&[0u8; 4096]), None);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(classify(&bz), Some(ImageKind::BzImage));
        // An ELF header with absurd section offsets is classified without panicking.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        elf[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        elf[0x3a] = 64;
        elf[0x3c] = 5;
        assert_eq!(classify(&elf), Some(ImageKind::FreestandingElf));
    }

    #[test]
    fn host_binaries_are_freestanding_elves_not_linux() {
        // Any ELF on this machine without .init.text: our own test binary.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(classify(&me), Some(ImageKind::FreestandingElf));
    }
}
