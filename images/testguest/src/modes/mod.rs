//! What the guest does after checking its BootInfo: the probe (always), the pmem modes (`pmem=...`) and the agent modes
//! (`agent=...`).

pub mod agent;
pub mod bench;
pub mod flood;
pub mod hotplug;
pub mod kernels;
pub mod malformed;
pub mod pci_hostile;
pub mod pmem;
pub mod probe;
pub mod readonly;
pub mod write;
