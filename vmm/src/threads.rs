//! Every VMM thread starts here: [`spawn`] names it, drops the capabilities start-up needed and installs the
//! thread's seccomp filter before the thread touches guest or operator input, and the panic policy applies to
//! it (and to every other thread of the process, the device crate's flush workers and tokio's blocking pool
//! included): a panic is one error line naming the thread and the panic, and the VM stops cleanly (vCPUs
//! stopped, in-flight flushes answered, final fdatasync), exit status 1.
//!
//! The policy is a process-wide panic hook rather than a `catch_unwind` per thread, so it also covers threads
//! this crate does not spawn; the main thread (the event loop) is caught by [`crate::vmm::Vmm::run`].

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;

use crate::seccomp::{self, ThreadKind};
use crate::vstate::vcpu::{RunState, StopReason};

/// The VM a panic stops (set once the VM's run state exists).
static STOP_TARGET: OnceLock<Mutex<Weak<RunState>>> = OnceLock::new();

/// Makes a panic on any thread stop the VM `state` belongs to. Idempotent; a later VM replaces the target.
pub fn install_panic_policy(state: &Arc<RunState>) {
    let target = STOP_TARGET.get_or_init(|| {
        std::panic::set_hook(Box::new(on_panic));
        Mutex::new(Weak::new())
    });
    *target.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(state);
}

fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    let thread = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    let what = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let message = format!("{what}{at}");
    tracing::error!(thread = %thread, "thread '{thread}' panicked: {message}; stopping the VM");
    let state = STOP_TARGET
        .get()
        .and_then(|t| t.lock().unwrap_or_else(|p| p.into_inner()).upgrade());
    if let Some(state) = state {
        state.request_stop(StopReason::ThreadPanic { thread, message });
    }
}

/// Starts `body` on a thread named `name` that first drops capabilities and installs the filter of `kind`.
/// A thread that cannot set itself up does not run `body`: it logs why and stops the VM.
pub fn spawn<T, F>(name: &str, kind: ThreadKind, body: F) -> std::io::Result<JoinHandle<Option<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_prepared(name, kind, || Ok(()), body)
}

/// As [`spawn`], with `prepare` run on the new thread before its capabilities are dropped and its filter
/// installed (the host guard routes its lease signal to itself there).
pub fn spawn_prepared<T, P, F>(
    name: &str,
    kind: ThreadKind,
    prepare: P,
    body: F,
) -> std::io::Result<JoinHandle<Option<T>>>
where
    P: FnOnce() -> Result<(), String> + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let owned = name.to_owned();
    std::thread::Builder::new()
        .name(owned.clone())
        .spawn(move || {
            let setup =
                prepare().and_then(|()| seccomp::apply_for_thread(kind).map_err(|e| e.to_string()));
            if let Err(e) = setup {
                tracing::error!(thread = %owned, "thread not started: {e}");
                stop_target_now(StopReason::VmmError(format!(
                    "thread '{owned}' could not start: {e}"
                )));
                return None;
            }
            inject_test_panic(&owned);
            Some(body())
        })
}

fn stop_target_now(reason: StopReason) {
    if let Some(state) = STOP_TARGET
        .get()
        .and_then(|t| t.lock().unwrap_or_else(|p| p.into_inner()).upgrade())
    {
        state.request_stop(reason);
    }
}

/// Test-only fault injection (debug builds only; release builds do not have it): `DAXVISOR_TEST_PANIC=NAME`
/// makes the thread named NAME panic as soon as it is set up, to prove the panic policy end to end. Threads not
/// started here (a device's flush worker) call it from their own start.
#[cfg(debug_assertions)]
pub(crate) fn inject_test_panic(name: &str) {
    if std::env::var("DAXVISOR_TEST_PANIC").is_ok_and(|v| v == name) {
        panic!("injected by DAXVISOR_TEST_PANIC");
    }
}

#[cfg(not(debug_assertions))]
pub(crate) fn inject_test_panic(_name: &str) {}

/// Joins a thread started by [`spawn`]; a panic was already reported by the hook.
pub fn join<T>(name: &str, handle: JoinHandle<Option<T>>) -> Option<T> {
    match handle.join() {
        Ok(v) => v,
        Err(_) => {
            tracing::debug!(thread = name, "joined a thread that panicked");
            None
        }
    }
}
