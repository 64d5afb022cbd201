//! The Bochs path: GRUB boots microhv from an ISO on an emulated Skylake
//! with VMX. It runs the PV demo (Dom0's toolstack and two DomUs) next to
//! the HVM flavour of the demo DomU, an unmodified multiboot kernel that
//! microhv runs under VT-x.

use microhv_tests::{assert_contains, assert_frames_returned};
use xtask::{images_for_tests, BochsRun, Outcome};

#[test]
fn grub_boots_the_pv_demo_and_an_hvm_domu_in_bochs() {
    xtask::ensure_bochs().expect("Bochs and GRUB are needed for this test");
    let r = BochsRun::new(&images_for_tests()).run().expect("Bochs could not be started");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(
        out,
        &[
            "boot loader: \"GRUB",
            "self-check PASSED",
            "VT-x: VMXON ok, VMCS revision",
            "domain 1 'hvm1': HVM (VT-x), 2048 pages",
            "hvm1 up: HVM guest (multiboot magic ok), 7164 KiB above 1 MiB, hypervisor \"microhvmicro\", VMX hidden, x2APIC yes",
            "(hvm1) sleep 20 ms (APIC timer, HLT): measured",
            "(hvm1) periodic timer: 10 ticks of 5 ms in",
            "(hvm1) platform: unknown MSR raised #GP, unknown port reads 0xff, as documented",
            "hvm1: rdmsr of MSR 0x12345678 refused (unknown MSR or bad value): #GP injected",
            "hvm1: read of unknown port 0x2f8 (1 bytes): reads as all ones, writes ignored",
            "(hvm1) memory: 64 pages written and read back ok",
            "(hvm1) done: ",
            "domain 1 'hvm1' ended: poweroff; 2048 frames returned",
            "[dom0] toolstack: created domu1 (domain 2) from domu1.toml",
            "[domu1] pingpong with domain 3 (front end): sent 256, received 256 answers, 0 wrong",
            "[domu2] pingpong with domain 2 (back end): served 256 requests",
            "microhv: summary: 4 domains ran: dom0 poweroff, hvm1 poweroff, domu1 poweroff, domu2 poweroff; exit success",
        ],
    );
    // The emulated UART's lines come through microhv, prefixed with the
    // domain's name; every sleep is reported within tolerance in the same
    // words as the PV DomUs'.
    let sleeps: Vec<&str> = out.lines().filter(|l| l.contains("(hvm1) sleep ")).collect();
    assert_eq!(sleeps.len(), 3, "{out}");
    assert!(!out.contains("OUT OF TOLERANCE") || !out.contains("(hvm1)"), "{out}");
    assert_frames_returned(out);
}
