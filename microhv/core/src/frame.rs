//! The physical frame allocator: one bit per 4 KiB machine frame.
//!
//! It is built from the usable ranges left after the hypervisor image, the
//! boot modules and everything the firmware reserved have been removed, so it
//! can never hand those out. Frees are checked: freeing a frame that this
//! allocator does not manage, or one that is already free, is an error, not a
//! silent corruption of the free pool.

use crate::range::{Range, RangeSet};
use crate::PAGE_SIZE;

/// A machine frame number (physical address / 4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mfn(pub u64);

impl Mfn {
    pub const fn from_addr(addr: u64) -> Self {
        Mfn(addr / PAGE_SIZE)
    }
    pub const fn addr(self) -> u64 {
        self.0 * PAGE_SIZE
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeError {
    /// The frame is not RAM that this allocator manages (image, module, reserved, beyond limit).
    NotManaged(Mfn),
    /// The frame is already free.
    DoubleFree(Mfn),
}

/// Capacity of the set of managed ranges.
pub const MANAGED_RANGES: usize = 64;

pub struct FrameAllocator<'a> {
    /// Bit set = frame free.
    bits: &'a mut [u64],
    managed: RangeSet<MANAGED_RANGES>,
    total: u64,
    free: u64,
    /// Where the next single-frame search starts.
    hint: usize,
    /// Usable bytes that lie above what `bits` can describe.
    ignored_bytes: u64,
}

impl<'a> FrameAllocator<'a> {
    /// Highest physical address (exclusive) that a bitmap of `words` words covers.
    pub const fn limit_for(words: usize) -> u64 {
        words as u64 * 64 * PAGE_SIZE
    }

    /// Creates an allocator whose free frames are exactly the page-aligned
    /// parts of `usable` below the bitmap's limit. Frame 0 is never handed out.
    pub fn new(bits: &'a mut [u64], usable: &RangeSet<MANAGED_RANGES>) -> Self {
        bits.fill(0);
        let limit = Self::limit_for(bits.len());
        let mut managed = usable.clone();
        managed.align_inward(PAGE_SIZE);
        let mut above = managed.clone();
        above.remove(Range::new(0, limit)).expect("removing a prefix never splits");
        let ignored_bytes = above.total();
        // Frame 0 would be indistinguishable from a null address.
        managed.remove(Range::new(0, PAGE_SIZE)).expect("removing a prefix never splits");
        managed.remove(Range::new(limit, u64::MAX)).expect("removing a suffix never splits");
        let mut total = 0;
        for r in managed.iter() {
            let mut f = r.start / PAGE_SIZE;
            while f < r.end / PAGE_SIZE {
                bits[(f / 64) as usize] |= 1 << (f % 64);
                f += 1;
                total += 1;
            }
        }
        FrameAllocator { bits, managed, total, free: total, hint: 0, ignored_bytes }
    }

    pub fn total_frames(&self) -> u64 {
        self.total
    }

    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Usable RAM this allocator cannot describe (above its limit).
    pub fn ignored_bytes(&self) -> u64 {
        self.ignored_bytes
    }

    pub fn managed(&self) -> &RangeSet<MANAGED_RANGES> {
        &self.managed
    }

    pub fn is_free(&self, mfn: Mfn) -> bool {
        let i = mfn.0 as usize;
        i / 64 < self.bits.len() && self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn take(&mut self, f: u64) {
        self.bits[(f / 64) as usize] &= !(1 << (f % 64));
        self.free -= 1;
    }

    /// Allocates one frame, or `None` when memory is exhausted.
    pub fn alloc(&mut self) -> Option<Mfn> {
        let n = self.bits.len();
        for k in 0..n {
            let w = (self.hint + k) % n;
            let word = self.bits[w];
            if word != 0 {
                let f = w as u64 * 64 + word.trailing_zeros() as u64;
                self.take(f);
                self.hint = w;
                return Some(Mfn(f));
            }
        }
        None
    }

    /// Allocates one frame whose address is below `limit` (for structures that
    /// must be reachable before all memory is mapped).
    pub fn alloc_below(&mut self, limit: u64) -> Option<Mfn> {
        let words = ((limit / PAGE_SIZE).div_ceil(64) as usize).min(self.bits.len());
        for w in 0..words {
            let word = self.bits[w];
            if word != 0 {
                let f = w as u64 * 64 + word.trailing_zeros() as u64;
                if Mfn(f).addr() >= limit {
                    return None;
                }
                self.take(f);
                return Some(Mfn(f));
            }
        }
        None
    }

    /// Allocates `count` physically contiguous frames whose first frame number
    /// is a multiple of `align_frames` (a power of two).
    pub fn alloc_contiguous(&mut self, count: u64, align_frames: u64) -> Option<Mfn> {
        if count == 0 || !align_frames.is_power_of_two() {
            return None;
        }
        for r in self.managed.clone().iter() {
            let first = r.start / PAGE_SIZE;
            let end = r.end / PAGE_SIZE;
            let mut start = first.next_multiple_of(align_frames);
            while start.checked_add(count).is_some_and(|e| e <= end) {
                match (start..start + count).find(|&f| !self.is_free(Mfn(f))) {
                    None => {
                        for f in start..start + count {
                            self.take(f);
                        }
                        return Some(Mfn(start));
                    }
                    Some(busy) => start = (busy + 1).next_multiple_of(align_frames),
                }
            }
        }
        None
    }

    /// Returns a frame to the pool.
    pub fn free(&mut self, mfn: Mfn) -> Result<(), FreeError> {
        if !self.managed.contains(mfn.addr()) {
            return Err(FreeError::NotManaged(mfn));
        }
        if self.is_free(mfn) {
            return Err(FreeError::DoubleFree(mfn));
        }
        let f = mfn.0;
        self.bits[(f / 64) as usize] |= 1 << (f % 64);
        self.free += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{MapEntry, MemoryMap, RegionKind};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn usable(ranges: &[(u64, u64)]) -> RangeSet<MANAGED_RANGES> {
        let mut s = RangeSet::new();
        for &(a, b) in ranges {
            s.add(Range::new(a, b)).unwrap();
        }
        s
    }

    #[test]
    fn hands_out_only_usable_frames_and_never_frame_zero() {
        let mut bits = vec![0u64; 16];
        let u = usable(&[(0, 0x3000), (0x10000, 0x12000)]);
        let mut a = FrameAllocator::new(&mut bits, &u);
        assert_eq!(a.total_frames(), 4);
        let mut got: Vec<u64> = std::iter::from_fn(|| a.alloc()).map(|m| m.addr()).collect();
        got.sort();
        assert_eq!(got, vec![0x1000, 0x2000, 0x10000, 0x11000]);
        assert_eq!(a.free_frames(), 0);
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn image_modules_and_reserved_ranges_are_never_allocated() {
        // Build the same way the boot path does: firmware map, then carve out.
        let map = MemoryMap::from_entries([
            MapEntry { base: 0, len: 0x9fc00, kind: RegionKind::Usable },
            MapEntry { base: 0x100000, len: 0x700000, kind: RegionKind::Usable },
            MapEntry { base: 0x300000, len: 0x1000, kind: RegionKind::Reserved },
        ])
        .unwrap();
        let image = Range::new(0x200000, 0x280000);
        let module = Range::new(0x400000, 0x401800); // not page aligned at the end
        let mut free = map.usable.clone();
        free.remove(image).unwrap();
        free.remove(Range::new(module.start, module.end.next_multiple_of(PAGE_SIZE))).unwrap();
        let mut bits = vec![0u64; 64];
        let mut a = FrameAllocator::new(&mut bits, &free);
        while let Some(f) = a.alloc() {
            let r = Range::new(f.addr(), f.addr() + PAGE_SIZE);
            assert!(!r.overlaps(&image), "image frame {f:?} handed out");
            assert!(!r.overlaps(&module), "module frame {f:?} handed out");
            assert!(!r.overlaps(&Range::new(0x300000, 0x301000)), "reserved frame handed out");
            assert!(map.usable.contains(f.addr()));
        }
    }

    #[test]
    fn alloc_below_respects_the_limit() {
        let mut bits = vec![0u64; 64];
        let u = usable(&[(0x1000, 0x3000), (0x80000, 0x90000)]);
        let mut a = FrameAllocator::new(&mut bits, &u);
        assert_eq!(a.alloc_below(0x80000), Some(Mfn(1)));
        assert_eq!(a.alloc_below(0x80000), Some(Mfn(2)));
        assert_eq!(a.alloc_below(0x80000), None);
        assert_eq!(a.alloc_below(0x81000), Some(Mfn(0x80)));
    }

    #[test]
    fn frees_are_checked() {
        let mut bits = vec![0u64; 4];
        let u = usable(&[(0x1000, 0x5000)]);
        let mut a = FrameAllocator::new(&mut bits, &u);
        let f = a.alloc().unwrap();
        assert_eq!(a.free(Mfn(0x100)), Err(FreeError::NotManaged(Mfn(0x100))));
        assert_eq!(a.free(f), Ok(()));
        assert_eq!(a.free(f), Err(FreeError::DoubleFree(f)));
        assert_eq!(a.free_frames(), 4);
    }

    #[test]
    fn memory_above_the_bitmap_limit_is_ignored_and_reported() {
        let mut bits = vec![0u64; 1]; // covers 64 frames = 256 KiB
        let u = usable(&[(0x1000, 0x3000), (0x1_0000_0000, 0x1_0001_0000)]);
        let a = FrameAllocator::new(&mut bits, &u);
        assert_eq!(a.total_frames(), 2);
        assert_eq!(a.ignored_bytes(), 0x10000);
    }

    #[test]
    fn contiguous_allocation_respects_alignment_and_busy_frames() {
        let mut bits = vec![0u64; 8];
        let u = usable(&[(0x1000, 0x40000)]);
        let mut a = FrameAllocator::new(&mut bits, &u);
        let f = a.alloc_contiguous(4, 4).unwrap();
        assert_eq!(f.0 % 4, 0);
        for i in 0..4 {
            assert!(!a.is_free(Mfn(f.0 + i)));
        }
        let g = a.alloc_contiguous(4, 4).unwrap();
        assert!(g.0 >= f.0 + 4);
        assert_eq!(a.alloc_contiguous(1000, 1), None);
        assert_eq!(a.alloc_contiguous(0, 1), None);
    }

    proptest! {
        /// No frame is handed out twice, and the free count is exact.
        #[test]
        fn no_double_allocation(ops in proptest::collection::vec(any::<(bool, u8)>(), 1..300)) {
            let mut bits = vec![0u64; 2];
            let u = usable(&[(0x1000, 0x20000), (0x40000, 0x60000)]);
            let mut a = FrameAllocator::new(&mut bits, &u);
            let total = a.total_frames();
            let mut held: Vec<Mfn> = Vec::new();
            let mut set = HashSet::new();
            for (alloc, pick) in ops {
                if alloc || held.is_empty() {
                    if let Some(f) = a.alloc() {
                        prop_assert!(set.insert(f), "frame {:?} handed out twice", f);
                        held.push(f);
                    } else {
                        prop_assert_eq!(held.len() as u64, total);
                    }
                } else {
                    let f = held.swap_remove(pick as usize % held.len());
                    set.remove(&f);
                    prop_assert_eq!(a.free(f), Ok(()));
                }
                prop_assert_eq!(a.free_frames() + held.len() as u64, total);
            }
        }
    }
}
