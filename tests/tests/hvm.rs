//! The HVM fallback where there is no VT-x (QEMU TCG): an image without the
//! PV note is refused with a clear message and the PV domains run on.

use microhv_tests::assert_contains;
use xtask::{test_run, Outcome, HVM_DEMO_MODULE};

#[test]
fn without_vt_x_an_hvm_image_is_refused_and_the_pv_domains_run_on() {
    let mut run = test_run();
    run.modules.insert(1, HVM_DEMO_MODULE.into());
    // And one for Dom0's toolstack (`kind = "auto"`, no PV note).
    run.modules.push("domu-hvm.elf".into());
    run.modules.push("hvm3.toml".into());
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(
        out,
        &[
            "VT-x: this CPU has no VMX (QEMU TCG emulates none); HVM domains will be refused",
            "module 1: not a PV image (no microhv ELF note), and it cannot run as HVM: hvm1: HVM domain refused: this CPU has no VMX (QEMU TCG emulates none)",
            "[dom0] toolstack: created domu1 (domain 1) from domu1.toml",
            "domctl_create_hvm 'hvm3': refused: this CPU has no VMX (QEMU TCG emulates none)",
            "[dom0] toolstack: hvm3.toml: domu-hvm.elf is not a PV image, and microhv cannot run HVM guests here (no VT-x): ENOSYS",
            "[domu1] pingpong with domain 2 (front end): sent 256, received 256 answers, 0 wrong",
            "microhv: summary: 3 domains ran: dom0 poweroff, domu1 poweroff, domu2 poweroff; exit success",
        ],
    );
}
