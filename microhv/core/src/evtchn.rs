//! Event channels: the per-domain ports through which microhv and domains
//! signal each other, modelled on Xen's.
//!
//! Every port of every domain is an explicit [`ChannelState`], and these are
//! the only transitions:
//!
//! | from | call | to |
//! |------|------|----|
//! | `Free` | `alloc_unbound(d, r)` | `Unbound { remote: r }` |
//! | `Free` (new port of `r`) + `Unbound { remote: r }` (port `p` of `d`) | `bind_interdomain(r, d, p)` | both `Interdomain`, pointing at each other |
//! | `Free` | `bind_virq` / `bind_pirq` | `Virq(v)` / `Pirq(n)` |
//! | any but `Free` | `close` | `Free` |
//! | `Interdomain` (other end) | `close` of this end, or `remove_domain` of its domain | `Unbound { remote: closer }` |
//!
//! * Port 0 is reserved and never valid; a domain's ports are `1..max_ports`
//!   with `max_ports <= EVTCHN_PORTS` (4096), so every port has a bit in the
//!   `shared_info` bitmaps. Allocation takes the lowest free port.
//! * Interdomain bindings are always symmetric: `(a, p)` is
//!   `Interdomain { remote: b, remote_port: q }` exactly when `(b, q)` is
//!   `Interdomain { remote: a, remote_port: p }`. A domain may bind to its
//!   own unbound port (loopback), as in Xen.
//! * Closing one end of an interdomain channel, or removing the domain that
//!   holds it, turns the other end back into `Unbound { remote }` (naming the
//!   closer), which is what Xen does; [`EventChannels::remove_domain`]
//!   reports those ports so the caller can notify their owners.
//! * Errors: -ESRCH a domain that has no ports (never added, or removed);
//!   -EINVAL a port out of range or in the wrong state, including "not open"
//!   (Free) for [`EventChannels::close`] and sending on anything but an
//!   interdomain port (Xen silently drops sends on unbound ports; here they
//!   are an error, so that a guest learns about its mistake); -EEXIST a VIRQ
//!   or PIRQ already bound; -ENOSPC no free port.
//!
//! The pending/mask bitmaps themselves live in the guest's `shared_info`
//! page; [`mark_pending`] and [`unmask`] implement Xen's two-level delivery
//! logic on plain arrays so the hypervisor can apply them to that page.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use shared_abi::shared_info::EVTCHN_PORTS;
use shared_abi::{DomId, Errno};

/// An event-channel port number of one domain.
pub type Port = u32;

/// Default bound on a domain's port numbers (ports `1..1024`).
pub const DEFAULT_MAX_PORTS: u32 = 1024;

/// Words of the two-level bitmaps (`EVTCHN_PORTS / 64` = 64).
const WORDS: usize = EVTCHN_PORTS / 64;

/// The state of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Not in use.
    Free,
    /// Allocated, waiting for `remote` to bind to it.
    Unbound { remote: DomId },
    /// Connected to port `remote_port` of `remote`.
    Interdomain { remote: DomId, remote_port: Port },
    /// Receives this virtual IRQ.
    Virq(u32),
    /// Receives this physical IRQ.
    Pirq(u32),
}

/// One domain's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DomainPorts {
    /// `ports[p]` is port `p`; ports past the end are Free. Grown on demand
    /// up to `max_ports`, shrunk when the tail frees; `ports[0]` stays Free.
    ports: Vec<ChannelState>,
    max_ports: u32,
    in_use: u32,
    /// Bound VIRQs.
    virqs: BTreeMap<u32, Port>,
}

/// The event-channel ports of all domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventChannels {
    doms: BTreeMap<DomId, DomainPorts>,
    /// Bound PIRQs, machine-wide.
    pirqs: BTreeMap<u32, (DomId, Port)>,
}

impl EventChannels {
    /// No domains yet.
    pub fn new() -> Self {
        EventChannels { doms: BTreeMap::new(), pirqs: BTreeMap::new() }
    }

    /// Gives `d` ports `1..max_ports`, all Free (port 0 is reserved).
    /// -EEXIST when `d` has ports already; -EINVAL when `max_ports` exceeds
    /// `EVTCHN_PORTS` (the ports would not fit the `shared_info` bitmaps).
    pub fn add_domain(&mut self, d: DomId, max_ports: u32) -> Result<(), Errno> {
        if self.doms.contains_key(&d) {
            return Err(Errno::EEXIST);
        }
        if max_ports as usize > EVTCHN_PORTS {
            return Err(Errno::EINVAL);
        }
        let ports = alloc::vec![ChannelState::Free];
        self.doms.insert(d, DomainPorts { ports, max_ports, in_use: 0, virqs: BTreeMap::new() });
        Ok(())
    }

    /// Closes all of `d`'s ports and forgets it. The other ends of its
    /// interdomain channels (in other domains) become `Unbound { remote: d }`;
    /// they are returned, sorted, so that the caller can notify them. Ports
    /// of others that are `Unbound { remote: d }` stay as they are. Nothing
    /// happens (empty list) when `d` is unknown.
    pub fn remove_domain(&mut self, d: DomId) -> Vec<(DomId, Port)> {
        let Some(dp) = self.doms.remove(&d) else {
            return Vec::new();
        };
        let mut peers = Vec::new();
        for st in dp.ports {
            match st {
                ChannelState::Interdomain { remote, remote_port } if remote != d => {
                    debug_assert!(self.doms.contains_key(&remote), "channel to a removed domain");
                    if self.doms.contains_key(&remote) {
                        self.set(remote, remote_port, ChannelState::Unbound { remote: d });
                        peers.push((remote, remote_port));
                    }
                }
                ChannelState::Pirq(p) => {
                    self.pirqs.remove(&p);
                }
                _ => {}
            }
        }
        peers.sort();
        peers
    }

    /// Allocates a port of `d` that `remote` (which may be `d` itself) can
    /// bind to with [`bind_interdomain`](Self::bind_interdomain).
    /// -ESRCH either domain unknown; -ENOSPC no free port.
    pub fn alloc_unbound(&mut self, d: DomId, remote: DomId) -> Result<Port, Errno> {
        self.dom(remote)?;
        let port = self.free_port(d)?;
        self.set(d, port, ChannelState::Unbound { remote });
        Ok(port)
    }

    /// Connects a new port of `d` to `remote_port` of `remote`, which must be
    /// `Unbound { remote: d }`; both become `Interdomain`. Returns the new
    /// port. -ESRCH either domain unknown; -EINVAL `remote_port` out of range
    /// or not unbound for `d`; -ENOSPC no free port in `d`.
    pub fn bind_interdomain(&mut self, d: DomId, remote: DomId, remote_port: Port) -> Result<Port, Errno> {
        self.dom(d)?;
        if self.state(remote, remote_port)? != (ChannelState::Unbound { remote: d }) {
            return Err(Errno::EINVAL);
        }
        let port = self.free_port(d)?;
        self.set(d, port, ChannelState::Interdomain { remote, remote_port });
        self.set(remote, remote_port, ChannelState::Interdomain { remote: d, remote_port: port });
        Ok(port)
    }

    /// Binds virtual IRQ `virq` (`< nr_virqs`) of `d` to a new port.
    /// -ESRCH `d` unknown; -EINVAL `virq >= nr_virqs`; -EEXIST already bound
    /// in `d`; -ENOSPC no free port.
    pub fn bind_virq(&mut self, d: DomId, virq: u32, nr_virqs: u32) -> Result<Port, Errno> {
        let dp = self.dom(d)?;
        if virq >= nr_virqs {
            return Err(Errno::EINVAL);
        }
        if dp.virqs.contains_key(&virq) {
            return Err(Errno::EEXIST);
        }
        let port = self.free_port(d)?;
        self.set(d, port, ChannelState::Virq(virq));
        Ok(port)
    }

    /// Binds physical IRQ `pirq` to a new port of `d`. The caller checks
    /// that `d` may have it. -ESRCH `d` unknown; -EEXIST bound anywhere;
    /// -ENOSPC no free port.
    pub fn bind_pirq(&mut self, d: DomId, pirq: u32) -> Result<Port, Errno> {
        self.dom(d)?;
        if self.pirqs.contains_key(&pirq) {
            return Err(Errno::EEXIST);
        }
        let port = self.free_port(d)?;
        self.set(d, port, ChannelState::Pirq(pirq));
        Ok(port)
    }

    /// Closes `port` of `d`, which becomes Free. For an interdomain port the
    /// other end becomes `Unbound { remote: d }`. -ESRCH `d` unknown;
    /// -EINVAL out of range, or not open (Free).
    pub fn close(&mut self, d: DomId, port: Port) -> Result<(), Errno> {
        match self.state(d, port)? {
            ChannelState::Free => return Err(Errno::EINVAL),
            ChannelState::Interdomain { remote, remote_port } => {
                debug_assert_eq!(
                    self.state(remote, remote_port),
                    Ok(ChannelState::Interdomain { remote: d, remote_port: port })
                );
                if self.doms.contains_key(&remote) {
                    self.set(remote, remote_port, ChannelState::Unbound { remote: d });
                }
            }
            _ => {}
        }
        self.set(d, port, ChannelState::Free);
        Ok(())
    }

    /// Where a send on `port` of `d` lands: the other end of an interdomain
    /// channel, as (domain, port). -ESRCH `d` unknown; -EINVAL out of range,
    /// or the port is Free, Unbound, a VIRQ or a PIRQ (those are signalled
    /// by microhv, not sent on).
    pub fn send(&self, d: DomId, port: Port) -> Result<(DomId, Port), Errno> {
        match self.state(d, port)? {
            ChannelState::Interdomain { remote, remote_port } => Ok((remote, remote_port)),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The state of `port` of `d` (Free for an unused port in range).
    /// -ESRCH `d` unknown; -EINVAL port 0 or `>= max_ports`.
    pub fn status(&self, d: DomId, port: Port) -> Result<ChannelState, Errno> {
        self.state(d, port)
    }

    /// The port of `d` bound to `virq`, if any.
    pub fn virq_port(&self, d: DomId, virq: u32) -> Option<Port> {
        self.doms.get(&d)?.virqs.get(&virq).copied()
    }

    /// The (domain, port) bound to `pirq`, if any.
    pub fn pirq_port(&self, pirq: u32) -> Option<(DomId, Port)> {
        self.pirqs.get(&pirq).copied()
    }

    /// Ports of `d` that are not Free (0 for an unknown domain).
    pub fn ports_in_use(&self, d: DomId) -> u32 {
        self.doms.get(&d).map_or(0, |dp| dp.in_use)
    }

    fn dom(&self, d: DomId) -> Result<&DomainPorts, Errno> {
        self.doms.get(&d).ok_or(Errno::ESRCH)
    }

    fn state(&self, d: DomId, port: Port) -> Result<ChannelState, Errno> {
        let dp = self.dom(d)?;
        if port == 0 || port >= dp.max_ports {
            return Err(Errno::EINVAL);
        }
        Ok(dp.ports.get(port as usize).copied().unwrap_or(ChannelState::Free))
    }

    /// The lowest Free port of `d` (changes nothing).
    fn free_port(&self, d: DomId) -> Result<Port, Errno> {
        let dp = self.dom(d)?;
        let i = dp.ports.iter().skip(1).position(|s| *s == ChannelState::Free).map_or(dp.ports.len(), |i| i + 1);
        match Port::try_from(i) {
            Ok(p) if p >= 1 && p < dp.max_ports => Ok(p),
            _ => Err(Errno::ENOSPC),
        }
    }

    /// Sets `port` of `d` (both checked by the caller) to `st`, keeping the
    /// counts and the VIRQ and PIRQ indexes in step.
    fn set(&mut self, d: DomId, port: Port, st: ChannelState) {
        let Some(dp) = self.doms.get_mut(&d) else {
            debug_assert!(false, "set on unknown domain {d:?}");
            return;
        };
        let i = port as usize;
        if i >= dp.ports.len() {
            dp.ports.resize(i + 1, ChannelState::Free);
        }
        let old = core::mem::replace(&mut dp.ports[i], st);
        match old {
            ChannelState::Free => {}
            ChannelState::Virq(v) => {
                dp.virqs.remove(&v);
            }
            ChannelState::Pirq(p) => {
                self.pirqs.remove(&p);
            }
            _ => {}
        }
        match st {
            ChannelState::Free => {}
            ChannelState::Virq(v) => {
                dp.virqs.insert(v, port);
            }
            ChannelState::Pirq(p) => {
                self.pirqs.insert(p, (d, port));
            }
            _ => {}
        }
        let was_used = old != ChannelState::Free;
        let now_used = st != ChannelState::Free;
        if now_used && !was_used {
            dp.in_use += 1;
        } else if was_used && !now_used {
            dp.in_use -= 1;
        }
        while dp.ports.len() > 1 && dp.ports.last() == Some(&ChannelState::Free) {
            dp.ports.pop();
        }
    }
}

/// What [`mark_pending`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingUpdate {
    /// The port's pending bit was already set: nothing else was done.
    pub port_was_pending: bool,
    /// The port is masked: its pending bit is set, nothing else was done.
    pub masked: bool,
    /// The selector word the port's bit lives in, when the event got through
    /// (pending bit newly set, not masked); its selector bit is set now.
    pub set_selector_bit: Option<usize>,
    /// `upcall_pending` went from 0 to 1: the vCPU needs an upcall (or a
    /// wake-up, if it is blocked).
    pub raise_upcall: bool,
}

/// Word index and bit of `port` in the bitmaps, or `None` past their end.
fn bit(port: Port) -> Option<(usize, u64)> {
    let p = usize::try_from(port).ok().filter(|&p| p < EVTCHN_PORTS)?;
    Some((p / 64, 1u64 << (p % 64)))
}

/// Marks `port` pending, with Xen's two-level semantics: set the port's bit
/// in `pending`; if it was set already, or the port is masked, stop there;
/// otherwise set the selector bit of its word in `sel`
/// (`evtchn_pending_sel`) and `upcall_pending` (`evtchn_upcall_pending`).
/// Ports past the bitmaps (`>= EVTCHN_PORTS`, impossible for ports from
/// [`EventChannels`]) change nothing and report nothing.
///
/// Unlike Xen, which touches `upcall_pending` only when the selector bit
/// was newly set, this sets it whenever the event gets through: at worst a
/// spurious upcall, never a lost one.
pub fn mark_pending(pending: &mut [u64; WORDS], mask: &[u64; WORDS], sel: &mut u64, upcall_pending: &mut u8, port: Port) -> PendingUpdate {
    let Some((w, b)) = bit(port) else {
        return PendingUpdate::default();
    };
    let was_pending = pending[w] & b != 0;
    pending[w] |= b;
    let masked = mask[w] & b != 0;
    if was_pending || masked {
        return PendingUpdate { port_was_pending: was_pending, masked, set_selector_bit: None, raise_upcall: false };
    }
    *sel |= 1 << w;
    let raise_upcall = *upcall_pending == 0;
    *upcall_pending = 1;
    PendingUpdate { port_was_pending: false, masked: false, set_selector_bit: Some(w), raise_upcall }
}

/// Unmasks `port`: clears its mask bit and, if it is pending, delivers it as
/// [`mark_pending`] would (selector bit and `upcall_pending`). Returns true
/// when `upcall_pending` went from 0 to 1 (an upcall is due). Ports past
/// the bitmaps change nothing.
pub fn unmask(pending: &[u64; WORDS], mask: &mut [u64; WORDS], sel: &mut u64, upcall_pending: &mut u8, port: Port) -> bool {
    let Some((w, b)) = bit(port) else {
        return false;
    };
    mask[w] &= !b;
    if pending[w] & b == 0 {
        return false;
    }
    *sel |= 1 << w;
    let raise = *upcall_pending == 0;
    *upcall_pending = 1;
    raise
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ChannelState::*;

    const A: DomId = DomId(1);
    const B: DomId = DomId(2);
    const C: DomId = DomId(3);

    fn chans(max: u32) -> EventChannels {
        let mut ec = EventChannels::new();
        for d in [A, B, C] {
            ec.add_domain(d, max).unwrap();
        }
        ec
    }

    #[test]
    fn interdomain_channel_lifecycle() {
        let mut ec = chans(DEFAULT_MAX_PORTS);
        let pa = ec.alloc_unbound(A, B).unwrap();
        assert_eq!(pa, 1);
        assert_eq!(ec.status(A, pa), Ok(Unbound { remote: B }));
        let pb = ec.bind_interdomain(B, A, pa).unwrap();
        assert_eq!(ec.status(A, pa), Ok(Interdomain { remote: B, remote_port: pb }));
        assert_eq!(ec.status(B, pb), Ok(Interdomain { remote: A, remote_port: pa }));
        assert_eq!(ec.send(A, pa), Ok((B, pb)));
        assert_eq!(ec.send(B, pb), Ok((A, pa)));
        assert_eq!((ec.ports_in_use(A), ec.ports_in_use(B)), (1, 1));
        // Closing one end leaves the other unbound for the closer.
        ec.close(B, pb).unwrap();
        assert_eq!(ec.status(B, pb), Ok(Free));
        assert_eq!(ec.status(A, pa), Ok(Unbound { remote: B }));
        assert_eq!(ec.send(A, pa), Err(Errno::EINVAL));
        // ... so B can bind again; then A closes its end.
        let pb = ec.bind_interdomain(B, A, pa).unwrap();
        ec.close(A, pa).unwrap();
        assert_eq!(ec.status(B, pb), Ok(Unbound { remote: A }));
        assert_eq!(ec.status(A, pa), Ok(Free));
        ec.close(B, pb).unwrap();
        assert_eq!((ec.ports_in_use(A), ec.ports_in_use(B)), (0, 0));
    }

    #[test]
    fn loopback_is_allowed() {
        let mut ec = chans(8);
        let p = ec.alloc_unbound(A, A).unwrap();
        let q = ec.bind_interdomain(A, A, p).unwrap();
        assert_ne!(p, q);
        assert_eq!(ec.send(A, p), Ok((A, q)));
        assert_eq!(ec.send(A, q), Ok((A, p)));
        ec.close(A, q).unwrap();
        assert_eq!(ec.status(A, p), Ok(Unbound { remote: A }));
        assert_eq!(ec.remove_domain(A), Vec::new());
    }

    #[test]
    fn binding_errors() {
        let mut ec = chans(8);
        let before = ec.clone();
        assert_eq!(ec.alloc_unbound(A, DomId(9)), Err(Errno::ESRCH));
        assert_eq!(ec.alloc_unbound(DomId(9), A), Err(Errno::ESRCH));
        assert_eq!(ec.bind_interdomain(A, DomId(9), 1), Err(Errno::ESRCH));
        assert_eq!(ec.bind_interdomain(DomId(9), A, 1), Err(Errno::ESRCH));
        // A Free remote port, port 0, out of range.
        for p in [0, 1, 7, 8, u32::MAX] {
            assert_eq!(ec.bind_interdomain(B, A, p), Err(Errno::EINVAL), "port {p}");
        }
        assert_eq!(ec, before);
        // Unbound for someone else, or already bound: EINVAL, and nothing changes.
        let pa = ec.alloc_unbound(A, C).unwrap();
        assert_eq!(ec.bind_interdomain(B, A, pa), Err(Errno::EINVAL));
        let pc = ec.bind_interdomain(C, A, pa).unwrap();
        assert_eq!(ec.bind_interdomain(C, A, pa), Err(Errno::EINVAL));
        assert_eq!(ec.bind_interdomain(B, C, pc), Err(Errno::EINVAL));
        // VIRQs: range, twice.
        let v = ec.bind_virq(A, 0, 1).unwrap();
        assert_eq!(ec.virq_port(A, 0), Some(v));
        assert_eq!(ec.bind_virq(A, 0, 1), Err(Errno::EEXIST));
        assert_eq!(ec.bind_virq(A, 1, 1), Err(Errno::EINVAL));
        assert_eq!(ec.bind_virq(B, 0, 1).map(|_| ()), Ok(())); // per domain
        assert_eq!(ec.bind_virq(DomId(9), 0, 1), Err(Errno::ESRCH));
        // PIRQs: twice anywhere.
        let p = ec.bind_pirq(B, 4).unwrap();
        assert_eq!(ec.pirq_port(4), Some((B, p)));
        assert_eq!(ec.bind_pirq(B, 4), Err(Errno::EEXIST));
        assert_eq!(ec.bind_pirq(C, 4), Err(Errno::EEXIST));
        assert_eq!(ec.bind_pirq(DomId(9), 5), Err(Errno::ESRCH));
        // Sending on VIRQ and PIRQ ports is refused too.
        assert_eq!(ec.send(A, v), Err(Errno::EINVAL));
        assert_eq!(ec.send(B, p), Err(Errno::EINVAL));
        // Closing unbinds them.
        ec.close(A, v).unwrap();
        ec.close(B, p).unwrap();
        assert_eq!((ec.virq_port(A, 0), ec.pirq_port(4)), (None, None));
        ec.bind_pirq(C, 4).unwrap();
    }

    #[test]
    fn send_errors() {
        let mut ec = chans(8);
        let pa = ec.alloc_unbound(A, B).unwrap();
        // Unbound.
        assert_eq!(ec.send(A, pa), Err(Errno::EINVAL));
        let pb = ec.bind_interdomain(B, A, pa).unwrap();
        // Another domain's port number: Free in C's table.
        assert_eq!(ec.status(C, pb), Ok(Free));
        assert_eq!(ec.send(C, pb), Err(Errno::EINVAL));
        // Out of range, port 0, unknown domain.
        for p in [0, 8, 9, u32::MAX] {
            assert_eq!(ec.send(A, p), Err(Errno::EINVAL));
            assert_eq!(ec.status(A, p), Err(Errno::EINVAL));
        }
        assert_eq!(ec.send(DomId(9), 1), Err(Errno::ESRCH));
        assert_eq!(ec.status(DomId(9), 1), Err(Errno::ESRCH));
    }

    #[test]
    fn close_errors() {
        let mut ec = chans(8);
        let before = ec.clone();
        for p in [0, 1, 7, 8, u32::MAX] {
            assert_eq!(ec.close(A, p), Err(Errno::EINVAL), "port {p}");
        }
        assert_eq!(ec.close(DomId(9), 1), Err(Errno::ESRCH));
        let p = ec.alloc_unbound(A, B).unwrap();
        ec.close(A, p).unwrap();
        assert_eq!(ec.close(A, p), Err(Errno::EINVAL)); // twice
        assert_eq!(ec, before);
    }

    #[test]
    fn running_out_of_ports() {
        let mut ec = chans(4); // ports 1, 2, 3
        let ports: Vec<Port> = (0..3).map(|_| ec.alloc_unbound(A, B).unwrap()).collect();
        assert_eq!(ports, vec![1, 2, 3]);
        let before = ec.clone();
        assert_eq!(ec.alloc_unbound(A, B), Err(Errno::ENOSPC));
        assert_eq!(ec.bind_virq(A, 0, 1), Err(Errno::ENOSPC));
        assert_eq!(ec.bind_pirq(A, 1), Err(Errno::ENOSPC));
        let pb = ec.alloc_unbound(B, A).unwrap();
        assert_eq!(ec.bind_interdomain(A, B, pb), Err(Errno::ENOSPC));
        assert_eq!(ec.status(B, pb), Ok(Unbound { remote: A })); // untouched
        ec.close(B, pb).unwrap();
        assert_eq!(ec, before);
        assert_eq!(ec.ports_in_use(A), 3);
        // The lowest freed port is reused.
        ec.close(A, 2).unwrap();
        assert_eq!(ec.alloc_unbound(A, C), Ok(2));
        // Tiny and oversized tables.
        ec.add_domain(DomId(4), 1).unwrap();
        assert_eq!(ec.alloc_unbound(DomId(4), A), Err(Errno::ENOSPC));
        assert_eq!(ec.add_domain(DomId(5), EVTCHN_PORTS as u32 + 1), Err(Errno::EINVAL));
        ec.add_domain(DomId(5), EVTCHN_PORTS as u32).unwrap();
        assert_eq!(ec.add_domain(A, 8), Err(Errno::EEXIST));
    }

    #[test]
    fn remove_domain_unbinds_its_peers() {
        let mut ec = chans(8);
        let pa = ec.alloc_unbound(A, B).unwrap();
        let pb = ec.bind_interdomain(B, A, pa).unwrap();
        let pc = ec.alloc_unbound(C, A).unwrap();
        let pa2 = ec.bind_interdomain(A, C, pc).unwrap();
        let waiting = ec.alloc_unbound(B, A).unwrap(); // for A, never bound
        let l = ec.alloc_unbound(A, A).unwrap();
        ec.bind_interdomain(A, A, l).unwrap();
        ec.bind_virq(A, 0, 1).unwrap();
        ec.bind_pirq(A, 9).unwrap();
        assert_eq!(ec.send(C, pc), Ok((A, pa2)));

        assert_eq!(ec.remove_domain(A), vec![(B, pb), (C, pc)]);
        assert_eq!(ec.status(B, pb), Ok(Unbound { remote: A }));
        assert_eq!(ec.status(C, pc), Ok(Unbound { remote: A }));
        assert_eq!(ec.status(B, waiting), Ok(Unbound { remote: A }));
        assert_eq!(ec.send(B, pb), Err(Errno::EINVAL));
        assert_eq!(ec.ports_in_use(A), 0);
        assert_eq!(ec.status(A, 1), Err(Errno::ESRCH));
        assert_eq!((ec.virq_port(A, 0), ec.pirq_port(9)), (None, None));
        assert_eq!(ec.remove_domain(A), Vec::new());
        // The PIRQ is free for others; A can come back.
        ec.bind_pirq(B, 9).unwrap();
        ec.add_domain(A, 8).unwrap();
        assert_eq!(ec.ports_in_use(A), 0);
    }

    #[test]
    fn two_level_pending() {
        let (mut pending, mut mask, mut sel, mut up) = ([0u64; WORDS], [0u64; WORDS], 0u64, 0u8);
        let u = mark_pending(&mut pending, &mask, &mut sel, &mut up, 70);
        assert_eq!(u, PendingUpdate { port_was_pending: false, masked: false, set_selector_bit: Some(1), raise_upcall: true });
        assert_eq!((pending[1], sel, up), (1 << 6, 1 << 1, 1));
        // Again: already pending, nothing more.
        let u = mark_pending(&mut pending, &mask, &mut sel, &mut up, 70);
        assert_eq!(u, PendingUpdate { port_was_pending: true, ..Default::default() });
        // Another port while the upcall is still pending: no new upcall.
        let u = mark_pending(&mut pending, &mask, &mut sel, &mut up, 4095);
        assert_eq!(u, PendingUpdate { set_selector_bit: Some(63), ..Default::default() });
        assert_eq!(sel, 1 << 1 | 1 << 63);
        // The guest handles everything: clears upcall, selector, pending.
        (up, sel, pending) = (0, 0, [0; WORDS]);
        // A masked port: pending only.
        mask[0] = 1 << 5;
        let u = mark_pending(&mut pending, &mask, &mut sel, &mut up, 5);
        assert_eq!(u, PendingUpdate { masked: true, ..Default::default() });
        assert_eq!((pending[0], sel, up), (1 << 5, 0, 0));
        // Unmasking delivers it.
        assert!(unmask(&pending, &mut mask, &mut sel, &mut up, 5));
        assert_eq!((mask[0], sel, up), (0, 1, 1));
        // Unmasking again, or a port that is not pending, raises nothing.
        assert!(!unmask(&pending, &mut mask, &mut sel, &mut up, 5));
        assert!(!unmask(&pending, &mut mask, &mut sel, &mut up, 6));
        // Out of the bitmaps: nothing at all.
        let snapshot = (pending, mask, sel, up);
        assert_eq!(mark_pending(&mut pending, &mask, &mut sel, &mut up, 4096), PendingUpdate::default());
        assert!(!unmask(&pending, &mut mask, &mut sel, &mut up, u32::MAX));
        assert_eq!((pending, mask, sel, up), snapshot);
    }

    #[derive(Debug, Clone)]
    enum Op {
        AllocUnbound { d: u16, remote: u16 },
        BindInterdomain { d: u16, remote: u16, port: Port },
        BindVirq { d: u16, virq: u32 },
        BindPirq { d: u16, pirq: u32 },
        Close { d: u16, port: Port },
        Send { d: u16, port: Port },
        Remove { d: u16 },
        Add { d: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let d = || 1..=4u16;
        let p = || 0..=6u32;
        prop_oneof![
            4 => (d(), d()).prop_map(|(d, remote)| Op::AllocUnbound { d, remote }),
            5 => (d(), d(), p()).prop_map(|(d, remote, port)| Op::BindInterdomain { d, remote, port }),
            1 => (d(), 0..3u32).prop_map(|(d, virq)| Op::BindVirq { d, virq }),
            1 => (d(), 0..3u32).prop_map(|(d, pirq)| Op::BindPirq { d, pirq }),
            3 => (d(), p()).prop_map(|(d, port)| Op::Close { d, port }),
            2 => (d(), p()).prop_map(|(d, port)| Op::Send { d, port }),
            1 => d().prop_map(|d| Op::Remove { d }),
            1 => d().prop_map(|d| Op::Add { d }),
        ]
    }

    /// Symmetric interdomain bindings, consistent counts and indexes.
    fn check_invariants(ec: &EventChannels) -> Result<(), TestCaseError> {
        for (&d, dp) in &ec.doms {
            prop_assert_eq!(dp.ports.first(), Some(&Free));
            prop_assert!(dp.ports.len() as u32 <= dp.max_ports.max(1));
            let used = dp.ports.iter().filter(|s| **s != Free).count() as u32;
            prop_assert_eq!(dp.in_use, used);
            for port in 1..dp.max_ports {
                match ec.status(d, port).unwrap() {
                    Interdomain { remote, remote_port } => {
                        prop_assert_eq!(ec.status(remote, remote_port), Ok(Interdomain { remote: d, remote_port: port }));
                        prop_assert_eq!(ec.send(d, port), Ok((remote, remote_port)));
                    }
                    Virq(v) => prop_assert_eq!(ec.virq_port(d, v), Some(port)),
                    Pirq(p) => prop_assert_eq!(ec.pirq_port(p), Some((d, port))),
                    Free | Unbound { .. } => prop_assert_eq!(ec.send(d, port), Err(Errno::EINVAL)),
                }
            }
            for (&v, &port) in &dp.virqs {
                prop_assert_eq!(ec.status(d, port), Ok(Virq(v)));
            }
        }
        for (&p, &(d, port)) in &ec.pirqs {
            prop_assert_eq!(ec.status(d, port), Ok(Pirq(p)));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the sequence: (a,p)->(b,q) implies (b,q)->(a,p), the
        /// counts and indexes match the ports, and refused calls change nothing.
        #[test]
        fn bindings_stay_symmetric(ops in prop::collection::vec(op(), 1..100)) {
            let mut ec = EventChannels::new();
            for d in 1..=3 {
                ec.add_domain(DomId(d), 6).unwrap();
            }
            for op in ops {
                let before = ec.clone();
                let r = match op {
                    Op::AllocUnbound { d, remote } => ec.alloc_unbound(DomId(d), DomId(remote)).map(|_| ()),
                    Op::BindInterdomain { d, remote, port } => ec.bind_interdomain(DomId(d), DomId(remote), port).map(|_| ()),
                    Op::BindVirq { d, virq } => ec.bind_virq(DomId(d), virq, 2).map(|_| ()),
                    Op::BindPirq { d, pirq } => ec.bind_pirq(DomId(d), pirq).map(|_| ()),
                    Op::Close { d, port } => ec.close(DomId(d), port),
                    Op::Send { d, port } => ec.send(DomId(d), port).map(|_| ()),
                    Op::Remove { d } => {
                        for (peer, port) in ec.remove_domain(DomId(d)) {
                            prop_assert_eq!(ec.status(peer, port), Ok(Unbound { remote: DomId(d) }));
                        }
                        Ok(())
                    }
                    Op::Add { d } => ec.add_domain(DomId(d), 6),
                };
                if r.is_err() {
                    prop_assert_eq!(&ec, &before);
                }
                check_invariants(&ec)?;
            }
        }
    }
}
