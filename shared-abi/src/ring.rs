//! The request/response shared ring (the semantics of Xen's `io/ring.h`): one
//! 4096-byte page shared by a front end, which produces requests and consumes
//! responses, and a back end, which does the opposite.
//!
//! # Page layout
//!
//! | offset | field | written by |
//! | --- | --- | --- |
//! | 0 | `req_prod` (u32) | front |
//! | 4 | `req_event` (u32) | back |
//! | 8 | `rsp_prod` (u32) | back |
//! | 12 | `rsp_event` (u32) | front |
//! | 16..64 | padding (zero) | |
//! | 64.. | slots | both |
//!
//! A slot is `max(size_of::<Req>(), size_of::<Resp>())` rounded up to 8 bytes;
//! the ring has the largest power-of-two number of slots that fits in the
//! 4032 bytes after the header. A request and its response share a slot: the
//! back end writes each response over the request slot at `rsp_prod_pvt`.
//!
//! Indices are free-running `u32` counters that wrap at 2^32; the slot of
//! index `i` is `i & (size - 1)`. Each end keeps its private counters in its
//! ring struct; the page holds only the published indices and the slots.
//!
//! # Notifications
//!
//! A producer publishes with `push_*_and_check_notify`, which says whether the
//! consumer asked to be told (its `*_event` index lies in the batch just
//! published); the caller then kicks the event channel. A consumer that has
//! drained the ring calls `final_check_for_*`: it re-arms `*_event` to
//! `cons + 1` and looks again, so an item published concurrently is either
//! seen or notified, never missed.
//!
//! # Hostile peers
//!
//! Everything on the page may be written by the peer at any time. A consumer
//! checks the peer's producer index before reading a slot and returns
//! [`RingError::BadIndex`] when it claims more items than can exist; slot
//! numbers are always masked, so no access leaves the page. Nothing here
//! panics on page content. After `BadIndex` the caller should treat the
//! connection as broken.

use crate::Errno;
use core::fmt;
use core::marker::PhantomData;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the shared page.
pub const PAGE_SIZE: usize = 4096;
/// Offset of the front's published request producer index.
pub const REQ_PROD_OFF: usize = 0;
/// Offset of the back's request-notification threshold.
pub const REQ_EVENT_OFF: usize = 4;
/// Offset of the back's published response producer index.
pub const RSP_PROD_OFF: usize = 8;
/// Offset of the front's response-notification threshold.
pub const RSP_EVENT_OFF: usize = 12;
/// Size of the header; slots start here.
pub const HEADER_SIZE: usize = 64;
/// Bytes available for slots.
pub const SLOT_AREA: usize = PAGE_SIZE - HEADER_SIZE;

const _: () = {
    assert!(RSP_EVENT_OFF + 4 <= HEADER_SIZE);
    assert!(HEADER_SIZE.is_multiple_of(8));
};

/// One shared 4096-byte page, as seen by one end.
///
/// Implementations over real shared memory must make `read_u32` and
/// `write_u32` sequentially-consistent atomic accesses (e.g. `AtomicU32` with
/// `SeqCst`, or volatile accesses with full fences around them), and `read` /
/// `write` volatile copies. The ring relies on this ordering:
/// slot bytes written with `write` are visible before a later `write_u32` of
/// an index (Xen's `wmb`), a `read_u32` of an index happens before later slot
/// reads (`rmb`), and a `write_u32` followed by a `read_u32` is not reordered
/// (`mb`). Integers are little-endian (native on x86_64).
///
/// Offsets passed by this crate are always in range (`off + len <= 4096`, `u32`
/// accesses 4-byte aligned).
pub trait SharedMem {
    /// Reads the `u32` at byte offset `off`.
    fn read_u32(&self, off: usize) -> u32;
    /// Writes the `u32` at byte offset `off`.
    fn write_u32(&mut self, off: usize, v: u32);
    /// Copies `buf.len()` bytes starting at `off` into `buf`.
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copies `data` to the page starting at `off`.
    fn write(&mut self, off: usize, data: &[u8]);
}

impl<T: SharedMem + ?Sized> SharedMem for &mut T {
    fn read_u32(&self, off: usize) -> u32 {
        (**self).read_u32(off)
    }
    fn write_u32(&mut self, off: usize, v: u32) {
        (**self).write_u32(off, v)
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        (**self).read(off, buf)
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        (**self).write(off, data)
    }
}

/// A page in ordinary memory, for tests and single-threaded simulators.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBuf(pub [u8; PAGE_SIZE]);

impl PageBuf {
    /// A zeroed page.
    pub const fn new() -> Self {
        PageBuf([0; PAGE_SIZE])
    }
}

impl Default for PageBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageBuf {{ header: {:?}, .. }}", &self.0[..16])
    }
}

impl SharedMem for PageBuf {
    fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_le_bytes(b)
    }
    fn write_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0[off..off + buf.len()]);
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        self.0[off..off + data.len()].copy_from_slice(data);
    }
}

/// A type that can travel in a ring slot: plain bytes, any bit pattern valid.
/// Implemented for every type with the zerocopy derives
/// `FromBytes, IntoBytes, Immutable, KnownLayout` (and `Copy`).
pub trait RingItem: FromBytes + IntoBytes + Immutable + KnownLayout + Copy {}

impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy> RingItem for T {}

/// Slot size for items of `req_size` and `rsp_size` bytes: the larger,
/// rounded up to 8.
pub const fn slot_size(req_size: usize, rsp_size: usize) -> usize {
    let m = if req_size > rsp_size { req_size } else { rsp_size };
    (m + 7) & !7
}

/// Number of slots of `slot_size` bytes: the largest power of two that fits
/// in [`SLOT_AREA`] (0 if none fits or `slot_size` is 0).
pub const fn slot_count(slot_size: usize) -> usize {
    if slot_size == 0 || slot_size > SLOT_AREA {
        return 0;
    }
    let n = SLOT_AREA / slot_size;
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Why a ring operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// No slot for this push: the ring already holds `size` unanswered
    /// requests, or (back end) every request taken has its response.
    Full,
    /// The peer published a producer index that claims more items than can
    /// exist (`prod - cons` out of range). The ring is no longer trustworthy.
    BadIndex { prod: u32, cons: u32 },
}

impl From<RingError> for Errno {
    fn from(e: RingError) -> Errno {
        match e {
            RingError::Full => Errno::ENOSPC,
            RingError::BadIndex { .. } => Errno::EIO,
        }
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Full => write!(f, "ring full"),
            RingError::BadIndex { prod, cons } => write!(f, "bad producer index {prod:#x} (consumer at {cons:#x})"),
        }
    }
}

/// Geometry of a ring carrying `Req` and `Resp` (shared by both ends).
struct Geometry<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req: RingItem, Resp: RingItem> Geometry<Req, Resp> {
    const SLOT: usize = {
        let s = slot_size(core::mem::size_of::<Req>(), core::mem::size_of::<Resp>());
        assert!(s > 0, "ring items must not be zero-sized");
        assert!(s <= SLOT_AREA, "ring items do not fit in the page");
        s
    };
    const SIZE: u32 = slot_count(Self::SLOT) as u32;

    fn slot_off(idx: u32) -> usize {
        HEADER_SIZE + (idx & (Self::SIZE - 1)) as usize * Self::SLOT
    }

    fn write_item<T: RingItem>(mem: &mut impl SharedMem, idx: u32, item: &T) {
        mem.write(Self::slot_off(idx), item.as_bytes());
    }

    fn read_item<T: RingItem>(mem: &impl SharedMem, idx: u32) -> T {
        let mut v = T::new_zeroed();
        mem.read(Self::slot_off(idx), v.as_mut_bytes());
        v
    }
}

/// Writes a fresh header: both producer indices at `start`, both event
/// thresholds at `start + 1`, padding zeroed.
fn init_header(mem: &mut impl SharedMem, start: u32) {
    mem.write(0, &[0u8; HEADER_SIZE]);
    mem.write_u32(REQ_PROD_OFF, start);
    mem.write_u32(RSP_PROD_OFF, start);
    mem.write_u32(REQ_EVENT_OFF, start.wrapping_add(1));
    mem.write_u32(RSP_EVENT_OFF, start.wrapping_add(1));
}

/// Xen's notification test: did the batch `(old, new]` just published pass
/// the consumer's `event` threshold?
fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The front end of a ring: produces `Req`, consumes `Resp`.
pub struct FrontRing<Req, Resp> {
    /// Next request index to fill (not yet visible to the back until pushed).
    req_prod_pvt: u32,
    /// Last value of `req_prod` this end published.
    req_prod_pub: u32,
    /// Next response index to read.
    rsp_cons: u32,
    _items: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req: RingItem, Resp: RingItem> fmt::Debug for FrontRing<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontRing")
            .field("req_prod_pvt", &self.req_prod_pvt)
            .field("req_prod_pub", &self.req_prod_pub)
            .field("rsp_cons", &self.rsp_cons)
            .finish()
    }
}

impl<Req: RingItem, Resp: RingItem> FrontRing<Req, Resp> {
    /// Bytes per slot.
    pub const SLOT_SIZE: usize = Geometry::<Req, Resp>::SLOT;
    /// Number of slots (a power of two).
    pub const SIZE: u32 = Geometry::<Req, Resp>::SIZE;

    /// Initialises the shared header (Xen's `SHARED_RING_INIT`) and returns
    /// the front end of an empty ring.
    pub fn init(mem: &mut impl SharedMem) -> Self {
        Self::init_at(mem, 0)
    }

    /// Like [`init`](Self::init) but with every index starting at `start`
    /// (exercises wrap-around in tests; peers need not care).
    pub fn init_at(mem: &mut impl SharedMem, start: u32) -> Self {
        init_header(mem, start);
        Self::at(start)
    }

    /// The front end of a ring whose header the back end initialised (and
    /// that has no requests in flight): continues from the page's `req_prod`.
    pub fn attach(mem: &impl SharedMem) -> Self {
        Self::at(mem.read_u32(REQ_PROD_OFF))
    }

    fn at(start: u32) -> Self {
        FrontRing { req_prod_pvt: start, req_prod_pub: start, rsp_cons: start, _items: PhantomData }
    }

    /// Next request index to be filled.
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// Next response index to be consumed.
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// Requests in flight: pushed (published or not) and not yet answered by
    /// a consumed response.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// How many more requests can be pushed now.
    pub fn free_requests(&self) -> u32 {
        Self::SIZE.saturating_sub(self.outstanding())
    }

    /// Writes `req` to the next slot. The back end sees it only after
    /// [`push_requests_and_check_notify`](Self::push_requests_and_check_notify).
    pub fn push_request(&mut self, mem: &mut impl SharedMem, req: &Req) -> Result<(), RingError> {
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        Geometry::<Req, Resp>::write_item(mem, self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed request (`req_prod = req_prod_pvt`) and returns
    /// whether the back end asked to be notified of them (its `req_event`
    /// lies in the newly published range).
    pub fn push_requests_and_check_notify(&mut self, mem: &mut impl SharedMem) -> bool {
        let old = self.req_prod_pub;
        let new = self.req_prod_pvt;
        mem.write_u32(REQ_PROD_OFF, new);
        self.req_prod_pub = new;
        let event = mem.read_u32(REQ_EVENT_OFF);
        need_notify(old, new, event)
    }

    /// Validated count of responses published and not yet consumed.
    fn unconsumed(&self, mem: &impl SharedMem) -> Result<u32, RingError> {
        let prod = mem.read_u32(RSP_PROD_OFF);
        let avail = prod.wrapping_sub(self.rsp_cons);
        // Responses can only answer published requests, and never more than
        // the ring holds.
        let asked = self.req_prod_pub.wrapping_sub(self.rsp_cons);
        if avail > asked || avail > Self::SIZE {
            return Err(RingError::BadIndex { prod, cons: self.rsp_cons });
        }
        Ok(avail)
    }

    /// Whether a response is waiting (Xen's `RING_HAS_UNCONSUMED_RESPONSES`).
    pub fn has_unconsumed_responses(&self, mem: &impl SharedMem) -> Result<bool, RingError> {
        Ok(self.unconsumed(mem)? > 0)
    }

    /// Takes the next response, if one is published.
    pub fn take_response(&mut self, mem: &impl SharedMem) -> Result<Option<Resp>, RingError> {
        if self.unconsumed(mem)? == 0 {
            return Ok(None);
        }
        let rsp = Geometry::<Req, Resp>::read_item(mem, self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Call after draining responses, before sleeping: asks to be notified of
    /// the next response (`rsp_event = rsp_cons + 1`) and checks again.
    /// `Ok(true)` means more responses arrived: keep consuming.
    pub fn final_check_for_responses(&mut self, mem: &mut impl SharedMem) -> Result<bool, RingError> {
        if self.has_unconsumed_responses(mem)? {
            return Ok(true);
        }
        mem.write_u32(RSP_EVENT_OFF, self.rsp_cons.wrapping_add(1));
        self.has_unconsumed_responses(mem)
    }
}

/// The back end of a ring: consumes `Req`, produces `Resp`.
pub struct BackRing<Req, Resp> {
    /// Next response index to fill (not yet visible to the front until pushed).
    rsp_prod_pvt: u32,
    /// Last value of `rsp_prod` this end published.
    rsp_prod_pub: u32,
    /// Next request index to read.
    req_cons: u32,
    _items: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req: RingItem, Resp: RingItem> fmt::Debug for BackRing<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackRing")
            .field("rsp_prod_pvt", &self.rsp_prod_pvt)
            .field("rsp_prod_pub", &self.rsp_prod_pub)
            .field("req_cons", &self.req_cons)
            .finish()
    }
}

impl<Req: RingItem, Resp: RingItem> BackRing<Req, Resp> {
    /// Bytes per slot.
    pub const SLOT_SIZE: usize = Geometry::<Req, Resp>::SLOT;
    /// Number of slots (a power of two).
    pub const SIZE: u32 = Geometry::<Req, Resp>::SIZE;

    /// Initialises the shared header (for a back end that owns the page) and
    /// returns the back end of an empty ring.
    pub fn init(mem: &mut impl SharedMem) -> Self {
        Self::init_at(mem, 0)
    }

    /// Like [`init`](Self::init) but with every index starting at `start`.
    pub fn init_at(mem: &mut impl SharedMem, start: u32) -> Self {
        init_header(mem, start);
        Self::at(start)
    }

    /// The back end of a ring the front end initialised: continues from the
    /// page's `rsp_prod` (Xen's `BACK_RING_ATTACH`). Requests already
    /// published beyond it are taken normally.
    pub fn attach(mem: &impl SharedMem) -> Self {
        Self::at(mem.read_u32(RSP_PROD_OFF))
    }

    fn at(start: u32) -> Self {
        BackRing { rsp_prod_pvt: start, rsp_prod_pub: start, req_cons: start, _items: PhantomData }
    }

    /// Next response index to be filled.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Next request index to be consumed.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Requests taken and not yet answered with [`push_response`](Self::push_response).
    pub fn unanswered(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Validated count of requests published and not yet consumed.
    fn unconsumed(&self, mem: &impl SharedMem) -> Result<u32, RingError> {
        let prod = mem.read_u32(REQ_PROD_OFF);
        let avail = prod.wrapping_sub(self.req_cons);
        // A correct front never has more than SIZE requests past the
        // responses this end produced, so the slots of unanswered requests
        // are never reused before their response is written.
        let room = Self::SIZE.saturating_sub(self.unanswered());
        if avail > room {
            return Err(RingError::BadIndex { prod, cons: self.req_cons });
        }
        Ok(avail)
    }

    /// Whether a request is waiting (Xen's `RING_HAS_UNCONSUMED_REQUESTS`).
    pub fn has_unconsumed_requests(&self, mem: &impl SharedMem) -> Result<bool, RingError> {
        Ok(self.unconsumed(mem)? > 0)
    }

    /// Takes the next request, if one is published.
    pub fn take_request(&mut self, mem: &impl SharedMem) -> Result<Option<Req>, RingError> {
        if self.unconsumed(mem)? == 0 {
            return Ok(None);
        }
        let req = Geometry::<Req, Resp>::read_item(mem, self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Writes `rsp` as the answer to the oldest unanswered request (into that
    /// request's slot). `Full` if every taken request is answered already.
    /// The front end sees it only after
    /// [`push_responses_and_check_notify`](Self::push_responses_and_check_notify).
    pub fn push_response(&mut self, mem: &mut impl SharedMem, rsp: &Resp) -> Result<(), RingError> {
        if self.unanswered() == 0 {
            return Err(RingError::Full);
        }
        Geometry::<Req, Resp>::write_item(mem, self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed response (`rsp_prod = rsp_prod_pvt`) and returns
    /// whether the front end asked to be notified of them.
    pub fn push_responses_and_check_notify(&mut self, mem: &mut impl SharedMem) -> bool {
        let old = self.rsp_prod_pub;
        let new = self.rsp_prod_pvt;
        mem.write_u32(RSP_PROD_OFF, new);
        self.rsp_prod_pub = new;
        let event = mem.read_u32(RSP_EVENT_OFF);
        need_notify(old, new, event)
    }

    /// Call after draining requests, before sleeping: asks to be notified of
    /// the next request (`req_event = req_cons + 1`) and checks again.
    /// `Ok(true)` means more requests arrived: keep consuming.
    pub fn final_check_for_requests(&mut self, mem: &mut impl SharedMem) -> Result<bool, RingError> {
        if self.has_unconsumed_requests(mem)? {
            return Ok(true);
        }
        mem.write_u32(REQ_EVENT_OFF, self.req_cons.wrapping_add(1));
        self.has_unconsumed_requests(mem)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::cell::{Cell, RefCell};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct SmallReq {
        id: u64,
        op: u32,
        arg: u32,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct SmallRsp {
        id: u64,
        status: i32,
        _pad: u32,
        data: [u8; 16],
    }

    /// Big enough that the ring has only 16 slots, so tests hit `Full` often.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct BigReq {
        id: u32,
        body: [u8; 196],
    }

    /// Odd size (13 bytes): exercises the rounding of the slot size.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct OddRsp {
        id: [u8; 4],
        tag: [u8; 9],
    }

    type Small = (FrontRing<SmallReq, SmallRsp>, BackRing<SmallReq, SmallRsp>);
    type BigFront = FrontRing<BigReq, OddRsp>;
    type BigBack = BackRing<BigReq, OddRsp>;

    fn big(id: u32) -> BigReq {
        BigReq { id, body: [id as u8; 196] }
    }

    fn odd(id: u32) -> OddRsp {
        OddRsp { id: id.to_le_bytes(), tag: [!(id as u8); 9] }
    }

    fn small_pair(mem: &mut PageBuf, start: u32) -> Small {
        let f = FrontRing::init_at(mem, start);
        let b = BackRing::attach(mem);
        (f, b)
    }

    #[test]
    fn geometry() {
        assert_eq!(slot_size(16, 32), 32);
        assert_eq!(slot_size(13, 1), 16);
        assert_eq!(slot_count(8), 256);
        assert_eq!(slot_count(32), 64);
        assert_eq!(slot_count(4032), 1);
        assert_eq!(slot_count(4033), 0);
        assert_eq!(slot_count(0), 0);
        assert_eq!(FrontRing::<SmallReq, SmallRsp>::SLOT_SIZE, 32);
        assert_eq!(FrontRing::<SmallReq, SmallRsp>::SIZE, 64);
        assert_eq!(BigFront::SLOT_SIZE, 200);
        assert_eq!(BigBack::SIZE, 16);
        assert_eq!(FrontRing::<u8, u8>::SIZE, 256);
        assert_eq!(FrontRing::<u8, u8>::SLOT_SIZE, 8);
    }

    #[test]
    fn init_writes_header() {
        let mut mem = PageBuf([0xAA; PAGE_SIZE]);
        let f: BigFront = FrontRing::init(&mut mem);
        assert_eq!(mem.read_u32(REQ_PROD_OFF), 0);
        assert_eq!(mem.read_u32(RSP_PROD_OFF), 0);
        assert_eq!(mem.read_u32(REQ_EVENT_OFF), 1);
        assert_eq!(mem.read_u32(RSP_EVENT_OFF), 1);
        assert!(mem.0[16..HEADER_SIZE].iter().all(|&b| b == 0));
        assert_eq!(f.free_requests(), 16);
        // Slots are not touched.
        assert_eq!(mem.0[HEADER_SIZE], 0xAA);
    }

    #[test]
    fn request_response_round_trip_and_layout() {
        let mut mem = PageBuf::new();
        let (mut f, mut b) = small_pair(&mut mem, 0);
        let req = SmallReq { id: 7, op: 1, arg: 99 };
        f.push_request(&mut mem, &req).unwrap();
        // Not visible until published.
        assert_eq!(b.take_request(&mem), Ok(None));
        assert!(f.push_requests_and_check_notify(&mut mem));
        assert_eq!(mem.read_u32(REQ_PROD_OFF), 1);
        // Slot 0 starts at offset 64.
        assert_eq!(&mem.0[64..72], &7u64.to_le_bytes());
        assert_eq!(b.take_request(&mem), Ok(Some(req)));
        assert_eq!(b.take_request(&mem), Ok(None));
        let rsp = SmallRsp { id: 7, status: -2, _pad: 0, data: [5; 16] };
        b.push_response(&mut mem, &rsp).unwrap();
        assert_eq!(b.push_response(&mut mem, &rsp), Err(RingError::Full));
        assert!(b.push_responses_and_check_notify(&mut mem));
        assert_eq!(f.take_response(&mem), Ok(Some(rsp)));
        assert_eq!(f.take_response(&mem), Ok(None));
        assert_eq!(f.free_requests(), 64);
    }

    #[test]
    fn full_ring_refuses_and_recovers() {
        let mut mem = PageBuf::new();
        let mut f: BigFront = FrontRing::init_at(&mut mem, u32::MAX - 5);
        let mut b: BigBack = BackRing::attach(&mem);
        for i in 0..16 {
            f.push_request(&mut mem, &big(i)).unwrap();
        }
        assert_eq!(f.push_request(&mut mem, &big(99)), Err(RingError::Full));
        f.push_requests_and_check_notify(&mut mem);
        for i in 0..16 {
            assert_eq!(b.take_request(&mem).unwrap(), Some(big(i)));
        }
        assert_eq!(f.free_requests(), 0);
        b.push_response(&mut mem, &odd(0)).unwrap();
        b.push_responses_and_check_notify(&mut mem);
        assert_eq!(f.take_response(&mem).unwrap(), Some(odd(0)));
        assert_eq!(f.free_requests(), 1);
        f.push_request(&mut mem, &big(16)).unwrap();
        assert!(f.req_prod_pvt() < 100, "indices wrapped");
    }

    #[test]
    fn notification_follows_event_threshold() {
        let mut mem = PageBuf::new();
        let (mut f, mut b) = small_pair(&mut mem, 0);
        let r = SmallReq { id: 0, op: 0, arg: 0 };
        // req_event = 1: the first publish notifies.
        f.push_request(&mut mem, &r).unwrap();
        assert!(f.push_requests_and_check_notify(&mut mem));
        // The back has not re-armed: no more notifications.
        f.push_request(&mut mem, &r).unwrap();
        assert!(!f.push_requests_and_check_notify(&mut mem));
        // Publishing nothing never notifies.
        assert!(!f.push_requests_and_check_notify(&mut mem));
        while b.take_request(&mem).unwrap().is_some() {}
        assert_eq!(b.final_check_for_requests(&mut mem), Ok(false));
        assert_eq!(mem.read_u32(REQ_EVENT_OFF), 3);
        f.push_request(&mut mem, &r).unwrap();
        f.push_request(&mut mem, &r).unwrap();
        assert!(f.push_requests_and_check_notify(&mut mem));
        // final_check sees the pending work without re-arming.
        assert_eq!(b.final_check_for_requests(&mut mem), Ok(true));
        assert_eq!(mem.read_u32(REQ_EVENT_OFF), 3);
    }

    #[test]
    fn back_attach_continues_from_page() {
        let mut mem = PageBuf::new();
        let mut f: BigFront = FrontRing::init_at(&mut mem, 1000);
        f.push_request(&mut mem, &big(1)).unwrap();
        f.push_requests_and_check_notify(&mut mem);
        let mut b: BigBack = BackRing::attach(&mem);
        assert_eq!(b.req_cons(), 1000);
        assert_eq!(b.take_request(&mem).unwrap(), Some(big(1)));
        let f2: BigFront = FrontRing::attach(&mem);
        assert_eq!(f2.req_prod_pvt(), 1001);
    }

    #[test]
    fn bad_request_index_is_rejected() {
        let mut mem = PageBuf::new();
        let (_f, mut b) = small_pair(&mut mem, 10);
        mem.write_u32(REQ_PROD_OFF, 10 + 65);
        assert_eq!(b.take_request(&mem), Err(RingError::BadIndex { prod: 75, cons: 10 }));
        // Producer index behind the consumer: a huge wrapping distance.
        mem.write_u32(REQ_PROD_OFF, 9);
        assert_eq!(b.take_request(&mem), Err(RingError::BadIndex { prod: 9, cons: 10 }));
        assert_eq!(b.final_check_for_requests(&mut mem), Err(RingError::BadIndex { prod: 9, cons: 10 }));
        // Exactly a full ring is fine.
        mem.write_u32(REQ_PROD_OFF, 10 + 64);
        for _ in 0..64 {
            assert!(b.take_request(&mem).unwrap().is_some());
        }
        assert_eq!(b.take_request(&mem), Ok(None));
        // With 64 unanswered, even one more request is a lie.
        mem.write_u32(REQ_PROD_OFF, 10 + 65);
        assert_eq!(b.take_request(&mem), Err(RingError::BadIndex { prod: 75, cons: 74 }));
    }

    #[test]
    fn responses_ahead_of_requests_are_rejected() {
        let mut mem = PageBuf::new();
        let (mut f, _b) = small_pair(&mut mem, u32::MAX);
        mem.write_u32(RSP_PROD_OFF, 0); // one "response", no request made
        assert_eq!(f.take_response(&mem), Err(RingError::BadIndex { prod: 0, cons: u32::MAX }));
        // A pushed but unpublished request does not count either.
        f.push_request(&mut mem, &SmallReq { id: 1, op: 0, arg: 0 }).unwrap();
        assert!(f.take_response(&mem).is_err());
        f.push_requests_and_check_notify(&mut mem);
        assert!(f.take_response(&mem).unwrap().is_some());
        assert_eq!(f.final_check_for_responses(&mut mem), Ok(false));
        assert_eq!(mem.read_u32(RSP_EVENT_OFF), 1);
    }

    #[test]
    fn ring_error_maps_to_errno() {
        assert_eq!(Errno::from(RingError::Full), Errno::ENOSPC);
        assert_eq!(Errno::from(RingError::BadIndex { prod: 0, cons: 1 }), Errno::EIO);
    }

    // ---- Model-based interleavings -------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        PushReq,
        PublishReqs,
        TakeReq,
        PushRsp,
        PublishRsps,
        TakeRsp,
        FinalCheckReqs,
        FinalCheckRsps,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::PushReq),
            1 => Just(Op::PublishReqs),
            2 => Just(Op::TakeReq),
            2 => Just(Op::PushRsp),
            1 => Just(Op::PublishRsps),
            2 => Just(Op::TakeRsp),
            1 => Just(Op::FinalCheckReqs),
            1 => Just(Op::FinalCheckRsps),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn interleavings_match_a_queue_model(
            start in prop_oneof![Just(u32::MAX), (u32::MAX - 40)..=u32::MAX, any::<u32>()],
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let mut mem = PageBuf::new();
            let mut f: BigFront = FrontRing::init_at(&mut mem, start);
            let mut b: BigBack = BackRing::attach(&mem);
            let size = BigFront::SIZE as usize;
            // Model: requests pushed but unpublished, published but untaken,
            // taken but unanswered, responses pushed but unpublished,
            // responses published but untaken.
            let mut req_unpub: VecDeque<u32> = VecDeque::new();
            let mut req_pub: VecDeque<u32> = VecDeque::new();
            let mut taken: VecDeque<u32> = VecDeque::new();
            let mut rsp_unpub: VecDeque<u32> = VecDeque::new();
            let mut rsp_pub: VecDeque<u32> = VecDeque::new();
            let mut next_id = 0u32;
            for op in ops {
                let in_flight = req_unpub.len() + req_pub.len() + taken.len() + rsp_unpub.len() + rsp_pub.len();
                match op {
                    Op::PushReq => {
                        let r = f.push_request(&mut mem, &big(next_id));
                        if in_flight == size {
                            prop_assert_eq!(r, Err(RingError::Full));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            req_unpub.push_back(next_id);
                            next_id += 1;
                        }
                    }
                    Op::PublishReqs => {
                        let had_new = !req_unpub.is_empty();
                        let n = f.push_requests_and_check_notify(&mut mem);
                        prop_assert!(had_new || !n, "notified for an empty batch");
                        req_pub.extend(req_unpub.drain(..));
                    }
                    Op::TakeReq => {
                        let got = b.take_request(&mem).unwrap();
                        let want = req_pub.pop_front();
                        prop_assert_eq!(got, want.map(big));
                        taken.extend(want);
                    }
                    Op::PushRsp => {
                        let want = taken.pop_front();
                        let r = b.push_response(&mut mem, &odd(want.unwrap_or(0)));
                        match want {
                            Some(id) => { prop_assert_eq!(r, Ok(())); rsp_unpub.push_back(id); }
                            None => prop_assert_eq!(r, Err(RingError::Full)),
                        }
                    }
                    Op::PublishRsps => {
                        b.push_responses_and_check_notify(&mut mem);
                        rsp_pub.extend(rsp_unpub.drain(..));
                    }
                    Op::TakeRsp => {
                        let got = f.take_response(&mem).unwrap();
                        prop_assert_eq!(got, rsp_pub.pop_front().map(odd));
                    }
                    Op::FinalCheckReqs => {
                        prop_assert_eq!(b.final_check_for_requests(&mut mem), Ok(!req_pub.is_empty()));
                    }
                    Op::FinalCheckRsps => {
                        prop_assert_eq!(f.final_check_for_responses(&mut mem), Ok(!rsp_pub.is_empty()));
                    }
                }
                let in_flight = req_unpub.len() + req_pub.len() + taken.len() + rsp_unpub.len() + rsp_pub.len();
                prop_assert_eq!(f.free_requests() as usize, size - in_flight);
                prop_assert_eq!(b.unanswered() as usize, taken.len());
            }
        }
    }

    // ---- Notifications under racing steps ------------------------------

    /// A page whose `read_u32`/`write_u32`, as used by the consumer, may first
    /// run producer steps: this interleaves the producer with every step
    /// inside the consumer's `final_check_for_requests`.
    struct Racy {
        page: RefCell<PageBuf>,
        front: RefCell<BigFront>,
        /// One entry per consumer index access: produce this many requests
        /// (and publish them) before the access.
        schedule: RefCell<VecDeque<u8>>,
        produced: Cell<u32>,
        total: u32,
        notifications: Cell<u32>,
    }

    impl Racy {
        fn maybe_produce(&self) {
            let n = self.schedule.borrow_mut().pop_front().unwrap_or(0);
            if n > 0 {
                self.produce(n as u32);
            }
        }

        /// Producer: reap responses, push up to `n` requests, publish, count
        /// notifications.
        fn produce(&self, n: u32) {
            let mut page = self.page.borrow_mut();
            let mut front = self.front.borrow_mut();
            while front.take_response(&*page).unwrap().is_some() {}
            let mut pushed = false;
            for _ in 0..n {
                if self.produced.get() == self.total || front.free_requests() == 0 {
                    break;
                }
                front.push_request(&mut *page, &big(self.produced.get())).unwrap();
                self.produced.set(self.produced.get() + 1);
                pushed = true;
            }
            if front.push_requests_and_check_notify(&mut *page) {
                assert!(pushed, "notified without new requests");
                self.notifications.set(self.notifications.get() + 1);
            }
        }
    }

    impl SharedMem for Racy {
        fn read_u32(&self, off: usize) -> u32 {
            self.maybe_produce();
            self.page.borrow().read_u32(off)
        }
        fn write_u32(&mut self, off: usize, v: u32) {
            self.maybe_produce();
            self.page.borrow_mut().write_u32(off, v)
        }
        fn read(&self, off: usize, buf: &mut [u8]) {
            self.page.borrow().read(off, buf)
        }
        fn write(&mut self, off: usize, data: &[u8]) {
            self.page.borrow_mut().write(off, data)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The consumer sleeps after a failed final check and wakes only on a
        /// notification. Whatever the interleaving, it never sleeps while a
        /// request is waiting, and each notification answers one re-arm.
        #[test]
        fn consumer_following_final_check_never_misses(
            start in prop_oneof![(u32::MAX - 20)..=u32::MAX, any::<u32>()],
            total in 1u32..120,
            schedule in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => 1u8..20], 0..600),
            producer_steps in proptest::collection::vec(1u8..20, 0..60),
        ) {
            let mut page = PageBuf::new();
            let front = BigFront::init_at(&mut page, start);
            let mut back: BigBack = BackRing::attach(&page);
            let mut mem = Racy {
                page: RefCell::new(page),
                front: RefCell::new(front),
                schedule: RefCell::new(schedule.into_iter().collect()),
                produced: Cell::new(0),
                total,
                notifications: Cell::new(0),
            };
            let mut consumed = 0u32;
            // The initial req_event counts as the first arm.
            let mut arms = 1u32;
            let mut awake = false;
            let mut seen_notifications = 0;
            let mut steps = producer_steps.into_iter();
            loop {
                if mem.notifications.get() > seen_notifications {
                    seen_notifications = mem.notifications.get();
                    awake = true;
                }
                if awake {
                    // Drain, answering each request, then the final check.
                    while let Some(req) = back.take_request(&mem).unwrap() {
                        prop_assert_eq!(req.id, consumed);
                        consumed += 1;
                        back.push_response(&mut mem, &odd(req.id)).unwrap();
                    }
                    back.push_responses_and_check_notify(&mut mem);
                    let event_before = mem.page.borrow().read_u32(REQ_EVENT_OFF);
                    let more = back.final_check_for_requests(&mut mem).unwrap();
                    if mem.page.borrow().read_u32(REQ_EVENT_OFF) != event_before {
                        arms += 1;
                    }
                    if !more {
                        awake = false;
                        // Going to sleep: nothing may be waiting unseen
                        // unless a notification for it is on its way.
                        let waiting = back.has_unconsumed_requests(&*mem.page.borrow()).unwrap();
                        prop_assert!(!waiting || mem.notifications.get() > seen_notifications,
                            "asleep with a request waiting and no notification");
                    }
                    continue;
                }
                // Asleep: only the producer runs.
                match steps.next() {
                    Some(n) => mem.produce(n as u32),
                    None if mem.produced.get() < total => mem.produce(20),
                    None => break,
                }
                if mem.notifications.get() == seen_notifications
                    && mem.produced.get() == total
                    && steps.len() == 0
                {
                    break;
                }
                // A full ring with nothing reaped can stall the producer
                // only while the consumer sleeps with work: covered above.
            }
            prop_assert_eq!(consumed, total, "every request was consumed");
            prop_assert!(mem.notifications.get() <= arms, "{} notifications for {} arms", mem.notifications.get(), arms);
        }
    }

    // ---- Hostile peer --------------------------------------------------

    /// Asserts that the ring only touches the header and whole slots.
    struct Checked {
        page: PageBuf,
        slot: usize,
        size: usize,
    }

    impl Checked {
        fn check_slot(&self, off: usize, len: usize) {
            assert!(off >= HEADER_SIZE, "slot access in the header at {off}");
            let rel = off - HEADER_SIZE;
            assert_eq!(rel % self.slot, 0, "misaligned slot access at {off}");
            assert!(rel / self.slot < self.size, "slot {} out of range", rel / self.slot);
            assert!(len <= self.slot);
        }
    }

    impl SharedMem for Checked {
        fn read_u32(&self, off: usize) -> u32 {
            assert!(off < 16 && off.is_multiple_of(4));
            self.page.read_u32(off)
        }
        fn write_u32(&mut self, off: usize, v: u32) {
            assert!(off < 16 && off.is_multiple_of(4));
            self.page.write_u32(off, v)
        }
        fn read(&self, off: usize, buf: &mut [u8]) {
            self.check_slot(off, buf.len());
            self.page.read(off, buf)
        }
        fn write(&mut self, off: usize, data: &[u8]) {
            if off != 0 {
                self.check_slot(off, data.len());
            }
            self.page.write(off, data)
        }
    }

    #[derive(Debug, Clone)]
    enum Attack {
        /// Overwrite one header word with an arbitrary value.
        Poke(usize, u32),
        /// Set a producer index close to the victim's consumer index.
        Near(usize, i8),
        Op(Op),
    }

    fn attack() -> impl Strategy<Value = Attack> {
        prop_oneof![
            1 => (0usize..4, any::<u32>()).prop_map(|(w, v)| Attack::Poke(w, v)),
            1 => (0usize..2, any::<i8>()).prop_map(|(w, d)| Attack::Near(w, d)),
            4 => op().prop_map(Attack::Op),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn hostile_header_values_never_panic(
            start in any::<u32>(),
            slots in proptest::collection::vec(any::<u8>(), SLOT_AREA),
            attacks in proptest::collection::vec(attack(), 1..300),
        ) {
            let mut page = PageBuf::new();
            page.0[HEADER_SIZE..].copy_from_slice(&slots);
            let mut mem = Checked { page, slot: BigFront::SLOT_SIZE, size: BigFront::SIZE as usize };
            let mut f: BigFront = FrontRing::init_at(&mut mem, start);
            let mut b: BigBack = BackRing::attach(&mem);
            let ok_or_bad = |r: Result<bool, RingError>| matches!(r, Ok(_) | Err(RingError::BadIndex { .. }));
            for a in attacks {
                match a {
                    Attack::Poke(w, v) => mem.page.write_u32(w * 4, v),
                    Attack::Near(w, d) => {
                        let (off, base) = if w == 0 { (REQ_PROD_OFF, b.req_cons()) } else { (RSP_PROD_OFF, f.rsp_cons()) };
                        mem.page.write_u32(off, base.wrapping_add(d as i32 as u32));
                    }
                    Attack::Op(op) => match op {
                        Op::PushReq => { let _ = f.push_request(&mut mem, &big(1)); }
                        Op::PublishReqs => { f.push_requests_and_check_notify(&mut mem); }
                        Op::TakeReq => prop_assert!(ok_or_bad(b.take_request(&mem).map(|r| r.is_some()))),
                        Op::PushRsp => { let _ = b.push_response(&mut mem, &odd(1)); }
                        Op::PublishRsps => { b.push_responses_and_check_notify(&mut mem); }
                        Op::TakeRsp => prop_assert!(ok_or_bad(f.take_response(&mem).map(|r| r.is_some()))),
                        Op::FinalCheckReqs => prop_assert!(ok_or_bad(b.final_check_for_requests(&mut mem))),
                        Op::FinalCheckRsps => prop_assert!(ok_or_bad(f.final_check_for_responses(&mut mem))),
                    },
                }
                // The private counters stay consistent whatever the page says.
                prop_assert!(f.outstanding() <= BigFront::SIZE);
                prop_assert!(b.unanswered() <= BigBack::SIZE);
            }
        }
    }
}
