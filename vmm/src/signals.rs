//! SIGINT and SIGTERM: the first one stops the VM cleanly (vCPUs stopped, queued guest flushes answered, a
//! final fdatasync of every writable region, counters logged; daxvisor then exits with 128 + the signal
//! number); a second one, for when that clean stop hangs, exits at once with [`EXIT_FORCED`].
//!
//! signal-hook's iterator does the async-signal-safe part (a self-pipe); the decisions are made on an ordinary
//! thread.
//!
//! Start-up: `daxvisor run` blocks both signals first thing ([`leave_to_signal_thread`] on the main thread,
//! before anything is created), so a signal during start-up is held pending, never acted on by its default
//! action (which would leave a `create=on` file behind). The signal thread unblocks them once it is ready;
//! a signal that came before then is handled at that moment and recorded by the handler itself
//! ([`StopSignals::signalled`]), and the start is then undone ([`StopSignals::refuse_start_if_signalled`]).

use std::sync::atomic::{AtomicUsize, Ordering};
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
    thread: Option<JoinHandle<Option<()>>>,
    /// The last stop signal received (0: none), set in the signal handler itself.
    signalled: Arc<AtomicUsize>,
}

/// A start that a stop signal cut short; what it had created was undone.
#[derive(Debug, thiserror::Error)]
#[error("{}: start interrupted; everything it had created was undone", name(*.0))]
pub struct Interrupted(pub i32);

impl StopSignals {
    /// Start watching; from now on SIGINT/SIGTERM no longer kill the process outright. Returns once the signal
    /// thread takes them: a signal sent before has been seen by then ([`StopSignals::signalled`]).
    pub fn install(state: Arc<RunState>) -> std::io::Result<StopSignals> {
        let signalled = Arc::new(AtomicUsize::new(0));
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register_usize(signal, signalled.clone(), signal as usize)?;
        }
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let thread = crate::threads::spawn(
            "signals",
            crate::seccomp::ThreadKind::Signals,
            move || {
                // Blocked since start-up (inherited): from here on they come to this thread. One pending now
                // is handled before the unblock returns.
                if let Err(e) = take_stop_signals() {
                    tracing::error!("cannot unblock SIGINT/SIGTERM on the signal thread: {e}");
                }
                let _ = ready_tx.send(());
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
            },
        )?;
        // The thread ends early only if its filter failed (the VM is then stopping anyway).
        let _ = ready.recv();
        Ok(StopSignals {
            handle,
            thread: Some(thread),
            signalled,
        })
    }

    /// The stop signal received so far, if any.
    pub fn signalled(&self) -> Option<i32> {
        match self.signalled.load(Ordering::SeqCst) {
            0 => None,
            s => i32::try_from(s).ok(),
        }
    }

    /// The last step of start-up before the guest runs: a stop signal received so far ends the start (the
    /// caller's undo list removes what it created) instead of starting a guest only to stop it.
    pub fn refuse_start_if_signalled(&self) -> Result<(), Interrupted> {
        match self.signalled() {
            Some(s) => Err(Interrupted(s)),
            None => Ok(()),
        }
    }
}

/// Unblocks SIGINT and SIGTERM on the calling thread (the signal thread).
fn take_stop_signals() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset/sigaddset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; SIGINT and SIGTERM are valid signal numbers.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, SIGINT);
        libc::sigaddset(&mut set, SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
