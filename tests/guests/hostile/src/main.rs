//! A hostile PV guest for the isolation tests. Each domain runs one attack,
//! named by `attack=` on its command line, and prints one `check` line per
//! attempt and a final `ATTACK <name>: ...` line. Attacks that end in a fault
//! the guest does not handle are ended by microhv with a logged reason; the
//! system test checks that line in the hypervisor log instead.
// The attacks pass bad pointers and run faulting instructions on purpose:
// microhv must cope. Each attack's comment says what it tries.
#![allow(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hostile-guest is a guest kernel for the system tests.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;
    use core::sync::atomic::{AtomicU64, Ordering};
    use microhv_guest::hypercall as hc;
    use microhv_guest::mm::{self, PTE_PRESENT, PTE_RW, PTE_USER};
    use microhv_guest::shared_abi::hypercall::*;
    use microhv_guest::shared_abi::HYPERVISOR_VA_START;
    use microhv_guest::traps::{self, ExceptionFrame};
    use microhv_guest::{entry, println, DomId, Errno, GuestVa, Mfn, StartInfo};

    entry!(main);

    static FAILURES: AtomicU64 = AtomicU64::new(0);
    static CHECKS: AtomicU64 = AtomicU64::new(0);

    fn check(what: &str, got: Result<u64, Errno>, want: Errno) {
        CHECKS.fetch_add(1, Ordering::SeqCst);
        let ok = got == Err(want);
        if !ok {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check {what}: got {got:?}, want {} -> {}", want.name(), if ok { "ok" } else { "FAIL" });
    }

    fn finish(name: &str) -> ! {
        let (n, f) = (CHECKS.load(Ordering::SeqCst), FAILURES.load(Ordering::SeqCst));
        if f == 0 {
            println!("ATTACK {name}: all {n} checks ok");
            microhv_guest::shutdown(SHUTDOWN_POWEROFF)
        } else {
            println!("ATTACK {name}: FAILED {f} of {n} checks");
            microhv_guest::shutdown(SHUTDOWN_CRASH)
        }
    }

    fn main(si: &'static StartInfo) -> ! {
        microhv_guest::init_heap(si, 4);
        let attack = microhv_guest::shared_abi::start_info::StartInfo::cmdline(si)
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix("attack="))
            .unwrap_or("none");
        println!("hostile guest starting attack '{attack}'");
        match attack {
            "read-hv" => {
                // Unregister our #PF handler first, so that microhv itself must
                // end the domain (the other fault attacks go through our handler).
                let none = [TrapInfo { vector: 14, _pad: [0; 7], handler: 0 }];
                // SAFETY: the table is valid for one entry.
                let _ = unsafe { hc::set_trap_table(GuestVa(none.as_ptr() as u64), 1) };
                // The hypervisor's image lives at 2 MiB physical; nothing maps it here.
                // SAFETY: deliberately unsound: this must fault and end the domain.
                let v = unsafe { core::ptr::read_volatile(0x20_0000 as *const u64) };
                println!("ATTACK read-hv: read {v:#x} from a hypervisor address: ISOLATION BROKEN");
            }
            "write-hv" => {
                // The entry area is mapped (read-only) at the top of every address space.
                // SAFETY: deliberately unsound: must fault.
                unsafe { core::ptr::write_volatile((HYPERVISOR_VA_START + 0x100) as *mut u8, 0x90) };
                println!("ATTACK write-hv: wrote to the hypervisor entry area: ISOLATION BROKEN");
            }
            "write-pt" => {
                // Page tables are mapped read-only: writing the L4 directly must fault.
                // SAFETY: deliberately unsound: must fault.
                unsafe { core::ptr::write_volatile(si.pt_base_va as *mut u64, 0) };
                println!("ATTACK write-pt: wrote to a page table: ISOLATION BROKEN");
            }
            "map-foreign" => map_foreign(si),
            "priv-insn" => priv_insn(),
            "ring3-hypercall" => ring3_hypercall(),
            "bad-pointers" => bad_pointers(si),
            "unknown-hypercall" => unknown_hypercall(),
            "balloon" => balloon(si),
            "evtchn" => evtchn(),
            "grant" => grant(si),
            "store-snoop" => store_snoop(),
            "console-garbage" => console_garbage(si),
            "store-garbage" => store_garbage(si),
            "sleeper" => loop {
                // Sleeps forever, in short naps, until Dom0 destroys it.
                microhv_guest::time::sleep_ns(5_000_000);
            },
            "blk" => blk(si),
            "grant-owner" => grant_owner(peer(si)),
            "grant-user" => grant_user(peer(si)),
            other => println!("unknown attack '{other}'"),
        }
        finish(attack)
    }

    /// Attacks Dom0's block backend through our own virtual disk: forged
    /// grants, sectors outside the disk, too many segments, a garbage-filled
    /// ring. Each must get an error response (the test checks the disk image
    /// for bytes changed outside our region), then a garbage index ends our
    /// connection, and Dom0 must go on serving the other DomU.
    fn blk(_si: &StartInfo) {
        use microhv_guest::blkfront::BlkFront;
        use microhv_guest::shared_abi::blkif::*;
        let mut d = match BlkFront::connect(0) {
            Ok(d) => d,
            Err(e) => {
                println!("blk: cannot connect: {e}");
                FAILURES.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        let end = d.sectors();
        // Our own page, written with a marker, granted properly: a valid
        // write of it must work (so the errors below are the checks' doing).
        let layout = core::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: non-zero size; never freed.
        let page = unsafe { core::slice::from_raw_parts_mut(alloc::alloc::alloc_zeroed(layout), 4096) };
        page.fill(0x4b);
        check_ok("blk: a valid write of our page to our sector 0", d.write(0, page).map(|_| 0));
        let mfn = mm::translate(page.as_ptr() as u64).unwrap_or(0);
        // SAFETY: (hypercalls) no pointer arguments.
        let gref = unsafe { hc::grant_access(DomId(0), Mfn(mfn), 1) }.unwrap_or(0) as u32;
        let mut status_of = |what: &str, req: BlkRequest, want: i16| {
            let r = d.push_raw(&req).and_then(|_| d.wait(req.id));
            let got = r.map(|r| r.status);
            CHECKS.fetch_add(1, Ordering::SeqCst);
            let ok = got == Ok(want);
            if !ok {
                FAILURES.fetch_add(1, Ordering::SeqCst);
            }
            println!("check blk: {what}: got status {got:?}, want {want} -> {}", if ok { "ok" } else { "FAIL" });
        };
        let seg = |gref: u32, first: u8, last: u8| BlkSegment { gref, first_sect: first, last_sect: last, _pad: 0 };
        let req = |op: u8, id: u64, sector: u64, segs: &[BlkSegment]| {
            let mut r = BlkRequest { op, id: 1000 + id, sector, nr_segments: segs.len() as u8, ..Default::default() };
            r.seg[..segs.len()].copy_from_slice(segs);
            r
        };
        // Forged grant references: numbers we never issued. (A number that
        // is valid in another domain's table names nothing of theirs here:
        // Dom0 looks every reference up in *our* table.)
        for (i, g) in [0x7777u32, 200, 4095, u32::MAX].into_iter().enumerate() {
            status_of(&alloc::format!("write with forged grant {g}"), req(BLK_OP_WRITE, i as u64, 0, &[seg(g, 0, 7)]), BLK_RSP_ERROR);
            status_of(&alloc::format!("read into forged grant {g}"), req(BLK_OP_READ, 10 + i as u64, 0, &[seg(g, 0, 7)]), BLK_RSP_ERROR);
        }
        // A page that is not ours cannot even be granted.
        // SAFETY: no pointer arguments.
        check("blk: grant another domain's frame to dom0", unsafe { hc::grant_access(DomId(0), Mfn(0x100), 0) }, Errno::EPERM);
        // Outside the virtual disk.
        status_of("write at the sector past the end", req(BLK_OP_WRITE, 20, end, &[seg(gref, 0, 0)]), BLK_RSP_ERROR);
        status_of("write straddling the end", req(BLK_OP_WRITE, 21, end - 1, &[seg(gref, 0, 1)]), BLK_RSP_ERROR);
        status_of("write at sector 2^64-1 (wraps)", req(BLK_OP_WRITE, 22, u64::MAX, &[seg(gref, 0, 0)]), BLK_RSP_ERROR);
        status_of("read far outside", req(BLK_OP_READ, 23, 1 << 40, &[seg(gref, 0, 7)]), BLK_RSP_ERROR);
        // Too many pages, malformed segments.
        let mut many = req(BLK_OP_WRITE, 30, 0, &[seg(gref, 0, 7); BLK_MAX_SEGMENTS]);
        many.nr_segments = BLK_MAX_SEGMENTS as u8 + 1;
        status_of("write of 9 segments", many, BLK_RSP_ERROR);
        many.nr_segments = 255;
        many.id = 1031;
        status_of("write of 255 segments", many, BLK_RSP_ERROR);
        status_of("segment with last sector 9", req(BLK_OP_WRITE, 32, 0, &[seg(gref, 0, 9)]), BLK_RSP_ERROR);
        status_of("unknown operation 99", req(99, 33, 0, &[seg(gref, 0, 7)]), BLK_RSP_EOPNOTSUPP);
        // Garbage requests: every slot of the ring filled with noise.
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut answered = 0;
        let mut wrong_ok = 0;
        for k in 0..64u64 {
            let mut bytes = [0u8; core::mem::size_of::<BlkRequest>()];
            for b in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let mut r: BlkRequest = request_from_bytes(&bytes);
            r.id = 5000 + k;
            // Keep the op plausible half of the time, so the other checks run.
            if k % 2 == 0 {
                r.op = (k % 4) as u8 / 2;
            }
            if d.push_raw(&r).is_err() {
                break;
            }
            match d.wait(r.id) {
                Ok(rsp) => {
                    answered += 1;
                    if rsp.status == BLK_RSP_OKAY {
                        wrong_ok += 1;
                    }
                }
                Err(_) => break,
            }
        }
        check_ok(&alloc::format!("blk: 64 garbage requests answered ({answered}), none succeeded ({wrong_ok})"), if answered == 64 && wrong_ok == 0 { Ok(0) } else { Err(Errno::EIO) });
        // Finally an impossible producer index: Dom0 must drop the ring.
        d.scribble(0, &0x00ff_ff00u32.to_le_bytes());
        d.notify();
        microhv_guest::time::sleep_ns(200_000_000);
        println!("blk: wrote an impossible request index; Dom0 should have disconnected us");
    }

    /// A request made of raw bytes, field by field (garbage in every field).
    fn request_from_bytes(bytes: &[u8]) -> microhv_guest::shared_abi::blkif::BlkRequest {
        let mut r = microhv_guest::shared_abi::blkif::BlkRequest::default();
        // Field by field from the bytes: op, nr_segments, id, sector, segments.
        r.op = bytes[0];
        r.nr_segments = bytes[1];
        r.sector = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
        for (i, s) in r.seg.iter_mut().enumerate() {
            let o = 24 + i * 8;
            s.gref = u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
            s.first_sect = bytes[o + 4];
            s.last_sect = bytes[o + 5];
        }
        r
    }

    fn check_ok(what: &str, got: Result<u64, Errno>) {
        CHECKS.fetch_add(1, Ordering::SeqCst);
        let ok = got.is_ok();
        if !ok {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check {what}: got {got:?}, want success -> {}", if ok { "ok" } else { "FAIL" });
    }

    fn peer(si: &StartInfo) -> DomId {
        DomId(si.cmdline().split_ascii_whitespace().find_map(|w| w.strip_prefix("peer=")).and_then(|p| p.parse().ok()).unwrap_or(0))
    }

    fn ok_check(what: &str, got: Result<u64, Errno>) {
        CHECKS.fetch_add(1, Ordering::SeqCst);
        if got.is_err() {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check {what}: got {got:?}, want success -> {}", if got.is_ok() { "ok" } else { "FAIL" });
    }

    fn evtchn() {
        // SAFETY (all calls): no pointers, or pointers to live locals.
        let unbound = unsafe { hc::evtchn_alloc_unbound(DomId(0)) };
        ok_check("allocate an unbound port for dom0", unbound);
        let p = unbound.unwrap_or(0);
        check("send on an unbound port", unsafe { hc::evtchn_send(p) }, Errno::EINVAL);
        check("send on a port that is not open", unsafe { hc::evtchn_send(999) }, Errno::EINVAL);
        check("send on a port number out of range", unsafe { hc::evtchn_send(1 << 40) }, Errno::EINVAL);
        check("close a port that is not open", unsafe { hc::evtchn_close(998) }, Errno::EINVAL);
        check("bind to dom0's port 1 (not offered to us)", unsafe { hc::evtchn_bind_interdomain(DomId(0), 1) }, Errno::EINVAL);
        check("bind to a domain that does not exist", unsafe { hc::evtchn_bind_interdomain(DomId(77), 1) }, Errno::ESRCH);
        check("allocate a port for a domain that does not exist", unsafe { hc::evtchn_alloc_unbound(DomId(999)) }, Errno::ESRCH);
        ok_check("bind VIRQ_TIMER", unsafe { hc::evtchn_bind_virq(VIRQ_TIMER) });
        check("bind VIRQ_TIMER twice", unsafe { hc::evtchn_bind_virq(VIRQ_TIMER) }, Errno::EEXIST);
        check("bind VIRQ_CONSOLE (Dom0's)", unsafe { hc::evtchn_bind_virq(VIRQ_CONSOLE) }, Errno::EPERM);
        let mut st = EvtchnStatus::default();
        check("status of a port out of range", unsafe { hc::evtchn_status(1 << 20, GuestVa(&mut st as *mut _ as u64)) }, Errno::EINVAL);
        check("status into the hypervisor area", unsafe { hc::evtchn_status(p, GuestVa(HYPERVISOR_VA_START)) }, Errno::EFAULT);
        check("unmask a port out of range", unsafe { hc::evtchn_unmask(1 << 20) }, Errno::EINVAL);
        ok_check("close our unbound port", unsafe { hc::evtchn_close(p) });
        check("close it again", unsafe { hc::evtchn_close(p) }, Errno::EINVAL);
        // Exhaust the per-domain port limit: it must end in ENOSPC, not a crash.
        let mut n = 0;
        let last = loop {
            match unsafe { hc::evtchn_alloc_unbound(DomId(0)) } {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
            if n > 5000 {
                break Errno::EINVAL;
            }
        };
        check(&alloc::format!("allocate ports until the limit ({n} allocated)"), Err(last), Errno::ENOSPC);
    }

    fn grant(si: &StartInfo) {
        let own_frame = mm::p2m()[si.first_free_pfn as usize];
        // SAFETY (all calls): no pointers, or pointers to live locals.
        check("grant a frame that is not ours", unsafe { hc::grant_access(DomId(0), Mfn(0x200), 0) }, Errno::EPERM);
        check("grant our own L4 (a page table)", unsafe { hc::grant_access(DomId(0), Mfn(si.pt_base_mfn), 1) }, Errno::EACCES);
        check("grant to a domain that does not exist", unsafe { hc::grant_access(DomId(77), Mfn(own_frame), 0) }, Errno::ESRCH);
        check("grant to ourselves", unsafe { hc::grant_access(DomId(si.domid), Mfn(own_frame), 0) }, Errno::EINVAL);
        let r = unsafe { hc::grant_access(DomId(0), Mfn(own_frame), 0) };
        ok_check("grant a frame of ours to dom0", r);
        let gref = r.unwrap_or(0);
        let [va] = mm::free_slots::<1>().unwrap_or([0]);
        check("map our own grant (we are not the grantee)", unsafe { hc::grant_map(DomId(si.domid), gref, GuestVa(va), 0) }, Errno::EPERM);
        check("map a forged reference of dom0", unsafe { hc::grant_map(DomId(0), 77, GuestVa(va), 0) }, Errno::EINVAL);
        check("map a grant at a hypervisor address", unsafe { hc::grant_map(DomId(0), 1, GuestVa(HYPERVISOR_VA_START), 0) }, Errno::EINVAL);
        let op = GrantCopy { granter: 0, gref: 1, offset: 4000, len: 200, local_va: si.virt_base, ..Default::default() };
        check("grant_copy past the end of the frame", unsafe { hc::grant_copy(GuestVa(&op as *const _ as u64)) }, Errno::EINVAL);
        let op = GrantCopy { granter: 0, gref: 99, offset: 0, len: 16, local_va: si.virt_base, ..Default::default() };
        check("grant_copy through a forged reference", unsafe { hc::grant_copy(GuestVa(&op as *const _ as u64)) }, Errno::EINVAL);
        check("end a grant that does not exist", unsafe { hc::grant_end(200) }, Errno::EINVAL);
        ok_check("end our grant", unsafe { hc::grant_end(gref) });
        check("end it again (stale)", unsafe { hc::grant_end(gref) }, Errno::EINVAL);
    }

    fn store_snoop() {
        use microhv_guest::shared_abi::store::{Request, Response};
        use microhv_guest::store;
        let home = store::home();
        ok_check("write in our own subtree", store::write_str(&alloc::format!("{home}/mine"), "x").map(|_| 0));
        check("read domu1's subtree", store::read("/local/domain/1/name").map(|_| 0), Errno::EACCES);
        check("list domu1's subtree", store::directory("/local/domain/1").map(|_| 0), Errno::EACCES);
        check("write into dom0's subtree", store::write_str("/local/domain/0/evil", "1").map(|_| 0), Errno::EACCES);
        check("write into domu1's subtree", store::write_str("/local/domain/1/evil", "1").map(|_| 0), Errno::EACCES);
        check("write at the root", store::write_str("/evil", "1").map(|_| 0), Errno::EACCES);
        check("a path with ..", store::read(&alloc::format!("{home}/../1/name")).map(|_| 0), Errno::EINVAL);
        let big = alloc::vec![b'x'; 3000];
        check("a 3000-byte value", store::write(&alloc::format!("{home}/big"), &big).map(|_| 0), Errno::E2BIG);
        let watch = |n: u32| store::request(Request::Watch { path: home.clone(), token: alloc::format!("t{n}") });
        let mut last = Ok(Response::Ok);
        for n in 0..100 {
            last = watch(n);
            if !matches!(last, Ok(Response::Ok)) {
                break;
            }
        }
        let got = match last {
            Ok(Response::Error(e)) => Err(Errno(e)),
            Ok(_) => Ok(0),
            Err(e) => Err(e),
        };
        check("set 100 watches", got, Errno::ENOSPC);
    }

    /// Corrupts the producer index of our console ring: Dom0's backend must
    /// notice and stop reading it, and keep serving everyone else.
    fn console_garbage(si: &StartInfo) {
        use microhv_guest::shared_abi::console::OUT_PROD_OFF;
        use microhv_guest::shared_abi::ring::SharedMem;
        println!("about to corrupt the console ring");
        microhv_guest::time::sleep_ns(10_000_000);
        let mut page = mm::SharedPage(si.console_va as *mut u8);
        page.write_u32(OUT_PROD_OFF, 0xdead_beef);
        // SAFETY: no pointers.
        let _ = unsafe { hc::evtchn_send(si.console_evtchn) };
        microhv_guest::time::sleep_ns(50_000_000);
        // Our console is gone now; report on microhv's debug console instead.
        microhv_guest::console::debug_write(b"ATTACK console-garbage: corrupted the console ring and slept; still running\n");
        microhv_guest::shutdown(SHUTDOWN_POWEROFF)
    }

    /// Sends a frame header claiming 60000 bytes on the store ring: Dom0 must
    /// drop our store connection, not buffer forever or crash.
    fn store_garbage(si: &StartInfo) {
        let mut page = mm::SharedPage(si.store_va as *mut u8);
        let n = microhv_guest::shared_abi::console::write_out(&mut page, &[0x60, 0xea, 1, 2, 3, 4]);
        // SAFETY: no pointers.
        let _ = unsafe { hc::evtchn_send(si.store_evtchn) };
        microhv_guest::time::sleep_ns(50_000_000);
        let after = microhv_guest::store::read(&alloc::format!("{}/name", microhv_guest::store::home()));
        microhv_guest::console::debug_write(
            alloc::format!("ATTACK store-garbage: wrote {n} bytes of a bad frame; store read afterwards: {after:?}\n").as_bytes(),
        );
        microhv_guest::shutdown(SHUTDOWN_POWEROFF)
    }

    fn sleep_until_ms(t0: u64, ms: u64) {
        microhv_guest::time::sleep_until(t0 + ms * 1_000_000);
    }

    /// microhv itself grants every DomU's console and store pages to Dom0 as
    /// refs 1 and 2, so the pair's own grants are refs 3 and 4.
    const RO_REF: u64 = 3;
    const RW_REF: u64 = 4;

    /// Grants a read-only and a writable frame to the peer, then checks
    /// that revoking a mapped grant is refused until it is unmapped. Ends
    /// while the peer still maps the writable one.
    fn grant_owner(peer: DomId) {
        let t0 = microhv_guest::time::now_ns();
        let si = microhv_guest::start_info();
        let ro = mm::p2m()[si.first_free_pfn as usize];
        let rw = mm::p2m()[si.first_free_pfn as usize + 1];
        let ro_va = si.virt_base + si.first_free_pfn * mm::PAGE;
        // SAFETY: our own heap page, mapped writable.
        unsafe { core::ptr::write_volatile(ro_va as *mut u64, 0x5eed_cafe) };
        // SAFETY (calls below): no pointers.
        let r1 = unsafe { hc::grant_access(peer, Mfn(ro), 1) };
        let r2 = unsafe { hc::grant_access(peer, Mfn(rw), 0) };
        ok_check("grant a read-only frame", r1);
        ok_check("grant a writable frame", r2);
        CHECKS.fetch_add(1, Ordering::SeqCst);
        let refs_ok = r1 == Ok(RO_REF) && r2 == Ok(RW_REF);
        if !refs_ok {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check the grants are refs {RO_REF} and {RW_REF}: {r1:?} {r2:?} -> {}", if refs_ok { "ok" } else { "FAIL" });
        // A third frame, granted writable, then turned into a page table: the
        // grant must not let the peer write into it any more.
        let pt = mm::p2m()[si.first_free_pfn as usize + 2];
        let pt_va = si.virt_base + (si.first_free_pfn + 2) * mm::PAGE;
        ok_check("grant a third frame writable (ref 5)", unsafe { hc::grant_access(peer, Mfn(pt), 0) });
        ok_check("unmap it from our own address space", mm::unmap(pt_va).map(|_| 0));
        ok_check("pin it as an L1 page table", unsafe { hc::pin_table(Mfn(pt), 1) });
        sleep_until_ms(t0, 30);
        check("revoke the read-only grant while the peer maps it", unsafe { hc::grant_end(RO_REF) }, Errno::EBUSY);
        check("release the frame while the peer maps it", {
            let a = [ro];
            unsafe { hc::memory_release(GuestVa(a.as_ptr() as u64), 1) }
        }, Errno::EBUSY);
        sleep_until_ms(t0, 60);
        ok_check("revoke it after the peer unmapped it", unsafe { hc::grant_end(RO_REF) });
        sleep_until_ms(t0, 70);
    }

    fn grant_user(peer: DomId) {
        let t0 = microhv_guest::time::now_ns();
        let [va1, va2, va3] = mm::free_slots::<3>().unwrap_or([0; 3]);
        sleep_until_ms(t0, 10);
        // SAFETY (calls below): the VAs are our own empty slots.
        check("map the read-only grant writable", unsafe { hc::grant_map(peer, RO_REF, GuestVa(va1), 1) }, Errno::EACCES);
        ok_check("map the read-only grant read-only", unsafe { hc::grant_map(peer, RO_REF, GuestVa(va1), 0) });
        // SAFETY: just mapped, readable.
        let v = unsafe { core::ptr::read_volatile(va1 as *const u64) };
        CHECKS.fetch_add(1, Ordering::SeqCst);
        println!("check read the peer's value through the grant: {v:#x} -> {}", if v == 0x5eed_cafe { "ok" } else { "FAIL" });
        if v != 0x5eed_cafe {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        // Writing through the read-only mapping must fault.
        traps::set_exception_hook(skip_hook);
        EXPECT_LEN.store(3, Ordering::SeqCst);
        LAST_VECTOR.store(u64::MAX, Ordering::SeqCst);
        // SAFETY: must fault (#PF); the hook skips the 3-byte instruction.
        unsafe { core::arch::asm!("mov byte ptr [rax], 1", in("rax") va1) };
        let vec = LAST_VECTOR.load(Ordering::SeqCst);
        CHECKS.fetch_add(1, Ordering::SeqCst);
        println!("check write through the read-only grant: {} -> {}", if vec == 14 { "#PF" } else { "no fault" }, if vec == 14 { "ok" } else { "FAIL" });
        if vec != 14 {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        ok_check("map the writable grant", unsafe { hc::grant_map(peer, RW_REF, GuestVa(va2), 1) });
        // SAFETY: mapped writable just above.
        unsafe { core::ptr::write_volatile(va2 as *mut u64, 42) };
        let op = GrantCopy { granter: peer.0, gref: 5, offset: 0, len: 8, local_va: va2, flags: GRANT_COPY_TO_GRANTED, ..Default::default() };
        check("grant_copy into a granted frame that became a page table", unsafe { hc::grant_copy(GuestVa(&op as *const _ as u64)) }, Errno::EACCES);
                check("map a grant meant for dom0 (the peer's console page, ref 1)", unsafe { hc::grant_map(peer, 1, GuestVa(va3), 0) }, Errno::EPERM);
        sleep_until_ms(t0, 50);
        ok_check("unmap the read-only grant", unsafe { hc::grant_unmap(peer, RO_REF, GuestVa(va1)) });
        sleep_until_ms(t0, 90);
        // The peer has ended; its grants are refused from now on.
        check("map a grant of a domain that has ended", unsafe { hc::grant_map(peer, RW_REF, GuestVa(va3), 0) }, Errno::ESRCH);
        let op = GrantCopy { granter: peer.0, gref: RW_REF as u32, offset: 0, len: 8, local_va: va3, ..Default::default() };
        check("grant_copy from a domain that has ended", unsafe { hc::grant_copy(GuestVa(&op as *const _ as u64)) }, Errno::ESRCH);
        ok_check("unmap the writable grant of the ended domain", unsafe { hc::grant_unmap(peer, RW_REF, GuestVa(va2)) });
    }

    fn own(mfn: u64) -> bool {
        mm::p2m().contains(&mfn)
    }

    fn map_foreign(si: &StartInfo) {
        let va = si.virt_base + (si.nr_pages - 1) * mm::PAGE;
        let slot = mm::l1_entry_maddr(va).expect("last page has an L1 entry");
        let map = |mfn: u64, flags: u64| -> Result<u64, Errno> {
            mm::mmu_update(&[MmuUpdate { ptr: slot, val: (mfn << 12) | flags }]).map(|_| 0).map_err(|(_, e)| e)
        };
        let _ = mm::unmap(va);
        check("map the hypervisor image frame (mfn 0x200)", map(0x200, PTE_PRESENT | PTE_RW), Errno::EPERM);
        check("map the hypervisor image frame read-only", map(0x200, PTE_PRESENT), Errno::EPERM);
        // Scan machine memory for frames that are not ours: all must be refused.
        let mut tried = 0u64;
        let mut mapped = 0u64;
        let mut mfn = 0x100;
        while mfn < 0x10000 {
            if !own(mfn) {
                tried += 1;
                let r = map(mfn, PTE_PRESENT | PTE_RW);
                if r.is_ok() {
                    println!("  frame {mfn:#x} was mapped!");
                    mapped += 1;
                    let _ = mm::unmap(va);
                }
            }
            mfn += 37;
        }
        CHECKS.fetch_add(1, Ordering::SeqCst);
        if mapped != 0 {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check map {tried} frames of other domains, microhv and beyond RAM: {mapped} mapped -> {}", if mapped == 0 { "ok" } else { "FAIL" });
        // Device memory (the PCI hole, the I/O APIC) is Dom0's alone.
        check("map device memory at 0xfebf0000 (PCI hole)", map(0xfebf0, PTE_PRESENT | PTE_RW), Errno::EINVAL);
        check("map the I/O APIC page", map(0xfec00, PTE_PRESENT | PTE_RW), Errno::EINVAL);
        check("map our own L4 writable", map(si.pt_base_mfn, PTE_PRESENT | PTE_RW), Errno::EACCES);
        let l4_slot511 = (si.pt_base_mfn << 12) + 511 * 8;
        check(
            "overwrite the hypervisor slot of our L4",
            mm::mmu_update(&[MmuUpdate { ptr: l4_slot511, val: 0 }]).map(|_| 0).map_err(|(_, e)| e),
            Errno::EPERM,
        );
        let own_frame = mm::p2m()[0];
        check("map with a huge-page/reserved bit", map(own_frame, PTE_PRESENT | (1 << 7)), Errno::EINVAL);
        check("write an entry of a frame that is not a page table",
            mm::mmu_update(&[MmuUpdate { ptr: own_frame << 12, val: 0 }]).map(|_| 0).map_err(|(_, e)| e), Errno::EINVAL);
        // A read-only mapping of our own table is fine.
        let ro = map(si.pt_base_mfn, PTE_PRESENT);
        CHECKS.fetch_add(1, Ordering::SeqCst);
        println!("check map our own L4 read-only: got {ro:?} -> {}", if ro.is_ok() { "ok" } else { "FAIL" });
        if ro.is_err() {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        let _ = mm::unmap(va);
    }

    static EXPECT_LEN: AtomicU64 = AtomicU64::new(0);
    static LAST_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);

    fn skip_hook(f: &mut ExceptionFrame) {
        LAST_VECTOR.store(f.vector, Ordering::SeqCst);
        f.rip += EXPECT_LEN.load(Ordering::SeqCst);
    }

    fn expect_gp(what: &str, len: u64, run: fn()) {
        EXPECT_LEN.store(len, Ordering::SeqCst);
        LAST_VECTOR.store(u64::MAX, Ordering::SeqCst);
        run();
        let v = LAST_VECTOR.load(Ordering::SeqCst);
        CHECKS.fetch_add(1, Ordering::SeqCst);
        let ok = v == 13;
        if !ok {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check {what}: {} -> {}", if v == u64::MAX { "executed without a fault" } else { traps::NAMES[v as usize % 32] }, if ok { "ok" } else { "FAIL" });
    }

    fn priv_insn() {
        traps::set_exception_hook(skip_hook);
        // SAFETY (each block): these instructions must raise #GP in ring 1;
        // the hook skips them (their encoded length is given).
        expect_gp("cli", 1, || unsafe { core::arch::asm!("cli") });
        expect_gp("hlt", 1, || unsafe { core::arch::asm!("hlt") });
        expect_gp("mov cr3, rax", 3, || unsafe { core::arch::asm!("mov cr3, rax", in("rax") 0x1000u64) });
        expect_gp("wrmsr (IA32_LSTAR)", 2, || unsafe { core::arch::asm!("wrmsr", in("ecx") 0xC000_0082u32, in("eax") 0, in("edx") 0) });
        expect_gp("rdmsr (IA32_EFER)", 2, || unsafe { core::arch::asm!("rdmsr", in("ecx") 0xC000_0080u32, out("eax") _, out("edx") _) });
        expect_gp("in al, dx (COM1)", 1, || unsafe { core::arch::asm!("in al, dx", in("dx") 0x3f8u16, out("al") _) });
        expect_gp("out dx, al (isa-debug-exit)", 1, || unsafe { core::arch::asm!("out dx, al", in("dx") 0xf4u16, in("al") 0u8) });
        expect_gp("lidt", 3, || unsafe { core::arch::asm!("lidt [rax]", in("rax") 0x40_0000u64) });
    }

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    static mut USER_STACK: Page = Page([0; 4096]);
    static mut KERNEL_STACK: [Page; 2] = [Page([0; 4096]), Page([0; 4096])];

    #[unsafe(naked)]
    #[link_section = ".text.user"]
    extern "C" fn user_code() -> ! {
        // console_write from ring 3: the gate has DPL 1, so this must raise #GP.
        core::arch::naked_asm!("2:", "mov eax, 2", "int 0x82", "jmp 2b", ".p2align 12")
    }

    fn ring3_hook(f: &mut ExceptionFrame) {
        let from_user = f.cs & 3 == 3;
        // The error code names the IDT gate: bit 1 set, the vector in bits 3..
        // (QEMU TCG reports vector * 16 + 2 instead of vector * 8 + 2; accept both.)
        let vec = microhv_guest::shared_abi::HYPERCALL_VECTOR as u64;
        let gate = f.error_code & 2 != 0 && (f.error_code >> 3 == vec || f.error_code >> 4 == vec);
        let ok = f.vector == 13 && from_user && gate;
        CHECKS.fetch_add(1, Ordering::SeqCst);
        if !ok {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!(
            "check int 0x82 from ring 3: {} error {:#x} from ring {} -> {}",
            traps::NAMES[f.vector as usize % 32], f.error_code, f.cs & 3, if ok { "ok" } else { "FAIL" }
        );
        finish("ring3-hypercall")
    }

    /// Lets ring 3 use the pages at `va`: US on every level of its mapping.
    fn make_user(va: u64) -> Result<(), Errno> {
        let slots = mm::entry_maddrs(va).ok_or(Errno::ENOENT)?;
        for s in slots {
            let e = mm::read_maddr(s).ok_or(Errno::ENOENT)?;
            mm::mmu_update(&[MmuUpdate { ptr: s, val: e | PTE_USER }]).map_err(|(_, e)| e)?;
        }
        Ok(())
    }

    fn ring3_hypercall() {
        let code = user_code as *const () as u64 & !0xfff;
        let stack = core::ptr::addr_of!(USER_STACK) as u64;
        let kstack_top = core::ptr::addr_of!(KERNEL_STACK) as u64 + 2 * 4096;
        if let Err(e) = make_user(code).and_then(|_| make_user(stack)) {
            println!("could not set up ring 3: {e}");
            FAILURES.fetch_add(1, Ordering::SeqCst);
            return;
        }
        // SAFETY: registers the kernel stack for traps from ring 3.
        if let Err(e) = unsafe { hc::stack_switch(GuestVa(kstack_top)) } {
            println!("stack_switch failed: {e}");
            FAILURES.fetch_add(1, Ordering::SeqCst);
            return;
        }
        traps::set_exception_hook(ring3_hook);
        let frame = IretFrame { rax: 0, rip: user_code as *const () as u64, cs: 3, rflags: 0x200, rsp: stack + 4096, ss: 3 };
        println!("entering ring 3 at {:#x}", frame.rip);
        // SAFETY: `iret` pops the frame at RSP and continues in ring 3; it does
        // not return here (the hook ends the domain).
        unsafe {
            core::arch::asm!("mov rsp, {f}", "mov eax, 18", "int 0x82", "ud2", f = in(reg) &frame as *const IretFrame, options(noreturn));
        }
    }

    fn bad_pointers(si: &StartInfo) {
        let w = |buf: u64, len: u64| unsafe { hc::console_write(GuestVa(buf), len) };
        check("console_write from an unmapped address", w(0x7000_0000_0000, 10), Errno::EFAULT);
        check("console_write from the hypervisor area", w(HYPERVISOR_VA_START, 10), Errno::EFAULT);
        check("console_write from a kernel-half address", w(0xFFFF_8000_0000_0000, 10), Errno::EFAULT);
        check("console_write with an overflowing range", w(u64::MAX - 5, 10), Errno::EFAULT);
        check("console_write with a huge length", w(si.virt_base, 1 << 40), Errno::EINVAL);
        let end = si.virt_base + si.nr_pages * mm::PAGE;
        check("console_write running off the end of memory", w(end - 4, 16), Errno::EFAULT);
        check("console_write of a non-canonical address", w(0x0000_8000_0000_0000, 4), Errno::EFAULT);
        // SAFETY (below): the pointers are bad on purpose; microhv must refuse them.
        check("memory_query into the hypervisor area", unsafe { hc::memory_query(GuestVa(HYPERVISOR_VA_START)) }, Errno::EFAULT);
        check("memory_query into read-only memory (our L4)", unsafe { hc::memory_query(GuestVa(si.pt_base_va)) }, Errno::EFAULT);
        check("mmu_update from an unmapped request list", unsafe { hc::mmu_update(GuestVa(0x10), 1, GuestVa(0)) }, Errno::EFAULT);
        check("mmu_update with too many requests", unsafe { hc::mmu_update(GuestVa(si.virt_base), 1 << 40, GuestVa(0)) }, Errno::E2BIG);
        let bad = [TrapInfo { vector: 14, _pad: [0; 7], handler: HYPERVISOR_VA_START }];
        check("trap handler in the hypervisor area", unsafe { hc::set_trap_table(GuestVa(bad.as_ptr() as u64), 1) }, Errno::EINVAL);
        let bad = [TrapInfo { vector: 99, _pad: [0; 7], handler: si.virt_base }];
        check("trap table entry for vector 99", unsafe { hc::set_trap_table(GuestVa(bad.as_ptr() as u64), 1) }, Errno::EINVAL);
        check("callback in the hypervisor area", unsafe { hc::set_callback(GuestVa(HYPERVISOR_VA_START + 0x10)) }, Errno::EINVAL);
        check("pin a frame that is not ours", unsafe { hc::pin_table(Mfn(0x200), 1) }, Errno::EPERM);
        check("pin at level 7", unsafe { hc::pin_table(Mfn(mm::p2m()[0]), 7) }, Errno::EINVAL);
        check("switch to an unpinned base", unsafe { hc::set_pt_base(Mfn(mm::p2m()[0])) }, Errno::EINVAL);
    }

    fn unknown_hypercall() {
        for nr in [0u64, 49, 63, 999, u64::MAX] {
            // SAFETY: unknown numbers take no pointers.
            let r = Errno::result(unsafe { hc::raw(nr, [1, 2, 3, 4, 5]) });
            check(&alloc::format!("hypercall number {nr:#x}"), r, Errno::ENOSYS);
        }
        let mut out = [DomainInfo::default(); 2];
        // Every domain-control hypercall is Dom0's alone.
        check("privileged domctl_list from a DomU", unsafe { hc::domctl_list(GuestVa(out.as_mut_ptr() as u64), 2) }, Errno::EPERM);
        let mut ch = DomainChannels::default();
        check("domctl_channels from a DomU", unsafe { hc::domctl_channels(DomId(1), GuestVa(&mut ch as *mut _ as u64)) }, Errno::EPERM);
        check("domctl_pause of domu1 from a DomU", unsafe { hc::domctl_pause(DomId(1)) }, Errno::EPERM);
        check("domctl_unpause from a DomU", unsafe { hc::domctl_unpause(DomId(1)) }, Errno::EPERM);
        check("domctl_destroy of dom0 from a DomU", unsafe { hc::domctl_destroy(DomId(0)) }, Errno::EPERM);
        check("domctl_destroy of domu1 from a DomU", unsafe { hc::domctl_destroy(DomId(1)) }, Errno::EPERM);
        let mut mods = [ModuleInfo::default(); 2];
        check("domctl_modules from a DomU", unsafe { hc::domctl_modules(GuestVa(mods.as_mut_ptr() as u64), 2) }, Errno::EPERM);
        let spec = DomainCreate { nr_pages: 512, max_pages: 512, weight: 256, ..Default::default() };
        check("domctl_create from a DomU", unsafe { hc::domctl_create(GuestVa(&spec as *const _ as u64)) }, Errno::EPERM);
        check("domctl_create_hvm from a DomU", unsafe { hc::domctl_create_hvm(GuestVa(&spec as *const _ as u64), 0, GuestVa(0), 0) }, Errno::EPERM);
        let mut frames = [0u64; 4];
        check("domctl_get_frames of domu1 from a DomU", unsafe { hc::domctl_get_frames(DomId(1), GuestVa(frames.as_mut_ptr() as u64), 4) }, Errno::EPERM);
        check("domctl_map of domu1's frame from a DomU", unsafe { hc::domctl_map(DomId(1), Mfn(0x1000), GuestVa(0x40_0000)) }, Errno::EPERM);
        check("domctl_unmap from a DomU", unsafe { hc::domctl_unmap(DomId(1), Mfn(0x1000), GuestVa(0x40_0000)) }, Errno::EPERM);
        let st = DomainStart::default();
        check("domctl_start from a DomU", unsafe { hc::domctl_start(DomId(1), GuestVa(&st as *const _ as u64)) }, Errno::EPERM);
        // Device access is Dom0's: DMA memory and interrupt lines.
        check("dma_populate from a DomU", unsafe { hc::dma_populate(1) }, Errno::EPERM);
        check("irq_bind of line 10 from a DomU", unsafe { hc::irq_bind(10) }, Errno::EPERM);
        check("irq_eoi of line 10 from a DomU", unsafe { hc::irq_eoi(10) }, Errno::EPERM);
        let mut stats = HvStats::default();
        check("domctl_stats from a DomU", unsafe { hc::domctl_stats(GuestVa(&mut stats as *mut _ as u64)) }, Errno::EPERM);
        check("version with an unknown command", unsafe { hc::version(77) }, Errno::EINVAL);
        check("bind an unknown VIRQ", unsafe { hc::evtchn_bind_virq(1000) }, Errno::EINVAL);
    }

    fn balloon(si: &StartInfo) {
        let info = mm::memory_query().expect("memory_query");
        let room = info.max_pages - info.nr_pages;
        let mut out = alloc::vec![0u64; room as usize + 1];
        check("populate one page past the limit",
            unsafe { hc::memory_populate(GuestVa(out.as_mut_ptr() as u64), room + 1) }, Errno::ENOMEM);
        check("populate with a bad output pointer", unsafe { hc::memory_populate(GuestVa(0x10), 1) }, Errno::EFAULT);
        let mut big = alloc::vec![0u64; 1024];
        check("populate 1024 pages in one call", unsafe { hc::memory_populate(GuestVa(big.as_mut_ptr() as u64), 1024) }, Errno::E2BIG);
        let after = mm::memory_query().expect("memory_query");
        CHECKS.fetch_add(1, Ordering::SeqCst);
        let same = after.nr_pages == info.nr_pages;
        if !same {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        println!("check failed populates leave the domain at {} pages: now {} -> {}", info.nr_pages, after.nr_pages, if same { "ok" } else { "FAIL" });
        let rel = |mfn: u64| {
            let a = [mfn];
            unsafe { hc::memory_release(GuestVa(a.as_ptr() as u64), 1) }
        };
        check("release a hypervisor frame", rel(0x200), Errno::EPERM);
        let mut foreign = 0x300;
        while own(foreign) {
            foreign += 1;
        }
        check("release a frame that is not ours", rel(foreign), Errno::EPERM);
        check("release our own L4 (a page table)", rel(si.pt_base_mfn), Errno::EBUSY);
        check("release a frame that is still mapped", rel(mm::p2m()[si.first_free_pfn as usize]), Errno::EBUSY);
        let sh = mm::translate(si.shared_info_va).unwrap_or(0);
        check("release shared_info", rel(sh), Errno::EBUSY);
        // Finally, fill up to the limit exactly: that must work.
        let ok = unsafe { hc::memory_populate(GuestVa(out.as_mut_ptr() as u64), room) };
        CHECKS.fetch_add(1, Ordering::SeqCst);
        println!("check populate up to the limit ({room} pages): {ok:?} -> {}", if ok == Ok(room) { "ok" } else { "FAIL" });
        if ok != Ok(room) {
            FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        check("populate one more", unsafe { hc::memory_populate(GuestVa(out.as_mut_ptr() as u64), 1) }, Errno::ENOMEM);
    }
}
