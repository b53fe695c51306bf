//! The Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst): load a bzImage or ELF vmlinux, then
//! build the zero page (setup header, e820 map, command line, initrd) and enter at the 64-bit entry point.

use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::image::ImageKind;
use super::{BootEntry, BootError};
use crate::layout::{self, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, ZERO_PAGE_ADDR};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// bzImage 64-bit entry is 0x200 past the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Top of the conventional memory Linux may use below 1 MiB (the EBDA starts here on a PC).
const EBDA_START: u64 = 0x9fc00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The default command line when the operator gives none: a serial console and a reboot that ends the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux";

/// Add kernel parameters to an operator's command line. They go before a ` -- ` separator: everything after it
/// is init's arguments, where a kernel parameter would be lost (and handed to init as a stray word).
pub fn with_kernel_args(cmdline: &str, args: &str) -> String {
    match cmdline.split_once(" -- ") {
        Some((kernel, init)) => format!("{kernel}{args} -- {init}"),
        None => format!("{cmdline}{args}"),
    }
}

pub struct LinuxBoot<'a> {
    pub kernel: &'a Path,
    pub kind: ImageKind,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    /// Where the ACPI RSDP is (Linux would also find it by scanning the BIOS area).
    pub rsdp: u64,
}

pub fn load(mem: &GuestMemoryMmap, boot: &LinuxBoot<'_>) -> Result<BootEntry, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: boot.kernel.to_path_buf(),
        source,
    };
    // Opened again by type-checked, non-blocking open: the path may have been swapped since it was classified.
    let mut file = crate::host_files::open_regular(boot.kernel, "--kernel")
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    let load_err = |source| BootError::Load {
        path: boot.kernel.to_path_buf(),
        source,
    };
    let (result, entry) = match boot.kind {
        ImageKind::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            (r, entry)
        }
        _ => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = r.kernel_load.0;
            (r, entry)
        }
    };

    let cmdline = boot.cmdline.as_bytes();
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains(&0) {
        return Err(BootError::Cmdline(format!(
            "{} bytes or a NUL byte: at most {} bytes without NUL",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))?;

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.acpi_rsdp_addr = boot.rsdp;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(initrd) = boot.initrd {
        let (addr, size) = load_initrd(
            mem,
            initrd,
            boot.mem_bytes,
            params.hdr.initrd_addr_max,
            result.kernel_end,
        )?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in layout::ram_ranges(boot.mem_bytes) {
        let s = start.max(HIMEM_START);
        if start + len > s {
            e820.push((s, start + len - s, E820_RAM));
        }
    }
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::Cmdline(format!("writing the zero page: {e}")))?;

    tracing::info!(entry = format_args!("{entry:#x}"), kind = ?boot.kind, "loaded Linux kernel");
    Ok(BootEntry {
        rip: entry,
        rsp: 0x8ff0,
        rsi: ZERO_PAGE_ADDR,
        rdi: 0,
    })
}

/// Place the initrd as high as the kernel allows in low RAM, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_bytes: u64,
    initrd_addr_max: u32,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = crate::host_files::open_regular(path, "--initrd")
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    // Sized before it is read: an initrd that cannot fit is refused without reading it into memory.
    let size = file.metadata().map_err(read_err)?.len();
    let low_ram_end = layout::ram_ranges(mem_bytes)[0].1;
    let max = if initrd_addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(initrd_addr_max)
    };
    let limit = low_ram_end.min(max + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, size), &mut data)
        .map_err(read_err)?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::with_kernel_args;

    #[test]
    fn kernel_args_go_before_inits_arguments() {
        let a = " virtio_mmio.device=4K@0xd0000000:5";
        assert_eq!(
            with_kernel_args("console=ttyS0", a),
            format!("console=ttyS0{a}")
        );
        assert_eq!(
            with_kernel_args("console=ttyS0 -- sh -c 'echo -- hi'", a),
            format!("console=ttyS0{a} -- sh -c 'echo -- hi'")
        );
    }
}
