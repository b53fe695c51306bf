//! What the guest does after checking its BootInfo: the probe (always) and the pmem modes (`pmem=...`).

pub mod bench;
pub mod kernels;
pub mod malformed;
pub mod pmem;
pub mod probe;
pub mod readonly;
pub mod write;
