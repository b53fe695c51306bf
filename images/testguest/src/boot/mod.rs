//! What a freestanding binary needs besides its logic: the ring-0 entry and the C memory functions.

pub mod memfns;
pub mod ring0;

use super::ring3_entry;

/// The prebuilt `core` refers to the unwinding personality routine from its unwind tables, which unoptimised
/// builds keep. With panic=abort nothing ever unwinds, so this is never called; it only satisfies the linker.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
