//! The event ping-pong benchmark between two domains, the same code in the
//! PV guest and in the hybrid (PVHVM) flavour: only how an event arrives
//! differs (an upcall bounced by microhv, or an injected vector).
//!
//! Dom0 pairs the two domains through the store (`peer` in one's
//! configuration). The measuring side ([`Pinger`]) allocates an unbound port
//! for its peer and publishes it in `<home>/pingpong/port`; the echo side
//! ([`echo`]) binds it, answers every event from its handler with one event
//! back, says `<home>/pingpong/ready`, and ends when the measuring side
//! closes its port. One round trip is two sends, two deliveries and two
//! handler runs, one in each domain.
extern crate alloc;
use alloc::format;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use microhv_guest::hypercall as hc;
use microhv_guest::shared_abi::hypercall::{EvtchnStatus, EVTCHN_STATE_INTERDOMAIN};
use microhv_guest::{events, store, time, DomId, Errno, GuestVa};

static REPLIES: AtomicU64 = AtomicU64::new(0);
static ECHOED: AtomicU64 = AtomicU64::new(0);
static ECHO_PORT: AtomicU32 = AtomicU32::new(0);

/// How long either side waits for the other to appear (ns).
const RENDEZVOUS_NS: u64 = 60_000_000_000;

fn on_reply(_port: u32) {
    REPLIES.fetch_add(1, Ordering::SeqCst);
}

/// Answers a ping. The other side's close also raises the port; the send
/// then fails and is not counted.
fn on_ping(port: u32) {
    // SAFETY: no pointer arguments.
    if unsafe { hc::evtchn_send(u64::from(port)) }.is_ok() {
        ECHOED.fetch_add(1, Ordering::SeqCst);
    }
}

fn peer() -> Result<u16, Errno> {
    let home = store::home();
    let p = store::read_u64(&format!("{home}/peer"))?;
    u16::try_from(p).map_err(|_| Errno::EINVAL)
}

/// Polls `path` until it exists (up to [`RENDEZVOUS_NS`]), every 10 ms at
/// first, then less often (at most every 200 ms): the other side may start
/// many seconds later.
fn wait_for_key(path: &str) -> Result<u64, Errno> {
    let end = time::now_ns() + RENDEZVOUS_NS;
    let mut step = 10_000_000;
    loop {
        match store::read_u64(path) {
            Ok(v) => return Ok(v),
            Err(e) if e != Errno::ENOENT => return Err(e),
            Err(_) if time::now_ns() > end => return Err(Errno::ETIMEDOUT),
            Err(_) => {
                time::sleep_ns(step);
                step = (step * 2).min(200_000_000);
            }
        }
    }
}

fn state(port: u32) -> u32 {
    let mut st = EvtchnStatus::default();
    // SAFETY: `st` is a live local of the record's size.
    match unsafe { hc::evtchn_status(u64::from(port), GuestVa(&mut st as *mut _ as u64)) } {
        Ok(_) => st.state,
        Err(_) => 0,
    }
}

/// The measuring side of a connected pair.
pub struct Pinger {
    port: u32,
}

impl Pinger {
    /// Publishes a port for the peer and waits until the echo side is ready.
    pub fn connect() -> Result<Pinger, Errno> {
        let peer = peer()?;
        // SAFETY: no pointer arguments.
        let port = unsafe { hc::evtchn_alloc_unbound(DomId(peer)) }? as u32;
        events::set_handler(port, on_reply);
        events::unmask_port(port);
        let home = store::home();
        store::write_str(&format!("{home}/pingpong/port"), &format!("{port}"))?;
        wait_for_key(&format!("{}/pingpong/ready", microhv_guest::shared_abi::store::domain_path(DomId(peer))))?;
        if state(port) != EVTCHN_STATE_INTERDOMAIN {
            return Err(Errno::EIO);
        }
        Ok(Pinger { port })
    }

    /// One round trip: send, and wait until the answer's handler has run.
    /// The wait is `sched_poll` with a deadline, not `sched_block`: the
    /// answer may be handled between the check and the call (a hybrid
    /// guest takes its vector whenever interrupts are on), and then a block
    /// with nothing pending would never end.
    pub fn round_trip(&self) {
        let before = REPLIES.load(Ordering::SeqCst);
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::evtchn_send(u64::from(self.port)) };
        while REPLIES.load(Ordering::SeqCst) == before {
            // SAFETY: no pointer arguments; wakes on an event or after 10 ms.
            let _ = unsafe { hc::sched_poll(time::now_ns() + 10_000_000) };
        }
    }

    /// Closes the port, which ends the echo side.
    pub fn close(self) {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::evtchn_close(u64::from(self.port)) };
    }
}

/// The echo side: answers every event until the measuring side closes its
/// port. Returns how many it answered.
pub fn echo() -> Result<u64, Errno> {
    let peer = peer()?;
    let remote = wait_for_key(&format!("{}/pingpong/port", microhv_guest::shared_abi::store::domain_path(DomId(peer))))?;
    // SAFETY: no pointer arguments.
    let port = unsafe { hc::evtchn_bind_interdomain(DomId(peer), remote) }? as u32;
    ECHO_PORT.store(port, Ordering::SeqCst);
    events::set_handler(port, on_ping);
    events::unmask_port(port);
    store::write_str(&format!("{}/pingpong/ready", store::home()), "1")?;
    // Answers come from the handler; between them, sleep in 50 ms steps and
    // look whether the other side has gone.
    while state(port) == EVTCHN_STATE_INTERDOMAIN {
        // SAFETY: no pointer arguments; wakes on an event or after 50 ms.
        let _ = unsafe { hc::sched_poll(time::now_ns() + 50_000_000) };
    }
    // SAFETY: no pointer arguments.
    let _ = unsafe { hc::evtchn_close(u64::from(port)) };
    Ok(ECHOED.load(Ordering::SeqCst))
}
