//! The VMM's event loop (event-manager): the VM exit event and, as devices are added, their queue
//! notifications and control events. vCPU threads never block on it; it never runs guest I/O that can wait.

use std::sync::{Arc, Mutex};

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::epoll::EventSet;

use crate::vstate::vcpu::RunState;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event manager: {0}")]
    EventManager(#[from] event_manager::Error),
}

/// Watches the exit eventfd that vCPUs, the exit port and the i8042 signal.
struct ExitWatcher {
    state: Arc<RunState>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.state.stopper().eventfd().read();
            self.state.mark_stopping();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.state.stopper().eventfd(), EventSet::IN)) {
            tracing::error!("cannot watch the exit event: {e}");
        }
    }
}

pub struct EventLoop {
    manager: EventManager<Subscriber>,
    state: Arc<RunState>,
}

impl EventLoop {
    pub fn new(state: Arc<RunState>) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new()?;
        manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            state: state.clone(),
        })));
        Ok(EventLoop { manager, state })
    }

    /// Add a device's or controller's subscriber; its `init` registers the fds it wants.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) -> SubscriberId {
        self.manager.add_subscriber(subscriber)
    }

    /// Take a subscriber out (a hot-removed device's): its fds leave the epoll set; the caller drops it.
    pub fn remove_subscriber(&mut self, id: SubscriberId) -> Option<Subscriber> {
        self.manager.remove_subscriber(id).ok()
    }

    /// Run until the VM is stopping.
    pub fn run(&mut self) -> Result<(), EventLoopError> {
        self.run_serving(|_| {})
    }

    /// Run until the VM is stopping, calling `serve` after every round of events (requests other threads queued
    /// for the main thread, such as hot add and remove, are served there).
    pub fn run_serving(&mut self, mut serve: impl FnMut(&mut Self)) -> Result<(), EventLoopError> {
        while !self.state.stopping() {
            // A timeout bounds how long a missed wake-up could delay the stop.
            self.manager.run_with_timeout(100)?;
            serve(self);
        }
        Ok(())
    }
}
