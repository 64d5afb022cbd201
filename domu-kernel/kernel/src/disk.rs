//! The disk demo: check what the previous run wrote to our virtual
//! disk, write this run's pattern (several requests in flight, each
//! several pages), flush, and report bytes and throughput.
extern crate alloc;
use alloc::vec::Vec;
use domu_core::disk::{word, Header, DATA_SECTOR, DISK_DATA_SECTORS};
use microhv_guest::blkfront::BlkFront;
use microhv_guest::shared_abi::blkif::{BLK_OP_READ, BLK_OP_WRITE};
use microhv_guest::{println, time, Errno};

/// Bytes per request (8 pages) and requests in flight.
const CHUNK: usize = 32 * 1024;
const DEPTH: usize = 4;

struct Bufs(Vec<*mut u8>);

impl Bufs {
    fn new(n: usize, size: usize) -> Bufs {
        let layout = core::alloc::Layout::from_size_align(size, 4096).expect("valid layout");
        // SAFETY: non-zero size; freed never (the domain ends after the demo).
        Bufs((0..n).map(|_| unsafe { alloc::alloc::alloc_zeroed(layout) }).collect())
    }
    fn get(&self, i: usize, len: usize) -> &'static mut [u8] {
        // SAFETY: buffer i is `len` <= its size bytes, used by one request at a time.
        unsafe { core::slice::from_raw_parts_mut(self.0[i], len) }
    }
}

/// Runs `op` over the whole data area, DEPTH requests at a time;
/// `fill`/`check` see each chunk (index, bytes) before/after.
fn sweep(d: &mut BlkFront, bufs: &Bufs, op: u8, mut fill: impl FnMut(u64, &mut [u8]), mut check: impl FnMut(u64, &[u8])) -> Result<(), Errno> {
    let chunks = (DISK_DATA_SECTORS * 512) as usize / CHUNK;
    let mut inflight: Vec<(usize, usize, microhv_guest::blkfront::Pending)> = Vec::new();
    let mut next = 0;
    while next < chunks || !inflight.is_empty() {
        while next < chunks && inflight.len() < DEPTH {
            let slot = (0..DEPTH).find(|s| !inflight.iter().any(|f| f.0 == *s)).expect("a free buffer");
            let buf = bufs.get(slot, CHUNK);
            fill(next as u64, buf);
            let sector = DATA_SECTOR + (next * CHUNK / 512) as u64;
            inflight.push((slot, next, d.start(op, sector, buf)?));
            next += 1;
        }
        let (slot, chunk, p) = inflight.remove(0);
        d.finish(p)?;
        check(chunk as u64, bufs.get(slot, CHUNK));
    }
    Ok(())
}

fn fill_words(name: &str, run: u64, chunk: u64, buf: &mut [u8]) {
    let per = (CHUNK / 8) as u64;
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(name, run, chunk * per + k as u64).to_le_bytes());
    }
}

pub fn run(name: &str) {
    let mut d = match BlkFront::connect(0) {
        Ok(d) => d,
        Err(e) if e == Errno::ENOENT => {
            println!("disk: no virtual disk configured; skipped");
            return;
        }
        Err(e) => {
            println!("disk: FAILED to connect: {e}");
            return;
        }
    };
    if let Err(e) = demo(&mut d, name) {
        println!("disk: FAILED: {e}");
    }
    match d.close() {
        Ok(()) => println!("disk: disconnected"),
        Err(e) => println!("disk: close failed: {e}"),
    }
}

fn demo(d: &mut BlkFront, name: &str) -> Result<(), Errno> {
    let bufs = Bufs::new(DEPTH, CHUNK);
    let header = bufs.get(0, 4096);
    d.read(0, header)?;
    let prev = Header::decode(header).filter(|h| h.is_for(name));
    let bytes = DISK_DATA_SECTORS * 512;
    let mut moved = 0u64;
    let t_read = time::now_ns();
    match &prev {
        Some(h) => {
            let mut bad = 0u64;
            let run = h.run;
            let per = (CHUNK / 8) as u64;
            sweep(d, &bufs, BLK_OP_READ, |_, _| {}, |chunk, buf| {
                for (k, w) in buf.chunks_exact(8).enumerate() {
                    if u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) != word(name, run, chunk * per + k as u64) {
                        bad += 1;
                    }
                }
            })?;
            moved += bytes;
            println!(
                "disk: {} sectors; found run {run} written by {name}: read back {} KiB, {}",
                d.sectors(), bytes / 1024,
                if bad == 0 { alloc::format!("all {} words match", bytes / 8) } else { alloc::format!("{bad} WORDS DIFFER") }
            );
        }
        None => println!("disk: {} sectors; no earlier run of {name} on it (a fresh disk)", d.sectors()),
    }
    let read_ns = time::now_ns() - t_read;
    let run = prev.map_or(1, |h| h.run + 1);
    let t_write = time::now_ns();
    sweep(d, &bufs, BLK_OP_WRITE, |chunk, buf| fill_words(name, run, chunk, buf), |_, _| {})?;
    d.flush()?;
    let header = bufs.get(0, 4096);
    header.fill(0);
    header[..48].copy_from_slice(&Header::new(name, run).encode());
    d.write(0, header)?;
    d.flush()?;
    let write_ns = time::now_ns() - t_write;
    moved += bytes + 4096 * 2;
    // A request past the end of the virtual disk must fail, visibly.
    let past = d.read(d.sectors(), bufs.get(1, 4096));
    println!("disk: read past the end of the disk -> {}", match past {
        Err(e) => alloc::format!("{} (as expected)", e.name()),
        Ok(()) => "succeeded (NOT EXPECTED)".into(),
    });
    let kib_s = |b: u64, ns: u64| b * 1_000_000_000 / 1024 / ns.max(1);
    println!(
        "disk: run {run}: wrote {} KiB in {} ms ({} KiB/s), {} requests of {} KiB, {DEPTH} in flight; {} KiB moved in all{}",
        bytes / 1024, write_ns / 1_000_000, kib_s(bytes, write_ns), bytes as usize / CHUNK, CHUNK / 1024, moved / 1024,
        if read_ns > 0 && moved > bytes + 8192 { alloc::format!("; read {} KiB/s", kib_s(bytes, read_ns)) } else { alloc::string::String::new() }
    );
    Ok(())
}
