//! Capabilities after start-up: daxvisor opens `/dev/kvm`, its backing files and their locks, and the host
//! guard's fanotify group while it holds every capability root has; once start-up is over a thread keeps only
//! [`KEPT`] and drops the rest from its effective, permitted and inheritable sets, its ambient set and its
//! bounding set, and sets no_new_privs (the `caps` crate does the capability calls).
//!
//! Capabilities belong to a thread, not to the process, and threads start during start-up (flush workers, the
//! guard, the agent service, the API...): each drops them on itself, first thing, in
//! [`crate::seccomp::apply_for_thread`], just before it installs its filter (the main thread does so at the end
//! of start-up, before the event loop runs). Threads those threads start later (the API's blocking pool)
//! inherit the reduced sets.
//!
//! A daxvisor that lacks a capability (not root, or root in a container with fewer) keeps what it has of
//! [`KEPT`]: nothing fails because of the drop. Without CAP_SETPCAP the bounding set stays as it is.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use caps::{CapSet, Capability};

/// What daxvisor keeps after start-up, and why: everything else it needs is done before the drop.
pub const KEPT: &[(Capability, &str)] = &[
    (
        Capability::CAP_IPC_LOCK,
        "pins lock their pages (mlock) beyond RLIMIT_MEMLOCK (VFIO DMA mappings count the same)",
    ),
    (
        Capability::CAP_LEASE,
        "the host guard re-arms the kernel write lease on backing files daxvisor does not own",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "the host guard reads a foreign opener's /proc/PID/syscall (its open flags)",
    ),
];

/// What the `host-guard` thread keeps besides [`KEPT`], and why; no other thread has it.
pub const KEPT_BY_GUARD: &[(Capability, &str)] = &[(
    Capability::CAP_LINUX_IMMUTABLE,
    "the host guard clears an immutable or append-only flag set on a running VM's backing file (chattr +i / +a \
     would otherwise make the guest's next write fault, or the VMM's next punch, fail)",
)];

/// The kept set as the `caps` crate spells it.
pub fn kept() -> HashSet<Capability> {
    KEPT.iter().map(|&(c, _)| c).collect()
}

/// The `host-guard` thread's kept set: [`KEPT`] and [`KEPT_BY_GUARD`].
pub fn kept_by_guard() -> HashSet<Capability> {
    KEPT.iter().chain(KEPT_BY_GUARD).map(|&(c, _)| c).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    #[error("dropping capabilities ({what}): {source}")]
    Caps {
        what: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
}

/// Set by [`init`]: the daxvisor binary drops capabilities; library users and unit tests do not.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Make every later [`drop_on_this_thread`] drop capabilities (the VMM calls it once, at start).
pub fn init() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// What every daxvisor thread does when start-up is over for it: [`drop_now`] (the `host-guard` thread:
/// [`drop_now_keeping`] [`kept_by_guard`]), once [`init`] has been called.
pub fn drop_on_this_thread(guard: bool) -> Result<(), PrivilegesError> {
    match (ENABLED.load(Ordering::SeqCst), guard) {
        (false, _) => Ok(()),
        (true, false) => drop_now(),
        (true, true) => drop_now_keeping(&kept_by_guard()),
    }
}

/// Keep only [`KEPT`] (what of it this thread has) on the calling thread, and set no_new_privs.
pub fn drop_now() -> Result<(), PrivilegesError> {
    drop_now_keeping(&kept())
}

/// Keep only `kept` (what of it this thread has) on the calling thread, and set no_new_privs.
pub fn drop_now_keeping(kept: &HashSet<Capability>) -> Result<(), PrivilegesError> {
    let err = |what| move |source| PrivilegesError::Caps { what, source };
    caps::clear(None, CapSet::Ambient).map_err(err("clearing the ambient set"))?;
    // The bounding set needs CAP_SETPCAP to shrink: drop it while it is still effective.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(err("reading the effective set"))?
    {
        let bounding =
            caps::read(None, CapSet::Bounding).map_err(err("reading the bounding set"))?;
        for cap in bounding.difference(kept) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(err("the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(err("clearing the inheritable set"))?;
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(err("reading the permitted set"))?;
    let keep: HashSet<Capability> = permitted.intersection(kept).copied().collect();
    // Effective first: it must stay within the permitted set at every step.
    caps::set(None, CapSet::Effective, &keep).map_err(err("the effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err("the permitted set"))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegesError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own (capabilities are per thread): drop, then read back every set.
    #[test]
    fn a_thread_keeps_only_the_kept_set_and_other_threads_are_untouched() {
        let before = caps::read(None, CapSet::Permitted).unwrap();
        let after = std::thread::spawn(|| {
            drop_now().unwrap();
            let sets = [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable]
                .map(|s| caps::read(None, s).unwrap());
            let bounding = caps::read(None, CapSet::Bounding).unwrap();
            // SAFETY: prctl with integer arguments only.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            (sets, bounding, nnp)
        })
        .join()
        .unwrap();
        let expect: HashSet<Capability> = before.intersection(&kept()).copied().collect();
        let ([eff, prm, inh], bnd, nnp) = after;
        assert_eq!(eff, expect);
        assert_eq!(prm, expect);
        assert!(inh.is_empty());
        if before.contains(&Capability::CAP_SETPCAP) {
            assert_eq!(bnd, kept());
        }
        assert_eq!(nnp, 1);
        // This thread still has what it had.
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), before);
    }
}
