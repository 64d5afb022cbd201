//! The benchmark plumbing (not the timings): microhv's counters count
//! exactly what each benchmark does, and two runs give the same counts.

use xtask::bench::{run_pv_qemu, Bench};

fn find<'a>(b: &'a [Bench], name: &str) -> &'a Bench {
    b.iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no benchmark {name}"))
}

fn ev(b: &Bench, e: &str) -> u64 {
    *b.events.get(e).unwrap_or_else(|| panic!("{} has no {e} count", b.name))
}

#[test]
fn counters_count_exactly_and_repeat_across_runs() {
    let images = xtask::images_for_tests();
    let (first, serial) = run_pv_qemu(&images, true, xtask::Accel::Tcg).expect("benchmark run");
    let b = &first.benches;
    assert!(b.len() >= 10, "{serial}");
    // One hypercall adds exactly one to the hypercall counter, one entry, and
    // two CR3 loads (into microhv's tables and back).
    let null = find(b, "null_hypercall");
    assert_eq!(null.ops, 200);
    assert_eq!(null.samples.len(), 200);
    assert_eq!((ev(null, "hypercalls"), ev(null, "entries"), ev(null, "cr3_loads")), (200, 200, 400));
    assert_eq!(ev(null, "exceptions"), 0);
    // No hypercall at all to read the time.
    assert_eq!(ev(find(b, "read_time"), "hypercalls"), 0);
    // mmu_update: one entry per call, then sixteen.
    assert_eq!(ev(find(b, "pt_update"), "pt_updates"), 200);
    assert_eq!(ev(find(b, "pt_update_batch16"), "pt_updates"), 16 * 200);
    assert_eq!(ev(find(b, "pt_update_batch16"), "hypercalls"), 200);
    // Each fault is bounced once and returns with one `iret` hypercall.
    let pf = find(b, "page_fault");
    assert_eq!((ev(pf, "exceptions"), ev(pf, "hypercalls")), (200, 200));
    // Each loopback event is one send and one upcall.
    let evt = find(b, "event_send_to_upcall");
    assert_eq!(ev(evt, "upcalls"), 200);
    // Ping-pong with the echo domain Dom0 paired us with: each round trip
    // brings exactly one answer, one upcall here.
    let pp = find(b, "event_pingpong");
    assert_eq!((pp.ops, ev(pp, "upcalls")), (200, 200));
    assert!(ev(pp, "hypercalls") >= 200, "at least one send per round trip");
    assert_eq!(first.hypervisor_image_kib.map(|k| k > 0), Some(true));

    // Again: the counts of the CPU-only benchmarks are the same.
    let (second, _) = run_pv_qemu(&images, true, xtask::Accel::Tcg).expect("second benchmark run");
    for name in ["null_hypercall", "set_timer", "read_time", "cpuid", "pt_update", "pt_update_batch16", "page_fault", "event_send_to_upcall"] {
        let (a, c) = (find(&first.benches, name), find(&second.benches, name));
        for e in ["hypercalls", "entries", "exceptions", "upcalls", "cr3_loads", "pt_updates"] {
            assert_eq!(ev(a, e), ev(c, e), "{name}: {e} differs between two runs");
        }
    }
}

#[test]
fn hvm_counters_count_vmcalls_and_exits_in_bochs() {
    let images = xtask::images_for_tests();
    let b = xtask::bench::run_bochs(&images, true).expect("Bochs benchmark run");
    let get = |name: &str, flavour: &str| {
        b.iter().find(|x| x.name == name && x.flavour == flavour).unwrap_or_else(|| panic!("no {flavour} {name}"))
    };
    // One VMCALL is one hypercall and one VM exit (a time slice may end on
    // the preemption timer in between: a few more exits, never fewer).
    let exits_near = |b: &Bench, n: u64| {
        let e = ev(b, "vm_exits");
        assert!((n..=n + 10).contains(&e), "{}: {e} VM exits for {n} operations", b.name);
    };
    let null = get("null_hypercall", "HVM");
    assert_eq!((ev(null, "hypercalls"), null.ops), (200, 200));
    exits_near(null, 200);
    // CPUID exits under HVM and is no hypercall; it is native for PV.
    let cpuid = get("cpuid", "HVM");
    assert_eq!(ev(cpuid, "hypercalls"), 0);
    exits_near(cpuid, 200);
    // ... and the exits are counted by reason: CPUID exits are exact, and
    // a KiB through the emulated UART is two port exits per byte.
    assert_eq!(ev(cpuid, "exits_cpuid"), 200);
    let uart = get("console_1kib", "HVM");
    assert_eq!(ev(uart, "exits_io"), 2 * 1024 * uart.ops);
    assert_eq!(ev(get("cpuid", "PV"), "entries"), 0);
    // A page-table store and a page fault never leave an HVM guest.
    exits_near(get("pt_update", "HVM"), 0);
    exits_near(get("page_fault", "PVHVM"), 0);
    // The PV guest in the same run: one hypercall per null call.
    assert_eq!(ev(get("null_hypercall", "PV"), "hypercalls"), 200);
    // Events: a hybrid's upcall is an injected vector, counted as one; the
    // ping-pong with its echo peer brings one per round trip in both flavours.
    let loopback = get("event_send_to_upcall", "PVHVM");
    assert_eq!(ev(loopback, "upcalls"), loopback.ops);
    for flavour in ["PV", "PVHVM"] {
        let pp = get("event_pingpong", flavour);
        assert_eq!((pp.ops, ev(pp, "upcalls")), (200, 200), "{flavour} event_pingpong");
    }
    // Block reads from both flavours through the same blkfront and Dom0's
    // ATA disk: one request, one response event, per 4 KiB read.
    for flavour in ["PV", "PVHVM"] {
        let blk = get("block_read_4k", flavour);
        assert_eq!(blk.ops, 200, "{flavour} block_read_4k");
        assert!(ev(blk, "upcalls") >= blk.ops, "{flavour}: an event per response");
    }
    // The hybrid's console is one VMCALL per KiB.
    let con = get("console_1kib", "PVHVM");
    assert_eq!(ev(con, "hypercalls"), con.ops);
}
