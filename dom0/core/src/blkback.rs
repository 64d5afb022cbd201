//! The block backend's logic, independent of the transport: checking a
//! frontend's request against its virtual disk, and moving the data between
//! the frontend's granted pages and a contiguous buffer of Dom0's.
//!
//! Dom0's kernel drives these pieces asynchronously around the real device
//! (virtio-blk): [`validate`], then [`gather`] for a write, the device
//! request, then [`scatter`] for a read, then [`response`]. [`process_sync`]
//! chains the same pieces synchronously against any [`SyncDisk`]; the tests
//! use it with a mock frontend and an in-memory disk.
//!
//! What the backend guarantees, whatever the frontend writes in the ring:
//! * a request is answered exactly once, with an error when any check fails;
//! * nothing outside the frontend's own virtual disk is read or written
//!   (the sector range is checked before any I/O, without overflow);
//! * a write whose data cannot all be copied from the grants writes nothing;
//! * grant references are always looked up in the frontend's own table
//!   (microhv's `grant_copy` with the frontend as granter), so a forged or
//!   foreign reference is just an invalid one.
use alloc::vec::Vec;
use shared_abi::blkif::*;
use shared_abi::ring::{BackRing, RingError, SharedMem};
use shared_abi::Errno;

/// A virtual disk: `sectors` sectors of the real disk from `start_sector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VDisk {
    pub start_sector: u64,
    pub sectors: u64,
}

/// One segment of a checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first: u8,
    pub last: u8,
}

impl Segment {
    /// Byte offset inside the granted page.
    pub fn offset(&self) -> usize {
        self.first as usize * BLK_SECTOR_SIZE as usize
    }
    /// Bytes this segment covers.
    pub fn len(&self) -> usize {
        (self.last - self.first + 1) as usize * BLK_SECTOR_SIZE as usize
    }
    /// Never: a validated segment covers at least one sector.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request that passed [`validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    pub op: u8,
    /// First sector on the real disk (the virtual disk's start added).
    pub disk_sector: u64,
    pub sectors: u64,
    pub segs: Vec<Segment>,
}

impl Job {
    /// Bytes the request moves.
    pub fn bytes(&self) -> usize {
        self.sectors as usize * BLK_SECTOR_SIZE as usize
    }
}

/// Checks `req` against `vd`. The error is the status to answer with.
pub fn validate(req: &BlkRequest, vd: &VDisk) -> Result<Job, i16> {
    match req.op {
        BLK_OP_FLUSH => Ok(Job { id: req.id, op: req.op, disk_sector: 0, sectors: 0, segs: Vec::new() }),
        BLK_OP_READ | BLK_OP_WRITE => {
            let n = req.nr_segments as usize;
            if n == 0 || n > BLK_MAX_SEGMENTS {
                return Err(BLK_RSP_ERROR);
            }
            let sectors = req.sectors().ok_or(BLK_RSP_ERROR)?;
            let end = req.sector.checked_add(sectors).ok_or(BLK_RSP_ERROR)?;
            if end > vd.sectors {
                return Err(BLK_RSP_ERROR);
            }
            let segs = req.seg[..n].iter().map(|s| Segment { gref: s.gref, first: s.first_sect, last: s.last_sect }).collect();
            Ok(Job { id: req.id, op: req.op, disk_sector: vd.start_sector + req.sector, sectors, segs })
        }
        _ => Err(BLK_RSP_EOPNOTSUPP),
    }
}

/// Copies between Dom0 and the frontend's granted pages.
pub trait GrantIo {
    fn copy_from_grant(&mut self, gref: u32, offset: usize, buf: &mut [u8]) -> Result<(), Errno>;
    fn copy_to_grant(&mut self, gref: u32, offset: usize, data: &[u8]) -> Result<(), Errno>;
}

/// For a write: copies every segment, in order, into `buf[..job.bytes()]`.
pub fn gather(job: &Job, g: &mut impl GrantIo, buf: &mut [u8]) -> Result<(), Errno> {
    let mut at = 0;
    for s in &job.segs {
        let chunk = buf.get_mut(at..at + s.len()).ok_or(Errno::EINVAL)?;
        g.copy_from_grant(s.gref, s.offset(), chunk)?;
        at += s.len();
    }
    Ok(())
}

/// For a read: copies `buf[..job.bytes()]` out to the segments, in order.
pub fn scatter(job: &Job, g: &mut impl GrantIo, buf: &[u8]) -> Result<(), Errno> {
    let mut at = 0;
    for s in &job.segs {
        let chunk = buf.get(at..at + s.len()).ok_or(Errno::EINVAL)?;
        g.copy_to_grant(s.gref, s.offset(), chunk)?;
        at += s.len();
    }
    Ok(())
}

/// The response to a request.
pub fn response(id: u64, op: u8, status: i16) -> BlkResponse {
    BlkResponse { id, op, status, ..Default::default() }
}

/// A disk that completes requests at once.
pub trait SyncDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), Errno>;
    fn flush(&mut self) -> Result<(), Errno>;
}

/// Serves one request end to end; returns the response.
pub fn process_one(req: &BlkRequest, vd: &VDisk, g: &mut impl GrantIo, disk: &mut impl SyncDisk) -> BlkResponse {
    let job = match validate(req, vd) {
        Ok(j) => j,
        Err(status) => return response(req.id, req.op, status),
    };
    let mut buf = alloc::vec![0u8; job.bytes()];
    response(job.id, job.op, execute(&job, g, disk, &mut buf))
}

/// Carries out a checked request on a disk that completes at once, with
/// `buf` (at least `job.bytes()` long) as the bounce buffer; returns the
/// status to answer with. A write whose data cannot all be copied from the
/// grants reaches the disk not at all.
pub fn execute(job: &Job, g: &mut impl GrantIo, disk: &mut impl SyncDisk, buf: &mut [u8]) -> i16 {
    let ok = match buf.get_mut(..job.bytes()) {
        None => false,
        Some(buf) => match job.op {
            BLK_OP_WRITE => gather(job, g, buf).is_ok() && disk.write(job.disk_sector, buf).is_ok(),
            BLK_OP_READ => disk.read(job.disk_sector, buf).is_ok() && scatter(job, g, buf).is_ok(),
            _ => disk.flush().is_ok(),
        },
    };
    if ok {
        BLK_RSP_OKAY
    } else {
        BLK_RSP_ERROR
    }
}

/// Serves every request on the ring, synchronously; returns how many. A
/// ring with impossible indexes is an error: the caller disconnects it.
pub fn process_sync(
    ring: &mut BackRing<BlkRequest, BlkResponse>,
    page: &mut impl SharedMem,
    vd: &VDisk,
    g: &mut impl GrantIo,
    disk: &mut impl SyncDisk,
) -> Result<usize, RingError> {
    let mut n = 0;
    loop {
        while let Some(req) = ring.take_request(page)? {
            let rsp = process_one(&req, vd, g, disk);
            ring.push_response(page, &rsp)?;
            n += 1;
        }
        ring.push_responses_and_check_notify(page);
        if !ring.final_check_for_requests(page)? {
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shared_abi::ring::{FrontRing, PageBuf};
    use std::collections::HashMap;

    const SS: usize = BLK_SECTOR_SIZE as usize;

    /// The frontend's grant table, as the backend can reach it.
    #[derive(Default)]
    struct MockGrants {
        pages: HashMap<u32, (Vec<u8>, bool)>,
    }

    impl MockGrants {
        fn grant(&mut self, gref: u32, fill: u8, writable: bool) {
            self.pages.insert(gref, (vec![fill; 4096], writable));
        }
    }

    impl GrantIo for MockGrants {
        fn copy_from_grant(&mut self, gref: u32, offset: usize, buf: &mut [u8]) -> Result<(), Errno> {
            let (p, _) = self.pages.get(&gref).ok_or(Errno::EINVAL)?;
            buf.copy_from_slice(p.get(offset..offset + buf.len()).ok_or(Errno::EINVAL)?);
            Ok(())
        }
        fn copy_to_grant(&mut self, gref: u32, offset: usize, data: &[u8]) -> Result<(), Errno> {
            let (p, w) = self.pages.get_mut(&gref).ok_or(Errno::EINVAL)?;
            if !*w {
                return Err(Errno::EACCES);
            }
            p.get_mut(offset..offset + data.len()).ok_or(Errno::EINVAL)?.copy_from_slice(data);
            Ok(())
        }
    }

    struct MemDisk {
        bytes: Vec<u8>,
        flushes: u32,
        fail: bool,
    }

    impl SyncDisk for MemDisk {
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Errno> {
            if self.fail {
                return Err(Errno::EIO);
            }
            let at = sector as usize * SS;
            buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
            Ok(())
        }
        fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), Errno> {
            if self.fail {
                return Err(Errno::EIO);
            }
            let at = sector as usize * SS;
            self.bytes[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), Errno> {
            self.flushes += 1;
            Ok(())
        }
    }

    /// A 64-sector disk; the virtual disk is sectors 16..48.
    fn disk() -> (MemDisk, VDisk) {
        (MemDisk { bytes: vec![0xee; 64 * SS], flushes: 0, fail: false }, VDisk { start_sector: 16, sectors: 32 })
    }

    fn req(op: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) -> BlkRequest {
        let mut r = BlkRequest { op, id, sector, nr_segments: segs.len() as u8, ..Default::default() };
        for (i, &(gref, first_sect, last_sect)) in segs.iter().enumerate() {
            r.seg[i] = BlkSegment { gref, first_sect, last_sect, _pad: 0 };
        }
        r
    }

    /// Runs requests through a real ring, like a frontend would.
    fn run(reqs: &[BlkRequest], g: &mut MockGrants, d: &mut MemDisk, vd: &VDisk) -> Vec<BlkResponse> {
        let mut page = PageBuf::new();
        let mut front: FrontRing<BlkRequest, BlkResponse> = FrontRing::init(&mut page);
        let mut back: BackRing<BlkRequest, BlkResponse> = BackRing::attach(&page);
        for r in reqs {
            front.push_request(&mut page, r).unwrap();
        }
        front.push_requests_and_check_notify(&mut page);
        assert_eq!(process_sync(&mut back, &mut page, vd, g, d).unwrap(), reqs.len());
        let mut out = Vec::new();
        while let Some(r) = front.take_response(&page).unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn a_multi_page_write_then_read_round_trips_inside_the_virtual_disk() {
        let (mut d, vd) = disk();
        let mut g = MockGrants::default();
        g.grant(1, 0x11, false);
        g.grant(2, 0x22, false);
        g.grant(3, 0, true);
        g.grant(4, 0, true);
        let w = req(BLK_OP_WRITE, 7, 4, &[(1, 0, 7), (2, 0, 3)]);
        let r = req(BLK_OP_READ, 8, 4, &[(3, 0, 7), (4, 4, 7)]);
        let f = req(BLK_OP_FLUSH, 9, 0, &[]);
        let rsp = run(&[w, r, f], &mut g, &mut d, &vd);
        assert_eq!(rsp.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>(), vec![(7, 0), (8, 0), (9, 0)]);
        // On the real disk at 16 + 4 = 20: 8 sectors of 0x11 then 4 of 0x22.
        assert!(d.bytes[20 * SS..28 * SS].iter().all(|&b| b == 0x11));
        assert!(d.bytes[28 * SS..32 * SS].iter().all(|&b| b == 0x22));
        assert!(d.bytes[32 * SS..].iter().all(|&b| b == 0xee));
        assert!(d.bytes[..20 * SS].iter().all(|&b| b == 0xee));
        assert!(g.pages[&3].0.iter().all(|&b| b == 0x11));
        assert!(g.pages[&4].0[..4 * SS].iter().all(|&b| b == 0), "sectors outside the segment range are untouched");
        assert!(g.pages[&4].0[4 * SS..].iter().all(|&b| b == 0x22));
        assert_eq!(d.flushes, 1);
    }

    #[test]
    fn hostile_requests_get_errors_and_change_nothing() {
        let (mut d, vd) = disk();
        let before = d.bytes.clone();
        let mut g = MockGrants::default();
        g.grant(1, 0x11, false);
        g.grant(2, 0, false);
        let nine = [(1u32, 0u8, 7u8); 9];
        let reqs = [
            req(BLK_OP_WRITE, 1, 32, &[(1, 0, 0)]),          // one past the end
            req(BLK_OP_WRITE, 2, 31, &[(1, 0, 1)]),          // straddles the end
            req(BLK_OP_WRITE, 3, u64::MAX, &[(1, 0, 0)]),    // overflow
            req(BLK_OP_WRITE, 4, 0, &[(999, 0, 7)]),         // forged grant
            req(BLK_OP_WRITE, 5, 0, &[(1, 0, 7), (999, 0, 7)]), // second segment forged: nothing written
            req(BLK_OP_READ, 6, 0, &[(2, 0, 7)]),            // read into a read-only grant
            req(BLK_OP_WRITE, 7, 0, &nine[..8]),            // too many segments
            req(BLK_OP_WRITE, 8, 0, &[]),                    // no segments
            req(BLK_OP_WRITE, 9, 0, &[(1, 5, 2)]),           // backwards range
            req(BLK_OP_WRITE, 10, 0, &[(1, 0, 8)]),          // past the page
            req(77, 11, 0, &[(1, 0, 0)]),                    // unknown op
        ];
        let mut reqs = reqs.to_vec();
        reqs[6].nr_segments = 9;
        let rsp = run(&reqs, &mut g, &mut d, &vd);
        let got: Vec<(u64, i16)> = rsp.iter().map(|r| (r.id, r.status)).collect();
        let mut want: Vec<(u64, i16)> = (1..=10).map(|i| (i, BLK_RSP_ERROR)).collect();
        want.push((11, BLK_RSP_EOPNOTSUPP));
        assert_eq!(got, want);
        assert_eq!(d.bytes, before, "no byte of the disk changed");
    }

    #[test]
    fn a_device_error_reaches_the_frontend() {
        let (mut d, vd) = disk();
        d.fail = true;
        let mut g = MockGrants::default();
        g.grant(1, 0, true);
        let rsp = run(&[req(BLK_OP_READ, 5, 0, &[(1, 0, 7)])], &mut g, &mut d, &vd);
        assert_eq!((rsp[0].id, rsp[0].status), (5, BLK_RSP_ERROR));
    }

    #[test]
    fn a_ring_with_impossible_indexes_is_refused() {
        let (mut d, vd) = disk();
        let mut g = MockGrants::default();
        let mut page = PageBuf::new();
        let _front: FrontRing<BlkRequest, BlkResponse> = FrontRing::init(&mut page);
        let mut back: BackRing<BlkRequest, BlkResponse> = BackRing::attach(&page);
        page.write_u32(shared_abi::ring::REQ_PROD_OFF, 100_000);
        assert!(process_sync(&mut back, &mut page, &vd, &mut g, &mut d).is_err());
        assert!(d.bytes.iter().all(|&b| b == 0xee));
    }

    proptest! {
        /// Whatever the request, the backend only ever touches the virtual
        /// disk's own sectors, and answers it.
        #[test]
        fn garbage_requests_never_touch_other_sectors(bytes in proptest::collection::vec(any::<u8>(), 88)) {
            use zerocopy::FromBytes;
            let (mut d, vd) = disk();
            let mut g = MockGrants::default();
            for gref in 0..8 {
                g.grant(gref, 0x5a, true);
            }
            let r = BlkRequest::read_from_bytes(&bytes).unwrap();
            let rsp = process_one(&r, &vd, &mut g, &mut d);
            prop_assert_eq!(rsp.id, r.id);
            prop_assert!(d.bytes[..16 * SS].iter().all(|&b| b == 0xee));
            prop_assert!(d.bytes[48 * SS..].iter().all(|&b| b == 0xee));
        }
    }
}
