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
    classify_with(&|off, len| {
        let start = usize::try_from(off).ok()?;
        Some(bytes.get(start..start.checked_add(len)?)?.to_vec())
    })
}

/// Classify an image file from bounded reads: its first bytes, and for an ELF its section headers and their
/// names, never the whole file (a kernel may be huge, or not a kernel at all).
pub fn classify_file(file: &std::fs::File) -> Option<ImageKind> {
    use std::os::unix::fs::FileExt;
    classify_with(&|off, len| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    })
}

/// Reads `len` bytes at `off` of the image; `None` past its end.
type ReadAt<'a> = dyn Fn(u64, usize) -> Option<Vec<u8>> + 'a;

fn classify_with(read: &ReadAt<'_>) -> Option<ImageKind> {
    if read(0x202, 4).is_some_and(|m| m == b"HdrS") {
        return Some(ImageKind::BzImage);
    }
    let h = read(0, 64)?;
    if &h[..4] != ELF_MAGIC {
        return None;
    }
    // ELFCLASS64, little-endian, EM_X86_64.
    if h[4] != 2 || h[5] != 1 || u16le(&h, 0x12)? != 62 {
        return None;
    }
    if elf_has_section(&h, read, b".init.text").unwrap_or(false) {
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

/// Look a section up by name, given the ELF header `h`. Every offset is bounds-checked: the file is operator
/// input.
fn elf_has_section(h: &[u8], read: &ReadAt<'_>, name: &[u8]) -> Option<bool> {
    let shoff = u64le(h, 0x28)?;
    let shentsize = u64::from(u16le(h, 0x3a)?);
    let shnum = u64::from(u16le(h, 0x3c)?);
    let shstrndx = u64::from(u16le(h, 0x3e)?);
    if shentsize < 64 || shstrndx >= shnum {
        return Some(false);
    }
    let sh = |i: u64| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = u64le(&read(sh(shstrndx)?, 64)?, 0x18)?;
    for i in 0..shnum {
        let name_off = u32le(&read(sh(i)?, 64)?, 0)?;
        let start = strtab.checked_add(u64::from(name_off))?;
        let Some(rest) = read(start, name.len() + 1) else {
            continue;
        };
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
        let f = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(classify_file(&f), Some(ImageKind::FreestandingElf));
    }

    #[test]
    fn a_linux_elf_is_found_from_its_section_names() {
        // A minimal ELF: header, one name table section, a section named .init.text.
        let names = b"\0.shstrtab\0.init.text\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        let strtab = elf.len() as u64;
        elf.extend_from_slice(names);
        let shoff = elf.len() as u64;
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x3a] = 64;
        elf[0x3c] = 2;
        elf[0x3e] = 0;
        for name in [1u32, 11] {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&strtab.to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        assert_eq!(classify(&elf), Some(ImageKind::LinuxElf));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        std::fs::write(&p, &elf).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(classify_file(&f), Some(ImageKind::LinuxElf));
    }
}
