//! dom0-core: the host-testable logic of the privileged domain. At this
//! stage: formatting the domain list it reads with `domctl_list`, and the
//! server side of the store ([`store`]). Device backends and the toolstack
//! come later.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ata;
pub mod blkback;
pub mod config;
pub mod input;
pub mod store;

use core::fmt::Write;
use shared_abi::hypercall::{DomainInfo, DOMSTATE_BLOCKED, DOMSTATE_DEAD, DOMSTATE_PAUSED, DOMSTATE_RUNNING};

pub fn state_name(state: u8) -> &'static str {
    match state {
        DOMSTATE_RUNNING => "running",
        DOMSTATE_BLOCKED => "blocked",
        DOMSTATE_DEAD => "ended",
        DOMSTATE_PAUSED => "paused",
        _ => "unknown",
    }
}

/// A fixed-size text buffer (no heap needed).
pub struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Line {
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// One line of the domain list, like `xl list`.
pub fn domain_line(d: &DomainInfo) -> Line {
    let end = d.name.iter().position(|&b| b == 0).unwrap_or(d.name.len());
    let name = core::str::from_utf8(&d.name[..end]).unwrap_or("?");
    let mut l = Line { buf: [0; 128], len: 0 };
    let _ = write!(
        l,
        "id {:>2} {:<8} {:<7} {:>6} KiB (max {:>6} KiB) cpu {:>4} ms{}",
        d.domid,
        name,
        state_name(d.state),
        d.nr_pages * 4,
        d.max_pages * 4,
        d.cpu_time_ns / 1_000_000,
        if d.flags & 1 != 0 { " privileged" } else { "" }
    );
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_domain_line() {
        let mut d = DomainInfo { domid: 1, state: DOMSTATE_DEAD, nr_pages: 2048, max_pages: 2064, cpu_time_ns: 12_000_000, ..Default::default() };
        d.name[..5].copy_from_slice(b"domu1");
        let l = domain_line(&d);
        assert!(l.as_str().contains("domu1"), "{}", l.as_str());
        assert!(l.as_str().contains("ended"));
        assert!(l.as_str().contains("8192 KiB"));
        assert!(!l.as_str().contains("privileged"));
        d.flags = 1;
        assert!(domain_line(&d).as_str().ends_with("privileged"));
    }

    #[test]
    fn unknown_state_and_bad_name_do_not_panic() {
        let d = DomainInfo { state: 99, name: [0xff; 32], ..Default::default() };
        assert_eq!(state_name(d.state), "unknown");
        let _ = domain_line(&d);
    }
}
