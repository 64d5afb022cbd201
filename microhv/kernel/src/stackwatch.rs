//! microhv's stack: its high-water mark and its guard page. At boot the
//! unused part of the stack is filled with a pattern; at power-off microhv
//! reports how deep the stack went, the evidence behind its size (`boot.rs`,
//! `.bss`). The page below the stack (the last boot page-directory page,
//! unused once microhv's own tables are loaded) is left unmapped, so an
//! overflow faults (a double fault, on its own IST stack) instead of
//! silently overwriting other data.

use core::ptr::{addr_of, read_volatile, write_volatile};

const PATTERN: u64 = 0x5a5a_5a5a_5a5a_5a5a;

extern "C" {
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
}

fn bounds() -> (u64, u64) {
    // Linker symbols: only their addresses are used.
    (addr_of!(boot_stack_bottom) as u64, addr_of!(boot_stack_top) as u64)
}

/// Fills the stack below the caller's frame with the pattern.
pub fn paint() {
    let (bottom, _) = bounds();
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    // Leave 1 KiB below RSP alone: the callees of this function use it.
    let end = rsp.saturating_sub(1024) & !7;
    let mut a = bottom;
    while a < end {
        // SAFETY: [bottom, end) is the part of the boot stack below the
        // current frame and its callees: unused now, 8-byte aligned.
        unsafe { write_volatile(a as *mut u64, PATTERN) };
        a += 8;
    }
}

/// Bytes of the boot stack ever used, and its size.
pub fn high_water() -> (u64, u64) {
    let (bottom, top) = bounds();
    let mut a = bottom;
    // SAFETY: reads within the boot stack, below the live frames.
    while a < top && unsafe { read_volatile(a as *const u64) } == PATTERN {
        a += 8;
    }
    (top - a, top - bottom)
}

/// The unmapped page right below the stack.
pub fn guard_page() -> u64 {
    bounds().0 - 4096
}
