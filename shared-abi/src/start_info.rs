//! `start_info`: what microhv tells a PV guest at boot.
//!
//! The guest starts in ring 1 at its ELF entry point with RSI = the virtual
//! address of this page and RSP = the top of a small boot stack. All of its
//! initial memory is mapped at `virt_base + pfn * 4096` (page-table frames
//! read-only), and `p2m` lists the machine frame of every pfn.

use core::mem::{offset_of, size_of};

pub const START_INFO_MAGIC: [u8; 8] = *b"microhv\0";

/// `flags` bits.
pub const SIF_PRIVILEGED: u32 = 1 << 0;

pub const CMDLINE_LEN: usize = 256;
pub const NAME_LEN: usize = 32;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct StartInfo {
    pub magic: [u8; 8],
    pub abi_major: u16,
    pub abi_minor: u16,
    pub flags: u32,
    pub domid: u16,
    pub _pad0: [u8; 6],
    /// Pages the domain has at start.
    pub nr_pages: u64,
    /// Most pages the domain may hold (its balloon limit).
    pub max_pages: u64,
    /// Virtual address of pfn 0.
    pub virt_base: u64,
    /// Virtual address of the `shared_info` page.
    pub shared_info_va: u64,
    /// Virtual address (read-only mapping) and machine frame of the top-level table.
    pub pt_base_va: u64,
    pub pt_base_mfn: u64,
    /// Number of page-table frames microhv built.
    pub nr_pt_frames: u64,
    /// Virtual address of `u64[nr_pages]`: pfn -> mfn.
    pub p2m_va: u64,
    /// First pfn not used by the boot layout (kernel, these pages, tables, stack).
    pub first_free_pfn: u64,
    /// DomUs: virtual address of the PV console page (byte rings shared
    /// with Dom0's console backend; layout in `console`), 0 if none.
    pub console_va: u64,
    /// Event-channel port for the console (bound to Dom0's backend).
    pub console_evtchn: u64,
    /// DomUs: virtual address of the store page (same byte-ring layout:
    /// requests in `out`, responses and watch events in `in`), 0 if none.
    pub store_va: u64,
    /// Event-channel port for the store.
    pub store_evtchn: u64,
    pub reserved: [u64; 4],
    /// The command line given for this domain, NUL-terminated.
    pub cmdline: [u8; CMDLINE_LEN],
    /// The domain's name, NUL-terminated.
    pub name: [u8; NAME_LEN],
}

const _: () = {
    assert!(size_of::<StartInfo>() == 448);
    assert!(offset_of!(StartInfo, flags) == 12);
    assert!(offset_of!(StartInfo, domid) == 16);
    assert!(offset_of!(StartInfo, nr_pages) == 24);
    assert!(offset_of!(StartInfo, shared_info_va) == 48);
    assert!(offset_of!(StartInfo, p2m_va) == 80);
    assert!(offset_of!(StartInfo, first_free_pfn) == 88);
    assert!(offset_of!(StartInfo, console_va) == 96);
    assert!(offset_of!(StartInfo, store_evtchn) == 120);
    assert!(offset_of!(StartInfo, cmdline) == 160);
    assert!(offset_of!(StartInfo, name) == 416);
};

fn c_str(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..end]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

fn put_c_str(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let n = s.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl StartInfo {
    pub const fn zeroed() -> Self {
        StartInfo {
            magic: [0; 8],
            abi_major: 0,
            abi_minor: 0,
            flags: 0,
            domid: 0,
            _pad0: [0; 6],
            nr_pages: 0,
            max_pages: 0,
            virt_base: 0,
            shared_info_va: 0,
            pt_base_va: 0,
            pt_base_mfn: 0,
            nr_pt_frames: 0,
            p2m_va: 0,
            first_free_pfn: 0,
            console_va: 0,
            console_evtchn: 0,
            store_va: 0,
            store_evtchn: 0,
            reserved: [0; 4],
            cmdline: [0; CMDLINE_LEN],
            name: [0; NAME_LEN],
        }
    }

    pub fn is_valid(&self) -> bool {
        self.magic == START_INFO_MAGIC && self.abi_major == crate::ABI_VERSION.0
    }

    pub fn privileged(&self) -> bool {
        self.flags & SIF_PRIVILEGED != 0
    }

    pub fn cmdline(&self) -> &str {
        c_str(&self.cmdline)
    }

    pub fn name(&self) -> &str {
        c_str(&self.name)
    }

    pub fn set_cmdline(&mut self, s: &str) {
        put_c_str(&mut self.cmdline, s);
    }

    pub fn set_name(&mut self, s: &str) {
        put_c_str(&mut self.name, s);
    }

    /// The raw bytes (for the hypervisor to copy into guest memory).
    pub fn as_bytes(&self) -> [u8; size_of::<StartInfo>()] {
        let mut out = [0u8; size_of::<StartInfo>()];
        let mut w = Writer { buf: &mut out, at: 0 };
        w.bytes(&self.magic);
        w.bytes(&self.abi_major.to_le_bytes());
        w.bytes(&self.abi_minor.to_le_bytes());
        w.bytes(&self.flags.to_le_bytes());
        w.bytes(&self.domid.to_le_bytes());
        w.bytes(&self._pad0);
        for v in [
            self.nr_pages,
            self.max_pages,
            self.virt_base,
            self.shared_info_va,
            self.pt_base_va,
            self.pt_base_mfn,
            self.nr_pt_frames,
            self.p2m_va,
            self.first_free_pfn,
        ] {
            w.bytes(&v.to_le_bytes());
        }
        for v in [self.console_va, self.console_evtchn, self.store_va, self.store_evtchn] {
            w.bytes(&v.to_le_bytes());
        }
        for v in self.reserved {
            w.bytes(&v.to_le_bytes());
        }
        w.bytes(&self.cmdline);
        w.bytes(&self.name);
        debug_assert_eq!(w.at, out.len());
        out
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_are_truncated() {
        let mut s = StartInfo::zeroed();
        s.set_name("domu1");
        s.set_cmdline("mem=16M x=1");
        assert_eq!(s.name(), "domu1");
        assert_eq!(s.cmdline(), "mem=16M x=1");
        let long = "x".repeat(1000);
        s.set_name(&long);
        assert_eq!(s.name().len(), NAME_LEN - 1);
    }

    #[test]
    fn byte_image_matches_field_offsets() {
        let mut s = StartInfo::zeroed();
        s.magic = START_INFO_MAGIC;
        s.flags = SIF_PRIVILEGED;
        s.domid = 3;
        s.nr_pages = 0x1122;
        s.p2m_va = 0xdead_beef;
        s.set_name("n");
        let b = s.as_bytes();
        assert_eq!(&b[0..8], b"microhv\0");
        assert_eq!(b[offset_of!(StartInfo, flags)], 1);
        assert_eq!(b[offset_of!(StartInfo, domid)], 3);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1122);
        assert_eq!(u64::from_le_bytes(b[80..88].try_into().unwrap()), 0xdead_beef);
        assert_eq!(b[offset_of!(StartInfo, name)], b'n');
    }
}
