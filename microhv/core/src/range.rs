//! A fixed-capacity set of disjoint, sorted, half-open physical address ranges.
//!
//! The boot path needs set arithmetic on address ranges (usable RAM minus
//! reserved areas, minus the hypervisor image, minus the modules) before any
//! heap exists, so this type stores its ranges inline.

use core::fmt;

/// A half-open range `[start, end)` of physical addresses.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }

    /// Builds `[base, base + len)`, clamping at the top of the address space
    /// instead of overflowing.
    pub const fn from_base_len(base: u64, len: u64) -> Self {
        let end = match base.checked_add(len) {
            Some(e) => e,
            None => u64::MAX,
        };
        Range { start: base, end }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Shrinks the range to whole `align`-sized units (start rounded up, end
    /// rounded down). `align` must be a power of two.
    pub fn align_inward(&self, align: u64) -> Range {
        debug_assert!(align.is_power_of_two());
        let start = self.start.checked_add(align - 1).map_or(u64::MAX, |s| s & !(align - 1));
        let end = self.end & !(align - 1);
        if end <= start {
            Range::new(start, start)
        } else {
            Range::new(start, end)
        }
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// Returned when a [`RangeSet`] would need more slots than it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityExceeded;

/// Disjoint, sorted, non-adjacent ranges; adjacent inserts are merged.
#[derive(Clone)]
pub struct RangeSet<const N: usize> {
    ranges: [Range; N],
    len: usize,
}

impl<const N: usize> Default for RangeSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Debug for RangeSet<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<const N: usize> RangeSet<N> {
    pub const fn new() -> Self {
        RangeSet { ranges: [Range::new(0, 0); N], len: 0 }
    }

    pub fn as_slice(&self) -> &[Range] {
        &self.ranges[..self.len]
    }

    pub fn iter(&self) -> impl Iterator<Item = Range> + '_ {
        self.as_slice().iter().copied()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes covered.
    pub fn total(&self) -> u64 {
        self.iter().map(|r| r.len()).sum()
    }

    /// Binary search: the ranges are sorted and disjoint (this is on every
    /// machine-memory access microhv makes).
    pub fn contains(&self, addr: u64) -> bool {
        let s = self.as_slice();
        let i = s.partition_point(|r| r.start <= addr);
        i > 0 && s[i - 1].contains(addr)
    }

    /// True when all of `r` lies inside one range of the set.
    pub fn contains_range(&self, r: Range) -> bool {
        r.is_empty() || self.iter().any(|x| x.start <= r.start && r.end <= x.end)
    }

    pub fn overlaps(&self, r: Range) -> bool {
        self.iter().any(|x| x.overlaps(&r))
    }

    fn insert_at(&mut self, idx: usize, r: Range) -> Result<(), CapacityExceeded> {
        if self.len == N {
            return Err(CapacityExceeded);
        }
        self.ranges.copy_within(idx..self.len, idx + 1);
        self.ranges[idx] = r;
        self.len += 1;
        Ok(())
    }

    fn remove_at(&mut self, idx: usize) {
        self.ranges.copy_within(idx + 1..self.len, idx);
        self.len -= 1;
    }

    /// Adds `r`, merging it with every range it overlaps or touches.
    pub fn add(&mut self, r: Range) -> Result<(), CapacityExceeded> {
        if r.is_empty() {
            return Ok(());
        }
        let mut merged = r;
        // Remove all ranges that overlap or touch `merged`, growing it.
        let mut i = 0;
        while i < self.len {
            let x = self.ranges[i];
            if x.start <= merged.end && merged.start <= x.end {
                merged.start = merged.start.min(x.start);
                merged.end = merged.end.max(x.end);
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        let idx = self.as_slice().iter().position(|x| x.start > merged.start).unwrap_or(self.len);
        self.insert_at(idx, merged)
    }

    /// Removes every address of `r` from the set (it may split one range in two).
    pub fn remove(&mut self, r: Range) -> Result<(), CapacityExceeded> {
        if r.is_empty() {
            return Ok(());
        }
        let mut i = 0;
        while i < self.len {
            let x = self.ranges[i];
            if !x.overlaps(&r) {
                i += 1;
                continue;
            }
            let left = Range::new(x.start, r.start.min(x.end));
            let right = Range::new(r.end.max(x.start), x.end);
            match (left.is_empty(), right.is_empty()) {
                (true, true) => self.remove_at(i),
                (false, true) => {
                    self.ranges[i] = left;
                    i += 1;
                }
                (true, false) => {
                    self.ranges[i] = right;
                    i += 1;
                }
                (false, false) => {
                    self.ranges[i] = left;
                    self.insert_at(i + 1, right)?;
                    i += 2;
                }
            }
        }
        Ok(())
    }

    /// Removes every range of `other` from `self`.
    pub fn subtract<const M: usize>(&mut self, other: &RangeSet<M>) -> Result<(), CapacityExceeded> {
        for r in other.iter() {
            self.remove(r)?;
        }
        Ok(())
    }

    /// Keeps only whole `align`-sized units of each range.
    pub fn align_inward(&mut self, align: u64) {
        let mut i = 0;
        while i < self.len {
            let a = self.ranges[i].align_inward(align);
            if a.is_empty() {
                self.remove_at(i);
            } else {
                self.ranges[i] = a;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn add_merges_overlapping_and_adjacent() {
        let mut s = RangeSet::<8>::new();
        s.add(Range::new(10, 20)).unwrap();
        s.add(Range::new(30, 40)).unwrap();
        s.add(Range::new(20, 30)).unwrap();
        assert_eq!(s.as_slice(), &[Range::new(10, 40)]);
        s.add(Range::new(5, 12)).unwrap();
        assert_eq!(s.as_slice(), &[Range::new(5, 40)]);
    }

    #[test]
    fn remove_splits() {
        let mut s = RangeSet::<8>::new();
        s.add(Range::new(0, 100)).unwrap();
        s.remove(Range::new(40, 60)).unwrap();
        assert_eq!(s.as_slice(), &[Range::new(0, 40), Range::new(60, 100)]);
        s.remove(Range::new(0, 200)).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn capacity_is_reported() {
        let mut s = RangeSet::<2>::new();
        s.add(Range::new(0, 1)).unwrap();
        s.add(Range::new(3, 4)).unwrap();
        assert_eq!(s.add(Range::new(6, 7)), Err(CapacityExceeded));
    }

    #[test]
    fn align_inward_drops_slivers() {
        let mut s = RangeSet::<8>::new();
        s.add(Range::new(0x1001, 0x1fff)).unwrap();
        s.add(Range::new(0x2800, 0x5800)).unwrap();
        s.align_inward(0x1000);
        assert_eq!(s.as_slice(), &[Range::new(0x3000, 0x5000)]);
    }

    proptest! {
        /// The set agrees with a naive model on random adds and removes.
        #[test]
        fn matches_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..16), 0..40)) {
            let mut s = RangeSet::<64>::new();
            let mut model = [false; 80];
            for (add, start, len) in ops {
                let r = Range::new(start, start + len);
                if add { s.add(r).unwrap(); } else { s.remove(r).unwrap(); }
                for a in start..start + len { model[a as usize] = add; }
                // Invariant: sorted, disjoint, non-adjacent, non-empty.
                for w in s.as_slice().windows(2) { prop_assert!(w[0].end < w[1].start); }
                for r in s.iter() { prop_assert!(!r.is_empty()); }
            }
            for (a, &m) in model.iter().enumerate() {
                prop_assert_eq!(s.contains(a as u64), m);
            }
        }
    }
}
