//! microhv-core: the hypervisor's logic, kept free of hardware access so that
//! `cargo test` exercises it on the host. The bare-metal binary in
//! `microhv/kernel` wires these pieces to the real machine.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod builder;
pub mod cmdline;
pub mod ept;
pub mod evtchn;
pub mod frame;
pub mod grant;
pub mod hvm;
pub mod machine;
pub mod memmap;
pub mod multiboot;
pub mod paging;
pub mod pvmm;
pub mod range;
pub mod sched;
pub mod vmx;

/// Size of a base page / machine frame.
pub const PAGE_SIZE: u64 = 4096;
