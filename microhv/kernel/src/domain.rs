//! PV domains on the machine: building them from boot modules, entering and
//! leaving them, delivering exceptions and events, scheduling, and ending
//! them. The policy pieces (frame rules, builder, scheduler) are the
//! host-tested ones in `microhv-core`; this file wires them to the CPU.

use crate::mm::{self, Identity};
use crate::trap::TrapFrame;
use crate::{apic, cpu, power, println, time, trap};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use microhv_core::builder::{self, DomainConfig};
use microhv_core::cmdline::Cmdline;
use microhv_core::evtchn::{EventChannels, DEFAULT_MAX_PORTS};
use microhv_core::grant::{GrantTables, DEFAULT_MAX_GRANTS};
use microhv_core::machine::MachineMemory;
use microhv_core::pvmm::FrameTable;
use microhv_core::sched::{Decision, Scheduler, VcpuId, DEFAULT_WEIGHT};
use shared_abi::hypercall::{DomainInfo, DOMSTATE_BLOCKED, DOMSTATE_DEAD, DOMSTATE_RUNNING};
use shared_abi::shared_info::{tsc_scale, SharedInfo, VcpuInfo};
use shared_abi::{DomId, Errno, Mfn};
use spin::Mutex;

const HYPERVISOR_VA_START_: u64 = shared_abi::HYPERVISOR_VA_START;

/// Why a domain ended.
#[derive(Debug, Clone)]
pub enum EndReason {
    /// `sched_shutdown(SHUTDOWN_POWEROFF)`: a clean exit.
    Poweroff,
    /// `sched_shutdown(SHUTDOWN_CRASH)` or another reason number.
    CrashRequested(u64),
    /// microhv ended it (unhandled fault, bad state).
    Killed(String),
    /// Dom0's toolstack destroyed it.
    Destroyed,
    /// An HVM guest wrote this non-zero code to port 0xf4.
    ExitCode(u32),
}

impl EndReason {
    pub fn clean(&self) -> bool {
        matches!(self, EndReason::Poweroff | EndReason::Destroyed)
    }
    pub fn describe(&self) -> String {
        match self {
            EndReason::Poweroff => "poweroff".into(),
            EndReason::CrashRequested(r) => alloc::format!("crash (requested, reason {r})"),
            EndReason::Killed(why) => alloc::format!("killed: {why}"),
            EndReason::Destroyed => "destroyed by dom0".into(),
            EndReason::ExitCode(c) => alloc::format!("powered off with exit code {c}"),
        }
    }
}

/// One virtual CPU (one per domain in ABI v1).
pub struct Vcpu {
    /// Saved registers while not running; the live frame while running.
    pub regs: TrapFrame,
    /// The guest's current top-level page table.
    pub cr3: Mfn,
    /// Ring-1 stack for traps from ring 3 (`stack_switch`).
    pub kernel_sp: u64,
    /// Exception handlers by vector (0 = none).
    pub traps: [u64; 32],
    /// Event upcall handler (0 = none).
    pub callback: u64,
    /// One-shot timer deadline (system time, ns).
    pub timer_deadline: Option<u64>,
    /// In `sched_poll`: its RAX becomes 1 if an event wakes it.
    pub polling: bool,
}

pub struct Domain {
    pub id: DomId,
    pub name: String,
    pub privileged: bool,
    pub vcpu: Vcpu,
    pub nr_pages: u64,
    pub max_pages: u64,
    pub shared_info: Mfn,
    pub ended: Option<EndReason>,
    pub console_line: Vec<u8>,
    pub cpu_ns: u64,
    /// Paused by Dom0 (off the scheduler until unpaused).
    pub paused: bool,
    /// Created but not started yet (toolstack building it).
    pub building: bool,
    /// pfn -> mfn of its initial memory.
    pub p2m: Vec<Mfn>,
    pub weight: u16,
    /// DomUs: the console and store pages and ports offered to Dom0.
    pub channels: Option<shared_abi::hypercall::DomainChannels>,
    /// What microhv did for this domain (`domain_counters`).
    pub counters: shared_abi::hypercall::DomainCounters,
    /// HVM domains: the VT-x vCPU, EPT and emulated platform (`hvm.rs`).
    pub hvm: Option<alloc::boxed::Box<crate::hvm::HvmDomain>>,
}

pub struct Hv {
    pub domains: Vec<Domain>,
    pub frames: FrameTable,
    pub evtchn: EventChannels,
    pub grants: GrantTables,
    pub sched: Scheduler,
    /// Index of the domain whose vCPU is on the CPU.
    pub current: Option<usize>,
    pub slice_end: u64,
    pub ran_since: u64,
    /// Boot modules handed to Dom0's toolstack (their frames are Dom0's).
    pub dom0_modules: Vec<shared_abi::hypercall::ModuleInfo>,
    /// The next domid `domctl_create` gives out (never reused).
    pub next_domid: u16,
    /// Device memory Dom0 may map (frame ranges; see `MemoryMap::device_frames`).
    pub device_frames: Vec<(u64, u64)>,
    /// Device interrupts delivered to Dom0 so far.
    pub irq_count: u64,
    /// The domain whose entry microhv is handling, and when it entered
    /// (for `DomainCounters::hv_ns`; cleared when the CPU idles).
    pub entered: Option<(usize, u64)>,
    /// The deadline the APIC timer was last armed for on the way out to
    /// `current` (None while idle): before it, no timer, wake-up or slice
    /// end can be due. See `fast_return`.
    pub armed_deadline: Option<u64>,
    /// (deadline, domain index) of every armed one-shot timer, earliest
    /// first: firing and finding the next costs O(log n), not a walk over
    /// every domain. Kept in step with `Vcpu::timer_deadline` by [`set_timer`].
    pub timers: alloc::collections::BTreeSet<(u64, usize)>,
}

/// Arms (or, with `None`, cancels) the one-shot timer of domain `idx`.
pub fn set_timer(hv: &mut Hv, idx: usize, deadline: Option<u64>) {
    let d = &mut hv.domains[idx];
    if d.vcpu.timer_deadline == deadline {
        return;
    }
    if let Some(old) = d.vcpu.timer_deadline {
        hv.timers.remove(&(old, idx));
    }
    d.vcpu.timer_deadline = deadline;
    if let Some(t) = deadline {
        hv.timers.insert((t, idx));
    }
}

pub static HV: Mutex<Option<Hv>> = Mutex::new(None);

/// Free frames before any domain was built (to show that ending domains
/// gives every frame back).
static FREE_AT_START: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Byte offset of vCPU 0's `vcpu_info` fields inside shared_info.
const VCPU0: usize = core::mem::offset_of!(SharedInfo, vcpu_info);
const OFF_PENDING: usize = VCPU0 + core::mem::offset_of!(VcpuInfo, evtchn_upcall_pending);
const OFF_MASK: usize = VCPU0 + core::mem::offset_of!(VcpuInfo, evtchn_upcall_mask);
const OFF_SEL: usize = VCPU0 + core::mem::offset_of!(VcpuInfo, evtchn_pending_sel);
const OFF_CR2: usize = VCPU0 + core::mem::offset_of!(VcpuInfo, cr2);
const OFF_TIME: usize = VCPU0 + core::mem::offset_of!(VcpuInfo, time);
const OFF_EVT_PENDING: usize = core::mem::offset_of!(SharedInfo, evtchn_pending);
const OFF_EVT_MASK: usize = core::mem::offset_of!(SharedInfo, evtchn_mask);

fn si_u8(mfn: Mfn, off: usize) -> u8 {
    let mut b = [0u8];
    Identity.read_bytes(mfn, off, &mut b);
    b[0]
}

fn si_set_u8(mfn: Mfn, off: usize, v: u8) {
    Identity.write_bytes(mfn, off, &[v]);
}

fn si_u64(mfn: Mfn, off: usize) -> u64 {
    Identity.read_u64(mfn, off / 8)
}

fn si_set_u64(mfn: Mfn, off: usize, v: u64) {
    Identity.write_u64(mfn, off / 8, v);
}

impl Domain {
    pub fn upcall_mask(&self) -> bool {
        si_u8(self.shared_info, OFF_MASK) != 0
    }
    pub fn set_upcall_mask(&self, masked: bool) {
        si_set_u8(self.shared_info, OFF_MASK, masked as u8);
    }
    /// Events are pending and unmasked: an upcall is due. (The two flags
    /// are adjacent bytes: one read for both, as this is on every return.)
    pub fn events_need_delivery(&self) -> bool {
        const _: () = assert!(OFF_MASK == OFF_PENDING + 1);
        let mut b = [0u8; 2];
        Identity.read_bytes(self.shared_info, OFF_PENDING, &mut b);
        b[0] != 0 && b[1] == 0
    }
    pub fn set_cr2(&self, cr2: u64) {
        si_set_u64(self.shared_info, OFF_CR2, cr2);
    }

    /// Marks `port` pending; returns true when that makes an upcall due.
    pub fn raise_port(&self, port: u32) -> bool {
        let w = port as usize / 64;
        let bit = 1u64 << (port % 64);
        let p_off = OFF_EVT_PENDING + w * 8;
        let pending = si_u64(self.shared_info, p_off);
        si_set_u64(self.shared_info, p_off, pending | bit);
        if si_u64(self.shared_info, OFF_EVT_MASK + w * 8) & bit != 0 {
            return false;
        }
        let sel = si_u64(self.shared_info, OFF_SEL);
        si_set_u64(self.shared_info, OFF_SEL, sel | (1 << w));
        si_set_u8(self.shared_info, OFF_PENDING, 1);
        true
    }

    pub fn write_time_record(&self) {
        let (mul, shift) = tsc_scale(time::tsc_hz());
        let mut rec = [0u8; 32];
        rec[0..4].copy_from_slice(&2u32.to_le_bytes());
        rec[8..16].copy_from_slice(&time::boot_tsc().to_le_bytes());
        rec[16..24].copy_from_slice(&0u64.to_le_bytes());
        rec[24..28].copy_from_slice(&mul.to_le_bytes());
        rec[28] = shift as u8;
        Identity.write_bytes(self.shared_info, OFF_TIME, &rec);
    }

    pub fn info(&self, sched: &Scheduler, idx: usize) -> DomainInfo {
        let state = match (&self.ended, sched.state(VcpuId(idx))) {
            (Some(_), _) => DOMSTATE_DEAD,
            (None, _) if self.building => shared_abi::hypercall::DOMSTATE_BUILDING,
            (None, _) if self.paused => shared_abi::hypercall::DOMSTATE_PAUSED,
            (None, Some(microhv_core::sched::RunState::Blocked { .. })) => DOMSTATE_BLOCKED,
            _ => DOMSTATE_RUNNING,
        };
        let mut name = [0u8; 32];
        let n = self.name.len().min(31);
        name[..n].copy_from_slice(&self.name.as_bytes()[..n]);
        DomainInfo {
            domid: self.id.0,
            state,
            flags: self.privileged as u8,
            _pad: 0,
            nr_pages: self.nr_pages,
            max_pages: self.max_pages,
            cpu_time_ns: self.cpu_ns,
            name,
        }
    }
}

/// Parses sizes like `16M`, `512K`, `4096` (bytes) into pages.
pub fn parse_pages(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult).map(|b| b / 4096)
}

/// Where a domain builder put the pieces microhv needs to start a domain.
#[derive(Debug, Clone, Copy)]
pub struct StartLayout {
    pub l4: Mfn,
    pub entry: u64,
    pub stack_top: u64,
    pub start_info_va: u64,
    pub shared_info_pfn: u64,
    pub start_info_pfn: u64,
    pub first_free_pfn: u64,
    pub virt_base: u64,
}

/// Creates a domain with `nr_pages` of memory and no vCPU state yet
/// ("building"): not on the scheduler until `start_domain`. On failure
/// nothing is left behind.
pub fn alloc_domain(
    hv: &mut Hv,
    id: DomId,
    name: &str,
    nr_pages: u64,
    max_pages: u64,
    weight: u16,
    privileged: bool,
) -> Result<usize, String> {
    if hv.domains.iter().any(|d| d.id == id) {
        return Err(alloc::format!("{name}: domain id {} already used", id.0));
    }
    let mut frames: Vec<Mfn> = Vec::with_capacity(nr_pages as usize);
    let undo = |hv: &mut Hv, frames: &[Mfn]| {
        for &f in frames {
            let _ = hv.frames.release(f, id);
            let _ = mm::free_frame(microhv_core::frame::Mfn(f.0));
        }
    };
    for _ in 0..nr_pages {
        let Some(f) = mm::alloc_frame() else {
            undo(hv, &frames);
            return Err(alloc::format!("{name}: out of memory for {nr_pages} pages"));
        };
        let mfn = Mfn(f.0);
        // A new domain never sees another's old data.
        Identity.zero(mfn);
        if hv.frames.assign(mfn, id).is_err() {
            let _ = mm::free_frame(f);
            undo(hv, &frames);
            return Err(alloc::format!("{name}: frame {:#x} not assignable", f.0));
        }
        frames.push(mfn);
    }
    let dom = Domain {
        id,
        name: name.to_string(),
        privileged,
        vcpu: Vcpu { regs: TrapFrame::default(), cr3: Mfn(0), kernel_sp: 0, traps: [0; 32], callback: 0, timer_deadline: None, polling: false },
        nr_pages,
        max_pages: max_pages.max(nr_pages),
        shared_info: Mfn(0),
        ended: None,
        console_line: Vec::new(),
        cpu_ns: 0,
        paused: false,
        building: true,
        weight,
        channels: None,
        hvm: None,
        p2m: frames,
        counters: Default::default(),
    };
    let _ = hv.evtchn.add_domain(id, DEFAULT_MAX_PORTS);
    let _ = hv.grants.add_domain(id, DEFAULT_MAX_GRANTS);
    // The privileged domain drives the devices: it may map their MMIO.
    if privileged {
        for &(s, e) in &hv.device_frames {
            if let Err(err) = hv.frames.permit_io(id, s, e) {
                log::warn!("{name}: device memory {:#x}..{:#x} not permitted: {err}", s << 12, e << 12);
            }
        }
    }
    hv.domains.push(dom);
    Ok(hv.domains.len() - 1)
}

/// Starts a built domain: validates and pins its tables (so whatever built
/// them, microhv or Dom0's toolstack, the PV MMU rules hold), sets up
/// shared_info and (for DomUs) the console and store pages, and puts its
/// vCPU on the scheduler.
pub fn start_domain(hv: &mut Hv, idx: usize, l: &StartLayout) -> Result<(), Errno> {
    let d = &hv.domains[idx];
    if !d.building || d.ended.is_some() {
        return Err(Errno::EINVAL);
    }
    let (id, nr) = (d.id, d.nr_pages);
    if l.shared_info_pfn >= nr || l.start_info_pfn >= nr || l.first_free_pfn > nr {
        return Err(Errno::EINVAL);
    }
    let shared_info = d.p2m[l.shared_info_pfn as usize];
    let start_info = d.p2m[l.start_info_pfn as usize];
    // microhv writes these pages itself, so they must be distinct and stay
    // plain data: a builder (Dom0) must not pass a page table here.
    let console_pages = if d.privileged { 0 } else { 2 };
    if l.first_free_pfn + console_pages > nr
        || l.shared_info_pfn == l.start_info_pfn
        || (l.first_free_pfn..l.first_free_pfn + console_pages).any(|p| p == l.shared_info_pfn || p == l.start_info_pfn)
        || l.virt_base.checked_add(nr * 4096).is_none_or(|e| e > HYPERVISOR_VA_START_)
    {
        return Err(Errno::EINVAL);
    }
    hv.frames.pin(&mut Identity, id, l.l4, 4)?;
    let mut written = alloc::vec![shared_info, start_info];
    for p in l.first_free_pfn..l.first_free_pfn + console_pages {
        written.push(hv.domains[idx].p2m[p as usize]);
    }
    let plain = |hv: &Hv, f: Mfn| hv.frames.frame_type(f) == Some(microhv_core::pvmm::FrameType::Writable);
    if !written.iter().all(|&f| plain(hv, f)) {
        let _ = hv.frames.unpin(&mut Identity, id, l.l4);
        return Err(Errno::EINVAL);
    }
    if let Err(e) = hv.frames.get_base(id, l.l4) {
        let _ = hv.frames.unpin(&mut Identity, id, l.l4);
        return Err(e);
    }
    hv.frames.set_special(shared_info, true);
    let channels = if hv.domains[idx].privileged {
        None
    } else {
        let frames = hv.domains[idx].p2m.clone();
        match offer_channels(hv, id, l, nr, &frames) {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("{}: no console/store pages ({e}); it can still use the debug console", hv.domains[idx].name);
                None
            }
        }
    };
    let d = &mut hv.domains[idx];
    d.shared_info = shared_info;
    d.channels = channels;
    d.vcpu.regs = TrapFrame {
        rip: l.entry,
        cs: cpu::GUEST_KERNEL_CS as u64,
        rflags: 0x202,
        rsp: l.stack_top,
        ss: cpu::GUEST_KERNEL_DS as u64,
        rsi: l.start_info_va,
        ..TrapFrame::default()
    };
    d.vcpu.cr3 = l.l4;
    // Events start masked until the guest is ready for upcalls.
    d.set_upcall_mask(true);
    for w in 0..shared_abi::shared_info::EVTCHN_PORTS / 64 {
        si_set_u64(d.shared_info, OFF_EVT_MASK + w * 8, u64::MAX);
    }
    d.write_time_record();
    d.building = false;
    let w = d.weight;
    log::info!(
        "domain {} '{}': {} pages ({} KiB, limit {} KiB), entry {:#x}, weight {w}{}",
        id.0, d.name, d.nr_pages, d.nr_pages * 4, d.max_pages * 4, l.entry,
        if d.privileged { ", privileged" } else { "" }
    );
    if !d.paused {
        hv.sched.add(VcpuId(idx), w);
    }
    Ok(())
}

/// Builds one PV domain from a boot module. On failure nothing is left behind.
fn create(hv: &mut Hv, id: DomId, file: &[u8], args: &str, privileged: bool) -> Result<usize, String> {
    let c = Cmdline(args);
    let name = c.get("name").unwrap_or(if privileged { "dom0" } else { "domu" }).to_string();
    let nr_pages = c.get("mem").and_then(parse_pages).unwrap_or(if privileged { 4096 } else { 2048 });
    // Dom0 gets 1 MiB of headroom for its DMA pool (`dma_populate`).
    let max_pages = c.get("max").and_then(parse_pages).unwrap_or(nr_pages + if privileged { 256 } else { 16 }).max(nr_pages);
    let weight = c.get("weight").and_then(|w| w.parse::<u16>().ok()).unwrap_or(DEFAULT_WEIGHT);
    let image = builder::parse_pv_image(file).map_err(|e| alloc::format!("{name}: {e}"))?;
    let idx = alloc_domain(hv, id, &name, nr_pages, max_pages, weight, privileged)?;
    let frames = hv.domains[idx].p2m.clone();
    let cfg = DomainConfig { domid: id, name: &name, cmdline: args, privileged, max_pages };
    let fail = |hv: &mut Hv, why: String| -> Result<usize, String> {
        end(hv, idx, EndReason::Killed(why.clone()));
        Err(why)
    };
    let built = match builder::build(&mut Identity, &image, file, &frames, &cfg) {
        Ok(b) => b,
        Err(e) => return fail(hv, alloc::format!("{name}: {e}")),
    };
    let layout = StartLayout {
        l4: built.l4,
        entry: built.entry,
        stack_top: built.stack_top,
        start_info_va: built.start_info_va,
        shared_info_pfn: built.layout.shared_info_pfn,
        start_info_pfn: built.layout.start_info_pfn,
        first_free_pfn: built.first_free_pfn,
        virt_base: built.virt_base,
    };
    if let Err(e) = start_domain(hv, idx, &layout) {
        return fail(hv, alloc::format!("{name}: the built page tables did not validate: {e:?}"));
    }
    Ok(idx)
}

/// A machine frame seen as a shared page (volatile access through the
/// identity map), for initialising rings.
pub struct FramePage(pub Mfn);

impl shared_abi::ring::SharedMem for FramePage {
    fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        Identity.read_bytes(self.0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn write_u32(&mut self, off: usize, v: u32) {
        Identity.write_bytes(self.0, off, &v.to_le_bytes());
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        Identity.read_bytes(self.0, off, buf);
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        Identity.write_bytes(self.0, off, data);
    }
}

/// Gives a DomU a console page and a store page from its first free pages,
/// grants both to Dom0, allocates a port for each that Dom0 may bind, and
/// records them in the DomU's start_info (moving `first_free_pfn` past them).
fn offer_channels(
    hv: &mut Hv,
    id: DomId,
    built: &StartLayout,
    nr_pages: u64,
    frames: &[Mfn],
) -> Result<shared_abi::hypercall::DomainChannels, Errno> {
    let pfn = built.first_free_pfn;
    if pfn + 2 > nr_pages {
        return Err(Errno::ENOMEM);
    }
    let (console, store) = (frames[pfn as usize], frames[pfn as usize + 1]);
    for f in [console, store] {
        Identity.zero(f);
        shared_abi::console::init(&mut FramePage(f));
    }
    let dom0 = DomId::DOM0;
    let console_gref = hv.grants.grant(id, dom0, console, false)?;
    let store_gref = hv.grants.grant(id, dom0, store, false)?;
    let console_port = hv.evtchn.alloc_unbound(id, dom0)?;
    let store_port = hv.evtchn.alloc_unbound(id, dom0)?;
    // Patch start_info (fields at fixed offsets, checked in shared-abi).
    let si = frames[built.start_info_pfn as usize];
    let va = |p: u64| built.virt_base + p * 4096;
    for (off, v) in [
        (core::mem::offset_of!(shared_abi::start_info::StartInfo, first_free_pfn), pfn + 2),
        (core::mem::offset_of!(shared_abi::start_info::StartInfo, console_va), va(pfn)),
        (core::mem::offset_of!(shared_abi::start_info::StartInfo, console_evtchn), console_port as u64),
        (core::mem::offset_of!(shared_abi::start_info::StartInfo, store_va), va(pfn + 1)),
        (core::mem::offset_of!(shared_abi::start_info::StartInfo, store_evtchn), store_port as u64),
    ] {
        Identity.write_u64(si, off / 8, v);
    }
    Ok(shared_abi::hypercall::DomainChannels { console_gref, console_port, store_gref, store_port })
}

/// Builds Dom0 (the first module) and the DomUs, then enters the first domain.
pub fn start(modules: &[(&'static [u8], String)], hv_l4_entry: u64, device_frames: Vec<(u64, u64)>) -> ! {
    let mut hv = Hv {
        domains: Vec::new(),
        frames: FrameTable::new(mm::frame_limit(), hv_l4_entry),
        evtchn: EventChannels::new(),
        grants: GrantTables::new(),
        sched: Scheduler::new(),
        current: None,
        slice_end: 0,
        ran_since: 0,
        dom0_modules: Vec::new(),
        next_domid: 1,
        device_frames,
        irq_count: 0,
        entered: None,
        armed_deadline: None,
        timers: alloc::collections::BTreeSet::new(),
    };
    let mut failed = 0;
    let free_at_start = mm::free_frames();
    FREE_AT_START.store(free_at_start, core::sync::atomic::Ordering::Relaxed);
    log::info!("free memory before building domains: {free_at_start} frames");
    // With `toolstack` on Dom0's module line, microhv builds only Dom0 and
    // hands the other modules (configurations and images) to it.
    let toolstack = modules.first().is_some_and(|(_, a)| Cmdline(a).flag("toolstack"));
    let mut last_boot_id = 0u16;
    for (i, (file, args)) in modules.iter().enumerate() {
        let id = DomId(i as u16);
        // `for=<name>` on a module line: a multiboot module of that HVM guest.
        if let Some(target) = Cmdline(args).get("for") {
            if let Err(e) = crate::hvm::add_module(&mut hv, target, file, args) {
                log::error!("module {i} ({args}): {e}");
                failed += 1;
            }
            continue;
        }
        // `boot` on a module line: microhv builds that domain itself even
        // when Dom0 runs the toolstack (how HVM guests start today).
        let boot = Cmdline(args).flag("boot");
        if toolstack && i > 0 && !boot {
            let start = file.as_ptr() as u64;
            let first = start / 4096;
            let last = (start + file.len() as u64).div_ceil(4096);
            let mut ok = true;
            for f in first..last {
                ok &= hv.frames.assign(Mfn(f), DomId::DOM0).is_ok();
            }
            let mut name = [0u8; 48];
            let n = args.len().min(47);
            name[..n].copy_from_slice(&args.as_bytes()[..n]);
            if ok {
                hv.dom0_modules.push(shared_abi::hypercall::ModuleInfo { start_mfn: first, size: file.len() as u64, name });
                log::info!("module {i} ({args}) handed to dom0's toolstack");
            } else {
                log::error!("module {i} ({args}) could not be handed to dom0");
            }
            continue;
        }
        if !builder::has_pv_note(file) {
            // The fallback: an image without the PV note runs as HVM.
            match crate::hvm::create(&mut hv, id, file, args) {
                Ok(_) => last_boot_id = id.0,
                Err(e) => {
                    log::error!("module {i}: not a PV image (no microhv ELF note), and it cannot run as HVM: {e}");
                    failed += 1;
                }
            }
            continue;
        }
        match create(&mut hv, id, file, args, i == 0) {
            Ok(_) => last_boot_id = id.0,
            Err(e) => {
                log::error!("module {i}: could not build the domain: {e}");
                failed += 1;
            }
        }
    }
    // Domids are never reused: the toolstack's start after the boot modules'.
    hv.next_domid = if toolstack { last_boot_id + 1 } else { modules.len() as u16 };
    if hv.domains.is_empty() {
        println!("microhv: no domain could be started ({failed} failed); powering off");
        power::off(shared_abi::exit::FAILURE);
    }
    log::info!("free memory after building {} domains: {} MiB", hv.domains.len(), mm::free_frames() / 256);
    *HV.lock() = Some(hv);
    // Enter the first runnable vCPU through the normal exit path.
    let frame_alias = cpu::guest_frame_alias();
    // SAFETY: the guest frame slot on the entry stack is ours until the first
    // entry; it is written here through its identity address.
    let frame = unsafe { &mut *(cpu::guest_frame_identity() as *mut TrapFrame) };
    schedule(frame, true);
    trap::enter_guest(frame_alias)
}

/// Handles an entry from a guest: the frame holds its registers.
pub fn guest_entry(frame: &mut TrapFrame) {
    let now = time::nanos_since_boot();
    let mut force = false;
    {
        let mut g = HV.lock();
        let hv = g.as_mut().expect("guest entry before domains exist");
        let cur = hv.current.expect("guest entry with no current vCPU");
        hv.domains[cur].vcpu.regs = *frame;
        let vector = frame.vector;
        let nr = frame.rax;
        hv.entered = Some((cur, now));
        let c = &mut hv.domains[cur].counters;
        c.entries += 1;
        c.cr3_loads += 1;
        if vector == shared_abi::HYPERCALL_VECTOR as u64 {
            c.hypercalls += 1;
        } else if vector >= 32 {
            c.interrupts += 1;
        }
        match vector {
            v if v == shared_abi::HYPERCALL_VECTOR as u64 => {
                force = crate::hypercall::handle(hv, cur);
            }
            v if v == apic::TIMER_VECTOR as u64 => {
                apic::eoi();
                force = now >= hv.slice_end;
            }
            0..=31 => {
                if matches!(vector, 2 | 8 | 18) {
                    crate::crash::exception(frame);
                }
                force = guest_exception(hv, cur, frame);
            }
            v if v == apic::SPURIOUS_VECTOR as u64 => {}
            v if crate::irq::line_of(v).is_some() => {
                crate::irq::on_interrupt(crate::irq::line_of(v).unwrap_or(0));
                force = true;
            }
            _ => apic::eoi(),
        }
        let may_skip = match vector {
            v if v == shared_abi::HYPERCALL_VECTOR as u64 => keeps_schedule(nr),
            0..=31 => true,
            _ => false,
        };
        // A hypercall other than `iret` changes only RAX; an exception
        // bounce or `iret` changes the frame.
        let only_rax = vector == shared_abi::HYPERCALL_VECTOR as u64 && nr != shared_abi::hypercall::nr::IRET;
        if !force && may_skip && fast_return(hv, cur, frame, now, only_rax) {
            return;
        }
    }
    schedule(frame, force);
}

/// Charges the time since the pending guest entry to that domain's
/// `hv_ns` (its time in microhv), once.
fn charge_entry(hv: &mut Hv) {
    if let Some((i, t)) = hv.entered.take() {
        hv.domains[i].counters.hv_ns += time::nanos_since_boot().saturating_sub(t);
    }
}

/// Hypercalls that cannot block or end anyone, nor change a timer: after
/// them the scheduler would pick the same vCPU with the same deadline.
/// `evtchn_send` may wake another vCPU, but a wake-up inside a hypercall
/// does not preempt the caller (the woken vCPU runs next, when the caller's
/// slice ends or it blocks), so the scheduler would keep the caller too.
/// (`iret`, `evtchn_unmask` and `evtchn_send` may make an upcall due for the
/// caller itself: `fast_return` delivers it.)
fn keeps_schedule(nr: u64) -> bool {
    use shared_abi::hypercall::nr::*;
    matches!(
        nr,
        VERSION | MEMORY_POPULATE | MEMORY_RELEASE | MEMORY_QUERY | MMU_UPDATE | PIN_TABLE | UNPIN_TABLE | SET_PT_BASE | INVLPG
            | SET_TRAP_TABLE | SET_CALLBACK | IRET | STACK_SWITCH | EVTCHN_BIND_VIRQ | EVTCHN_ALLOC_UNBOUND | EVTCHN_STATUS | EVTCHN_UNMASK
            | EVTCHN_SEND
            | GRANT_ACCESS | GRANT_END | GRANT_MAP | GRANT_UNMAP | GRANT_COPY | DOMCTL_LIST | DOMCTL_STATS | DOMCTL_GET_FRAMES
            | DOMCTL_MAP | DOMCTL_UNMAP | DOMCTL_MODULES | DMA_POPULATE | DOMAIN_COUNTERS
    )
}

/// Returns straight to the vCPU that entered, skipping the scheduler pass,
/// when that pass could only decide the same: nothing is due before the
/// deadline armed on the way in, no device line waits, and the vCPU is
/// still runnable. A due upcall is delivered here, as the pass would.
/// False: take the full path. `now` is the time of the entry: a deadline
/// that passed while the call ran is still caught, as the APIC timer armed
/// for it fires at once.
fn fast_return(hv: &mut Hv, cur: usize, frame: &mut TrapFrame, now: u64, mut only_rax: bool) -> bool {
    let Some(deadline) = hv.armed_deadline else { return false };
    let d = &hv.domains[cur];
    if now >= deadline
        || crate::irq::has_pending()
        || d.ended.is_some()
        || d.paused
        || !matches!(hv.sched.state(VcpuId(cur)), Some(microhv_core::sched::RunState::Runnable))
    {
        return false;
    }
    // The same upcall delivery as at the end of `schedule`; a failure there
    // ends the domain, so leave that to the full path.
    if d.vcpu.callback != 0 && d.events_need_delivery() {
        let cb = d.vcpu.callback;
        if bounce(hv, cur, cb, None).is_err() {
            return false;
        }
        hv.domains[cur].counters.upcalls += 1;
        only_rax = false;
    }
    let d = &hv.domains[cur];
    if only_rax {
        frame.rax = d.vcpu.regs.rax;
    } else {
        *frame = d.vcpu.regs;
    }
    trap::set_next_cr3(d.vcpu.cr3.addr());
    hv.domains[cur].counters.cr3_loads += 1;
    charge_entry(hv);
    true
}

/// A CPU exception raised by guest code: bounce it to the guest's handler,
/// or end the domain. Returns true when the domain ended.
fn guest_exception(hv: &mut Hv, cur: usize, frame: &TrapFrame) -> bool {
    let v = frame.vector as usize;
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let name = crate::trap::EXCEPTION_NAMES[v];
    let d = &hv.domains[cur];
    let handler = d.vcpu.traps[v];
    // Described only when it is printed: a bounce is a hot path (every
    // guest page fault), formatting is not cheap.
    let what = || {
        if v == 14 {
            alloc::format!("{name} at rip {:#x} (ring {}), cr2 {cr2:#x}, error {:#x}", frame.rip, frame.cs & 3, frame.error_code)
        } else {
            alloc::format!("{name} at rip {:#x} (ring {}), error {:#x}", frame.rip, frame.cs & 3, frame.error_code)
        }
    };
    if handler == 0 {
        kill(hv, cur, alloc::format!("unhandled {}", what()));
        return true;
    }
    if v == 14 {
        d.set_cr2(cr2);
    }
    let has_err = matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30);
    if log::log_enabled!(log::Level::Debug) {
        log::debug!("{}: bouncing {} to handler {handler:#x}", d.name, what());
    }
    if let Err(e) = bounce(hv, cur, handler, has_err.then_some(frame.error_code)) {
        kill(hv, cur, alloc::format!("{}, and its handler could not be entered: {e}", what()));
        return true;
    }
    hv.domains[cur].counters.exceptions_bounced += 1;
    false
}

/// Pushes a hardware-like frame (error code, RIP, CS, RFLAGS, RSP, SS) on
/// the guest's ring-1 stack and continues at `handler` with events masked.
pub fn bounce(hv: &mut Hv, cur: usize, handler: u64, err: Option<u64>) -> Result<(), Errno> {
    let d = &hv.domains[cur];
    let r = d.vcpu.regs;
    let from_user = r.cs & 3 == 3;
    let sp = if from_user { d.vcpu.kernel_sp } else { r.rsp };
    if sp == 0 {
        return Err(Errno::EFAULT);
    }
    let virt_if = if d.upcall_mask() { 0 } else { 0x200 };
    let mut words = [0u64; 6];
    let mut n = 0;
    if let Some(e) = err {
        words[0] = e;
        n = 1;
    }
    for w in [r.rip, r.cs, (r.rflags & !0x200) | virt_if, r.rsp, r.ss] {
        words[n] = w;
        n += 1;
    }
    let new_sp = (sp & !15).checked_sub(8 * n as u64).ok_or(Errno::EFAULT)?;
    let mut bytes = [0u8; 48];
    for (i, w) in words[..n].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    hv.frames.copy_to_guest(&mut Identity, d.id, d.vcpu.cr3, new_sp, &bytes[..8 * n])?;
    d.set_upcall_mask(true);
    let regs = &mut hv.domains[cur].vcpu.regs;
    regs.rip = handler;
    regs.cs = cpu::GUEST_KERNEL_CS as u64;
    regs.ss = cpu::GUEST_KERNEL_DS as u64;
    regs.rsp = new_sp;
    regs.rflags = 0x202;
    Ok(())
}

/// Raises VIRQ `virq` for a domain: marks its bound port pending and wakes
/// it. A timer with no bound port still wakes a blocked vCPU (that is how
/// `sched_block` after `set_timer` works without event channels); other
/// unbound VIRQs are dropped.
pub fn send_virq(hv: &mut Hv, idx: usize, virq: u64) {
    match hv.evtchn.virq_port(hv.domains[idx].id, virq as u32) {
        Some(port) => raise(hv, idx, port),
        None if virq == shared_abi::hypercall::VIRQ_TIMER => hv.sched.wake(VcpuId(idx)),
        None => {}
    }
}

/// Raises the event channel bound to each device line that fired (see
/// `irq.rs`). A line nobody has bound (any more) stays masked.
pub fn deliver_irqs(hv: &mut Hv) {
    let mut lines = crate::irq::take_pending();
    while lines != 0 {
        let line = lines.trailing_zeros();
        lines &= lines - 1;
        hv.irq_count += 1;
        match hv.evtchn.pirq_port(line).and_then(|(d, port)| index_of(hv, d).map(|i| (i, port))) {
            Some((i, port)) => raise(hv, i, port),
            None => log::warn!("device interrupt on line {line} with no live domain bound to it; left masked"),
        }
    }
}

/// Marks `port` of domain `idx` pending; wakes the domain when that makes an
/// upcall due.
pub fn raise(hv: &mut Hv, idx: usize, port: u32) {
    let d = &mut hv.domains[idx];
    if d.ended.is_some() {
        return;
    }
    if d.raise_port(port) {
        // HVM guests get the upcall as an injected vector.
        if let Some(h) = d.hvm.as_mut() {
            h.platform.lapic.raise(microhv_core::hvm::EVTCHN_VECTOR);
        }
        // A vCPU sleeping in sched_poll returns 1 ("woken by an event"). Only
        // then: its saved RAX is live guest state at any other time.
        let blocked = matches!(hv.sched.state(VcpuId(idx)), Some(microhv_core::sched::RunState::Blocked { .. }));
        if d.vcpu.polling && blocked {
            d.vcpu.regs.rax = 1;
            d.vcpu.polling = false;
        }
        hv.sched.wake(VcpuId(idx));
    }
}

/// The index of the live domain `id`.
pub fn index_of(hv: &Hv, id: DomId) -> Option<usize> {
    hv.domains.iter().position(|d| d.id == id && d.ended.is_none())
}

/// Clears a port's mask bit; raises the upcall if it was pending.
pub fn unmask(hv: &mut Hv, idx: usize, port: u32) {
    let d = &hv.domains[idx];
    let w = port as usize / 64;
    let bit = 1u64 << (port % 64);
    let m_off = OFF_EVT_MASK + w * 8;
    si_set_u64(d.shared_info, m_off, si_u64(d.shared_info, m_off) & !bit);
    if si_u64(d.shared_info, OFF_EVT_PENDING + w * 8) & bit != 0 {
        let sel = si_u64(d.shared_info, OFF_SEL);
        si_set_u64(d.shared_info, OFF_SEL, sel | (1 << w));
        si_set_u8(d.shared_info, OFF_PENDING, 1);
        if let Some(h) = hv.domains[idx].hvm.as_mut() {
            h.platform.lapic.raise(microhv_core::hvm::EVTCHN_VECTOR);
        }
        hv.sched.wake(VcpuId(idx));
    }
}

/// Gives back the grant map counts of foreign mappings that the frame table
/// dropped (tables devalidated or torn down), and frees orphaned frames of
/// dead granters whose last mapping is gone.
pub fn settle_grants(hv: &mut Hv) {
    for m in hv.frames.take_dropped_foreign() {
        if let Some((granter, gref)) = hv.grants.find_mapping(m.mapper, m.mfn, m.writable) {
            let _ = hv.grants.release_map(granter, gref, m.mapper, m.writable);
        }
    }
    for f in hv.frames.take_freed_orphans() {
        if let Err(e) = mm::free_frame(microhv_core::frame::Mfn(f.0)) {
            log::error!("orphaned frame {:#x} could not be freed: {e:?}", f.0);
        }
    }
}

/// Ends a domain: logs why, gives back all its memory, and takes it off the CPU.
pub fn kill(hv: &mut Hv, idx: usize, why: String) {
    end(hv, idx, EndReason::Killed(why));
}

pub fn end(hv: &mut Hv, idx: usize, reason: EndReason) {
    if hv.domains[idx].ended.is_some() {
        return;
    }
    flush_console(&mut hv.domains[idx]);
    set_timer(hv, idx, None);
    if let Some(h) = hv.domains[idx].hvm.take() {
        crate::hvm::destroy(&mut hv.domains[idx], h);
    }
    let id = hv.domains[idx].id;
    // Order: page tables first (which reports the grant mappings it drops),
    // then the grant map counts, then the domain's own grants and channels.
    let freed = hv.frames.teardown(&mut Identity, id);
    settle_grants(hv);
    let still_mapped = hv.grants.remove_domain(id);
    let peers = hv.evtchn.remove_domain(id);
    let n = freed.len();
    if !still_mapped.is_empty() {
        log::info!("domain {}: {} granted frames stay until their grantees unmap them", id.0, still_mapped.len());
    }
    for f in freed {
        // Boot-module frames handed to Dom0 were never the allocator's.
        if !mm::is_managed(f) {
            continue;
        }
        if let Err(e) = mm::free_frame(microhv_core::frame::Mfn(f.0)) {
            log::error!("domain {}: frame {:#x} could not be freed: {e:?}", id.0, f.0);
        }
    }
    let d = &mut hv.domains[idx];
    d.nr_pages = 0;
    d.p2m = Vec::new();
    let msg = reason.describe();
    if reason.clean() {
        log::info!("domain {} '{}' ended: {msg}; {n} frames returned", id.0, d.name);
    } else {
        log::warn!("domain {} '{}' ended: {msg}; {n} frames returned", id.0, d.name);
    }
    d.ended = Some(reason);
    hv.sched.remove(VcpuId(idx));
    settle_grants(hv);
    // Tell the peers of its interdomain channels (they are unbound now).
    for (peer, port) in peers {
        if let Some(p) = index_of(hv, peer) {
            raise(hv, p, port);
        }
    }
}

pub fn flush_console(d: &mut Domain) {
    if !d.console_line.is_empty() {
        let line = core::mem::take(&mut d.console_line);
        println!("({}) {}", d.name, String::from_utf8_lossy(&line));
    }
}

/// Appends guest console bytes; complete lines are printed with the domain's name.
pub fn console_write(d: &mut Domain, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'\n' => {
                let line = core::mem::take(&mut d.console_line);
                println!("({}) {}", d.name, String::from_utf8_lossy(&line));
            }
            b'\r' => {}
            // Control characters other than tab are shown as '?'.
            b if b < 0x20 && b != b'\t' => d.console_line.push(b'?'),
            b => d.console_line.push(b),
        }
        if d.console_line.len() >= 200 {
            flush_console(d);
        }
    }
}

/// Fires expired one-shot timers.
fn fire_timers(hv: &mut Hv, now: u64) {
    while let Some(&(t, i)) = hv.timers.first() {
        if t > now {
            break;
        }
        set_timer(hv, i, None);
        let d = &hv.domains[i];
        if d.ended.is_some() {
            continue;
        }
        log::debug!("timer of {} fired {} us late", d.name, (now - t) / 1000);
        if d.hvm.is_some() {
            // HVM: wake it; its next entry sorts out which timer fired.
            hv.sched.wake(VcpuId(i));
        } else {
            send_virq(hv, i, shared_abi::hypercall::VIRQ_TIMER);
        }
    }
}

fn earliest_timer(hv: &Hv) -> Option<u64> {
    hv.timers.first().map(|&(t, _)| t)
}

/// Picks what runs next and loads it into `frame`; idles (halting) while
/// nothing is runnable; powers off when every domain has ended.
pub fn schedule(frame: &mut TrapFrame, mut force: bool) {
    loop {
        let mut g = HV.lock();
        let hv = g.as_mut().expect("domains exist");
        let now = time::nanos_since_boot();
        // A vCPU woken by its timer preempts the running one (it goes to the
        // back of the queue), so timer latency is not a whole time slice.
        let runnable_before = hv.sched.runnable_count();
        deliver_irqs(hv);
        fire_timers(hv, now);
        hv.sched.wake_expired(now);
        let woke = hv.sched.runnable_count() > runnable_before;
        let cur = hv.current;
        // Charge the time the current vCPU ran.
        if let Some(c) = cur {
            let ran = now.saturating_sub(hv.ran_since);
            hv.domains[c].cpu_ns += ran;
            hv.sched.account(VcpuId(c), ran);
            hv.ran_since = now;
        }
        let keep = cur.filter(|&c| {
            !force
                && !woke
                && now < hv.slice_end
                && matches!(hv.sched.state(VcpuId(c)), Some(microhv_core::sched::RunState::Runnable))
        });
        let preempted_by_wake = woke && now < hv.slice_end && !force;
        if let (None, Some(c), true) = (keep, cur, preempted_by_wake) {
            hv.sched.preempted(VcpuId(c), hv.slice_end - now);
        }
        let next = match keep {
            Some(c) => Some(c),
            // Preempted by a wake-up (not at the end of its slice), the current
            // vCPU keeps its place at the head of the queue behind the woken one.
            None => match hv.sched.pick_next(now, if woke && now < hv.slice_end && !force { None } else { cur.map(VcpuId) }) {
                Decision::Run { vcpu, slice_ns } => {
                    hv.slice_end = now + slice_ns;
                    Some(vcpu.0)
                }
                Decision::Idle { until } => {
                    if hv.domains.iter().all(|d| d.ended.is_some()) {
                        drop(g);
                        finish();
                    }
                    let until = match (until, earliest_timer(hv)) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let Some(until) = until else {
                        log::error!("every live domain is blocked with nothing that could wake it; ending them");
                        let mut ended = 0;
                        for i in 0..hv.domains.len() {
                            if hv.domains[i].ended.is_none() && !hv.domains[i].paused && !hv.domains[i].building {
                                kill(hv, i, "blocked forever (no timer, no event source)".into());
                                ended += 1;
                            }
                        }
                        // Only paused or unstarted domains left: nobody can resume them.
                        if ended == 0 {
                            for i in 0..hv.domains.len() {
                                if hv.domains[i].ended.is_none() {
                                    kill(hv, i, "paused or never started, with no domain left to resume it".into());
                                }
                            }
                        }
                        continue;
                    };
                    hv.current = None;
                    hv.entered = None;
                    hv.armed_deadline = None;
                    drop(g);
                    apic::arm_oneshot(until.saturating_sub(now).max(1000));
                    // Idle: wait for the timer with interrupts on, then look again.
                    x86_64::instructions::interrupts::enable_and_hlt();
                    x86_64::instructions::interrupts::disable();
                    continue;
                }
            },
        };
        let Some(n) = next else { continue };
        // (The current vCPU's registers were saved at entry, and hypercalls
        // update the saved copy, so nothing needs saving here.)
        hv.domains[n].vcpu.polling = false;
        if hv.current != Some(n) {
            hv.current = Some(n);
            hv.ran_since = now;
            hv.domains[n].counters.switches_in += 1;
        }
        // An HVM vCPU runs here, in VMX non-root mode, until an exit needs
        // the scheduler; then the loop picks again.
        if hv.domains[n].hvm.is_some() {
            // The PV domain whose entry brought us here is done being
            // handled: charge it now, not with the HVM run that follows.
            charge_entry(hv);
            let deadline = [earliest_timer(hv), hv.sched.next_wakeup()].into_iter().flatten().fold(hv.slice_end, u64::min);
            apic::arm_oneshot(deadline.saturating_sub(now).max(1000));
            force = crate::hvm::run(hv, n);
            continue;
        }
        // Deliver a due event upcall before returning to the guest.
        let d = &hv.domains[n];
        if d.vcpu.callback != 0 && d.events_need_delivery() {
            let cb = d.vcpu.callback;
            if let Err(e) = bounce(hv, n, cb, None) {
                kill(hv, n, alloc::format!("event upcall could not be delivered: {e}"));
                continue;
            }
            hv.domains[n].counters.upcalls += 1;
        }
        let d = &hv.domains[n];
        *frame = d.vcpu.regs;
        trap::set_next_cr3(d.vcpu.cr3.addr());
        cpu::set_guest_port_access(d.privileged);
        // The next event: slice end, a one-shot timer, or a sched_poll deadline.
        let deadline = [earliest_timer(hv), hv.sched.next_wakeup()]
            .into_iter()
            .flatten()
            .fold(hv.slice_end, u64::min);
        apic::arm_oneshot(deadline.saturating_sub(now).max(1000));
        hv.armed_deadline = Some(now + deadline.saturating_sub(now).max(1000));
        hv.domains[n].counters.cr3_loads += 1;
        charge_entry(hv);
        return;
    }
}

/// Every domain has ended: print the summary and power off.
fn finish() -> ! {
    let g = HV.lock();
    let hv = g.as_ref().expect("domains exist");
    let mut clean = true;
    // "name how-it-ended", with repeats counted: "tiny destroyed by dom0 (x100)".
    let mut groups: Vec<(String, usize)> = Vec::new();
    for d in &hv.domains {
        let r = d.ended.as_ref().map(|r| r.describe()).unwrap_or_else(|| "running".into());
        clean &= d.ended.as_ref().is_some_and(|r| r.clean());
        let item = alloc::format!("{} {}", d.name, r);
        match groups.iter_mut().find(|(g, _)| *g == item) {
            Some((_, n)) => *n += 1,
            None => groups.push((item, 1)),
        }
    }
    let mut parts = String::new();
    for (item, n) in groups {
        if !parts.is_empty() {
            parts.push_str(", ");
        }
        parts.push_str(&item);
        if n > 1 {
            parts.push_str(&alloc::format!(" (x{n})"));
        }
    }
    let free = mm::free_frames();
    let at_start = FREE_AT_START.load(core::sync::atomic::Ordering::Relaxed);
    println!("microhv: memory: {free} frames free now, {at_start} before the domains were built");
    let (used, size) = crate::stackwatch::high_water();
    log::info!("stack: microhv's stack went {} KiB deep (of {} KiB)", used.div_ceil(1024), size / 1024);
    if free != at_start {
        log::error!("{} frames were not returned", at_start.abs_diff(free));
        clean = false;
    }
    println!(
        "microhv: summary: {} domains ran: {parts}; exit {}",
        hv.domains.len(),
        if clean { "success" } else { "failure" }
    );
    power::off(if clean { shared_abi::exit::SUCCESS } else { shared_abi::exit::FAILURE })
}
