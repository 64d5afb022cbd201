//! The domu-kernel guest kernel binary.
//!
//! Foundation stage: microhv lists this image as a boot module but does not
//! run it yet; PV domains come with the next stage (see docs/SUPPORT.md).
//! The entry point therefore only parks the CPU.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("domu-kernel is a guest kernel: build it with `cargo xtask build`.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
use domu_core as _;

#[cfg(target_os = "none")]
#[no_mangle]
#[link_section = ".text._start"]
extern "C" fn _start() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
