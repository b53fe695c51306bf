//! 64-bit entry state shared by Linux and the test guest: GDT, identity page tables, segment and control
//! registers, FPU and boot MSRs. Both start directly in long mode, so no real-mode firmware runs (and the
//! nested emulator here never has to execute 16-bit code).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum LongModeError {
    #[error("cannot write boot page tables or GDT into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18). Selectors match `proto::boot`.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit_raw = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            ((limit_raw as u32) << 12) | 0xfff
        } else {
            limit_raw as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// Write the GDT and identity page tables (first 4 GiB, 2 MiB pages) into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), LongModeError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + pd * 8))?;
        // Build the 4 KiB page directory in one write rather than 512 small ones.
        let mut table = [0u8; 4096];
        for i in 0..512u64 {
            let entry = ((pd << 30) + (i << 21)) | 0x83; // present, writable, 2 MiB page
            table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr))?;
    }
    Ok(())
}

/// Special registers for 64-bit mode with the tables from [`write_tables`].
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers: entry point, and the two pointer arguments (RSI for Linux's boot_params, RDI for the
/// test guest's BootInfo).
pub fn regs(rip: u64, rsp: u64, rsi: u64, rdi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rdi,
        rflags: 0x2,
        ..Default::default()
    }
}

pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Boot MSRs: fast strings on, MTRRs enabled with write-back default (Linux maps RAM uncached otherwise).
pub fn msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ];
    Msrs::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_64_bit_code_and_flat_data() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.selector, cs.type_),
            (1, 0, 1, 0x08, 0xb)
        );
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!(
            (ds.db, ds.g, ds.limit, ds.selector),
            (1, 1, 0xffff_ffff, 0x10)
        );
        assert_eq!(cs.selector, daxvisor_proto::boot::CODE64_SELECTOR);
        assert_eq!(ds.selector, daxvisor_proto::boot::DATA_SELECTOR);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // Last 2 MiB page below 4 GiB maps to itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }
}
