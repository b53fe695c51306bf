//! SIGINT and SIGTERM: the first one stops the VM cleanly (vCPUs stopped, queued guest flushes answered, a
//! final fdatasync of every writable region, counters logged; daxvisor then exits with 128 + the signal
//! number); a second one, for when that clean stop hangs, exits at once with [`EXIT_FORCED`].
//!
//! signal-hook's iterator does the async-signal-safe part (a self-pipe); the decisions are made on an ordinary
//! thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::vstate::vcpu::{RunState, StopReason};

/// Exit status when a second SIGINT/SIGTERM forced an immediate exit (no final flush).
pub const EXIT_FORCED: u8 = 3;

/// The exit status after a clean stop on `signal`: the shell convention, 128 + the signal number.
pub fn exit_status_for(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Block SIGINT and SIGTERM on the calling thread: every daxvisor thread but the signal thread does so when it
/// starts (and the main thread at the end of start-up), so the kernel hands these signals to the signal thread.
/// Otherwise it may pick a thread that sleeps uninterruptibly (the main thread in a final fdatasync on a file
/// system that hangs), where the handler cannot run until that sleep ends, and the second signal that should
/// end a hung stop at once waits for the hang.
pub fn leave_to_signal_thread() -> Result<(), vmm_sys_util::signal::Error> {
    for signal in [SIGINT, SIGTERM] {
        match vmm_sys_util::signal::block_signal(signal) {
            Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The thread that turns SIGINT/SIGTERM into a VM stop. Dropping it stops watching (the default actions
/// return only when the process exits; nothing runs after the VM then).
pub struct StopSignals {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl StopSignals {
    /// Start watching; from now on SIGINT/SIGTERM no longer kill the process outright.
    pub fn install(state: Arc<RunState>) -> std::io::Result<StopSignals> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply_for_thread(crate::seccomp::ThreadKind::Signals) {
                    tracing::error!("{e}");
                    state.request_stop(StopReason::VmmError(e.to_string()));
                    return;
                }
                let mut seen = 0;
                for signal in signals.forever() {
                    seen += 1;
                    if seen == 1 {
                        tracing::warn!(
                            "{}: stopping the VM (a second signal exits at once, without the final flush)",
                            name(signal)
                        );
                        state.request_stop(StopReason::Signal(signal));
                    } else {
                        tracing::error!(
                            signal = name(signal),
                            exit_status = EXIT_FORCED,
                            "second signal: exiting now, without the final flush"
                        );
                        std::process::exit(i32::from(EXIT_FORCED));
                    }
                }
            })?;
        Ok(StopSignals {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
