//! Device interrupts: the I/O APIC, and their routing to Dom0 as events.
//!
//! A device line Dom0 binds with `irq_bind` is programmed level-triggered,
//! active-high (how QEMU's and Bochs's PCI links are wired, per their ACPI
//! interrupt source overrides) to vector [`VECTOR_BASE`] + line, and left
//! masked until bound. When it fires, microhv masks the line, sends the
//! local APIC its EOI and marks the line pending ([`on_interrupt`]). The
//! scheduler then raises the bound event channel of Dom0
//! ([`crate::domain::deliver_irqs`]). Dom0 services the device (which drops
//! the line) and calls `irq_eoi`, which unmasks it ([`unmask`]). A level
//! line that is still asserted fires again at once: nothing is lost, and a
//! device that never stops asserting cannot keep the CPU in microhv,
//! because the line stays masked until Dom0 asks for the next one.

use core::sync::atomic::{AtomicU32, Ordering};

/// Physical address of the I/O APIC (the standard one on QEMU and Bochs).
pub const IOAPIC_PHYS: u64 = 0xfec0_0000;
/// Vector of I/O APIC input 0; input N uses `VECTOR_BASE + N`.
pub const VECTOR_BASE: u8 = 0x30;
/// Inputs microhv supports (the I/O APIC has 24 on QEMU and Bochs).
pub const LINES: u32 = 24;
/// Lines Dom0 may not bind: the PIT (0, 2) is microhv's; 1, 8 and 12 are the
/// keyboard, RTC and mouse, which no backend drives.
pub const RESERVED_LINES: [u32; 5] = [0, 1, 2, 8, 12];

const REG_VERSION: u32 = 0x01;
const REG_REDIR: u32 = 0x10;
const MASKED: u32 = 1 << 16;
const LEVEL: u32 = 1 << 15;

/// Lines that fired and were masked, not yet delivered as events.
static PENDING: AtomicU32 = AtomicU32::new(0);
/// Number of redirection entries the I/O APIC reported (0: none found).
static ENTRIES: AtomicU32 = AtomicU32::new(0);

fn write_reg(reg: u32, v: u32) {
    // SAFETY: the I/O APIC page is mapped uncached by mm::init; IOREGSEL at
    // +0 selects the register, IOWIN at +0x10 is its value. Single CPU,
    // interrupts off in microhv, so the select/access pair is not split.
    unsafe {
        (IOAPIC_PHYS as *mut u32).write_volatile(reg);
        ((IOAPIC_PHYS + 0x10) as *mut u32).write_volatile(v);
    }
}

fn read_reg(reg: u32) -> u32 {
    // SAFETY: as in `write_reg`.
    unsafe {
        (IOAPIC_PHYS as *mut u32).write_volatile(reg);
        ((IOAPIC_PHYS + 0x10) as *const u32).read_volatile()
    }
}

fn set_entry(line: u32, low: u32) {
    // High half: destination APIC ID 0 (the boot CPU), physical mode.
    write_reg(REG_REDIR + 2 * line + 1, 0);
    write_reg(REG_REDIR + 2 * line, low);
}

/// Masks every input. Returns the number of inputs found.
pub fn init() -> u32 {
    let version = read_reg(REG_VERSION);
    let entries = ((version >> 16) & 0xff) + 1;
    if version == u32::MAX || entries < 16 {
        log::warn!("I/O APIC: none at {IOAPIC_PHYS:#x} (version register {version:#x}); device interrupts unavailable");
        return 0;
    }
    let entries = entries.min(LINES);
    for line in 0..entries {
        set_entry(line, MASKED | (VECTOR_BASE as u32 + line));
    }
    ENTRIES.store(entries, Ordering::Relaxed);
    log::info!("I/O APIC: {entries} inputs at {IOAPIC_PHYS:#x}, all masked; device lines go to Dom0 as events");
    entries
}

/// Whether Dom0 may bind `line`.
pub fn bindable(line: u64) -> bool {
    line < u64::from(ENTRIES.load(Ordering::Relaxed)) && !RESERVED_LINES.contains(&(line as u32))
}

/// Routes `line` (which must be [`bindable`]) level-triggered to its vector
/// and unmasks it.
pub fn unmask(line: u32) {
    set_entry(line, LEVEL | (VECTOR_BASE as u32 + line));
}

/// Masks `line` again (unbinding).
pub fn mask(line: u32) {
    set_entry(line, MASKED | LEVEL | (VECTOR_BASE as u32 + line));
}

/// The device line of interrupt `vector`, if it is one.
pub fn line_of(vector: u64) -> Option<u32> {
    let base = u64::from(VECTOR_BASE);
    (base..base + u64::from(LINES)).contains(&vector).then(|| (vector - base) as u32)
}

/// Called for a device vector: mask the line, EOI, remember it.
pub fn on_interrupt(line: u32) {
    mask(line);
    crate::apic::eoi();
    PENDING.fetch_or(1 << line, Ordering::SeqCst);
}

/// Whether a line fired and waits to be delivered.
pub fn has_pending() -> bool {
    PENDING.load(Ordering::SeqCst) != 0
}

/// Takes the set of lines that fired since the last call.
pub fn take_pending() -> u32 {
    PENDING.swap(0, Ordering::SeqCst)
}
