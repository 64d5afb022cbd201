//! System tests for the foundation: a normal boot and deliberate faults.
//! Each boots the real images in QEMU (TCG, -icount) and checks the serial console.

use microhv_tests::assert_contains;
use xtask::{test_run, Outcome, RunResult};

fn boot(cmdline: &str) -> RunResult {
    test_run().cmdline(cmdline).run().expect("QEMU could not be started")
}

#[test]
fn normal_boot_passes_its_self_check() {
    let r = boot("");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "serial output:\n{out}");
    assert_contains(
        out,
        &[
            "microhv 0.1.0",
            "memory: ",
            "MiB usable",
            "frames free",
            "heap 16384 KiB",
            "timer: TSC",
            "modules: 4",
            "dom0.elf name=dom0 toolstack mem=32M",
            "domu.elf",
            "domu1.toml",
            "domu2.toml",
            "self-check: W^X ok",
            "self-check: heap ok",
            "self-check: frames ok",
            "self-check: timer 30 ticks",
            "self-check PASSED",
            "VT-x: this CPU has no VMX",
        ],
    );
    // No disk attached: no virtio-blk device, and nothing on the IDE
    // channel's slave position either; Dom0 says so and goes on.
    assert_contains(
        &microhv_tests::without_log_lines(out),
        &["[dom0] block: no virtio-blk device, no ATA disk on ata0-slave; virtual disks are not offered"],
    );
}

#[test]
fn page_fault_in_the_hypervisor_gives_a_crash_report_and_failing_exit() {
    let r = boot("microhv.fault=pagefault");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Crash, "serial output:\n{out}");
    assert_ne!(r.outcome.exit_code(), 0);
    assert_contains(
        out,
        &["microhv CRASH: exception 14 (#PF page fault)", "CR2=0x0000400000000000", "page not present on read", "RIP=0x", "RAX=0x", "R15=0x"],
    );
    assert!(!out.contains("self-check PASSED"));
}

#[test]
fn a_stack_overflow_in_the_hypervisor_hits_the_guard_page_and_is_reported() {
    let r = boot("microhv.fault=stack-overflow");
    let out = &r.serial;
    // A double fault on its own stack (the #PF could not be pushed), with a
    // full report: not a silent corruption, not a reset.
    assert_eq!(r.outcome, Outcome::Crash, "serial output:\n{out}");
    assert_contains(out, &["microhv CRASH: exception 8 (#DF double fault)", "microhv's stack overflowed: CR2=0x", "is its guard page", "R15=0x"]);
    assert!(!out.contains("without reaching the guard page"), "{out}");
}

#[test]
fn text_section_is_not_writable() {
    let r = boot("microhv.fault=write-text");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Crash, "serial output:\n{out}");
    assert!(out.contains("protection violation on write"), "{out}");
    assert!(!out.contains("W^X is broken"), "{out}");
}

#[test]
fn invalid_opcode_and_panic_are_reported() {
    let r = boot("microhv.fault=ud");
    assert_eq!(r.outcome, Outcome::Crash, "{}", r.serial);
    assert!(r.serial.contains("exception 6 (#UD invalid opcode)"), "{}", r.serial);
    let r = boot("microhv.fault=panic");
    assert_eq!(r.outcome, Outcome::Crash, "{}", r.serial);
    assert!(r.serial.contains("panic: deliberate panic requested"), "{}", r.serial);
    assert!(r.serial.contains("selfcheck.rs:"), "{}", r.serial);
}
