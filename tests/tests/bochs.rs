//! The Bochs path: GRUB boots microhv from an ISO on an emulated Skylake
//! with VMX. It runs the PV demo (Dom0's toolstack and two DomUs) next to
//! the HVM flavour of the demo DomU, an unmodified multiboot kernel that
//! microhv runs under VT-x, and its hybrid (PVHVM) twin; and the hostile
//! HVM guests next to normal domains. The PV DomUs' disks are regions of an
//! ATA disk (ata0-slave) that Dom0 drives with PIO: Bochs has no virtio.

use microhv_tests::disk::{assert_demo_region, assert_zero_outside, demo_end, DOMU1_START, DOMU2_START, HVM3_START};
use microhv_tests::{assert_contains, assert_frames_returned, without_log_lines};
use std::sync::Mutex;
use xtask::{images_for_tests, BochsRun, Outcome};

/// One Bochs at a time (the machines have two cores).
static BOCHS: Mutex<()> = Mutex::new(());

#[test]
fn grub_boots_the_pv_demo_and_hvm_domus_in_bochs() {
    xtask::ensure_bochs().expect("Bochs and GRUB are needed for this test");
    let _one = BOCHS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = xtask::project_root().join("target").join("test-disks");
    let disk = dir.join("bochs-demo.img");
    xtask::ensure_bochs_disk(&disk, true).expect("creating the Bochs disk image");
    let mut run = BochsRun::new(&images_for_tests());
    run.disk = Some(disk.clone());
    let r = run.run().expect("Bochs could not be started");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    // Guest lines (printed by Dom0) are checked without microhv's log lines,
    // which can land in the middle of them. Lines an HVM guest prints before
    // Dom0's backend connects come straight from microhv as `(name) ...`:
    // the same console, so both prefixes count.
    let mut text = without_log_lines(out);
    for n in ["hvm1", "hvm2", "hvm3"] {
        text = text.replace(&format!("({n}) "), &format!("[{n}] "));
    }
    let text = &text;
    // The module is domu1.toml itself: its size, as the guest must see it.
    let module_bytes = std::fs::metadata(xtask::project_root().join("dom0/configs/domu1.toml")).expect("domu1.toml").len();
    let module_line = format!("hvm1: boot module 'domu1.toml for=hvm1' ({module_bytes} bytes) at guest-physical 0x");
    let module_seen = format!(", {module_bytes} bytes, first line \"# DomU 1 of the default demo");
    assert_contains(out, &[&module_line]);
    assert_contains(text, &[&module_seen]);
    assert_contains(
        out,
        &[
            "boot loader: \"GRUB",
            "self-check PASSED",
            "VT-x: VMXON ok, VMCS revision",
            "domain 1 'hvm1': HVM (VT-x), 2048 pages (8192 KiB), multiboot kernel entry",
            // hvm1 drives its APIC through the xAPIC page: decoded MOVs.
            "hvm1: rdmsr of MSR 0x12345678 refused (unknown MSR or bad value): #GP injected",
            "hvm1: read of unknown port 0x2f8 (1 bytes): reads as all ones, writes ignored",
            "domain 1 'hvm1' ended: poweroff",
            "domain 3 'hvm2' ended: poweroff",
            "domain 6 'hvm3' ended: poweroff",
            "microhv: summary: 6 domains ran: dom0 poweroff, hvm1 poweroff, hvm2 poweroff, domu1 poweroff, domu2 poweroff, hvm3 poweroff; exit success",
        ],
    );
    assert_contains(
        text,
        &[
            // The UART's lines reach Dom0's console backend through a ring,
            // like a PV DomU's, and come out prefixed with the domain's name.
            "hvm1 up: HVM guest, multiboot ok, 7164 KiB above 1 MiB, hypervisor \"microhvmicro\", VMX hidden, x2APIC yes, APIC through xAPIC MMIO",
            // A multiboot module loaded after the kernel (`for=hvm1`).
            "[hvm1] boot module 0: \"domu1.toml for=hvm1\" at 0x",
            "sleep 20 ms (APIC timer, HLT): measured",
            "periodic timer: 10 ticks of 5 ms in",
            "platform: unknown MSR raised #GP, unknown port reads 0xff, as documented",
            // The hybrid guest: console through VMCALL, timer events as a vector.
            "hvm2 up (PVHVM): ABI 1.0 through VMCALL, console_write, event upcalls on vector 0xf3, shared_info at gfn 0x7ff",
            "sleep 30 ms (set_timer, VIRQ_TIMER event on vector 0xf3, port 3): measured",
            "VMCALL with guest-physical pointers: memory_query 0 -> 2048 pages, evtchn_status(port 3) 0 -> state 3, grant_access(dom0, gfn ",
            "-> gref 3, grant_end -> 0, sched_poll 5 ms -> 0 after",
            "[hvm2] domid 3: grant_copy of a grant never made -> -22, of a record past my memory -> -14; loopback event channel 4 <-> 5: send 0, event delivered",
            "VMCALL refusals: domctl_list -> -38, mmu_update -> -38 (PV-only or privileged)",
            // The split drivers from the hybrid guest: microhv-guest's store
            // client over VMCALL reaches Dom0's store, which has no disk for hvm2.
            "[hvm2] split drivers through VMCALL: store ring at gfn 0x801, port 2, heap 2048 KiB",
            "[hvm2] disk: no virtual disk configured; skipped",
            "[hvm2] done: ",
            "[dom0] console backend: hvm1 disconnected (domain ended)",
            "[dom0] console backend: hvm2 disconnected (domain ended)",
            "[dom0] toolstack: created domu1 (domain 4) from domu1.toml",
            // The fallback through Dom0's toolstack: `kind = "auto"` and an
            // image without the PV note.
            "[dom0] toolstack: created hvm3 (domain 6) from hvm3.toml: HVM, 2048 pages, kernel domu-hvm.elf",
            "[hvm3] hvm3 up: HVM guest, multiboot ok",
            "[hvm3] hvm3 up (PVHVM): ABI 1.0 through VMCALL",
            "[hvm3] done: ",
            "pingpong with domain 5 (front end): sent 256, received 256 answers, 0 wrong",
            "pingpong with domain 4 (back end): served 256 requests",
        ],
    );
    // The PV DomUs' disk demo on the ATA disk: the same lines as under QEMU
    // with virtio-blk (tests/block.rs).
    assert_contains(
        text,
        &[
            "[dom0] block: ATA disk on ata0-slave: 64512 sectors (31 MiB), PIO, polled",
            "[dom0] block: domu1: virtual disk xvda = sectors 2048..18432 of the real disk",
            "[dom0] block: domu2: virtual disk xvda = sectors 32768..49152 of the real disk",
            "[dom0] block: domu1/xvda: connected",
            "[dom0] block: domu2/xvda: connected",
            "[domu1] disk: 16384 sectors; no earlier run of domu1 on it (a fresh disk)",
            "[domu2] disk: 16384 sectors; no earlier run of domu2 on it (a fresh disk)",
            "[domu1] disk: read past the end of the disk -> EIO (as expected)",
            "[domu2] disk: read past the end of the disk -> EIO (as expected)",
            "[domu1] disk: run 1: wrote 1024 KiB in ",
            "[domu2] disk: run 1: wrote 1024 KiB in ",
            "32 requests of 32 KiB, 4 in flight",
            "[dom0] block: domu1/xvda: disconnected (frontend closed)",
            "[dom0] block: domu2/xvda: disconnected (frontend closed)",
            // The hybrid guest hvm3: the same disk demo through the same
            // blkfront, over VMCALL and injected event vectors.
            "[dom0] block: hvm3: virtual disk xvda = sectors 53248..61440 of the real disk",
            "[dom0] block: hvm3/xvda: connected",
            "[hvm3] split drivers through VMCALL: store ring at gfn 0x801, port 2, heap 2048 KiB",
            "[hvm3] disk: 8192 sectors; no earlier run of hvm3 on it (a fresh disk)",
            "[hvm3] disk: read past the end of the disk -> EIO (as expected)",
            "[hvm3] disk: run 1: wrote 1024 KiB in ",
            "[hvm3] disk: disconnected",
            "[dom0] block: hvm3/xvda: disconnected (frontend closed)",
            // The past-the-end reads are the only errors; no channel resets.
            "[dom0] block: served 111 requests, 3096 KiB, 3 errors, ATA PIO polled, 0 channel resets",
        ],
    );
    assert!(!text.contains("disk: FAILED") && !text.contains("DIFFER"), "{out}");
    // From the host: each DomU's bytes at its own offset of the image, and
    // nothing anywhere else.
    let img = std::fs::read(&disk).expect("disk image");
    assert_eq!(img.len(), 64512 * 512);
    assert_demo_region(&img, DOMU1_START, "domu1", 1);
    assert_demo_region(&img, DOMU2_START, "domu2", 1);
    assert_demo_region(&img, HVM3_START, "hvm3", 1);
    assert_zero_outside(
        &img,
        &[(DOMU1_START, demo_end(DOMU1_START)), (DOMU2_START, demo_end(DOMU2_START)), (HVM3_START, demo_end(HVM3_START))],
    );
    // The three sleeps of each HVM guest, in the same words as the PV DomUs'.
    assert_eq!(text.matches("[hvm1] sleep ").count(), 3, "{out}");
    // hvm2 and hvm3 (both hybrid).
    assert_eq!(text.matches("(set_timer, VIRQ_TIMER event on vector 0xf3, port 3): measured").count(), 6, "{out}");
    let stats = out.lines().find(|l| l.contains("INFO  hvm1: ") && l.contains("VM exits")).unwrap_or_default();
    assert!(!stats.contains("APIC MMIO 0,"), "hvm1 should reach its APIC through MMIO: {stats}");
    // Slices of HVM vCPUs end on the VMX preemption timer.
    let preempted: u64 = out
        .lines()
        .filter_map(|l| l.split("preemption timer ").nth(1))
        .filter_map(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
        .sum();
    assert!(preempted > 0, "no slice ended on the preemption timer:\n{out}");
    assert_frames_returned(out);
}

/// One HVM guest per attack, next to a PV DomU and a normal HVM guest.
#[test]
fn hostile_hvm_guests_are_ended_or_refused_while_the_others_run_on() {
    xtask::ensure_bochs().expect("Bochs and GRUB are needed for this test");
    let _one = BOCHS.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = BochsRun::new(&images_for_tests());
    run.dir_name = "bochs-hostile".into();
    run.modules = vec!["dom0.elf name=dom0".into(), "domu.elf name=domu1".into(), "domu-hvm.elf name=hvm1 mem=4M settle=0".into()];
    for a in ["ept", "hvwrite", "vmcall", "triple", "storm", "exit", "store"] {
        run.modules.push(format!("domu-hvm.elf name=x-{a} attack={a} mem=4M settle=0"));
    }
    let r = run.run().expect("Bochs could not be started");
    let out = &r.serial;
    // Some domains are ended, so the run reports failure; microhv itself
    // must not crash, and every frame comes back.
    assert_eq!(r.outcome, Outcome::Failure, "{out}");
    assert!(!out.contains("microhv CRASH"), "{out}");
    assert!(!out.contains("NOT STOPPED"), "{out}");
    // microhv's log: who was ended, and why.
    assert_contains(
        out,
        &[
            // Guest-physical addresses outside the guest's memory.
            "'x-ept' ended: killed: EPT violation: read at guest-physical 0x20000000",
            "'x-hvwrite' ended: killed: EPT violation: write at guest-physical 0x30000000",
            "'x-triple' ended: killed: triple fault",
            // Port 0xf4 with a non-zero value: an exit code, not a clean end.
            "'x-exit' ended: powered off with exit code 7",
            // Errors for bad hypercalls, a capped storm: these finish cleanly.
            "'x-vmcall' ended: poweroff",
            "'x-storm' ended: poweroff",
            // The others run on.
            "'hvm1' ended: poweroff",
            "'domu1' ended: poweroff",
            "'dom0' ended: poweroff",
            // Garbage in its own store ring: Dom0 drops that connection.
            "'x-store' ended: poweroff",
            "microhv: summary: 10 domains ran: dom0 poweroff, domu1 poweroff, hvm1 poweroff, x-ept killed: EPT violation",
        ],
    );
    // What the guests printed (microhv's log lines taken out, see above).
    let text = &without_log_lines(out);
    assert_contains(
        text,
        &[
            // microhv's own physical addresses are just the guest's memory.
            "attack hvwrite: 64 KiB written at 0x200000 landed in my own memory; now past the end",
            // Privileged, PV-only and unknown hypercall numbers: errors.
            "attack vmcall: hypercall 0x20 -> -38",
            "attack vmcall: hypercall 0xb -> -38",
            "attack vmcall: hypercall 0x3e7 -> -38",
            "attack vmcall: hypercall 0xffffffffffffffff -> -38",
            "attack vmcall: console_write from past my memory -> -14",
            "attack vmcall: console_write from microhv's ring page -> -14",
            "attack vmcall: memory_query into past my memory -> -14",
            "attack vmcall: grant_access of a frame past my memory -> -22",
            "attack vmcall: grant_access of my shared_info -> -13",
            "attack storm: ",
            // The hybrid's store ring is its own page; Dom0 checks it as it
            // checks a PV guest's and serves the others on.
            "attack store: garbage over my store ring (gfn 0x401) after Dom0 connected it, 64 of 64 events sent",
            "[dom0] store: x-store: bad producer index",
            "; dropping its store connection",
            "[dom0] console backend: x-store disconnected (protocol error)",
            "[domu1] done: ",
        ],
    );
    // hvm1 may finish before Dom0's console backend connects; then microhv
    // prints its lines itself, as `(hvm1) ...`.
    assert!(text.contains("[hvm1] done: ") || text.contains("(hvm1) done: "), "{out}");
    assert_frames_returned(out);
}
