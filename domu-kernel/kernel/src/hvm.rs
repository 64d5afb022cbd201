//! The HVM flavour of the demo DomU: an ordinary multiboot1 kernel. The
//! boot code switches from 32-bit protected mode to long mode on its own
//! page tables; then it prints through the 16550 at 0x3f8, sleeps with the
//! x2APIC timer and HLT, checks what the platform shows it (CPUID, unknown
//! MSRs and ports), writes and reads back memory, and powers off through
//! port 0xf4. It knows nothing of hypercalls.
//!
//! `pvhvm` on the command line makes it a hybrid (PVHVM) guest: its console
//! goes through VMCALL `console_write`, and it sleeps with `set_timer` and
//! the `VIRQ_TIMER` event channel, whose upcalls microhv injects as a vector
//! ([`pvhvm`]).
//!
//! `attack=<name>` on the command line makes it a hostile guest instead
//! (see [`attack`]); microhv must end it or refuse it, and the others go on.

extern crate alloc;
use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use domu_core::{error_permille, ms_parts, pattern, within};

global_asm!(
    r#"
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x3
    .section .multiboot, "a"
    .p2align 2
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov $hvm_stack_top, %esp
    mov %eax, %edi
    mov %ebx, %esi
    /* Identity map of the first 1 GiB with 2 MiB pages. */
    mov $hvm_pdpt, %eax
    or $3, %eax
    mov %eax, hvm_pml4
    mov $hvm_pd, %eax
    or $3, %eax
    mov %eax, hvm_pdpt
    /* 3..4 GiB: one 2 MiB page, uncached, for the xAPIC at 0xfee00000. */
    mov $hvm_pd_hi, %eax
    or $3, %eax
    mov %eax, hvm_pdpt + 24
    movl $(0xfee00000 | 0x9b), hvm_pd_hi + 503 * 8
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, hvm_pd(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    mov $hvm_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $(1 << 8), %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt hvm_gdtr
    ljmp $0x08, $hvm_start64

    .code64
hvm_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov %edi, %edi
    mov %esi, %esi
    call hvm_main
2:  hlt
    jmp 2b

    /* Interrupt stubs: vector N at hvm_stubs + 16 * N. */
    .p2align 4
    .global hvm_stubs
hvm_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21)
    .else
    push $0
    .endif
    push $vec
    jmp hvm_isr_common
    .set vec, vec + 1
    .endr
hvm_isr_common:
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
    cld
    call hvm_interrupt
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
    add $16, %rsp
    iretq

    .section .rodata
    .p2align 3
hvm_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
hvm_gdt_end:
hvm_gdtr:
    .word hvm_gdt_end - hvm_gdt - 1
    .long hvm_gdt

    .section .bss
    .p2align 12
hvm_pml4: .skip 4096
hvm_pdpt: .skip 4096
    .global hvm_pd
hvm_pd: .skip 4096
hvm_pd_hi: .skip 4096
    .skip 65536
hvm_stack_top:
"#,
    options(att_syntax)
);

extern "C" {
    static hvm_stubs: u8;
}

const TIMER_VECTOR: u8 = 0x30;
/// Local APIC registers by their xAPIC offset (x2APIC MSR = 0x800 + offset / 16).
const APIC_EOI: u32 = 0xb0;
const APIC_SVR: u32 = 0xf0;
const APIC_LVT_TIMER: u32 = 0x320;
const APIC_TIMER_INIT: u32 = 0x380;
const APIC_TIMER_DIVIDE: u32 = 0x3e0;
const APIC_SELF_IPI: u32 = 0x3f0;
const XAPIC_BASE: u64 = 0xfee0_0000;

/// `xapic` on the command line: the APIC through its MMIO page, as most
/// unmodified kernels do; otherwise through the x2APIC MSRs.
static XAPIC: AtomicBool = AtomicBool::new(false);

fn apic_write(reg: u32, v: u64) {
    if XAPIC.load(Ordering::Relaxed) {
        // SAFETY: the xAPIC page is mapped uncached by the boot tables;
        // each access is one 32-bit MOV, which microhv emulates.
        unsafe { ((XAPIC_BASE + reg as u64) as *mut u32).write_volatile(v as u32) };
    } else {
        wrmsr(0x800 + (reg >> 4), v);
    }
}

static TICKS: AtomicU64 = AtomicU64::new(0);
/// TSC when the last timer interrupt reached its handler (benchmarks).
static LAST_TICK_TSC: AtomicU64 = AtomicU64::new(0);
/// TSC when the last event vector reached its handler (benchmarks).
static LAST_EVENT_TSC: AtomicU64 = AtomicU64::new(0);
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// Set while a #GP is expected from a 2-byte instruction (RDMSR): the
/// handler skips it and records that it came.
static EXPECT_GP: AtomicBool = AtomicBool::new(false);
static GOT_GP: AtomicBool = AtomicBool::new(false);
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);
/// Hybrid mode: console through VMCALL, events on `EVTCHN_VECTOR`.
static PVHVM: AtomicBool = AtomicBool::new(false);
static EVTCHN_VECTOR: AtomicU64 = AtomicU64::new(0);
static SHARED_INFO: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);
/// End of guest memory, and of the last boot module (from multiboot).
static MEM_END: AtomicU64 = AtomicU64::new(0);
static MODULES_END: AtomicU64 = AtomicU64::new(0);

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the platform's devices; in this guest every port
    // access exits to microhv, which emulates or refuses it.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v) };
    v
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only the x2APIC and EFER MSRs the platform offers are written.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32) };
}

/// RDMSR that survives a #GP: None when the MSR faulted.
fn try_rdmsr(msr: u32) -> Option<u64> {
    let (lo, hi): (u32, u32);
    EXPECT_GP.store(true, Ordering::SeqCst);
    GOT_GP.store(false, Ordering::SeqCst);
    // SAFETY: a #GP here is caught by `hvm_interrupt`, which skips the
    // 2-byte instruction (EXPECT_GP); EAX/EDX are then whatever they were.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    EXPECT_GP.store(false, Ordering::SeqCst);
    (!GOT_GP.load(Ordering::SeqCst)).then_some((hi as u64) << 32 | lo as u64)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn now_ns() -> u64 {
    (rdtsc() as u128 * 1_000_000 / TSC_KHZ.load(Ordering::Relaxed) as u128) as u64
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

struct Uart;

impl Uart {
    fn init() {
        outb(0x3f9, 0x00);
        outb(0x3fb, 0x80);
        outb(0x3f8, 0x01);
        outb(0x3f9, 0x00);
        outb(0x3fb, 0x03);
        outb(0x3fa, 0xc7);
        outb(0x3fc, 0x0b);
    }
    fn put(b: u8) {
        while inb(0x3fd) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        outb(0x3f8, b);
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        if PVHVM.load(Ordering::Relaxed) {
            // SAFETY: console_write reads `s` (guest-physical = virtual here).
            let _ = unsafe { vmcall(shared_abi::hypercall::nr::CONSOLE_WRITE, [s.as_ptr() as u64, s.len() as u64, 0]) };
            return Ok(());
        }
        for b in s.bytes() {
            if b == b'\n' {
                Uart::put(b'\r');
            }
            Uart::put(b);
        }
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = writeln!(Uart, $($arg)*);
    }};
}

/// Powers off with exit code `code`, once the UART has sent everything
/// (LSR bit 6, transmitter empty; at most 3 s), as a driver that flushes
/// before power-off would.
fn power_off(code: u8) -> ! {
    let t0 = rdtsc();
    let limit = 3_000 * TSC_KHZ.load(Ordering::Relaxed).max(1);
    while inb(0x3fd) & 0x40 == 0 && rdtsc().wrapping_sub(t0) < limit {
        core::hint::spin_loop();
    }
    outb(0xf4, code);
    loop {
        // SAFETY: only reached if the power-off port did nothing.
        unsafe { asm!("cli", "hlt") };
    }
}

#[repr(C)]
struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
extern "C" fn hvm_interrupt(f: &mut Frame) {
    match f.vector {
        13 if EXPECT_GP.load(Ordering::SeqCst) => {
            GOT_GP.store(true, Ordering::SeqCst);
            f.rip += 2;
        }
        // The page-fault benchmark's probe: resume where RCX says.
        14 if bench::PF_SKIP.load(Ordering::SeqCst) => {
            f.rip = f.rcx;
        }
        v if v < 32 => {
            println!("exception {} (error {:#x}) at rip {:#x}; powering off with code 3", v, f.error, f.rip);
            power_off(3);
        }
        v => {
            INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            if v == TIMER_VECTOR as u64 {
                LAST_TICK_TSC.store(rdtsc(), Ordering::SeqCst);
                TICKS.fetch_add(1, Ordering::SeqCst);
            }
            if v == EVTCHN_VECTOR.load(Ordering::Relaxed) && v != 0 {
                LAST_EVENT_TSC.store(rdtsc(), Ordering::SeqCst);
                // microhv-guest's upcall (started by `hybrid`, which also
                // set the vector) runs the port handlers and clears the bits.
                let before = microhv_guest::events::events_seen();
                microhv_guest::events::upcall();
                EVENTS.fetch_add(microhv_guest::events::events_seen() - before, Ordering::SeqCst);
            }
            apic_write(APIC_EOI, 0);
        }
    }
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];

fn load_idt() {
    let stubs = core::ptr::addr_of!(hvm_stubs) as u64;
    // SAFETY: single vCPU, interrupts off; the IDT is ours and static.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, e) in idt.iter_mut().enumerate() {
            let h = stubs + 16 * v as u64;
            let lo = (h & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((h >> 16) & 0xffff) << 48;
            *e = [lo, h >> 32];
        }
        let p = Pointer { limit: (core::mem::size_of::<[[u64; 2]; 256]>() - 1) as u16, base: idt.as_ptr() as u64 };
        asm!("lidt [{}]", in(reg) &p);
    }
}

/// Waits with HLT until the timer has ticked `n` more times.
fn wait_ticks(n: u64) {
    let target = TICKS.load(Ordering::SeqCst) + n;
    while TICKS.load(Ordering::SeqCst) < target {
        // SAFETY: STI;HLT sleeps until the next interrupt (STI's one-
        // instruction shadow means none is lost in between); CLI after.
        unsafe { asm!("sti", "hlt", "cli") };
    }
}

fn one_shot(ns: u64) {
    apic_write(APIC_LVT_TIMER, TIMER_VECTOR as u64);
    apic_write(APIC_TIMER_INIT, (ns / 10).clamp(1, u32::MAX as u64));
}

/// The multiboot command line (or "").
fn cmdline(mbi: u64) -> &'static str {
    // SAFETY: microhv's multiboot information page is in our memory, which
    // the boot page tables map; flags bit 2 says the command line is there.
    unsafe {
        let flags = (mbi as *const u32).read_volatile();
        if flags & 4 == 0 {
            return "";
        }
        let p = ((mbi + 16) as *const u32).read_volatile() as u64 as *const u8;
        let mut n = 0;
        while n < 1024 && p.add(n).read_volatile() != 0 {
            n += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(p, n)).unwrap_or("")
    }
}

fn arg<'a>(cmd: &'a str, key: &str) -> Option<&'a str> {
    cmd.split_ascii_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Lists the multiboot modules with the first line of each.
fn modules(mbi: u64) {
    // SAFETY: as in `cmdline`: the information page and the modules microhv
    // loaded lie in our identity-mapped memory; flags bit 3 says the list is valid.
    unsafe {
        let flags = (mbi as *const u32).read_volatile();
        let count = ((mbi + 20) as *const u32).read_volatile() as u64;
        let list = ((mbi + 24) as *const u32).read_volatile() as u64;
        if flags & 8 == 0 || count == 0 {
            return;
        }
        for i in 0..count.min(16) {
            let e = (list + 16 * i) as *const u32;
            let (start, end, string) = (e.read_volatile() as u64, e.add(1).read_volatile() as u64, e.add(2).read_volatile() as u64);
            MODULES_END.fetch_max(end, Ordering::Relaxed);
            let len = end.saturating_sub(start) as usize;
            let bytes = core::slice::from_raw_parts(start as *const u8, len);
            let first = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
            let first = core::str::from_utf8(&first[..first.len().min(48)]).unwrap_or("(binary)");
            let mut n = 0;
            while n < 112 && (string as *const u8).add(n).read_volatile() != 0 {
                n += 1;
            }
            let name = core::str::from_utf8(core::slice::from_raw_parts(string as *const u8, n)).unwrap_or("?");
            println!("boot module {i}: {name:?} at {start:#x}, {len} bytes, first line {first:?}");
        }
    }
}

fn mem_upper_kib(mbi: u64) -> u64 {
    // SAFETY: as in `cmdline`; mem_upper is at offset 8.
    unsafe { ((mbi + 8) as *const u32).read_volatile() as u64 }
}

const WORK_PAGES: usize = 64;
static mut WORK: [[u64; 512]; WORK_PAGES] = [[0; 512]; WORK_PAGES];

#[no_mangle]
extern "C" fn hvm_main(magic: u32, mbi: u32) -> ! {
    Uart::init();
    load_idt();
    let mbi = mbi as u64;
    let cmd = if magic == 0x2BAD_B002 { cmdline(mbi) } else { "" };
    let name = arg(cmd, "name").unwrap_or("hvm");
    let sig = cpuid(0x4000_0000);
    let mut vendor = [0u8; 12];
    for (i, r) in sig[1..].iter().enumerate() {
        vendor[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
    }
    let timing = cpuid(0x4000_0010);
    TSC_KHZ.store((timing[0] as u64).max(1), Ordering::Relaxed);
    let leaf1 = cpuid(1);
    XAPIC.store(cmd.split_ascii_whitespace().any(|w| w == "xapic"), Ordering::Relaxed);
    // The local APIC: enable it, timer divide by 1.
    apic_write(APIC_SVR, 0x1ff);
    apic_write(APIC_TIMER_DIVIDE, 0b1011);
    // Like the PV DomUs, which wait for Dom0's store: let Dom0's start-up
    // (building DomUs in hypercalls that are not preemptible) pass before
    // timing anything. `settle=0` skips it.
    let settle: u64 = arg(cmd, "settle").and_then(|s| s.parse().ok()).unwrap_or(2000);
    if settle > 0 {
        one_shot(settle * 1_000_000);
        wait_ticks(1);
    }
    println!(
        "{name} up: HVM guest, multiboot {}, {} KiB above 1 MiB, hypervisor {:?}, VMX {}, x2APIC {}, APIC through {}, cmdline {:?}",
        if magic == 0x2BAD_B002 { "ok" } else { "BAD" },
        mem_upper_kib(mbi),
        core::str::from_utf8(&vendor).unwrap_or("?"),
        if leaf1[2] & (1 << 5) != 0 { "visible" } else { "hidden" },
        if leaf1[2] & (1 << 21) != 0 { "yes" } else { "no" },
        if XAPIC.load(Ordering::Relaxed) { "xAPIC MMIO" } else { "x2APIC MSRs" },
        cmd
    );
    if magic == 0x2BAD_B002 {
        MEM_END.store((1 << 20) + mem_upper_kib(mbi) * 1024, Ordering::Relaxed);
        modules(mbi);
    }
    if timing[1] != 100_000 || leaf1[2] & (1 << 21) == 0 {
        println!("unexpected platform (APIC timer rate or no x2APIC); powering off with code 2");
        power_off(2);
    }
    if let Some(a) = arg(cmd, "attack") {
        attack(name, a);
    }
    if cmd.split_ascii_whitespace().any(|w| w == "bench") {
        bench::run(name, cmd);
    }
    if cmd.split_ascii_whitespace().any(|w| w == "echo") {
        echo(name);
    }
    if cmd.split_ascii_whitespace().any(|w| w == "pvhvm") {
        pvhvm(name);
    }
    timers(name);
    periodic();
    platform_checks();
    memory(name);
    println!("done: {} interrupts handled; shutting down", INTERRUPTS.load(Ordering::Relaxed));
    power_off(0)
}

/// The same sleeps as the PV DomU, with the APIC timer and HLT.
fn timers(name: &str) {
    // Warm-up, not reported (as in the PV flavour).
    one_shot(1_000_000);
    wait_ticks(1);
    let base = if name.ends_with('2') { 30 } else { 20 };
    for ms in [base, base * 2, base * 5] {
        let asked = ms * 1_000_000;
        let t0 = now_ns();
        one_shot(asked);
        wait_ticks(1);
        let took = now_ns() - t0;
        let (m, f) = ms_parts(took);
        let e = error_permille(asked, took);
        println!(
            "sleep {ms} ms (APIC timer, HLT): measured {m}.{f:03} ms, error {}{}.{}% {}",
            if e < 0 { "-" } else { "+" },
            e.unsigned_abs() / 10,
            e.unsigned_abs() % 10,
            if within(asked, took, 10) { "ok" } else { "OUT OF TOLERANCE" }
        );
    }
}

/// Ten periods of a 5 ms periodic timer.
fn periodic() {
    let t0 = now_ns();
    apic_write(APIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR as u64);
    apic_write(APIC_TIMER_INIT, 500_000);
    wait_ticks(10);
    apic_write(APIC_TIMER_INIT, 0);
    let took = now_ns() - t0;
    let (m, f) = ms_parts(took);
    println!("periodic timer: 10 ticks of 5 ms in {m}.{f:03} ms {}", if within(50_000_000, took, 10) { "ok" } else { "OUT OF TOLERANCE" });
}

/// What the platform shows an unmodified guest where it has no device.
fn platform_checks() {
    let msr = try_rdmsr(0x1234_5678);
    let port = inb(0x2f8);
    println!(
        "platform: unknown MSR {}, unknown port reads {port:#04x}, {}",
        if msr.is_none() { "raised #GP" } else { "did NOT fault" },
        if msr.is_none() && port == 0xff { "as documented" } else { "UNEXPECTED" }
    );
}

/// Writes a pattern over 64 pages and reads it back.
fn memory(name: &str) {
    // SAFETY: our own static buffer; nothing else uses it.
    let work = unsafe { &mut *core::ptr::addr_of_mut!(WORK) };
    for (p, page) in work.iter_mut().enumerate() {
        for (i, w) in page.iter_mut().enumerate() {
            *w = pattern(name, p as u64, i as u64);
        }
    }
    let ok = work.iter().enumerate().all(|(p, page)| page.iter().enumerate().all(|(i, &w)| w == pattern(name, p as u64, i as u64)));
    println!("memory: {WORK_PAGES} pages written and read back {}", if ok { "ok" } else { "FAILED" });
}

/// Hostile behaviour chosen by `attack=`: each must end this guest (or be
/// refused) while microhv and the other domains go on.
fn attack(name: &str, which: &str) {
    println!("{name}: attack {which}");
    match which {
        // Guest-physical memory that is not ours: the EPT has no entry.
        "ept" => {
            // SAFETY: deliberately hostile: 512 MiB is mapped by our page
            // tables but is not guest memory, so microhv must stop us.
            let v = unsafe { (0x2000_0000 as *const u64).read_volatile() };
            println!("attack ept: read {v:#x} outside my memory: NOT STOPPED");
        }
        // microhv's own physical addresses (its image is at 2 MiB): in a
        // guest they are just guest-physical addresses of our own memory;
        // past our memory they are EPT violations.
        "hvwrite" => {
            for a in (0x20_0000u64..0x21_0000).step_by(8) {
                // SAFETY: deliberately hostile; these are our own pages.
                unsafe { (a as *mut u64).write_volatile(0xdead_beef_dead_beef) };
            }
            println!("attack hvwrite: 64 KiB written at 0x200000 landed in my own memory; now past the end");
            // SAFETY: deliberately hostile (outside guest memory).
            unsafe { (0x3000_0000 as *mut u64).write_volatile(0xdead_beef) };
            println!("attack hvwrite: write past my memory NOT STOPPED");
        }
        // Hypercalls this guest may not make.
        "vmcall" => {
            for nr in [32u64, 11, 999, u64::MAX] {
                // SAFETY: no pointer arguments; microhv answers in RAX.
                let r = unsafe { vmcall(nr, [0, 0, 0]) };
                println!("attack vmcall: hypercall {nr:#x} -> {r}");
            }
            // Guest-physical pointers and frames that are not the guest's.
            use shared_abi::hypercall::nr;
            let leaf = cpuid(0x4000_0001);
            let si_gfn = leaf[2] as u64;
            let after = (si_gfn + 1) << 12; // microhv's console ring page, outside our memory
            let cases: [(&str, u64, [u64; 3]); 5] = [
                ("console_write from past my memory", nr::CONSOLE_WRITE, [0x3000_0000, 16, 0]),
                ("console_write from microhv's ring page", nr::CONSOLE_WRITE, [after, 16, 0]),
                ("memory_query into past my memory", nr::MEMORY_QUERY, [after, 0, 0]),
                ("grant_access of a frame past my memory", nr::GRANT_ACCESS, [0, 0x10_0000, 0]),
                ("grant_access of my shared_info", nr::GRANT_ACCESS, [0, si_gfn, 0]),
            ];
            for (what, n, a) in cases {
                // SAFETY: deliberately bad pointers: microhv must refuse them.
                let r = unsafe { vmcall(n, a) };
                println!("attack vmcall: {what} -> {r}");
            }
            return;
        }
        // No IDT: the next exception becomes a triple fault.
        "triple" => {
            let p = Pointer { limit: 0, base: 0 };
            // SAFETY: deliberately hostile: an empty IDT, then a breakpoint.
            unsafe { asm!("lidt [{}]", "int3", in(reg) &p) };
            println!("attack triple: still running: NOT STOPPED");
        }
        // As many interrupts as we can ask for, for 50 ms; then carry on.
        "storm" => {
            let t0 = now_ns();
            apic_write(APIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR as u64);
            apic_write(APIC_TIMER_INIT, 1);
            let mut ipis = 0u64;
            while now_ns() - t0 < 50_000_000 {
                apic_write(APIC_SELF_IPI, 0x40);
                ipis += 1;
                // SAFETY: let the interrupts in for one instruction.
                unsafe { asm!("sti", "nop", "cli") };
            }
            apic_write(APIC_TIMER_INIT, 0);
            println!(
                "attack storm: {ipis} self-IPIs and a 10 ns periodic timer for 50 ms gave {} timer interrupts (microhv caps the rate)",
                TICKS.load(Ordering::SeqCst)
            );
            return;
        }
        // Not an attack: power off with a failure code, as a test harness would.
        "exit" => {
            println!("attack exit: powering off with exit code 7");
            power_off(7);
        }
        // The store ring microhv maps into a hybrid guest is the guest's own
        // page: fill it with garbage (indices included) and ring Dom0's
        // store. Dom0 must refuse it and serve everyone else.
        "store" => {
            let leaf = cpuid(0x4000_0002);
            let (gfn, port) = (leaf[0] as u64, leaf[1] as u64);
            if gfn == 0 {
                println!("attack store: no store ring announced");
                power_off(4);
            }
            // Wait (up to 20 s) until Dom0's store has bound the port: the
            // garbage must reach a connected backend.
            let t0 = now_ns();
            loop {
                let mut st = [0u8; 16];
                // SAFETY: `st` is ours, 16 bytes (guest-physical = virtual).
                let r = unsafe { vmcall(shared_abi::hypercall::nr::EVTCHN_STATUS, [port, st.as_mut_ptr() as u64, 0]) };
                let state = u32::from_le_bytes([st[0], st[1], st[2], st[3]]);
                if r == 0 && state == shared_abi::hypercall::EVTCHN_STATE_INTERDOMAIN {
                    break;
                }
                if now_ns() - t0 > 20_000_000_000 {
                    println!("attack store: Dom0 never connected the store; powering off with code 4");
                    power_off(4);
                }
                one_shot(20_000_000);
                wait_ticks(1);
            }
            for i in 0..512u64 {
                let v = 0xdead_beef_0bad_f00d ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                // SAFETY: deliberately hostile, on our own page (the store
                // ring at the frame CPUID announced, mapped in our EPT).
                unsafe { ((gfn << 12) as *mut u64).add(i as usize).write_volatile(v) };
            }
            let mut sent = 0;
            for _ in 0..64 {
                // SAFETY: no pointer arguments.
                if unsafe { vmcall(shared_abi::hypercall::nr::EVTCHN_SEND, [port, 0, 0]) } == 0 {
                    sent += 1;
                }
            }
            one_shot(500_000_000);
            wait_ticks(1);
            println!("attack store: garbage over my store ring (gfn {gfn:#x}) after Dom0 connected it, {sent} of 64 events sent");
            power_off(0);
        }
        other => println!("unknown attack {other:?}"),
    }
    power_off(4)
}

/// VMCALL with the PV calling convention: number in RAX, arguments in
/// RDI, RSI, RDX; the result (>= 0, or a negative errno) in RAX.
///
/// # Safety
/// Pointer arguments must point at memory of ours for the call's length.
unsafe fn vmcall(nr: u64, a: [u64; 3]) -> i64 {
    // SAFETY: microhv-guest's primitive is VMCALL in this build (feature
    // `hvm`); the caller's promise covers the arguments.
    unsafe { microhv_guest::hypercall::raw(nr, [a[0], a[1], a[2], 0, 0]) }
}

fn vcpu0() -> *mut shared_abi::shared_info::VcpuInfo {
    SHARED_INFO.load(Ordering::Relaxed) as *mut shared_abi::shared_info::VcpuInfo
}

/// System time (ns since microhv booted) from the shared_info time record.
fn system_ns() -> u64 {
    // SAFETY: shared_info is our last page (identity-mapped); microhv
    // writes the record before we start and only reads it after.
    let t = unsafe { core::ptr::addr_of!((*vcpu0()).time).read_volatile() };
    t.ns_at(rdtsc())
}

/// Makes this guest a hybrid: event upcalls on the vector CPUID announces,
/// and microhv-guest's runtime started over VMCALL with a start_info filled
/// in from CPUID (leaf 0x4000_0001: domain, vector, `shared_info`; leaf
/// 0x4000_0002: the store ring, when there is one this guest maps). Returns
/// leaf 0x4000_0001. Calling it again changes nothing.
fn hybrid(name: &str) -> [u32; 4] {
    use microhv_guest::StartInfo;
    let hv = cpuid(0x4000_0001);
    if microhv_guest::try_start_info().is_some() {
        return hv;
    }
    static mut SI: StartInfo = StartInfo::zeroed();
    // SAFETY: written once here, before the runtime reads it (start_hvm
    // below); the guest has one vCPU.
    let si = unsafe { &mut *core::ptr::addr_of_mut!(SI) };
    si.domid = hv[3] as u16;
    si.nr_pages = MEM_END.load(Ordering::Relaxed) / 4096;
    si.shared_info_va = (hv[2] as u64) << 12;
    si.set_name(name);
    let store = cpuid(0x4000_0002);
    // Our page tables map the first 1 GiB only.
    if store[0] != 0 && ((store[0] as u64) << 12) < 1 << 30 {
        si.store_va = (store[0] as u64) << 12;
        si.store_evtchn = store[1] as u64;
    }
    SHARED_INFO.store(si.shared_info_va, Ordering::Relaxed);
    PVHVM.store(true, Ordering::Relaxed);
    // SAFETY: `SI` is 'static and complete.
    microhv_guest::start_hvm(unsafe { &*core::ptr::addr_of!(SI) });
    // Last: from here on the vector's handler runs microhv-guest's upcall.
    EVTCHN_VECTOR.store(hv[1] as u64, Ordering::Relaxed);
    hv
}

/// Starts the split drivers of a hybrid guest (store client, block
/// frontend): a heap above the kernel and its modules, then a wait for
/// Dom0's store. False when microhv announced no store ring this guest maps.
fn start_drivers(name: &str) -> bool {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.load(Ordering::Relaxed) {
        return true;
    }
    let si = { hybrid(name); microhv_guest::start_info() };
    if si.store_va == 0 {
        println!("no store ring this guest maps (CPUID 0x40000002): no split drivers");
        return false;
    }
    // The heap: from the end of the image (and of any boot module) to the
    // end of memory, at most 2 MiB.
    extern "C" {
        static __image_end: u8;
    }
    let mem_end = MEM_END.load(Ordering::Relaxed);
    let start = (core::ptr::addr_of!(__image_end) as u64).max(MODULES_END.load(Ordering::Relaxed)).next_multiple_of(4096);
    let size = mem_end.saturating_sub(start).min(2 << 20);
    if size < 256 * 1024 {
        println!("split drivers: only {size} bytes free for a heap; skipped");
        return false;
    }
    // SAFETY: [start, start + size) is our own identity-mapped memory above
    // the image and the modules, used by nothing else; done once (STARTED).
    unsafe { microhv_guest::init_heap_at(start, size as usize) };
    STARTED.store(true, Ordering::Relaxed);
    println!("split drivers through VMCALL: store ring at gfn {:#x}, port {}, heap {} KiB", si.store_va >> 12, si.store_evtchn, size / 1024);
    // As the PV DomUs do: wait until Dom0's store answers (its start-up
    // work is then over).
    let _ = microhv_guest::store::read(&alloc::format!("{}/name", microhv_guest::store::home()));
    true
}

/// The echo side of the event ping-pong benchmark, as a hybrid guest.
fn echo(name: &str) -> ! {
    if start_drivers(name) {
        // SAFETY: events arrive as the injected vector from here on.
        unsafe { asm!("sti") };
        match crate::evping::echo() {
            Ok(n) => println!("echo: answered {n} events; the other side closed its port"),
            Err(e) => println!("echo: FAILED: {e}"),
        }
    }
    power_off(0)
}

/// The hybrid flavour: console through VMCALL, sleeps through set_timer
/// and the VIRQ_TIMER event channel, upcalls as an injected vector.
fn pvhvm(name: &str) -> ! {
    use shared_abi::hypercall::{nr, SHUTDOWN_POWEROFF, VIRQ_TIMER};
    let leaf = hybrid(name);
    // SAFETY: no pointer arguments.
    let abi = unsafe { vmcall(nr::VERSION, [0, 0, 0]) };
    println!(
        "{name} up (PVHVM): ABI {}.{} through VMCALL, console_write, event upcalls on vector {:#x}, shared_info at gfn {:#x}",
        abi >> 16, abi & 0xffff, leaf[1], leaf[2]
    );
    // SAFETY: no pointer arguments.
    let port = unsafe { vmcall(nr::EVTCHN_BIND_VIRQ, [VIRQ_TIMER, 0, 0]) };
    // SAFETY: no pointer arguments.
    let unmask = unsafe { vmcall(nr::EVTCHN_UNMASK, [port as u64, 0, 0]) };
    if port < 0 || unmask < 0 {
        println!("binding VIRQ_TIMER failed: {port} {unmask}");
        power_off(2);
    }
    // SAFETY: interrupts on from here: upcalls arrive as the vector.
    unsafe { asm!("sti") };
    let base = if name.ends_with('2') { 30 } else { 20 };
    for ms in [base, base * 2, base * 5] {
        let asked = ms * 1_000_000;
        let before = EVENTS.load(Ordering::SeqCst);
        let t0 = system_ns();
        // SAFETY: no pointer arguments.
        let _ = unsafe { vmcall(nr::SET_TIMER, [t0 + asked, 0, 0]) };
        while EVENTS.load(Ordering::SeqCst) == before {
            // SAFETY: no pointer arguments.
            let _ = unsafe { vmcall(nr::SCHED_BLOCK, [0, 0, 0]) };
        }
        let took = system_ns() - t0;
        let (m, f) = ms_parts(took);
        let e = error_permille(asked, took);
        println!(
            "sleep {ms} ms (set_timer, VIRQ_TIMER event on vector {:#x}, port {port}): measured {m}.{f:03} ms, error {}{}.{}% {}",
            leaf[1],
            if e < 0 { "-" } else { "+" },
            e.unsigned_abs() / 10,
            e.unsigned_abs() % 10,
            if within(asked, took, 10) { "ok" } else { "OUT OF TOLERANCE" }
        );
    }
    // Calls with guest-physical pointers (identity-mapped: VA = GPA here).
    let mut info = [0u64; 2];
    // SAFETY: `info` is ours, 16 bytes.
    let q = unsafe { vmcall(nr::MEMORY_QUERY, [info.as_mut_ptr() as u64, 0, 0]) };
    let mut st = [0u8; 16];
    // SAFETY: `st` is ours, 16 bytes.
    let s = unsafe { vmcall(nr::EVTCHN_STATUS, [port as u64, st.as_mut_ptr() as u64, 0]) };
    let state = u32::from_le_bytes([st[0], st[1], st[2], st[3]]);
    let gfn = core::ptr::addr_of!(WORK) as u64 >> 12;
    // SAFETY: no pointer arguments (a frame number of ours).
    let gref = unsafe { vmcall(nr::GRANT_ACCESS, [0, gfn, 1]) };
    // SAFETY: no pointer arguments.
    let end = unsafe { vmcall(nr::GRANT_END, [gref as u64, 0, 0]) };
    let t0 = system_ns();
    // SAFETY: no pointer arguments.
    let poll = unsafe { vmcall(nr::SCHED_POLL, [t0 + 5_000_000, 0, 0]) };
    let (pm, pf) = ms_parts(system_ns() - t0);
    println!(
        "VMCALL with guest-physical pointers: memory_query {q} -> {} pages, evtchn_status(port {port}) {s} -> state {state}, grant_access(dom0, gfn {gfn:#x}) -> gref {gref}, grant_end -> {end}, sched_poll 5 ms -> {poll} after {pm}.{pf:03} ms",
        info[0]
    );
    // grant_copy goes through the grant checks (nobody granted us
    // anything, so they refuse it); a loopback event channel to ourselves.
    let me = leaf[3] as u64;
    let mut got = [0u64; 8];
    let rec = shared_abi::hypercall::GrantCopy {
        granter: 0,
        _pad: 0,
        gref: 7,
        offset: 0,
        len: 64,
        local_va: got.as_mut_ptr() as u64,
        flags: 0,
        _pad2: 0,
    };
    // SAFETY: `rec` and `got` are ours (guest-physical = virtual here).
    let copied = unsafe { vmcall(nr::GRANT_COPY, [&rec as *const _ as u64, 0, 0]) };
    // SAFETY: a record address past our memory: microhv must refuse it.
    let far = unsafe { vmcall(nr::GRANT_COPY, [0x3000_0000, 0, 0]) };
    // SAFETY: no pointer arguments.
    let p1 = unsafe { vmcall(nr::EVTCHN_ALLOC_UNBOUND, [me, 0, 0]) };
    // SAFETY: no pointer arguments.
    let p2 = unsafe { vmcall(nr::EVTCHN_BIND_INTERDOMAIN, [me, p1 as u64, 0]) };
    // SAFETY: no pointer arguments.
    unsafe { vmcall(nr::EVTCHN_UNMASK, [p1 as u64, 0, 0]) };
    let before = EVENTS.load(Ordering::SeqCst);
    // SAFETY: no pointer arguments.
    let sent = unsafe { vmcall(nr::EVTCHN_SEND, [p2 as u64, 0, 0]) };
    let t0 = system_ns();
    while EVENTS.load(Ordering::SeqCst) == before && system_ns() - t0 < 100_000_000 {
        core::hint::spin_loop();
    }
    println!(
        "domid {me}: grant_copy of a grant never made -> {copied}, of a record past my memory -> {far}; loopback event channel {p1} <-> {p2}: send {sent}, event {}",
        if EVENTS.load(Ordering::SeqCst) > before { "delivered" } else { "NOT DELIVERED" }
    );
    // What the table does not allow an HVM guest.
    // SAFETY: no pointer arguments.
    let list = unsafe { vmcall(nr::DOMCTL_LIST, [0, 0, 0]) };
    // SAFETY: no pointer arguments.
    let mmu = unsafe { vmcall(nr::MMU_UPDATE, [0, 0, 0]) };
    println!("VMCALL refusals: domctl_list -> {list}, mmu_update -> {mmu} (PV-only or privileged)");
    memory(name);
    if start_drivers(name) {
        crate::disk::run(name);
    }
    println!("done: {} events handled; shutting down", EVENTS.load(Ordering::SeqCst));
    // SAFETY: no pointer arguments.
    let _ = unsafe { vmcall(nr::SCHED_SHUTDOWN, [SHUTDOWN_POWEROFF, 0, 0]) };
    power_off(6)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {}", info.message());
    power_off(5)
}

/// The benchmark mode (`bench` on the command line; with `pvhvm`, the
/// hybrid flavour): the same benchmarks as the PV guest's where the HVM
/// guest has an equivalent, printed in the same `BENCH-*` lines for
/// `cargo xtask bench`. Each sample is TSC ticks converted to nanoseconds
/// with microhv's rate (so the same unit as the PV guest's `now_ns`).
mod bench {
    use super::*;
    use shared_abi::hypercall::{nr, DomainCounters};

    pub static PF_SKIP: AtomicBool = AtomicBool::new(false);
    const N_MAX: usize = 1000;
    static mut SAMPLES: [u64; N_MAX] = [0; N_MAX];

    extern "C" {
        static mut hvm_pd: [u64; 512];
    }

    fn counters() -> DomainCounters {
        let mut c = DomainCounters::default();
        // The domain id, read once: a CPUID here would be an exit counted
        // in the benchmark.
        static ME: AtomicU64 = AtomicU64::new(u64::MAX);
        if ME.load(Ordering::Relaxed) == u64::MAX {
            ME.store(cpuid(0x4000_0001)[3] as u64, Ordering::Relaxed);
        }
        let me = ME.load(Ordering::Relaxed);
        // SAFETY: `c` is ours; guest-physical = virtual in this guest.
        let _ = unsafe { vmcall(nr::DOMAIN_COUNTERS, [me, &mut c as *mut DomainCounters as u64, 0]) };
        c
    }

    fn ticks_to_ns(t: u64) -> u64 {
        (t as u128 * 1_000_000 / TSC_KHZ.load(Ordering::Relaxed) as u128) as u64
    }

    fn report(name: &str, samples: &[u64], c0: &DomainCounters, c1: &DomainCounters) {
        for chunk in samples.chunks(12) {
            let mut line = [0u8; 160];
            let mut w = Cursor { buf: &mut line, at: 0 };
            for (i, s) in chunk.iter().enumerate() {
                let _ = write!(w, "{}{s}", if i > 0 { "," } else { "" });
            }
            let at = w.at;
            println!("BENCH-SAMPLES {name} {}", core::str::from_utf8(&line[..at]).unwrap_or(""));
        }
        // The second read counts itself (one VMCALL, one exit).
        println!(
            "BENCH-EVENTS {name} ops={} hypercalls={} entries={} exceptions=0 upcalls={} interrupts={} cr3_loads=0 switches={} hv_ns={} vm_exits={}",
            samples.len(),
            c1.hypercalls - c0.hypercalls - 1,
            c1.entries - c0.entries - 1,
            c1.upcalls - c0.upcalls,
            c1.interrupts - c0.interrupts,
            c1.switches_in - c0.switches_in,
            c1.hv_ns - c0.hv_ns,
            c1.vm_exits - c0.vm_exits - 1,
        );
        // A second line: Dom0 splits console lines longer than 200 bytes.
        println!(
            "BENCH-EVENTS {name} ops={} exits_io={} exits_msr={} exits_cpuid={} exits_hlt={} exits_apic={} exits_other={}",
            samples.len(),
            c1.exits_io - c0.exits_io,
            c1.exits_msr - c0.exits_msr,
            c1.exits_cpuid - c0.exits_cpuid,
            c1.exits_hlt - c0.exits_hlt,
            c1.exits_apic - c0.exits_apic,
            c1.exits_other - c0.exits_other,
        );
        // Let Dom0 drain the console ring before the next burst (it sends
        // at the serial line's pace): past 8 KiB of backlog microhv would
        // print our output itself, in the middle of Dom0's lines.
        one_shot(400_000_000);
        wait_ticks(1);
    }

    struct Cursor<'a> {
        buf: &'a mut [u8],
        at: usize,
    }

    impl Write for Cursor<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = (self.at + s.len()).min(self.buf.len());
            self.buf[self.at..end].copy_from_slice(&s.as_bytes()[..end - self.at]);
            self.at = end;
            Ok(())
        }
    }

    fn measure(name: &str, n: usize, mut op: impl FnMut()) {
        op();
        // SAFETY: single vCPU; the sample buffer is used by one benchmark at a time.
        let samples = unsafe { &mut (&mut *core::ptr::addr_of_mut!(SAMPLES))[..n] };
        let c0 = counters();
        for s in samples.iter_mut() {
            let t0 = rdtsc();
            op();
            *s = rdtsc() - t0;
        }
        let c1 = counters();
        for s in samples.iter_mut() {
            *s = ticks_to_ns(*s);
        }
        report(name, samples, &c0, &c1);
    }

    pub fn run(name: &str, cmd: &str) -> ! {
        let quick = cmd.split_ascii_whitespace().any(|w| w == "quick");
        let hybrid = cmd.split_ascii_whitespace().any(|w| w == "pvhvm");
        if hybrid {
            // Events on the vector; the console is console_write (see
            // `Uart::write_str`).
            super::hybrid(name);
        }
        let n = if quick { 200 } else { N_MAX };
        let mut count = 0;
        println!("bench: {} benchmarks, {n} samples each", if hybrid { "PVHVM" } else { "HVM" });
        measure("null_hypercall", n, || {
            // SAFETY: no pointer arguments.
            let _ = unsafe { vmcall(nr::VERSION, [0, 0, 0]) };
        });
        measure("read_time", n, || {
            core::hint::black_box(rdtsc());
        });
        measure("cpuid", n, || {
            core::hint::black_box(cpuid(0));
        });
        count += 3;
        // A page-table update is a plain store (and INVLPG) under EPT: no exit.
        // PD entry 400 maps 0x3200_0000 (beyond our memory: never touched).
        let va = 400u64 << 21;
        let mut on = false;
        measure("pt_update", n, || {
            on = !on;
            // SAFETY: entry 400 of our own PD maps nothing we use; the store
            // and INVLPG only change that unused 2 MiB of address space.
            unsafe {
                let pd = &mut *core::ptr::addr_of_mut!(hvm_pd);
                core::ptr::write_volatile(&mut pd[400], if on { va | 0x83 } else { 0 });
                asm!("invlpg [{}]", in(reg) va);
            }
        });
        // SAFETY: as above: leave the entry empty for the page-fault probe.
        unsafe {
            core::ptr::write_volatile(&mut (*core::ptr::addr_of_mut!(hvm_pd))[400], 0);
            asm!("invlpg [{}]", in(reg) va);
        }
        // A page fault goes to our own IDT handler: no exit either.
        PF_SKIP.store(true, Ordering::SeqCst);
        measure("page_fault", n, || {
            // SAFETY: reads the unmapped address on purpose; the #PF handler
            // resumes at label 2.
            unsafe { asm!("lea rcx, [rip + 2f]", "mov rax, qword ptr [{p}]", "2:", p = in(reg) va, out("rax") _, out("rcx") _) };
        });
        PF_SKIP.store(false, Ordering::SeqCst);
        count += 2;
        // The hybrid: an event on a loopback channel, from the send VMCALL
        // to the handler of the injected vector.
        if hybrid {
            let me = super::hybrid(name)[3] as u64;
            // SAFETY: no pointer arguments.
            let p1 = unsafe { vmcall(nr::EVTCHN_ALLOC_UNBOUND, [me, 0, 0]) };
            // SAFETY: no pointer arguments.
            let p2 = unsafe { vmcall(nr::EVTCHN_BIND_INTERDOMAIN, [me, p1 as u64, 0]) };
            // SAFETY: no pointer arguments.
            unsafe { vmcall(nr::EVTCHN_UNMASK, [p1 as u64, 0, 0]) };
            // SAFETY: our vcpu_info in our shared_info page: events on.
            unsafe { core::ptr::addr_of_mut!((*vcpu0()).evtchn_upcall_mask).write_volatile(0) };
            let c0 = counters();
            // SAFETY: single vCPU; one benchmark at a time uses the buffer.
            let samples = unsafe { &mut (&mut *core::ptr::addr_of_mut!(SAMPLES))[..n] };
            for s in samples.iter_mut() {
                let before = EVENTS.load(Ordering::SeqCst);
                let t0 = rdtsc();
                // SAFETY: no pointer arguments; interrupts on only while we
                // wait for the injected vector.
                unsafe {
                    vmcall(nr::EVTCHN_SEND, [p2 as u64, 0, 0]);
                    asm!("sti");
                }
                while EVENTS.load(Ordering::SeqCst) == before {
                    core::hint::spin_loop();
                }
                // SAFETY: back to interrupts off.
                unsafe { asm!("cli") };
                *s = ticks_to_ns(LAST_EVENT_TSC.load(Ordering::SeqCst).saturating_sub(t0));
            }
            let c1 = counters();
            report("event_send_to_upcall", samples, &c0, &c1);
            count += 1;
            // The split drivers over VMCALL: event ping-pong with the echo
            // peer Dom0 paired us with, and 4 KiB reads through blkfront.
            // Interrupts on around each operation: replies are the vector.
            if start_drivers(name) {
                // SAFETY: toggles IF only; the vector's handler is set up.
                let on = || unsafe { asm!("sti") };
                // SAFETY: as above.
                let off = || unsafe { asm!("cli") };
                on();
                match crate::evping::Pinger::connect() {
                    Ok(p) => {
                        off();
                        measure("event_pingpong", n, || {
                            on();
                            p.round_trip();
                            off();
                        });
                        p.close();
                        count += 1;
                    }
                    Err(e) => println!("bench: event_pingpong skipped: no echo peer ({e})"),
                }
                on();
                if let Ok(mut d) = microhv_guest::blkfront::BlkFront::connect(0) {
                    off();
                    let layout = core::alloc::Layout::from_size_align(4096, 4096).expect("layout");
                    // SAFETY: non-zero size; freed never.
                    let buf = unsafe { core::slice::from_raw_parts_mut(alloc::alloc::alloc_zeroed(layout), 4096) };
                    let mut sector = 0;
                    let sectors = d.sectors();
                    measure("block_read_4k", n.min(200), || {
                        on();
                        let _ = d.read(sector, buf);
                        off();
                        sector = (sector + 8) % sectors.max(8);
                    });
                    on();
                    let _ = d.close();
                    count += 1;
                }
                off();
            }
        }
        // 1 KiB of console: through the emulated UART (two port exits per
        // byte) or, for the hybrid, one console_write VMCALL.
        let kib = [b'.'; 1024];
        let s = core::str::from_utf8(&kib).unwrap_or("");
        let c0 = counters();
        // Four: more would outrun Dom0's draining, and microhv would print
        // the backlog itself, in the middle of Dom0's lines.
        let mut samples = [0u64; 4];
        for x in samples.iter_mut() {
            let t0 = rdtsc();
            let _ = Uart.write_str(s);
            *x = ticks_to_ns(rdtsc() - t0);
        }
        let c1 = counters();
        println!();
        // 4 KiB at the serial line's pace: let Dom0 send it before more
        // lines follow (see `report`).
        one_shot(1_200_000_000);
        wait_ticks(1);
        report("console_1kib", &samples, &c0, &c1);
        count += 1;
        // Timer: one-shot APIC timer 200 us out, HLT until its interrupt.
        let m = n.min(100);
        let c0 = counters();
        let mut lat = [0u64; 100];
        for x in lat[..m].iter_mut() {
            let target = TICKS.load(Ordering::SeqCst) + 1;
            let deadline = rdtsc() + 200 * TSC_KHZ.load(Ordering::Relaxed) / 1000;
            one_shot(200_000);
            while TICKS.load(Ordering::SeqCst) < target {
                // SAFETY: STI;HLT until the next interrupt, CLI after.
                unsafe { asm!("sti", "hlt", "cli") };
            }
            *x = ticks_to_ns(LAST_TICK_TSC.load(Ordering::SeqCst).saturating_sub(deadline));
        }
        let c1 = counters();
        report("timer_latency", &lat[..m], &c0, &c1);
        count += 1;
        println!("BENCH-DONE {count}");
        // The last lines reach Dom0's console before the domain ends.
        one_shot(1_000_000_000);
        wait_ticks(1);
        power_off(0)
    }
}
