//! MSI-X delivery through KVM: one GSI and one irqfd per vector, and the VM's GSI routing table.
//!
//! Each vector of each PCI device gets a GSI (from [`crate::layout::MSI_GSI_FIRST`]) and an `EventFd` registered as an
//! irqfd on it when the VM is built; raising the vector is a write to that EventFd from whichever thread used
//! the buffers (event loop, flush worker, vCPU). What the GSI delivers is the MSI message the guest programmed
//! in the MSI-X table, so the route is set (KVM_SET_GSI_ROUTING) when the guest unmasks a vector or changes its
//! message, on the vCPU thread that wrote the table. KVM_SET_GSI_ROUTING replaces the whole table, so every
//! call carries the in-kernel irqchip's default routes (GSI n to IOAPIC pin n, and the PICs below 16) as well
//! as every MSI route set so far.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use daxvisor_devices::pci::{MsiMessage, MsiSink};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC inputs of the in-kernel irqchip.
const IOAPIC_PINS: u32 = 24;
/// Lines the two cascaded PICs take.
const PIC_LINES: u32 = 16;

/// The VM's GSI routing table: the irqchip defaults plus the MSI routes the guest programmed.
pub struct MsiRouting {
    vm: VmFd,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl MsiRouting {
    /// Routing on `vm` through a duplicate of its file descriptor (so vCPU threads can set routes while the
    /// VMM owns the original).
    pub fn new(kvm: &Kvm, vm: &VmFd) -> std::io::Result<Self> {
        // SAFETY: dup of a live descriptor; the result is checked before use and owned by the new VmFd.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM descriptor that nothing else owns.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(fd) }.map_err(std::io::Error::from)?;
        Ok(MsiRouting {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        })
    }

    /// The full table for KVM_SET_GSI_ROUTING with `msi` routes.
    fn table(msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<KvmIrqRouting> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < PIC_LINES {
                let (chip, pin) = if gsi < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                entries.push(irqchip_entry(gsi, chip, pin));
            }
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, m) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            };
            entries.push(e);
        }
        KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))
    }

    /// Route `gsi` to `msg` (replacing its previous route) and hand KVM the whole table.
    pub fn set_msi(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        let old = msi.insert(gsi, msg);
        let result = Self::table(&msi).and_then(|t| {
            self.vm
                .set_gsi_routing(&t)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        if result.is_err() {
            // Keep the table as KVM has it.
            match old {
                Some(m) => msi.insert(gsi, m),
                None => msi.remove(&gsi),
            };
        }
        result
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

/// The MSI-X vectors of one device: a GSI and an irqfd each.
pub struct DeviceMsi {
    routing: Arc<MsiRouting>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl DeviceMsi {
    /// Vector n is `gsis[n]`; each gets an irqfd registered with KVM now.
    pub fn new(routing: Arc<MsiRouting>, vm: &VmFd, gsis: Vec<u32>) -> std::io::Result<Self> {
        let mut irqfds = Vec::with_capacity(gsis.len());
        for &gsi in &gsis {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_irqfd(&fd, gsi)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            irqfds.push(fd);
        }
        Ok(DeviceMsi {
            routing,
            gsis,
            irqfds,
        })
    }

    /// The irqfd of each vector, in vector order (a passthrough device signals these itself).
    pub fn irqfds(&self) -> &[EventFd] {
        &self.irqfds
    }
}

impl MsiSink for DeviceMsi {
    fn route(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        let gsi = *self
            .gsis
            .get(usize::from(vector))
            .ok_or_else(|| std::io::Error::other(format!("no GSI for MSI-X vector {vector}")))?;
        tracing::debug!(
            vector,
            gsi,
            address = format_args!("{:#x}", msg.address),
            data = format_args!("{:#x}", msg.data),
            "MSI-X route"
        );
        self.routing.set_msi(gsi, msg)
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(std::io::Error::other(format!(
                "no irqfd for MSI-X vector {vector}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_irqchip_defaults_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let t = MsiRouting::table(&msi).unwrap();
        let entries = t.as_slice();
        // 24 IOAPIC pins, 16 PIC lines, one MSI.
        assert_eq!(entries.len(), 24 + 16 + 1);
        let last = entries[entries.len() - 1];
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: type_ says this entry's union holds an MSI route.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
        let com1 = entries
            .iter()
            .filter(|e| e.gsi == 4)
            // SAFETY: every entry for GSI 4 is an irqchip route.
            .map(|e| unsafe { e.u.irqchip })
            .map(|c| (c.irqchip, c.pin))
            .collect::<Vec<_>>();
        assert_eq!(com1, [(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]);
    }
}
