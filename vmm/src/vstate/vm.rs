//! The KVM VM: open /dev/kvm, create the in-kernel irqchip and PIT, register guest memory slots.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have permission?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM setup ({what}): {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory slot {slot} at {gpa:#x} (+{size:#x}): {source}")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// Where the VMM puts KVM's TSS and identity-map pages (needed on Intel): just below the IOAPIC, inside the
/// MMIO hole where no device or RAM lives.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    next_slot: u32,
    /// Slots given back by hot-removed regions, reused first.
    free_slots: Vec<u32>,
}

impl Vm {
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(setup("identity map address"))?;
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(setup("TSS address"))?;
        fd.create_irq_chip().map_err(setup("irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("PIT"))?;
        Ok(Vm {
            kvm,
            fd,
            next_slot: 0,
            free_slots: Vec::new(),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Register every region of `mem` as a read-write memory slot.
    pub fn register_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for region in mem.iter() {
            self.add_slot(
                region.start_addr().0,
                region.len(),
                region.as_ptr() as u64,
                false,
            )?;
        }
        Ok(())
    }

    /// Add one memory slot. `readonly` slots turn guest writes into MMIO exits.
    pub fn add_slot(
        &mut self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> Result<u32, VmError> {
        let slot = self.free_slots.last().copied().unwrap_or(self.next_slot);
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
        };
        // SAFETY: the host range [host_addr, host_addr + size) is a live mapping owned by guest memory or a
        // pmem region that outlives the VM (both are kept alive until the VM is dropped).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
            VmError::MemorySlot {
                slot,
                gpa,
                size,
                source,
            }
        })?;
        if self.free_slots.last() == Some(&slot) {
            self.free_slots.pop();
        } else {
            self.next_slot += 1;
        }
        Ok(slot)
    }

    /// Delete memory slot `slot` (a hot-removed region's): the guest no longer reaches the host range.
    pub fn remove_slot(&mut self, slot: u32, gpa: u64) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a size of 0 deletes the slot; KVM keeps no reference to any host range afterwards.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
            VmError::MemorySlot {
                slot,
                gpa,
                size: 0,
                source,
            }
        })?;
        self.free_slots.push(slot);
        Ok(())
    }
}
