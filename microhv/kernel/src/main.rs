//! microhv: the bare-metal hypervisor binary. It stays thin: boot glue, the
//! hardware drivers it needs (serial, APIC, PIT) and the wiring of the
//! host-tested logic in `microhv-core` to the real machine.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("microhv is a bare-metal binary: build and boot it with `cargo xtask qemu`.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod apic;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod cpu;
#[cfg(target_os = "none")]
mod crash;
#[cfg(target_os = "none")]
mod domain;
#[cfg(target_os = "none")]
mod hvm;
#[cfg(target_os = "none")]
mod hypercall;
#[cfg(target_os = "none")]
mod irq;
#[cfg(target_os = "none")]
mod mm;
#[cfg(target_os = "none")]
mod power;
#[cfg(target_os = "none")]
mod selfcheck;
#[cfg(target_os = "none")]
mod stackwatch;
#[cfg(target_os = "none")]
mod time;
#[cfg(target_os = "none")]
mod trap;
#[cfg(target_os = "none")]
mod vmx;

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
extern "C" {
    static boot_stack_top: u8;
}

#[cfg(target_os = "none")]
mod start {
    use crate::{apic, console, cpu, mm, power, println, selfcheck, time};
    use microhv_core::cmdline::Cmdline;
    use microhv_core::memmap::{parse_multiboot_mmap, MemoryMap};
    use microhv_core::multiboot::{BootInfo, PhysMem, MAX_MMAP_BYTES};
    use microhv_core::range::RangeSet;
    use shared_abi::exit;

    /// Reads physical memory through the identity mapping (boot tables: 4 GiB).
    struct IdentityMem;

    impl PhysMem for IdentityMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let Some(end) = addr.checked_add(buf.len() as u64) else { return false };
            if addr < 0x1000 || end > 1 << 32 {
                return false;
            }
            // SAFETY: [addr, end) lies in the identity-mapped first 4 GiB, outside
            // page 0; the boot loader put its structures there and we only read.
            unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
            true
        }
    }

    fn fail(what: &str) -> ! {
        log::error!("boot failed: {what}");
        println!("microhv: boot FAILED: {what}");
        power::off(exit::FAILURE)
    }

    #[no_mangle]
    extern "C" fn kernel_main(magic: u32, mbi: u32) -> ! {
        crate::stackwatch::paint();
        console::init();
        time::mark_boot();
        println!();
        println!("=====================================================================");
        println!(" microhv {} - a small Xen-style paravirtualizing hypervisor, x86_64", env!("CARGO_PKG_VERSION"));
        println!(" ABI version {}.{}", shared_abi::ABI_VERSION.0, shared_abi::ABI_VERSION.1);
        println!("=====================================================================");
        cpu::init(false);

        let info = match BootInfo::read(&IdentityMem, magic, mbi as u64) {
            Ok(i) => i,
            Err(e) => fail(&alloc_free_fmt(format_args!("multiboot info: {e:?}"))),
        };
        let cmdline = Cmdline(info.cmdline.as_str());
        if let Err(bad) = console::init_logger(cmdline.get("loglevel")) {
            log::warn!("unknown loglevel '{bad}', using info (error|warn|info|debug|trace)");
        }
        log::info!("boot loader: {:?}, command line: {:?}", info.loader_name.as_str(), cmdline.0);

        // The memory map.
        let mut raw = [0u8; MAX_MMAP_BYTES];
        let raw = match info.read_mmap(&IdentityMem, &mut raw) {
            Ok(r) => r,
            Err(e) => fail(&alloc_free_fmt(format_args!("memory map: {e:?}"))),
        };
        let mut entries = [None; 64];
        for (slot, e) in entries.iter_mut().zip(parse_multiboot_mmap(raw)) {
            match e {
                Ok(e) => {
                    log::debug!("  mmap {:#014x}..{:#014x} {}", e.base, e.base.saturating_add(e.len), e.kind.name());
                    *slot = Some(e);
                }
                Err(e) => log::warn!("memory map entry ignored: {e:?}"),
            }
        }
        let map = match MemoryMap::from_entries(entries.iter().flatten().copied()) {
            Ok(m) => m,
            Err(_) => fail("memory map has too many disjoint ranges"),
        };

        let mut modules = RangeSet::<{ microhv_core::multiboot::MAX_MODULES }>::new();
        for m in info.modules() {
            if modules.add(m.range).is_err() {
                fail("too many boot modules to keep track of");
            }
        }
        if let Err(e) = mm::build_allocator(&map, &modules) {
            fail(e);
        }
        let apic_phys = apic::phys_base();
        let summary = match mm::init(&map, &modules, apic_phys) {
            Ok(s) => s,
            Err(e) => fail(&alloc_free_fmt(format_args!("page tables: {e:?}"))),
        };
        cpu::init(true);
        // SAFETY: only the address of the boot stack is taken; after boot it
        // becomes microhv's private stack for trap handling.
        crate::trap::set_hypervisor_context(summary.cr3, core::ptr::addr_of!(crate::boot_stack_top) as u64);
        apic::init(apic_phys as usize);
        let cal = apic::calibrate();
        time::set_tsc_hz(cal.tsc_hz);

        let image = mm::image_layout();
        log::info!("memory: {} MiB usable ({} MiB above 4 GiB), {} MiB reserved by firmware, {} map entries ({} zero-length skipped, {} overlaps resolved)",
            summary.usable >> 20, summary.high >> 20, summary.reserved >> 20, map.entries, map.zero_length_skipped, map.overlaps_resolved);
        log::info!("memory: image {:#x}..{:#x} ({} KiB: text {} KiB RX, rodata {} KiB R, data+bss {} KiB RW)",
            image.image.start, image.image.end, image.image.len() >> 10,
            image.text.len() >> 10, image.rodata.len() >> 10, image.data.len() >> 10);
        log::info!("memory: {} of {} frames free ({} MiB), heap {} KiB at {:#x}, page tables at {:#x}",
            summary.free_frames, summary.total_frames, summary.free_frames * 4 / 1024,
            summary.heap.len() >> 10, summary.heap.start, summary.cr3);
        if summary.ignored > 0 {
            log::warn!("memory: {} MiB above the allocator's 64 GiB limit are not used", summary.ignored >> 20);
        }
        log::info!("timer: TSC {}.{:03} MHz, APIC timer {}.{:03} MHz (bus/16), calibrated against the PIT",
            cal.tsc_hz / 1_000_000, cal.tsc_hz / 1000 % 1000, cal.apic_timer_hz / 1_000_000, cal.apic_timer_hz / 1000 % 1000);
        log::info!("modules: {}", info.module_count);
        for (i, m) in info.modules().enumerate() {
            log::info!("  module {i}: {:#x}..{:#x} {:>7} KiB  {}", m.range.start, m.range.end, m.range.len().div_ceil(1024), m.name.as_str());
        }

        if let Some(kind) = cmdline.get("microhv.fault") {
            selfcheck::deliberate_fault(kind);
        }

        if let Err(e) = selfcheck::run(&summary, &modules) {
            println!("microhv: self-check FAILED: {e}");
            power::off(exit::FAILURE)
        }
        if cmdline.flag("microhv.baseline") {
            selfcheck::baseline();
        }
        match crate::vmx::probe() {
            Ok(rev) => log::info!("VT-x: VMXON ok, VMCS revision {rev:#x}, VMCS field round trip ok; HVM domains can run"),
            Err(why) => log::info!("VT-x: {why}; HVM domains will be refused"),
        }
        if info.module_count == 0 {
            println!("microhv: self-check PASSED; no modules, so no domains; powering off");
            power::off(exit::SUCCESS)
        }
        println!("microhv: self-check PASSED; starting {} domains", info.module_count);
        let mods: alloc::vec::Vec<(&'static [u8], alloc::string::String)> = info
            .modules()
            .map(|m| {
                // SAFETY: module ranges are mapped read-only-for-us RAM that the
                // frame allocator never hands out; they live as long as microhv.
                let bytes = unsafe { core::slice::from_raw_parts(m.range.start as *const u8, m.range.len() as usize) };
                (bytes, alloc::string::String::from(m.name.as_str()))
            })
            .collect();
        let device_frames = map.device_frames(&[apic_phys, crate::irq::IOAPIC_PHYS]);
        crate::irq::init();
        crate::domain::start(&mods, summary.hv_l4_entry, device_frames)
    }

    /// Formats into a fixed buffer (used before the heap exists).
    fn alloc_free_fmt(args: core::fmt::Arguments) -> FixedStr {
        use core::fmt::Write;
        let mut s = FixedStr { buf: [0; 160], len: 0 };
        let _ = s.write_fmt(args);
        s
    }

    struct FixedStr {
        buf: [u8; 160],
        len: usize,
    }

    impl core::fmt::Write for FixedStr {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }

    impl core::ops::Deref for FixedStr {
        type Target = str;
        fn deref(&self) -> &str {
            core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(unprintable)")
        }
    }
}
