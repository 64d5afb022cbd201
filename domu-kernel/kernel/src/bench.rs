//! The benchmark mode of the demo DomU (`cmdline = "bench"`): runs each PV
//! benchmark many times and prints, per benchmark, every sample (guest
//! nanoseconds; under QEMU `-icount shift=0` one nanosecond is one
//! instruction) and the events microhv counted for it (`domain_counters`).
//! `cargo xtask bench` reads these lines and makes the report.
//!
//! Line format (parsed by `xtask::bench`):
//! * `BENCH-SAMPLES <name> <v1>,<v2>,...` (several lines per benchmark)
//! * `BENCH-EVENTS <name> ops=<n> hypercalls=<h> entries=<e> ...`
//! * `BENCH-DONE <count>`
extern crate alloc;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use microhv_guest::hypercall as hc;
use microhv_guest::shared_abi::hypercall::*;
use microhv_guest::{events, mm, println, time, traps, GuestVa, StartInfo};

static LAST_EVENT_NS: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn on_event(_port: u32) {
    LAST_EVENT_NS.store(time::now_ns(), Ordering::SeqCst);
    EVENTS.fetch_add(1, Ordering::SeqCst);
}

fn counters() -> DomainCounters {
    let mut c = DomainCounters::default();
    let me = microhv_guest::start_info().domid;
    // SAFETY: `c` is a live local of the right size.
    let _ = unsafe { hc::domain_counters(microhv_guest::DomId(me), GuestVa(&mut c as *mut _ as u64)) };
    c
}

/// Prints the samples and the counter deltas of one benchmark. The reads
/// count themselves: the second read's entry (one hypercall, one entry, one
/// CR3 load) and the first read's return (one CR3 load) are taken out.
fn report(name: &str, samples: &[u64], ops: u64, c0: &DomainCounters, c1: &DomainCounters) {
    // Short lines: the console splits lines longer than its line buffer.
    for chunk in samples.chunks(12) {
        let list: Vec<String> = chunk.iter().map(|s| format!("{s}")).collect();
        println!("BENCH-SAMPLES {name} {}", list.join(","));
    }
    println!(
        "BENCH-EVENTS {name} ops={ops} hypercalls={} entries={} exceptions={} upcalls={} interrupts={} cr3_loads={} switches={} hv_ns={} pt_updates={}",
        c1.hypercalls - c0.hypercalls - 1,
        c1.entries - c0.entries - 1,
        c1.exceptions_bounced - c0.exceptions_bounced,
        c1.upcalls - c0.upcalls,
        c1.interrupts - c0.interrupts,
        c1.cr3_loads - c0.cr3_loads - 2,
        c1.switches_in - c0.switches_in,
        c1.hv_ns - c0.hv_ns,
        c1.pt_updates - c0.pt_updates,
    );
}

/// Times `op` `n` times; each sample is one call.
fn measure(name: &str, n: usize, mut op: impl FnMut()) {
    let mut samples = Vec::with_capacity(n);
    // One warm-up call (QEMU translates code on its first run).
    op();
    let c0 = counters();
    for _ in 0..n {
        let t0 = time::now_ns();
        op();
        samples.push(time::now_ns() - t0);
    }
    let c1 = counters();
    report(name, &samples, n as u64, &c0, &c1);
}

static PF_SKIPS: AtomicU64 = AtomicU64::new(0);

/// A #PF at the benchmark's probe: resume at the address it left in RCX.
fn skip_fault(frame: &mut traps::ExceptionFrame) {
    if frame.vector == 14 {
        PF_SKIPS.fetch_add(1, Ordering::SeqCst);
        frame.rip = frame.rcx;
        return;
    }
    println!("bench: unexpected exception {} at {:#x}", frame.vector, frame.rip);
    microhv_guest::shutdown(SHUTDOWN_CRASH);
}

/// A spinner: yields for `ms` milliseconds of system time, then ends.
pub fn spin(ms: u64) {
    let end = time::now_ns() + ms * 1_000_000;
    while time::now_ns() < end {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::sched_yield() };
    }
}

/// The scheduler's cost per domain switch with `k` runnable domains (this
/// one and `k - 1` spinners that Dom0 spawns): each sample is one trip
/// around the run queue, divided by `k`.
fn switches(k: u64, n: usize) {
    // Let Dom0 spawn the spinners (they start before we measure).
    time::sleep_ns(500_000_000);
    let mut samples = Vec::with_capacity(n);
    // SAFETY: (both) no pointer arguments.
    let _ = unsafe { hc::sched_yield() };
    let c0 = counters();
    for _ in 0..n {
        let t0 = time::now_ns();
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::sched_yield() };
        samples.push((time::now_ns() - t0) / k);
    }
    let c1 = counters();
    report(&format!("domain_switch_k{k}"), &samples, n as u64, &c0, &c1);
}

pub fn run(si: &StartInfo, spare_va: u64) {
    let quick = si.cmdline().split_ascii_whitespace().any(|w| w == "quick");
    if let Some(k) = si.cmdline().split_ascii_whitespace().find_map(|w| w.strip_prefix("switch-k=")) {
        switches(k.parse().unwrap_or(2).max(1), if quick { 200 } else { 1000 });
        println!("BENCH-DONE 1");
        return;
    }
    let n = if quick { 200 } else { 1000 };
    println!("bench: PV benchmarks, {n} samples each{}", if quick { " (quick)" } else { "" });
    let mut count = 0;

    // 1. The cheapest hypercall there is.
    // SAFETY: (all hypercalls here) no pointer arguments unless noted.
    measure("null_hypercall", n, || {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::version(VERSION_ABI) };
    });
    count += 1;
    // 2. Privileged operations a kernel needs often.
    measure("set_timer", n, || {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::set_timer(time::now_ns() + 1_000_000_000) };
    });
    // SAFETY: no pointer arguments.
    let _ = unsafe { hc::set_timer(0) };
    measure("read_time", n, || {
        core::hint::black_box(time::now_ns());
    });
    measure("cpuid", n, || {
        // CPUID is available on every x86-64 CPU; ring 1 runs it natively.
        core::hint::black_box(core::arch::x86_64::__cpuid(0));
    });
    count += 3;

    // 3. Page-table updates through the validator: one entry, and 16 in one call.
    let slot = mm::l1_entry_maddr(spare_va).unwrap_or(0);
    let frame = mm::translate(si.virt_base).unwrap_or(0);
    let mut on = false;
    measure("pt_update", n, || {
        on = !on;
        let val = if on { (frame << 12) | mm::PTE_PRESENT | mm::PTE_NX } else { 0 };
        let _ = mm::mmu_update(&[MmuUpdate { ptr: slot, val }]);
    });
    let _ = mm::mmu_update(&[MmuUpdate { ptr: slot, val: 0 }]);
    // Sixteen consecutive entries of our own L1 (the spare slot's neighbours
    // are mapped: rewrite them with the same values, validated each time).
    let base = slot & !0xfff;
    let first = ((slot & 0xfff) / 8).saturating_sub(16) as usize;
    let reqs: Vec<MmuUpdate> = (first..first + 16)
        .map(|i| {
            let ptr = base + i as u64 * 8;
            MmuUpdate { ptr, val: mm::read_maddr(ptr).unwrap_or(0) }
        })
        .collect();
    measure("pt_update_batch16", n, || {
        let _ = mm::mmu_update(&reqs);
    });
    count += 2;

    // 4. A page fault handled by our own handler (bounced by microhv).
    traps::set_exception_hook(skip_fault);
    let probe = spare_va;
    measure("page_fault", n, || {
        // SAFETY: reads an unmapped address on purpose; the hook resumes at label 2.
        unsafe {
            core::arch::asm!("lea rcx, [rip + 2f]", "mov rax, qword ptr [{p}]", "2:", p = in(reg) probe, out("rax") _, out("rcx") _);
        }
    });
    count += 1;

    // 5. Timer: from the deadline to our handler.
    if let Ok(_port) = events::bind_virq(VIRQ_TIMER, on_event) {
        events::unmask_events();
        let mut samples = Vec::with_capacity(n);
        let c0 = counters();
        for _ in 0..n {
            let before = EVENTS.load(Ordering::SeqCst);
            let deadline = time::now_ns() + 200_000;
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::set_timer(deadline) };
            while EVENTS.load(Ordering::SeqCst) == before {
                // SAFETY: no pointer arguments.
                let _ = unsafe { hc::sched_block() };
            }
            samples.push(LAST_EVENT_NS.load(Ordering::SeqCst).saturating_sub(deadline));
        }
        let c1 = counters();
        report("timer_latency", &samples, n as u64, &c0, &c1);
        count += 1;
    }

    // 6. Event channel: send to ourselves, until the upcall handler runs.
    let me = microhv_guest::DomId(si.domid);
    // SAFETY: no pointer arguments.
    let ports = unsafe { hc::evtchn_alloc_unbound(me) }
        // SAFETY: no pointer arguments.
        .and_then(|a| unsafe { hc::evtchn_bind_interdomain(me, a) }.map(|b| (a as u32, b as u32)));
    if let Ok((a, b)) = ports {
        events::set_handler(a, on_event);
        events::set_handler(b, on_event);
        events::unmask_port(a);
        events::unmask_port(b);
        let mut samples = Vec::with_capacity(n);
        let c0 = counters();
        for _ in 0..n {
            let before = EVENTS.load(Ordering::SeqCst);
            let t0 = time::now_ns();
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::evtchn_send(u64::from(b)) };
            while EVENTS.load(Ordering::SeqCst) == before {
                core::hint::spin_loop();
            }
            samples.push(LAST_EVENT_NS.load(Ordering::SeqCst) - t0);
        }
        let c1 = counters();
        report("event_send_to_upcall", &samples, n as u64, &c0, &c1);
        count += 1;
    }

    // 6b. Event ping-pong with another domain (Dom0 pairs us with the
    // `peer` of our configuration; it runs `echo`).
    match crate::evping::Pinger::connect() {
        Ok(p) => {
            measure("event_pingpong", n, || p.round_trip());
            p.close();
            count += 1;
        }
        Err(e) => println!("bench: event_pingpong skipped: no echo peer ({e})"),
    }

    // 7. Console: 64 KiB (or `console-kib=`) through the PV console ring,
    // 1 KiB at a time. (Bochs sends serial output at the line's baud rate:
    // there it is kept small.)
    let kibs: usize = si.cmdline().split_ascii_whitespace().find_map(|w| w.strip_prefix("console-kib=")).and_then(|v| v.parse().ok()).unwrap_or(64);
    let kib = [b'.'; 1024];
    let mut samples = Vec::with_capacity(kibs);
    let c0 = counters();
    for _ in 0..kibs {
        let t0 = time::now_ns();
        microhv_guest::console::write_bytes(&kib);
        samples.push(time::now_ns() - t0);
    }
    microhv_guest::console::write_bytes(b"\n");
    let c1 = counters();
    report("console_1kib", &samples, kibs as u64, &c0, &c1);
    count += 1;

    // 8. Block: 4 KiB reads through blkfront, one at a time.
    if let Ok(mut d) = microhv_guest::blkfront::BlkFront::connect(0) {
        let layout = core::alloc::Layout::from_size_align(4096, 4096).expect("layout");
        // SAFETY: non-zero size; freed never.
        let buf = unsafe { core::slice::from_raw_parts_mut(alloc::alloc::alloc_zeroed(layout), 4096) };
        let mut sector = 0;
        let sectors = d.sectors();
        measure("block_read_4k", n.min(200), || {
            let _ = d.read(sector, buf);
            sector = (sector + 8) % sectors.max(8);
        });
        let _ = d.close();
        count += 1;
    }

    // 9. Yield (the scheduler's entry and exit, switching when another
    // domain is runnable).
    measure("sched_yield", n, || {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::sched_yield() };
    });
    count += 1;
    println!("BENCH-DONE {count}");
}
