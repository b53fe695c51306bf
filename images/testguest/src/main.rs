//! The test guest binary: ring-0 entry, ring-3 entry, panic handler and the C memory functions. See the
//! library's documentation for what it does.
#![no_std]
#![no_main]

mod boot;

/// Ring 3 starts here (from `iretq` in `boot::ring0`), with RDI = BootInfo address, RSI = map status and
/// RSP = top of the guest's stack minus 8 (as after a call).
extern "C" fn ring3_entry(boot_info: u64, map_status: u64) -> ! {
    testguest::exit::exit(testguest::run(boot_info, map_status))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    testguest::say!("FAIL panic: {info}");
    testguest::exit::exit(testguest::exit::code::PANIC)
}
