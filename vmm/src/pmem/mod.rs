//! Persistent-memory regions: what backs a guest's pmem device on the host and how it is mapped.
//!
//! - [`config`]: the `--pmem` option.
//! - [`backing`]: open, check, detect the kind, map ([`Backing`]).
//! - [`attach`](mod@attach): placing the regions in a VM (memslots, virtio-pmem devices).
//! - [`prefault`]: `prefault=on`, populating a region before the guest starts.
//! - [`flush`]: what a guest flush request does for each kind ([`BackingFlush`]).
//! - [`fault`]: naming the region, file and offset behind a KVM_RUN EFAULT.
//! - [`recovery`]: at stop, copying a backing file that lost its last name to a recovery file beside it.
//!
//! The backing kind ([`BackingKind`]) and every probe of a host file come from the mapper crate.

pub mod attach;
pub mod backing;
pub mod config;
pub mod fault;
pub mod flush;
pub mod prefault;
pub mod recovery;

pub use attach::{attach, PmemError};
pub use backing::{Backing, BackingError, PmemMemslot};
pub use config::{DmaPolicy, IommuPolicy, PmemConfig};
pub use daxvisor_mapper::BackingKind;
pub use flush::{BackingFlush, FlushAction};
