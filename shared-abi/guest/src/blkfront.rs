//! The PV block frontend: a DomU's virtual disk, served by Dom0's backend
//! over a granted ring (protocol in `shared_abi::blkif`).
//!
//! ```text
//! let mut disk = BlkFront::connect(0)?;          // store handshake
//! disk.write(0, &page_aligned_buf)?;               // whole sectors
//! disk.flush()?;
//! let a = disk.start(BLK_OP_READ, 8, buf_a)?;      // several in flight
//! let b = disk.start(BLK_OP_READ, 72, buf_b)?;
//! disk.finish(a)?; disk.finish(b)?;
//! ```
//!
//! Buffers must be page-aligned, a whole number of sectors, and at most
//! [`BLK_MAX_SEGMENTS`] pages: each page is granted to Dom0 for the request
//! and the grant ended when its response arrives. A failed request comes back
//! as `Err(EIO)` (`EOPNOTSUPP` for an operation the backend does not know).
extern crate alloc;
use crate::hypercall as hc;
use crate::mm::{self, SharedPage};
use crate::{events, store, time};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::blkif::*;
use shared_abi::device::DeviceState;
use shared_abi::ring::FrontRing;
use shared_abi::{DomId, Errno, Mfn};

/// How long to wait for the backend or a response.
const WAIT_NS: u64 = 5_000_000_000;

static EVENTS: AtomicU64 = AtomicU64::new(0);

fn on_event(_port: u32) {
    EVENTS.fetch_add(1, Ordering::SeqCst);
}

/// A request on its way: its id and the grants it holds.
#[derive(Debug)]
pub struct Pending {
    pub id: u64,
    grefs: Vec<u64>,
}

/// A connected virtual disk.
pub struct BlkFront {
    path: String,
    backend: String,
    sectors: u64,
    page: SharedPage,
    ring: FrontRing<BlkRequest, BlkResponse>,
    ring_gref: u64,
    port: u32,
    next_id: u64,
    /// Responses that arrived for other requests than the one awaited.
    early: Vec<BlkResponse>,
}

impl BlkFront {
    /// Connects virtual disk `dev`: -ENOENT when the toolstack gave this
    /// domain no such disk, -ETIMEDOUT when the backend does not answer.
    pub fn connect(dev: u32) -> Result<BlkFront, Errno> {
        let si = crate::start_info();
        let path = frontend_path(si.domid, dev);
        let backend = store::read_str(&format!("{path}/backend")).map_err(|_| Errno::ENOENT)?;
        let sectors = store::read_u64(&format!("{backend}/sectors"))?;
        store::write_str(&format!("{path}/state"), DeviceState::Initialising.to_str())?;
        let layout = core::alloc::Layout::from_size_align(4096, 4096).map_err(|_| Errno::EINVAL)?;
        // SAFETY: non-zero size; the page is never freed while shared.
        let va = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
        let mfn = mm::translate(va).ok_or(Errno::EFAULT)?;
        // SAFETY: (hypercalls) no pointer arguments.
        let ring_gref = unsafe { hc::grant_access(DomId(0), Mfn(mfn), 0) }?;
        // SAFETY: as above.
        let port = unsafe { hc::evtchn_alloc_unbound(DomId(0)) }? as u32;
        events::set_handler(port, on_event);
        events::unmask_port(port);
        let mut page = SharedPage(va as *mut u8);
        let ring = FrontRing::init(&mut page);
        store::write_str(&format!("{path}/ring-ref"), &format!("{ring_gref}"))?;
        store::write_str(&format!("{path}/event-channel"), &format!("{port}"))?;
        store::write_str(&format!("{path}/state"), DeviceState::Initialised.to_str())?;
        store::wait_for(&format!("{backend}/state"), WAIT_NS, |v| DeviceState::from_value(v) == Ok(DeviceState::Connected))
            .map_err(|_| Errno::ETIMEDOUT)?;
        store::write_str(&format!("{path}/state"), DeviceState::Connected.to_str())?;
        Ok(BlkFront { path, backend, sectors, page, ring, ring_gref, port, next_id: 1, early: Vec::new() })
    }

    /// Size of the virtual disk, in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The raw ring, for tests that need to put arbitrary requests on it.
    pub fn push_raw(&mut self, req: &BlkRequest) -> Result<(), Errno> {
        self.ring.push_request(&mut self.page, req).map_err(Errno::from)?;
        self.kick();
        Ok(())
    }

    /// Writes raw bytes into the shared ring page (hostile tests only).
    pub fn scribble(&mut self, off: usize, data: &[u8]) {
        use shared_abi::ring::SharedMem;
        self.page.write(off, data);
    }

    /// Sends the event to the backend, touching nothing in the ring.
    pub fn notify(&self) {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::evtchn_send(u64::from(self.port)) };
    }

    /// Publishes pushed requests and sends the event if the backend wants it.
    pub fn kick(&mut self) {
        if self.ring.push_requests_and_check_notify(&mut self.page) {
            // SAFETY: no pointer arguments.
            let _ = unsafe { hc::evtchn_send(u64::from(self.port)) };
        }
    }

    /// The next id `start` will use.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Starts `op` (`BLK_OP_READ` or `BLK_OP_WRITE`) on `buf` from `sector`.
    pub fn start(&mut self, op: u8, sector: u64, buf: &mut [u8]) -> Result<Pending, Errno> {
        let va = buf.as_mut_ptr() as u64;
        let len = buf.len() as u64;
        if !va.is_multiple_of(4096) || len == 0 || !len.is_multiple_of(BLK_SECTOR_SIZE) || len.div_ceil(4096) > BLK_MAX_SEGMENTS as u64 {
            return Err(Errno::EINVAL);
        }
        if self.ring.free_requests() == 0 {
            return Err(Errno::EAGAIN);
        }
        let id = self.next_id();
        let mut req = BlkRequest { op, id, sector, ..Default::default() };
        let mut grefs = Vec::new();
        let mut off = 0;
        while off < len {
            let mfn = mm::translate(va + off).ok_or(Errno::EFAULT)?;
            // SAFETY: no pointer arguments. Reads need Dom0 to write the page.
            let gref = match unsafe { hc::grant_access(DomId(0), Mfn(mfn), u64::from(op == BLK_OP_WRITE)) } {
                Ok(g) => g,
                Err(e) => {
                    end_grants(&grefs);
                    return Err(e);
                }
            };
            let n = (len - off).min(4096);
            req.seg[grefs.len()] = BlkSegment { gref: gref as u32, first_sect: 0, last_sect: (n / BLK_SECTOR_SIZE - 1) as u8, _pad: 0 };
            grefs.push(gref);
            off += n;
        }
        req.nr_segments = grefs.len() as u8;
        if let Err(e) = self.push_raw(&req) {
            end_grants(&grefs);
            return Err(e);
        }
        Ok(Pending { id, grefs })
    }

    /// Waits for the response to request `id`.
    pub fn wait(&mut self, id: u64) -> Result<BlkResponse, Errno> {
        let t0 = time::now_ns();
        loop {
            if let Some(i) = self.early.iter().position(|r| r.id == id) {
                return Ok(self.early.swap_remove(i));
            }
            let seen = EVENTS.load(Ordering::SeqCst);
            while let Some(r) = self.ring.take_response(&self.page).map_err(Errno::from)? {
                if r.id == id {
                    return Ok(r);
                }
                self.early.push(r);
            }
            if self.ring.final_check_for_responses(&mut self.page).map_err(Errno::from)? {
                continue;
            }
            if time::now_ns() - t0 > WAIT_NS {
                return Err(Errno::ETIMEDOUT);
            }
            if EVENTS.load(Ordering::SeqCst) == seen {
                // SAFETY: no pointers; wakes on our event or after 10 ms.
                let _ = unsafe { hc::sched_poll(time::now_ns() + 10_000_000) };
            }
        }
    }

    /// Waits for a started request and ends its grants.
    pub fn finish(&mut self, p: Pending) -> Result<(), Errno> {
        let r = self.wait(p.id);
        end_grants(&p.grefs);
        status(r?)
    }

    /// Reads `buf.len()` bytes from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let p = self.start(BLK_OP_READ, sector, buf)?;
        self.finish(p)
    }

    /// Writes `buf` at `sector`.
    pub fn write(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let p = self.start(BLK_OP_WRITE, sector, buf)?;
        self.finish(p)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), Errno> {
        let id = self.next_id();
        self.push_raw(&BlkRequest { op: BLK_OP_FLUSH, id, ..Default::default() })?;
        status(self.wait(id)?)
    }

    /// Disconnects (the backend closes its side first).
    pub fn close(self) -> Result<(), Errno> {
        store::write_str(&format!("{}/state", self.path), DeviceState::Closing.to_str())?;
        let _ = store::wait_for(&format!("{}/state", self.backend), WAIT_NS, |v| DeviceState::from_value(v) == Ok(DeviceState::Closed));
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::evtchn_close(u64::from(self.port)) };
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::grant_end(self.ring_gref) };
        store::write_str(&format!("{}/state", self.path), DeviceState::Closed.to_str())
    }
}

fn status(r: BlkResponse) -> Result<(), Errno> {
    match r.status {
        BLK_RSP_OKAY => Ok(()),
        BLK_RSP_EOPNOTSUPP => Err(Errno::EOPNOTSUPP),
        _ => Err(Errno::EIO),
    }
}

fn end_grants(grefs: &[u64]) {
    for &g in grefs {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::grant_end(g) };
    }
}
