//! The VM's virtio-console device: port 0 is the guest console (`--console`), port 1 the agent channel
//! (`org.daxvisor.agent.0`, served by [`crate::agent`]).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use daxvisor_devices::virtio::console::{Console, PortBackend, PortSender, PortSpec};
use daxvisor_mapper::Mapper;
use daxvisor_proto::agent::PORT_NAME;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::agent::{AgentPort, AgentService, Routes};
use crate::config::SerialOutput;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::EventLoop;

/// Errors building the console device or its agent service.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("virtio-console: {0}")]
    Device(#[from] DeviceError),
    #[error("cannot start the agent service: {0}")]
    Io(#[from] std::io::Error),
}

/// Port 0's output: what the guest writes to its console.
struct ConsoleOut(Box<dyn Write + Send>);

impl PortBackend for ConsoleOut {
    fn guest_wrote(&mut self, data: &[u8]) {
        // The console is best effort: a closed stdout must not take the VM down.
        let _ = self.0.write_all(data).and_then(|()| self.0.flush());
    }
}

/// What keeps the console's host side alive; dropping it ends the agent session (its owners release all).
pub struct ConsoleHandles {
    /// The agent service.
    pub agent: AgentService,
    /// Sends bytes to the guest's console input.
    pub console_input: PortSender,
    /// The device's counters.
    pub metrics: Arc<daxvisor_devices::virtio::console::ConsoleMetrics>,
}

impl ConsoleHandles {
    /// One line with the device's counters (at VM end).
    pub fn log_summary(&self) {
        let m = self.metrics.snapshot();
        tracing::info!(
            tx_bytes = m.tx_bytes,
            rx_bytes = m.rx_bytes,
            rx_dropped_messages = m.rx_dropped_messages,
            rx_dropped_bytes = m.rx_dropped_bytes,
            tx_truncated_bytes = m.tx_truncated_bytes,
            bad_control = m.bad_control,
            "virtio-console counters"
        );
    }
}

/// What the agent service serves: the VM's mapper, its regions as the guest sees them, and the routes its
/// notifier (given to the mapper) reads.
pub struct AgentSetup {
    pub mapper: Mapper,
    pub regions: Arc<crate::region_registry::RegionRegistry>,
    pub routes: Arc<Routes>,
    /// What the service counts (sessions, rejected frames).
    pub counters: Arc<crate::agent::AgentCounters>,
    /// The reclaim-offers table guests' offers go to.
    pub reclaim: Arc<crate::reclaim::Reclaim>,
}

/// Builds the virtio-console device (console + agent port), registers it and starts the agent service. `out`
/// is where the console writes (opened by the caller, which undoes a created file on a refused start);
/// `output` says what it is (stdout: host stdin becomes the console's input).
#[allow(clippy::too_many_arguments)]
pub fn attach(
    output: &SerialOutput,
    out: Box<dyn Write + Send>,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    event_loop: &mut EventLoop,
    agent: AgentSetup,
) -> Result<ConsoleHandles, ConsoleError> {
    let agent_port = AgentPort::new();
    let console = Console::new(
        "console",
        vec![
            PortSpec {
                name: None,
                console: true,
                backend: Box::new(ConsoleOut(out)),
            },
            PortSpec {
                name: Some(PORT_NAME.into()),
                console: false,
                backend: Box::new(agent_port.clone()),
            },
        ],
    )?;
    let (Some(console_input), Some(agent_out)) = (console.sender(0), console.sender(1)) else {
        return Err(std::io::Error::other("console device without its two ports").into());
    };
    agent_port.set_sender(agent_out.clone());
    let metrics = console.metrics();
    let (slot, subscriber) = devices.add_virtio_device(vm, mem, Box::new(console))?;
    event_loop.add_subscriber(subscriber);
    let agent = AgentService::start(
        agent.mapper,
        agent.regions,
        &agent_port,
        Arc::new(agent_out),
        agent.routes,
        agent.counters,
        agent.reclaim,
    )?;
    tracing::info!(
        base = format_args!("{:#x}", slot.base),
        irq = slot.irq,
        agent_port = PORT_NAME,
        "virtio-console attached"
    );
    if *output == SerialOutput::Stdout {
        forward_stdin(console_input.clone())?;
    }
    Ok(ConsoleHandles {
        agent,
        console_input,
        metrics,
    })
}

/// Host stdin to the guest console, on its own thread (it blocks in read). Input the guest does not take fast
/// enough is dropped (counted by the device), never buffered without bound.
fn forward_stdin(input: PortSender) -> std::io::Result<()> {
    let stdin = Arc::new(Mutex::new(std::io::stdin()));
    crate::threads::spawn(
        "console-stdin",
        crate::seccomp::ThreadKind::ConsoleInput,
        move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stdin.lock().map(|mut s| s.read(&mut buf)) {
                    Ok(Ok(0)) | Err(_) => return,
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(Err(_)) => return,
                };
                input.send(&buf[..n]);
            }
        },
    )?;
    Ok(())
}
