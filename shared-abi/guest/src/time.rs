//! System time from the `shared_info` time record, and sleeping.

use shared_abi::shared_info::VcpuTime;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 1 (CR4.TSD clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds since microhv booted.
pub fn now_ns() -> u64 {
    let info = crate::events::vcpu_info();
    loop {
        let v1 = info.time_version();
        let t: VcpuTime = info.time();
        let ns = t.ns_at(rdtsc());
        if v1.is_multiple_of(2) && info.time_version() == v1 {
            return ns;
        }
    }
}

/// Sleeps until system time `deadline_ns`, blocking in microhv meanwhile.
pub fn sleep_until(deadline_ns: u64) {
    while now_ns() < deadline_ns {
        // SAFETY: no pointers.
        let _ = unsafe { crate::hypercall::sched_poll(deadline_ns) };
    }
}

pub fn sleep_ns(ns: u64) {
    sleep_until(now_ns().saturating_add(ns));
}
