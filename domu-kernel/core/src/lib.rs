//! domu-core: the host-testable logic of the demo PV guest.
//!
//! The bare-metal binary (`domu-kernel/kernel`) does the hypercalls; the
//! arithmetic and checks it reports live here so `cargo test` covers them.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

/// Signed error of a measured duration against the asked one, in tenths of a percent.
pub fn error_permille(asked_ns: u64, measured_ns: u64) -> i64 {
    if asked_ns == 0 {
        return 0;
    }
    ((measured_ns as i128 - asked_ns as i128) * 1000 / asked_ns as i128) as i64
}

/// True when `measured` is within `tolerance_percent` of `asked`.
pub fn within(asked_ns: u64, measured_ns: u64, tolerance_percent: u64) -> bool {
    error_permille(asked_ns, measured_ns).unsigned_abs() <= tolerance_percent * 10
}

/// The word written at `index` of a ballooned page: depends on the domain
/// name, so two domains never write the same pattern.
pub fn pattern(name: &str, page: u64, index: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (page << 32) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A ping-pong request on the DomU-to-DomU ring.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct Ping {
    pub seq: u32,
    pub _pad: u32,
    pub value: u64,
    /// The sender's TSC when it queued the request (for round-trip times).
    pub sent_tsc: u64,
}

/// The answer: `value` transformed by [`pong_value`], so the front end can
/// check every answer.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct Pong {
    pub seq: u32,
    pub _pad: u32,
    pub value: u64,
    pub sent_tsc: u64,
}

/// The value the front end sends with message `seq`.
pub fn ping_value(seq: u32) -> u64 {
    (seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555_aaaa_5555_aaaa
}

/// What the back end answers.
pub fn pong_value(v: u64) -> u64 {
    v.rotate_left(17) ^ 0x0123_4567_89ab_cdef
}

/// Running checksum over message values (both ends compute it over the
/// requests, so the two must print the same number).
pub fn checksum(acc: u64, v: u64) -> u64 {
    (acc ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(5)
}

/// Median and 95th percentile of a sample (sorted in place).
pub fn median_p95(xs: &mut [u64]) -> (u64, u64) {
    if xs.is_empty() {
        return (0, 0);
    }
    xs.sort_unstable();
    (xs[xs.len() / 2], xs[(xs.len() * 95 / 100).min(xs.len() - 1)])
}

/// Formats nanoseconds as "12.345 ms" parts: (whole ms, thousandths).
pub fn ms_parts(ns: u64) -> (u64, u64) {
    (ns / 1_000_000, (ns / 1000) % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_and_tolerance() {
        assert_eq!(error_permille(100, 110), 100);
        assert_eq!(error_permille(100, 95), -50);
        assert!(within(50_000_000, 54_000_000, 10));
        assert!(!within(50_000_000, 56_000_000, 10));
        assert!(!within(50_000_000, 40_000_000, 10));
        assert_eq!(error_permille(0, 5), 0);
    }

    #[test]
    fn patterns_differ_by_name_page_and_index() {
        assert_ne!(pattern("domu1", 0, 0), pattern("domu2", 0, 0));
        assert_ne!(pattern("domu1", 0, 0), pattern("domu1", 1, 0));
        assert_ne!(pattern("domu1", 0, 0), pattern("domu1", 0, 1));
        assert_eq!(pattern("x", 3, 4), pattern("x", 3, 4));
    }

    #[test]
    fn ping_pong_values_and_checksum() {
        assert_ne!(ping_value(1), ping_value(2));
        assert_ne!(pong_value(ping_value(1)), ping_value(1));
        let a = (0..100).fold(0, |c, s| checksum(c, ping_value(s)));
        let b = (0..100).fold(0, |c, s| checksum(c, ping_value(s)));
        assert_eq!(a, b);
        // Order and content both matter.
        let c = (0..100).rev().fold(0, |c, s| checksum(c, ping_value(s)));
        assert_ne!(a, c);
        assert_eq!(core::mem::size_of::<Ping>(), 24);
        let mut xs = [5, 1, 9, 3, 7];
        assert_eq!(median_p95(&mut xs), (5, 9));
    }

    #[test]
    fn ms_formatting() {
        assert_eq!(ms_parts(12_345_678), (12, 345));
    }
}

/// The demo's disk layout: a header in sector 0 of the virtual disk, then
/// [`DISK_DATA_SECTORS`] sectors of data written by run `run`.
pub mod disk {
    /// "MHVDISK1".
    pub const MAGIC: [u8; 8] = *b"MHVDISK1";
    /// Data starts one page in.
    pub const DATA_SECTOR: u64 = 8;
    /// 1 MiB of data per run.
    pub const DISK_DATA_SECTORS: u64 = 2048;

    /// The header: magic, owner name (NUL-padded, 32 bytes), run counter.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Header {
        pub name: [u8; 32],
        pub run: u64,
    }

    impl Header {
        pub fn new(name: &str, run: u64) -> Header {
            let mut n = [0u8; 32];
            let k = name.len().min(32);
            n[..k].copy_from_slice(&name.as_bytes()[..k]);
            Header { name: n, run }
        }
        pub fn encode(&self) -> [u8; 48] {
            let mut b = [0u8; 48];
            b[..8].copy_from_slice(&MAGIC);
            b[8..40].copy_from_slice(&self.name);
            b[40..48].copy_from_slice(&self.run.to_le_bytes());
            b
        }
        pub fn decode(b: &[u8]) -> Option<Header> {
            if b.len() < 48 || b[..8] != MAGIC {
                return None;
            }
            Some(Header { name: b[8..40].try_into().ok()?, run: u64::from_le_bytes(b[40..48].try_into().ok()?) })
        }
        pub fn is_for(&self, name: &str) -> bool {
            *self == Header::new(name, self.run)
        }
    }

    /// The `i`-th u64 of the data area written by `name`'s run `run`.
    pub fn word(name: &str, run: u64, i: u64) -> u64 {
        super::pattern(name, (run << 20) | (i / 512), i % 512)
    }
}

#[cfg(test)]
mod disk_tests {
    use super::disk::*;

    #[test]
    fn header_round_trips_and_patterns_differ_per_name_and_run() {
        let h = Header::new("domu1", 7);
        assert_eq!(Header::decode(&h.encode()), Some(h.clone()));
        assert!(h.is_for("domu1") && !h.is_for("domu2"));
        assert_eq!(Header::decode(&[0u8; 48]), None);
        assert_ne!(word("domu1", 1, 5), word("domu2", 1, 5));
        assert_ne!(word("domu1", 1, 5), word("domu1", 2, 5));
        assert_ne!(word("domu1", 1, 5), word("domu1", 1, 6));
    }
}
