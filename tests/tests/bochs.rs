//! The Bochs path: GRUB boots microhv from an ISO on an emulated Skylake
//! with VMX. Today it runs the PV demo (Dom0's toolstack and two DomUs); the
//! HVM guests of the VT-x work will join it here.

use microhv_tests::assert_contains;
use xtask::{images_for_tests, BochsRun, Outcome};

#[test]
fn grub_boots_the_pv_demo_in_bochs() {
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
            "[dom0] toolstack: created domu1 (domain 1) from domu1.toml",
            "[domu1] pingpong with domain 2 (front end): sent 256, received 256 answers, 0 wrong",
            "[domu2] pingpong with domain 1 (back end): served 256 requests",
            "microhv: summary: 3 domains ran: dom0 poweroff, domu1 poweroff, domu2 poweroff; exit success",
        ],
    );
}
