//! The PV block protocol: what a block frontend (in a DomU) and the block
//! backend (in Dom0) exchange over one shared ring page.
//!
//! # Connecting (through the store)
//!
//! The toolstack writes, for virtual disk `<dev>` of domain `<id>`:
//! * `/local/domain/<id>/device/vbd/<dev>/backend`: the backend's directory,
//!   `/local/domain/0/backend/vbd/<id>/<dev>`, which the frontend may read;
//! * in that directory: `sectors` (the disk's size in 512-byte sectors),
//!   `max-segments` ([`BLK_MAX_SEGMENTS`]) and `state`.
//!
//! The frontend grants a zeroed page to Dom0, initialises a
//! [`FrontRing`](crate::ring::FrontRing)`<`[`BlkRequest`]`, `[`BlkResponse`]`>`
//! in it, offers an event channel to Dom0, writes `ring-ref` and
//! `event-channel` in its `device/vbd/<dev>/` directory and sets its `state`
//! to `Initialised`. The backend maps the ring, binds the channel and sets
//! its own `state` to `Connected`; the frontend then sets `Connected` too.
//! Closing is the reverse ([`crate::device`]).
//!
//! # Requests
//!
//! A request names an operation, a start sector of the virtual disk and up to
//! [`BLK_MAX_SEGMENTS`] segments. Each segment is a grant reference (granted
//! by the frontend to Dom0) and a range of 512-byte sectors inside that page,
//! `first_sect..=last_sect` (0..=7). The segments are consecutive on disk: the
//! request covers `sum(last_sect - first_sect + 1)` sectors from `sector`.
//! Reads need writable grants; writes may use read-only ones.
//!
//! The backend answers every request it takes off the ring with exactly one
//! [`BlkResponse`] carrying the request's `id`, in any order. A request that
//! fails any check is answered with [`BLK_RSP_ERROR`] and changes nothing:
//! an unknown `op` gets [`BLK_RSP_EOPNOTSUPP`]. A ring whose indexes are
//! impossible (the producer more than a ring ahead) is disconnected.
use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes in a sector; `sector` and the segment ranges count these.
pub const BLK_SECTOR_SIZE: u64 = 512;
/// Sectors in one page (a segment covers at most one page).
pub const BLK_SECTORS_PER_PAGE: u8 = 8;
/// Most segments (pages) in one request.
pub const BLK_MAX_SEGMENTS: usize = 8;

/// Read sectors into the granted pages.
pub const BLK_OP_READ: u8 = 0;
/// Write the granted pages to the sectors.
pub const BLK_OP_WRITE: u8 = 1;
/// Make every completed write durable (no segments, `sector` ignored).
pub const BLK_OP_FLUSH: u8 = 3;

/// The request was carried out.
pub const BLK_RSP_OKAY: i16 = 0;
/// The request was refused or the device failed it.
pub const BLK_RSP_ERROR: i16 = -1;
/// The backend does not know the operation.
pub const BLK_RSP_EOPNOTSUPP: i16 = -2;

/// One page of a request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkSegment {
    /// Grant reference of the page (granted to Dom0).
    pub gref: u32,
    /// First sector of the page used, 0..=7.
    pub first_sect: u8,
    /// Last sector of the page used, `first_sect..=7`.
    pub last_sect: u8,
    pub _pad: u16,
}

/// A request on the block ring.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkRequest {
    /// `BLK_OP_*`.
    pub op: u8,
    /// Segments used, 0..=[`BLK_MAX_SEGMENTS`] (0 only for a flush).
    pub nr_segments: u8,
    pub _pad: [u8; 6],
    /// The frontend's tag, echoed in the response.
    pub id: u64,
    /// First sector of the virtual disk.
    pub sector: u64,
    pub seg: [BlkSegment; BLK_MAX_SEGMENTS],
}

/// The answer to one request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkResponse {
    /// The request's `id`.
    pub id: u64,
    /// The request's `op`.
    pub op: u8,
    pub _pad: u8,
    /// `BLK_RSP_*`.
    pub status: i16,
    pub _pad2: u32,
}


const _: () = assert!(size_of::<BlkSegment>() == 8);
const _: () = assert!(size_of::<BlkRequest>() == 24 + 8 * BLK_MAX_SEGMENTS);
const _: () = assert!(size_of::<BlkResponse>() == 16);

impl BlkRequest {
    /// Sectors the request covers, or `None` when a segment's range is
    /// malformed (or `nr_segments` too large).
    pub fn sectors(&self) -> Option<u64> {
        let n = self.nr_segments as usize;
        if n > BLK_MAX_SEGMENTS {
            return None;
        }
        let mut total = 0u64;
        for s in &self.seg[..n] {
            if s.first_sect > s.last_sect || s.last_sect >= BLK_SECTORS_PER_PAGE {
                return None;
            }
            total += u64::from(s.last_sect - s.first_sect) + 1;
        }
        Some(total)
    }
}

/// The store directory of the backend of `domid`'s virtual disk `dev`.
pub fn backend_path(domid: u16, dev: u32) -> alloc::string::String {
    alloc::format!("/local/domain/0/backend/vbd/{domid}/{dev}")
}

/// The frontend's directory (inside its home) for virtual disk `dev`.
pub fn frontend_path(domid: u16, dev: u32) -> alloc::string::String {
    alloc::format!("/local/domain/{domid}/device/vbd/{dev}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{BackRing, FrontRing, PageBuf};

    fn seg(first: u8, last: u8) -> BlkSegment {
        BlkSegment { gref: 1, first_sect: first, last_sect: last, _pad: 0 }
    }

    #[test]
    fn sectors_counts_each_segment_range() {
        let mut r = BlkRequest { op: BLK_OP_READ, nr_segments: 2, ..Default::default() };
        r.seg[0] = seg(0, 7);
        r.seg[1] = seg(2, 3);
        assert_eq!(r.sectors(), Some(10));
        r.seg[1] = seg(4, 3);
        assert_eq!(r.sectors(), None);
        r.seg[1] = seg(0, 8);
        assert_eq!(r.sectors(), None);
        r.nr_segments = (BLK_MAX_SEGMENTS + 1) as u8;
        assert_eq!(r.sectors(), None);
    }

    #[test]
    fn a_request_crosses_the_ring_intact() {
        let mut page = PageBuf::new();
        let mut front: FrontRing<BlkRequest, BlkResponse> = FrontRing::init(&mut page);
        let mut back: BackRing<BlkRequest, BlkResponse> = BackRing::attach(&page);
        const { assert!(FrontRing::<BlkRequest, BlkResponse>::SIZE >= 16, "at least 16 requests fit in a page") };
        let mut r = BlkRequest { op: BLK_OP_WRITE, nr_segments: 1, id: 77, sector: 9, ..Default::default() };
        r.seg[0] = seg(0, 7);
        front.push_request(&mut page, &r).unwrap();
        front.push_requests_and_check_notify(&mut page);
        assert_eq!(back.take_request(&page).unwrap(), Some(r));
        back.push_response(&mut page, &BlkResponse { id: 77, op: BLK_OP_WRITE, status: BLK_RSP_OKAY, ..Default::default() }).unwrap();
        back.push_responses_and_check_notify(&mut page);
        assert_eq!(front.take_response(&page).unwrap().map(|x| (x.id, x.status)), Some((77, BLK_RSP_OKAY)));
    }
}
