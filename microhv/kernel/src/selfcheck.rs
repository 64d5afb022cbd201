//! The boot self-check: the timer ticks at the calibrated rate, the heap and
//! the frame allocator work, and the image is mapped W^X. Also the deliberate
//! faults that the system tests use to prove the crash path.

use crate::mm::{self, MemorySummary};
use crate::{apic, time};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use microhv_core::paging::PteFlags;
use microhv_core::range::{Range, RangeSet};
use microhv_core::PAGE_SIZE;

const TICK_HZ: u64 = 100;
const TICK_WINDOW_MS: u64 = 300;

pub fn run(summary: &MemorySummary, modules: &RangeSet<{ microhv_core::multiboot::MAX_MODULES }>) -> Result<(), String> {
    check_wx(summary.cr3)?;
    check_heap()?;
    check_frames(modules)?;
    check_timer()?;
    Ok(())
}

fn check_wx(cr3: u64) -> Result<(), String> {
    let l = mm::image_layout();
    let probe = |va: u64| mm::translate(cr3, va).ok_or_else(|| alloc::format!("{va:#x} not mapped"));
    let (_, text) = probe(l.text.start)?;
    let (_, ro) = probe(l.rodata.start)?;
    let (_, data) = probe(l.data.start)?;
    let ok = !text.contains(PteFlags::WRITABLE)
        && !text.contains(PteFlags::NO_EXECUTE)
        && !ro.contains(PteFlags::WRITABLE)
        && ro.contains(PteFlags::NO_EXECUTE)
        && data.contains(PteFlags::WRITABLE | PteFlags::NO_EXECUTE)
        && mm::translate(cr3, 0).is_none();
    if !ok {
        return Err(alloc::format!("W^X: text {text:?}, rodata {ro:?}, data {data:?}"));
    }
    log::info!("self-check: W^X ok (text RX, rodata R, data RW+NX, page 0 unmapped)");
    Ok(())
}

fn check_heap() -> Result<(), String> {
    let before = mm::heap_free();
    {
        let v: Vec<u64> = (0..20_000u64).collect();
        let sum: u64 = v.iter().sum();
        let mut m = BTreeMap::new();
        for i in 0..1000u32 {
            m.insert(i, alloc::format!("value {i}"));
        }
        if sum != 20_000 * 19_999 / 2 || m.get(&777).map(String::as_str) != Some("value 777") {
            return Err("heap: data read back wrong".into());
        }
    }
    let after = mm::heap_free();
    if after != before {
        return Err(alloc::format!("heap: {before} bytes free before, {after} after"));
    }
    log::info!("self-check: heap ok (160 KiB vector and a 1000-entry map allocated and freed, {} KiB free)", after / 1024);
    Ok(())
}

fn check_frames(modules: &RangeSet<{ microhv_core::multiboot::MAX_MODULES }>) -> Result<(), String> {
    const N: usize = 256;
    let image = mm::image_layout().image;
    let before = mm::free_frames();
    let mut got = Vec::with_capacity(N);
    for _ in 0..N {
        let f = mm::alloc_frame().ok_or("frames: out of memory")?;
        let r = Range::new(f.addr(), f.addr() + PAGE_SIZE);
        if r.overlaps(&image) || modules.overlaps(r) || f.addr() < 1 << 20 {
            return Err(alloc::format!("frames: handed out {:#x}, which is image, module or low memory", f.addr()));
        }
        // SAFETY: the frame is ours until freed below, and RAM is mapped RW.
        unsafe { core::ptr::write_bytes(f.addr() as *mut u8, (f.0 & 0xff) as u8, PAGE_SIZE as usize) };
        got.push(f);
    }
    for f in &got {
        // SAFETY: as above; reading back our own pattern.
        let b = unsafe { core::ptr::read_volatile((f.addr() + 123) as *const u8) };
        if b != (f.0 & 0xff) as u8 {
            return Err(alloc::format!("frames: frame {:#x} did not keep its pattern", f.addr()));
        }
    }
    let mut sorted: Vec<u64> = got.iter().map(|f| f.0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != N {
        return Err("frames: a frame was handed out twice".into());
    }
    for f in got {
        mm::free_frame(f).map_err(|e| alloc::format!("frames: free failed: {e:?}"))?;
    }
    if mm::free_frame(microhv_core::frame::Mfn::from_addr(image.start)).is_ok() {
        return Err("frames: freeing an image frame was accepted".into());
    }
    let after = mm::free_frames();
    if after != before {
        return Err(alloc::format!("frames: {before} free before, {after} after"));
    }
    log::info!("self-check: frames ok ({N} allocated, patterned, freed; image frame refused)");
    Ok(())
}

fn check_timer() -> Result<(), String> {
    let start_ticks = apic::ticks();
    apic::start_periodic(TICK_HZ);
    let t0 = time::rdtsc();
    let window = time::tsc_hz() * TICK_WINDOW_MS / 1000;
    x86_64::instructions::interrupts::enable();
    while time::rdtsc().wrapping_sub(t0) < window {
        x86_64::instructions::hlt();
    }
    x86_64::instructions::interrupts::disable();
    apic::stop_timer();
    let ticks = apic::ticks() - start_ticks;
    let expected = TICK_HZ * TICK_WINDOW_MS / 1000;
    log::info!("self-check: timer {ticks} ticks in {TICK_WINDOW_MS} ms of TSC time (expected {expected} at {TICK_HZ} Hz)");
    // The two clocks must agree; a wrong calibration or a dead timer is off by far more.
    if ticks * 10 < expected * 8 || ticks * 10 > expected * 12 {
        return Err(alloc::format!("timer: {ticks} ticks, expected {expected} +/- 20%"));
    }
    Ok(())
}

/// Triggers the fault named by `microhv.fault=` to prove the crash path.
pub fn deliberate_fault(kind: &str) {
    log::warn!("deliberate fault requested: {kind}");
    match kind {
        "pagefault" => {
            // SAFETY: not safe at all, on purpose: this address is unmapped and the
            // resulting #PF must produce a crash report and a failing exit code.
            let v = unsafe { core::ptr::read_volatile(0x0000_4000_0000_0000 as *const u64) };
            log::error!("read of an unmapped address returned {v:#x}");
        }
        "write-text" => {
            let text = mm::image_layout().text.start + 0x100;
            // SAFETY: deliberately writes to the read-only text section; W^X must
            // turn this into a #PF.
            unsafe { core::ptr::write_volatile(text as *mut u8, 0x90) };
            log::error!("write to the text section succeeded: W^X is broken");
        }
        "ud" => {
            // SAFETY: ud2 raises #UD, which is the point.
            unsafe { core::arch::asm!("ud2") };
        }
        "panic" => panic!("deliberate panic requested on the command line"),
        "stack-overflow" => {
            let n = overflow(0);
            log::error!("recursed {n} times without reaching the guard page");
        }
        other => log::warn!("unknown fault '{other}' (pagefault|write-text|ud|panic|stack-overflow); ignored"),
    }
}

/// Recurses, 512 bytes of stack a level, until the stack runs into its
/// guard page (the `stack-overflow` deliberate fault).
#[inline(never)]
#[allow(unconditional_recursion)]
fn overflow(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    overflow(depth + 1) + frame[depth as usize % 64]
}

/// Vector of the baseline's ring-0 interrupt round trip (DPL 0: a guest
/// that raises it gets #GP).
pub const BASELINE_VECTOR: u8 = 0x81;

/// The native floor for the benchmarks (`microhv.baseline` on the command
/// line): what an interrupt round trip, a CR3 reload and a time read cost
/// microhv itself, in ring 0, on this emulator. Printed in nanoseconds of
/// system time per operation (instructions under QEMU `-icount shift=0`).
pub fn baseline() {
    const N: u64 = 1000;
    let per = |f: &mut dyn FnMut()| {
        f();
        let t0 = crate::time::nanos_since_boot();
        for _ in 0..N {
            f();
        }
        // Tenths of a nanosecond per operation, in integers: the image
        // carries no float formatting.
        let tenths = (crate::time::nanos_since_boot() - t0) * 10 / N;
        Tenths(tenths)
    };
    let int = per(&mut || {
        // SAFETY: vector 0x81 has an IDT gate whose ring-0 handler only returns.
        unsafe { core::arch::asm!("int 0x81") };
    });
    let cr3 = per(&mut || {
        // SAFETY: reloading CR3 with its own value only flushes the TLB.
        unsafe {
            let v: u64;
            core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) v);
            core::hint::black_box(v);
        }
    });
    let time = per(&mut || {
        core::hint::black_box(crate::time::nanos_since_boot());
    });
    crate::println!("microhv: baseline: int_round_trip={int} cr3_reload={cr3} time_read={time} (ring 0, per operation, {N} each)");
}

/// A count of tenths, shown with one decimal (`58.0`).
struct Tenths(u64);

impl core::fmt::Display for Tenths {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.0 / 10, self.0 % 10)
    }
}
