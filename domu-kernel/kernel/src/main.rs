//! The demo DomU: a small PV guest kernel that shows each PV service at
//! work — timers and sleeping, memory ballooning through the PV MMU,
//! yielding, events — and shuts down cleanly.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("domu-kernel is a guest kernel: build and boot it with `cargo xtask qemu`.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod guest {
    use core::sync::atomic::{AtomicU64, Ordering};
    use domu_core::{error_permille, ms_parts, pattern, within};
    use microhv_guest::hypercall as hc;
    use microhv_guest::shared_abi::hypercall::*;
    use microhv_guest::{entry, events, mm, println, time, Errno, GuestVa, StartInfo};

    entry!(main);

    /// Pages kept out of the heap so they can be ballooned.
    const BALLOON_PAGES: u64 = 16;

    static TIMER_EVENTS: AtomicU64 = AtomicU64::new(0);

    fn on_timer(_port: u32) {
        TIMER_EVENTS.fetch_add(1, Ordering::SeqCst);
    }

    fn main(si: &'static StartInfo) -> ! {
        let heap = microhv_guest::init_heap(si, BALLOON_PAGES);
        // SAFETY (all hypercalls below): pointer arguments point at live locals.
        let abi = unsafe { hc::version(VERSION_ABI) }.unwrap_or(0);
        println!(
            "{} up: domid {}, {} pages ({} KiB), limit {} pages, heap {} KiB, ABI {}.{}, cmdline {:?}",
            si.name(), si.domid, si.nr_pages, si.nr_pages * 4, si.max_pages, heap / 1024, abi >> 16, abi & 0xffff, si.cmdline()
        );

        timers(si);
        balloon(si);

        let mut yields = 0;
        for _ in 0..5 {
            if unsafe { hc::sched_yield() }.is_ok() {
                yields += 1;
            }
        }
        println!("yield: gave up the CPU {yields} times");

        let mut info = [DomainInfo::default(); 4];
        match unsafe { hc::domctl_list(GuestVa(info.as_mut_ptr() as u64), 4) } {
            Err(e) if e == Errno::EPERM => println!("privileged domctl_list refused as expected: {e}"),
            other => println!("privileged domctl_list: unexpected {other:?}"),
        }
        println!("done: {} timer events handled; shutting down", events::events_seen());
        microhv_guest::shutdown(SHUTDOWN_POWEROFF)
    }

    /// Sleeps for set durations, one-shot timer + block, and sched_poll.
    fn timers(si: &StartInfo) {
        let port = match events::bind_virq(VIRQ_TIMER, on_timer) {
            Ok(p) => p,
            Err(e) => {
                println!("bind VIRQ_TIMER failed: {e}");
                return;
            }
        };
        events::unmask_events();
        // Warm-up round, not reported: under QEMU TCG the first run of each
        // code path (timer, upcall, iret) includes translating it, which adds
        // about 2 ms to the first sleep.
        for warm in 0..2 {
            let before = TIMER_EVENTS.load(Ordering::SeqCst);
            let _ = unsafe { hc::set_timer(time::now_ns() + 1_000_000) };
            while TIMER_EVENTS.load(Ordering::SeqCst) == before {
                let _ = unsafe { hc::sched_block() };
            }
            time::sleep_ns(1_000_000 + warm);
        }
        let base = if si.name().ends_with('2') { 15 } else { 10 };
        for (i, ms) in [base, base * 2, base * 5].into_iter().enumerate() {
            let asked = ms * 1_000_000;
            let t0 = time::now_ns();
            let how = if i % 2 == 0 {
                // One-shot timer, then block until its event arrives.
                let before = TIMER_EVENTS.load(Ordering::SeqCst);
                let _ = unsafe { hc::set_timer(t0 + asked) };
                while TIMER_EVENTS.load(Ordering::SeqCst) == before {
                    let _ = unsafe { hc::sched_block() };
                }
                "timer event"
            } else {
                time::sleep_until(t0 + asked);
                "sched_poll"
            };
            let took = time::now_ns() - t0;
            let (m, f) = ms_parts(took);
            let e = error_permille(asked, took);
            println!(
                "sleep {ms} ms ({how}, port {port}): measured {m}.{f:03} ms, error {}{}.{}% {}",
                if e < 0 { "-" } else { "+" }, e.unsigned_abs() / 10, e.unsigned_abs() % 10,
                if within(asked, took, 10) { "ok" } else { "OUT OF TOLERANCE" }
            );
        }
    }

    /// Balloon down the reserved pages, then up again with new frames.
    fn balloon(si: &StartInfo) {
        let first = si.virt_base + (si.nr_pages - BALLOON_PAGES) * mm::PAGE;
        let vas: [u64; BALLOON_PAGES as usize] = core::array::from_fn(|i| first + i as u64 * mm::PAGE);
        let before = mm::memory_query().map(|m| m.nr_pages).unwrap_or(0);
        let mut mfns = [0u64; BALLOON_PAGES as usize];
        for (va, mfn) in vas.iter().zip(mfns.iter_mut()) {
            *mfn = mm::translate(*va).unwrap_or(0);
            if let Err(e) = mm::unmap(*va) {
                println!("balloon: unmap {va:#x} failed: {e}");
                return;
            }
        }
        let released = unsafe { hc::memory_release(GuestVa(mfns.as_ptr() as u64), BALLOON_PAGES) };
        let mid = mm::memory_query().map(|m| m.nr_pages).unwrap_or(0);
        let mut new = [0u64; BALLOON_PAGES as usize];
        let populated = unsafe { hc::memory_populate(GuestVa(new.as_mut_ptr() as u64), BALLOON_PAGES) };
        let mut ok = populated == Ok(BALLOON_PAGES);
        for (p, (va, mfn)) in vas.iter().zip(new.iter()).enumerate() {
            if mm::map(*va, *mfn, true).is_err() {
                ok = false;
                continue;
            }
            let page = *va as *mut u64;
            for i in 0..512u64 {
                // SAFETY: `va` now maps a fresh frame of ours, read-write.
                unsafe { page.add(i as usize).write_volatile(pattern(si.name(), p as u64, i)) };
            }
            for i in 0..512u64 {
                // SAFETY: as above.
                if unsafe { page.add(i as usize).read_volatile() } != pattern(si.name(), p as u64, i) {
                    ok = false;
                }
            }
        }
        let after = mm::memory_query().map(|m| m.nr_pages).unwrap_or(0);
        // Asking for more than the limit allows must fail.
        let mut extra = [0u64; 64];
        let over = match unsafe { hc::memory_populate(GuestVa(extra.as_mut_ptr() as u64), 64) } {
            Ok(n) => {
                let _ = unsafe { hc::memory_release(GuestVa(extra.as_ptr() as u64), n) };
                alloc_free_result(n)
            }
            Err(e) => e.name(),
        };
        println!(
            "balloon: {before} pages -> released {:?} -> {mid} -> populated {:?} -> {after}; new frames mapped, written and read back {}; past the limit: {over}",
            released, populated, if ok { "ok" } else { "FAILED" }
        );
    }

    fn alloc_free_result(n: u64) -> &'static str {
        if n == 0 { "0 pages" } else { "some pages (limit not enforced?)" }
    }
}
