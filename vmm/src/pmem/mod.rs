//! Persistent-memory regions: what backs a guest's pmem device on the host and how it is mapped.

pub mod kind;

pub use kind::BackingKind;
