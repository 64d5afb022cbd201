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

/// The console text with microhv's log lines (`[  1.234567] INFO  ...`)
/// taken out. microhv logs in ring 0 while Dom0 may be half-way through
/// printing a guest's line on the same UART, so a log line can land in
/// the middle of another; without them, every guest line reads whole again.
pub fn without_log_lines(out: &str) -> String {
    let bytes = out.as_bytes();
    let mut text = String::with_capacity(out.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(len) = log_line_at(&out[i..]) {
            i += len;
            continue;
        }
        let ch = out[i..].chars().next().expect("in bounds");
        text.push(ch);
        i += ch.len_utf8();
    }
    text
}

/// Length (newline included) of a microhv log line starting at `s`.
fn log_line_at(s: &str) -> Option<usize> {
    let rest = s.strip_prefix('[')?;
    let close = rest.find(']')?;
    let stamp = rest[..close].trim_start();
    let (secs, frac) = stamp.split_once('.')?;
    if secs.is_empty() || frac.is_empty() || !secs.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let after = &rest[close + 1..];
    if !["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].iter().any(|l| after.strip_prefix(' ').is_some_and(|a| a.starts_with(l))) {
        return None;
    }
    let end = after.find('\n').map_or(after.len(), |n| n + 1);
    Some(1 + close + 1 + end)
}

/// Checks of a disk image the demo DomUs wrote to (from the host, after
/// the boot): the same under QEMU (virtio-blk) and Bochs (ATA).
pub mod disk {
    use domu_core::disk::{word, Header, DATA_SECTOR, DISK_DATA_SECTORS};

    pub const SECTOR: usize = 512;
    /// Where the default configurations put each DomU's virtual disk.
    pub const DOMU1_START: usize = 2048;
    pub const DOMU2_START: usize = 32768;
    /// The hybrid guest hvm3's virtual disk in the Bochs demo (hvm3.toml).
    pub const HVM3_START: usize = 53248;

    /// Checks the demo's header and data for `name`'s run `run` at `start`.
    pub fn assert_demo_region(img: &[u8], start: usize, name: &str, run: u64) {
        let at = start * SECTOR;
        let h = Header::decode(&img[at..at + 48]).unwrap_or_else(|| panic!("no demo header at sector {start}"));
        assert!(h.is_for(name), "header at sector {start} is not {name}'s: {h:?}");
        assert_eq!(h.run, run, "run counter of {name}");
        let data = at + DATA_SECTOR as usize * SECTOR;
        let words = (DISK_DATA_SECTORS as usize * SECTOR) / 8;
        for i in 0..words {
            let got = u64::from_le_bytes(img[data + i * 8..data + i * 8 + 8].try_into().unwrap());
            assert_eq!(got, word(name, run, i as u64), "{name}'s data word {i} (run {run})");
        }
    }

    /// Every byte outside `regions` (sector ranges) is still zero.
    pub fn assert_zero_outside(img: &[u8], regions: &[(usize, usize)]) {
        let mut at = 0;
        let mut sorted = regions.to_vec();
        sorted.sort();
        for (s, e) in sorted.into_iter().chain([(img.len() / SECTOR, img.len() / SECTOR)]) {
            if let Some(i) = img[at..s * SECTOR].iter().position(|&b| b != 0) {
                panic!("byte {:#x} (sector {}) changed outside every DomU's region", at + i, (at + i) / SECTOR);
            }
            at = e * SECTOR;
        }
    }

    /// The first sector after the demo's data at `start`.
    pub fn demo_end(start: usize) -> usize {
        start + (DATA_SECTOR + DISK_DATA_SECTORS) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_inside_guest_lines_are_taken_out() {
        let out = "[hvm1] hvm1 up: HVM[    2.690445] WARN  hvm1: rdmsr refused\n guest, ok\n[dom0] x [1.5] y\n[   10.000001] INFO  done\n";
        assert_eq!(without_log_lines(out), "[hvm1] hvm1 up: HVM guest, ok\n[dom0] x [1.5] y\n");
    }
}
