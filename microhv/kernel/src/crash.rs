//! What happens when microhv itself fails: a readable crash report for CPU
//! exceptions and Rust panics, then power-off with the CRASH exit code.

use crate::console::RawConsole;
use crate::trap::{TrapFrame, EXCEPTION_NAMES};
use core::fmt::Write;
use shared_abi::exit;
use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};

/// A CPU exception in the hypervisor: print everything useful and stop.
pub fn exception(f: &TrapFrame) -> ! {
    let mut c = RawConsole;
    let name = EXCEPTION_NAMES[f.vector as usize & 31];
    let cr2 = Cr2::read_raw();
    let (cr3, _) = Cr3::read_raw();
    let _ = write!(
        c,
        "\n*** microhv CRASH: exception {} ({name}), error code {:#x}\n",
        f.vector, f.error_code
    );
    if f.vector == 14 {
        let e = f.error_code;
        let _ = writeln!(
            c,
            "    page fault at CR2={cr2:#018x}: {} {} from ring {}{}",
            if e & 1 != 0 { "protection violation" } else { "page not present" },
            if e & 0x10 != 0 { "on instruction fetch" } else if e & 2 != 0 { "on write" } else { "on read" },
            f.cs & 3,
            if e & 8 != 0 { ", reserved bit set" } else { "" },
        );
    }
    let guard = crate::stackwatch::guard_page();
    if matches!(f.vector, 8 | 14) && (guard..guard + 4096).contains(&cr2) {
        let _ = writeln!(c, "    microhv's stack overflowed: CR2={cr2:#x} is its guard page (the stack starts at {:#x})", guard + 4096);
    }
    let _ = writeln!(c, "    RIP={:#018x} CS={:#06x} RFLAGS={:#018x}", f.rip, f.cs, f.rflags);
    let _ = writeln!(c, "    RSP={:#018x} SS={:#06x}", f.rsp, f.ss);
    let _ = writeln!(
        c,
        "    CR0={:#018x} CR2={cr2:#018x} CR3={:#018x} CR4={:#018x}",
        Cr0::read_raw(),
        cr3.start_address().as_u64(),
        Cr4::read_raw()
    );
    let regs = [
        ("RAX", f.rax), ("RBX", f.rbx), ("RCX", f.rcx), ("RDX", f.rdx),
        ("RSI", f.rsi), ("RDI", f.rdi), ("RBP", f.rbp), ("R8 ", f.r8),
        ("R9 ", f.r9), ("R10", f.r10), ("R11", f.r11), ("R12", f.r12),
        ("R13", f.r13), ("R14", f.r14), ("R15", f.r15),
    ];
    for row in regs.chunks(4) {
        let _ = write!(c, "   ");
        for (n, v) in row {
            let _ = write!(c, " {n}={v:#018x}");
        }
        let _ = writeln!(c);
    }
    let _ = writeln!(c, "*** stopping the machine (exit code: crash)");
    crate::power::off(exit::CRASH)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    x86_64::instructions::interrupts::disable();
    let mut c = RawConsole;
    let _ = writeln!(c, "\n*** microhv CRASH: panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = writeln!(c, "    at {}:{}", loc.file(), loc.line());
    }
    let _ = writeln!(c, "*** stopping the machine (exit code: crash)");
    crate::power::off(exit::CRASH)
}
