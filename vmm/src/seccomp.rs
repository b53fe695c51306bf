//! Seccomp filters, one per kind of thread (seccompiler; the lists are Rust, as in Cloud Hypervisor). Each thread
//! installs its own filter before it handles guest or operator input: a vCPU before its first KVM_RUN, a flush
//! worker before its first flush, the event loop once every other thread is started. `--seccomp on` (the
//! default) kills the process on a syscall outside the thread's list, `log` lets it through and has the kernel
//! log it (audit type 1326: `dmesg`), `off` installs nothing. Installing a filter also sets no_new_privs.
//!
//! The lists are in `docs/security.md`; [`allowed`] is the source. Threads that other parts of daxvisor start
//! (the operator API, the agent service) call [`Filters::apply`] with their [`ThreadKind`] first thing.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a syscall outside a thread's list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process (SIGSYS).
    #[default]
    On,
    /// Allow it, and have the kernel log it.
    Log,
    /// No filters.
    Off,
}

/// The kinds of thread daxvisor runs, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the device register handlers it exits to.
    Vcpu,
    /// The main thread: the event loop (virtqueues, host guard), then the stop sequence.
    EventLoop,
    /// One per pmem device: fdatasync for the guest's flushes.
    FlushWorker,
    /// The host guard (`host-guard`): fanotify events and kernel lease breaks.
    Guard,
    /// Turns SIGINT/SIGTERM into a stop.
    Signals,
    /// The operator API server (HTTP over a Unix socket).
    Api,
    /// The guest agent service (its session thread and its slow-request worker).
    AgentService,
    /// Forwards host stdin to the guest console.
    ConsoleInput,
    /// Punches the ranges guests offered back, under a region's `auto` reclaim policy.
    Reclaim,
}

impl ThreadKind {
    /// Every kind, for building and documenting.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::FlushWorker,
        ThreadKind::Guard,
        ThreadKind::Signals,
        ThreadKind::Api,
        ThreadKind::AgentService,
        ThreadKind::ConsoleInput,
        ThreadKind::Reclaim,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter for {kind:?} threads: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("a {kind:?} thread: {source}")]
    Privileges {
        kind: ThreadKind,
        source: crate::privileges::PrivilegesError,
    },
    #[error("a {kind:?} thread blocking SIGINT/SIGTERM: {error}")]
    StopSignals {
        kind: ThreadKind,
        // vmm-sys-util's signal error is Display but not std::error::Error.
        error: vmm_sys_util::signal::Error,
    },
    #[error("installing the seccomp filter for a {kind:?} thread: {source}")]
    Apply {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// What every Rust thread needs: memory, locks, its own signals, logging, the end of the thread.
const COMMON: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_close, "close"),
    // Debug builds check a descriptor is open (F_GETFD) before closing it.
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_getpid, "getpid"),
    // signal-hook's handler wakes its thread through a socket, on whichever thread the signal lands.
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
];

/// The syscalls a thread of `kind` may make, with their names (for the docs and the logs).
pub fn allowed(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    let mut v = COMMON.to_vec();
    let extra: &[(i64, &str)] = match kind {
        ThreadKind::Vcpu => &[
            // Kicking a sibling out of KVM_RUN, and the end of the VM.
            (libc::SYS_tgkill, "tgkill"),
            // A passthrough device's configuration space and BARs: reads and writes at offsets of its fd.
            (libc::SYS_pread64, "pread64"),
            (libc::SYS_pwrite64, "pwrite64"),
        ],
        ThreadKind::EventLoop => &[
            (libc::SYS_epoll_wait, "epoll_wait"),
            (libc::SYS_epoll_pwait, "epoll_pwait"),
            (libc::SYS_epoll_ctl, "epoll_ctl"),
            (libc::SYS_fdatasync, "fdatasync"),
            (libc::SYS_fsync, "fsync"),
            (libc::SYS_fstat, "fstat"),
            (libc::SYS_newfstatat, "newfstatat"),
            (libc::SYS_statx, "statx"),
            (libc::SYS_fstatfs, "fstatfs"),
            (libc::SYS_fallocate, "fallocate"),
            (libc::SYS_ftruncate, "ftruncate"),
            (libc::SYS_lseek, "lseek"),
            (libc::SYS_timerfd_settime, "timerfd_settime"),
            (libc::SYS_tgkill, "tgkill"),
            (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
            (libc::SYS_munlock, "munlock"),
            (libc::SYS_mlock, "mlock"),
            // Hot add and remove (`--pmem-hotplug`), served between rounds of events: the new virtio-pci
            // function's eventfds, irqfds, ioeventfds and memory slot (ioctl, below), the host guard's mark on
            // its file, and its flush worker thread (which starts under this filter, drops its capabilities and
            // installs its own).
            (libc::SYS_eventfd2, "eventfd2"),
            (libc::SYS_fanotify_mark, "fanotify_mark"),
            // The guard's change watch knows a file by its handle.
            (libc::SYS_name_to_handle_at, "name_to_handle_at"),
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_clone, "clone"),
            (libc::SYS_set_robust_list, "set_robust_list"),
            (libc::SYS_rseq, "rseq"),
            (libc::SYS_prctl, "prctl"),
            (libc::SYS_capget, "capget"),
            (libc::SYS_capset, "capset"),
            (libc::SYS_seccomp, "seccomp"),
            (libc::SYS_sched_getaffinity, "sched_getaffinity"),
            // The new thread reads /proc/sys/kernel/cap_last_cap when it drops its capabilities.
            (libc::SYS_openat, "openat"),
            // At the end: the operator API's socket and its private directory are removed.
            (libc::SYS_unlink, "unlink"),
            (libc::SYS_unlinkat, "unlinkat"),
            (libc::SYS_rmdir, "rmdir"),
            (libc::SYS_renameat, "renameat"),
            (libc::SYS_rename, "rename"),
            // At stop, a backing file that lost its last name is copied to a recovery file beside it
            // (crate::pmem::recovery).
            (libc::SYS_openat, "openat"),
            (libc::SYS_copy_file_range, "copy_file_range"),
            (libc::SYS_pread64, "pread64"),
            (libc::SYS_pwrite64, "pwrite64"),
            // At the end: closing a passthrough device finds its group from sysfs.
            (libc::SYS_readlink, "readlink"),
            (libc::SYS_readlinkat, "readlinkat"),
            // The virtual IOMMU (`--device ...,iommu=on`): a guest's MAP of pmem is a pin (prepare, FIEMAP via
            // ioctl, populate and lock), made where the device's requests are answered.
            (libc::SYS_fadvise64, "fadvise64"),
            (libc::SYS_mincore, "mincore"),
            (libc::SYS_mlock2, "mlock2"),
        ],
        ThreadKind::FlushWorker => &[
            (libc::SYS_fdatasync, "fdatasync"),
            (libc::SYS_fsync, "fsync"),
            (libc::SYS_fstat, "fstat"),
            (libc::SYS_newfstatat, "newfstatat"),
            (libc::SYS_statx, "statx"),
        ],
        ThreadKind::Guard => &[
            // The fanotify group and its marks are made on the main thread at setup; this thread polls the group
            // and the lease signalfd, answers events (write, COMMON), reads /proc for the opener (openat, statx),
            // identifies the file (fstat), and runs whole-file breaks and kernel lease re-arms (fcntl, COMMON).
            (libc::SYS_openat, "openat"),
            (libc::SYS_fstat, "fstat"),
            (libc::SYS_newfstatat, "newfstatat"),
            (libc::SYS_statx, "statx"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_poll, "poll"),
            (libc::SYS_fstatfs, "fstatfs"),
            (libc::SYS_munlock, "munlock"),
            (libc::SYS_tgkill, "tgkill"),
            // A truncate by path is watched for (FAN_PRE_ACCESS) only while a foreign process holds the file;
            // a renamed file's new name is read from /proc/self/fd.
            (libc::SYS_fanotify_mark, "fanotify_mark"),
            (libc::SYS_readlink, "readlink"),
            (libc::SYS_readlinkat, "readlinkat"),
        ],
        ThreadKind::Signals => &[
            (libc::SYS_recvfrom, "recvfrom"),
            (libc::SYS_recvmsg, "recvmsg"),
            (libc::SYS_poll, "poll"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_rt_sigaction, "rt_sigaction"),
        ],
        ThreadKind::Api => &[
            (libc::SYS_accept4, "accept4"),
            (libc::SYS_recvfrom, "recvfrom"),
            (libc::SYS_recvmsg, "recvmsg"),
            (libc::SYS_sendmsg, "sendmsg"),
            (libc::SYS_shutdown, "shutdown"),
            (libc::SYS_epoll_wait, "epoll_wait"),
            (libc::SYS_epoll_pwait, "epoll_pwait"),
            (libc::SYS_epoll_ctl, "epoll_ctl"),
            (libc::SYS_epoll_create1, "epoll_create1"),
            (libc::SYS_eventfd2, "eventfd2"),
            (libc::SYS_getsockopt, "getsockopt"),
            (libc::SYS_setsockopt, "setsockopt"),
            // Layout changes run on the runtime's blocking pool (a change waits for holders): the pool's
            // threads start from this one, and the mapper probes and changes the backing file.
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_clone, "clone"),
            // The runtime reads the CPU quota (cgroup files) when it sizes its blocking pool.
            (libc::SYS_openat, "openat"),
            (libc::SYS_set_robust_list, "set_robust_list"),
            (libc::SYS_rseq, "rseq"),
            (libc::SYS_prctl, "prctl"),
            (libc::SYS_sched_getaffinity, "sched_getaffinity"),
            (libc::SYS_poll, "poll"),
            (libc::SYS_ppoll, "ppoll"),
            // Hot add and remove: a refused add removes the file `create=on` made; a removed region gets its
            // final fdatasync and its file's host-guard mark removed.
            (libc::SYS_unlink, "unlink"),
            (libc::SYS_unlinkat, "unlinkat"),
            (libc::SYS_fdatasync, "fdatasync"),
            (libc::SYS_fanotify_mark, "fanotify_mark"),
            // A hot add of a file another process locked names the holder (/proc/locks, /proc/PID/fdinfo).
            (libc::SYS_getdents64, "getdents64"),
            // A hot add runs the start's checks: a writer holding the file is named from /proc/PID/fd links, a
            // dangling symlink by its target.
            (libc::SYS_readlink, "readlink"),
            (libc::SYS_readlinkat, "readlinkat"),
        ],
        ThreadKind::ConsoleInput => &[],
        // A punch through the mapper: MAPPER_CHANGES is all it needs.
        ThreadKind::Reclaim => &[],
        ThreadKind::AgentService => &[
            (libc::SYS_recvfrom, "recvfrom"),
            (libc::SYS_recvmsg, "recvmsg"),
            (libc::SYS_sendmsg, "sendmsg"),
            (libc::SYS_epoll_wait, "epoll_wait"),
            (libc::SYS_epoll_pwait, "epoll_pwait"),
            (libc::SYS_epoll_ctl, "epoll_ctl"),
            (libc::SYS_poll, "poll"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_fdatasync, "fdatasync"),
            // Pins and prepares: probe the file, FIEMAP (ioctl), populate and lock the range.
            (libc::SYS_lseek, "lseek"),
            (libc::SYS_pread64, "pread64"),
            (libc::SYS_pwrite64, "pwrite64"),
            (libc::SYS_fsync, "fsync"),
            (libc::SYS_fadvise64, "fadvise64"),
            (libc::SYS_mincore, "mincore"),
            (libc::SYS_mlock, "mlock"),
            (libc::SYS_mlock2, "mlock2"),
        ],
    };
    v.extend_from_slice(extra);
    if !allowed_ioctls(kind).is_empty() {
        v.push((libc::SYS_ioctl, "ioctl"));
    }
    if matches!(
        kind,
        ThreadKind::Api | ThreadKind::AgentService | ThreadKind::Reclaim
    ) {
        v.extend_from_slice(MAPPER_CHANGES);
    }
    v
}

/// What a thread that asks the mapper for layout changes needs: probe the backing file, change its blocks or
/// size, and let go of a revoked pin's mlock.
const MAPPER_CHANGES: &[(i64, &str)] = &[
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_munlock, "munlock"),
];

/// ioctl requests, as the kernel defines them (checked against the `_IOC` encoding in the tests).
mod ioctl {
    /// `_IO(KVMIO, 0x80)`
    pub const KVM_RUN: u64 = 0xae80;
    /// `_IOR(KVMIO, 0x81, struct kvm_regs)`
    pub const KVM_GET_REGS: u64 = 0x8090_ae81;
    /// `_IOR(KVMIO, 0x83, struct kvm_sregs)`
    pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
    /// `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`
    pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    /// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`
    pub const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
    /// `_IOW(KVMIO, 0x76, struct kvm_irqfd)`
    pub const KVM_IRQFD: u64 = 0x4020_ae76;
    /// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`
    pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    /// `_IOWR('f', 11, struct fiemap)`
    pub const FS_IOC_FIEMAP: u64 = 0xc020_660b;
    /// `_IOR('f', 1, long)`
    pub const FS_IOC_GETFLAGS: u64 = daxvisor_mapper::FS_IOC_GETFLAGS;
    /// `_IOW('f', 2, long)`
    pub const FS_IOC_SETFLAGS: u64 = daxvisor_mapper::FS_IOC_SETFLAGS;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 5)`
    pub const VFIO_GROUP_UNSET_CONTAINER: u64 = 0x3b69;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 10)`
    pub const VFIO_DEVICE_SET_IRQS: u64 = 0x3b6e;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 11)`
    pub const VFIO_DEVICE_RESET: u64 = 0x3b6f;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 13)`
    pub const VFIO_IOMMU_MAP_DMA: u64 = 0x3b71;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 14)`
    pub const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3b72;
    /// `_IOW(KVMIO, 0xe1, struct kvm_device_attr)`
    pub const KVM_SET_DEVICE_ATTR: u64 = 0x4018_aee1;
}

/// The ioctl requests a thread of `kind` may issue: `ioctl` is allowed only with one of these as its request
/// (second argument), and not at all for a kind whose list is empty. Everything else daxvisor asks of KVM
/// (creating the VM, its memory, irqfds, ioeventfds, vCPU setup) happens at start, before any filter.
/// Terminal queries (`isatty`: TCGETS) also happen only at start (the log format, the prefault progress bar).
/// With a passthrough device (`--device vfio=`): the agent maps and unmaps the DMA pins guests ask for; every
/// thread that can end a DMA pin (a revoke from the API, reclaim or the guard, an owner's end) unmaps it; a vCPU
/// turns MSI-X on and off as the guest programs the device; the stop sequence resets the device and takes its
/// group out of the container (and out of KVM's VFIO device).
pub fn allowed_ioctls(kind: ThreadKind) -> &'static [(u64, &'static str)] {
    match kind {
        ThreadKind::Vcpu => &[
            (ioctl::KVM_RUN, "KVM_RUN"),
            // The register dump of a guest crash report.
            (ioctl::KVM_GET_REGS, "KVM_GET_REGS"),
            (ioctl::KVM_GET_SREGS, "KVM_GET_SREGS"),
            // With --transport pci: a guest unmasking an MSI-X vector or changing its message (a table write
            // exits to the vCPU) routes the vector's GSI (vmm/src/pci/msi_routing.rs).
            (ioctl::KVM_SET_GSI_ROUTING, "KVM_SET_GSI_ROUTING"),
            (ioctl::VFIO_DEVICE_SET_IRQS, "VFIO_DEVICE_SET_IRQS"),
            // A passthrough BAR's memory slot follows the guest's decoding of it (vmm/src/vfio/bar_map.rs).
            (
                ioctl::KVM_SET_USER_MEMORY_REGION,
                "KVM_SET_USER_MEMORY_REGION",
            ),
        ],
        // Pins and prepares check the file's extents; DMA pins map and unmap.
        ThreadKind::AgentService => &[
            (ioctl::FS_IOC_FIEMAP, "FS_IOC_FIEMAP"),
            (ioctl::VFIO_IOMMU_MAP_DMA, "VFIO_IOMMU_MAP_DMA"),
            (ioctl::VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA"),
        ],
        // A backing file's immutable or append-only flag is read and cleared (`chattr`); a revoke ends a DMA pin.
        ThreadKind::Guard => &[
            (ioctl::FS_IOC_GETFLAGS, "FS_IOC_GETFLAGS"),
            (ioctl::FS_IOC_SETFLAGS, "FS_IOC_SETFLAGS"),
            (ioctl::VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA"),
        ],
        // An access fault is explained with the file's flags. Hot add and remove (`--pmem-hotplug`): the
        // region's memory slot, its function's MSI-X irqfds and GSI routes, its queue notifications. Passthrough
        // devices are torn down at the end.
        ThreadKind::EventLoop => &[
            (ioctl::FS_IOC_GETFLAGS, "FS_IOC_GETFLAGS"),
            (
                ioctl::KVM_SET_USER_MEMORY_REGION,
                "KVM_SET_USER_MEMORY_REGION",
            ),
            (ioctl::KVM_IRQFD, "KVM_IRQFD"),
            (ioctl::KVM_IOEVENTFD, "KVM_IOEVENTFD"),
            (ioctl::KVM_SET_GSI_ROUTING, "KVM_SET_GSI_ROUTING"),
            (ioctl::VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA"),
            (ioctl::VFIO_DEVICE_SET_IRQS, "VFIO_DEVICE_SET_IRQS"),
            (ioctl::VFIO_DEVICE_RESET, "VFIO_DEVICE_RESET"),
            (
                ioctl::VFIO_GROUP_UNSET_CONTAINER,
                "VFIO_GROUP_UNSET_CONTAINER",
            ),
            (ioctl::KVM_SET_DEVICE_ATTR, "KVM_SET_DEVICE_ATTR"),
            // The virtual IOMMU's MAP and UNMAP: container maps of guest RAM, DMA pins of pmem.
            (ioctl::VFIO_IOMMU_MAP_DMA, "VFIO_IOMMU_MAP_DMA"),
            (ioctl::FS_IOC_FIEMAP, "FS_IOC_FIEMAP"),
        ],
        // The API also asks the container whether an IOVA is mapped (a scratch page mapped and unmapped).
        ThreadKind::Api => &[
            (ioctl::VFIO_IOMMU_MAP_DMA, "VFIO_IOMMU_MAP_DMA"),
            (ioctl::VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA"),
        ],
        ThreadKind::Reclaim => &[(ioctl::VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA")],
        ThreadKind::FlushWorker | ThreadKind::Signals | ThreadKind::ConsoleInput => &[],
    }
}

/// `kind`'s rules for `ioctl`: one per allowed request, matching the request's 32 bits (the kernel's `cmd` is
/// an `unsigned int`).
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, SeccompError> {
    let err = |source| SeccompError::Build { kind, source };
    allowed_ioctls(kind)
        .iter()
        .map(|&(request, _)| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(err)?;
            SeccompRule::new(vec![cond]).map_err(err)
        })
        .collect()
}

/// Build the filter for `kind` under `mode`; `None` when `mode` is off.
pub fn build(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|(nr, _)| (nr, Vec::new()))
        .collect();
    if let Some(ioctl) = rules.get_mut(&libc::SYS_ioctl) {
        *ioctl = ioctl_rules(kind)?;
    }
    let err = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    Ok(Some(filter.try_into().map_err(err)?))
}

/// Every thread kind's filter, built once at start (so a thread only has to install its own).
#[derive(Clone, Debug)]
pub struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

impl Filters {
    pub fn new(mode: SeccompMode) -> Result<Filters, SeccompError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            if let Some(p) = build(kind, mode)? {
                programs.insert(kind, p);
            }
        }
        Ok(Filters { mode, programs })
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Install `kind`'s filter on the calling thread (nothing when seccomp is off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.get(&kind) {
            Some(p) => {
                seccompiler::apply_filter(p).map_err(|source| SeccompError::Apply { kind, source })
            }
            None => Ok(()),
        }
    }
}

/// The process's filters, set once at start by [`init`].
static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Build every filter for `mode` and make them the process's (the first call wins; later calls change nothing).
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    if FILTERS.get().is_none() {
        let _ = FILTERS.set(Filters::new(mode)?);
    }
    Ok(())
}

/// Drop the capabilities start-up needed ([`crate::privileges`]), leave SIGINT/SIGTERM to the signal thread
/// ([`crate::signals::leave_to_signal_thread`]) and install the filter for `kind` on the calling thread: what
/// every thread does before it handles guest or operator input. No capability is dropped before
/// [`crate::privileges::init`] and no filter installed before [`init`] (library use, unit tests) or with
/// `--seccomp off`.
pub fn apply_for_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    crate::privileges::drop_on_this_thread(kind == ThreadKind::Guard)
        .map_err(|source| SeccompError::Privileges { kind, source })?;
    if kind != ThreadKind::Signals {
        crate::signals::leave_to_signal_thread()
            .map_err(|error| SeccompError::StopSignals { kind, error })?;
    }
    match FILTERS.get() {
        Some(f) => f.apply(kind),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A harmless syscall that no thread's list allows.
    const FORBIDDEN: i64 = libc::SYS_uname;

    /// In a forked child: install `kind`'s filter, make the forbidden syscall, exit 0. Returns the wait status.
    fn try_forbidden(kind: ThreadKind, mode: SeccompMode) -> (libc::pid_t, libc::c_int) {
        let prog = build(kind, mode).unwrap().unwrap();
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, uname, _exit): nothing that allocates or
        // takes a lock another thread of this test process could have held at the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(2) };
            }
            let mut u = std::mem::MaybeUninit::<libc::utsname>::uninit();
            // SAFETY: uname writes into the buffer we own.
            unsafe { libc::syscall(FORBIDDEN, u.as_mut_ptr()) };
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        (pid, status)
    }

    /// The two tests that make the kernel log seccomp events run one at a time (its log is rate-limited).
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn every_thread_kind_is_killed_for_a_syscall_outside_its_list() {
        let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for kind in ThreadKind::ALL {
            assert!(allowed(kind).iter().all(|&(nr, _)| nr != FORBIDDEN));
            let (_, status) = try_forbidden(kind, SeccompMode::On);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    /// Has the kernel logged `pid` making the forbidden syscall? Waits up to a second.
    fn logged(pid: libc::pid_t) -> bool {
        let want = format!("pid={pid} ");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            let out = std::process::Command::new("dmesg").output().unwrap();
            let log = String::from_utf8_lossy(&out.stdout);
            let seen = log.lines().any(|l| {
                l.contains("type=1326")
                    && l.contains(&want)
                    && l.contains(&format!("syscall={FORBIDDEN} "))
            });
            if seen {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    }

    #[test]
    fn in_log_mode_the_syscall_runs_and_the_kernel_logs_it() {
        let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for kind in ThreadKind::ALL {
            // The kernel rate-limits these log lines (printk without auditd): a dropped line is retried.
            let mut attempts = 0;
            loop {
                let (pid, status) = try_forbidden(kind, SeccompMode::Log);
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{kind:?}: status {status:#x}"
                );
                if logged(pid) {
                    break;
                }
                attempts += 1;
                assert!(attempts < 8, "{kind:?}: no seccomp log line in dmesg");
            }
        }
    }

    /// In a forked child: install `kind`'s filter and issue `request` on a descriptor that is not open (so an
    /// allowed request fails with EBADF and does nothing), then exit 0. Returns the wait status.
    fn try_ioctl(kind: ThreadKind, request: u64) -> libc::c_int {
        let prog = build(kind, SeccompMode::On).unwrap().unwrap();
        // SAFETY: as in `try_forbidden`: the child only makes raw syscalls.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: an ioctl on a descriptor that is not open: the kernel answers EBADF, nothing is read.
            let rc = unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
            let ebadf =
                rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
            // SAFETY: as above.
            unsafe { libc::_exit(if ebadf { 0 } else { 3 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        status
    }

    /// A terminal query (what `isatty` issues): in no thread's list.
    const TCGETS: u64 = 0x5401;

    #[test]
    fn every_thread_kind_is_killed_for_an_ioctl_request_outside_its_list() {
        for kind in ThreadKind::ALL {
            assert!(allowed_ioctls(kind).iter().all(|&(r, _)| r != TCGETS));
            let status = try_ioctl(kind, TCGETS);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: TCGETS: status {status:#x}"
            );
            // A request of another thread kind is refused too: the vCPU's KVM_RUN anywhere else.
            if kind != ThreadKind::Vcpu {
                let status = try_ioctl(kind, ioctl::KVM_RUN);
                assert!(
                    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                    "{kind:?}: KVM_RUN: status {status:#x}"
                );
            }
        }
    }

    #[test]
    fn every_listed_ioctl_request_passes_its_threads_filter() {
        for kind in ThreadKind::ALL {
            for &(request, name) in allowed_ioctls(kind) {
                let status = try_ioctl(kind, request);
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{kind:?}: {name}: status {status:#x}"
                );
            }
        }
    }

    #[test]
    fn ioctl_numbers_match_their_ioc_encoding() {
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};
        ioctl_io_nr!(kvm_run, kvm_bindings::KVMIO, 0x80);
        ioctl_ior_nr!(
            kvm_get_regs,
            kvm_bindings::KVMIO,
            0x81,
            kvm_bindings::kvm_regs
        );
        ioctl_ior_nr!(
            kvm_get_sregs,
            kvm_bindings::KVMIO,
            0x83,
            kvm_bindings::kvm_sregs
        );
        /// `struct fiemap` without its flexible array of extents.
        #[allow(dead_code)]
        struct Fiemap([u64; 2], [u32; 4]);
        ioctl_iowr_nr!(fs_ioc_fiemap, b'f' as u32, 11, Fiemap);
        assert_eq!(kvm_run(), ioctl::KVM_RUN);
        assert_eq!(kvm_get_regs(), ioctl::KVM_GET_REGS);
        assert_eq!(kvm_get_sregs(), ioctl::KVM_GET_SREGS);
        vmm_sys_util::ioctl_iow_nr!(
            kvm_set_gsi_routing,
            kvm_bindings::KVMIO,
            0x6a,
            kvm_bindings::kvm_irq_routing
        );
        assert_eq!(kvm_set_gsi_routing(), ioctl::KVM_SET_GSI_ROUTING);
        vmm_sys_util::ioctl_iow_nr!(
            kvm_set_user_memory_region,
            kvm_bindings::KVMIO,
            0x46,
            kvm_bindings::kvm_userspace_memory_region
        );
        vmm_sys_util::ioctl_iow_nr!(
            kvm_irqfd,
            kvm_bindings::KVMIO,
            0x76,
            kvm_bindings::kvm_irqfd
        );
        vmm_sys_util::ioctl_iow_nr!(
            kvm_ioeventfd,
            kvm_bindings::KVMIO,
            0x79,
            kvm_bindings::kvm_ioeventfd
        );
        assert_eq!(
            kvm_set_user_memory_region(),
            ioctl::KVM_SET_USER_MEMORY_REGION
        );
        assert_eq!(kvm_irqfd(), ioctl::KVM_IRQFD);
        assert_eq!(kvm_ioeventfd(), ioctl::KVM_IOEVENTFD);
        assert_eq!(fs_ioc_fiemap(), ioctl::FS_IOC_FIEMAP);
        const VFIO: u32 = b';' as u32;
        vmm_sys_util::ioctl_io_nr!(group_unset_container, VFIO, 100 + 5);
        vmm_sys_util::ioctl_io_nr!(device_set_irqs, VFIO, 100 + 10);
        vmm_sys_util::ioctl_io_nr!(device_reset, VFIO, 100 + 11);
        vmm_sys_util::ioctl_io_nr!(iommu_map_dma, VFIO, 100 + 13);
        vmm_sys_util::ioctl_io_nr!(iommu_unmap_dma, VFIO, 100 + 14);
        vmm_sys_util::ioctl_iow_nr!(
            kvm_set_device_attr,
            kvm_bindings::KVMIO,
            0xe1,
            kvm_bindings::kvm_device_attr
        );
        assert_eq!(group_unset_container(), ioctl::VFIO_GROUP_UNSET_CONTAINER);
        assert_eq!(device_set_irqs(), ioctl::VFIO_DEVICE_SET_IRQS);
        assert_eq!(device_reset(), ioctl::VFIO_DEVICE_RESET);
        assert_eq!(iommu_map_dma(), ioctl::VFIO_IOMMU_MAP_DMA);
        assert_eq!(iommu_unmap_dma(), ioctl::VFIO_IOMMU_UNMAP_DMA);
        assert_eq!(kvm_set_device_attr(), ioctl::KVM_SET_DEVICE_ATTR);
    }

    #[test]
    fn off_builds_nothing() {
        assert!(build(ThreadKind::Vcpu, SeccompMode::Off).unwrap().is_none());
        let f = Filters::new(SeccompMode::Off).unwrap();
        f.apply(ThreadKind::Vcpu).unwrap();
    }
}
