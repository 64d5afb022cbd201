//! Exceptions and event upcalls, guest side. microhv bounces an exception
//! (or an upcall) to the handler registered with `set_trap_table` /
//! `set_callback`, on the ring-1 stack, with a hardware-like frame. The
//! handlers here save registers, call Rust, and return with the `iret`
//! hypercall.

use core::sync::atomic::{AtomicUsize, Ordering};
use shared_abi::hypercall::TrapInfo;
use shared_abi::GuestVa;

core::arch::global_asm!(
    r#"
    .section .text.guest_traps, "ax"
    .p2align 4
    .global microhv_guest_trap_stubs
microhv_guest_trap_stubs:
    .set vec, 0
    .rept 33
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp microhv_guest_trap_common
    .set vec, vec + 1
    .endr

microhv_guest_trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    cld
    call microhv_guest_trap
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp          /* vector and error code */
    push %rax              /* IretFrame: rax, rip, cs, rflags, rsp, ss */
    mov $18, %eax          /* IRET */
    int $0x82
    ud2
"#,
    options(att_syntax)
);

/// The vector number the upcall stub reports.
pub const UPCALL_VECTOR: u64 = 32;

/// What a guest exception handler sees.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" {
    static microhv_guest_trap_stubs: u8;
}

static HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs a function that gets every exception first. It may fix things
/// up and return (execution resumes at `frame.rip`, which it may change), or
/// not return at all (e.g. report and shut down).
pub fn set_exception_hook(f: fn(&mut ExceptionFrame)) {
    HOOK.store(f as usize, Ordering::SeqCst);
}

pub const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22", "23", "24", "25", "26", "27", "#HV", "#VC", "#SX", "31",
];

#[no_mangle]
extern "C" fn microhv_guest_trap(frame: &mut ExceptionFrame) {
    if frame.vector == UPCALL_VECTOR {
        crate::events::upcall();
        return;
    }
    let hook = HOOK.load(Ordering::SeqCst);
    if hook != 0 {
        // SAFETY: only `fn(&mut ExceptionFrame)` values are stored in HOOK.
        let f: fn(&mut ExceptionFrame) = unsafe { core::mem::transmute::<usize, fn(&mut ExceptionFrame)>(hook) };
        f(frame);
        return;
    }
    let name = NAMES[frame.vector as usize % 32];
    crate::println!(
        "unhandled exception {} ({name}) error {:#x} at rip {:#x} rsp {:#x}{}",
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.rsp,
        if frame.vector == 14 { alloc::format!(" cr2 {:#x}", crate::events::vcpu_info().cr2()) } else { alloc::string::String::new() }
    );
    crate::shutdown(shared_abi::hypercall::SHUTDOWN_CRASH)
}

/// Registers handlers for all 32 exception vectors and the event upcall.
pub(crate) fn install() {
    let base = core::ptr::addr_of!(microhv_guest_trap_stubs) as u64;
    let mut table = [TrapInfo::default(); 32];
    for (v, t) in table.iter_mut().enumerate() {
        t.vector = v as u8;
        t.handler = base + 16 * v as u64;
    }
    // SAFETY: the table is valid for 32 entries; the handlers are the stubs above.
    unsafe {
        let _ = crate::hypercall::set_trap_table(GuestVa(table.as_ptr() as u64), 32);
        let _ = crate::hypercall::set_callback(GuestVa(base + 16 * UPCALL_VECTOR));
    }
}
