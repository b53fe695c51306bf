//! Opaque identifiers. Each is a number the mapper hands out and never reuses; callers carry them across a wire
//! (the agent protocol, the operator API) with `to_raw`/`from_raw`. A raw number the mapper never handed out
//! names nothing: every call with one answers ENOENT.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u64);

        impl $name {
            /// The number to carry across a wire.
            pub const fn to_raw(self) -> u64 {
                self.0
            }

            /// The id a wire carried; an unknown one names nothing (ENOENT wherever it is used).
            pub const fn from_raw(raw: u64) -> Self {
                $name(raw)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, ":{}"), self.0)
            }
        }
    };
}

id_type!(
    /// Who holds leases and pins: an agent session or an application behind it, a DMA context, the operator.
    /// `OwnerId::NONE` (raw 0) is "no owner": requests carrying it are refused with EINVAL.
    OwnerId,
    "owner"
);
id_type!(
    /// A window of a file that one device maps.
    RegionId,
    "region"
);
id_type!(
    /// A layout lease.
    LeaseId,
    "lease"
);
id_type!(
    /// A pin (an extent-stable, resident, possibly DMA-mapped range).
    PinId,
    "pin"
);
id_type!(
    /// A break in progress or past.
    BreakId,
    "break"
);

impl OwnerId {
    /// "No owner" (raw 0).
    pub const NONE: OwnerId = OwnerId::from_raw(0);
}
