//! shared-abi: the contract between microhv and its guests.
//!
//! Foundation stage: only the boot-time constants shared by the hypervisor and
//! the tools. The hypercall table, `start_info` and `shared_info` arrive with
//! the PV-domains work (see `docs/SUPPORT.md`).
#![no_std]
#![forbid(unsafe_code)]

/// Version of this ABI. Major changes break guests; minor ones add features.
pub const ABI_VERSION: (u16, u16) = (0, 1);

/// Values microhv writes to QEMU's `isa-debug-exit` port (0xf4) when it stops.
/// QEMU exits with status `(value << 1) | 1`.
pub mod exit {
    pub const DEBUG_EXIT_PORT: u16 = 0xf4;
    /// Every check passed / every domain shut down cleanly.
    pub const SUCCESS: u8 = 0x10;
    /// A check failed or a domain ended badly.
    pub const FAILURE: u8 = 0x11;
    /// The hypervisor itself crashed (exception or panic).
    pub const CRASH: u8 = 0x12;

    /// The QEMU process status for a value written to the port.
    pub const fn qemu_status(value: u8) -> i32 {
        ((value as i32) << 1) | 1
    }
}
