//! System tests for PV domains: the default demo (Dom0 + two DomUs), and
//! the hostile-guest suite, one attack per domain, next to a normal DomU.
//! QEMU runs with -icount, so guest time is deterministic.

use microhv_tests::{assert_contains, assert_frames_returned};
use xtask::{test_run, Outcome};

fn lines_of<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}


#[test]
fn dom0_and_two_domus_do_their_work_and_shut_down_cleanly() {
    let mut run = test_run();
    // Typed on the serial line. The UART's receive FIFO is reset when microhv
    // programs it, so bytes that arrive before that are lost: the leading
    // carriage returns absorb that (Dom0 ignores empty lines).
    let mut input = vec![b'\r'; 24];
    input.extend_from_slice(b"help\r\x1dhello domu1\r\x1d\x1dlist\r");
    run.input = Some(input);
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(out, &[
        "[dom0] dom0 up: domid 0",
        "privileged: yes",
        "[dom0] toolstack: created domu1 (domain 1) from domu1.toml: 2048 pages, kernel domu.elf",
        "[dom0] toolstack: created domu2 (domain 2) from domu2.toml: 2048 pages, kernel domu.elf",
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
    // The ping-pong: both ends saw the same 256 messages.
    assert_contains(out, &["[dom0] store: paired domu1 and domu2 (peer in domu1's configuration)"]);
    let front = lines_of(out, "[domu1] pingpong with domain 2 (front end): sent 256, received 256 answers, 0 wrong, checksum ");
    let back = lines_of(out, "[domu2] pingpong with domain 1 (back end): served 256 requests, checksum ");
    assert_eq!((front.len(), back.len()), (1, 1), "{out}");
    let sum_of = |l: &str| l.split("checksum ").nth(1).and_then(|t| t.split([',', ' ']).next()).map(str::to_string);
    assert_eq!(sum_of(front[0]), sum_of(back[0]), "checksums differ:\n{}\n{}", front[0], back[0]);
    // Every DomU line came through Dom0's console backend ("[name]"), none
    // through microhv's debug console ("(name)").
    assert!(!out.lines().any(|l| l.starts_with("(domu")), "{out}");
    assert_contains(out, &["console backend: domu1 disconnected (domain ended)", "console backend: domu2 disconnected (domain ended)"]);
    // Serial input reaches Dom0, and after Ctrl-] a DomU.
    assert_contains(out, &[
        "[dom0] input: help",
        "[dom0]   create <file.toml>   create a DomU from a configuration module",
        "[dom0] serial input now goes to domu1 (Ctrl-] switches)",
        "[domu1] console input received: \"hello domu1\"",
        "[dom0] serial input now goes to dom0 (Ctrl-] switches)",
        "[dom0] input: list",
    ]);
    // Every line a domain printed carries its name.
    for l in out.lines().filter(|l| l.starts_with('[') && !l.starts_with("[ ")) {
        assert!(l.starts_with("[dom0] ") || l.starts_with("[domu1] ") || l.starts_with("[domu2] "), "unprefixed line: {l}");
    }
    assert_frames_returned(out);
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
    "store-snoop",
    "console-garbage",
    "store-garbage",
];

#[test]
fn hostile_guests_get_errors_or_are_ended_while_the_others_run_on() {
    let mut run = test_run();
    run.modules = vec!["dom0.elf name=dom0".into(), "domu.elf name=domu1".into()];
    for a in ATTACKS {
        run.modules.push(format!("hostile.elf name=h-{a} attack={a} mem=2M"));
    }
    // Domain ids follow module order: dom0 0, domu1 1, the attacks 2..=15,
    // then the grant pair 16 and 17, which name each other.
    run.modules.push("hostile.elf name=h-grant-owner attack=grant-owner peer=17 mem=2M".into());
    run.modules.push("hostile.elf name=h-grant-user attack=grant-user peer=16 mem=2M".into());
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    // Some hostile domains end badly, so the run as a whole reports failure;
    // but microhv itself must not crash.
    assert_eq!(r.outcome, Outcome::Failure, "{out}");
    assert!(!out.contains("microhv CRASH"), "{out}");
    assert!(!out.contains("ISOLATION BROKEN"), "{out}");
    assert!(!out.contains("-> FAIL"), "{out}");

    // Attacks answered with error codes (or #GP delivered to the guest): all checks pass.
    for a in ["map-foreign", "priv-insn", "ring3-hypercall", "bad-pointers", "unknown-hypercall", "balloon", "evtchn", "grant", "store-snoop", "grant-owner", "grant-user"] {
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
        "[h-unknown-hypercall] check domctl_destroy of dom0 from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check domctl_create from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check domctl_map of domu1's frame from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check domctl_start from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check dma_populate from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check irq_bind of line 10 from a DomU: got Err(EPERM(-1))",
        "[h-unknown-hypercall] check irq_eoi of line 10 from a DomU: got Err(EPERM(-1))",
        "[h-map-foreign] check map device memory at 0xfebf0000 (PCI hole): got Err(EINVAL(-22)), want EINVAL -> ok",
        "[h-map-foreign] check map the I/O APIC page: got Err(EINVAL(-22)), want EINVAL -> ok",
        "[h-balloon] check populate one page past the limit: got Err(ENOMEM(-12))",
        "[h-evtchn] check send on an unbound port: got Err(EINVAL(-22))",
        "[h-evtchn] check bind VIRQ_TIMER twice: got Err(EEXIST(-17))",
        "[h-evtchn] check bind VIRQ_CONSOLE (Dom0's): got Err(EPERM(-1))",
        "[dom0] VIRQ_CONSOLE: DomUs wrote to microhv's debug console",
        "[h-evtchn] check close a port that is not open: got Err(EINVAL(-22))",
        "got Err(ENOSPC(-28)), want ENOSPC -> ok",
        "[h-grant] check map a forged reference of dom0: got Err(EINVAL(-22))",
        "[h-grant] check map our own grant (we are not the grantee): got Err(EPERM(-1))",
        "[h-grant-user] check map the read-only grant writable: got Err(EACCES(-13))",
        "[h-grant-user] check write through the read-only grant: #PF -> ok",
        "[h-grant-owner] check revoke the read-only grant while the peer maps it: got Err(EBUSY(-16))",
        "[h-grant-owner] check revoke it after the peer unmapped it: got Ok(0)",
        "[h-grant-user] check map a grant of a domain that has ended: got Err(ESRCH(-3))",
        "[h-grant-user] check grant_copy into a granted frame that became a page table: got Err(EACCES(-13))",
        "[h-store-snoop] check read domu1's subtree: got Err(EACCES(-13))",
        "[h-store-snoop] check write into dom0's subtree: got Err(EACCES(-13))",
        "[h-store-snoop] check a 3000-byte value: got Err(E2BIG(-7))",
        "[h-store-snoop] check set 100 watches: got Err(ENOSPC(-28))",
        // Garbage on the shared rings: Dom0 drops that connection and goes on.
        "console backend: h-console-garbage: bad producer index",
        "(h-console-garbage) ATTACK console-garbage: corrupted the console ring and slept; still running",
        "store: h-store-garbage: bad frame",
        "(h-store-garbage) ATTACK store-garbage: wrote 6 bytes of a bad frame; store read afterwards: Err(",
        "'h-console-garbage' ended: poweroff",
        "'h-store-garbage' ended: poweroff",
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
        "microhv: summary: 18 domains ran: dom0 poweroff, domu1 poweroff",
    ]);
    // (domu1's sleep timings are not checked here: with sixteen busy
    // attackers the wake-up latency reflects the load; the demo test checks them.)
    assert_eq!(lines_of(out, "[domu1] sleep").len(), 3, "{out}");
    assert_frames_returned(out);
}
