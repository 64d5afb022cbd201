//! The demo DomU: a small PV guest kernel that shows each PV service at
//! work — timers and sleeping, memory ballooning through the PV MMU,
//! yielding, events — and shuts down cleanly.
//!
//! With the `hvm` feature (and without the default `pv`) the same demo is
//! built as an unmodified multiboot1 kernel for microhv's HVM platform
//! (`hvm.rs`): it knows no hypercalls, only the UART, the x2APIC timer and
//! HLT, and powers off through port 0xf4.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("domu-kernel is a guest kernel: build and boot it with `cargo xtask qemu`.");
    std::process::exit(2);
}

#[cfg(all(target_os = "none", not(feature = "hvm")))]
mod bench;

#[cfg(all(feature = "pv", feature = "hvm"))]
compile_error!("build the HVM flavour with --no-default-features --features hvm");

#[cfg(all(target_os = "none", feature = "hvm"))]
mod hvm;

/// The disk demo, shared by the PV guest and the hybrid (PVHVM) flavour.
#[cfg(target_os = "none")]
mod disk;

/// The event ping-pong benchmark's two sides, shared likewise.
#[cfg(target_os = "none")]
mod evping;

#[cfg(all(target_os = "none", not(feature = "hvm")))]
mod guest {
    extern crate alloc;
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
        // The balloon pages, and one more virtual slot for mapping a peer's ring.
        let heap = microhv_guest::init_heap(si, BALLOON_PAGES + 1);
        // SAFETY: (all hypercalls below) pointer arguments point at live locals.
        let abi = unsafe { hc::version(VERSION_ABI) }.unwrap_or(0);
        println!(
            "{} up: domid {}, {} pages ({} KiB), limit {} pages, heap {} KiB, ABI {}.{}, cmdline {:?}",
            si.name(), si.domid, si.nr_pages, si.nr_pages * 4, si.max_pages, heap / 1024, abi >> 16, abi & 0xffff, si.cmdline()
        );

        // Load for the scheduler benchmark: yield until the time is up. No
        // store, no console backend (Dom0 spawns these without them).
        if let Some(ms) = si.cmdline().split_ascii_whitespace().find_map(|w| w.strip_prefix("spin-ms=")) {
            crate::bench::spin(ms.parse().unwrap_or(1000));
            microhv_guest::shutdown(SHUTDOWN_POWEROFF);
        }
        // Wait until Dom0's store answers: its start-up work (building the other
        // DomUs, connecting backends) is then over and does not skew the timings.
        let _ = microhv_guest::store::read(&alloc::format!("{}/name", microhv_guest::store::home()));
        // The other side of the event ping-pong benchmark.
        if si.cmdline().split_ascii_whitespace().any(|w| w == "echo") {
            match crate::evping::echo() {
                Ok(n) => println!("echo: answered {n} events; the other side closed its port"),
                Err(e) => println!("echo: FAILED: {e}"),
            }
            microhv_guest::shutdown(SHUTDOWN_POWEROFF);
        }
        if si.cmdline().split_ascii_whitespace().any(|w| w == "bench") {
            // The spare slot below the balloon pages, unmapped: the benchmarks
            // rewrite its page-table entry and fault on it.
            let spare = si.virt_base + (si.nr_pages - BALLOON_PAGES - 1) * mm::PAGE;
            let _ = mm::unmap(spare);
            crate::bench::run(si, spare);
            microhv_guest::shutdown(SHUTDOWN_POWEROFF);
        }
        timers(si);
        balloon(si);
        pingpong::run(si);
        crate::disk::run(si.name());

        let mut yields = 0;
        for _ in 0..5 {
            // SAFETY: no pointer arguments.
            if unsafe { hc::sched_yield() }.is_ok() {
                yields += 1;
            }
        }
        println!("yield: gave up the CPU {yields} times");

        let mut info = [DomainInfo::default(); 4];
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        match unsafe { hc::domctl_list(GuestVa(info.as_mut_ptr() as u64), 4) } {
            Err(e) if e == Errno::EPERM => println!("privileged domctl_list refused as expected: {e}"),
            other => println!("privileged domctl_list: unexpected {other:?}"),
        }
        let mut input = [0u8; 128];
        let n = microhv_guest::console::read_input(&mut input);
        if n > 0 {
            println!("console input received: {:?}", core::str::from_utf8(&input[..n]).unwrap_or("(not UTF-8)").trim_end());
        }
        println!("done: {} events handled; shutting down", events::events_seen());
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
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::set_timer(time::now_ns() + 1_000_000) };
            while TIMER_EVENTS.load(Ordering::SeqCst) == before {
                // SAFETY: no pointer arguments.
                let _ = unsafe { hc::sched_block() };
            }
            time::sleep_ns(1_000_000 + warm);
        }
        let base = if si.name().ends_with('2') { 30 } else { 20 };
        for (i, ms) in [base, base * 2, base * 5].into_iter().enumerate() {
            let asked = ms * 1_000_000;
            let t0 = time::now_ns();
            let how = if i % 2 == 0 {
                // One-shot timer, then block until its event arrives.
                let before = TIMER_EVENTS.load(Ordering::SeqCst);
                // SAFETY: no pointer arguments.
                let _ = unsafe { hc::set_timer(t0 + asked) };
                while TIMER_EVENTS.load(Ordering::SeqCst) == before {
                    // SAFETY: no pointer arguments.
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
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        let released = unsafe { hc::memory_release(GuestVa(mfns.as_ptr() as u64), BALLOON_PAGES) };
        let mid = mm::memory_query().map(|m| m.nr_pages).unwrap_or(0);
        let mut new = [0u64; BALLOON_PAGES as usize];
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
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
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        let over = match unsafe { hc::memory_populate(GuestVa(extra.as_mut_ptr() as u64), 64) } {
            Ok(n) => {
                // SAFETY: the pointer arguments are live locals of this function or pages we own.
                let _ = unsafe { hc::memory_release(GuestVa(extra.as_ptr() as u64), n) };
                "granted (the limit was not enforced)"
            }
            Err(e) => e.name(),
        };
        println!(
            "balloon: {before} pages -> released {:?} -> {mid} -> populated {:?} -> {after}; new frames mapped, written and read back {}; past the limit: {over}",
            released, populated, if ok { "ok" } else { "FAILED" }
        );
    }

    /// DomU-to-DomU ping-pong: the peers find each other through the store,
    /// the front end grants a ring page and offers an event channel, the back
    /// end maps and binds them, and they exchange messages with a checksum.
    mod pingpong {
        extern crate alloc;
        use alloc::format;
        use alloc::vec::Vec;
        use core::sync::atomic::{AtomicU64, Ordering};
        use domu_core::{checksum, median_p95, ping_value, pong_value, Ping, Pong};
        use microhv_guest::hypercall as hc;
        use microhv_guest::mm::{self, SharedPage};
        use microhv_guest::shared_abi::device::{check_transition_for, DeviceState, Role};
        use microhv_guest::shared_abi::ring::{BackRing, FrontRing};
        use microhv_guest::{events, println, store, time, DomId, Errno, GuestVa, Mfn, StartInfo};

        const MESSAGES: u32 = 256;
        const BATCH: u32 = 16;
        const WAIT: u64 = 3_000_000_000;

        static RING_EVENTS: AtomicU64 = AtomicU64::new(0);

        fn on_ring(_port: u32) {
            RING_EVENTS.fetch_add(1, Ordering::SeqCst);
        }

        struct Dev {
            role: Role,
            state: DeviceState,
            path: alloc::string::String,
        }

        impl Dev {
            fn set(&mut self, to: DeviceState) -> Result<(), Errno> {
                check_transition_for(self.role, self.state, to)?;
                store::write_str(&self.path, to.to_str())?;
                self.state = to;
                Ok(())
            }
        }

        fn state_is(path: &str, want: DeviceState) -> Result<(), Errno> {
            store::wait_for(path, WAIT, |v| DeviceState::from_value(v) == Ok(want)).map(|_| ())
        }

        fn wait_event(seen: u64) {
            if RING_EVENTS.load(Ordering::SeqCst) == seen {
                // SAFETY: no pointers; wakes on the ring's event or after 5 ms.
                let _ = unsafe { hc::sched_poll(time::now_ns() + 5_000_000) };
            }
        }

        pub fn run(si: &StartInfo) {
            let home = store::home();
            let Ok(peer) = store::read_u64(&format!("{home}/peer")) else {
                println!("pingpong: no peer in the store; skipped");
                return;
            };
            let r = if (si.domid as u64) < peer { front(si, DomId(peer as u16)) } else { back(si, DomId(peer as u16)) };
            if let Err(e) = r {
                println!("pingpong: FAILED: {e}");
            }
        }

        fn front(_si: &StartInfo, peer: DomId) -> Result<(), Errno> {
            let home = store::home();
            let peer_home = microhv_guest::shared_abi::store::domain_path(peer);
            let mut dev = Dev { role: Role::Frontend, state: DeviceState::Unknown, path: format!("{home}/pingpong/state") };
            dev.set(DeviceState::Initialising)?;
            // A zeroed, page-aligned page of our heap becomes the ring.
            let layout = core::alloc::Layout::from_size_align(4096, 4096).map_err(|_| Errno::EINVAL)?;
            // SAFETY: non-zero size; the page is never freed while shared.
            let va = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
            let mfn = mm::translate(va).ok_or(Errno::EFAULT)?;
            // SAFETY: (hypercalls below) no pointers beyond live locals.
            let gref = unsafe { hc::grant_access(peer, Mfn(mfn), 0) }?;
            // SAFETY: no pointer arguments.
            let port = unsafe { hc::evtchn_alloc_unbound(peer) }? as u32;
            events::set_handler(port, on_ring);
            events::unmask_port(port);
            let mut page = SharedPage(va as *mut u8);
            let mut ring: FrontRing<Ping, Pong> = FrontRing::init(&mut page);
            store::write_str(&format!("{home}/pingpong/ring-ref"), &format!("{gref}"))?;
            store::write_str(&format!("{home}/pingpong/event-channel"), &format!("{port}"))?;
            dev.set(DeviceState::Initialised)?;
            state_is(&format!("{peer_home}/pingpong/state"), DeviceState::Connected)?;
            dev.set(DeviceState::Connected)?;

            let (mut sent, mut got, mut bad, mut sum) = (0u32, 0u32, 0u32, 0u64);
            let mut rtts: Vec<u64> = Vec::with_capacity(MESSAGES as usize);
            let t0 = time::now_ns();
            while got < MESSAGES {
                while sent < MESSAGES && sent - got < BATCH {
                    let v = ping_value(sent);
                    sum = checksum(sum, v);
                    ring.push_request(&mut page, &Ping { seq: sent, _pad: 0, value: v, sent_tsc: time::now_ns() })
                        .map_err(Errno::from)?;
                    sent += 1;
                }
                if ring.push_requests_and_check_notify(&mut page) {
                    // SAFETY: no pointer arguments.
                    let _ = unsafe { hc::evtchn_send(port as u64) };
                }
                let seen = RING_EVENTS.load(Ordering::SeqCst);
                let mut any = false;
                while let Some(p) = ring.take_response(&page).map_err(Errno::from)? {
                    any = true;
                    got += 1;
                    rtts.push(time::now_ns().saturating_sub(p.sent_tsc));
                    if p.value != pong_value(ping_value(p.seq)) {
                        bad += 1;
                    }
                }
                if !any && !ring.final_check_for_responses(&mut page).map_err(Errno::from)? {
                    wait_event(seen);
                }
                if time::now_ns() - t0 > WAIT {
                    return Err(Errno::EAGAIN);
                }
            }
            let (med, p95) = median_p95(&mut rtts);
            println!(
                "pingpong with domain {} (front end): sent {sent}, received {got} answers, {bad} wrong, checksum {sum:#018x}, round trip median {} us, p95 {} us, {} events",
                peer.0, med / 1000, p95 / 1000, RING_EVENTS.load(Ordering::SeqCst)
            );
            dev.set(DeviceState::Closing)?;
            state_is(&format!("{peer_home}/pingpong/state"), DeviceState::Closed)?;
            // SAFETY: no pointer arguments.
            unsafe { hc::grant_end(gref) }?;
            // SAFETY: no pointer arguments.
            unsafe { hc::evtchn_close(port as u64) }?;
            dev.set(DeviceState::Closed)?;
            Ok(())
        }

        fn back(si: &StartInfo, peer: DomId) -> Result<(), Errno> {
            let home = store::home();
            let peer_home = microhv_guest::shared_abi::store::domain_path(peer);
            let mut dev = Dev { role: Role::Backend, state: DeviceState::Unknown, path: format!("{home}/pingpong/state") };
            dev.set(DeviceState::Initialising)?;
            dev.set(DeviceState::InitWait)?;
            state_is(&format!("{peer_home}/pingpong/state"), DeviceState::Initialised)?;
            let gref = store::read_u64(&format!("{peer_home}/pingpong/ring-ref"))?;
            let rport = store::read_u64(&format!("{peer_home}/pingpong/event-channel"))?;
            // Our spare virtual slot, just below the balloon pages.
            let va = si.virt_base + (si.nr_pages - super::BALLOON_PAGES - 1) * mm::PAGE;
            if mm::translate(va).is_some() {
                mm::unmap(va)?;
            }
            // SAFETY: (hypercalls below) the VA is our own empty slot.
            unsafe { hc::grant_map(peer, gref, GuestVa(va), 1) }?;
            // SAFETY: no pointer arguments.
            let port = unsafe { hc::evtchn_bind_interdomain(peer, rport) }? as u32;
            events::set_handler(port, on_ring);
            events::unmask_port(port);
            let mut page = SharedPage(va as *mut u8);
            let mut ring: BackRing<Ping, Pong> = BackRing::attach(&page);
            dev.set(DeviceState::Connected)?;

            let (mut served, mut sum) = (0u32, 0u64);
            let t0 = time::now_ns();
            let mut last_look = 0;
            loop {
                let seen = RING_EVENTS.load(Ordering::SeqCst);
                let mut any = false;
                while let Some(p) = ring.take_request(&page).map_err(Errno::from)? {
                    any = true;
                    served += 1;
                    sum = checksum(sum, p.value);
                    ring.push_response(&mut page, &Pong { seq: p.seq, _pad: 0, value: pong_value(p.value), sent_tsc: p.sent_tsc })
                        .map_err(Errno::from)?;
                }
                if any {
                    if ring.push_responses_and_check_notify(&mut page) {
                        // SAFETY: no pointer arguments.
                        let _ = unsafe { hc::evtchn_send(port as u64) };
                    }
                    continue;
                }
                if ring.final_check_for_requests(&mut page).map_err(Errno::from)? {
                    continue;
                }
                let now = time::now_ns();
                if served >= MESSAGES || now - last_look > 20_000_000 {
                    last_look = now;
                    let s = store::read(&format!("{peer_home}/pingpong/state")).unwrap_or_default();
                    if DeviceState::from_value(&s) == Ok(DeviceState::Closing) {
                        break;
                    }
                }
                if now - t0 > WAIT {
                    return Err(Errno::EAGAIN);
                }
                wait_event(seen);
            }
            println!("pingpong with domain {} (back end): served {served} requests, checksum {sum:#018x}", peer.0);
            dev.set(DeviceState::Closing)?;
            // SAFETY: the pointer arguments are live locals of this function or pages we own.
            unsafe { hc::grant_unmap(peer, gref, GuestVa(va)) }?;
            // SAFETY: no pointer arguments.
            unsafe { hc::evtchn_close(port as u64) }?;
            dev.set(DeviceState::Closed)?;
            Ok(())
        }
    }
}
