//! Live capacity: pmem regions added to and removed from a running VM (`--pmem-hotplug SIZE`, `POST /regions`,
//! `DELETE /regions/{id}`).
//!
//! - Guest-physical space for added regions is reserved at start after the `--pmem` regions
//!   ([`HotplugSpace`]); each added region takes an aligned piece of it and gives it back when removed.
//! - The running VM's pieces (KVM memory slots, the device manager, the event loop) belong to the main thread.
//!   An action (on the API's blocking threads) opens and checks the backing itself, then queues a [`Request`]
//!   and wakes the event loop through an eventfd; the main thread serves the queue between rounds of events
//!   ([`HotplugServer::serve`]): only host work, never a wait for the guest. The guest's part (seeing the device,
//!   acknowledging its removal) happens through the register block in [`registers`], waited on by the action.
//! - Added regions are virtio-pci functions on bus 0 (the root bus is shared with the vCPUs' buses, so a
//!   function added later is reachable through the same ECAM and BAR windows).

pub mod registers;

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use daxvisor_devices::bus::Bus;
use daxvisor_mapper::{HostGuard, RegionId};
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberId};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoop, Subscriber};
use crate::pmem::attach::{attach_one, Attached, PmemError, VmParts};
use crate::pmem::Backing;
pub use registers::Eject;
use registers::{HotplugRegisters, SlotEvents};

/// The guest-physical space reserved for added regions.
pub struct HotplugSpace {
    pub base: u64,
    pub size: u64,
    alloc: Mutex<(AddressAllocator, u64)>,
}

impl HotplugSpace {
    pub fn new(base: u64, size: u64) -> Result<Self, vm_allocator::Error> {
        Ok(HotplugSpace {
            base,
            size,
            alloc: Mutex::new((AddressAllocator::new(base, size)?, 0)),
        })
    }

    fn alloc(&self) -> std::sync::MutexGuard<'_, (AddressAllocator, u64)> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A window of `size` bytes aligned to `align`; `None` when no free piece is large enough.
    pub fn allocate(&self, size: u64, align: u64) -> Option<RangeInclusive> {
        let mut a = self.alloc();
        let r = a.0.allocate(size, align, AllocPolicy::FirstMatch).ok()?;
        a.1 += size;
        Some(r)
    }

    pub fn free(&self, range: &RangeInclusive) {
        let mut a = self.alloc();
        if a.0.free(range).is_ok() {
            a.1 = a.1.saturating_sub(range.len());
        }
    }

    /// Bytes handed out now.
    pub fn used(&self) -> u64 {
        self.alloc().1
    }
}

/// What the main thread is asked to do.
pub enum Request {
    /// Attach an opened, checked backing at `gpa` (memslot, lease manager, virtio-pci function).
    Attach {
        backing: Backing,
        gpa: u64,
        reply: Sender<(Backing, Result<Attached, PmemError>)>,
    },
    /// Take a region's device and memory slot out of the VM; the removed parts are handed back to be dropped
    /// off the main thread (dropping the device joins its flush worker).
    Detach {
        handles: Handles,
        reply: Sender<Detached>,
    },
}

/// What an added region holds in the VM, for its removal.
#[derive(Clone, Copy, Debug)]
pub struct Handles {
    pub memslot: u32,
    pub subscriber: SubscriberId,
    pub pci_device: u8,
    pub window: (u64, u64),
}

/// The removed device's parts, dropped by whoever asked.
pub struct Detached {
    pub parts: Vec<Box<dyn Send>>,
}

/// What the actions use: the reserved space, the slot events, the request queue, and the added regions.
pub struct Hotplug {
    pub space: HotplugSpace,
    pub slots: Arc<SlotEvents>,
    pub guard: Arc<HostGuard>,
    /// The agent channel: an added region is announced to a guest agent that asked for it.
    pub routes: Arc<crate::agent::Routes>,
    queue: Mutex<Sender<Request>>,
    wake: EventFd,
    added: Mutex<HashMap<RegionId, Handles>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("cannot create the hotplug eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("hotplug space: {0}")]
    Space(vm_allocator::Error),
    #[error("hotplug registers: {0}")]
    Bus(#[from] daxvisor_devices::bus::BusError),
}

impl Hotplug {
    /// Queue `request` for the main thread and wake it. `false` if the VM is gone.
    pub fn request(&self, request: Request) -> bool {
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(request)
            .is_ok();
        sent && self.wake.write(1).is_ok()
    }

    pub fn record(&self, id: RegionId, handles: Handles) {
        self.added().insert(id, handles);
    }

    pub fn handles(&self, id: RegionId) -> Option<Handles> {
        self.added().get(&id).copied()
    }

    pub fn forget(&self, id: RegionId) {
        self.added().remove(&id);
    }

    fn added(&self) -> std::sync::MutexGuard<'_, HashMap<RegionId, Handles>> {
        self.added.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The main thread's end of the queue.
pub struct HotplugServer {
    rx: Receiver<Request>,
}

impl HotplugServer {
    /// Serve every queued request (called by the event loop between rounds).
    pub fn serve(&mut self, parts: &mut VmParts<'_>) {
        while let Ok(request) = self.rx.try_recv() {
            match request {
                Request::Attach {
                    backing,
                    gpa,
                    reply,
                } => {
                    let result = attach_one(&backing, gpa, parts);
                    // A caller that gave up drops the backing with the reply.
                    let _ = reply.send((backing, result));
                }
                Request::Detach { handles, reply } => {
                    let _ = reply.send(detach(&handles, parts));
                }
            }
        }
    }
}

fn detach(h: &Handles, parts: &mut VmParts<'_>) -> Detached {
    let mut out: Vec<Box<dyn Send>> = Vec::new();
    if let Some(pci) = parts.devices.pci.as_mut() {
        if let Some(t) = pci.remove_virtio_device(parts.vm.fd(), h.pci_device) {
            out.push(Box::new(t));
        }
    }
    if let Some(s) = parts.event_loop.remove_subscriber(h.subscriber) {
        out.push(Box::new(s));
    }
    if let Err(e) = parts.vm.remove_slot(h.memslot, h.window.0) {
        tracing::error!(
            slot = h.memslot,
            "cannot delete the memory slot of a removed region: {e}"
        );
    }
    Detached { parts: out }
}

/// Wakes the event loop when a request is queued; serving happens after the round.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.0.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch the hotplug queue: {e}");
        }
    }
}

/// Reserve `[base, base + size)`, put the register block on `pio` and the queue's waker on `event_loop`.
pub fn setup(
    base: u64,
    size: u64,
    pio: &mut Bus,
    event_loop: &mut EventLoop,
    guard: Arc<HostGuard>,
    routes: Arc<crate::agent::Routes>,
    notify: Option<EventFd>,
) -> Result<(Arc<Hotplug>, HotplugServer), HotplugError> {
    // Asked now, before the seccomp filters: the mapper classifies added regions' DMA pinnability with it.
    let _ = daxvisor_mapper::KernelVersion::running();
    let slots = SlotEvents::new(notify);
    pio.insert(
        Arc::new(Mutex::new(HotplugRegisters(slots.clone()))),
        registers::PORT,
        registers::LEN,
    )?;
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(HotplugError::EventFd)?;
    let waker: Subscriber = Arc::new(Mutex::new(Waker(
        wake.try_clone().map_err(HotplugError::EventFd)?,
    )));
    event_loop.add_subscriber(waker);
    let (tx, rx) = mpsc::channel();
    Ok((
        Arc::new(Hotplug {
            space: HotplugSpace::new(base, size).map_err(HotplugError::Space)?,
            slots,
            guard,
            routes,
            queue: Mutex::new(tx),
            wake,
            added: Mutex::new(HashMap::new()),
        }),
        HotplugServer { rx },
    ))
}
