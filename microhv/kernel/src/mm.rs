//! Memory bring-up: the frame allocator from the multiboot map, the
//! hypervisor's own W^X page tables, and the heap.
//!
//! Address space: physical = virtual. RAM and the boot modules are mapped
//! read-write, never executable; the image is mapped per section (text RX,
//! rodata R, data/bss RW+NX); page 0 is left unmapped; the local APIC is
//! mapped uncached.

use core::ptr::addr_of;
use linked_list_allocator::LockedHeap;
use microhv_core::frame::{FrameAllocator, Mfn};
use microhv_core::memmap::MemoryMap;
use microhv_core::paging::{MapError, PageTables, PteFlags, TableMemory, SIZE_2M};
use microhv_core::range::{Range, RangeSet};
use microhv_core::PAGE_SIZE;
use spin::Mutex;

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __entry_start: u8;
    static __entry_text_end: u8;
    static __entry_data_end: u8;
    static __entry_end: u8;
    static __image_end: u8;
}

/// The most physical address space the frame allocator manages; RAM above
/// is ignored (and reported). The bitmap itself (one bit per frame up to
/// the top of RAM, 32 KiB per GiB) is carved out of free RAM at boot, so the
/// image does not carry it.
const MANAGED_LIMIT: u64 = 64 << 30;
/// The boot page tables identity-map this much; the bitmap must lie below.
const BOOT_IDENTITY_LIMIT: u64 = 4 << 30;

pub static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub const HEAP_SIZE: u64 = 16 << 20;

/// Sections of the hypervisor image.
pub struct ImageLayout {
    pub image: Range,
    pub text: Range,
    pub rodata: Range,
    /// The entry area: text, data (IDT/GDT/TSS/entry variables), stacks.
    pub entry_text: Range,
    pub entry_data: Range,
    pub entry_stack: Range,
    pub data: Range,
}

pub fn image_layout() -> ImageLayout {
    // Linker-script symbols: only their addresses are used.
    let a = |p: *const u8| p as u64;
    let (start, text_end, ro_end, end) =
        (a(addr_of!(__image_start)), a(addr_of!(__text_end)), a(addr_of!(__rodata_end)), a(addr_of!(__image_end)));
    let (e0, e1, e2, e3) =
        (a(addr_of!(__entry_start)), a(addr_of!(__entry_text_end)), a(addr_of!(__entry_data_end)), a(addr_of!(__entry_end)));
    ImageLayout {
        image: Range::new(start, end),
        text: Range::new(start, text_end),
        rodata: Range::new(text_end, ro_end),
        entry_text: Range::new(e0, e1),
        entry_data: Range::new(e1, e2),
        entry_stack: Range::new(e2, e3),
        data: Range::new(e3, end),
    }
}

/// Page-table frames come from the frame allocator and are reached through
/// the identity mapping (below 4 GiB while the boot tables are live).
struct AllocatorTables;

impl TableMemory for AllocatorTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let mfn = FRAMES.lock().as_mut()?.alloc_below(1 << 32)?;
        let pa = mfn.addr();
        // SAFETY: a freshly allocated frame, identity-mapped, owned by nobody else.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE as usize) };
        Some(pa)
    }

    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        // SAFETY: `pa` is a page-table frame this builder allocated (identity-mapped).
        unsafe { &mut *(pa as *mut [u64; 512]) }
    }
}

pub struct MemorySummary {
    pub usable: u64,
    pub high: u64,
    pub reserved: u64,
    pub free_frames: u64,
    pub total_frames: u64,
    pub ignored: u64,
    pub heap: Range,
    pub cr3: u64,
    /// PML4 entry 511 of microhv's tables: the entry-area alias, which every
    /// guest L4 gets in the same slot.
    pub hv_l4_entry: u64,
}

/// Everything that must never be handed out: image, modules, low 1 MiB.
pub fn build_allocator(map: &MemoryMap, modules: &RangeSet<{ microhv_core::multiboot::MAX_MODULES }>) -> Result<(), &'static str> {
    let layout = image_layout();
    let mut free = map.usable.clone();
    let err = "memory map too fragmented";
    free.remove(Range::new(0, 1 << 20)).map_err(|_| err)?;
    free.remove(layout.image).map_err(|_| err)?;
    for m in modules.iter() {
        free.remove(Range::new(m.start & !(PAGE_SIZE - 1), m.end.next_multiple_of(PAGE_SIZE))).map_err(|_| err)?;
    }
    // The bitmap: sized to the top of RAM, in the first free range below
    // the boot identity map that holds it, and never handed out.
    let top = free.iter().map(|r| r.end).max().unwrap_or(0).min(MANAGED_LIMIT);
    let words = top.div_ceil(PAGE_SIZE).div_ceil(64).max(1) as usize;
    let span = (words as u64 * 8).next_multiple_of(PAGE_SIZE);
    let at = free
        .iter()
        .map(|r| (r.start.next_multiple_of(PAGE_SIZE), r.end))
        .find(|&(start, end)| start + span <= end.min(BOOT_IDENTITY_LIMIT))
        .map(|(start, _)| start)
        .ok_or("no free memory below 4 GiB for the frame bitmap")?;
    free.remove(Range::new(at, at + span)).map_err(|_| err)?;
    // SAFETY: [at, at + span) is usable RAM below 4 GiB (identity-mapped
    // read-write by the boot tables, and later by microhv's own direct map),
    // page-aligned, outside the image and the modules, and now removed from
    // the free frames: nothing else will ever refer to it. Called once.
    let bits = unsafe { core::slice::from_raw_parts_mut(at as *mut u64, words) };
    let allocator = FrameAllocator::new(bits, &free);
    ACCESSIBLE.call_once(|| Accessible {
        big: allocator.managed().iter().max_by_key(|r| r.len()).unwrap_or(Range::new(0, 0)),
        managed: allocator.managed().clone(),
        modules: modules.clone(),
    });
    *FRAMES.lock() = Some(allocator);
    log::info!(
        "memory: frame bitmap at {:#x}, {} KiB for {} MiB of physical address space; {} managed ranges, {} module ranges",
        at,
        span / 1024,
        top >> 20,
        ACCESSIBLE.get().map_or(0, |a| a.managed.len()),
        modules.len()
    );
    Ok(())
}

/// Builds and loads the hypervisor's page tables, then sets up the heap.
pub fn init(map: &MemoryMap, modules: &RangeSet<{ microhv_core::multiboot::MAX_MODULES }>, apic_base: u64) -> Result<MemorySummary, MapError> {
    let layout = image_layout();
    let mut pt = PageTables::new(AllocatorTables)?;

    // RAM and modules, minus the image and page 0: read-write, no execute.
    let mut direct = map.usable.clone();
    for m in modules.iter() {
        let _ = direct.add(Range::new(m.start & !(PAGE_SIZE - 1), m.end.next_multiple_of(PAGE_SIZE)));
    }
    // The BIOS area below 1 MiB holds the multiboot structures: keep it readable.
    let _ = direct.add(Range::new(0, 1 << 20));
    let _ = direct.remove(layout.image);
    let _ = direct.remove(Range::new(0, PAGE_SIZE));
    let rw = PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
    for r in direct.iter() {
        pt.map_range(r.start, r.start, r.len(), rw)?;
    }
    // The image, per section.
    pt.map_range(layout.text.start, layout.text.start, layout.text.len(), PteFlags::empty())?;
    pt.map_range(layout.rodata.start, layout.rodata.start, layout.rodata.len(), PteFlags::NO_EXECUTE)?;
    pt.map_range(layout.entry_text.start, layout.entry_text.start, layout.entry_text.len(), PteFlags::empty())?;
    pt.map_range(layout.entry_data.start, layout.entry_data.start, layout.entry_data.len(), rw)?;
    pt.map_range(layout.entry_stack.start, layout.entry_stack.start, layout.entry_stack.len(), rw)?;
    // .data and .bss, except the stack's guard page (see stackwatch.rs).
    let guard = crate::stackwatch::guard_page();
    if layout.data.start <= guard && guard + PAGE_SIZE <= layout.data.end {
        pt.map_range(layout.data.start, layout.data.start, guard - layout.data.start, rw)?;
        pt.map_range(guard + PAGE_SIZE, guard + PAGE_SIZE, layout.data.end - guard - PAGE_SIZE, rw)?;
    } else {
        pt.map_range(layout.data.start, layout.data.start, layout.data.len(), rw)?;
    }
    // The entry-area alias in the last PML4 slot, shared with every guest:
    // text RX, data read-only, stacks RW.
    let alias = crate::trap::alias_of;
    pt.map_range(alias(layout.entry_text.start), layout.entry_text.start, layout.entry_text.len(), PteFlags::empty())?;
    pt.map_range(alias(layout.entry_data.start), layout.entry_data.start, layout.entry_data.len(), PteFlags::NO_EXECUTE)?;
    pt.map_range(alias(layout.entry_stack.start), layout.entry_stack.start, layout.entry_stack.len(), rw)?;
    let root = pt.root();
    let hv_l4_entry = pt.memory().table(root)[511];
    // Local APIC registers, uncached.
    pt.map_4k(apic_base, apic_base, rw | PteFlags::NO_CACHE | PteFlags::WRITE_THROUGH)?;
    // The I/O APIC's registers, uncached.
    pt.map_4k(crate::irq::IOAPIC_PHYS, crate::irq::IOAPIC_PHYS, rw | PteFlags::NO_CACHE | PteFlags::WRITE_THROUGH)?;

    let cr3 = pt.root();
    // SAFETY: the new tables map everything the running code touches (image,
    // stack in .bss, RAM, APIC) at the same addresses as the boot tables.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }

    // Heap: 4 MiB of contiguous frames, 2 MiB aligned.
    let heap_start = FRAMES
        .lock()
        .as_mut()
        .and_then(|a| a.alloc_contiguous(HEAP_SIZE / PAGE_SIZE, SIZE_2M / PAGE_SIZE))
        .ok_or(MapError::OutOfMemory)?
        .addr();
    // SAFETY: the frames were just taken from the allocator for the heap alone
    // and are mapped read-write.
    unsafe { HEAP.lock().init(heap_start as *mut u8, HEAP_SIZE as usize) };

    let frames = FRAMES.lock();
    let a = frames.as_ref().expect("allocator built before mm::init");
    let (_, high) = map.split_at_4g();
    Ok(MemorySummary {
        usable: map.usable.total(),
        high,
        reserved: map.reserved.total(),
        free_frames: a.free_frames(),
        total_frames: a.total_frames(),
        ignored: a.ignored_bytes(),
        heap: Range::new(heap_start, heap_start + HEAP_SIZE),
        cr3,
        hv_l4_entry,
    })
}

/// Translates `va` in the live hypervisor tables (for self-checks).
pub fn translate(cr3: u64, va: u64) -> Option<(u64, PteFlags)> {
    struct Live;
    impl TableMemory for Live {
        fn alloc_table(&mut self) -> Option<u64> {
            None
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            // SAFETY: walking the live tables, which are identity-mapped RAM.
            unsafe { &mut *(pa as *mut [u64; 512]) }
        }
    }
    PageTables::from_root(cr3, Live).translate(va)
}

/// Bytes of microhv's heap in use.
pub fn heap_used() -> usize {
    HEAP.lock().used()
}

pub fn heap_free() -> usize {
    HEAP.lock().free()
}

/// `count` contiguous frames below 4 GiB (for device DMA).
pub fn alloc_contiguous_low(count: u64) -> Option<Mfn> {
    let mut g = FRAMES.lock();
    let a = g.as_mut()?;
    let first = a.alloc_contiguous(count, 1)?;
    if (first.0 + count) * PAGE_SIZE > 1 << 32 {
        for f in first.0..first.0 + count {
            let _ = a.free(Mfn(f));
        }
        return None;
    }
    Some(first)
}

pub fn alloc_frame() -> Option<Mfn> {
    FRAMES.lock().as_mut()?.alloc()
}

pub fn free_frame(mfn: Mfn) -> Result<(), microhv_core::frame::FreeError> {
    FRAMES.lock().as_mut().expect("frame allocator").free(mfn)
}

pub fn free_frames() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |a| a.free_frames())
}

/// Machine memory through microhv's identity mapping of RAM.
pub struct Identity;

/// What machine-memory accesses may touch, fixed once the allocator exists:
/// the RAM it manages and the boot modules. A copy without a lock, so that
/// every shared-info or page-table access on the hypercall path does not
/// take the allocator's lock.
struct Accessible {
    /// The largest managed range, checked first: nearly every frame
    /// microhv touches lies in it.
    big: Range,
    managed: RangeSet<{ microhv_core::frame::MANAGED_RANGES }>,
    modules: RangeSet<{ microhv_core::multiboot::MAX_MODULES }>,
}

static ACCESSIBLE: spin::Once<Accessible> = spin::Once::new();

fn frame_ptr(mfn: microhv_core::machine::Mfn) -> *mut u8 {
    let addr = mfn.0 << 12;
    // Only RAM that the allocator manages and the boot modules (both
    // identity-mapped) are ever touched; anything else is a bug in the caller.
    let ok = ACCESSIBLE.get().is_some_and(|a| {
        a.big.contains(addr)
            || a.managed.contains(addr)
            || a.modules.iter().any(|r| r.start & !(PAGE_SIZE - 1) <= addr && addr < r.end)
    });
    assert!(ok, "machine access to unmanaged frame {:#x}", mfn.0);
    addr as *mut u8
}

impl microhv_core::machine::MachineMemory for Identity {
    fn read_u64(&self, mfn: microhv_core::machine::Mfn, index: usize) -> u64 {
        assert!(index < 512);
        // SAFETY: managed RAM frame, identity-mapped; aligned 8-byte read.
        unsafe { (frame_ptr(mfn) as *const u64).add(index).read_volatile() }
    }
    fn write_u64(&mut self, mfn: microhv_core::machine::Mfn, index: usize, val: u64) {
        assert!(index < 512);
        // SAFETY: as above; one aligned 8-byte store (atomic for the CPU's walker).
        unsafe { (frame_ptr(mfn) as *mut u64).add(index).write_volatile(val) }
    }
    fn read_bytes(&self, mfn: microhv_core::machine::Mfn, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= 4096);
        // SAFETY: bounds checked above; managed, identity-mapped RAM.
        unsafe { core::ptr::copy_nonoverlapping(frame_ptr(mfn).add(offset), buf.as_mut_ptr(), buf.len()) }
    }
    fn write_bytes(&mut self, mfn: microhv_core::machine::Mfn, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= 4096);
        // SAFETY: as in read_bytes.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), frame_ptr(mfn).add(offset), data.len()) }
    }
}

/// Frames the allocator can describe (for sizing the frame table).
pub fn frame_limit() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |a| a.managed().iter().map(|r| r.end).max().unwrap_or(0) / PAGE_SIZE)
}

/// True when the frame allocator manages `mfn` (usable RAM outside the image and modules).
pub fn is_managed(mfn: microhv_core::machine::Mfn) -> bool {
    FRAMES.lock().as_ref().is_some_and(|a| a.managed().contains(mfn.0 << 12))
}
