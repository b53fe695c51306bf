//! The CPUID a guest sees: what KVM supports, with per-vCPU topology, and optionally masked.
//!
//! The nested mask: on a host that is itself a VM, the outer hypervisor may emulate guest ring-0 code
//! instruction by instruction, and such emulators are known to fail on CMPXCHG16B and XSAVE/XRSTOR (seen on this
//! project's CI machines). Hiding CX16, XSAVE/OSXSAVE and everything that depends on XSAVE (AVX, AVX2,
//! AVX-512, the XSAVE leaf 0xD) makes Linux take its FXSAVE and non-CX16 paths. INT3 cannot be hidden by CPUID.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::config::CpuidMask;

const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7: AVX2 (EBX5) and the AVX-512 family (EBX16, 17, 21, 26, 27, 28, 30, 31).
const LEAF7_EBX_XSAVE_DEPENDENT: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);

/// Whether this process runs under a hypervisor (CPUID.1:ECX bit 31).
pub fn host_is_virtualized() -> bool {
    // CPUID leaf 1 exists on every x86_64 CPU and has no side effects.
    let r = std::arch::x86_64::__cpuid(1);
    r.ecx & LEAF1_ECX_HYPERVISOR != 0
}

pub fn apply_nested_mask(mask: CpuidMask) -> bool {
    match mask {
        CpuidMask::Auto => host_is_virtualized(),
        CpuidMask::Nested => true,
        CpuidMask::None => false,
    }
}

pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// CPUID for vCPU `index` of `cpus`.
pub fn for_vcpu(base: &CpuId, index: u8, cpus: u8, nested_mask: bool) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(cpus) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if nested_mask {
                    e.ecx &= !(LEAF1_ECX_CX16
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C);
                }
            }
            7 if e.index == 0 && nested_mask => e.ebx &= !LEAF7_EBX_XSAVE_DEPENDENT,
            0xb => e.edx = u32::from(index),
            0xd if nested_mask => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_mask_hides_cx16_and_xsave_and_sets_apic_id() {
        let Ok(kvm) = Kvm::new() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "prerequisite missing under CI=true: /dev/kvm"
            );
            eprintln!("SKIP: /dev/kvm not available");
            return;
        };
        let base = supported(&kvm).unwrap();
        let c = for_vcpu(&base, 1, 2, true);
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(
            leaf1.ecx & (LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE | LEAF1_ECX_AVX),
            0
        );
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let unmasked = for_vcpu(&base, 0, 1, false);
        let l1 = unmasked
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .unwrap();
        let b1 = base.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & LEAF1_ECX_CX16, b1.ecx & LEAF1_ECX_CX16);
    }
}
