//! `cargo xtask doc-abi`: renders `docs/abi.md`, the guest ABI reference,
//! from the shared-abi crate itself (hypercall table, error codes, structure
//! layouts and constants), so the document cannot drift from the code.
//! `cargo xtask doc-abi --check` (and `cargo xtask test`) fail when the
//! committed file differs from what [`render`] produces.

use crate::project_root;
use anyhow::{bail, Context, Result};
use shared_abi::blkif::{BlkRequest, BlkResponse, BlkSegment};
use shared_abi::hypercall::{self, HvStats, DomainCounters, DomainChannels, DomainCreate, DomainStart, ModuleInfo, DomainInfo, EvtchnStatus, GrantCopy, IretFrame, MemoryInfo, MmuUpdate, TrapInfo, TABLE};
use shared_abi::note::{PvNote, NOTE_NAME, NOTE_TYPE_PV};
use shared_abi::shared_info::{SharedInfo, VcpuInfo, VcpuTime, EVTCHN_PORTS, MAX_VCPUS};
use shared_abi::start_info::{StartInfo, CMDLINE_LEN, NAME_LEN};
use shared_abi::Errno;
use std::fmt::Write;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

/// Where the generated document lives.
pub fn path() -> PathBuf {
    project_root().join("docs").join("abi.md")
}

/// The message `--check` fails with.
pub const OUT_OF_DATE: &str = "docs/abi.md is out of date: run `cargo xtask doc-abi`";

/// Writes `docs/abi.md`; returns whether it changed.
pub fn write() -> Result<bool> {
    let want = render();
    let p = path();
    if std::fs::read_to_string(&p).is_ok_and(|have| have == want) {
        return Ok(false);
    }
    std::fs::write(&p, want).with_context(|| format!("writing {}", p.display()))?;
    Ok(true)
}

/// Fails with [`OUT_OF_DATE`] unless `docs/abi.md` equals [`render`].
pub fn check() -> Result<()> {
    match std::fs::read_to_string(path()) {
        Ok(have) if have == render() => Ok(()),
        _ => bail!("{OUT_OF_DATE}"),
    }
}

/// Argument registers, in order.
const ARG_REGS: [&str; 5] = ["RDI", "RSI", "RDX", "R10", "R8"];

/// One field of a shared structure.
struct Field {
    name: &'static str,
    ty: String,
    offset: usize,
    size: usize,
}

/// One shared structure.
struct Layout {
    name: &'static str,
    path: &'static str,
    what: &'static str,
    size: usize,
    fields: Vec<Field>,
}

/// `stringify!` of a type, with its spacing made uniform.
fn norm_ty(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.replace(" ;", ";").replace("[ ", "[").replace(" ]", "]")
}

/// Lists the fields of a structure. The names and types are written here;
/// the compiler checks each type against the real field, and offsets and
/// sizes come from `offset_of!` / `size_of`.
macro_rules! layout {
    ($s:ident at $path:literal, $what:literal { $($f:ident : $t:ty),* $(,)? }) => {{
        $(
            let _type_check: fn(&$s) -> &$t = |x| &x.$f;
        )*
        Layout {
            name: stringify!($s),
            path: $path,
            what: $what,
            size: size_of::<$s>(),
            fields: vec![$(Field {
                name: stringify!($f),
                ty: norm_ty(stringify!($t)),
                offset: offset_of!($s, $f),
                size: size_of::<$t>(),
            }),*],
        }
    }};
}

fn layouts() -> Vec<Layout> {
    vec![
        layout!(StartInfo at "start_info", "What microhv tells a PV guest at boot (RSI points at it)." {
            magic: [u8; 8],
            abi_major: u16,
            abi_minor: u16,
            flags: u32,
            domid: u16,
            _pad0: [u8; 6],
            nr_pages: u64,
            max_pages: u64,
            virt_base: u64,
            shared_info_va: u64,
            pt_base_va: u64,
            pt_base_mfn: u64,
            nr_pt_frames: u64,
            p2m_va: u64,
            first_free_pfn: u64,
            console_va: u64,
            console_evtchn: u64,
            store_va: u64,
            store_evtchn: u64,
            reserved: [u64; 4],
            cmdline: [u8; CMDLINE_LEN],
            name: [u8; NAME_LEN],
        }),
        layout!(SharedInfo at "shared_info", "The page microhv and the guest both write: per-vCPU event flags and time, event-channel bitmaps." {
            vcpu_info: [VcpuInfo; MAX_VCPUS],
            evtchn_pending: [u64; EVTCHN_PORTS / 64],
            evtchn_mask: [u64; EVTCHN_PORTS / 64],
        }),
        layout!(VcpuInfo at "shared_info", "One vCPU's part of `SharedInfo`." {
            evtchn_upcall_pending: u8,
            evtchn_upcall_mask: u8,
            _pad0: [u8; 6],
            evtchn_pending_sel: u64,
            cr2: u64,
            time: VcpuTime,
            _pad1: u64,
        }),
        layout!(VcpuTime at "shared_info", "System time: `now_ns = system_time_ns + (((rdtsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul) >> 32` (negative shift = right shift); retry while `version` is odd or changed." {
            version: u32,
            _pad0: u32,
            tsc_timestamp: u64,
            system_time_ns: u64,
            tsc_to_system_mul: u32,
            tsc_shift: i8,
            _pad1: [u8; 3],
        }),
        layout!(MmuUpdate at "hypercall", "One `mmu_update` request: write `val` to the page-table entry at machine address `ptr`." {
            ptr: u64,
            val: u64,
        }),
        layout!(TrapInfo at "hypercall", "One exception handler for `set_trap_table`." {
            vector: u8,
            _pad: [u8; 7],
            handler: u64,
        }),
        layout!(IretFrame at "hypercall", "What a guest handler finds on its stack (lowest address first) and what `iret` pops." {
            rax: u64,
            rip: u64,
            cs: u64,
            rflags: u64,
            rsp: u64,
            ss: u64,
        }),
        layout!(MemoryInfo at "hypercall", "The `memory_query` result." {
            nr_pages: u64,
            max_pages: u64,
        }),
        layout!(DomainInfo at "hypercall", "One `domctl_list` record." {
            domid: u16,
            state: u8,
            flags: u8,
            _pad: u32,
            nr_pages: u64,
            max_pages: u64,
            cpu_time_ns: u64,
            name: [u8; 32],
        }),
        layout!(DomainChannels at "hypercall", "The `domctl_channels` record." {
            console_gref: u32,
            console_port: u32,
            store_gref: u32,
            store_port: u32,
        }),
        layout!(ModuleInfo at "hypercall", "The `domctl_modules` record." {
            start_mfn: u64,
            size: u64,
            name: [u8; 48],
        }),
        layout!(DomainCreate at "hypercall", "The `domctl_create` argument." {
            nr_pages: u64,
            max_pages: u64,
            weight: u16,
            _pad: [u8; 6],
            name: [u8; 32],
        }),
        layout!(DomainStart at "hypercall", "The `domctl_start` argument." {
            entry: u64,
            stack_top: u64,
            start_info_va: u64,
            l4_mfn: u64,
            shared_info_pfn: u64,
            start_info_pfn: u64,
            first_free_pfn: u64,
            virt_base: u64,
        }),
        layout!(HvStats at "hypercall", "The `domctl_stats` result." {
            free_frames: u64,
            domains_alive: u32,
            evtchn_ports: u32,
            grants: u32,
            foreign_mappings: u32,
            orphan_frames: u32,
            heap_used_kib: u32,
        }),
        layout!(DomainCounters at "hypercall", "The `domain_counters` result." {
            hypercalls: u64,
            entries: u64,
            exceptions_bounced: u64,
            upcalls: u64,
            interrupts: u64,
            cr3_loads: u64,
            switches_in: u64,
            hv_ns: u64,
            vm_exits: u64,
            pt_updates: u64,
            exits_io: u64,
            exits_msr: u64,
            exits_cpuid: u64,
            exits_hlt: u64,
            exits_apic: u64,
            exits_other: u64,
        }),
        layout!(BlkSegment at "blkif", "One page of a block request." {
            gref: u32,
            first_sect: u8,
            last_sect: u8,
            _pad: u16,
        }),
        layout!(BlkRequest at "blkif", "A request on the block ring." {
            op: u8,
            nr_segments: u8,
            _pad: [u8; 6],
            id: u64,
            sector: u64,
            seg: [BlkSegment; 8],
        }),
        layout!(BlkResponse at "blkif", "The answer to one block request." {
            id: u64,
            op: u8,
            _pad: u8,
            status: i16,
            _pad2: u32,
        }),
        layout!(EvtchnStatus at "hypercall", "The `evtchn_status` result." {
            state: u32,
            remote_dom: u16,
            _pad: u16,
            detail: u32,
            _pad2: u32,
        }),
        layout!(GrantCopy at "hypercall", "The `grant_copy` argument." {
            granter: u16,
            _pad: u16,
            gref: u32,
            offset: u32,
            len: u32,
            local_va: u64,
            flags: u32,
            _pad2: u32,
        }),
    ]
}

/// How a constant's value is shown.
#[derive(Clone, Copy)]
enum Show {
    Dec,
    Hex,
    Bit,
}

struct Konst {
    name: &'static str,
    value: u64,
    show: Show,
    what: &'static str,
}

macro_rules! konsts {
    ($($path:path, $show:ident, $what:literal;)*) => {
        vec![$(Konst {
            name: {
                let full = stringify!($path);
                full.rsplit("::").next().unwrap_or(full).trim()
            },
            value: $path as u64,
            show: Show::$show,
            what: $what,
        }),*]
    };
}

fn constants() -> Vec<(&'static str, Vec<Konst>)> {
    vec![
        (
            "`version` commands and feature bits",
            konsts! {
                hypercall::VERSION_ABI, Dec, "`version(VERSION_ABI)` returns `major << 16 | minor`";
                hypercall::VERSION_FEATURES, Dec, "`version(VERSION_FEATURES)` returns the `FEATURE_*` bits";
                hypercall::FEATURE_PV_MMU, Bit, "guest page tables through `mmu_update` / `pin_table`";
                hypercall::FEATURE_ONESHOT_TIMER, Bit, "`set_timer` one-shot timer";
                hypercall::FEATURE_BALLOON, Bit, "`memory_populate` / `memory_release`";
                hypercall::FEATURE_TRAP_BOUNCE, Bit, "exceptions bounced to `set_trap_table` handlers";
            },
        ),
        (
            "Block protocol (`blkif`)",
            konsts! {
                shared_abi::blkif::BLK_OP_READ, Dec, "read sectors into the granted pages";
                shared_abi::blkif::BLK_OP_WRITE, Dec, "write the granted pages to the sectors";
                shared_abi::blkif::BLK_OP_FLUSH, Dec, "make completed writes durable";
                shared_abi::blkif::BLK_MAX_SEGMENTS, Dec, "most pages in one request";
                shared_abi::blkif::BLK_SECTOR_SIZE, Dec, "bytes per sector";
            },
        ),
        (
            "`sched_shutdown` reasons",
            konsts! {
                hypercall::SHUTDOWN_POWEROFF, Dec, "clean exit";
                hypercall::SHUTDOWN_CRASH, Dec, "the guest crashed";
            },
        ),
        (
            "Virtual IRQs",
            konsts! {
                hypercall::VIRQ_TIMER, Dec, "the one-shot timer armed with `set_timer` fired";
                hypercall::VIRQ_CONSOLE, Dec, "Dom0 only: a DomU wrote to microhv's debug console";
                hypercall::VIRQ_COUNT, Dec, "number of virtual IRQs";
            },
        ),
        (
            "Limits",
            konsts! {
                hypercall::CONSOLE_WRITE_MAX, Dec, "most bytes one `console_write` takes";
                hypercall::BATCH_MAX, Dec, "most entries one `mmu_update`, `memory_populate` or `memory_release` takes";
                shared_abi::shared_info::MAX_VCPUS, Dec, "vCPUs per domain";
                shared_abi::shared_info::EVTCHN_PORTS, Dec, "event-channel ports per domain";
                shared_abi::start_info::CMDLINE_LEN, Dec, "bytes of `StartInfo::cmdline` (NUL-terminated)";
                shared_abi::start_info::NAME_LEN, Dec, "bytes of `StartInfo::name` (NUL-terminated)";
            },
        ),
        (
            "Flags and states",
            konsts! {
                shared_abi::start_info::SIF_PRIVILEGED, Bit, "`StartInfo::flags`: this is Dom0";
                hypercall::DOMSTATE_RUNNING, Dec, "`DomainInfo::state`: running or runnable";
                hypercall::DOMSTATE_BLOCKED, Dec, "`DomainInfo::state`: blocked";
                hypercall::DOMSTATE_DEAD, Dec, "`DomainInfo::state`: shut down";
                hypercall::DOMSTATE_PAUSED, Dec, "`DomainInfo::state`: paused by Dom0";
                hypercall::DOMSTATE_BUILDING, Dec, "`DomainInfo::state`: created by the toolstack, not started";
                hypercall::EVTCHN_STATE_FREE, Dec, "`EvtchnStatus::state`: port not in use";
                hypercall::EVTCHN_STATE_UNBOUND, Dec, "`EvtchnStatus::state`: allocated for `remote_dom`, not yet bound";
                hypercall::EVTCHN_STATE_INTERDOMAIN, Dec, "`EvtchnStatus::state`: connected to `remote_dom`:`detail`";
                hypercall::EVTCHN_STATE_VIRQ, Dec, "`EvtchnStatus::state`: bound to virtual IRQ `detail`";
                hypercall::EVTCHN_STATE_PIRQ, Dec, "`EvtchnStatus::state`: bound to physical IRQ `detail`";
                hypercall::GRANT_COPY_TO_GRANTED, Bit, "`GrantCopy::flags`: write into the granted frame";
            },
        ),
        (
            "Machine",
            konsts! {
                shared_abi::HYPERCALL_VECTOR, Hex, "`int` vector for PV hypercalls (gate DPL 1)";
                shared_abi::HYPERVISOR_VA_START, Hex, "start of the guest-virtual region microhv reserves (last PML4 slot)";
            },
        ),
    ]
}

fn show(k: &Konst) -> String {
    match k.show {
        Show::Dec => k.value.to_string(),
        Show::Hex => format!("{:#x}", k.value),
        Show::Bit if k.value.is_power_of_two() => format!("`1 << {}` ({:#x})", k.value.trailing_zeros(), k.value),
        Show::Bit => format!("{:#x}", k.value),
    }
}

/// Text for a table cell: a `|` would end the cell, even inside backticks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The whole document. Deterministic: it depends only on shared-abi.
pub fn render() -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let w = &mut o;
    let (major, minor) = shared_abi::ABI_VERSION;

    let _ = writeln!(w, "# microhv guest ABI, version {major}.{minor}");
    let _ = writeln!(w);
    let _ = writeln!(w, "Generated by `cargo xtask doc-abi` from shared-abi; do not edit.");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "ABI version: **{major}.{minor}** (`shared_abi::ABI_VERSION`; `version(VERSION_ABI)` returns {:#x}). \
         A guest built for another major version is refused; a higher minor only adds hypercalls or features.",
        shared_abi::abi_version_packed()
    );
    let _ = writeln!(w);

    // Calling convention.
    let _ = writeln!(w, "## Calling convention");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "- **PV guests** (ring 1): `int {:#x}` with the hypercall number in **RAX** and up to five arguments in \
         **{}**, in that order.",
        shared_abi::HYPERCALL_VECTOR,
        ARG_REGS.join(", ")
    );
    let _ = writeln!(
        w,
        "- The result comes back in **RAX**: a value >= 0 on success, a **negative** error code (see \
         [Error codes](#error-codes)) on failure. Every other register is preserved."
    );
    let _ = writeln!(
        w,
        "- The IDT gate for vector {:#x} has DPL 1: `int {:#x}` from **ring 3 raises #GP**.",
        shared_abi::HYPERCALL_VECTOR,
        shared_abi::HYPERCALL_VECTOR
    );
    let _ = writeln!(w, "- **HVM guests** will call with `vmcall` (not yet implemented); the HVM column says which calls they reach.");
    let _ = writeln!(
        w,
        "- Unknown numbers, and calls this guest kind cannot reach, return `-ENOSYS`; Dom0-only calls from a DomU \
         return `-EPERM`; an argument that does not fit its type returns `-EINVAL`."
    );
    let _ = writeln!(
        w,
        "- Argument types: `u64` is any value; `GuestVa` is a virtual address in the caller's own address space; \
         `Mfn` is a machine frame number (physical address / 4096)."
    );
    let _ = writeln!(w);

    // Hypercall table.
    let _ = writeln!(w, "## Hypercalls");
    let _ = writeln!(w);
    let _ = writeln!(w, "| # | name | arguments | PV | HVM | who |");
    let _ = writeln!(w, "|---:|---|---|:---:|:---:|---|");
    for d in TABLE {
        let args = if d.args.is_empty() {
            "-".to_string()
        } else {
            d.args.iter().map(|(n, t)| format!("`{n}: {}`", norm_ty(t))).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            w,
            "| {} | [`{}`](#{}-{}) | {} | {} | {} | {} |",
            d.number,
            d.name,
            d.number,
            d.name,
            args,
            if d.access.pv { "yes" } else { "no" },
            if d.access.hvm { "yes" } else { "no" },
            if d.access.privileged { "Dom0 only" } else { "any" },
        );
    }
    let _ = writeln!(w);
    for d in TABLE {
        let sig = d.args.iter().map(|(n, t)| format!("{n}: {}", norm_ty(t))).collect::<Vec<_>>().join(", ");
        let _ = writeln!(w, "### {} {}", d.number, d.name);
        let _ = writeln!(w);
        let _ = write!(w, "`{}({sig})`: RAX = {}", d.name, d.number);
        for (i, (n, _)) in d.args.iter().enumerate() {
            let _ = write!(w, ", {} = `{n}`", ARG_REGS.get(i).copied().unwrap_or("?"));
        }
        let mut reach = Vec::new();
        if d.access.pv {
            reach.push("PV");
        }
        if d.access.hvm {
            reach.push("HVM");
        }
        let _ = writeln!(
            w,
            ". Callable from: {}; {}.",
            reach.join(" and "),
            if d.access.privileged { "Dom0 only (others get `-EPERM`)" } else { "any domain" }
        );
        let _ = writeln!(w);
        for line in d.doc {
            let _ = writeln!(w, "{}", line.strip_prefix(' ').unwrap_or(line).trim_end());
        }
        let _ = writeln!(w);
    }

    // Error codes.
    let _ = writeln!(w, "## Error codes");
    let _ = writeln!(w);
    let _ = writeln!(w, "Returned as negative values in RAX.");
    let _ = writeln!(w);
    let _ = writeln!(w, "| name | RAX | meaning |");
    let _ = writeln!(w, "|---|---:|---|");
    for e in Errno::ALL {
        let _ = writeln!(w, "| `{}` | {} | {} |", e.name(), e.0, cell(e.text()));
    }
    let _ = writeln!(w);

    // Layouts.
    let _ = writeln!(w, "## Shared structures");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "All are `#[repr(C)]`, little-endian, integers only. Offsets and sizes are in bytes, computed from \
         shared-abi with `offset_of!` and `size_of`."
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "| structure | size |");
    let _ = writeln!(w, "|---|---:|");
    let layouts = layouts();
    for l in &layouts {
        let _ = writeln!(w, "| [`{}`](#{}) | {} |", l.name, l.name.to_lowercase(), l.size);
    }
    let _ = writeln!(w);
    for l in &layouts {
        let _ = writeln!(w, "### {}", l.name);
        let _ = writeln!(w);
        let _ = writeln!(w, "`shared_abi::{}::{}`, {} bytes. {}", l.path, l.name, l.size, l.what);
        let _ = writeln!(w);
        let _ = writeln!(w, "| offset | size | field | type |");
        let _ = writeln!(w, "|---:|---:|---|---|");
        for f in &l.fields {
            let _ = writeln!(w, "| {} | {} | `{}` | `{}` |", f.offset, f.size, f.name, f.ty);
        }
        let _ = writeln!(w);
    }

    // Constants.
    let _ = writeln!(w, "## Constants");
    let _ = writeln!(w);
    for (title, ks) in constants() {
        let _ = writeln!(w, "### {title}");
        let _ = writeln!(w);
        let _ = writeln!(w, "| name | value | meaning |");
        let _ = writeln!(w, "|---|---|---|");
        for k in &ks {
            let _ = writeln!(w, "| `{}` | {} | {} |", k.name, show(k), cell(k.what));
        }
        let _ = writeln!(w);
    }

    // PV note.
    let _ = writeln!(w, "## PV image note");
    let _ = writeln!(w);
    let ty_ascii: String = NOTE_TYPE_PV.to_be_bytes().iter().map(|&b| b as char).collect();
    let _ = writeln!(
        w,
        "A PV guest kernel carries an ELF note (in a `PT_NOTE` segment) with name `\"{}\"` \
         (namesz {}, including the NUL) and type `{:#x}` (\"{}\"), whose 4-byte descriptor is the ABI major \
         version it was built for ({major}). The whole note is {} bytes (`shared_abi::note::PvNote`); \
         `microhv_guest::pv_note!()` emits it. An image without it is not a PV guest.",
        c_string(NOTE_NAME),
        NOTE_NAME.len(),
        NOTE_TYPE_PV,
        ty_ascii,
        size_of::<PvNote>(),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hypercall_and_error_is_documented() {
        let doc = render();
        for d in TABLE {
            assert!(doc.contains(&format!("`{}`", d.name)), "{} missing", d.name);
            assert!(doc.contains(&format!("### {} {}", d.number, d.name)), "{} has no section", d.name);
        }
        for e in Errno::ALL {
            assert!(doc.contains(e.name()), "{e:?} missing");
        }
        for k in ["VERSION_ABI", "FEATURE_BALLOON", "SHUTDOWN_CRASH", "VIRQ_TIMER", "CONSOLE_WRITE_MAX", "BATCH_MAX", "HYPERCALL_VECTOR", "HYPERVISOR_VA_START"] {
            assert!(doc.contains(&format!("`{k}`")), "{k} missing");
        }
        assert!(doc.contains("Generated by `cargo xtask doc-abi` from shared-abi; do not edit."));
        assert!(doc.contains("int 0x82"));
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(render(), render());
    }

    #[test]
    fn layouts_list_every_byte_of_each_structure() {
        // The field lists are written by hand: they must cover each structure
        // exactly (no field forgotten, no implicit padding).
        for l in layouts() {
            let mut at = 0;
            for f in &l.fields {
                assert_eq!(f.offset, at, "{}.{}: gap or overlap before it", l.name, f.name);
                at += f.size;
            }
            assert_eq!(at, l.size, "{}: fields do not add up to its size (a field missing?)", l.name);
        }
    }

    #[test]
    fn committed_doc_is_up_to_date() {
        let committed = std::fs::read_to_string(project_root().join("docs/abi.md")).unwrap_or_default();
        assert!(committed == render(), "{OUT_OF_DATE}");
    }
}
