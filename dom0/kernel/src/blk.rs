//! Dom0's block path: PCI enumeration, the real disk, and the block backend
//! that serves each DomU's virtual disks over a shared ring. The request
//! checks and data movement are in `dom0_core::blkback` (host-tested); this
//! file is the wiring to the hardware and hypercalls.
//!
//! The real disk is one of two devices (`Device`):
//! * virtio-blk (QEMU): the `virtio-drivers` crate, up to four requests in
//!   flight, completions on an interrupt through an event channel;
//! * when there is no virtio-blk device, an ATA disk on the primary
//!   channel's slave position (Bochs: the boot CD-ROM is the master), driven
//!   by `dom0_core::ata` with PIO and polling. Its requests complete while
//!   they are started, so they are answered in the same poll.
//!
//! DMA (virtio only): microhv has no IOMMU to offer, so Dom0 is trusted with
//! DMA. It takes machine-contiguous frames below 4 GiB with `dma_populate`
//! and gives the device their machine addresses. Every buffer the device sees
//! is in that pool; anything else virtio-drivers shares is bounced through it.
//! PIO needs none of this: the data goes through the CPU.
extern crate alloc;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use dom0_core::ata::{self, AtaDisk, AtaError, Drive};
use dom0_core::blkback::{self, GrantIo, Job, VDisk};
use dom0_core::store::{Perm, Store};
use microhv_guest::hypercall as hc;
use microhv_guest::mm::{self, SharedPage};
use microhv_guest::shared_abi::blkif::*;
use microhv_guest::shared_abi::device::DeviceState;
use microhv_guest::shared_abi::hypercall::{GrantCopy, MmuUpdate, GRANT_COPY_TO_GRANTED};
use microhv_guest::shared_abi::ring::BackRing;
use microhv_guest::{events, println, time, DomId, Errno, GuestVa};
use spin::Mutex;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Pages in the DMA pool.
pub const POOL_PAGES: u64 = 64;
/// Virtual slots for device MMIO.
pub const MMIO_PAGES: u64 = 8;
/// Virtual slots Dom0 must keep free for this module.
pub const SLOTS: u64 = POOL_PAGES + MMIO_PAGES;
/// Requests on the device at once.
const MAX_INFLIGHT: usize = 4;
/// Bytes of one request's DMA buffer (the largest request).
const REQ_BUF: usize = BLK_MAX_SEGMENTS * 4096;

// ---- port I/O and PCI configuration space --------------------------------

fn outl(port: u16, v: u32) {
    // SAFETY: microhv opens the PCI configuration ports (0xcf8..=0xcff) to
    // Dom0 in the TSS I/O bitmap; other ports fault.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, nomem)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outl`.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, nomem)) };
    v
}

/// PCI configuration mechanism #1, through ports 0xcf8/0xcfc.
pub struct PortCam;

fn cf8(df: DeviceFunction, off: u8) -> u32 {
    0x8000_0000 | (u32::from(df.bus) << 16) | (u32::from(df.device) << 11) | (u32::from(df.function) << 8) | u32::from(off & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, off: u8) -> u32 {
        outl(0xcf8, cf8(df, off));
        inl(0xcfc)
    }
    fn write_word(&mut self, df: DeviceFunction, off: u8, data: u32) {
        outl(0xcf8, cf8(df, off));
        outl(0xcfc, data);
    }
    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

// ---- the ATA channel's ports -------------------------------------------------

/// `dom0_core::ata`'s port access: `in`/`out` on the primary ATA channel,
/// which microhv opens to Dom0 (0x1f0..=0x1f7 and 0x3f6).
struct AtaPorts;

impl ata::Ports for AtaPorts {
    fn read8(&mut self, port: u16) -> u8 {
        let v: u8;
        // SAFETY: a port read has no memory effects; the ATA ports are open
        // to Dom0 in the TSS I/O bitmap (any other port faults).
        unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem, preserves_flags)) };
        v
    }
    fn write8(&mut self, port: u16, value: u8) {
        // SAFETY: as in `read8`.
        unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags)) };
    }
    fn read_sector(&mut self, port: u16, buf: &mut [u8]) {
        // SAFETY: `rep insw` stores exactly buf.len() / 2 words at buf's
        // start, inside the exclusive borrow; DF is clear (Rust ABI).
        unsafe {
            core::arch::asm!("rep insw", in("dx") port, inout("rdi") buf.as_mut_ptr() => _, inout("rcx") buf.len() / 2 => _, options(nostack, preserves_flags))
        };
    }
    fn write_sector(&mut self, port: u16, buf: &[u8]) {
        // SAFETY: `rep outsw` only reads buf.len() / 2 words from buf; DF is
        // clear (Rust ABI).
        unsafe {
            core::arch::asm!("rep outsw", in("dx") port, inout("rsi") buf.as_ptr() => _, inout("rcx") buf.len() / 2 => _, options(nostack, readonly, preserves_flags))
        };
    }
    fn now_ns(&mut self) -> u64 {
        time::now_ns()
    }
}

// ---- DMA pool, MMIO mappings and bounce buffers (the virtio HAL) ----------

struct Pool {
    va: u64,
    ma: u64,
    used: [bool; POOL_PAGES as usize],
}

impl Pool {
    fn alloc(&mut self, pages: usize) -> Option<(u64, u64)> {
        let n = self.used.len();
        let start = (0..=n.checked_sub(pages)?).find(|&s| self.used[s..s + pages].iter().all(|u| !u))?;
        self.used[start..start + pages].iter_mut().for_each(|u| *u = true);
        let off = start as u64 * 4096;
        // SAFETY: the pool's pages are mapped read-write at `va` and ours alone.
        unsafe { core::ptr::write_bytes((self.va + off) as *mut u8, 0, pages * 4096) };
        Some((self.ma + off, self.va + off))
    }
    fn free(&mut self, ma: u64, pages: usize) {
        let start = ((ma - self.ma) / 4096) as usize;
        self.used[start..start + pages].iter_mut().for_each(|u| *u = false);
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
/// Mapped MMIO: (first machine frame, frames, virtual address).
static MMIO: Mutex<Vec<(u64, u64, u64)>> = Mutex::new(Vec::new());
static MMIO_FREE: Mutex<Vec<u64>> = Mutex::new(Vec::new());
/// Bounced buffers: (pool machine address, pages, length).
static BOUNCES: Mutex<Vec<(u64, usize, usize)>> = Mutex::new(Vec::new());

/// Sets up the DMA pool in `slots[..POOL_PAGES]` and keeps the rest for MMIO.
fn init_memory(slots: &[u64]) -> Result<(), Errno> {
    // SAFETY: no pointer arguments.
    let first = unsafe { hc::dma_populate(POOL_PAGES) }?;
    let reqs: Vec<MmuUpdate> = (0..POOL_PAGES)
        .map(|i| {
            let va = slots[i as usize];
            MmuUpdate { ptr: mm::l1_entry_maddr(va).unwrap_or(0), val: ((first + i) << 12) | mm::PTE_PRESENT | mm::PTE_RW | mm::PTE_NX }
        })
        .collect();
    mm::mmu_update(&reqs).map_err(|(_, e)| e)?;
    for &va in &slots[..POOL_PAGES as usize] {
        mm::invlpg(va);
    }
    *POOL.lock() = Some(Pool { va: slots[0], ma: first << 12, used: [false; POOL_PAGES as usize] });
    *MMIO_FREE.lock() = slots[POOL_PAGES as usize..].to_vec();
    Ok(())
}

fn pool_ma(va: u64) -> Option<u64> {
    let g = POOL.lock();
    let p = g.as_ref()?;
    (p.va..p.va + POOL_PAGES * 4096).contains(&va).then(|| p.ma + (va - p.va))
}

/// The machine address of `len` bytes at `va`, if they are machine-contiguous.
fn contiguous_ma(va: u64, len: usize) -> Option<u64> {
    if let Some(ma) = pool_ma(va) {
        return Some(ma);
    }
    let first = mm::translate(va & !0xfff)?;
    let last_page = (va + len.max(1) as u64 - 1) & !0xfff;
    let mut expect = first;
    let mut page = va & !0xfff;
    while page <= last_page {
        if mm::translate(page)? != expect {
            return None;
        }
        page += 4096;
        expect += 1;
    }
    Some((first << 12) | (va & 0xfff))
}

pub struct DomHal;

// SAFETY: dma_alloc hands out zeroed, machine-contiguous pool pages below
// 4 GiB that nothing else uses until dma_dealloc; share gives the device the
// true machine address of the buffer (or of a bounce copy) until unshare.
unsafe impl Hal for DomHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match POOL.lock().as_mut().and_then(|p| p.alloc(pages)) {
            Some((ma, va)) => (ma, NonNull::new(va as *mut u8).unwrap_or(NonNull::dangling())),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        if let Some(p) = POOL.lock().as_mut() {
            p.free(paddr, pages);
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let first = paddr >> 12;
        let frames = ((paddr + size.max(1) as u64 - 1) >> 12) - first + 1;
        let mut mmio = MMIO.lock();
        if let Some(&(f, _, va)) = mmio.iter().find(|&&(f, n, _)| first >= f && first + frames <= f + n) {
            return NonNull::new((va + ((first - f) << 12) + (paddr & 0xfff)) as *mut u8).unwrap_or(NonNull::dangling());
        }
        let mut free = MMIO_FREE.lock();
        assert!(free.len() as u64 >= frames, "out of MMIO slots for {size} bytes at {paddr:#x}");
        let slots: Vec<u64> = free.drain(..frames as usize).collect();
        // Uncached (PCD | PWT), never executable.
        let reqs: Vec<MmuUpdate> = (0..frames)
            .map(|i| MmuUpdate {
                ptr: mm::l1_entry_maddr(slots[i as usize]).unwrap_or(0),
                val: ((first + i) << 12) | mm::PTE_PRESENT | mm::PTE_RW | mm::PTE_NX | (1 << 3) | (1 << 4),
            })
            .collect();
        if let Err((_, e)) = mm::mmu_update(&reqs) {
            panic!("microhv refused to map device memory {paddr:#x}: {e}");
        }
        for &va in &slots {
            mm::invlpg(va);
        }
        mmio.push((first, frames, slots[0]));
        NonNull::new((slots[0] + (paddr & 0xfff)) as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, dir: BufferDirection) -> PhysAddr {
        let va = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len();
        if let Some(ma) = contiguous_ma(va, len) {
            return ma;
        }
        let pages = len.div_ceil(4096);
        let Some((ma, bva)) = POOL.lock().as_mut().and_then(|p| p.alloc(pages)) else {
            panic!("DMA pool exhausted bouncing {len} bytes");
        };
        if dir != BufferDirection::DeviceToDriver {
            // SAFETY: `buffer` is valid for `len` bytes (the caller's promise);
            // the bounce pages are ours and at least as long.
            unsafe { core::ptr::copy_nonoverlapping(va as *const u8, bva as *mut u8, len) };
        }
        BOUNCES.lock().push((ma, pages, len));
        ma
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, dir: BufferDirection) {
        let mut b = BOUNCES.lock();
        let Some(i) = b.iter().position(|&(ma, ..)| ma == paddr) else { return };
        let (ma, pages, len) = b.swap_remove(i);
        if dir != BufferDirection::DriverToDevice {
            let bva = pool_va(ma);
            // SAFETY: as in `share`, in the other direction.
            unsafe { core::ptr::copy_nonoverlapping(bva as *const u8, buffer.as_ptr() as *mut u8, len.min(buffer.len())) };
        }
        if let Some(p) = POOL.lock().as_mut() {
            p.free(ma, pages);
        }
    }
}

fn pool_va(ma: u64) -> u64 {
    let g = POOL.lock();
    let p = g.as_ref().expect("pool exists when bouncing");
    p.va + (ma - p.ma)
}

// ---- grant copies for the backend ----------------------------------------

struct Grants(u16);

impl Grants {
    fn copy(&self, gref: u32, offset: usize, local: u64, len: usize, flags: u32) -> Result<(), Errno> {
        let op = GrantCopy { granter: self.0, _pad: 0, gref, offset: offset as u32, len: len as u32, local_va: local, flags, _pad2: 0 };
        // SAFETY: `op` is a live local; `local` points at `len` bytes of ours.
        unsafe { hc::grant_copy(GuestVa(&op as *const GrantCopy as u64)) }.map(|_| ())
    }
}

impl GrantIo for Grants {
    fn copy_from_grant(&mut self, gref: u32, offset: usize, buf: &mut [u8]) -> Result<(), Errno> {
        self.copy(gref, offset, buf.as_mut_ptr() as u64, buf.len(), 0)
    }
    fn copy_to_grant(&mut self, gref: u32, offset: usize, data: &[u8]) -> Result<(), Errno> {
        self.copy(gref, offset, data.as_ptr() as u64, data.len(), GRANT_COPY_TO_GRANTED)
    }
}

// ---- the backend ------------------------------------------------------------

static RING_EVENTS: AtomicU64 = AtomicU64::new(0);
static IRQ_EVENTS: AtomicU64 = AtomicU64::new(0);

fn on_ring(_port: u32) {
    RING_EVENTS.fetch_add(1, Ordering::SeqCst);
}

fn on_irq(_port: u32) {
    IRQ_EVENTS.fetch_add(1, Ordering::SeqCst);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Waiting,
    Connected,
    Closed,
}

/// One DomU's virtual disk.
struct Vbd {
    domid: u16,
    name: String,
    dev: u32,
    vd: VDisk,
    conn: Conn,
    slot: u64,
    gref: u64,
    port: u32,
    ring: Option<BackRing<BlkRequest, BlkResponse>>,
    /// A flush waits here until the device has nothing else in flight.
    held_flush: Option<Job>,
    requests: u64,
    errors: u64,
    bytes: u64,
}

struct InFlight {
    token: u16,
    vbd: usize,
    job: Job,
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
}

/// The virtio-blk device and its requests in flight.
struct Virtio {
    dev: VirtIOBlk<DomHal, PciTransport>,
    irq: u32,
    irq_seen: u64,
    irqs: u64,
    bufs: Vec<(u64, u64)>,
    inflight: Vec<Option<InFlight>>,
}

/// The ATA disk and the buffer its requests go through.
struct Ata {
    disk: AtaDisk<AtaPorts>,
    buf: Vec<u8>,
}

/// The real disk.
enum Device {
    Virtio(Box<Virtio>),
    Ata(Ata),
}

/// The real disk and every virtual disk carved out of it.
pub struct Block {
    dev: Device,
    capacity: u64,
    vbds: Vec<Vbd>,
    ring_slots: Vec<u64>,
}

/// Enumerates PCI bus 0, prints what it finds, and brings up the first
/// virtio-blk device, or else the ATA disk at ata0-slave. `slots`: [`SLOTS`]
/// free virtual pages.
pub fn probe(slots: &[u64]) -> Option<Block> {
    let mut root = PciRoot::new(PortCam);
    let mut found = None;
    for (df, info) in root.enumerate_bus(0) {
        let kind = virtio_device_type(&info);
        println!(
            "pci {:02x}:{:02x}.{} {:04x}:{:04x} class {:02x}.{:02x}{}",
            df.bus, df.device, df.function, info.vendor_id, info.device_id, info.class, info.subclass,
            match kind {
                Some(t) => format!(" virtio {t:?}"),
                None => String::new(),
            }
        );
        if kind == Some(DeviceType::Block) && found.is_none() {
            found = Some(df);
        }
    }
    let dev = match found {
        Some(df) => Device::Virtio(Box::new(probe_virtio(&mut root, df, slots)?)),
        None => Device::Ata(probe_ata()?),
    };
    let capacity = match &dev {
        Device::Virtio(v) => v.dev.capacity(),
        Device::Ata(a) => a.disk.sectors(),
    };
    Some(Block { dev, capacity, vbds: Vec::new(), ring_slots: Vec::new() })
}

/// The ATA disk at the primary channel's slave position, polled.
fn probe_ata() -> Option<Ata> {
    let disk = match AtaDisk::probe(AtaPorts, ata::PRIMARY_IO, ata::PRIMARY_CONTROL, Drive::Slave, ata::DEFAULT_TIMEOUT_NS, ata::DEFAULT_MAX_POLLS) {
        Ok(d) => d,
        Err(e) => {
            let why = match e {
                AtaError::NoDevice => String::from("no ATA disk on ata0-slave"),
                e => format!("ata0-slave: {e}"),
            };
            println!("block: no virtio-blk device, {why}; virtual disks are not offered");
            return None;
        }
    };
    let sectors = disk.sectors();
    println!(
        "block: ATA disk on ata0-slave: {sectors} sectors ({} MiB), PIO, polled; model \"{}\"",
        sectors / 2048,
        disk.identity().model()
    );
    Some(Ata { disk, buf: alloc::vec![0u8; REQ_BUF] })
}

/// Brings up the virtio-blk device at `df`.
fn probe_virtio(root: &mut PciRoot<PortCam>, df: DeviceFunction, slots: &[u64]) -> Option<Virtio> {
    if let Err(e) = init_memory(&slots[..SLOTS as usize]) {
        println!("block: cannot set up the DMA pool: {e}");
        return None;
    }
    root.set_command(df, Command::IO_SPACE | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let irq = PortCam.read_word(df, 0x3c) & 0xff;
    let transport = match PciTransport::new::<DomHal, PortCam>(root, df) {
        Ok(t) => t,
        Err(e) => {
            println!("block: virtio transport: {e:?}");
            return None;
        }
    };
    let mut dev = match VirtIOBlk::<DomHal, _>::new(transport) {
        Ok(d) => d,
        Err(e) => {
            println!("block: virtio-blk: {e:?}");
            return None;
        }
    };
    let capacity = dev.capacity();
    // SAFETY: no pointer arguments.
    let port = match unsafe { hc::irq_bind(u64::from(irq)) } {
        Ok(p) => p as u32,
        Err(e) => {
            println!("block: binding interrupt line {irq}: {e}");
            return None;
        }
    };
    events::set_handler(port, on_irq);
    events::unmask_port(port);
    dev.enable_interrupts();
    let mut bufs = Vec::new();
    for _ in 0..MAX_INFLIGHT {
        let (ma, va) = DomHal::dma_alloc(REQ_BUF / 4096, BufferDirection::Both);
        bufs.push((ma, va.as_ptr() as u64));
    }
    println!(
        "block: virtio-blk at {:02x}:{:02x}.{}: {} sectors ({} MiB){}, interrupt line {irq} -> event channel {port}, DMA pool {} KiB",
        df.bus, df.device, df.function, capacity, capacity / 2048, if dev.readonly() { ", read-only" } else { "" }, POOL_PAGES * 4
    );
    Some(Virtio { dev, irq, irq_seen: 0, irqs: 0, bufs, inflight: (0..MAX_INFLIGHT).map(|_| None).collect() })
}

impl Block {
    /// Gives the backend virtual slots for mapping frontends' rings.
    pub fn add_ring_slots(&mut self, slots: Vec<u64>) {
        self.ring_slots.extend(slots);
    }

    /// Offers domain `domid` its virtual disks through the store.
    pub fn attach(&mut self, store: &mut Store, domid: u16, name: &str, disks: &[dom0_core::config::Disk]) {
        for (dev, d) in disks.iter().enumerate() {
            let dev = dev as u32;
            let end = d.start_sector.checked_add(d.sectors);
            if d.sectors == 0 || end.is_none_or(|e| e > self.capacity) {
                println!(
                    "block: {name}: disk {} (sectors {}..+{}) does not fit the {}-sector disk; not offered",
                    d.name, d.start_sector, d.sectors, self.capacity
                );
                continue;
            }
            let overlap = self.vbds.iter().find(|v| {
                v.conn != Conn::Closed && d.start_sector < v.vd.start_sector + v.vd.sectors && v.vd.start_sector < d.start_sector + d.sectors
            });
            if let Some(v) = overlap {
                println!("block: {name}: disk {} overlaps {}'s; not offered", d.name, v.name);
                continue;
            }
            let back = backend_path(domid, dev);
            let front = frontend_path(domid, dev);
            let _ = store.write(0, &format!("{back}/sectors"), format!("{}", d.sectors).as_bytes());
            let _ = store.write(0, &format!("{back}/max-segments"), format!("{BLK_MAX_SEGMENTS}").as_bytes());
            let _ = store.write(0, &format!("{back}/name"), d.name.as_bytes());
            let _ = store.write(0, &format!("{back}/state"), DeviceState::InitWait.to_str().as_bytes());
            let _ = store.set_perm(0, &back, domid, Perm::Read);
            let _ = store.write(0, &format!("{front}/backend"), back.as_bytes());
            println!("block: {name}: virtual disk {} = sectors {}..{} of the real disk", d.name, d.start_sector, d.start_sector + d.sectors);
            self.vbds.push(Vbd {
                domid,
                name: format!("{name}/{}", d.name),
                dev,
                vd: VDisk { start_sector: d.start_sector, sectors: d.sectors },
                conn: Conn::Waiting,
                slot: 0,
                gref: 0,
                port: 0,
                ring: None,
                held_flush: None,
                requests: 0,
                errors: 0,
                bytes: 0,
            });
        }
    }

    /// A domain ended: drop its virtual disks.
    pub fn domain_ended(&mut self, domid: u16) {
        for i in 0..self.vbds.len() {
            if self.vbds[i].domid == domid && self.vbds[i].conn != Conn::Closed {
                self.close(i, "domain ended");
            }
        }
    }

    fn close(&mut self, i: usize, why: &str) {
        let v = &mut self.vbds[i];
        if v.conn == Conn::Connected {
            // SAFETY: no pointers beyond our own slot address.
            let _ = unsafe { hc::grant_unmap(DomId(v.domid), v.gref, GuestVa(v.slot)) };
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::evtchn_close(u64::from(v.port)) };
            self.ring_slots.push(v.slot);
        }
        v.conn = Conn::Closed;
        v.ring = None;
        println!(
            "block: {}: disconnected ({why}): {} requests, {} bytes, {} errors",
            v.name, v.requests, v.bytes, v.errors
        );
    }

    fn connect(&mut self, i: usize, store: &mut Store) {
        let v = &self.vbds[i];
        let front = frontend_path(v.domid, v.dev);
        let state = store.read(0, &format!("{front}/state")).ok().and_then(|s| DeviceState::from_value(&s).ok());
        if state != Some(DeviceState::Initialised) {
            return;
        }
        let num = |k: &str| {
            store.read(0, &format!("{front}/{k}")).ok().and_then(|b| core::str::from_utf8(&b).ok().and_then(|s| s.trim().parse::<u64>().ok()))
        };
        let (Some(gref), Some(rport)) = (num("ring-ref"), num("event-channel")) else {
            self.close(i, "ring-ref or event-channel missing");
            return;
        };
        let Some(slot) = self.ring_slots.pop() else {
            self.close(i, "no free slot for the ring");
            return;
        };
        let domid = v.domid;
        // SAFETY: `slot` is one of our empty virtual slots.
        if let Err(e) = unsafe { hc::grant_map(DomId(domid), gref, GuestVa(slot), 1) } {
            self.ring_slots.push(slot);
            self.close(i, &format!("cannot map ring grant {gref}: {e}"));
            return;
        }
        // SAFETY: no pointer arguments.
        let port = match unsafe { hc::evtchn_bind_interdomain(DomId(domid), rport) } {
            Ok(p) => p as u32,
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { hc::grant_unmap(DomId(domid), gref, GuestVa(slot)) };
                self.ring_slots.push(slot);
                self.close(i, &format!("cannot bind event channel {rport}: {e}"));
                return;
            }
        };
        events::set_handler(port, on_ring);
        events::unmask_port(port);
        let page = SharedPage(slot as *mut u8);
        let v = &mut self.vbds[i];
        v.ring = Some(BackRing::attach(&page));
        v.slot = slot;
        v.gref = gref;
        v.port = port;
        v.conn = Conn::Connected;
        let _ = store.write(0, &format!("{}/state", backend_path(v.domid, v.dev)), DeviceState::Connected.to_str().as_bytes());
        println!("block: {}: connected (ring grant {gref}, event channel {port})", v.name);
    }

    fn respond(&mut self, i: usize, id: u64, op: u8, status: i16) {
        let v = &mut self.vbds[i];
        if status != BLK_RSP_OKAY {
            v.errors += 1;
        }
        if let Some(ring) = v.ring.as_mut() {
            let mut page = SharedPage(v.slot as *mut u8);
            if ring.push_response(&mut page, &blkback::response(id, op, status)).is_err() {
                // The frontend made the ring impossible; closed below.
                v.ring = None;
            }
        }
    }

    fn notify(&mut self, i: usize) {
        let v = &mut self.vbds[i];
        let Some(ring) = v.ring.as_mut() else { return };
        let mut page = SharedPage(v.slot as *mut u8);
        if ring.push_responses_and_check_notify(&mut page) {
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::evtchn_send(u64::from(v.port)) };
        }
    }

    /// Starts `job` on the device, or answers it at once.
    fn start(&mut self, i: usize, job: Job) {
        let domid = self.vbds[i].domid;
        let v = match &mut self.dev {
            Device::Virtio(v) => v,
            Device::Ata(a) => {
                // PIO completes here and now.
                let status = blkback::execute(&job, &mut Grants(domid), &mut a.disk, &mut a.buf);
                if status == BLK_RSP_OKAY {
                    self.vbds[i].bytes += job.bytes() as u64;
                }
                self.respond(i, job.id, job.op, status);
                return;
            }
        };
        if job.op == BLK_OP_FLUSH {
            let ok = v.dev.flush().is_ok();
            self.respond(i, job.id, job.op, if ok { BLK_RSP_OKAY } else { BLK_RSP_ERROR });
            return;
        }
        let Some(k) = v.inflight.iter().position(|s| s.is_none()) else {
            unreachable!("start called with every in-flight slot busy")
        };
        let (_, va) = v.bufs[k];
        // SAFETY: buffer k of the pool is ours and unused while slot k is free.
        let buf = unsafe { core::slice::from_raw_parts_mut(va as *mut u8, job.bytes()) };
        if job.op == BLK_OP_WRITE && blkback::gather(&job, &mut Grants(domid), buf).is_err() {
            self.respond(i, job.id, job.op, BLK_RSP_ERROR);
            return;
        }
        let mut req = Box::new(BlkReq::default());
        let mut resp = Box::new(BlkResp::default());
        // SAFETY: `req`, `buf` and `resp` stay where they are (boxed, pool)
        // until the completion below takes them back.
        let r = unsafe {
            if job.op == BLK_OP_READ {
                v.dev.read_blocks_nb(job.disk_sector as usize, &mut req, buf, &mut resp)
            } else {
                v.dev.write_blocks_nb(job.disk_sector as usize, &mut req, buf, &mut resp)
            }
        };
        match r {
            Ok(token) => v.inflight[k] = Some(InFlight { token, vbd: i, job, req, resp }),
            Err(_) => self.respond(i, job.id, job.op, BLK_RSP_ERROR),
        }
    }

    /// Answers the virtio requests the device has completed.
    fn complete(&mut self) -> bool {
        let mut any = false;
        loop {
            let Device::Virtio(v) = &mut self.dev else { return any };
            let Some(token) = v.dev.peek_used() else { return any };
            let Some(k) = v.inflight.iter().position(|s| s.as_ref().is_some_and(|f| f.token == token)) else {
                println!("block: the device completed unknown token {token}");
                return any;
            };
            any = true;
            let mut f = v.inflight[k].take().expect("found above");
            let (_, va) = v.bufs[k];
            // SAFETY: as in `start`; the request is done with the buffer.
            let buf = unsafe { core::slice::from_raw_parts_mut(va as *mut u8, f.job.bytes()) };
            // SAFETY: the same req/buf/resp as passed to the *_nb call.
            let r = unsafe {
                if f.job.op == BLK_OP_READ {
                    v.dev.complete_read_blocks(token, &f.req, buf, &mut f.resp)
                } else {
                    v.dev.complete_write_blocks(token, &f.req, buf, &mut f.resp)
                }
            };
            let i = f.vbd;
            if self.vbds[i].conn != Conn::Connected {
                continue;
            }
            let domid = self.vbds[i].domid;
            let ok = r.is_ok() && (f.job.op != BLK_OP_READ || blkback::scatter(&f.job, &mut Grants(domid), buf).is_ok());
            if ok {
                self.vbds[i].bytes += f.job.bytes() as u64;
            }
            self.respond(i, f.job.id, f.job.op, if ok { BLK_RSP_OKAY } else { BLK_RSP_ERROR });
            self.notify(i);
        }
    }

    /// Nothing on the device (a flush may start).
    fn idle(&self) -> bool {
        match &self.dev {
            Device::Virtio(v) => v.inflight.iter().all(|s| s.is_none()),
            Device::Ata(_) => true,
        }
    }

    /// No room on the device for another request.
    fn full(&self) -> bool {
        match &self.dev {
            Device::Virtio(v) => v.inflight.iter().all(|s| s.is_some()),
            Device::Ata(_) => false,
        }
    }

    /// Does all the work there is: connects frontends, completes device
    /// requests, takes new requests. Call it whenever an event arrived.
    pub fn poll(&mut self, store: &mut Store) {
        // The virtio device's interrupt: acknowledge it, take the
        // completions, then let the line fire again.
        let mut fired_line = None;
        if let Device::Virtio(v) = &mut self.dev {
            let irqs = IRQ_EVENTS.load(Ordering::SeqCst);
            if irqs != v.irq_seen {
                v.irq_seen = irqs;
                v.irqs += 1;
                v.dev.ack_interrupt();
                fired_line = Some(v.irq);
            }
        }
        self.complete();
        if let Some(line) = fired_line {
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::irq_eoi(u64::from(line)) };
        }
        for i in 0..self.vbds.len() {
            match self.vbds[i].conn {
                Conn::Waiting => self.connect(i, store),
                Conn::Connected => {
                    let v = &self.vbds[i];
                    let st = store
                        .read(0, &format!("{}/state", frontend_path(v.domid, v.dev)))
                        .ok()
                        .and_then(|s| DeviceState::from_value(&s).ok());
                    if matches!(st, Some(DeviceState::Closing | DeviceState::Closed)) && !self.busy(i) {
                        let _ = store.write(0, &format!("{}/state", backend_path(v.domid, v.dev)), DeviceState::Closed.to_str().as_bytes());
                        self.close(i, "frontend closed");
                    }
                }
                Conn::Closed => {}
            }
        }
        // New requests, round robin over the connected disks.
        loop {
            let mut took = false;
            for i in 0..self.vbds.len() {
                if self.vbds[i].conn != Conn::Connected {
                    continue;
                }
                let idle = self.idle();
                if let Some(job) = self.vbds[i].held_flush.take() {
                    if idle {
                        self.start(i, job);
                        self.notify(i);
                        took = true;
                    } else {
                        self.vbds[i].held_flush = Some(job);
                    }
                    continue;
                }
                if self.full() {
                    break;
                }
                let v = &mut self.vbds[i];
                let Some(ring) = v.ring.as_mut() else {
                    self.close(i, "ring indexes impossible (a hostile or broken frontend)");
                    continue;
                };
                let mut page = SharedPage(v.slot as *mut u8);
                let req = match ring.take_request(&page) {
                    Ok(Some(r)) => r,
                    // Empty: re-arm the frontend's notification; requests
                    // that raced in are taken on the next round.
                    Ok(None) => match ring.final_check_for_requests(&mut page) {
                        Ok(more) => {
                            took |= more;
                            continue;
                        }
                        Err(_) => {
                            self.close(i, "ring indexes impossible (a hostile or broken frontend)");
                            continue;
                        }
                    },
                    Err(_) => {
                        self.close(i, "ring indexes impossible (a hostile or broken frontend)");
                        continue;
                    }
                };
                took = true;
                v.requests += 1;
                match blkback::validate(&req, &v.vd) {
                    Err(status) => self.respond(i, req.id, req.op, status),
                    Ok(job) if job.op == BLK_OP_FLUSH => self.vbds[i].held_flush = Some(job),
                    Ok(job) => self.start(i, job),
                }
                self.notify(i);
            }
            if !took {
                break;
            }
        }
    }

    fn busy(&self, i: usize) -> bool {
        self.vbds[i].held_flush.is_some()
            || match &self.dev {
                Device::Virtio(v) => v.inflight.iter().flatten().any(|f| f.vbd == i),
                Device::Ata(_) => false,
            }
    }

    /// One line of totals, for the end of the run.
    pub fn summary(&self) -> String {
        let (r, b, e) = self.vbds.iter().fold((0, 0, 0), |a, v| (a.0 + v.requests, a.1 + v.bytes, a.2 + v.errors));
        match &self.dev {
            Device::Virtio(v) => format!("block: served {r} requests, {} KiB, {e} errors, {} device interrupts", b / 1024, v.irqs),
            Device::Ata(a) => {
                format!("block: served {r} requests, {} KiB, {e} errors, ATA PIO polled, {} channel resets", b / 1024, a.disk.resets)
            }
        }
    }
}
