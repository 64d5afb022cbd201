//! Helpers shared by the system tests (which boot images with the xtask
//! library's runners and read what the serial console printed).

/// Fails, showing the whole output, unless every needle appears in `out`.
pub fn assert_contains(out: &str, needles: &[&str]) {
    for n in needles {
        assert!(out.contains(n), "missing {n:?} in:\n{out}");
    }
}

/// Checks microhv's closing `microhv: memory: N frames free now, M before
/// the domains were built` line: every frame given to a domain came back.
pub fn assert_frames_returned(out: &str) {
    let line = out
        .lines()
        .find(|l| l.starts_with("microhv: memory:"))
        .unwrap_or_else(|| panic!("no 'microhv: memory:' line in:\n{out}"));
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "unexpected memory line: {line}");
    assert_eq!(nums[0], nums[1], "frames not all returned: {line}");
}
