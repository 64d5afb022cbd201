//! Hypercall dispatch: decode with the shared-abi table, apply its access
//! rules, run the handler. Every guest pointer goes through the frame
//! table's translate-and-copy helpers; bad arguments return a negative
//! errno, never a panic.

use crate::domain::{self, EndReason, Hv};
use crate::mm::{self, Identity};
use crate::{cpu, time};
use alloc::vec;
use microhv_core::sched::VcpuId;
use shared_abi::hypercall::*;
use shared_abi::types::{GuestVa, Mfn};
use shared_abi::{Errno, HYPERVISOR_VA_START};

/// What the dispatcher must do after a handler.
pub(crate) enum Outcome {
    /// Return the value (or error) in RAX and continue the guest.
    Ret(Result<u64, Errno>),
    /// The handler set the registers itself (iret).
    Resumed,
    /// Give up the CPU (yield, block, shutdown).
    Reschedule(Result<u64, Errno>),
}

/// The `EvtchnStatus` record of `port` of domain `id` (PV and HVM callers
/// copy it out their own way).
pub(crate) fn evtchn_status_record(hv: &Hv, id: shared_abi::DomId, port: u64) -> Result<[u8; 16], Errno> {
    use microhv_core::evtchn::ChannelState::*;
    let port = u32::try_from(port).map_err(|_| Errno::EINVAL)?;
    let (state, dom, detail) = match hv.evtchn.status(id, port)? {
        Free => (EVTCHN_STATE_FREE, 0, 0),
        Unbound { remote } => (EVTCHN_STATE_UNBOUND, remote.0, 0),
        Interdomain { remote, remote_port } => (EVTCHN_STATE_INTERDOMAIN, remote.0, remote_port),
        Virq(v) => (EVTCHN_STATE_VIRQ, 0, v),
        Pirq(p) => (EVTCHN_STATE_PIRQ, 0, p),
    };
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&state.to_le_bytes());
    b[4..6].copy_from_slice(&dom.to_le_bytes());
    b[8..12].copy_from_slice(&detail.to_le_bytes());
    Ok(b)
}

/// Handles the hypercall in the current vCPU's saved registers. Returns true
/// when the scheduler must pick again.
pub fn handle(hv: &mut Hv, cur: usize) -> bool {
    let r = &hv.domains[cur].vcpu.regs;
    let (nr, args) = (r.rax, [r.rdi, r.rsi, r.rdx, r.r10, r.r8]);
    let privileged = hv.domains[cur].privileged;
    let out = match check_access(nr, GuestKind::Pv, privileged) {
        Err(e) => Outcome::Ret(Err(e)),
        Ok(_) => match Call::decode(nr, args) {
            Err(e) => Outcome::Ret(Err(e)),
            Ok(call) => dispatch(hv, cur, call),
        },
    };
    if let Outcome::Ret(Err(e)) | Outcome::Reschedule(Err(e)) = out {
        log::debug!("{}: hypercall {} ({}) -> {e:?}", hv.domains[cur].name, nr, describe(nr).map_or("?", |d| d.name));
    }
    let regs = &mut hv.domains[cur].vcpu.regs;
    match out {
        Outcome::Ret(v) => {
            regs.rax = Errno::encode(v) as u64;
            false
        }
        Outcome::Resumed => false,
        Outcome::Reschedule(v) => {
            regs.rax = Errno::encode(v) as u64;
            true
        }
    }
}

fn guest_va(va: GuestVa, len: u64) -> Result<u64, Errno> {
    let end = va.0.checked_add(len).ok_or(Errno::EFAULT)?;
    if end > HYPERVISOR_VA_START || va.0 >= HYPERVISOR_VA_START {
        return Err(Errno::EFAULT);
    }
    Ok(va.0)
}

pub(crate) fn read_guest(hv: &Hv, cur: usize, va: GuestVa, buf: &mut [u8]) -> Result<(), Errno> {
    let d = &hv.domains[cur];
    let at = guest_va(va, buf.len() as u64)?;
    hv.frames.copy_from_guest(&Identity, d.id, d.vcpu.cr3, at, buf)
}

fn write_guest(hv: &mut Hv, cur: usize, va: GuestVa, data: &[u8]) -> Result<(), Errno> {
    let (id, cr3) = (hv.domains[cur].id, hv.domains[cur].vcpu.cr3);
    let at = guest_va(va, data.len() as u64)?;
    hv.frames.copy_to_guest(&mut Identity, id, cr3, at, data)
}

fn read_u64s(hv: &Hv, cur: usize, va: GuestVa, count: u64) -> Result<alloc::vec::Vec<u64>, Errno> {
    let mut bytes = vec![0u8; count as usize * 8];
    read_guest(hv, cur, va, &mut bytes)?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

pub(crate) fn dispatch(hv: &mut Hv, cur: usize, call: Call) -> Outcome {
    use Outcome::*;
    match call {
        Call::Version { cmd } => Ret(match cmd {
            VERSION_ABI => Ok(shared_abi::abi_version_packed()),
            VERSION_FEATURES => Ok(FEATURE_PV_MMU | FEATURE_ONESHOT_TIMER | FEATURE_BALLOON | FEATURE_TRAP_BOUNCE),
            _ => Err(Errno::EINVAL),
        }),
        Call::ConsoleWrite { buf, len } => {
            if len > CONSOLE_WRITE_MAX {
                return Ret(Err(Errno::EINVAL));
            }
            let mut bytes = vec![0u8; len as usize];
            if let Err(e) = read_guest(hv, cur, buf, &mut bytes) {
                return Ret(Err(e));
            }
            domain::console_write(&mut hv.domains[cur], &bytes);
            if !hv.domains[cur].privileged {
                if let Some(d0) = domain::index_of(hv, shared_abi::DomId::DOM0) {
                    domain::send_virq(hv, d0, VIRQ_CONSOLE);
                }
            }
            Ret(Ok(len))
        }
        Call::SchedYield {} => Reschedule(Ok(0)),
        Call::SchedBlock {} => {
            let d = &mut hv.domains[cur];
            // Like Xen's SCHEDOP_block: blocking enables event delivery, so a
            // pending event is never slept through.
            d.set_upcall_mask(false);
            if d.events_need_delivery() {
                return Ret(Ok(0));
            }
            d.vcpu.polling = false;
            let wake = d.vcpu.timer_deadline;
            hv.sched.block(VcpuId(cur), wake);
            Reschedule(Ok(0))
        }
        Call::SchedPoll { deadline_ns } => {
            let now = time::nanos_since_boot();
            let d = &mut hv.domains[cur];
            if deadline_ns <= now {
                return Ret(Ok(0));
            }
            if d.events_need_delivery() {
                return Ret(Ok(1));
            }
            d.vcpu.polling = true;
            let wake = d.vcpu.timer_deadline.map_or(deadline_ns, |t| t.min(deadline_ns));
            hv.sched.block(VcpuId(cur), Some(wake));
            Reschedule(Ok(0))
        }
        Call::SchedShutdown { reason } => {
            let r = if reason == SHUTDOWN_POWEROFF { EndReason::Poweroff } else { EndReason::CrashRequested(reason) };
            domain::end(hv, cur, r);
            Reschedule(Ok(0))
        }
        Call::SetTimer { deadline_ns } => {
            crate::domain::set_timer(hv, cur, (deadline_ns != 0).then_some(deadline_ns));
            Ret(Ok(0))
        }
        Call::MemoryPopulate { frames, count } => Ret(populate(hv, cur, frames, count)),
        Call::MemoryRelease { frames, count } => Ret(release(hv, cur, frames, count)),
        Call::MemoryQuery { info } => {
            let d = &hv.domains[cur];
            let m = MemoryInfo { nr_pages: d.nr_pages, max_pages: d.max_pages };
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&m.nr_pages.to_le_bytes());
            b[8..].copy_from_slice(&m.max_pages.to_le_bytes());
            Ret(write_guest(hv, cur, info, &b).map(|_| 0))
        }
        Call::MmuUpdate { reqs, count, done } => Ret(mmu_update(hv, cur, reqs, count, done)),
        Call::PinTable { mfn, level } => {
            if !(1..=4).contains(&level) {
                return Ret(Err(Errno::EINVAL));
            }
            let id = hv.domains[cur].id;
            Ret(hv.frames.pin(&mut Identity, id, mfn, level as u8).map(|_| 0))
        }
        Call::UnpinTable { mfn } => {
            let id = hv.domains[cur].id;
            let r = hv.frames.unpin(&mut Identity, id, mfn).map(|_| 0);
            domain::settle_grants(hv);
            Ret(r)
        }
        Call::SetPtBase { mfn } => {
            // Hold a reference on the new base so that unpinning it while
            // loaded cannot turn it back into writable data.
            let (id, old) = (hv.domains[cur].id, hv.domains[cur].vcpu.cr3);
            if old == mfn {
                return Ret(Ok(0));
            }
            match hv.frames.get_base(id, mfn) {
                Ok(()) => {
                    hv.domains[cur].vcpu.cr3 = mfn;
                    let _ = hv.frames.put_base(&mut Identity, id, old);
                    domain::settle_grants(hv);
                    Ret(Ok(0))
                }
                Err(e) => Ret(Err(e)),
            }
        }
        // Every exit to a guest reloads CR3, which flushes its (non-global)
        // TLB entries, so there is nothing left to flush here.
        Call::Invlpg { va } => Ret(if va.0 == u64::MAX || va.0 < HYPERVISOR_VA_START { Ok(0) } else { Err(Errno::EINVAL) }),
        Call::SetTrapTable { table, count } => Ret(set_trap_table(hv, cur, table, count)),
        Call::SetCallback { handler } => {
            if handler.0 >= HYPERVISOR_VA_START || !microhv_core::paging::is_canonical(handler.0) {
                return Ret(Err(Errno::EINVAL));
            }
            hv.domains[cur].vcpu.callback = handler.0;
            Ret(Ok(0))
        }
        Call::Iret {} => match iret(hv, cur) {
            Ok(()) => Resumed,
            Err(e) => Ret(Err(e)),
        },
        Call::StackSwitch { rsp } => {
            if rsp.0 >= HYPERVISOR_VA_START {
                return Ret(Err(Errno::EINVAL));
            }
            hv.domains[cur].vcpu.kernel_sp = rsp.0;
            Ret(Ok(0))
        }
        Call::EvtchnBindVirq { virq } => {
            if virq >= VIRQ_COUNT {
                return Ret(Err(Errno::EINVAL));
            }
            if virq == VIRQ_CONSOLE && !hv.domains[cur].privileged {
                return Ret(Err(Errno::EPERM));
            }
            let id = hv.domains[cur].id;
            Ret(hv.evtchn.bind_virq(id, virq as u32, VIRQ_COUNT as u32).map(u64::from))
        }
        Call::EvtchnAllocUnbound { remote } => {
            let id = hv.domains[cur].id;
            if domain::index_of(hv, remote).is_none() {
                return Ret(Err(Errno::ESRCH));
            }
            Ret(hv.evtchn.alloc_unbound(id, remote).map(u64::from))
        }
        Call::EvtchnBindInterdomain { remote, remote_port } => {
            let id = hv.domains[cur].id;
            if domain::index_of(hv, remote).is_none() {
                return Ret(Err(Errno::ESRCH));
            }
            let rp = u32::try_from(remote_port).map_err(|_| Errno::EINVAL);
            Ret(rp.and_then(|rp| hv.evtchn.bind_interdomain(id, remote, rp)).map(u64::from))
        }
        Call::EvtchnSend { port } => {
            let id = hv.domains[cur].id;
            let Ok(port) = u32::try_from(port) else { return Ret(Err(Errno::EINVAL)) };
            match hv.evtchn.send(id, port) {
                Ok((rd, rp)) => {
                    if let Some(r) = domain::index_of(hv, rd) {
                        domain::raise(hv, r, rp);
                    }
                    Ret(Ok(0))
                }
                Err(e) => Ret(Err(e)),
            }
        }
        Call::EvtchnClose { port } => {
            let id = hv.domains[cur].id;
            let Ok(port) = u32::try_from(port) else { return Ret(Err(Errno::EINVAL)) };
            let peer = match hv.evtchn.status(id, port) {
                Ok(microhv_core::evtchn::ChannelState::Interdomain { remote, remote_port }) => Some((remote, remote_port)),
                _ => None,
            };
            let r = hv.evtchn.close(id, port);
            if let (Ok(()), Some((rd, rp))) = (r, peer) {
                if let Some(i) = domain::index_of(hv, rd) {
                    domain::raise(hv, i, rp);
                }
            }
            Ret(r.map(|_| 0))
        }
        Call::EvtchnStatus { port, out } => {
            let id = hv.domains[cur].id;
            Ret(evtchn_status_record(hv, id, port).and_then(|b| write_guest(hv, cur, out, &b)).map(|_| 0))
        }
        Call::EvtchnUnmask { port } => {
            let Ok(port) = u32::try_from(port) else { return Ret(Err(Errno::EINVAL)) };
            if port as usize >= shared_abi::shared_info::EVTCHN_PORTS {
                return Ret(Err(Errno::EINVAL));
            }
            domain::unmask(hv, cur, port);
            Ret(Ok(0))
        }
        Call::GrantAccess { grantee, frame, readonly } => {
            let id = hv.domains[cur].id;
            if readonly > 1 {
                return Ret(Err(Errno::EINVAL));
            }
            if domain::index_of(hv, grantee).is_none() {
                return Ret(Err(Errno::ESRCH));
            }
            if hv.frames.owner(frame) != microhv_core::pvmm::Owner::Domain(id) {
                return Ret(Err(Errno::EPERM));
            }
            // Only ordinary data frames: never page tables or shared_info.
            let plain = hv.frames.info(frame).is_some_and(|i| i.ty == microhv_core::pvmm::FrameType::Writable && !i.special);
            if !plain {
                return Ret(Err(Errno::EACCES));
            }
            Ret(hv.grants.grant(id, grantee, frame, readonly == 1).map(u64::from))
        }
        Call::GrantEnd { gref } => {
            let id = hv.domains[cur].id;
            let Ok(gref) = u32::try_from(gref) else { return Ret(Err(Errno::EINVAL)) };
            Ret(hv.grants.end(id, gref).map(|_| 0))
        }
        Call::GrantMap { granter, gref, va, writable } => Ret(grant_map(hv, cur, granter, gref, va, writable)),
        Call::GrantUnmap { granter, gref, va } => Ret(grant_unmap(hv, cur, granter, gref, va)),
        Call::GrantCopy { op } => Ret(grant_copy(hv, cur, op)),
        Call::DomctlChannels { domid, out } => {
            let Some(i) = domain::index_of(hv, domid) else { return Ret(Err(Errno::ESRCH)) };
            let Some(c) = hv.domains[i].channels else { return Ret(Err(Errno::ENOENT)) };
            let mut b = [0u8; 16];
            for (k, v) in [c.console_gref, c.console_port, c.store_gref, c.store_port].iter().enumerate() {
                b[k * 4..k * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            Ret(write_guest(hv, cur, out, &b).map(|_| 0))
        }
        Call::DomctlPause { domid } => Ret(domctl_target(hv, domid).and_then(|i| if hv.domains[i].building { Err(Errno::EINVAL) } else { Ok(i) }).map(|i| {
            let d = &mut hv.domains[i];
            if !d.paused {
                d.paused = true;
                hv.sched.remove(VcpuId(i));
                log::info!("domain {} '{}' paused by dom0", d.id.0, d.name);
            }
            0
        })),
        Call::DomctlUnpause { domid } => Ret(domctl_target(hv, domid).and_then(|i| if hv.domains[i].building { Err(Errno::EINVAL) } else { Ok(i) }).map(|i| {
            let d = &mut hv.domains[i];
            if d.paused {
                d.paused = false;
                // Back on the scheduler as runnable: a vCPU that was blocked
                // sees its block/poll return early, which the ABI allows.
                let w = d.weight;
                hv.sched.add(VcpuId(i), w);
                log::info!("domain {} '{}' unpaused by dom0", d.id.0, d.name);
            }
            0
        })),
        Call::DomctlDestroy { domid } => match domctl_target(hv, domid) {
            Ok(i) => {
                domain::end(hv, i, EndReason::Destroyed);
                Ret(Ok(0))
            }
            Err(e) => Ret(Err(e)),
        },
        Call::DomctlModules { out, max } => {
            let n = hv.dom0_modules.len();
            let k = (max as usize).min(n);
            let mut bytes = vec![0u8; k * 64];
            for (i, m) in hv.dom0_modules.iter().take(k).enumerate() {
                bytes[i * 64..i * 64 + 8].copy_from_slice(&m.start_mfn.to_le_bytes());
                bytes[i * 64 + 8..i * 64 + 16].copy_from_slice(&m.size.to_le_bytes());
                bytes[i * 64 + 16..i * 64 + 64].copy_from_slice(&m.name);
            }
            Ret(write_guest(hv, cur, out, &bytes).map(|_| n as u64))
        }
        Call::DomctlCreateHvm { spec, module, cmdline, cmdline_len } => {
            Ret(crate::hvm::domctl_create_hvm(hv, cur, spec, module, cmdline, cmdline_len))
        }
        Call::DomctlCreate { spec } => {
            let mut b = [0u8; 56];
            if let Err(e) = read_guest(hv, cur, spec, &mut b) {
                return Ret(Err(e));
            }
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
            let (nr, max) = (u64_at(0), u64_at(8));
            let weight = u16::from_le_bytes([b[16], b[17]]);
            let end = b[24..56].iter().position(|&c| c == 0).unwrap_or(32);
            let Ok(name) = core::str::from_utf8(&b[24..24 + end]) else { return Ret(Err(Errno::EINVAL)) };
            // Sizes a toolstack may ask for: 16 pages to 1 GiB; a name.
            if !(16..=(1 << 18)).contains(&nr) || max > (1 << 18) || name.is_empty() || weight == 0 {
                return Ret(Err(Errno::EINVAL));
            }
            if nr > mm::free_frames() {
                return Ret(Err(Errno::ENOMEM));
            }
            let id = shared_abi::DomId(hv.next_domid);
            if hv.next_domid >= shared_abi::DomId::INVALID.0 {
                return Ret(Err(Errno::ENOSPC));
            }
            match domain::alloc_domain(hv, id, name, nr, max.max(nr), weight, false) {
                Ok(_) => {
                    hv.next_domid += 1;
                    log::info!("domain {} '{}' created by dom0 ({} pages), building", id.0, name, nr);
                    Ret(Ok(id.0 as u64))
                }
                Err(e) => {
                    log::warn!("domctl_create: {e}");
                    Ret(Err(Errno::ENOMEM))
                }
            }
        }
        Call::DomctlGetFrames { domid, out, max } => {
            let Some(i) = domain::index_of(hv, domid) else { return Ret(Err(Errno::ESRCH)) };
            let p2m: alloc::vec::Vec<u8> = hv.domains[i].p2m.iter().take(max as usize).flat_map(|m| m.0.to_le_bytes()).collect();
            let n = hv.domains[i].p2m.len() as u64;
            Ret(write_guest(hv, cur, out, &p2m).map(|_| n))
        }
        Call::DomctlMap { domid, mfn, va } => {
            let Ok(t) = domctl_target(hv, domid) else { return Ret(Err(Errno::ESRCH)) };
            if !hv.domains[t].building {
                return Ret(Err(Errno::EPERM));
            }
            let me = hv.domains[cur].id;
            let ptr = match l1_entry(hv, cur, va) {
                Ok(p) => p,
                Err(e) => return Ret(Err(e)),
            };
            Ret(hv.frames.map_foreign(&mut Identity, me, ptr, domid, mfn, true).map(|_| 0))
        }
        Call::DomctlUnmap { domid, mfn, va } => {
            // Only toolstack mappings: frames of a domain still being built
            // (which never ran, so it cannot have granted them).
            let Ok(t) = domctl_target(hv, domid) else { return Ret(Err(Errno::ESRCH)) };
            if !hv.domains[t].building || hv.frames.owner(mfn) != microhv_core::pvmm::Owner::Domain(domid) {
                return Ret(Err(Errno::EINVAL));
            }
            let me = hv.domains[cur].id;
            let ptr = match l1_entry(hv, cur, va) {
                Ok(p) => p,
                Err(e) => return Ret(Err(e)),
            };
            let r = hv.frames.unmap_foreign(&mut Identity, me, ptr, mfn).map(|_| 0);
            domain::settle_grants(hv);
            Ret(r)
        }
        Call::DomctlStart { domid, ctx } => {
            let Ok(t) = domctl_target(hv, domid) else { return Ret(Err(Errno::ESRCH)) };
            let mut b = [0u8; 64];
            if let Err(e) = read_guest(hv, cur, ctx, &mut b) {
                return Ret(Err(e));
            }
            let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
            let l = domain::StartLayout {
                entry: w(0),
                stack_top: w(1),
                start_info_va: w(2),
                l4: Mfn(w(3)),
                shared_info_pfn: w(4),
                start_info_pfn: w(5),
                first_free_pfn: w(6),
                virt_base: w(7),
            };
            let canonical_low = |v: u64| v < HYPERVISOR_VA_START && microhv_core::paging::is_canonical(v);
            if !canonical_low(l.entry) || !canonical_low(l.stack_top) || !canonical_low(l.start_info_va) {
                return Ret(Err(Errno::EINVAL));
            }
            Ret(domain::start_domain(hv, t, &l).map(|_| 0))
        }
        Call::DomctlStats { out } => {
            let live: alloc::vec::Vec<shared_abi::DomId> = hv.domains.iter().filter(|d| d.ended.is_none()).map(|d| d.id).collect();
            let ports: u32 = live.iter().map(|&d| hv.evtchn.ports_in_use(d)).sum();
            let grants: u32 = hv.domains.iter().map(|d| hv.grants.grants_in_use(d.id)).sum();
            let mut b = [0u8; 32];
            b[0..8].copy_from_slice(&mm::free_frames().to_le_bytes());
            let heap_kib = (mm::heap_used() / 1024) as u32;
            for (i, v) in [live.len() as u32, ports, grants, hv.frames.foreign_count() as u32, hv.frames.orphan_count() as u32, heap_kib]
                .iter()
                .enumerate()
            {
                b[8 + i * 4..12 + i * 4].copy_from_slice(&v.to_le_bytes());
            }
            Ret(write_guest(hv, cur, out, &b).map(|_| 0))
        }
        Call::DmaPopulate { count } => Ret(dma_populate(hv, cur, count)),
        Call::DomainCountersGet { domid, out } => {
            let me = &hv.domains[cur];
            if domid != me.id && !me.privileged {
                return Ret(Err(Errno::EPERM));
            }
            // The newest domain with that id (ended ones keep their counts).
            let Some(t) = hv.domains.iter().rposition(|d| d.id == domid) else {
                return Ret(Err(Errno::ESRCH));
            };
            let b = counters_bytes(&hv.domains[t].counters);
            Ret(write_guest(hv, cur, out, &b).map(|_| 0))
        }
        Call::IrqBind { irq } => {
            if !crate::irq::bindable(irq) {
                return Ret(Err(Errno::EINVAL));
            }
            let id = hv.domains[cur].id;
            let r = hv.evtchn.bind_pirq(id, irq as u32).map(u64::from);
            if r.is_ok() {
                crate::irq::unmask(irq as u32);
                log::info!("{}: device interrupt line {irq} bound to event channel {}", hv.domains[cur].name, r.unwrap_or(0));
            }
            Ret(r)
        }
        Call::IrqEoi { irq } => {
            let id = hv.domains[cur].id;
            match hv.evtchn.pirq_port(irq.min(u64::from(u32::MAX)) as u32) {
                Some((d, _)) if d == id => {
                    crate::irq::unmask(irq as u32);
                    Ret(Ok(0))
                }
                _ => Ret(Err(Errno::EINVAL)),
            }
        }
        Call::DomctlList { out, max } => {
            let n = hv.domains.len();
            let k = (max as usize).min(n);
            let mut bytes = vec![0u8; k * 64];
            for i in 0..k {
                let info = hv.domains[i].info(&hv.sched, i);
                bytes[i * 64..i * 64 + 64].copy_from_slice(&domain_info_bytes(&info));
            }
            Ret(write_guest(hv, cur, out, &bytes).map(|_| n as u64))
        }
    }
}

fn domain_info_bytes(d: &DomainInfo) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..2].copy_from_slice(&d.domid.to_le_bytes());
    b[2] = d.state;
    b[3] = d.flags;
    b[8..16].copy_from_slice(&d.nr_pages.to_le_bytes());
    b[16..24].copy_from_slice(&d.max_pages.to_le_bytes());
    b[24..32].copy_from_slice(&d.cpu_time_ns.to_le_bytes());
    b[32..64].copy_from_slice(&d.name);
    b
}

fn populate(hv: &mut Hv, cur: usize, frames: GuestVa, count: u64) -> Result<u64, Errno> {
    if count > BATCH_MAX {
        return Err(Errno::E2BIG);
    }
    let d = &hv.domains[cur];
    if d.nr_pages + count > d.max_pages {
        return Err(Errno::ENOMEM);
    }
    // Check the output array before taking any memory.
    let mut probe = vec![0u8; count as usize * 8];
    read_guest(hv, cur, frames, &mut probe)?;
    let id = d.id;
    let mut got = alloc::vec::Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Some(f) = mm::alloc_frame() else { break };
        let mfn = Mfn(f.0);
        // Never hand a guest another domain's old data.
        microhv_core::machine::MachineMemory::zero(&mut Identity, mfn);
        if hv.frames.assign(mfn, id).is_err() {
            let _ = mm::free_frame(f);
            break;
        }
        got.push(mfn);
    }
    let undo = |hv: &mut Hv, got: &[Mfn]| {
        for &m in got {
            let _ = hv.frames.release(m, id);
            let _ = mm::free_frame(microhv_core::frame::Mfn(m.0));
        }
    };
    if got.len() as u64 != count {
        undo(hv, &got);
        return Err(Errno::ENOMEM);
    }
    let bytes: alloc::vec::Vec<u8> = got.iter().flat_map(|m| m.0.to_le_bytes()).collect();
    if let Err(e) = write_guest(hv, cur, frames, &bytes) {
        undo(hv, &got);
        return Err(e);
    }
    hv.domains[cur].nr_pages += count;
    Ok(count)
}

/// The wire form of `DomainCounters` (PV and HVM callers).
pub(crate) fn counters_bytes(c: &shared_abi::hypercall::DomainCounters) -> [u8; 128] {
    let mut b = [0u8; 128];
    let words = [
        c.hypercalls, c.entries, c.exceptions_bounced, c.upcalls, c.interrupts, c.cr3_loads, c.switches_in, c.hv_ns, c.vm_exits, c.pt_updates,
        c.exits_io, c.exits_msr, c.exits_cpuid, c.exits_hlt, c.exits_apic, c.exits_other,
    ];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// `dma_populate`: contiguous frames below 4 GiB for Dom0's device DMA.
fn dma_populate(hv: &mut Hv, cur: usize, count: u64) -> Result<u64, Errno> {
    if count == 0 || count > DMA_POPULATE_MAX {
        return Err(Errno::EINVAL);
    }
    let d = &hv.domains[cur];
    if d.nr_pages + count > d.max_pages {
        return Err(Errno::ENOMEM);
    }
    let id = d.id;
    let first = mm::alloc_contiguous_low(count).ok_or(Errno::ENOMEM)?;
    for f in first.0..first.0 + count {
        let mfn = Mfn(f);
        microhv_core::machine::MachineMemory::zero(&mut Identity, mfn);
        if hv.frames.assign(mfn, id).is_err() {
            for g in first.0..f {
                let _ = hv.frames.release(Mfn(g), id);
            }
            for g in first.0..first.0 + count {
                let _ = mm::free_frame(microhv_core::frame::Mfn(g));
            }
            return Err(Errno::ENOMEM);
        }
    }
    hv.domains[cur].nr_pages += count;
    Ok(first.0)
}

fn release(hv: &mut Hv, cur: usize, frames: GuestVa, count: u64) -> Result<u64, Errno> {
    if count > BATCH_MAX {
        return Err(Errno::E2BIG);
    }
    let mfns = read_u64s(hv, cur, frames, count)?;
    let id = hv.domains[cur].id;
    for (i, &m) in mfns.iter().enumerate() {
        // Boot-module frames handed to Dom0 are not ballooned.
        let r = if mm::is_managed(Mfn(m)) { hv.frames.release(Mfn(m), id) } else { Err(Errno::EPERM) };
        if let Err(e) = r {
            return if i == 0 { Err(e) } else { Ok(i as u64) };
        }
        if let Err(e) = mm::free_frame(microhv_core::frame::Mfn(m)) {
            log::error!("released frame {m:#x} could not be freed: {e:?}");
        }
        hv.domains[cur].nr_pages -= 1;
    }
    Ok(count)
}

fn mmu_update(hv: &mut Hv, cur: usize, reqs: GuestVa, count: u64, done: GuestVa) -> Result<u64, Errno> {
    if count > BATCH_MAX {
        return Err(Errno::E2BIG);
    }
    let words = read_u64s(hv, cur, reqs, count * 2)?;
    let id = hv.domains[cur].id;
    let mut applied = 0u64;
    let mut result = Ok(0);
    for pair in words.chunks_exact(2) {
        if let Err(e) = hv.frames.mmu_update(&mut Identity, id, pair[0], pair[1]) {
            result = Err(e);
            break;
        }
        applied += 1;
    }
    hv.domains[cur].counters.pt_updates += applied;
    // Unhooking a table may have dropped grant mappings.
    domain::settle_grants(hv);
    if done.0 != 0 {
        write_guest(hv, cur, done, &applied.to_le_bytes())?;
    }
    result
}

fn set_trap_table(hv: &mut Hv, cur: usize, table: GuestVa, count: u64) -> Result<u64, Errno> {
    if count > 256 {
        return Err(Errno::E2BIG);
    }
    let words = read_u64s(hv, cur, table, count * 2)?;
    let mut traps = hv.domains[cur].vcpu.traps;
    for e in words.chunks_exact(2) {
        let vector = (e[0] & 0xff) as usize;
        let handler = e[1];
        if vector >= 32 || handler >= HYPERVISOR_VA_START || !microhv_core::paging::is_canonical(handler) {
            return Err(Errno::EINVAL);
        }
        traps[vector] = handler;
    }
    hv.domains[cur].vcpu.traps = traps;
    Ok(0)
}

/// RFLAGS bits a guest may set through `iret`: arithmetic flags, TF, DF, AC,
/// ID. Never IOPL, NT, VM or the real IF (which stays on).
const GUEST_RFLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x4_0000 | 0x20_0000;

fn iret(hv: &mut Hv, cur: usize) -> Result<(), Errno> {
    let sp = hv.domains[cur].vcpu.regs.rsp;
    let mut b = [0u8; 48];
    read_guest(hv, cur, GuestVa(sp), &mut b)?;
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let (rax, rip, cs, rflags, rsp) = (w(0), w(1), w(2), w(3), w(4));
    if rip >= HYPERVISOR_VA_START || !microhv_core::paging::is_canonical(rip) {
        return Err(Errno::EINVAL);
    }
    let to_user = cs & 3 == 3;
    let d = &mut hv.domains[cur];
    d.set_upcall_mask(rflags & 0x200 == 0);
    let regs = &mut d.vcpu.regs;
    regs.rax = rax;
    regs.rip = rip;
    regs.rsp = rsp;
    regs.rflags = (rflags & GUEST_RFLAGS) | 0x202;
    // The guest picks the ring (1 or 3), never the selector.
    if to_user {
        regs.cs = cpu::GUEST_USER_CS as u64;
        regs.ss = cpu::GUEST_USER_DS as u64;
    } else {
        regs.cs = cpu::GUEST_KERNEL_CS as u64;
        regs.ss = cpu::GUEST_KERNEL_DS as u64;
    }
    Ok(())
}

/// Machine address of the L1 entry that maps `va` in the caller's current
/// tables (the L1 table must exist; the entry itself may be empty).
fn l1_entry(hv: &Hv, cur: usize, va: GuestVa) -> Result<u64, Errno> {
    use microhv_core::machine::MachineMemory;
    use microhv_core::pvmm::Owner;
    let d = &hv.domains[cur];
    if !va.0.is_multiple_of(4096) || va.0 >= HYPERVISOR_VA_START || !microhv_core::paging::is_canonical(va.0) {
        return Err(Errno::EINVAL);
    }
    let mut table = d.vcpu.cr3;
    for level in (2..=4u32).rev() {
        if hv.frames.owner(table) != Owner::Domain(d.id) {
            return Err(Errno::EFAULT);
        }
        let e = Identity.read_u64(table, microhv_core::paging::index(va.0, level));
        if e & 1 == 0 || e & (1 << 7) != 0 {
            return Err(Errno::ENOENT);
        }
        table = Mfn((e & microhv_core::paging::ADDR_MASK) >> 12);
    }
    if hv.frames.owner(table) != Owner::Domain(d.id) {
        return Err(Errno::EFAULT);
    }
    Ok(table.addr() + microhv_core::paging::index(va.0, 1) as u64 * 8)
}

/// How many times one grant may be mapped at once.
const MAX_MAPS_PER_GRANT: u32 = 16;
/// Foreign (grant and toolstack) mappings microhv tracks in all.
const MAX_FOREIGN_MAPPINGS: usize = 16384;

fn grant_map(hv: &mut Hv, cur: usize, granter: shared_abi::DomId, gref: u64, va: GuestVa, writable: u64) -> Result<u64, Errno> {
    let id = hv.domains[cur].id;
    let gref = u32::try_from(gref).map_err(|_| Errno::EINVAL)?;
    if writable > 1 {
        return Err(Errno::EINVAL);
    }
    let write = writable == 1;
    let ptr = l1_entry(hv, cur, va)?;
    // Bounded bookkeeping: a grant may be mapped a few times, and the
    // hypervisor keeps a limited number of foreign mappings in all.
    if hv.grants.entry(granter, gref).is_some_and(|g| g.maps >= MAX_MAPS_PER_GRANT) {
        return Err(Errno::ENOSPC);
    }
    if hv.frames.foreign_count() >= MAX_FOREIGN_MAPPINGS {
        return Err(Errno::ENOSPC);
    }
    let mfn = hv.grants.acquire_map(granter, gref, id, write)?;
    if let Err(e) = hv.frames.map_foreign(&mut Identity, id, ptr, granter, mfn, write) {
        let _ = hv.grants.release_map(granter, gref, id, write);
        return Err(e);
    }
    Ok(0)
}

fn grant_unmap(hv: &mut Hv, cur: usize, granter: shared_abi::DomId, gref: u64, va: GuestVa) -> Result<u64, Errno> {
    use microhv_core::machine::MachineMemory;
    let id = hv.domains[cur].id;
    let gref = u32::try_from(gref).map_err(|_| Errno::EINVAL)?;
    let ptr = l1_entry(hv, cur, va)?;
    let entry = Identity.read_u64(Mfn(ptr >> 12), ((ptr & 0xfff) / 8) as usize);
    if entry & 1 == 0 {
        return Err(Errno::EINVAL);
    }
    let mfn = Mfn((entry & microhv_core::paging::ADDR_MASK) >> 12);
    let write = entry & 2 != 0;
    // The mapping must be of this very grant.
    match hv.grants.entry(granter, gref) {
        Some(g) if g.mfn == mfn && g.grantee == id && g.maps > 0 && (!write || g.maps_writable > 0) => {}
        _ => return Err(Errno::EINVAL),
    }
    hv.frames.unmap_foreign(&mut Identity, id, ptr, mfn)?;
    hv.grants.release_map(granter, gref, id, write)?;
    domain::settle_grants(hv);
    Ok(0)
}

fn grant_copy(hv: &mut Hv, cur: usize, op: GuestVa) -> Result<u64, Errno> {
    use microhv_core::machine::MachineMemory;
    let mut b = [0u8; 32];
    read_guest(hv, cur, op, &mut b)?;
    let p = grant_copy_plan(hv, hv.domains[cur].id, &b)?;
    let mut buf = vec![0u8; p.len];
    if p.to_granted {
        read_guest(hv, cur, GuestVa(p.local), &mut buf)?;
        Identity.write_bytes(p.mfn, p.offset, &buf);
    } else {
        Identity.read_bytes(p.mfn, p.offset, &mut buf);
        write_guest(hv, cur, GuestVa(p.local), &buf)?;
    }
    Ok(p.len as u64)
}

/// A checked `GrantCopy`: the granted frame and which way to copy. The
/// caller copies between it and its own memory (PV: virtual addresses; HVM:
/// guest-physical ones).
pub(crate) struct GrantCopyPlan {
    pub mfn: Mfn,
    pub offset: usize,
    pub len: usize,
    pub local: u64,
    pub to_granted: bool,
}

/// Checks the `GrantCopy` record `b` of domain `id` against the grant and
/// the frame's current owner and type.
pub(crate) fn grant_copy_plan(hv: &Hv, id: shared_abi::DomId, b: &[u8; 32]) -> Result<GrantCopyPlan, Errno> {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let granter = shared_abi::DomId(u16::from_le_bytes([b[0], b[1]]));
    let (gref, offset, len) = (u32_at(4), u32_at(8) as usize, u32_at(12) as usize);
    let local = u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]);
    let flags = u32_at(24);
    if flags & !GRANT_COPY_TO_GRANTED != 0 || offset.checked_add(len).is_none_or(|e| e > 4096) {
        return Err(Errno::EINVAL);
    }
    let to_granted = flags & GRANT_COPY_TO_GRANTED != 0;
    let mfn = hv.grants.check(granter, gref, id, to_granted)?;
    // The grant names a frame, but the granter may have changed it since
    // (pinned it as a page table, released it): check it now, every time.
    let info = hv.frames.info(mfn).ok_or(Errno::EINVAL)?;
    if info.owner != microhv_core::pvmm::Owner::Domain(granter) {
        return Err(Errno::ESRCH);
    }
    if to_granted && (info.ty != microhv_core::pvmm::FrameType::Writable || info.special) {
        return Err(Errno::EACCES);
    }
    Ok(GrantCopyPlan { mfn, offset, len, local, to_granted })
}

/// The index of a live DomU that domain control may act on (never Dom0).
fn domctl_target(hv: &Hv, domid: shared_abi::DomId) -> Result<usize, Errno> {
    if domid == shared_abi::DomId::DOM0 {
        return Err(Errno::EINVAL);
    }
    domain::index_of(hv, domid).ok_or(Errno::ESRCH)
}
