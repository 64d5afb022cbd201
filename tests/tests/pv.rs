//! System tests for PV domains: the default demo (Dom0 + two DomUs), and
//! the hostile-guest suite, one attack per domain, next to a normal DomU.
//! QEMU runs with -icount, so guest time is deterministic.

use xtask::{test_run, Outcome};

fn lines_of<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

fn assert_contains(out: &str, needles: &[&str]) {
    for n in needles {
        assert!(out.contains(n), "missing {n:?} in:\n{out}");
    }
}

fn frames_balance(out: &str) {
    let line = out.lines().find(|l| l.starts_with("microhv: memory:")).unwrap_or_else(|| panic!("no memory line in:\n{out}"));
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(nums[0], nums[1], "frames not all returned: {line}");
}

#[test]
fn dom0_and_two_domus_do_their_work_and_shut_down_cleanly() {
    let r = test_run().run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(out, &[
        "[dom0] dom0 up: domid 0",
        "privileged: yes",
        "[dom0] privileged domctl_list succeeded: 3 domains",
        "[domu1] domu1 up: domid 1",
        "[domu2] domu2 up: domid 2",
        "new frames mapped, written and read back ok; past the limit: ENOMEM",
        "[domu1] yield: gave up the CPU 5 times",
        "[domu1] privileged domctl_list refused as expected: EPERM",
        "[domu2] privileged domctl_list refused as expected: EPERM",
        "[dom0] all DomUs have ended:",
        "microhv: summary: 3 domains ran: dom0 poweroff, domu1 poweroff, domu2 poweroff; exit success",
    ]);
    for d in ["[domu1] sleep", "[domu2] sleep"] {
        let sleeps = lines_of(out, d);
        assert_eq!(sleeps.len(), 3, "{out}");
        for s in sleeps {
            assert!(s.ends_with(" ok"), "sleep out of tolerance: {s}");
        }
    }
    assert!(lines_of(out, "[domu1] balloon: 2048 pages -> released Ok(16) -> 2032 -> populated Ok(16) -> 2048").len() == 1, "{out}");
    // Every line a domain printed carries its name.
    for l in out.lines().filter(|l| l.starts_with('[') && !l.starts_with("[ ")) {
        assert!(l.starts_with("[dom0] ") || l.starts_with("[domu1] ") || l.starts_with("[domu2] "), "unprefixed line: {l}");
    }
    frames_balance(out);
}

const ATTACKS: &[&str] = &[
    "read-hv",
    "write-hv",
    "write-pt",
    "map-foreign",
    "priv-insn",
    "ring3-hypercall",
    "bad-pointers",
    "unknown-hypercall",
    "balloon",
    "evtchn",
    "grant",
];

#[test]
fn hostile_guests_get_errors_or_are_ended_while_the_others_run_on() {
    let mut run = test_run();
    run.modules = vec!["dom0.elf name=dom0".into(), "domu.elf name=domu1".into()];
    for a in ATTACKS {
        run.modules.push(format!("hostile.elf name=h-{a} attack={a} mem=2M"));
    }
    // Domain ids follow module order: dom0 0, domu1 1, the attacks 2..=12,
    // then the grant pair 13 and 14, which name each other.
    run.modules.push("hostile.elf name=h-grant-owner attack=grant-owner peer=14 mem=2M".into());
    run.modules.push("hostile.elf name=h-grant-user attack=grant-user peer=13 mem=2M".into());
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    // Some hostile domains end badly, so the run as a whole reports failure;
    // but microhv itself must not crash.
    assert_eq!(r.outcome, Outcome::Failure, "{out}");
    assert!(!out.contains("microhv CRASH"), "{out}");
    assert!(!out.contains("ISOLATION BROKEN"), "{out}");
    assert!(!out.contains("-> FAIL"), "{out}");

    // Attacks answered with error codes (or #GP delivered to the guest): all checks pass.
    for a in ["map-foreign", "priv-insn", "ring3-hypercall", "bad-pointers", "unknown-hypercall", "balloon", "evtchn", "grant", "grant-owner", "grant-user"] {
        let prefix = format!("[h-{a}] ATTACK {a}: all ");
        assert!(out.lines().any(|l| l.starts_with(&prefix) && l.ends_with("checks ok")), "attack {a} did not pass:\n{out}");
        assert!(out.contains(&format!("'h-{a}' ended: poweroff")), "{out}");
    }
    assert_contains(out, &[
        "[h-priv-insn] check cli: #GP -> ok",
        "[h-priv-insn] check mov cr3, rax: #GP -> ok",
        "[h-priv-insn] check wrmsr (IA32_LSTAR): #GP -> ok",
        "[h-priv-insn] check in al, dx (COM1): #GP -> ok",
        "[h-priv-insn] check hlt: #GP -> ok",
        "[h-ring3-hypercall] check int 0x82 from ring 3: #GP",
        "[h-map-foreign] check map our own L4 writable: got Err(EACCES(-13))",
        "[h-map-foreign] check map the hypervisor image frame (mfn 0x200): got Err(EPERM(-1))",
        "[h-bad-pointers] check console_write from the hypervisor area: got Err(EFAULT(-14))",
        "[h-unknown-hypercall] check hypercall number 0x3e7: got Err(ENOSYS(-38))",
        "[h-balloon] check populate one page past the limit: got Err(ENOMEM(-12))",
        "[h-evtchn] check send on an unbound port: got Err(EINVAL(-22))",
        "[h-evtchn] check bind VIRQ_TIMER twice: got Err(EEXIST(-17))",
        "[h-evtchn] check close a port that is not open: got Err(EINVAL(-22))",
        "got Err(ENOSPC(-28)), want ENOSPC -> ok",
        "[h-grant] check map a forged reference of dom0: got Err(EINVAL(-22))",
        "[h-grant] check map our own grant (we are not the grantee): got Err(EPERM(-1))",
        "[h-grant-user] check map the read-only grant writable: got Err(EACCES(-13))",
        "[h-grant-user] check write through the read-only grant: #PF -> ok",
        "[h-grant-owner] check revoke the read-only grant while the peer maps it: got Err(EBUSY(-16))",
        "[h-grant-owner] check revoke it after the peer unmapped it: got Ok(0)",
        "[h-grant-user] check map a grant of a domain that has ended: got Err(ESRCH(-3))",
    ]);
    // Faults: reading a hypervisor address with no handler is ended by microhv;
    // writing the entry area or a page table faults into the guest's own handler.
    assert_contains(out, &[
        "'h-read-hv' ended: killed: unhandled #PF page fault at rip",
        "cr2 0x200000",
        "[h-write-hv] unhandled exception 14 (#PF) error 0x3",
        "cr2 0xffffff8000000100",
        "'h-write-hv' ended: crash",
        "[h-write-pt] unhandled exception 14 (#PF) error 0x3",
        "'h-write-pt' ended: crash",
    ]);
    // The bystanders finished their work.
    assert_contains(out, &[
        "[domu1] done:",
        "'domu1' ended: poweroff",
        "[dom0] all DomUs have ended:",
        "'dom0' ended: poweroff",
        "microhv: summary: 15 domains ran: dom0 poweroff, domu1 poweroff",
    ]);
    for s in lines_of(out, "[domu1] sleep") {
        assert!(s.ends_with(" ok"), "{s}");
    }
    frames_balance(out);
}
