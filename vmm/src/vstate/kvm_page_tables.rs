//! KVM_PRE_FAULT_MEMORY (Linux 6.11): map guest memory into KVM's own page tables before the guest runs, so a
//! `prefault=on` region costs the guest no KVM fault on its first touch either (the host side is populated by
//! [`crate::pmem::prefault`]). KVM offers it only with two-dimensional paging (EPT/NPT): a shadow MMU builds its
//! tables from the guest's page tables, which do not exist before the guest runs. kvm-ioctls has no wrapper for
//! it, hence the raw ioctl here.

use kvm_bindings::{kvm_pre_fault_memory, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

vmm_sys_util::ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_pre_fault_memory
);

/// Whether this VM's KVM offers KVM_PRE_FAULT_MEMORY.
pub fn offered_by(vm: &VmFd) -> bool {
    vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_PRE_FAULT_MEMORY)) > 0
}

/// Whether this host's KVM offers KVM_PRE_FAULT_MEMORY (false when /dev/kvm cannot be opened).
pub fn offered() -> bool {
    Kvm::new()
        .map(|kvm| kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_PRE_FAULT_MEMORY)) > 0)
        .unwrap_or(false)
}

/// Map `[gpa, gpa + size)` into KVM's page tables through `vcpu` (any vCPU of the VM, before it runs). The
/// kernel works in steps and reports progress by moving the range; an interrupted step is repeated.
pub fn pre_fault(vcpu: &VcpuFd, gpa: u64, size: u64) -> std::io::Result<()> {
    let mut range = kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: KVM_PRE_FAULT_MEMORY reads and updates exactly one kvm_pre_fault_memory, which we own; the
        // fd is a live vCPU.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range)
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => continue,
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a real VM with a real memslot: where KVM offers the capability the whole slot is pre-faulted; where it
    /// does not (shadow paging), the ioctl is refused, which is why the VMM asks first.
    #[test]
    fn pre_faults_a_memslot_where_offered_and_is_refused_where_not() {
        const SIZE: usize = 2 << 20;
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: a fresh anonymous mapping, unmapped at the end of the test after the VM is gone.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let slot = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 1 << 32,
            memory_size: SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping of SIZE bytes that outlives the VM.
        unsafe { vm.set_user_memory_region(slot).unwrap() };
        let vcpu = vm.create_vcpu(0).unwrap();
        let result = pre_fault(&vcpu, 1 << 32, SIZE as u64);
        assert_eq!(offered_by(&vm), offered());
        if offered_by(&vm) {
            result.unwrap();
        } else {
            assert!(
                result.is_err(),
                "KVM_PRE_FAULT_MEMORY worked though not offered"
            );
        }
        drop(vcpu);
        drop(vm);
        // SAFETY: our mapping, no longer used by KVM.
        unsafe { libc::munmap(host, SIZE) };
    }
}
