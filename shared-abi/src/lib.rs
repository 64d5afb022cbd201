//! shared-abi: the contract between microhv and its guests.
//!
//! Everything a guest needs to talk to microhv is here: the hypercall table
//! ([`hypercall`]), error codes ([`Errno`]), typed ids and addresses
//! ([`types`]), the layouts of the pages microhv shares with a guest
//! ([`start_info`], [`shared_info`]) and the ELF note that marks a PV image
//! ([`note`]). Guests call hypercalls through the stubs in the companion
//! crate `microhv-guest` (`shared-abi/guest`).
//!
//! Rule for every shared structure: `#[repr(C)]`, integers only (no `bool`,
//! enum or `Option` in memory a guest writes), and a compile-time check of its
//! size and field offsets next to it.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod blkif;
pub mod console;
pub mod device;
pub mod errno;
pub mod hypercall;
pub mod note;
pub mod ring;
pub mod shared_info;
pub mod start_info;
pub mod store;
pub mod types;

pub use errno::Errno;
pub use types::{DomId, Gfn, GuestVa, Mfn};

/// Version of this ABI: (major, minor). A guest built for another major
/// version is refused; a higher minor only adds hypercalls or features.
pub const ABI_VERSION: (u16, u16) = (1, 0);

/// `ABI_VERSION` packed as `major << 16 | minor`, as `version(VERSION_ABI)` returns it.
pub const fn abi_version_packed() -> u64 {
    ((ABI_VERSION.0 as u64) << 16) | ABI_VERSION.1 as u64
}

/// The interrupt vector PV guests (ring 1) use for hypercalls: `int 0x82`.
/// Its IDT gate has DPL 1, so `int 0x82` from ring 3 raises #GP instead.
pub const HYPERCALL_VECTOR: u8 = 0x82;

/// The guest-virtual region microhv reserves in every PV address space: the
/// last PML4 slot (the top 512 GiB). It holds only the entry area.
pub const HYPERVISOR_VA_START: u64 = 0xFFFF_FF80_0000_0000;

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
