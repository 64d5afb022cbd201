//! Dom0, the privileged domain. It drives the real UART (COM1, which microhv
//! opens for it in the I/O bitmap), runs the console backend and the store
//! for every DomU, pairs the demo DomUs through the store, lists the domains
//! with the privileged `domctl_list`, and ends when every DomU has ended.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("dom0 is a guest kernel: build and boot it with `cargo xtask qemu`.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod uart {
    //! COM1, polled. microhv has already programmed it (8N1, FIFO).
    use core::sync::atomic::{AtomicBool, Ordering};

    const COM1: u16 = 0x3f8;
    const LSR: u16 = COM1 + 5;
    static AT_LINE_START: AtomicBool = AtomicBool::new(true);

    fn outb(port: u16, v: u8) {
        // SAFETY: microhv grants Dom0 exactly the COM1 ports in the TSS I/O
        // bitmap; writing them only emits serial output.
        // SAFETY: as above.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack, nomem))
        };
    }

    fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: as in outb; reading the line status register has no side effects.
        unsafe {
            core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem))
        };
        v
    }

    pub fn put(b: u8) {
        while inb(LSR) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }

    /// A byte typed on the serial line, if one is waiting.
    pub fn get() -> Option<u8> {
        (inb(LSR) & 1 != 0).then(|| inb(COM1))
    }

    /// Writes one complete line with a `[name] ` prefix.
    pub fn line(name: &str, text: &[u8]) {
        put(b'[');
        name.bytes().for_each(put);
        put(b']');
        put(b' ');
        for &c in text {
            put(if c < 0x20 && c != b'\t' { b'?' } else { c });
        }
        put(b'\r');
        put(b'\n');
    }

    /// Dom0's own console output: straight to the UART, `[dom0] ` per line.
    pub fn dom0_sink(bytes: &[u8]) {
        for &c in bytes {
            if AT_LINE_START.swap(false, Ordering::Relaxed) {
                b"[dom0] ".iter().copied().for_each(put);
            }
            if c == b'\n' {
                put(b'\r');
                AT_LINE_START.store(true, Ordering::Relaxed);
            }
            put(c);
        }
    }
}

#[cfg(target_os = "none")]
mod toolstack;
#[cfg(target_os = "none")]
mod blk;

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;
    use crate::uart;
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use dom0_core::input::{Action, InputRouter};
    use dom0_core::store::{Perm, Store};
    use dom0_core::{domain_line, state_name};
    use microhv_guest::hypercall as hc;
    use microhv_guest::mm::{self, SharedPage};
    use microhv_guest::shared_abi::hypercall::*;
    use microhv_guest::shared_abi::store::{
        decode_payload, encode_frame, Envelope, FrameDecoder, Request, Response,
    };
    use microhv_guest::shared_abi::{console, store::domain_path};
    use microhv_guest::{entry, println, time, DomId, Errno, GuestVa, StartInfo};

    entry!(main);

    const SLOTS: usize = 64;
    const SCRATCH_SLOTS: u64 = 32;

    static DEBUG_CONSOLE_EVENTS: core::sync::atomic::AtomicU64 =
        core::sync::atomic::AtomicU64::new(0);

    fn on_virq_console(_port: u32) {
        DEBUG_CONSOLE_EVENTS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }

    /// Dom0's end of one DomU's console and store.
    struct Backend {
        id: u16,
        name: String,
        console_va: u64,
        store_va: u64,
        console_port: u32,
        store_port: u32,
        grefs: (u64, u64),
        line: Vec<u8>,
        decoder: FrameDecoder,
        lines: u64,
        requests: u64,
        connected: bool,
    }

    fn list(out: &mut [DomainInfo]) -> usize {
        // SAFETY: `out` is valid for out.len() records.
        match unsafe { hc::domctl_list(GuestVa(out.as_mut_ptr() as u64), out.len() as u64) } {
            Ok(n) => (n as usize).min(out.len()),
            Err(e) => {
                println!("domctl_list failed: {e}");
                0
            }
        }
    }

    fn name_of(d: &DomainInfo) -> String {
        let end = d.name.iter().position(|&b| b == 0).unwrap_or(d.name.len());
        String::from_utf8_lossy(&d.name[..end]).into()
    }

    /// Maps a DomU's console and store pages and binds their ports.
    fn connect(d: &DomainInfo, slots: &mut Vec<u64>) -> Result<Backend, Errno> {
        let mut ch = DomainChannels::default();
        let id = DomId(d.domid);
        // SAFETY: (calls below) pointers are live locals; VAs are our own free slots.
        unsafe { hc::domctl_channels(id, GuestVa(&mut ch as *mut _ as u64)) }?;
        let (cva, sva) = match (slots.pop(), slots.pop()) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(Errno::ENOSPC),
        };
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        unsafe { hc::grant_map(id, ch.console_gref as u64, GuestVa(cva), 1) }?;
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        unsafe { hc::grant_map(id, ch.store_gref as u64, GuestVa(sva), 1) }?;
        // SAFETY: no pointer arguments.
        let cp = unsafe { hc::evtchn_bind_interdomain(id, ch.console_port as u64) }? as u32;
        // SAFETY: no pointer arguments.
        let sp = unsafe { hc::evtchn_bind_interdomain(id, ch.store_port as u64) }? as u32;
        microhv_guest::events::unmask_port(cp);
        microhv_guest::events::unmask_port(sp);
        Ok(Backend {
            id: d.domid,
            name: name_of(d),
            console_va: cva,
            store_va: sva,
            console_port: cp,
            store_port: sp,
            grefs: (ch.console_gref as u64, ch.store_gref as u64),
            line: Vec::new(),
            decoder: FrameDecoder::new(),
            lines: 0,
            requests: 0,
            connected: true,
        })
    }

    fn disconnect(b: &mut Backend, slots: &mut Vec<u64>, why: &str) {
        if !b.connected {
            return;
        }
        b.connected = false;
        if !b.line.is_empty() {
            uart::line(&b.name, &b.line);
            b.line.clear();
        }
        // SAFETY: (calls below) our own mappings and ports.
        unsafe {
            let _ = hc::grant_unmap(DomId(b.id), b.grefs.0, GuestVa(b.console_va));
            let _ = hc::grant_unmap(DomId(b.id), b.grefs.1, GuestVa(b.store_va));
            let _ = hc::evtchn_close(b.console_port as u64);
            let _ = hc::evtchn_close(b.store_port as u64);
        }
        slots.push(b.console_va);
        slots.push(b.store_va);
        println!(
            "console backend: {} disconnected ({why}): {} lines, {} store requests",
            b.name, b.lines, b.requests
        );
    }

    /// Prints every complete line the DomU wrote. Returns false on a bad ring.
    fn drain_console(b: &mut Backend) -> bool {
        let mut page = SharedPage(b.console_va as *mut u8);
        let mut buf = [0u8; 256];
        loop {
            match console::read_out(&mut page, &mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    for &c in &buf[..n] {
                        if c == b'\n' || b.line.len() >= 200 {
                            uart::line(&b.name, &b.line);
                            b.lines += 1;
                            b.line.clear();
                            if c == b'\n' {
                                continue;
                            }
                        }
                        if c != b'\r' {
                            b.line.push(c);
                        }
                    }
                }
                Err(e) => {
                    println!("console backend: {}: {e}; ignoring its console", b.name);
                    return false;
                }
            }
        }
    }

    fn send_frame(b: &Backend, req_id: u32, body: Response) {
        let Ok(frame) = encode_frame(&Envelope { req_id, body }) else {
            return;
        };
        let mut page = SharedPage(b.store_va as *mut u8);
        let mut rest = &frame[..];
        let mut tries = 0;
        while !rest.is_empty() && tries < 1000 {
            let n = console::write_in(&mut page, rest);
            rest = &rest[n..];
            if n == 0 {
                tries += 1;
                // SAFETY: no pointers.
                let _ = unsafe { hc::evtchn_send(b.store_port as u64) };
                // SAFETY: no pointer arguments.
                let _ = unsafe { hc::sched_yield() };
            }
        }
        // SAFETY: no pointers.
        let _ = unsafe { hc::evtchn_send(b.store_port as u64) };
    }

    /// Serves the DomU's store requests. Returns false on a bad ring or stream.
    fn serve_store(b: &mut Backend, store: &mut Store) -> bool {
        let mut page = SharedPage(b.store_va as *mut u8);
        let mut buf = [0u8; 512];
        loop {
            let n = match console::read_out(&mut page, &mut buf) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) => {
                    println!("store: {}: {e}; dropping its store connection", b.name);
                    return false;
                }
            };
            let frames = match b.decoder.push(&buf[..n]) {
                Ok(f) => f,
                Err(e) => {
                    println!(
                        "store: {}: bad frame ({e}); dropping its store connection",
                        b.name
                    );
                    return false;
                }
            };
            for f in frames {
                b.requests += 1;
                let resp = match decode_payload::<Envelope<Request>>(&f) {
                    Ok(req) => (req.req_id, store.handle(b.id, req.body)),
                    Err(e) => (0, Response::Error(e.0)),
                };
                send_frame(b, resp.0, resp.1);
            }
        }
    }

    fn stats() -> Option<HvStats> {
        let mut st = HvStats::default();
        // SAFETY: `st` is valid for writing.
        match unsafe { hc::domctl_stats(GuestVa(&mut st as *mut _ as u64)) } {
            Ok(_) => Some(st),
            Err(e) => {
                println!("domctl_stats failed: {e}");
                None
            }
        }
    }

    fn fmt_stats(st: &HvStats) -> String {
        format!(
            "{} free frames, {} domains alive, {} event-channel ports, {} grants, {} foreign mappings, {} orphaned frames",
            st.free_frames, st.domains_alive, st.evtchn_ports, st.grants, st.foreign_mappings, st.orphan_frames
        )
    }

    /// Creates and destroys a DomU `count` times, then checks that every
    /// counter came back to where it started.
    /// `<verb> <file.toml> <count>`: the configuration module and the count.
    fn module_and_count<'a>(
        cmd: &str,
        modules: &'a [crate::toolstack::Module],
    ) -> Result<(&'a crate::toolstack::Module, u32), String> {
        let mut words = cmd.split_ascii_whitespace();
        let verb = words.next().unwrap_or("");
        let file = words.next().unwrap_or("");
        let count: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        match (modules.iter().find(|m| m.file == file), count) {
            (None, _) => Err(format!("{verb}: no configuration module named '{file}'")),
            (_, 0) => Err(format!("{verb}: usage: {verb} <file.toml> <count>")),
            (Some(m), count) => Ok((m, count)),
        }
    }

    fn stress(
        m: &crate::toolstack::Module,
        modules: &[crate::toolstack::Module],
        scratch: &[u64],
        count: u32,
    ) {
        let Some(before) = stats() else { return };
        println!("stress: before: {}", fmt_stats(&before));
        let mut ok = 0;
        crate::toolstack::QUIET.store(true, core::sync::atomic::Ordering::Relaxed);
        for i in 0..count {
            match crate::toolstack::create(m, modules, scratch) {
                Ok(id) => {
                    // SAFETY: no pointers.
                    if let Err(e) = unsafe { hc::domctl_destroy(id) } {
                        println!("stress: round {i}: destroy failed: {e}");
                        break;
                    }
                    ok += 1;
                }
                Err(e) => {
                    println!("stress: round {i}: {e}");
                    break;
                }
            }
        }
        crate::toolstack::QUIET.store(false, core::sync::atomic::Ordering::Relaxed);
        let Some(after) = stats() else { return };
        println!(
            "stress: after {ok} of {count} create/destroy rounds: {}",
            fmt_stats(&after)
        );
        // The heap is left out: microhv keeps each ended domain's record
        // (name, how it ended, counters) for the closing summary.
        if (HvStats { heap_used_kib: 0, ..after }) == (HvStats { heap_used_kib: 0, ..before }) {
            println!("stress: all counters are back to their starting values");
        } else {
            println!("stress: LEAK: counters differ from their starting values");
        }
    }

    fn main(si: &'static StartInfo) -> ! {
        microhv_guest::console::set_sink(uart::dom0_sink);
        // Virtual slots kept free: backends' pages, boot modules, builder scratch.
        let module_pages = crate::toolstack::module_pages();
        let heap = microhv_guest::init_heap(si, SLOTS as u64 + module_pages + SCRATCH_SLOTS + crate::blk::SLOTS);
        println!(
            "{} up: domid {}, {} pages ({} KiB), heap {} KiB, privileged: {}; driving COM1",
            si.name(),
            si.domid,
            si.nr_pages,
            si.nr_pages * 4,
            heap / 1024,
            if si.privileged() { "yes" } else { "no" }
        );
        let mut slots: Vec<u64> = mm::free_slots::<SLOTS>()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let mut module_slots = mm::free_slots_vec(module_pages, SLOTS as u64).unwrap_or_default();
        let scratch =
            mm::free_slots_vec(SCRATCH_SLOTS, SLOTS as u64 + module_pages).unwrap_or_default();
        let blk_slots = mm::free_slots_vec(crate::blk::SLOTS, SLOTS as u64 + module_pages + SCRATCH_SLOTS)
            .unwrap_or_default();
        // The real devices: PCI, and the disk behind the virtual disks.
        let mut block = crate::blk::probe(&blk_slots);
        if let Some(b) = block.as_mut() {
            b.add_ring_slots(slots.split_off(slots.len().saturating_sub(8)));
        }
        // The toolstack: create the DomUs described by configuration modules.
        let modules = crate::toolstack::map_modules(&mut module_slots);
        // Configurations marked `manual` on their module line wait for `create`.
        for m in modules.iter().filter(|m| {
            m.file.ends_with(".toml") && !m.name.split_ascii_whitespace().any(|w| w == "manual")
        }) {
            if let Err(e) = crate::toolstack::create(m, &modules, &scratch) {
                println!("toolstack: {e}");
            }
        }
        let mut info = alloc::vec![DomainInfo::default(); 1024];
        let n = list(&mut info);
        println!("privileged domctl_list succeeded: {n} domains");
        for d in &info[..n] {
            println!("  {}", domain_line(d).as_str());
        }

        // The store, and a backend for every DomU.
        let mut store = Store::new();
        let mut backends: Vec<Backend> = Vec::new();
        let domus: Vec<DomainInfo> = info[..n]
            .iter()
            .filter(|d| d.domid != si.domid)
            .copied()
            .collect();
        for d in &domus {
            store.introduce_domain(d.domid, &name_of(d));
            if let Some(b) = block.as_mut() {
                b.attach(&mut store, d.domid, &name_of(d), &crate::toolstack::disks_of(&name_of(d), &modules));
            }
            match connect(d, &mut slots) {
                Ok(b) => backends.push(b),
                Err(e) => println!("console backend: cannot connect to {}: {e}", name_of(d)),
            }
        }
        // Pair the DomUs whose configurations name each other (`peer`)
        // through the store: each learns its peer's id and may read the
        // peer's pingpong/ (the demo's ping-pong, the event benchmark).
        let mut paired: Vec<u16> = Vec::new();
        for d in &domus {
            let Some(peer) = crate::toolstack::peer_of(&name_of(d), &modules) else { continue };
            let Some(e) = domus.iter().find(|e| name_of(e) == peer && e.domid != d.domid) else {
                println!("store: {}'s peer '{peer}' is not running; not paired", name_of(d));
                continue;
            };
            if paired.contains(&d.domid) || paired.contains(&e.domid) {
                continue;
            }
            paired.extend([d.domid, e.domid]);
            for (me, other) in [(d.domid, e.domid), (e.domid, d.domid)] {
                let home = domain_path(DomId(me));
                let _ = store.write(0, &format!("{home}/peer"), format!("{other}").as_bytes());
                let _ = store.mkdir(0, &format!("{home}/pingpong"));
                let _ = store.set_perm(0, &format!("{home}/pingpong"), other, Perm::Read);
            }
            println!("store: paired {} and {} (peer in {}'s configuration)", name_of(d), name_of(e), name_of(d));
        }
        println!("console backend and store serving {} DomUs", backends.len());
        let interactive = si
            .cmdline()
            .split_ascii_whitespace()
            .any(|w| w == "interactive");
        let mut router = InputRouter::new();
        for b in &backends {
            router.add_domu(b.id, &b.name);
        }
        println!(
            "serial input goes to dom0 (type help for commands); Ctrl-] switches it to the next DomU{}",
            if interactive { "; interactive: dom0 stays up until `quit`" } else { "" }
        );
        let mut quit = false;
        // Learn when a DomU falls back to microhv's debug console.
        let virq_console = microhv_guest::events::bind_virq(VIRQ_CONSOLE, on_virq_console);
        if let Err(e) = virq_console {
            println!("bind VIRQ_CONSOLE failed: {e}");
        }

        // Serve until every DomU has ended and its console is drained.
        let start = time::now_ns();
        let mut next_check = 0;
        loop {
            if let Some(b) = block.as_mut() {
                b.poll(&mut store);
            }
            for b in backends.iter_mut().filter(|b| b.connected) {
                let console_ok = drain_console(b);
                let store_ok = serve_store(b, &mut store);
                if !console_ok || !store_ok {
                    disconnect(b, &mut slots, "protocol error");
                }
            }
            for ev in store.take_events() {
                if let Some(b) = backends.iter().find(|b| b.id == ev.to && b.connected) {
                    let r = ev.response();
                    send_frame(b, 0, r);
                }
            }
            // Serial input: to our command line or to the chosen DomU's console.
            let mut typed = [0u8; 64];
            let mut k = 0;
            while k < typed.len() {
                match uart::get() {
                    Some(c) => {
                        typed[k] = c;
                        k += 1;
                    }
                    None => break,
                }
            }
            // One byte at a time: a command (e.g. `console`) changes where the
            // bytes after it go.
            for &c in &typed[..k] {
                for action in router.feed(&[c]) {
                    match action {
                        Action::Dom0Line(l) => {
                            println!("input: {l}");
                            match l.trim() {
                                "help" => {
                                    println!("commands:");
                                    println!("  list                 domains with their state, memory and CPU time");
                                    println!("  create <file.toml>   create a DomU from a configuration module");
                                    println!("  destroy <name>       end a DomU and give back all it held");
                                    println!("  pause <name>, unpause <name>");
                                    println!("  console <name>       send the serial input to that DomU (Ctrl-] comes back)");
                                    println!("  stats                memory, event channels, grants and mappings in use");
                                    println!("  stress <file> <n>    create and destroy a DomU n times, then compare stats");
                                    println!("  spawn <file> <n>     create n DomUs named <name>1..<name>n (for load tests)");
                                    println!("  quit                 end dom0 (microhv powers off when all domains ended)");
                                }
                                "stats" => {
                                    if let Some(st) = stats() {
                                        println!("stats: {}", fmt_stats(&st));
                                    }
                                }
                                cmd if cmd.starts_with("create ") => {
                                    let file = cmd[7..].trim();
                                    match modules.iter().find(|m| m.file == file) {
                                        None => println!(
                                            "create: no configuration module named '{file}'"
                                        ),
                                        Some(m) => {
                                            match crate::toolstack::create(m, &modules, &scratch) {
                                                Err(e) => println!("create: {e}"),
                                                Ok(id) => {
                                                    let n = list(&mut info);
                                                    if let Some(d) =
                                                        info[..n].iter().find(|d| d.domid == id.0)
                                                    {
                                                        store
                                                            .introduce_domain(d.domid, &name_of(d));
                                                        if let Some(b) = block.as_mut() {
                                                            b.attach(&mut store, d.domid, &name_of(d), &crate::toolstack::disks_of(&name_of(d), &modules));
                                                        }
                                                        match connect(d, &mut slots) {
                                                    Ok(b) => {
                                                        router.add_domu(b.id, &b.name);
                                                        backends.push(b);
                                                    }
                                                    Err(e) => println!("console backend: cannot connect to {}: {e}", name_of(d)),
                                                }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                                cmd if cmd.starts_with("console ") => {
                                    let target = cmd[8..].trim();
                                    match backends.iter().find(|b| b.name == target && b.connected)
                                    {
                                        None => {
                                            println!("console: no running DomU named '{target}'")
                                        }
                                        Some(b) => {
                                            if let Some(Action::Switched(Some((_, name)))) =
                                                router.switch_to(Some(b.id))
                                            {
                                                println!("serial input now goes to {name} (Ctrl-] switches)");
                                            }
                                        }
                                    }
                                }
                                cmd if cmd.starts_with("spawn ") || cmd.starts_with("stress ") => {
                                    match module_and_count(cmd, &modules) {
                                        Err(e) => println!("{e}"),
                                        Ok((m, count)) if cmd.starts_with("spawn ") => {
                                            let before = stats();
                                            let n = crate::toolstack::spawn(m, &modules, &scratch, count);
                                            println!("spawn: created {n} of {count} domains from {} (no console or store backends)", m.file);
                                            if let (Some(b), Some(a), true) = (before, stats(), n > 0) {
                                                let grew = u64::from(a.heap_used_kib.saturating_sub(b.heap_used_kib));
                                                println!("spawn: microhv's heap grew by {grew} KiB: {} bytes of hypervisor state per domain", grew * 1024 / u64::from(n));
                                            }
                                        }
                                        Ok((m, count)) => stress(m, &modules, &scratch, count),
                                    }
                                }
                                "list" => {
                                    let n = list(&mut info);
                                    for d in &info[..n] {
                                        println!("  {}", domain_line(d).as_str());
                                    }
                                }
                                "quit" => {
                                    // Like a host shutdown: the remaining DomUs end first.
                                    let n = list(&mut info);
                                    for d in info[..n]
                                        .iter()
                                        .filter(|d| d.domid != si.domid && d.state != DOMSTATE_DEAD)
                                    {
                                        // SAFETY: no pointers.
                                        let r = unsafe { hc::domctl_destroy(DomId(d.domid)) };
                                        println!(
                                            "quit: destroying {}: {}",
                                            name_of(d),
                                            if r.is_ok() { "done" } else { "failed" }
                                        );
                                    }
                                    quit = true;
                                }
                                cmd if cmd.starts_with("pause ")
                                    || cmd.starts_with("unpause ")
                                    || cmd.starts_with("destroy ") =>
                                {
                                    let (verb, target) = cmd.split_once(' ').unwrap_or((cmd, ""));
                                    let n = list(&mut info);
                                    match info[..n].iter().find(|d| {
                                        d.state != DOMSTATE_DEAD && name_of(d) == target.trim()
                                    }) {
                                        None => {
                                            println!("{verb}: no domain named '{}'", target.trim())
                                        }
                                        Some(d) => {
                                            let id = DomId(d.domid);
                                            // SAFETY: no pointers.
                                            let r = unsafe {
                                                match verb {
                                                    "pause" => hc::domctl_pause(id),
                                                    "unpause" => hc::domctl_unpause(id),
                                                    _ => hc::domctl_destroy(id),
                                                }
                                            };
                                            match r {
                                                Ok(_) => println!("{verb} {}: done", target.trim()),
                                                Err(e) => println!("{verb} {}: {e}", target.trim()),
                                            }
                                        }
                                    }
                                }
                                other => println!("unknown command '{other}' (try help)"),
                            }
                        }
                        Action::ToDomU(id, bytes) => {
                            if let Some(b) = backends.iter().find(|b| b.id == id && b.connected) {
                                let mut page = SharedPage(b.console_va as *mut u8);
                                let _ = console::write_in(&mut page, &bytes);
                                // SAFETY: no pointers.
                                let _ = unsafe { hc::evtchn_send(b.console_port as u64) };
                            }
                        }
                        Action::Switched(t) => match t {
                            Some((_, name)) => {
                                println!("serial input now goes to {name} (Ctrl-] switches)")
                            }
                            None => println!("serial input now goes to dom0 (Ctrl-] switches)"),
                        },
                    }
                }
            }
            let now = time::now_ns();
            if now >= next_check {
                next_check = now + 20_000_000;
                let n = list(&mut info);
                for d in &info[..n] {
                    if d.state == DOMSTATE_DEAD {
                        if let Some(b) =
                            backends.iter_mut().find(|b| b.id == d.domid && b.connected)
                        {
                            drain_console(b);
                            if let Some(blk) = block.as_mut() {
                                blk.domain_ended(d.domid);
                            }
                            disconnect(b, &mut slots, "domain ended");
                            store.release_domain(d.domid);
                            if let Some(Action::Switched(None)) = router.remove_domu(d.domid) {
                                println!("serial input now goes to dom0 ({} ended)", name_of(d));
                            }
                        }
                    }
                }
                let alive = info[..n]
                    .iter()
                    .filter(|d| d.domid != si.domid && d.state != DOMSTATE_DEAD)
                    .count();
                let done = if interactive {
                    quit
                } else {
                    alive == 0 || quit
                };
                if done || (!interactive && now - start > 60_000_000_000) {
                    let n_dbg = DEBUG_CONSOLE_EVENTS.load(core::sync::atomic::Ordering::Relaxed);
                    if n_dbg > 0 {
                        println!(
                            "VIRQ_CONSOLE: DomUs wrote to microhv's debug console {n_dbg} times"
                        );
                    }
                    if let Some(b) = block.as_ref() {
                        println!("{}", b.summary());
                    }
                    println!("all DomUs have ended:");
                    let domus: Vec<&DomainInfo> =
                        info[..n].iter().filter(|d| d.domid != si.domid).collect();
                    for d in domus.iter().rev().take(16).rev() {
                        println!("  {} ({})", domain_line(d).as_str(), state_name(d.state));
                    }
                    if domus.len() > 16 {
                        println!("  ... and {} more", domus.len() - 16);
                    }
                    break;
                }
            }
            // SAFETY: no pointers; wakes on any event or after 5 ms.
            let _ = unsafe { hc::sched_poll(time::now_ns() + 5_000_000) };
        }
        microhv_guest::shutdown(SHUTDOWN_POWEROFF)
    }
}
