//! The only ring-0 code of the test guest: `_start`, in assembly.
//!
//! On nested KVM hosts like this one guest ring 0 is emulated instruction by instruction (slow, and the emulator
//! lacks SSE state, cmpxchg16b, xrstor, int3...), while ring 3 runs natively. So ring 0 does the least it can and
//! uses only plain integer instructions (no SSE: this file is the whole of ring 0, and it is hand-written):
//!
//! 1. CR4: clear TSD (rdtsc in ring 3), SMEP and SMAP (ring 0 touches user pages below), set OSFXSR and
//!    OSXMMEXCPT (ring-3 Rust code uses SSE). CR0: clear EM and TS, set MP.
//! 2. Extend the guest's own page tables, where every entry has the USER bit, with 2 MiB identity mappings of
//!    every `MemRange` of the `BootInfo` above 4 GiB (pmem windows, high RAM). The first 4 GiB are mapped by
//!    static tables assembled below, so they cost no instructions at run time.
//! 3. Load a GDT with user code and data segments, switch CR3, and `iretq` to [`super::ring3_entry`] in ring 3
//!    with RFLAGS.IOPL = 3 (port I/O allowed) and interrupts off. Nothing ever returns to ring 0, so there is no
//!    IDT and no TSS: an exception would triple-fault, and daxvisor reports that.
//!
//! Ring 3 is entered with RDI = the BootInfo address from the VMM and RSI = a [`MapStatus`] code.
//!
//! [`MapStatus`]: testguest::bootinfo::MapStatus

use core::mem::{offset_of, size_of};

use daxvisor_proto::boot::{BootInfo, MemRange, BOOT_INFO_MAGIC, MAX_MEM_RANGES};

use testguest::bootinfo::PT_POOL_PAGES;
/// Stack of the ring-3 code.
pub const STACK_SIZE: usize = 256 * 1024;

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
    .type _start, @function
_start:
    mov r15, rdi
    xor r14d, r14d

    mov rax, cr4
    and rax, 0xffffffffffcffffb
    or rax, 0x600
    mov cr4, rax
    mov rax, cr0
    and rax, 0xfffffffffffffff3
    or rax, 2
    mov cr0, rax

    mov rax, {magic}
    cmp qword ptr [r15 + {off_magic}], rax
    jne 80f
    mov ecx, dword ptr [r15 + {off_num_ranges}]
    cmp ecx, {max_ranges}
    ja 80f
    lea rsi, [r15 + {off_ranges}]
2:
    test ecx, ecx
    jz 90f
    mov rax, qword ptr [rsi + {off_base}]
    mov rdx, qword ptr [rsi + {off_size}]
    add rdx, rax
    jc 82f
    mov rbx, 0x1fffff
    add rdx, rbx
    jc 82f
    not rbx
    and rdx, rbx
    and rax, rbx
    mov rbx, 0x100000000
    cmp rax, rbx
    jae 3f
    mov rax, rbx
3:
    mov rbx, 0x800000000000
    cmp rdx, rbx
    ja 82f
4:
    cmp rax, rdx
    jae 5f
    call testguest_map_2m
    test r14d, r14d
    jnz 90f
    add rax, 0x200000
    jmp 4b
5:
    add rsi, {range_size}
    dec ecx
    jmp 2b
80:
    mov r14d, 1
    jmp 90f
82:
    mov r14d, 3
90:
    lgdt [rip + testguest_gdt_ptr]
    lea rax, [rip + testguest_pml4]
    mov cr3, rax
    push 0x1b
    lea rax, [rip + testguest_stack_top]
    sub rax, 8
    push rax
    push 0x3002
    push 0x23
    lea rax, [rip + {ring3}]
    push rax
    mov rdi, r15
    mov rsi, r14
    iretq

    // Map the 2 MiB page at physical RAX (2 MiB aligned) to itself. Clobbers r8-r13; on failure sets r14d = 2.
testguest_map_2m:
    lea r9, [rip + testguest_pml4]
    mov r8, rax
    shr r8, 39
    and r8, 511
    lea r9, [r9 + r8 * 8]
    call testguest_ensure_table
    test r14d, r14d
    jnz 1f
    mov r8, rax
    shr r8, 30
    and r8, 511
    lea r9, [r10 + r8 * 8]
    call testguest_ensure_table
    test r14d, r14d
    jnz 1f
    mov r8, rax
    shr r8, 21
    and r8, 511
    lea r9, [r10 + r8 * 8]
    mov r11, rax
    or r11, 0x87
    mov qword ptr [r9], r11
1:
    ret

    // R9 = address of a table entry. Returns R10 = the next-level table it points to, allocating and zeroing
    // one from the pool (and pointing the entry at it) when the entry is not present. Pool empty: r14d = 2.
testguest_ensure_table:
    mov r10, qword ptr [r9]
    test r10, 1
    jz 1f
    mov r11, 0x000ffffffffff000
    and r10, r11
    ret
1:
    mov r10, qword ptr [rip + testguest_pt_pool_next]
    cmp r10, {pool_pages}
    jae 3f
    lea r11, [r10 + 1]
    mov qword ptr [rip + testguest_pt_pool_next], r11
    shl r10, 12
    lea r11, [rip + testguest_pt_pool]
    add r10, r11
    mov r12, r10
    mov r13, 512
2:
    mov qword ptr [r12], 0
    add r12, 8
    dec r13
    jnz 2b
    mov r11, r10
    or r11, 7
    mov qword ptr [r9], r11
    ret
3:
    mov r14d, 2
    ret
    // End of ring-0 code (check-ring0.sh disassembles _start up to here).
    .global testguest_ring0_end
testguest_ring0_end:

    .section .data.pagetables, "aw"
    .balign 4096
testguest_pml4:
    .quad testguest_pdpt0 + 7
    .fill 511, 8, 0
testguest_pdpt0:
    .quad testguest_pd_low + 0x0007
    .quad testguest_pd_low + 0x1007
    .quad testguest_pd_low + 0x2007
    .quad testguest_pd_low + 0x3007
    .fill 508, 8, 0
testguest_pd_low:
    .set .Ltg_page, 0
    .rept 2048
    .quad .Ltg_page + 0x87
    .set .Ltg_page, .Ltg_page + 0x200000
    .endr

    .section .data.gdt, "aw"
    .balign 16
testguest_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
testguest_gdt_end:
    .balign 16
testguest_gdt_ptr:
    .word testguest_gdt_end - testguest_gdt - 1
    .quad testguest_gdt

    .section .bss.testguest_boot, "aw", @nobits
    .balign 8
testguest_pt_pool_next:
    .skip 8
    .balign 4096
testguest_pt_pool:
    .skip {pool_pages} * 4096
testguest_stack:
    .skip {stack_size}
testguest_stack_top:
"#,
    magic = const BOOT_INFO_MAGIC,
    max_ranges = const MAX_MEM_RANGES,
    off_magic = const offset_of!(BootInfo, magic),
    off_num_ranges = const offset_of!(BootInfo, num_mem_ranges),
    off_ranges = const offset_of!(BootInfo, mem_ranges),
    off_base = const offset_of!(MemRange, base),
    off_size = const offset_of!(MemRange, size),
    range_size = const size_of::<MemRange>(),
    pool_pages = const PT_POOL_PAGES,
    stack_size = const STACK_SIZE,
    ring3 = sym super::ring3_entry,
);
