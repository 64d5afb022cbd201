//! Dom0's toolstack: DomUs created from configuration files (broken ones
//! refused with clear errors), and paused, unpaused and destroyed by typing
//! commands on Dom0's serial console.

use microhv_tests::{assert_contains, assert_frames_returned};
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
    assert_contains(
        out,
        &[
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
        ],
    );
    assert_frames_returned(out);
}

/// Writes a file into the image directory (QEMU runs there) and returns its name.
fn fixture(name: &str, bytes: &[u8]) -> String {
    let images = xtask::images_for_tests();
    std::fs::write(images.dir.join(name), bytes).expect("writing a test fixture");
    name.to_string()
}

#[test]
fn broken_configurations_and_images_are_refused_with_clear_errors() {
    let images = xtask::images_for_tests();
    let domu = std::fs::read(&images.domu).expect("domu.elf");
    // A truncated image, and one for another architecture (e_machine = ARM64).
    fixture("t-truncated.elf", &domu[..domu.len().min(3000)]);
    let mut arm = domu.clone();
    arm[18] = 183;
    arm[19] = 0;
    fixture("t-arm.elf", &arm);
    // An image whose last segment has 4 MiB of bss: 1 MiB of memory is too small.
    let mut big = domu.clone();
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(big[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(&big, 0x36), u16_at(&big, 0x38));
    let last_load = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .rfind(|&o| u32::from_le_bytes(big[o..o + 4].try_into().unwrap()) == 1)
        .expect("a PT_LOAD segment");
    let memsz = u64::from_le_bytes(big[last_load + 0x28..last_load + 0x30].try_into().unwrap());
    big[last_load + 0x28..last_load + 0x30].copy_from_slice(&(memsz + (4 << 20)).to_le_bytes());
    fixture("t-big.elf", &big);
    let cfg = |name: &str, kernel: &str, memory: &str| {
        format!("name = \"{name}\"\nkernel = \"{kernel}\"\nmemory = \"{memory}\"\nkind = \"pv\"\n")
    };
    let configs = [
        fixture("t-trunc.toml", cfg("trunc", "t-truncated.elf", "4M").as_bytes()),
        fixture("t-arch.toml", cfg("arch", "t-arm.elf", "4M").as_bytes()),
        fixture("t-small.toml", cfg("small", "t-big.elf", "1M").as_bytes()),
        fixture("t-missing.toml", cfg("missing", "nowhere.elf", "4M").as_bytes()),
        fixture("t-typo.toml", b"name = \"typo\"\nkernel = \"domu.elf\"\nmemroy = \"4M\"\n"),
        fixture("t-good.toml", cfg("good", "domu.elf", "4M").as_bytes()),
    ];
    let mut run = test_run();
    run.modules = vec![
        "dom0.elf name=dom0 toolstack mem=32M".into(),
        "domu.elf".into(),
        "t-truncated.elf".into(),
        "t-arm.elf".into(),
        "t-big.elf".into(),
    ];
    run.modules.extend(configs.iter().cloned());
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(
        out,
        &[
            "[dom0] toolstack: t-trunc.toml: t-truncated.elf: ELF file truncated",
            "[dom0] toolstack: t-arch.toml: t-arm.elf: ",
            "[dom0] toolstack: t-small.toml: memory 1M is too small: the image needs",
            "[dom0] toolstack: t-missing.toml: kernel: no module named 'nowhere.elf'",
            "[dom0] toolstack: t-typo.toml: unknown key 'memroy'",
            "[dom0] toolstack: created good (domain 1) from t-good.toml",
            "[good] good up: domid 1",
            "microhv: summary: 2 domains ran: dom0 poweroff, good poweroff; exit success",
        ],
    );
    // No half-built domain was left behind, and all memory came back.
    assert_eq!(out.matches("created by dom0").count(), 1, "a refused configuration still created a domain: {out}");
    assert_frames_returned(out);
}

#[test]
fn creating_and_destroying_100_domus_gives_everything_back() {
    fixture("t-tiny.toml", b"name = \"tiny\"\nkernel = \"hostile.elf\"\nmemory = \"1M\"\ncmdline = \"attack=sleeper\"\nkind = \"pv\"\n");
    let mut run = test_run();
    // `interactive`: Dom0 serves its command line until `quit`.
    run.modules = vec!["dom0.elf name=dom0 toolstack mem=32M interactive".into(), "hostile.elf".into(), "t-tiny.toml manual".into()];
    let mut input = vec![b'\r'; 24];
    input.extend_from_slice(
        b"stress t-tiny.toml 100\rcreate t-tiny.toml\rcreate t-tiny.toml\rconsole tiny\r\x1dconsole nobody\rdestroy tiny\rcreate t-tiny.toml\rquit\r",
    );
    run.input = Some(input);
    let r = run.run().expect("QEMU");
    let out = &r.serial;
    assert_eq!(r.outcome, Outcome::Success, "{out}");
    assert_contains(
        out,
        &[
            "[dom0] stress: after 100 of 100 create/destroy rounds:",
            "[dom0] stress: all counters are back to their starting values",
            "[dom0] toolstack: created tiny (domain 101) from t-tiny.toml",
            "[dom0] create: t-tiny.toml: a domain named 'tiny' already exists",
            "[dom0] serial input now goes to tiny (Ctrl-] switches)",
            "[dom0] console: no running DomU named 'nobody'",
            "[dom0] quit: destroying tiny: done",
            "[dom0] destroy tiny: done",
            "microhv: summary: 103 domains ran: dom0 poweroff, tiny destroyed by dom0 (x102); exit success",
        ],
    );
    // The before and after lines carry the same numbers.
    let nums = |prefix: &str| -> Vec<u64> {
        let l = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"));
        let tail = l.split(": ").last().unwrap_or("");
        tail.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect()
    };
    let before = nums("[dom0] stress: before:");
    let after = nums("[dom0] stress: after 100 of 100");
    assert_eq!(before.len(), 6, "{before:?}");
    assert_eq!(before, after);
    assert_frames_returned(out);
}
