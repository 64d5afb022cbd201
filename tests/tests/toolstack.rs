//! Domain control from Dom0: pause, unpause and destroy DomUs by typing
//! commands on Dom0's serial console. (Creating DomUs from configuration
//! files is the toolstack issue's remaining work.)

use xtask::{test_run, Outcome};

#[test]
fn dom0_pauses_unpauses_and_destroys_domus_and_everything_is_given_back() {
    let mut run = test_run();
    run.modules = vec![
        "dom0.elf name=dom0".into(),
        "hostile.elf name=sleeper1 attack=sleeper mem=2M".into(),
        "hostile.elf name=sleeper2 attack=sleeper mem=2M".into(),
    ];
    let mut input = vec![b'\r'; 24];
    input.extend_from_slice(
        b"pause sleeper1\rlist\runpause sleeper1\rpause nobody\rdestroy dom0\rdestroy sleeper1\rdestroy sleeper2\r",
    );
    run.input = Some(input);
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    for needle in [
        "[dom0] pause sleeper1: done",
        "'sleeper1' paused by dom0",
        "sleeper1 paused",
        "[dom0] unpause sleeper1: done",
        "'sleeper1' unpaused by dom0",
        "[dom0] pause: no domain named 'nobody'",
        "[dom0] destroy dom0: EINVAL",
        "[dom0] destroy sleeper1: done",
        "'sleeper1' ended: destroyed by dom0",
        "'sleeper2' ended: destroyed by dom0",
        "microhv: summary: 3 domains ran: dom0 poweroff, sleeper1 destroyed by dom0, sleeper2 destroyed by dom0; exit success",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let line = out.lines().find(|l| l.starts_with("microhv: memory:")).expect("memory line");
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums[0], nums[1], "{line}");
}
