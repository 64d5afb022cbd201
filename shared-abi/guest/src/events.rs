//! Event channels, guest side: the `shared_info` flags and bitmaps, port
//! handlers, and the upcall that dispatches pending ports.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use shared_abi::shared_info::{SharedInfo, VcpuInfo, VcpuTime, EVTCHN_PORTS};

/// A view of vCPU 0's `vcpu_info`, which microhv writes concurrently.
pub struct VcpuView(&'static VcpuInfo);

fn shared_info_ptr() -> *mut SharedInfo {
    crate::start_info().shared_info_va as *mut SharedInfo
}

pub fn vcpu_info() -> VcpuView {
    // SAFETY: shared_info is mapped read-write for the domain's life.
    VcpuView(unsafe { &(*shared_info_ptr()).vcpu_info[0] })
}

fn atomic_u8(p: *const u8) -> &'static AtomicU8 {
    // SAFETY: `p` points into shared_info, which lives forever; AtomicU8 has
    // the layout of u8, and microhv also treats these bytes atomically.
    unsafe { &*(p as *const AtomicU8) }
}

fn atomic_u64(p: *const u64) -> &'static AtomicU64 {
    // SAFETY: as in atomic_u8, for 8-byte aligned fields of shared_info.
    unsafe { &*(p as *const AtomicU64) }
}

impl VcpuView {
    pub fn upcall_pending(&self) -> &'static AtomicU8 {
        atomic_u8(&self.0.evtchn_upcall_pending)
    }
    pub fn upcall_mask(&self) -> &'static AtomicU8 {
        atomic_u8(&self.0.evtchn_upcall_mask)
    }
    pub fn pending_sel(&self) -> &'static AtomicU64 {
        atomic_u64(&self.0.evtchn_pending_sel)
    }
    pub fn cr2(&self) -> u64 {
        // SAFETY: reading an aligned u64 that microhv writes before delivering #PF.
        unsafe { core::ptr::read_volatile(&self.0.cr2) }
    }
    pub fn time_version(&self) -> u32 {
        // SAFETY: AtomicU32 has u32's layout; the field is 4-byte aligned.
        unsafe { &*(&self.0.time.version as *const u32 as *const AtomicU32) }.load(Ordering::Acquire)
    }
    pub fn time(&self) -> VcpuTime {
        // SAFETY: a volatile copy; torn reads are detected by the version check.
        unsafe { core::ptr::read_volatile(&self.0.time) }
    }
}

fn pending_word(i: usize) -> &'static AtomicU64 {
    // SAFETY: index < EVTCHN_PORTS / 64, inside shared_info.
    atomic_u64(unsafe { &(*shared_info_ptr()).evtchn_pending[i] })
}

fn mask_word(i: usize) -> &'static AtomicU64 {
    // SAFETY: as in pending_word.
    atomic_u64(unsafe { &(*shared_info_ptr()).evtchn_mask[i] })
}

/// Disables event upcalls (the guest's "cli"). Returns the previous mask.
pub fn mask_events() -> u8 {
    vcpu_info().upcall_mask().swap(1, Ordering::SeqCst)
}

/// Enables event upcalls; pending events are delivered at the next entry to
/// microhv (a yield makes that immediate).
pub fn unmask_events() {
    let v = vcpu_info();
    v.upcall_mask().store(0, Ordering::SeqCst);
    if v.upcall_pending().load(Ordering::SeqCst) != 0 {
        // SAFETY: no pointers; microhv delivers the pending upcall on return.
        let _ = unsafe { crate::hypercall::sched_yield() };
    }
}

pub fn mask_port(port: u32) {
    mask_word(port as usize / 64).fetch_or(1 << (port % 64), Ordering::SeqCst);
}

pub fn unmask_port(port: u32) {
    mask_word(port as usize / 64).fetch_and(!(1 << (port % 64)), Ordering::SeqCst);
}

const MAX_HANDLERS: usize = 64;
static HANDLERS: [AtomicUsize; MAX_HANDLERS] = [const { AtomicUsize::new(0) }; MAX_HANDLERS];
static EVENTS_SEEN: AtomicU64 = AtomicU64::new(0);

/// Runs `f(port)` whenever `port` (< 64) fires.
pub fn set_handler(port: u32, f: fn(u32)) {
    if (port as usize) < MAX_HANDLERS {
        HANDLERS[port as usize].store(f as usize, Ordering::SeqCst);
    }
}

/// Total events this guest has handled.
pub fn events_seen() -> u64 {
    EVENTS_SEEN.load(Ordering::Relaxed)
}

/// Binds `virq` to a new port, installs `handler` and unmasks the port.
pub fn bind_virq(virq: u64, handler: fn(u32)) -> Result<u32, shared_abi::Errno> {
    // SAFETY: no pointers.
    let port = unsafe { crate::hypercall::evtchn_bind_virq(virq) }? as u32;
    set_handler(port, handler);
    unmask_port(port);
    Ok(port)
}

/// The upcall: called (events masked) when microhv signals pending events;
/// a hybrid guest calls it from its event-channel vector's handler.
pub fn upcall() {
    let v = vcpu_info();
    while v.upcall_pending().swap(0, Ordering::SeqCst) != 0 {
        let mut sel = v.pending_sel().swap(0, Ordering::SeqCst);
        while sel != 0 {
            let w = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            if w >= EVTCHN_PORTS / 64 {
                continue;
            }
            let mut bits = pending_word(w).load(Ordering::SeqCst) & !mask_word(w).load(Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let port = (w * 64 + b) as u32;
                pending_word(w).fetch_and(!(1 << b), Ordering::SeqCst);
                EVENTS_SEEN.fetch_add(1, Ordering::Relaxed);
                let h = if (port as usize) < MAX_HANDLERS { HANDLERS[port as usize].load(Ordering::SeqCst) } else { 0 };
                if h != 0 {
                    // SAFETY: only `fn(u32)` values are stored by set_handler.
                    let f: fn(u32) = unsafe { core::mem::transmute::<usize, fn(u32)>(h) };
                    f(port);
                }
            }
        }
    }
}
