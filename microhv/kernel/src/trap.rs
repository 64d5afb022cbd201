//! Trap entry: one 16-byte stub per vector pushes the vector number (and a
//! zero error code where the CPU pushes none), then a common path saves the
//! registers into a [`TrapFrame`] and calls [`trap_dispatch`].

use core::arch::global_asm;

global_asm!(
    r#"
    .section .entry_data, "aw"
    .p2align 3
    .global entry_hv_cr3
    .global entry_next_cr3
    .global entry_hv_stack_top
/* CR3 of microhv's own address space, loaded on every entry from a guest. */
entry_hv_cr3: .quad 0
/* CR3 to load when returning to a guest (the running vCPU's). */
entry_next_cr3: .quad 0
/* Top of the private hypervisor stack (not mapped in any guest). */
entry_hv_stack_top: .quad 0

    /* TrapFrame order: RAX is pushed first (the guest path needs it as a
     * scratch register before the rest), then these, R15 last. */
    .macro SAVE_GPRS_AFTER_RAX
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
    .endm

    .macro RESTORE_GPRS_BEFORE_RAX
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
    .endm

    .section .entry_text, "ax"
    .p2align 4
    .global trap_stubs
trap_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp trap_common
    .set vec, vec + 1
    .endr

/* Stack now: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
trap_common:
    testb $3, 24(%rsp)
    jz from_ring0

    /* From a guest (ring 1 or 3), on the entry stack, in the guest's CR3.
     * Switch to microhv's address space first, then save the registers. */
    push %rax
    mov entry_hv_cr3(%rip), %rax
    mov %rax, %cr3
    SAVE_GPRS_AFTER_RAX
    /* The frame stays on the entry stack; the handler runs on the private stack. */
    mov %rsp, %rbx
    mov entry_hv_stack_top(%rip), %rsp
    mov %rbx, %rdi
    cld
    movabs $trap_dispatch, %rax
    call *%rax
    mov %rbx, %rsp
    .global exit_to_guest
exit_to_guest:
    RESTORE_GPRS_BEFORE_RAX
    mov entry_next_cr3(%rip), %rax
    mov %rax, %cr3
    pop %rax
    add $16, %rsp
    iretq

from_ring0:
    /* An interrupt or exception while microhv itself runs: same stack, same CR3. */
    push %rax
    SAVE_GPRS_AFTER_RAX
    mov %rsp, %rdi
    cld
    movabs $trap_dispatch, %rax
    call *%rax
    RESTORE_GPRS_BEFORE_RAX
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static trap_stubs: u8;
    static exit_to_guest: u8;
    static mut entry_hv_cr3: u64;
    static mut entry_next_cr3: u64;
    static mut entry_hv_stack_top: u64;
    static __entry_start: u8;
}

/// Where the entry area appears in every address space (guests' and ours).
pub const ENTRY_ALIAS: u64 = shared_abi::HYPERVISOR_VA_START;

/// The alias address of an entry-area symbol at identity address `addr`.
pub fn alias_of(addr: u64) -> u64 {
    ENTRY_ALIAS + (addr - core::ptr::addr_of!(__entry_start) as u64)
}

/// Identity address of the stub for vector 0; vector N's stub is at `+ 16 * N`.
pub fn stub_identity() -> u64 {
    core::ptr::addr_of!(trap_stubs) as u64
}

/// Sets the CR3 of microhv's own address space and its private stack.
pub fn set_hypervisor_context(cr3: u64, stack_top: u64) {
    // SAFETY: single CPU; written through the identity mapping while no entry
    // is in progress (interrupts are off during boot).
    unsafe {
        core::ptr::addr_of_mut!(entry_hv_cr3).write_volatile(cr3);
        core::ptr::addr_of_mut!(entry_hv_stack_top).write_volatile(stack_top);
    }
}

/// Sets the CR3 that the exit path loads before returning to a guest.
pub fn set_next_cr3(cr3: u64) {
    // SAFETY: single CPU; only the exit path reads it, after dispatch returns.
    unsafe { core::ptr::addr_of_mut!(entry_next_cr3).write_volatile(cr3) }
}

/// Enters a guest for the first time: `frame` (on the entry stack, by its
/// alias address) holds the guest's registers; `set_next_cr3` chose its CR3.
pub fn enter_guest(frame_alias: u64) -> ! {
    let exit = alias_of(core::ptr::addr_of!(exit_to_guest) as u64);
    // SAFETY: the frame is a complete TrapFrame at an address mapped in both
    // address spaces; exit_to_guest pops it, loads the guest CR3 and IRETQs
    // to ring 1. Nothing on the current stack is needed afterwards.
    unsafe {
        core::arch::asm!("mov rsp, {f}", "jmp {e}", f = in(reg) frame_alias, e = in(reg) exit, options(noreturn));
    }
}

/// Registers saved on trap entry, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TrapFrame {
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

pub const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved (31)",
];

#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if frame.cs & 3 != 0 {
        // From a PV guest (ring 1 or 3).
        crate::domain::guest_entry(frame);
        return;
    }
    match frame.vector {
        0..=31 => crate::crash::exception(frame),
        v if v == crate::apic::TIMER_VECTOR as u64 => crate::apic::on_timer_tick(),
        v if v == crate::apic::SPURIOUS_VECTOR as u64 => {}
        v if v == crate::selfcheck::BASELINE_VECTOR as u64 => {}
        v if crate::irq::line_of(v).is_some() => crate::irq::on_interrupt(crate::irq::line_of(v).unwrap_or(0)),
        v => {
            log::warn!("unexpected interrupt vector {v:#x}");
            crate::apic::eoi();
        }
    }
}
