//! Time since boot from the TSC, once `apic::calibrate` has measured its rate.

use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick, as a 32.32 fixed-point number: the hot path
/// multiplies and shifts instead of dividing (a 128-bit division is a
/// library call of a hundred instructions or more).
static NS_PER_TICK_FP32: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear so it works at any CPL we run.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn mark_boot() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
    let fp = if hz == 0 { 0 } else { ((1_000_000_000u128 << 32) / hz as u128) as u64 };
    NS_PER_TICK_FP32.store(fp, Ordering::Relaxed);
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts a TSC delta to nanoseconds (0 before calibration).
pub fn tsc_to_ns(delta: u64) -> u64 {
    ((delta as u128 * NS_PER_TICK_FP32.load(Ordering::Relaxed) as u128) >> 32) as u64
}

pub fn nanos_since_boot() -> u64 {
    tsc_to_ns(rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}

pub fn micros_since_boot() -> u64 {
    nanos_since_boot() / 1000
}

/// The TSC value at which system time is 0.
pub fn boot_tsc() -> u64 {
    TSC_AT_BOOT.load(Ordering::Relaxed)
}
