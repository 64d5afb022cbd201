//! microhv-guest: what a PV guest kernel needs to run on microhv, written
//! only against `shared-abi`. A complete guest is a `main` function:
//!
//! ```text
//! #![no_std]
//! #![no_main]
//! use microhv_guest::{entry, println, StartInfo};
//! entry!(main);
//! fn main(si: &'static StartInfo) -> ! {
//!     println!("hello from {}", si.name());
//!     microhv_guest::shutdown(0)
//! }
//! ```
//!
//! Modules: [`hypercall`] (stubs generated from the shared-abi table),
//! [`console`], [`time`], [`traps`] (exceptions and event upcalls),
//! [`events`], [`mm`] (page-table walking and balloon helpers), heap.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod blkfront;
pub mod console;
pub mod events;
pub mod hypercall;
pub mod mm;
pub mod store;
pub mod time;
pub mod traps;

pub use shared_abi;
pub use shared_abi::start_info::StartInfo;
pub use shared_abi::{DomId, Errno, GuestVa, Mfn};

use core::sync::atomic::{AtomicU64, Ordering};

static START_INFO: AtomicU64 = AtomicU64::new(0);

/// The start_info page of this guest.
pub fn start_info() -> &'static StartInfo {
    let p = START_INFO.load(Ordering::Relaxed) as *const StartInfo;
    assert!(!p.is_null(), "start_info used before entry");
    // SAFETY: set once at entry to the address microhv passed, which stays
    // mapped (read-write, our own page) for the guest's whole life.
    unsafe { &*p }
}

/// start_info, if the guest has started (the console works before that too).
pub fn try_start_info() -> Option<&'static StartInfo> {
    let p = START_INFO.load(Ordering::Relaxed) as *const StartInfo;
    // SAFETY: as in start_info().
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Ends the domain: `reason` is `SHUTDOWN_POWEROFF` (0) or `SHUTDOWN_CRASH` (1).
pub fn shutdown(reason: u64) -> ! {
    loop {
        // SAFETY: sched_shutdown takes no pointers and does not return.
        let _ = unsafe { hypercall::sched_shutdown(reason) };
    }
}

#[cfg(target_os = "none")]
mod heap {
    use linked_list_allocator::LockedHeap;
    #[global_allocator]
    pub static HEAP: LockedHeap = LockedHeap::empty();
}

/// Sets up the heap over the guest's free initial pages
/// (`first_free_pfn .. nr_pages`), keeping `reserve_pages` at the end for
/// the caller (e.g. to balloon). Returns the heap's size in bytes.
#[cfg(target_os = "none")]
pub fn init_heap(si: &StartInfo, reserve_pages: u64) -> usize {
    let start = si.virt_base + si.first_free_pfn * 4096;
    let pages = si.nr_pages.saturating_sub(si.first_free_pfn).saturating_sub(reserve_pages);
    let size = (pages * 4096) as usize;
    // SAFETY: these pages are ours, mapped read-write by the domain builder,
    // unused by anything else (they follow the boot stack), and initialised once.
    unsafe { init_heap_at(start, size) };
    size
}

/// Sets up the heap over `size` bytes at `start` (a hybrid guest, which
/// has no PV boot layout, picks the range from its own memory map).
///
/// # Safety
/// The range must be mapped read-write, unused by anything else, and this
/// must be called once.
#[cfg(target_os = "none")]
pub unsafe fn init_heap_at(start: u64, size: usize) {
    // SAFETY: the caller's contract.
    unsafe { heap::HEAP.lock().init(start as *mut u8, size) };
}

/// Starts the runtime in a hybrid (PVHVM) guest: `si` is a start_info the
/// guest filled in from what microhv announces in CPUID (domain id,
/// `shared_info` and store frames at their identity-mapped addresses, store
/// port). The store port is unmasked; the guest delivers upcalls itself by
/// calling [`events::upcall`] from its event-channel vector.
#[cfg(feature = "hvm")]
pub fn start_hvm(si: &'static StartInfo) {
    START_INFO.store(si as *const StartInfo as u64, Ordering::Relaxed);
    if si.store_evtchn != 0 {
        events::unmask_port(si.store_evtchn as u32);
    }
}

/// Called by the `entry!` start code.
#[doc(hidden)]
pub fn __start(si: *const StartInfo) {
    START_INFO.store(si as u64, Ordering::Relaxed);
    let si = start_info();
    if !si.is_valid() {
        console::write_str("microhv-guest: bad start_info magic or ABI version\n");
        shutdown(shared_abi::hypercall::SHUTDOWN_CRASH);
    }
    traps::install();
    // The console and store ports wake us when Dom0 answers.
    for port in [si.console_evtchn, si.store_evtchn] {
        if port != 0 {
            events::unmask_port(port as u32);
        }
    }
    events::unmask_events();
}

/// Declares the guest's entry point: `_start` (RSI = start_info, RSP = boot
/// stack) calls `$main(&'static StartInfo) -> !`. Also emits the PV note.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        $crate::shared_abi::declare_pv_note!();

        #[no_mangle]
        #[link_section = ".text._start"]
        #[unsafe(naked)]
        extern "C" fn _start() -> ! {
            core::arch::naked_asm!("mov rdi, rsi", "and rsp, -16", "call {}", "ud2", sym __microhv_guest_start)
        }

        extern "C" fn __microhv_guest_start(si: *const $crate::StartInfo) -> ! {
            $crate::__start(si);
            let f: fn(&'static $crate::StartInfo) -> ! = $main;
            f($crate::start_info())
        }
    };
}

#[cfg(all(target_os = "none", not(feature = "hvm")))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {}", info.message());
    if let Some(l) = info.location() {
        println!("  at {}:{}", l.file(), l.line());
    }
    shutdown(shared_abi::hypercall::SHUTDOWN_CRASH)
}
