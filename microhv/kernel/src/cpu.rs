//! The CPU's descriptor tables: GDT (with the ring-1 and ring-3 segments the
//! PV guests will use), the TSS with IST stacks and an all-deny I/O bitmap,
//! and the IDT that sends every vector to the trap stubs in `trap.rs`.

use core::arch::asm;
use core::mem::size_of;
use core::ptr::addr_of;

/// Selectors. Ring-1 selectors carry RPL 1, ring-3 ones RPL 3. The guest
/// selectors are in the GDT now and used once PV domains run.
pub const HV_CS: u16 = 0x08;
pub const HV_DS: u16 = 0x10;
#[allow(dead_code)]
pub const GUEST_KERNEL_CS: u16 = 0x18 | 1;
#[allow(dead_code)]
pub const GUEST_KERNEL_DS: u16 = 0x20 | 1;
#[allow(dead_code)]
pub const GUEST_USER_DS: u16 = 0x28 | 3;
#[allow(dead_code)]
pub const GUEST_USER_CS: u16 = 0x30 | 3;
pub const TSS_SEL: u16 = 0x38;

/// IST slots (1-based, as the IDT encodes them).
pub const IST_NMI: u8 = 1;
pub const IST_DOUBLE_FAULT: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;

/// The NMI, double-fault and machine-check handlers only print a crash
/// report and halt: 4 KiB each holds that, in debug builds too (the boot
/// test `a_stack_overflow_in_the_hypervisor_hits_the_guard_page_and_is_reported`
/// prints a whole report from the double-fault stack). Each is mapped in
/// every guest's entry area, so they are kept small.
const IST_STACK_SIZE: usize = 4 * 1024;

/// The I/O permission bitmap covers ports 0..0x1000 (every port a Dom0
/// device needs: COM1, PCI configuration, ATA); the CPU denies any port past
/// the bitmap's end (the TSS limit), so higher ports are always refused.
pub const IO_BITMAP_PORTS: usize = 0x1000;
const IO_BITMAP_BYTES: usize = IO_BITMAP_PORTS / 8;

/// 64-bit TSS followed by the I/O permission bitmap (all ports denied).
#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    pub rsp: [u64; 3],
    _reserved1: u64,
    pub ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    pub iomap_base: u16,
    pub io_bitmap: [u8; IO_BITMAP_BYTES],
    /// The CPU reads one byte past the bitmap; it must have all bits set.
    io_bitmap_end: u8,
}

const TSS_IOMAP_OFFSET: u16 = 104;
const _: () = assert!(core::mem::offset_of!(Tss, io_bitmap) == TSS_IOMAP_OFFSET as usize);

#[repr(C, align(4096))]
struct Stack([u8; IST_STACK_SIZE]);

/// The entry stack: TSS.RSP0. It holds only the trap frame of the vCPU being
/// entered or left (the handlers run on microhv's private stack).
const ENTRY_STACK_SIZE: usize = 4096;

#[link_section = ".entry_stack"]
static mut ENTRY_STACK: [u8; ENTRY_STACK_SIZE] = [0; ENTRY_STACK_SIZE];

#[link_section = ".entry_stack"]
static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];

#[link_section = ".entry_data"]
static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: TSS_IOMAP_OFFSET,
    io_bitmap: [0xff; IO_BITMAP_BYTES],
    io_bitmap_end: 0xff,
};

/// Segment descriptors with the accessed bit preset, so the CPU never needs
/// to write to the GDT (it can then be mapped read-only).
#[link_section = ".entry_data"]
static mut GDT: [u64; 9] = [
    0,
    0x00AF_9B00_0000_FFFF, // 0x08 code, DPL 0, long mode
    0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0
    0x00AF_BB00_0000_FFFF, // 0x18 code, DPL 1 (PV guest kernels)
    0x00CF_B300_0000_FFFF, // 0x20 data, DPL 1
    0x00CF_F300_0000_FFFF, // 0x28 data, DPL 3 (guest user code)
    0x00AF_FB00_0000_FFFF, // 0x30 code, DPL 3
    0,                     // 0x38 TSS, low half (filled in at init)
    0,                     // TSS, high half
];

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

#[link_section = ".entry_data"]
static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    _reserved: 0,
}; 256];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let mut low = (limit as u64 & 0xFFFF) | ((base & 0xFF_FFFF) << 16);
    low |= 0x89 << 40; // present, type 9 (available 64-bit TSS), DPL 0
    low |= ((limit as u64 >> 16) & 0xF) << 48;
    low |= ((base >> 24) & 0xFF) << 56;
    (low, base >> 32)
}

/// Alias address of the top of the entry stack (TSS.RSP0), where a trap
/// frame from a guest lands.
pub fn entry_stack_top_alias() -> u64 {
    crate::trap::alias_of(addr_of!(ENTRY_STACK) as u64 + ENTRY_STACK_SIZE as u64)
}

/// Identity address of the same trap-frame slot (for writing it before the
/// first entry into a guest).
pub fn guest_frame_identity() -> u64 {
    addr_of!(ENTRY_STACK) as u64 + ENTRY_STACK_SIZE as u64 - size_of::<crate::trap::TrapFrame>() as u64
}

/// Address (alias) of the trap frame a guest entry leaves on the entry stack.
pub fn guest_frame_alias() -> u64 {
    entry_stack_top_alias() - size_of::<crate::trap::TrapFrame>() as u64
}

/// Loads the GDT, TSS and IDT. Early in boot (`use_alias` false) they are
/// used at their identity addresses, so that crashes are reported; once
/// `mm::init` has mapped the entry area, they are reloaded at their alias
/// addresses, which every guest address space maps too.
pub fn init(use_alias: bool) {
    fn identity(a: u64) -> u64 {
        a
    }
    let alias: fn(u64) -> u64 = if use_alias { crate::trap::alias_of } else { identity };
    let stubs = alias(crate::trap::stub_identity());
    // SAFETY: single-threaded boot with interrupts disabled; nothing else
    // references these statics yet, and the tables outlive the CPU's use of them.
    unsafe {
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        let stacks = &*addr_of!(IST_STACKS);
        for (slot, stack) in [IST_NMI, IST_DOUBLE_FAULT, IST_MACHINE_CHECK].iter().zip(stacks.iter()) {
            tss.ist[*slot as usize - 1] = alias(stack.0.as_ptr() as u64 + IST_STACK_SIZE as u64);
        }
        tss.rsp[0] = alias(addr_of!(ENTRY_STACK) as u64 + ENTRY_STACK_SIZE as u64);

        let gdt = &mut *core::ptr::addr_of_mut!(GDT);
        let (lo, hi) = tss_descriptor(alias(addr_of!(TSS) as u64), size_of::<Tss>() as u32 - 1);
        gdt[7] = lo;
        gdt[8] = hi;
        // LTR writes the busy bit into the GDT, so load TR while the GDTR points
        // at the writable identity mapping; then switch the GDTR to the
        // read-only alias that guests can see.
        let limit = (size_of::<[u64; 9]>() - 1) as u16;
        let gdtr = DescriptorPointer { limit, base: gdt.as_ptr() as u64 };
        let gdtr_alias = DescriptorPointer { limit, base: alias(gdt.as_ptr() as u64) };
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            "lgdt [{gdtr_alias}]",
            gdtr = in(reg) &gdtr,
            gdtr_alias = in(reg) &gdtr_alias,
            cs = in(reg) HV_CS as u64,
            ds = in(reg) HV_DS as u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = out(reg) _,
        );

        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (vector, e) in idt.iter_mut().enumerate() {
            let handler = stubs + 16 * vector as u64;
            let ist = match vector {
                2 => IST_NMI,
                8 => IST_DOUBLE_FAULT,
                18 => IST_MACHINE_CHECK,
                _ => 0,
            };
            // The hypercall gate has DPL 1: ring 1 may `int 0x82`, ring 3 gets #GP.
            let dpl = if vector == shared_abi::HYPERCALL_VECTOR as usize { 1 } else { 0 };
            *e = IdtEntry {
                offset_low: handler as u16,
                selector: HV_CS,
                ist,
                type_attr: 0x8E | (dpl << 5), // present, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                _reserved: 0,
            };
        }
        let idtr = DescriptorPointer { limit: (size_of::<[IdtEntry; 256]>() - 1) as u16, base: alias(idt.as_ptr() as u64) };
        asm!("lidt [{}]", in(reg) &idtr);
    }
}

/// The serial port Dom0 drives (COM1, ports 0x3f8..=0x3ff).
pub const COM1_PORTS: core::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;
/// PCI configuration mechanism #1 (address 0xcf8, data 0xcfc..=0xcff).
pub const PCI_CONFIG_PORTS: core::ops::RangeInclusive<u16> = 0xcf8..=0xcff;
/// The primary ATA channel's command block (Dom0's disk when there is no
/// virtio-blk device, as in Bochs).
pub const ATA_PRIMARY_PORTS: core::ops::RangeInclusive<u16> = 0x1f0..=0x1f7;
/// The primary ATA channel's device control / alternate status register.
/// Its bitmap byte also covers 0x3f0..=0x3f5 and 0x3f7 (the floppy
/// controller), which stay closed: only this port's bit is opened.
pub const ATA_PRIMARY_CONTROL: u16 = 0x3f6;

/// Opens (or closes) the ports Dom0 owns in the TSS I/O bitmap for the guest
/// about to run: COM1, PCI configuration space and the primary ATA channel,
/// for Dom0 only. IOPL stays 0, so every other port still faults.
pub fn set_guest_port_access(allow: bool) {
    // SAFETY: the TSS is written through its identity mapping while no guest
    // runs (we are on the way out to one, interrupts off, single CPU).
    unsafe {
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        // Each range is exactly one bitmap byte; a clear bit allows the port.
        for ports in [COM1_PORTS, PCI_CONFIG_PORTS, ATA_PRIMARY_PORTS] {
            tss.io_bitmap[(*ports.start() / 8) as usize] = if allow { 0x00 } else { 0xff };
        }
        let (byte, bit) = ((ATA_PRIMARY_CONTROL / 8) as usize, 1u8 << (ATA_PRIMARY_CONTROL % 8));
        if allow {
            tss.io_bitmap[byte] &= !bit;
        } else {
            tss.io_bitmap[byte] |= bit;
        }
    }
}

// Every range above must fill exactly one bitmap byte, or the loop above
// would open ports next to it.
const _: () = {
    let ranges = [COM1_PORTS, PCI_CONFIG_PORTS, ATA_PRIMARY_PORTS];
    let mut i = 0;
    while i < ranges.len() {
        assert!(*ranges[i].start() & 7 == 0 && *ranges[i].end() == *ranges[i].start() + 7);
        // ... and lie inside the bitmap.
        assert!((*ranges[i].end() as usize) < IO_BITMAP_PORTS);
        i += 1;
    }
    assert!((ATA_PRIMARY_CONTROL as usize) < IO_BITMAP_PORTS);
    // The control port's byte is none of theirs.
    assert!(ATA_PRIMARY_CONTROL / 8 != *COM1_PORTS.start() / 8);
};

/// A VM exit leaves TR's limit at 0x67 (which cuts off the I/O bitmap) and
/// the GDTR/IDTR limits at 0xffff (SDM vol. 3, "Loading Host Segment and
/// Descriptor-Table Registers"): reload all three as `init` left them.
pub fn restore_after_vm_exit() {
    // SAFETY: single CPU, interrupts off (we are handling a VM exit). As in
    // `init`: the busy bit is cleared and TR loaded while the GDTR points at
    // the writable identity mapping, then the GDTR goes back to the alias.
    unsafe {
        let gdt = &mut *core::ptr::addr_of_mut!(GDT);
        gdt[7] &= !(0x2 << 40);
        let limit = (size_of::<[u64; 9]>() - 1) as u16;
        let gdtr = DescriptorPointer { limit, base: gdt.as_ptr() as u64 };
        let gdtr_alias = DescriptorPointer { limit, base: crate::trap::alias_of(gdt.as_ptr() as u64) };
        let idt = addr_of!(IDT) as u64;
        let idtr = DescriptorPointer { limit: (size_of::<[IdtEntry; 256]>() - 1) as u16, base: crate::trap::alias_of(idt) };
        asm!(
            "lgdt [{gdtr}]",
            "ltr {tss:x}",
            "lgdt [{gdtr_alias}]",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            gdtr_alias = in(reg) &gdtr_alias,
            idtr = in(reg) &idtr,
            tss = in(reg) TSS_SEL as u64,
        );
    }
}
