//! `shared_info`: the page microhv and a guest both write, mapped read-write
//! in the guest. It carries system time, the per-vCPU event flags, and the
//! event-channel pending and mask bitmaps.
//!
//! Time: `now_ns = system_time_ns + (((rdtsc - tsc_timestamp) << shift) * mul) >> 32`
//! where a negative `tsc_shift` shifts right. microhv bumps `version` to an odd
//! value while it updates the record and to the next even value after; a
//! reader retries while the version is odd or changed under it.

use core::mem::{offset_of, size_of};

/// vCPUs per domain in this ABI version.
pub const MAX_VCPUS: usize = 1;
/// Event-channel ports per domain (two-level bitmaps of 64 x 64 bits).
pub const EVTCHN_PORTS: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuTime {
    pub version: u32,
    pub _pad0: u32,
    pub tsc_timestamp: u64,
    pub system_time_ns: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub _pad1: [u8; 3],
}

const _: () = assert!(size_of::<VcpuTime>() == 32);

impl VcpuTime {
    /// Nanoseconds of system time at TSC value `tsc`.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let delta = tsc.wrapping_sub(self.tsc_timestamp);
        let delta = if self.tsc_shift >= 0 { delta << self.tsc_shift } else { delta >> (-self.tsc_shift) };
        self.system_time_ns.wrapping_add(((delta as u128 * self.tsc_to_system_mul as u128) >> 32) as u64)
    }
}

/// The (mul, shift) pair that scales a TSC running at `tsc_hz` to nanoseconds:
/// `ns = ((ticks << shift) * mul) >> 32` with `mul < 2^32`.
pub fn tsc_scale(tsc_hz: u64) -> (u32, i8) {
    let tsc_hz = tsc_hz.max(1);
    let mut shift: i8 = 0;
    // mul = 2^32 * 1e9 / (tsc_hz << shift), must fit in 32 bits and keep precision.
    let mut hz = tsc_hz as u128;
    while (1_000_000_000u128 << 32) / hz >= 1 << 32 {
        hz <<= 1;
        shift += 1;
    }
    while (1_000_000_000u128 << 32) / hz < 1 << 31 && shift > -31 {
        hz >>= 1;
        shift -= 1;
    }
    (((1_000_000_000u128 << 32) / hz) as u32, shift)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuInfo {
    /// Set by microhv when an event is pending for this vCPU.
    pub evtchn_upcall_pending: u8,
    /// Set by the guest to hold back upcalls (its "interrupts off").
    pub evtchn_upcall_mask: u8,
    pub _pad0: [u8; 6],
    /// Which 64-port words of `evtchn_pending` may have bits set.
    pub evtchn_pending_sel: u64,
    /// Faulting address of the last page fault delivered to the guest.
    pub cr2: u64,
    pub time: VcpuTime,
    pub _pad1: u64,
}

const _: () = assert!(size_of::<VcpuInfo>() == 64);
const _: () = assert!(offset_of!(VcpuInfo, cr2) == 16);
const _: () = assert!(offset_of!(VcpuInfo, time) == 24);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SharedInfo {
    pub vcpu_info: [VcpuInfo; MAX_VCPUS],
    pub evtchn_pending: [u64; EVTCHN_PORTS / 64],
    pub evtchn_mask: [u64; EVTCHN_PORTS / 64],
}

const _: () = {
    assert!(size_of::<SharedInfo>() <= 4096);
    assert!(offset_of!(SharedInfo, evtchn_pending) == 64);
    assert!(offset_of!(SharedInfo, evtchn_mask) == 64 + 512);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_scale_is_accurate_for_common_rates() {
        for hz in [1_000_000u64, 100_000_000, 1_000_000_000, 2_301_105_000, 3_999_999_999, 10_000_000_000] {
            let (mul, shift) = tsc_scale(hz);
            let t = VcpuTime { tsc_to_system_mul: mul, tsc_shift: shift, ..Default::default() };
            // One second of ticks must read as one second, to 10 ppm.
            let ns = t.ns_at(hz);
            assert!((ns as i64 - 1_000_000_000).abs() < 10_000, "hz {hz}: {ns} ns (mul {mul}, shift {shift})");
        }
    }

    #[test]
    fn time_is_offset_from_the_snapshot() {
        let (mul, shift) = tsc_scale(1_000_000_000);
        let t = VcpuTime { tsc_timestamp: 500, system_time_ns: 7_000, tsc_to_system_mul: mul, tsc_shift: shift, ..Default::default() };
        let ns = t.ns_at(1_500);
        assert!((ns as i64 - 8_000).abs() <= 1);
    }
}
