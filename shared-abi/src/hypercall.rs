//! The hypercall table: one declaration of every hypercall, from which
//! microhv's argument decoding ([`Call::decode`]), the access rules
//! ([`TABLE`]), the guest-side stubs (crate `microhv-guest`) and `docs/abi.md`
//! (`cargo xtask doc-abi`) are all generated.
//!
//! Calling convention (PV, ring 1): `int 0x82` with the number in RAX and up
//! to five arguments in RDI, RSI, RDX, R10, R8. The result comes back in RAX:
//! a value >= 0 on success, a negative [`Errno`](crate::Errno) on failure.
//! Every other register is preserved. From ring 3, `int 0x82` raises #GP.

use crate::types::{DomId, GuestVa, HypercallArg, Mfn};
use crate::Errno;
use core::mem::{offset_of, size_of};

/// Invokes `$m! { ... }` with the whole table, so that other crates can
/// generate code (such as the guest stubs) from the same single list.
///
/// Columns: number, constant, variant, function(arguments), then who may call
/// it: `PV` / `-` (ring-1 guests), `HVM` / `-` (VMCALL from HVM guests, once
/// that exists), and `ANY` or `DOM0` (privileged: Dom0 only).
#[macro_export]
macro_rules! for_each_hypercall {
    ($m:ident) => {
        $m! {
            /// Query the ABI. `cmd` 0 (`VERSION_ABI`): `major << 16 | minor`.
            /// `cmd` 1 (`VERSION_FEATURES`): the feature bits (`FEATURE_*`).
            1 VERSION Version version(cmd: u64) [PV HVM ANY];
            /// Write `len` bytes at guest address `buf` to the console, with the
            /// domain's name in front of each line. At most 4096 bytes per call;
            /// returns the number of bytes written.
            2 CONSOLE_WRITE ConsoleWrite console_write(buf: GuestVa, len: u64) [PV HVM ANY];
            /// Give up the CPU to another runnable vCPU.
            3 SCHED_YIELD SchedYield sched_yield() [PV HVM ANY];
            /// Enable event delivery (clear `evtchn_upcall_mask`) and sleep until
            /// an event is pending for this vCPU (e.g. its timer). Returns at once
            /// if one is pending already.
            4 SCHED_BLOCK SchedBlock sched_block() [PV HVM ANY];
            /// Sleep until system time reaches `deadline_ns` or an event is pending.
            /// Returns 0 on timeout, 1 when woken by an event.
            5 SCHED_POLL SchedPoll sched_poll(deadline_ns: u64) [PV HVM ANY];
            /// End the domain: `reason` 0 (`SHUTDOWN_POWEROFF`) is a clean exit,
            /// 1 (`SHUTDOWN_CRASH`) a crash. Does not return.
            6 SCHED_SHUTDOWN SchedShutdown sched_shutdown(reason: u64) [PV HVM ANY];
            /// Arm the one-shot timer: at system time `deadline_ns` the vCPU gets a
            /// `VIRQ_TIMER` event (and wakes if blocked). 0 cancels it.
            7 SET_TIMER SetTimer set_timer(deadline_ns: u64) [PV HVM ANY];
            /// Balloon up: take `count` new, zeroed frames and write their MFNs to
            /// the `u64` array at `frames`. All or nothing: -ENOMEM when they would
            /// take the domain past its limit (or the host is out of memory).
            /// Returns `count`. Map the frames with `mmu_update` to use them.
            8 MEMORY_POPULATE MemoryPopulate memory_populate(frames: GuestVa, count: u64) [PV - ANY];
            /// Balloon down: give back the `count` frames whose MFNs are in the
            /// array at `frames`. Each must be the domain's, unmapped and not a
            /// page table; otherwise nothing after it is released. Returns how many were released.
            9 MEMORY_RELEASE MemoryRelease memory_release(frames: GuestVa, count: u64) [PV - ANY];
            /// Write a `MemoryInfo` about the calling domain to `info`.
            10 MEMORY_QUERY MemoryQuery memory_query(info: GuestVa) [PV HVM ANY];
            /// Apply `count` `MmuUpdate` requests from the array at `reqs`: each
            /// writes one entry of one of the domain's page tables after
            /// validation. The number applied goes to `*done` (if not 0).
            11 MMU_UPDATE MmuUpdate mmu_update(reqs: GuestVa, count: u64, done: GuestVa) [PV - ANY];
            /// Validate the frame `mfn` as a page table of `level` (1..=4) and pin
            /// it: it stays a read-only page table until unpinned.
            12 PIN_TABLE PinTable pin_table(mfn: Mfn, level: u64) [PV - ANY];
            /// Unpin a table pinned with `pin_table`.
            13 UNPIN_TABLE UnpinTable unpin_table(mfn: Mfn) [PV - ANY];
            /// Switch this vCPU to the pinned top-level table `mfn` (the guest's CR3).
            14 SET_PT_BASE SetPtBase set_pt_base(mfn: Mfn) [PV - ANY];
            /// Flush the TLB entry for `va`, or the whole TLB when `va` is `u64::MAX`.
            15 INVLPG Invlpg invlpg(va: GuestVa) [PV - ANY];
            /// Register the guest's exception handlers: `count` `TrapInfo`
            /// entries at `table`. Exceptions without a handler end the domain.
            16 SET_TRAP_TABLE SetTrapTable set_trap_table(table: GuestVa, count: u64) [PV - ANY];
            /// Register the event upcall handler (0 unregisters).
            17 SET_CALLBACK SetCallback set_callback(handler: GuestVa) [PV - ANY];
            /// Return from an exception or upcall handler: pops an `IretFrame`
            /// from the guest stack. Does not return to the caller.
            18 IRET Iret iret() [PV - ANY];
            /// Set the ring-1 stack used when ring-3 code traps to the guest kernel.
            19 STACK_SWITCH StackSwitch stack_switch(rsp: GuestVa) [PV - ANY];
            /// Bind virtual IRQ `virq` (`VIRQ_TIMER`, ...) to a new event-channel
            /// port of this vCPU and return the port.
            20 EVTCHN_BIND_VIRQ EvtchnBindVirq evtchn_bind_virq(virq: u64) [PV HVM ANY];
            /// Allocate a new port, unbound, that domain `remote` may bind to with
            /// `evtchn_bind_interdomain`. Returns the port.
            21 EVTCHN_ALLOC_UNBOUND EvtchnAllocUnbound evtchn_alloc_unbound(remote: DomId) [PV HVM ANY];
            /// Connect a new local port to `remote_port` of domain `remote`, which
            /// must be unbound and allocated for the caller. Returns the local port.
            22 EVTCHN_BIND_INTERDOMAIN EvtchnBindInterdomain evtchn_bind_interdomain(remote: DomId, remote_port: u64) [PV HVM ANY];
            /// Signal the other end of an interdomain port (-EINVAL on an unbound,
            /// closed or virtual-IRQ port).
            23 EVTCHN_SEND EvtchnSend evtchn_send(port: u64) [PV HVM ANY];
            /// Close a port; an interdomain peer becomes unbound again.
            24 EVTCHN_CLOSE EvtchnClose evtchn_close(port: u64) [PV HVM ANY];
            /// Write an `EvtchnStatus` for `port` to `out`.
            25 EVTCHN_STATUS EvtchnStatus evtchn_status(port: u64, out: GuestVa) [PV HVM ANY];
            /// Clear the port's mask bit and, if it is pending, raise the upcall.
            26 EVTCHN_UNMASK EvtchnUnmask evtchn_unmask(port: u64) [PV HVM ANY];
            /// Grant domain `grantee` access to the caller's machine frame `frame`
            /// (read-only when `readonly` is 1). Returns the grant reference.
            27 GRANT_ACCESS GrantAccess grant_access(grantee: DomId, frame: Mfn, readonly: u64) [PV HVM ANY];
            /// Revoke a grant; -EBUSY while the grantee still has it mapped.
            28 GRANT_END GrantEnd grant_end(gref: u64) [PV HVM ANY];
            /// Map the frame that domain `granter` granted with `gref` at the
            /// caller's address `va` (whose L1 table must exist and entry be empty);
            /// writable when `writable` is 1 and the grant allows it.
            29 GRANT_MAP GrantMap grant_map(granter: DomId, gref: u64, va: GuestVa, writable: u64) [PV - ANY];
            /// Undo a `grant_map` at `va`.
            30 GRANT_UNMAP GrantUnmap grant_unmap(granter: DomId, gref: u64, va: GuestVa) [PV - ANY];
            /// Copy through a grant as described by the `GrantCopy` at `op`.
            31 GRANT_COPY GrantCopy grant_copy(op: GuestVa) [PV HVM ANY];
            /// Privileged: write up to `max` `DomainInfo` records to `out`; returns
            /// the number of domains.
            32 DOMCTL_LIST DomctlList domctl_list(out: GuestVa, max: u64) [PV - DOM0];
            /// Privileged: write a `DomainChannels` record for DomU `domid` to
            /// `out`: the grant references and ports of its console and store
            /// pages, which Dom0's backends map and bind.
            33 DOMCTL_CHANNELS DomctlChannels domctl_channels(domid: DomId, out: GuestVa) [PV - DOM0];
            /// Privileged: stop running DomU `domid` until `domctl_unpause`.
            34 DOMCTL_PAUSE DomctlPause domctl_pause(domid: DomId) [PV - DOM0];
            /// Privileged: let a paused DomU run again.
            35 DOMCTL_UNPAUSE DomctlUnpause domctl_unpause(domid: DomId) [PV - DOM0];
            /// Privileged: end DomU `domid` now, whatever it is doing, and give
            /// back every frame, grant, event channel and mapping it held.
            36 DOMCTL_DESTROY DomctlDestroy domctl_destroy(domid: DomId) [PV - DOM0];
            /// Privileged: describe the boot modules microhv handed to Dom0 (the
            /// toolstack's configurations and images): up to `max` `ModuleInfo`
            /// records to `out`; returns how many modules there are. Their frames
            /// belong to Dom0, which maps them read-only with `mmu_update`.
            37 DOMCTL_MODULES DomctlModules domctl_modules(out: GuestVa, max: u64) [PV - DOM0];
            /// Privileged: create an empty, paused DomU as the `DomainCreate` at
            /// `spec` describes, with its memory allocated. Returns its domid.
            38 DOMCTL_CREATE DomctlCreate domctl_create(spec: GuestVa) [PV - DOM0];
            /// Privileged: write the machine frames of DomU `domid` (its pfn ->
            /// mfn list) to `out`, at most `max`; returns the count.
            39 DOMCTL_GET_FRAMES DomctlGetFrames domctl_get_frames(domid: DomId, out: GuestVa, max: u64) [PV - DOM0];
            /// Privileged: map frame `mfn` of DomU `domid`, which is still being
            /// built (never started), writable at Dom0's address `va` (an empty
            /// L1 entry).
            40 DOMCTL_MAP DomctlMap domctl_map(domid: DomId, mfn: Mfn, va: GuestVa) [PV - DOM0];
            /// Privileged: undo `domctl_map` at `va`.
            41 DOMCTL_UNMAP DomctlUnmap domctl_unmap(domid: DomId, mfn: Mfn, va: GuestVa) [PV - DOM0];
            /// Privileged: start DomU `domid` from the `DomainStart` at `ctx`:
            /// microhv validates and pins its page tables, sets up shared_info,
            /// its console and store pages, and makes its vCPU runnable. Dom0
            /// must have unmapped all its `domctl_map` mappings first.
            42 DOMCTL_START DomctlStart domctl_start(domid: DomId, ctx: GuestVa) [PV - DOM0];
            /// Privileged: write `HvStats` (free memory, event channels, grants
            /// and mappings in use) to `out`.
            43 DOMCTL_STATS DomctlStats domctl_stats(out: GuestVa) [PV - DOM0];
            /// Dom0 only: take `count` (1..=`DMA_POPULATE_MAX`) new, zeroed frames
            /// that are contiguous in machine memory and below 4 GiB, so that a
            /// device can reach them by DMA. They count against Dom0's limit.
            /// Returns the first MFN; map them with `mmu_update`.
            44 DMA_POPULATE DmaPopulate dma_populate(count: u64) [PV - DOM0];
            /// Dom0 only: route the device interrupt line `irq` (an I/O APIC input,
            /// 1..=23, not one microhv uses) to a new event channel of Dom0.
            /// The line is level-triggered and stays masked after each interrupt
            /// until `irq_eoi`. Returns the port.
            45 IRQ_BIND IrqBind irq_bind(irq: u64) [PV - DOM0];
            /// Dom0 only: end of interrupt for `irq` (bound with `irq_bind`): the
            /// device has been serviced, so microhv unmasks the line again.
            46 IRQ_EOI IrqEoi irq_eoi(irq: u64) [PV - DOM0];
            /// Write the `DomainCounters` of domain `domid` to `out`: what microhv
            /// did on its behalf (for benchmarks). A DomU may read only its own
            /// (-EPERM otherwise); Dom0 may read any.
            47 DOMAIN_COUNTERS DomainCountersGet domain_counters(domid: DomId, out: GuestVa) [PV HVM ANY];
            /// Privileged: create and start an HVM DomU from boot module
            /// `module` (an index into the `domctl_modules` list), which must
            /// be a multiboot kernel; `spec` (a `DomainCreate`) gives its name,
            /// memory and weight, and the `cmdline_len` bytes at `cmdline` (at
            /// most 1024) its multiboot command line. Returns its domid;
            /// -ENOSYS where the CPU has no usable VT-x.
            50 DOMCTL_CREATE_HVM DomctlCreateHvm domctl_create_hvm(spec: GuestVa, module: u64, cmdline: GuestVa, cmdline_len: u64) [PV - DOM0];
        }
    };
}

/// Who may make a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Reachable from PV guests (ring 1, `int 0x82`).
    pub pv: bool,
    /// Reachable from HVM guests (`vmcall`).
    pub hvm: bool,
    /// Dom0 only; others get -EPERM.
    pub privileged: bool,
}

/// One row of the table.
#[derive(Debug)]
pub struct Desc {
    pub number: u64,
    pub name: &'static str,
    pub args: &'static [(&'static str, &'static str)],
    pub doc: &'static [&'static str],
    pub access: Access,
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hc_flag {
    (PV) => { true };
    (HVM) => { true };
    (DOM0) => { true };
    (ANY) => { false };
    (-) => { false };
}

macro_rules! define_hypercalls {
    ($( $(#[doc = $doc:literal])* $num:literal $konst:ident $variant:ident $func:ident ( $($arg:ident : $ty:ty),* ) [$pv:tt $hvm:tt $who:tt] ; )*) => {
        /// Hypercall numbers.
        pub mod nr {
            $(pub const $konst: u64 = $num;)*
        }

        /// A decoded hypercall with typed arguments.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Call {
            $($(#[doc = $doc])* $variant { $($arg: $ty),* },)*
        }

        impl Call {
            /// Decodes a hypercall number and its argument registers. Unknown
            /// numbers are -ENOSYS; arguments that do not fit their type -EINVAL.
            pub fn decode(number: u64, args: [u64; 5]) -> Result<Call, Errno> {
                #[allow(unused_variables, unused_mut)]
                let mut regs = args.into_iter();
                match number {
                    $($num => Ok(Call::$variant {
                        $($arg: <$ty as HypercallArg>::from_raw(regs.next().unwrap_or(0))?,)*
                    }),)*
                    _ => Err(Errno::ENOSYS),
                }
            }

            /// The hypercall's number.
            pub fn number(&self) -> u64 {
                match self { $(Call::$variant { .. } => $num,)* }
            }

            /// Number and argument registers, as a guest stub would load them.
            pub fn encode(&self) -> (u64, [u64; 5]) {
                match *self {
                    $(Call::$variant { $($arg),* } => {
                        #[allow(unused_mut)]
                        let mut regs = [0u64; 5];
                        #[allow(unused_mut, unused_variables, unused_assignments)]
                        let mut i = 0;
                        $( #[allow(unused_assignments)] { regs[i] = HypercallArg::to_raw($arg); i += 1; } )*
                        ($num, regs)
                    })*
                }
            }
        }

        /// Every hypercall, in number order.
        pub const TABLE: &[Desc] = &[
            $(Desc {
                number: $num,
                name: stringify!($func),
                args: &[$((stringify!($arg), stringify!($ty))),*],
                doc: &[$($doc),*],
                access: Access {
                    pv: $crate::__hc_flag!($pv),
                    hvm: $crate::__hc_flag!($hvm),
                    privileged: $crate::__hc_flag!($who),
                },
            },)*
        ];
    };
}

for_each_hypercall!(define_hypercalls);

/// The table row for `number`, if it exists.
pub fn describe(number: u64) -> Option<&'static Desc> {
    // The table is in number order from 1 without gaps: index first, search
    // only if that ever stops being true.
    let direct = usize::try_from(number).ok().and_then(|n| n.checked_sub(1)).and_then(|i| TABLE.get(i));
    match direct {
        Some(d) if d.number == number => Some(d),
        _ => TABLE.iter().find(|d| d.number == number),
    }
}

/// The kind of guest making a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Pv,
    Hvm,
}

/// Applies the table's access rules: -ENOSYS for unknown numbers and for
/// calls this guest kind cannot reach, -EPERM for privileged calls from DomUs.
pub fn check_access(number: u64, kind: GuestKind, privileged: bool) -> Result<&'static Desc, Errno> {
    let d = describe(number).ok_or(Errno::ENOSYS)?;
    let reachable = match kind {
        GuestKind::Pv => d.access.pv,
        GuestKind::Hvm => d.access.hvm,
    };
    if !reachable {
        return Err(Errno::ENOSYS);
    }
    if d.access.privileged && !privileged {
        return Err(Errno::EPERM);
    }
    Ok(d)
}

/// `version` commands.
pub const VERSION_ABI: u64 = 0;
pub const VERSION_FEATURES: u64 = 1;
/// Feature bits returned by `version(VERSION_FEATURES)`.
pub const FEATURE_PV_MMU: u64 = 1 << 0;
pub const FEATURE_ONESHOT_TIMER: u64 = 1 << 1;
pub const FEATURE_BALLOON: u64 = 1 << 2;
pub const FEATURE_TRAP_BOUNCE: u64 = 1 << 3;

/// `sched_shutdown` reasons.
pub const SHUTDOWN_POWEROFF: u64 = 0;
pub const SHUTDOWN_CRASH: u64 = 1;

/// Virtual IRQs for `evtchn_bind_virq`.
/// The vCPU's one-shot timer fired.
pub const VIRQ_TIMER: u64 = 0;
/// Dom0 only: a DomU wrote to microhv's debug console (`console_write`),
/// e.g. because its PV console stopped working.
pub const VIRQ_CONSOLE: u64 = 1;
pub const VIRQ_COUNT: u64 = 2;

/// Most bytes one `console_write` takes.
pub const CONSOLE_WRITE_MAX: u64 = 4096;
/// Most entries one `mmu_update`, `memory_populate` or `memory_release` takes.
pub const BATCH_MAX: u64 = 512;
/// Most frames one `dma_populate` takes.
pub const DMA_POPULATE_MAX: u64 = 64;

/// One request of `mmu_update`: write `val` to the page-table entry at
/// machine address `ptr` (the table's MFN * 4096 + index * 8).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmuUpdate {
    pub ptr: u64,
    pub val: u64,
}

const _: () = assert!(size_of::<MmuUpdate>() == 16);

/// One exception handler for `set_trap_table`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrapInfo {
    /// Exception vector, 0..=31.
    pub vector: u8,
    pub _pad: [u8; 7],
    /// Handler address (ring 1). It is entered with an `IretFrame`-shaped
    /// frame on its stack, plus the error code on top for vectors that have one.
    pub handler: u64,
}

const _: () = {
    assert!(size_of::<TrapInfo>() == 16);
    assert!(offset_of!(TrapInfo, handler) == 8);
};

/// What a guest handler finds on its stack (lowest address first) and what
/// `iret` pops. Before `iret`, the handler pushes the RAX it wants restored
/// (the frame then starts with `rax`) and drops any error code.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IretFrame {
    pub rax: u64,
    pub rip: u64,
    pub cs: u64,
    /// Bit 9 (IF) holds the virtual interrupt flag: set = events were enabled
    /// (`evtchn_upcall_mask` clear) in the interrupted context.
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<IretFrame>() == 48);

/// `memory_query` result.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    pub nr_pages: u64,
    pub max_pages: u64,
}

const _: () = assert!(size_of::<MemoryInfo>() == 16);

/// `evtchn_status` result. `state`: 0 free, 1 unbound, 2 interdomain,
/// 3 virtual IRQ, 4 physical IRQ.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvtchnStatus {
    pub state: u32,
    /// Unbound / interdomain: the remote domain.
    pub remote_dom: u16,
    pub _pad: u16,
    /// Interdomain: the remote port; VIRQ / PIRQ: its number.
    pub detail: u32,
    pub _pad2: u32,
}

const _: () = assert!(size_of::<EvtchnStatus>() == 16);

pub const EVTCHN_STATE_FREE: u32 = 0;
pub const EVTCHN_STATE_UNBOUND: u32 = 1;
pub const EVTCHN_STATE_INTERDOMAIN: u32 = 2;
pub const EVTCHN_STATE_VIRQ: u32 = 3;
pub const EVTCHN_STATE_PIRQ: u32 = 4;

/// `grant_copy` argument: copy `len` bytes between the caller's address
/// `local_va` and byte `offset` of the frame that `granter` granted with
/// `gref`. `flags` bit 0 set: write into the granted frame (needs a writable
/// grant); clear: read from it. The range must stay inside the frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrantCopy {
    pub granter: u16,
    pub _pad: u16,
    pub gref: u32,
    pub offset: u32,
    pub len: u32,
    pub local_va: u64,
    pub flags: u32,
    pub _pad2: u32,
}

const _: () = {
    assert!(size_of::<GrantCopy>() == 32);
    assert!(offset_of!(GrantCopy, local_va) == 16);
};

pub const GRANT_COPY_TO_GRANTED: u32 = 1;

/// `domctl_channels` record: what Dom0 needs to serve a DomU's console and
/// store. The pages are granted (writable) to Dom0; the ports are unbound
/// ports of the DomU, allocated for Dom0 to bind with `evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainChannels {
    pub console_gref: u32,
    pub console_port: u32,
    pub store_gref: u32,
    pub store_port: u32,
}

const _: () = assert!(size_of::<DomainChannels>() == 16);

/// `domctl_modules` record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleInfo {
    /// First machine frame; the module is physically contiguous.
    pub start_mfn: u64,
    pub size: u64,
    /// The module's command line (file name first), NUL-terminated.
    pub name: [u8; 48],
}

impl Default for ModuleInfo {
    fn default() -> Self {
        ModuleInfo { start_mfn: 0, size: 0, name: [0; 48] }
    }
}

const _: () = assert!(size_of::<ModuleInfo>() == 64);

/// `domctl_create` argument.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainCreate {
    pub nr_pages: u64,
    pub max_pages: u64,
    pub weight: u16,
    pub _pad: [u8; 6],
    pub name: [u8; 32],
}

const _: () = assert!(size_of::<DomainCreate>() == 56);

/// `domctl_start` argument: where the domain builder put things.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainStart {
    pub entry: u64,
    pub stack_top: u64,
    pub start_info_va: u64,
    pub l4_mfn: u64,
    pub shared_info_pfn: u64,
    pub start_info_pfn: u64,
    pub first_free_pfn: u64,
    pub virt_base: u64,
}

const _: () = assert!(size_of::<DomainStart>() == 64);

/// `domctl_stats` result: what is in use across the machine.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HvStats {
    pub free_frames: u64,
    pub domains_alive: u32,
    pub evtchn_ports: u32,
    pub grants: u32,
    pub foreign_mappings: u32,
    pub orphan_frames: u32,
    /// microhv's heap in use, in KiB (its per-domain state lives there).
    pub heap_used_kib: u32,
}

const _: () = assert!(size_of::<HvStats>() == 32);

/// `domain_counters` result: events microhv counted for one domain since
/// it was created. Exact counts, for benchmarks.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainCounters {
    /// Hypercalls made (`int 0x82` or VMCALL), whatever their result.
    pub hypercalls: u64,
    /// Entries into microhv from this domain's vCPU: hypercalls, exceptions
    /// and interrupts that arrived while it ran (VM exits for HVM).
    pub entries: u64,
    /// Exceptions bounced to the domain's own handlers.
    pub exceptions_bounced: u64,
    /// Event upcalls delivered (PV) or event vectors injected (HVM).
    pub upcalls: u64,
    /// Interrupts (timer, devices) that arrived while the domain ran.
    pub interrupts: u64,
    /// Page-table base (CR3) loads made for the domain: one to microhv's
    /// tables and one back on every entry (KPTI), and each switch-in.
    pub cr3_loads: u64,
    /// Times the scheduler switched the CPU to this domain.
    pub switches_in: u64,
    /// Nanoseconds of system time spent in microhv between this domain's
    /// entries and the return to a guest (idle time excluded). Under QEMU
    /// `-icount shift=0` one nanosecond is one instruction.
    pub hv_ns: u64,
    /// VM exits (HVM domains).
    pub vm_exits: u64,
    /// Page-table entries written through `mmu_update`.
    pub pt_updates: u64,
    /// HVM: VM exits for port I/O, MSR accesses, CPUID, HLT, the local APIC
    /// page, and everything else (preemption timer, host interrupts, CR).
    pub exits_io: u64,
    pub exits_msr: u64,
    pub exits_cpuid: u64,
    pub exits_hlt: u64,
    pub exits_apic: u64,
    pub exits_other: u64,
}

const _: () = assert!(size_of::<DomainCounters>() == 128);

/// Domain states in `DomainInfo::state`.
pub const DOMSTATE_RUNNING: u8 = 0;
pub const DOMSTATE_BLOCKED: u8 = 1;
pub const DOMSTATE_DEAD: u8 = 2;
pub const DOMSTATE_PAUSED: u8 = 3;
/// Created by the toolstack, being built, not started yet.
pub const DOMSTATE_BUILDING: u8 = 4;

/// `domctl_list` record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainInfo {
    pub domid: u16,
    pub state: u8,
    /// Bit 0: privileged.
    pub flags: u8,
    pub _pad: u32,
    pub nr_pages: u64,
    pub max_pages: u64,
    pub cpu_time_ns: u64,
    pub name: [u8; 32],
}

const _: () = {
    assert!(size_of::<DomainInfo>() == 64);
    assert!(offset_of!(DomainInfo, nr_pages) == 8);
    assert!(offset_of!(DomainInfo, name) == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_sorted() {
        for w in TABLE.windows(2) {
            assert!(w[0].number < w[1].number, "{} and {}", w[0].name, w[1].name);
        }
        assert!(describe(0).is_none());
    }

    #[test]
    fn decode_and_encode_round_trip() {
        let c = Call::decode(nr::CONSOLE_WRITE, [0x1000, 5, 9, 9, 9]).unwrap();
        assert_eq!(c, Call::ConsoleWrite { buf: GuestVa(0x1000), len: 5 });
        assert_eq!(c.encode(), (nr::CONSOLE_WRITE, [0x1000, 5, 0, 0, 0]));
        assert_eq!(c.number(), 2);
        let p = Call::decode(nr::PIN_TABLE, [42, 4, 0, 0, 0]).unwrap();
        assert_eq!(p, Call::PinTable { mfn: Mfn(42), level: 4 });
    }

    #[test]
    fn unknown_numbers_are_enosys_never_success() {
        for n in [0, 49, 51, 63, 1000, u64::MAX] {
            assert_eq!(Call::decode(n, [0; 5]), Err(Errno::ENOSYS), "number {n}");
            assert_eq!(check_access(n, GuestKind::Pv, true).err(), Some(Errno::ENOSYS));
        }
    }

    #[test]
    fn access_rules_follow_the_table() {
        assert_eq!(check_access(nr::DOMCTL_LIST, GuestKind::Pv, false).err(), Some(Errno::EPERM));
        assert!(check_access(nr::DOMCTL_LIST, GuestKind::Pv, true).is_ok());
        assert_eq!(check_access(nr::MMU_UPDATE, GuestKind::Hvm, true).err(), Some(Errno::ENOSYS));
        assert!(check_access(nr::CONSOLE_WRITE, GuestKind::Hvm, false).is_ok());
        // Every row is reachable by someone.
        assert!(TABLE.iter().all(|d| d.access.pv || d.access.hvm));
    }
}
