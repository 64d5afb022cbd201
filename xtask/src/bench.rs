//! `cargo xtask bench`: runs the benchmark guest, turns what it prints into
//! statistics, and writes `results.json`, `report.md` and `chart.svg`.
//!
//! Everything measured here is a count. Under QEMU with `-icount shift=0`
//! guest time advances one nanosecond per instruction executed, so a
//! "nanosecond" figure is an instruction count of the whole machine (guest
//! and microhv), and it is the same on every run. The events (hypercalls,
//! entries, CR3 loads...) are counted by microhv itself.
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Percentiles of one benchmark's samples (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: u64,
    pub p5: u64,
    pub median: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

/// Nearest-rank percentile `p` (0..=100) of sorted `v`.
fn pct(v: &[u64], p: u64) -> u64 {
    let rank = ((p as usize * v.len()).div_ceil(100)).clamp(1, v.len());
    v[rank - 1]
}

pub fn stats(samples: &[u64]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    Some(Stats { n: v.len(), min: v[0], p5: pct(&v, 5), median: pct(&v, 50), p95: pct(&v, 95), p99: pct(&v, 99), max: v[v.len() - 1] })
}

/// One benchmark of one flavour, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bench {
    pub name: String,
    pub flavour: String,
    /// Where it ran: "QEMU TCG", "QEMU KVM" or "Bochs".
    #[serde(rename = "where")]
    pub where_: String,
    pub samples: Vec<u64>,
    pub stats: Option<Stats>,
    /// Operations the event counts cover.
    pub ops: u64,
    /// Event totals over `ops` operations.
    pub events: BTreeMap<String, u64>,
}

impl Bench {
    /// Events per operation, to one decimal place's worth of precision.
    pub fn per_op(&self, event: &str) -> Option<f64> {
        let v = *self.events.get(event)?;
        (self.ops > 0).then(|| v as f64 / self.ops as f64)
    }
}

/// Reads the `BENCH-*` lines of one run (lines may carry a `[name] ` prefix).
pub fn parse(serial: &str, flavour: &str, where_: &str) -> Result<Vec<Bench>> {
    let mut out: Vec<Bench> = Vec::new();
    let mut done = None;
    for line in serial.lines() {
        let line = match line.find("BENCH-") {
            Some(i) => &line[i..],
            None => continue,
        };
        let mut words = line.split_ascii_whitespace();
        let kind = words.next().unwrap_or("");
        if kind == "BENCH-DONE" {
            done = words.next().and_then(|w| w.parse::<usize>().ok());
            continue;
        }
        let name = words.next().context("BENCH line without a name")?.to_string();
        let idx = match out.iter().position(|b| b.name == name) {
            Some(i) => i,
            None => {
                out.push(Bench { name: name.clone(), flavour: flavour.into(), where_: where_.into(), samples: Vec::new(), stats: None, ops: 0, events: BTreeMap::new() });
                out.len() - 1
            }
        };
        let b = &mut out[idx];
        match kind {
            "BENCH-SAMPLES" => {
                for s in words.next().unwrap_or("").split(',').filter(|s| !s.is_empty()) {
                    b.samples.push(s.parse().with_context(|| format!("bad sample {s:?} in {name}"))?);
                }
            }
            "BENCH-EVENTS" => {
                for kv in words {
                    let (k, v) = kv.split_once('=').with_context(|| format!("bad event {kv:?} in {name}"))?;
                    let v: u64 = v.parse().with_context(|| format!("bad count {kv:?} in {name}"))?;
                    if k == "ops" {
                        b.ops = v;
                    } else {
                        b.events.insert(k.to_string(), v);
                    }
                }
            }
            other => bail!("unknown line kind {other}"),
        }
    }
    let Some(done) = done else { bail!("the benchmark guest did not finish (no BENCH-DONE line)") };
    if done != out.len() {
        bail!("the guest reported {done} benchmarks but printed {}", out.len());
    }
    for b in &mut out {
        if b.samples.len() as u64 != b.ops {
            bail!("{}: {} samples for {} operations (a line was cut or lost)", b.name, b.samples.len(), b.ops);
        }
        b.stats = stats(&b.samples);
    }
    Ok(out)
}

/// What the whole run was and where.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub commit: String,
    pub emulator: String,
    pub cpu_model: String,
    pub unit: String,
    pub quick: bool,
    pub hypervisor_image_kib: Option<u64>,
    /// microhv's heap per DomU, from the 64-domain run (Dom0's `spawn`).
    pub hv_bytes_per_domain: Option<u64>,
    /// microhv's own ring-0 floor: interrupt round trip, CR3 reload, time read.
    pub baseline: BTreeMap<String, f64>,
    pub benches: Vec<Bench>,
}

/// Reads `microhv: baseline: k=v k=v ...`.
pub fn parse_baseline(serial: &str) -> BTreeMap<String, f64> {
    let Some(l) = serial.lines().find_map(|l| l.strip_prefix("microhv: baseline: ")) else { return BTreeMap::new() };
    l.split_ascii_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// The schema version of `results.json`.
pub const SCHEMA: u32 = 1;

/// A design target for one figure, shown next to the measured value.
pub struct Target {
    pub what: &'static str,
    pub measured: Option<f64>,
    pub limit: f64,
    pub unit: &'static str,
    /// Why the design misses it today, and what would reach it.
    pub if_missed: &'static str,
    /// The limit is a floor (met when measured >= limit), not a ceiling.
    pub at_least: bool,
}

impl Target {
    pub fn met(&self) -> Option<bool> {
        self.measured.map(|v| if self.at_least { v >= self.limit } else { v <= self.limit })
    }
}

pub fn targets(r: &Report) -> Vec<Target> {
    let find = |n: &str| r.benches.iter().find(|b| b.name == n);
    let hv_per_op = |n: &str| find(n).and_then(|b| b.per_op("hv_ns"));
    let floor = r.baseline.get("int_round_trip").copied().filter(|f| *f > 0.0);
    let in_bochs = |n: &str, f: &str| r.benches.iter().find(|b| b.name == n && b.flavour == f && b.where_ == "Bochs");
    let console_ratio = match (in_bochs("console_1kib", "HVM"), in_bochs("console_1kib", "PV")) {
        (Some(h), Some(p)) => h.per_op("entries").zip(p.per_op("entries")).filter(|(_, p)| *p > 0.0).map(|(h, p)| h / p),
        _ => None,
    };
    vec![
        Target {
            what: "null PV hypercall as a multiple of the ring-0 interrupt round trip (the native floor)",
            measured: find("null_hypercall").and_then(|b| b.stats).zip(floor).map(|(s, f)| s.median as f64 / f),
            limit: 2.0,
            unit: "x",
            if_missed: "the floor is one int/iretq inside ring 0 with no address-space switch; a hypercall adds two CR3 loads, the KPTI entry bookkeeping, decoding, and the shared-info checks for a due upcall (see the target below)",
            at_least: false,
        },
        Target {
            what: "null PV hypercall: microhv instructions per round trip",
            measured: hv_per_op("null_hypercall"),
            limit: 150.0,
            unit: "instructions",
            if_missed: "the fast return skips the scheduler pass and copies back RAX only; what is left is the Rust entry path (the lock on microhv's state, counters, the clock, the access check, decoding), copying the 176-byte register frame in, and the dispatch; a register-only path for calls that touch no memory, without the copy and the lock, would reach it",
            at_least: false,
        },
        Target {
            what: "event send to upcall: microhv instructions",
            measured: hv_per_op("event_send_to_upcall"),
            limit: 300.0,
            unit: "instructions",
            if_missed: "the path is two hypercalls (send, then the handler's iret) and an upcall bounce, all on the fast return now; what remains is the entry path twice, the event-channel lookup, and the bounce, which walks the guest's page tables to write its frame and iret reads it back the same way; a cached translation of the guest's kernel stack and a lighter entry path would reach it",
            at_least: false,
        },
        Target {
            what: "scheduler: instructions per switch with 64 runnable domains, as a multiple of those with 2",
            measured: match (find("domain_switch_k64"), find("domain_switch_k2")) {
                (Some(a), Some(b)) => match (a.stats, b.stats) {
                    (Some(x), Some(y)) if y.median > 0 => Some(x.median as f64 / y.median as f64),
                    _ => None,
                },
                _ => None,
            },
            limit: 1.2,
            unit: "x",
            if_missed: "deadlines are kept in order and the run queue's head is taken in O(1), so no step walks every domain; what still grows is O(log n) (the ordered timer sets) and the cache and TLB footprint of more domains",
            at_least: false,
        },
        Target {
            what: "console: hypervisor entries per KiB through the emulated UART (HVM) divided by those through the PV ring (Bochs, same run); at least",
            measured: console_ratio,
            limit: 20.0,
            unit: "x",
            at_least: true,
            if_missed: "the PV ring is written without a hypervisor entry per byte; entries come from notifying Dom0 and waiting for it to drain",
        },
        Target {
            what: "hypervisor state per domain (microhv's heap, from the 64-domain run)",
            measured: r.hv_bytes_per_domain.map(|b| b as f64),
            limit: 16384.0,
            unit: "bytes",
            if_missed: "the largest part is the domain's p2m list (8 bytes per page) and its event-channel and grant tables; sizing those to what the domain uses would bring it down",
            at_least: false,
        },
        Target {
            what: "hypervisor image size",
            measured: r.hypervisor_image_kib.map(|k| k as f64),
            limit: 512.0,
            unit: "KiB",
            if_missed: "the image counts its stacks: a 64 KiB boot stack (later microhv's private stack), 30 KiB of which the boot path uses, most of it kernel_main's frame holding the multiboot information and memory map; parsing those into the heap (or building for size, opt-level \"s\", which costs 10-50% more instructions on the hot paths) would bring it under",
            at_least: false,
        },
    ]
}

const EVENT_COLUMNS: [&str; 6] = ["hypercalls", "entries", "exceptions", "upcalls", "cr3_loads", "hv_ns"];

/// The terminal table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<22} {:<6} {:<9} {:>10} {:>10} {:>10} {:>10}   per op: hypercalls entries exceptions upcalls cr3_loads hv_ns", "benchmark", "flavour", "where", "median", "p5", "p95", "p99");
    for b in &r.benches {
        let st = b.stats.unwrap_or(Stats { n: 0, min: 0, p5: 0, median: 0, p95: 0, p99: 0, max: 0 });
        let per: Vec<String> = EVENT_COLUMNS.iter().map(|e| b.per_op(e).map_or("-".into(), |v| format!("{v:.1}"))).collect();
        let _ = writeln!(s, "{:<22} {:<6} {:<9} {:>10} {:>10} {:>10} {:>10}   {}", b.name, b.flavour, b.where_.replace("QEMU TCG", "QEMU"), st.median, st.p5, st.p95, st.p99, per.join(" "));
    }
    s
}

/// Plain-words notes on each benchmark, for the report.
fn explain(name: &str) -> &'static str {
    match name {
        "null_hypercall" => "PV: `version(0)` through `int 0x82` (CR3 switch to microhv's tables, register save, dispatch, CR3 back, `iretq`); HVM/PVHVM: the same call through VMCALL (a VM exit and entry).",
        "set_timer" => "arming the one-shot timer: a hypercall plus reprogramming the local APIC timer.",
        "read_time" => "PV: reading system time from `shared_info` and the TSC (scaled), no hypercall; HVM: two RDTSCs (the guest scales the difference afterwards), no exit.",
        "cpuid" => "CPUID runs natively in ring 1 for a PV guest (no CPUID faulting); under HVM it is a VM exit, answered by microhv's CPUID policy.",
        "pt_update" => "PV: one validated page-table entry write through `mmu_update`; HVM: a plain store and INVLPG, no exit (EPT does the isolation).",
        "pt_update_batch16" => "sixteen entries in one `mmu_update`: the entry cost is shared.",
        "page_fault" => "PV: a #PF bounced by microhv to the guest's own handler, and its `iret` hypercall back; HVM: the CPU delivers it to the guest's IDT, no exit.",
        "timer_latency" => "from the timer deadline to the guest's event handler (includes the APIC timer's granularity).",
        "event_send_to_upcall" => "`evtchn_send` on a loopback channel until the upcall handler runs (PVHVM: the handler of the injected vector).",
        "event_pingpong" => "a round trip to another domain: `evtchn_send` to the echo domain Dom0 paired us with (`peer`), whose handler sends one event back; we block until our handler has run. Two sends, two deliveries, two domain switches. PV: upcalls bounced by microhv; PVHVM: injected vectors and VMCALLs. The counts are the measuring domain's.",
        "console_1kib" => "PV: 1 KiB through the PV console ring (Dom0 drains it to the UART); HVM: 1 KiB through the emulated 16550, two port exits per byte; PVHVM: one `console_write` VMCALL.",
        "block_read_4k" => "one 4 KiB read through blkfront and Dom0's backend, from virtio-blk (QEMU) or the ATA disk Dom0 drives with PIO (Bochs); PVHVM: the same frontend over VMCALL and an injected vector. Under `-icount` with `sleep=off`, while every vCPU idles QEMU's clock jumps to the next timer, and the disk itself completes in host time: waits for it count those jumps. The p5 shows the work without one.",
        "sched_yield" => "`sched_yield`: the scheduler's entry and exit.",
        "domain_switch_k2" | "domain_switch_k8" | "domain_switch_k32" | "domain_switch_k64" => "one trip around the run queue (the benchmark guest yields, every spinner Dom0 spawned yields once), divided by the number of runnable domains: the cost of one domain switch.",
        _ => "",
    }
}

pub fn report_md(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# microhv benchmarks\n");
    let _ = writeln!(s, "- commit: `{}`", r.commit);
    let _ = writeln!(s, "- emulator: {} (CPU model `{}`)", r.emulator, r.cpu_model);
    let _ = writeln!(s, "- unit: {}", r.unit);
    let _ = writeln!(s, "- run: {}\n", if r.quick { "quick (`--quick`)" } else { "full" });
    let _ = writeln!(s, "## Fidelity\n");
    let _ = writeln!(s, "No machine here runs guests on real hardware virtualization. QEMU TCG emulates every instruction; with `-icount shift=0` its clock advances one nanosecond per instruction, so the figures below are **instruction counts**, exact and repeatable, not times on any real CPU. They show how much work each path does, not how long a real machine would take (a CR3 switch or a VM exit costs far more on hardware than its one instruction suggests). PV and HVM are only ever compared inside one emulator.\n");
    if !r.baseline.is_empty() {
        let _ = writeln!(s, "## Native floor (microhv in ring 0, same emulator)\n");
        let _ = writeln!(s, "| operation | per operation |");
        let _ = writeln!(s, "|---|---:|");
        for (k, v) in &r.baseline {
            let _ = writeln!(s, "| {k} | {v:.1} |");
        }
        let _ = writeln!(s);
    }
    if r.benches.iter().any(|b| b.name == "domain_switch_k64") {
        let _ = writeln!(s, "Scale: 64 DomUs (63 spinners and the benchmark guest) ran at once in 512 MiB of machine memory for the 64-domain scheduler run.\n");
    }
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(s, "| benchmark | flavour | where | median | p5 | p95 | p99 | hypercalls/op | entries/op | exceptions/op | upcalls/op | CR3 loads/op | in microhv/op (same unit as the median) |");
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for b in &r.benches {
        let st = b.stats.unwrap_or(Stats { n: 0, min: 0, p5: 0, median: 0, p95: 0, p99: 0, max: 0 });
        let per: Vec<String> = EVENT_COLUMNS.iter().map(|e| b.per_op(e).map_or("-".into(), |v| format!("{v:.1}"))).collect();
        let _ = writeln!(s, "| {} | {} | {} | {} | {} | {} | {} | {} |", b.name, b.flavour, b.where_, st.median, st.p5, st.p95, st.p99, per.join(" | "));
    }
    let hvm: Vec<&Bench> = r.benches.iter().filter(|b| b.events.contains_key("vm_exits")).collect();
    if !hvm.is_empty() {
        let _ = writeln!(s, "\n## VM exits per operation, by reason (HVM and PVHVM)\n");
        let _ = writeln!(s, "| benchmark | flavour | all | I/O | MSR | CPUID | HLT | APIC page | VMCALL (hypercalls) | other |");
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for b in hvm {
            let f = |e: &str| b.per_op(e).map_or("-".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                b.name, b.flavour, f("vm_exits"), f("exits_io"), f("exits_msr"), f("exits_cpuid"), f("exits_hlt"), f("exits_apic"), f("hypercalls"), f("exits_other")
            );
        }
    }
    let _ = writeln!(s, "\n## Targets\n");
    let _ = writeln!(s, "| target | measured | limit | met |");
    let _ = writeln!(s, "|---|---:|---:|---|");
    let all = targets(r);
    for t in &all {
        let m = t.measured.map_or("not measured".into(), |v| if v < 100.0 { format!("{v:.2} {}", t.unit) } else { format!("{v:.0} {}", t.unit) });
        let met = t.met().map_or("-", |m| if m { "yes" } else { "no" });
        let _ = writeln!(s, "| {} | {m} | {} {} | {met} |", t.what, t.limit, t.unit);
    }
    for t in all.iter().filter(|t| t.met() == Some(false)) {
        let _ = writeln!(s, "\n- **{}** missed: {}.", t.what, t.if_missed);
    }
    let _ = writeln!(s, "\nPV is compared with HVM and PVHVM only in the Bochs rows, which come from one Bochs run with all three guests (one after the other, so that their consoles do not mix). Bochs counts time by instructions (ips=100M: 10 ns per instruction), and it sends serial output at the line's pace, so the console rows include waiting for the UART. For HVM guests, microhv's time per operation (`hv_ns`) runs from a VM exit to the next entry, so it includes time the vCPU spent halted.\n");
    let _ = writeln!(s, "## What each benchmark does\n");
    for b in &r.benches {
        let _ = writeln!(s, "- **{}**: {}", b.name, explain(&b.name));
    }
    s
}

/// A horizontal bar chart of the medians, one bar per benchmark and
/// flavour, on a log scale (the figures span four orders of magnitude).
pub fn chart_svg(r: &Report) -> String {
    let row = 22;
    let left = 300;
    let width = 900;
    let bars: Vec<&Bench> = r.benches.iter().filter(|b| b.stats.is_some()).collect();
    let height = 60 + row * bars.len();
    let max = bars.iter().filter_map(|b| b.stats.map(|s| s.median)).max().unwrap_or(1).max(2) as f64;
    let scale = |v: u64| ((v.max(1) as f64).ln() / max.ln() * (width - left - 90) as f64).max(1.0);
    let colour = |f: &str| match f {
        "PV" => "#3b6ea8",
        "HVM" => "#c0504d",
        _ => "#6a9a3b",
    };
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<text x="10" y="20" font-size="14">microhv: median cost per operation, log scale (QEMU rows: instructions; Bochs rows: ns, 10 ns per instruction)</text>"#);
    for (i, b) in bars.iter().enumerate() {
        let y = 40 + i * row;
        let m = b.stats.map_or(0, |s| s.median);
        let w = scale(m);
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{} ({}, {})</text>"#, left - 6, y + 14, xml(&b.name), xml(&b.flavour), xml(&b.where_));
        let _ = writeln!(s, r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{}" fill="{}"/>"#, row - 6, colour(&b.flavour));
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}">{m}</text>"#, left as f64 + w + 4.0, y + 14);
    }
    s.push_str("</svg>\n");
    s
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `YYYYmmdd-HHMMSS` (UTC) for a Unix time.
pub fn timestamp(unix: u64) -> String {
    let (days, secs) = (unix / 86400, unix % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Writes the three files into `dir`; returns their paths.
pub fn write_files(dir: &Path, r: &Report) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("results.json");
    let md = dir.join("report.md");
    let svg = dir.join("chart.svg");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)?;
    std::fs::write(&md, report_md(r))?;
    std::fs::write(&svg, chart_svg(r))?;
    Ok([json, md, svg])
}


/// Like [`parse`], for the lines of one domain (`[name] ...` or `(name) ...`).
pub fn parse_domain(serial: &str, domain: &str, flavour: &str, where_: &str) -> Result<Vec<Bench>> {
    let (a, b) = (format!("[{domain}] "), format!("({domain}) "));
    let mine: String = serial.lines().filter(|l| l.starts_with(&a) || l.starts_with(&b)).map(|l| format!("{l}\n")).collect();
    parse(&mine, flavour, where_).with_context(|| format!("the {flavour} benchmark guest '{domain}'"))
}

/// PV, HVM and PVHVM benchmark guests side by side in one Bochs run (the
/// only emulator here with VT-x), so that the flavours compare inside one
/// emulator and one run.
pub fn run_bochs(images: &crate::Images, quick: bool) -> Result<Vec<Bench>> {
    let q = if quick { " quick" } else { "" };
    // The PV and the PVHVM guest each have an echo peer (event ping-pong)
    // and a virtual disk on Dom0's ATA disk (4 KiB reads).
    let dir = &images.dir;
    GuestConfig::pv("bench-pv", &format!("bench{q} console-kib=4")).disk(2048, 16384).peer("bench-pv-echo").write(dir, "bench-pv.toml")?;
    echo_config("bench-pv-echo", "bench-pv", false).write(dir, "bench-pv-echo.toml")?;
    GuestConfig::hybrid("bench-pvhvm", &format!("bench{q} settle=20000")).disk(32768, 16384).peer("bench-pvhvm-echo").write(dir, "bench-pvhvm.toml")?;
    echo_config("bench-pvhvm-echo", "bench-pvhvm", true).write(dir, "bench-pvhvm-echo.toml")?;
    let mut run = crate::BochsRun::new(images);
    run.modules = vec![
        "dom0.elf name=dom0 toolstack mem=32M".into(),
        // One after the other: the PV guest first, then (their `settle`
        // delays, in virtual ms) HVM and PVHVM, so that no guest's output
        // lands in the middle of another's lines.
        format!("domu-hvm.elf name=bench-hvm boot mem=8M bench{q} settle=8000"),
        "domu.elf".into(),
        "domu-hvm.elf".into(),
        "bench-pv.toml".into(),
        "bench-pv-echo.toml".into(),
        "bench-pvhvm.toml".into(),
        "bench-pvhvm-echo.toml".into(),
    ];
    run.cmdline = std::env::var("MICROHV_BENCH_CMDLINE").unwrap_or_else(|_| "loglevel=warn".into());
    run.dir_name = "bochs-bench".into();
    let disk = crate::project_root().join("target").join("bench").join("bochs-disk.img");
    crate::ensure_bochs_disk(&disk, true)?;
    run.disk = Some(disk);
    run.timeout = std::time::Duration::from_secs(1200);
    let r = run.run()?;
    if r.outcome != crate::Outcome::Success {
        bail!("the Bochs benchmark run did not end cleanly ({}):\n{}", r.outcome.describe(), r.serial);
    }
    let mut all = parse_domain(&r.serial, "bench-pv", "PV", "Bochs")?;
    all.extend(parse_domain(&r.serial, "bench-hvm", "HVM", "Bochs")?);
    all.extend(parse_domain(&r.serial, "bench-pvhvm", "PVHVM", "Bochs")?);
    Ok(all)
}

/// A report with no QEMU results yet (`--bochs-only`).
pub fn empty_report(quick: bool) -> Report {
    Report {
        schema: SCHEMA,
        commit: commit(),
        emulator: String::new(),
        cpu_model: "qemu64 (QEMU), corei7_skylake_x (Bochs)".into(),
        unit: UNIT.into(),
        quick,
        hypervisor_image_kib: None,
        hv_bytes_per_domain: None,
        baseline: BTreeMap::new(),
        benches: Vec::new(),
    }
}

/// What the figures are, for the report.
pub const UNIT: &str = "instructions under QEMU -icount (1 ns of guest time = 1 instruction); nanoseconds of Bochs's virtual clock under Bochs (ips=100M: 1 ns = 0.1 instruction, so both count work)";

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate::project_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A domain configuration for Dom0's toolstack, written by `cargo xtask
/// bench` next to the images: the PV guest (`domu.elf`) or the HVM image as
/// a hybrid guest (`domu-hvm.elf` with `pvhvm`), 8 MiB unless changed.
pub struct GuestConfig {
    name: String,
    kernel: &'static str,
    memory: &'static str,
    cmdline: String,
    kind: &'static str,
    disk: Option<String>,
    peer: Option<String>,
}

impl GuestConfig {
    pub fn pv(name: &str, cmdline: &str) -> GuestConfig {
        GuestConfig { name: name.into(), kernel: "domu.elf", memory: "8M", cmdline: cmdline.into(), kind: "pv", disk: None, peer: None }
    }
    /// The HVM image as a hybrid guest (it learns its name from `name=`).
    pub fn hybrid(name: &str, cmdline: &str) -> GuestConfig {
        GuestConfig { kernel: "domu-hvm.elf", kind: "auto", cmdline: format!("name={name} pvhvm {cmdline}"), ..GuestConfig::pv(name, "") }
    }
    pub fn memory(mut self, m: &'static str) -> Self {
        self.memory = m;
        self
    }
    /// One virtual disk, `xvda`, of `sectors` from `start` of the real disk.
    pub fn disk(mut self, start: u64, sectors: u64) -> Self {
        self.disk = Some(format!("xvda:{start}:{sectors}"));
        self
    }
    /// The domain Dom0 pairs this one with (the event ping-pong's echo).
    pub fn peer(mut self, peer: &str) -> Self {
        self.peer = Some(peer.into());
        self
    }
    pub fn toml(&self) -> String {
        let mut t = format!(
            "# Written by cargo xtask bench.\nname = \"{}\"\nkernel = \"{}\"\nmemory = \"{}\"\ncmdline = \"{}\"\nkind = \"{}\"\n",
            self.name, self.kernel, self.memory, self.cmdline, self.kind
        );
        if let Some(d) = &self.disk {
            t.push_str(&format!("disks = [\"{d}\"]\n"));
        }
        if let Some(p) = &self.peer {
            t.push_str(&format!("peer = \"{p}\"\n"));
        }
        t
    }
    /// Writes the configuration as `<file>` in `dir`.
    pub fn write(&self, dir: &std::path::Path, file: &str) -> Result<()> {
        std::fs::write(dir.join(file), self.toml()).with_context(|| format!("writing {file}"))
    }
}

/// The other side of the event ping-pong benchmark, for a measuring guest
/// named `peer`: the PV guest, or (`hybrid`) the HVM image as a PVHVM guest.
fn echo_config(name: &str, peer: &str, hybrid: bool) -> GuestConfig {
    let c = if hybrid { GuestConfig::hybrid(name, "echo settle=0") } else { GuestConfig::pv(name, "echo") };
    c.peer(peer)
}

/// The size microhv printed for its own image (`memory: image a..b (N KiB`).
pub fn image_kib(serial: &str) -> Option<u64> {
    let l = serial.lines().find(|l| l.contains("memory: image "))?;
    let after = &l[l.find(" (")? + 2..];
    after.split_ascii_whitespace().next()?.parse().ok()
}

/// The scheduler benchmark with `k` runnable domains: the benchmark guest
/// and `k - 1` spinners that Dom0 spawns (`spawn spin.toml <k-1>`).
pub fn run_switch_qemu(images: &crate::Images, k: u32, quick: bool, accel: crate::Accel) -> Result<(Vec<Bench>, Option<u64>)> {
    GuestConfig::pv("bench", &format!("bench switch-k={k}{}", if quick { " quick" } else { "" })).write(&images.dir, "bench-switch.toml")?;
    GuestConfig::pv("spin", "spin-ms=1500").memory("2M").write(&images.dir, "spin.toml")?;
    let mut run = crate::QemuRun::new(images);
    run.modules = vec!["dom0.elf name=dom0 toolstack mem=32M".into(), "domu.elf".into(), "bench-switch.toml".into(), "spin.toml manual".into()];
    // TCG: -icount, exact instruction counts. KVM (hardware
    // virtualization): real time, i.e. cycle-level figures.
    run.accel = accel;
    run.icount = accel == crate::Accel::Tcg;
    run.memory_mib = 512;
    run.timeout = std::time::Duration::from_secs(600);
    if k > 1 {
        let mut input = vec![b'\r'; 24];
        input.extend_from_slice(format!("spawn spin.toml {}\r", k - 1).as_bytes());
        run.input = Some(input);
    }
    let r = run.run()?;
    if r.outcome != crate::Outcome::Success {
        bail!("the scheduler benchmark with {k} domains did not end cleanly ({}):\n{}", r.outcome.describe(), r.serial);
    }
    if k > 1 && !r.serial.contains(&format!("spawn: created {} of {} domains", k - 1, k - 1)) {
        bail!("Dom0 could not spawn {} spinners:\n{}", k - 1, r.serial);
    }
    Ok((parse(&r.serial, "PV", qemu_where(accel))?, state_per_domain(&r.serial)))
}

/// The `where` label of QEMU results.
fn qemu_where(accel: crate::Accel) -> &'static str {
    if accel == crate::Accel::Kvm { "QEMU KVM" } else { "QEMU TCG" }
}

/// Reads Dom0's `spawn: ... N bytes of hypervisor state per domain`.
pub fn state_per_domain(serial: &str) -> Option<u64> {
    let l = serial.lines().find(|l| l.contains("bytes of hypervisor state per domain"))?;
    let head = &l[..l.find(" bytes of hypervisor state")?];
    head.rsplit(' ').next()?.parse().ok()
}

/// Boots Dom0 + the benchmark guest (PV) under QEMU TCG with `-icount`.
pub fn run_pv_qemu(images: &crate::Images, quick: bool, accel: crate::Accel) -> Result<(Report, String)> {
    GuestConfig::pv("bench", if quick { "bench quick" } else { "bench" }).disk(2048, 16384).peer("bench-echo").write(&images.dir, "bench.toml")?;
    echo_config("bench-echo", "bench", false).write(&images.dir, "bench-echo.toml")?;
    let disk = crate::project_root().join("target").join("bench").join("disk.img");
    crate::ensure_disk(&disk, true)?;
    let mut run = crate::QemuRun::new(images);
    run.modules = vec!["dom0.elf name=dom0 toolstack mem=32M".into(), "domu.elf".into(), "bench.toml".into(), "bench-echo.toml".into()];
    // TCG: -icount, exact instruction counts. KVM (hardware
    // virtualization): real time, i.e. cycle-level figures.
    run.accel = accel;
    run.icount = accel == crate::Accel::Tcg;
    run.cmdline = "microhv.baseline".into();
    run.disk = Some(disk);
    run.timeout = std::time::Duration::from_secs(600);
    let r = run.run()?;
    if r.outcome != crate::Outcome::Success {
        bail!("the benchmark run did not end cleanly ({}):\n{}", r.outcome.describe(), r.serial);
    }
    let benches = parse(&r.serial, "PV", qemu_where(accel))?;
    let report = Report {
        schema: SCHEMA,
        commit: commit(),
        emulator: if accel == crate::Accel::Kvm { "QEMU with KVM (hardware virtualization; real time)".into() } else { "QEMU TCG, -icount shift=0 (deterministic)".into() },
        cpu_model: "qemu64".into(),
        unit: if accel == crate::Accel::Kvm { format!("nanoseconds of real time under QEMU KVM; {UNIT}") } else { UNIT.into() },
        quick,
        hypervisor_image_kib: image_kib(&r.serial),
        hv_bytes_per_domain: None,
        baseline: parse_baseline(&r.serial),
        benches,
    };
    Ok((report, r.serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\
[bench] bench: PV benchmarks, 3 samples each
[bench] BENCH-SAMPLES null_hypercall 300,100,200
[bench] BENCH-EVENTS null_hypercall ops=3 hypercalls=3 entries=3 exceptions=0 upcalls=0 interrupts=0 cr3_loads=6 switches=0 hv_ns=450 pt_updates=0
[bench] BENCH-SAMPLES page_fault 1000,1100
[bench] BENCH-SAMPLES page_fault 900
[bench] BENCH-EVENTS page_fault ops=3 hypercalls=3 entries=6 exceptions=3 upcalls=0 interrupts=0 cr3_loads=12 switches=0 hv_ns=1200 pt_updates=0
[bench] BENCH-DONE 2
";

    fn report() -> Report {
        Report {
            schema: SCHEMA,
            commit: "abc".into(),
            emulator: "QEMU TCG -icount shift=0".into(),
            cpu_model: "qemu64".into(),
            unit: "instructions".into(),
            quick: true,
            hypervisor_image_kib: Some(300),
            hv_bytes_per_domain: state_per_domain("[dom0] spawn: microhv's heap grew by 40 KiB: 650 bytes of hypervisor state per domain"),
            baseline: parse_baseline("microhv: baseline: int_round_trip=500.0 cr3_reload=1.0 time_read=20.5 (ring 0)"),
            benches: parse(OUT, "PV", "QEMU").unwrap(),
        }
    }

    #[test]
    fn parse_domain_keeps_one_guests_lines() {
        let out = "[a] BENCH-SAMPLES x 1\n[b] BENCH-SAMPLES x 5,6\n(a) BENCH-EVENTS x ops=1 hypercalls=1\n[b] BENCH-EVENTS x ops=2 hypercalls=0\n[a] BENCH-DONE 1\n[b] BENCH-DONE 1\n";
        let a = parse_domain(out, "a", "HVM", "Bochs").unwrap();
        assert_eq!((a.len(), a[0].samples.clone(), a[0].flavour.as_str()), (1, vec![1], "HVM"));
        let b = parse_domain(out, "b", "PV", "Bochs").unwrap();
        assert_eq!(b[0].samples, vec![5, 6]);
        assert!(parse_domain(out, "c", "PV", "Bochs").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        let s = stats(&v).unwrap();
        assert_eq!((s.min, s.p5, s.median, s.p95, s.p99, s.max), (1, 5, 50, 95, 99, 100));
        assert_eq!(stats(&[7]).unwrap().p99, 7);
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn parse_collects_samples_and_events_across_lines() {
        let b = parse(OUT, "PV", "QEMU").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].samples, vec![300, 100, 200]);
        assert_eq!(b[0].stats.unwrap().median, 200);
        assert_eq!(b[1].samples, vec![1000, 1100, 900]);
        assert_eq!(b[1].per_op("exceptions"), Some(1.0));
        assert_eq!(b[0].per_op("hv_ns"), Some(150.0));
        assert!(parse("BENCH-SAMPLES x 1,2\n", "PV", "QEMU").is_err(), "a run without BENCH-DONE is an error");
        assert!(parse("BENCH-SAMPLES x 1,zz\nBENCH-DONE 1\n", "PV", "QEMU").is_err());
        assert!(parse("BENCH-SAMPLES x 1,2\nBENCH-EVENTS x ops=3\nBENCH-DONE 1\n", "PV", "QEMU").is_err(), "a lost sample is an error");
    }

    #[test]
    fn results_json_has_the_documented_schema() {
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&report()).unwrap()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        for k in ["commit", "emulator", "cpu_model", "unit", "quick", "benches"] {
            assert!(!v[k].is_null(), "missing {k}");
        }
        let b = &v["benches"][0];
        for k in ["name", "flavour", "where", "samples", "stats", "ops", "events"] {
            assert!(!b[k].is_null(), "missing benches[0].{k}");
        }
        assert_eq!(b["stats"]["median"], 200);
        assert_eq!(b["events"]["hypercalls"], 3);
    }

    #[test]
    fn benchmark_configurations_are_ones_dom0_accepts() {
        let pv = GuestConfig::pv("bench", "bench quick").disk(2048, 16384).peer("bench-echo").toml();
        let c = dom0_core::config::parse("bench.toml", &pv).unwrap_or_else(|e| panic!("{e}\n{pv}"));
        assert_eq!((c.name.as_str(), c.kernel.as_str(), c.cmdline.as_str()), ("bench", "domu.elf", "bench quick"));
        assert_eq!((c.memory_pages, c.kind, c.peer.as_deref()), (2048, dom0_core::config::Kind::Pv, Some("bench-echo")));
        assert_eq!((c.disks.len(), c.disks[0].start_sector, c.disks[0].sectors), (1, 2048, 16384));
        let echo = echo_config("bench-pvhvm-echo", "bench-pvhvm", true).toml();
        let c = dom0_core::config::parse("echo.toml", &echo).unwrap_or_else(|e| panic!("{e}\n{echo}"));
        assert_eq!((c.kernel.as_str(), c.cmdline.as_str(), c.kind), ("domu-hvm.elf", "name=bench-pvhvm-echo pvhvm echo settle=0", dom0_core::config::Kind::Auto));
        assert!(c.disks.is_empty());
        let spin = dom0_core::config::parse("spin.toml", &GuestConfig::pv("spin", "spin-ms=1500").memory("2M").toml()).expect("spin");
        assert_eq!((spin.memory_pages, spin.peer), (512, None));
    }

    #[test]
    fn the_chart_is_well_formed_svg() {
        let svg = chart_svg(&report());
        let doc = roxmltree::Document::parse(&svg).expect("valid XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("rect")).count(), 2);
    }

    #[test]
    fn report_lists_targets_and_timestamps_are_utc() {
        let md = report_md(&report());
        assert!(md.contains("| null PV hypercall: microhv instructions per round trip | 150 instructions | 150 instructions | yes |"), "{md}");
        assert_eq!(timestamp(0), "19700101-000000");
        assert!(md.contains("| hypervisor state per domain (microhv's heap, from the 64-domain run) | 650 bytes | 16384 bytes | yes |"), "{md}");
        assert!(md.contains("| int_round_trip | 500.0 |"), "{md}");
        assert!(md.contains("| null PV hypercall as a multiple of the ring-0 interrupt round trip (the native floor) | 0.40 x | 2 x | yes |"), "{md}");
        assert_eq!(timestamp(1_796_202_061), "20261202-090101");
    }
}
