//! Parsing and sanitising the firmware memory map (multiboot1 `mmap_*`).
//!
//! Firmware maps can be messy: zero-length entries, overlapping entries of
//! different types, unaligned edges, memory above 4 GiB. This module turns the
//! raw entries into one set of page-aligned usable ranges where anything that
//! any entry calls non-usable stays unusable ("reserved wins").

use crate::range::{CapacityExceeded, Range, RangeSet};
use crate::PAGE_SIZE;

/// Memory type of a firmware map entry (multiboot1 numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    Usable,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    BadMemory,
    /// A type number this code does not know; treated as reserved.
    Unknown(u32),
}

impl RegionKind {
    pub fn from_multiboot(ty: u32) -> Self {
        match ty {
            1 => RegionKind::Usable,
            2 => RegionKind::Reserved,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::BadMemory,
            other => RegionKind::Unknown(other),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            RegionKind::Usable => "usable",
            RegionKind::Reserved => "reserved",
            RegionKind::AcpiReclaimable => "ACPI reclaimable",
            RegionKind::AcpiNvs => "ACPI NVS",
            RegionKind::BadMemory => "bad memory",
            RegionKind::Unknown(_) => "unknown",
        }
    }
}

/// One entry of the firmware memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub base: u64,
    pub len: u64,
    pub kind: RegionKind,
}

/// Why a raw memory-map buffer could not be parsed completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmapError {
    /// An entry's `size` field is smaller than the fixed 20-byte entry body.
    EntryTooSmall { offset: usize, size: u32 },
    /// An entry runs past the end of the buffer.
    Truncated { offset: usize },
}

/// Iterator over the entries of a multiboot1 memory-map buffer.
///
/// Each entry is `size: u32` followed by `size` bytes, of which the first 20
/// are `base_addr: u64, length: u64, type: u32` (little endian). Parsing stops
/// at the first malformed entry, which is reported once as an error.
pub struct MultibootMmapIter<'a> {
    buf: &'a [u8],
    offset: usize,
    failed: bool,
}

pub fn parse_multiboot_mmap(buf: &[u8]) -> MultibootMmapIter<'_> {
    MultibootMmapIter { buf, offset: 0, failed: false }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    (read_u32(b, at) as u64) | ((read_u32(b, at + 4) as u64) << 32)
}

impl Iterator for MultibootMmapIter<'_> {
    type Item = Result<MapEntry, MmapError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let at = self.offset;
        if self.buf.len() - at < 4 {
            self.failed = true;
            return Some(Err(MmapError::Truncated { offset: at }));
        }
        let size = read_u32(self.buf, at);
        if size < 20 {
            self.failed = true;
            return Some(Err(MmapError::EntryTooSmall { offset: at, size }));
        }
        let body = at + 4;
        let end = match body.checked_add(size as usize) {
            Some(e) if e <= self.buf.len() => e,
            _ => {
                self.failed = true;
                return Some(Err(MmapError::Truncated { offset: at }));
            }
        };
        self.offset = end;
        Some(Ok(MapEntry {
            base: read_u64(self.buf, body),
            len: read_u64(self.buf, body + 8),
            kind: RegionKind::from_multiboot(read_u32(self.buf, body + 16)),
        }))
    }
}

/// Maximum number of disjoint usable ranges tracked.
pub const MAX_RANGES: usize = 64;

/// The sanitised result: usable page frames, and what was seen on the way.
#[derive(Debug, Clone, Default)]
pub struct MemoryMap {
    /// Page-aligned usable RAM, before carving out the image and modules.
    pub usable: RangeSet<MAX_RANGES>,
    /// Everything some entry called non-usable.
    pub reserved: RangeSet<MAX_RANGES>,
    pub entries: usize,
    pub zero_length_skipped: usize,
    /// Usable entries that some non-usable entry overlapped (reserved won).
    pub overlaps_resolved: usize,
    /// Highest end address of any usable entry.
    pub top_of_ram: u64,
}

impl MemoryMap {
    /// Builds the sanitised map from entries. Overlap rule: an address is usable
    /// only if some entry calls it usable and no entry calls it anything else.
    pub fn from_entries<I: IntoIterator<Item = MapEntry>>(entries: I) -> Result<Self, CapacityExceeded> {
        let mut map = MemoryMap::default();
        let mut usable_entries = RangeSet::<MAX_RANGES>::new();
        for e in entries {
            map.entries += 1;
            if e.len == 0 {
                map.zero_length_skipped += 1;
                continue;
            }
            let r = Range::from_base_len(e.base, e.len);
            if e.kind == RegionKind::Usable {
                usable_entries.add(r)?;
                map.top_of_ram = map.top_of_ram.max(r.end);
            } else {
                map.reserved.add(r)?;
            }
        }
        for r in usable_entries.iter() {
            if map.reserved.overlaps(r) {
                map.overlaps_resolved += 1;
            }
        }
        map.usable = usable_entries;
        map.usable.subtract(&map.reserved)?;
        map.usable.align_inward(PAGE_SIZE);
        Ok(map)
    }

    /// Usable bytes below 4 GiB and at or above it.
    pub fn split_at_4g(&self) -> (u64, u64) {
        const G4: u64 = 1 << 32;
        let mut low = 0;
        let mut high = 0;
        for r in self.usable.iter() {
            if r.end <= G4 {
                low += r.len();
            } else if r.start >= G4 {
                high += r.len();
            } else {
                low += G4 - r.start;
                high += r.end - G4;
            }
        }
        (low, high)
    }
}

/// Highest physical address Dom0 may map device memory below (40 bits, 1 TiB).
pub const DEVICE_MEMORY_LIMIT: u64 = 1 << 40;

impl MemoryMap {
    /// The device memory (MMIO) Dom0 may map, as half-open frame-number
    /// ranges: every page from 1 MiB up to [`DEVICE_MEMORY_LIMIT`] that no map
    /// entry describes (neither usable nor reserved), minus the pages in
    /// `hypervisor_pages` (physical addresses of the local and I/O APICs,
    /// which microhv drives itself). PCI BARs live in these holes.
    pub fn device_frames(&self, hypervisor_pages: &[u64]) -> alloc::vec::Vec<(u64, u64)> {
        let mut known: alloc::vec::Vec<Range> = self.usable.iter().chain(self.reserved.iter()).collect();
        known.push(Range::new(0, 1 << 20));
        known.extend(hypervisor_pages.iter().map(|&p| Range::from_base_len(p & !(PAGE_SIZE - 1), PAGE_SIZE)));
        known.sort_by_key(|r| r.start);
        let mut out = alloc::vec::Vec::new();
        let mut at = 0u64;
        for r in known {
            if r.start > at {
                out.push((at, r.start.min(DEVICE_MEMORY_LIMIT)));
            }
            at = at.max(r.end);
            if at >= DEVICE_MEMORY_LIMIT {
                break;
            }
        }
        if at < DEVICE_MEMORY_LIMIT {
            out.push((at, DEVICE_MEMORY_LIMIT));
        }
        // Whole frames only: a partial page at either end holds something known.
        out.into_iter()
            .map(|(s, e)| (s.div_ceil(PAGE_SIZE), e / PAGE_SIZE))
            .filter(|(s, e)| s < e)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(base, len, ty) in entries {
            v.extend_from_slice(&20u32.to_le_bytes());
            v.extend_from_slice(&base.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&ty.to_le_bytes());
        }
        v
    }

    fn parse(entries: &[(u64, u64, u32)]) -> MemoryMap {
        let buf = raw(entries);
        let parsed: Vec<_> = parse_multiboot_mmap(&buf).map(|e| e.unwrap()).collect();
        MemoryMap::from_entries(parsed).unwrap()
    }

    /// The map QEMU's BIOS gives a 128 MiB pc machine.
    #[test]
    fn typical_qemu_map() {
        let m = parse(&[
            (0, 0x9fc00, 1),
            (0x9fc00, 0x400, 2),
            (0xf0000, 0x10000, 2),
            (0x100000, 0x7ee0000, 1),
            (0x7fe0000, 0x20000, 2),
            (0xfffc0000, 0x40000, 2),
        ]);
        assert_eq!(m.entries, 6);
        assert_eq!(m.usable.as_slice(), &[Range::new(0, 0x9f000), Range::new(0x100000, 0x7fe0000)]);
        assert_eq!(m.top_of_ram, 0x7fe0000);
    }

    #[test]
    fn zero_length_entries_are_skipped() {
        let m = parse(&[(0x100000, 0, 1), (0x200000, 0x100000, 1), (0x500000, 0, 2)]);
        assert_eq!(m.zero_length_skipped, 2);
        assert_eq!(m.usable.as_slice(), &[Range::new(0x200000, 0x300000)]);
    }

    #[test]
    fn reserved_wins_over_usable_in_overlaps() {
        // A reserved hole inside usable RAM, and usable RAM listed twice.
        let m = parse(&[
            (0x100000, 0x400000, 1),
            (0x200000, 0x1000, 2),
            (0x300000, 0x200000, 1),
            (0x4ff800, 0x1000, 4),
        ]);
        assert_eq!(m.overlaps_resolved, 1);
        assert_eq!(
            m.usable.as_slice(),
            &[Range::new(0x100000, 0x200000), Range::new(0x201000, 0x4ff000)]
        );
        // The same map with the entries in another order gives the same result.
        let n = parse(&[
            (0x4ff800, 0x1000, 4),
            (0x300000, 0x200000, 1),
            (0x200000, 0x1000, 2),
            (0x100000, 0x400000, 1),
        ]);
        assert_eq!(n.usable.as_slice(), m.usable.as_slice());
    }

    #[test]
    fn memory_above_4g_is_kept() {
        let m = parse(&[(0x100000, 0xbff00000, 1), (0x1_0000_0000, 0x4000_0000, 1)]);
        assert_eq!(m.usable.len(), 2);
        assert_eq!(m.top_of_ram, 0x1_4000_0000);
        let (low, high) = m.split_at_4g();
        assert_eq!(low, 0xbff00000);
        assert_eq!(high, 0x4000_0000);
    }

    #[test]
    fn unknown_types_and_bad_memory_are_not_usable() {
        let m = parse(&[(0x100000, 0x100000, 1), (0x180000, 0x1000, 5), (0x1c0000, 0x1000, 77)]);
        assert!(!m.usable.contains(0x180000));
        assert!(!m.usable.contains(0x1c0000));
        assert!(m.usable.contains(0x181000));
    }

    #[test]
    fn unaligned_edges_are_trimmed() {
        let m = parse(&[(0x100123, 0x2000, 1)]);
        assert_eq!(m.usable.as_slice(), &[Range::new(0x101000, 0x102000)]);
    }

    #[test]
    fn entry_that_overflows_address_space_is_clamped() {
        let m = parse(&[(u64::MAX - 0xfff, 0x10000, 1)]);
        // Clamped at the top of the address space, then trimmed to whole pages: nothing left.
        assert_eq!(m.top_of_ram, u64::MAX);
        assert!(m.usable.is_empty());
    }

    #[test]
    fn larger_entry_size_is_honoured() {
        // Entries may be larger than 20 bytes; the extra bytes are skipped.
        let mut buf = Vec::new();
        for (base, len) in [(0x100000u64, 0x1000u64), (0x200000, 0x1000)] {
            buf.extend_from_slice(&24u32.to_le_bytes());
            buf.extend_from_slice(&base.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&1u32.to_le_bytes());
            buf.extend_from_slice(&0xdeadbeefu32.to_le_bytes());
        }
        let e: Vec<_> = parse_multiboot_mmap(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].base, 0x200000);
    }

    #[test]
    fn malformed_buffers_are_reported() {
        let mut buf = raw(&[(0x100000, 0x1000, 1)]);
        buf.extend_from_slice(&8u32.to_le_bytes());
        buf.extend_from_slice(&[0; 8]);
        let items: Vec<_> = parse_multiboot_mmap(&buf).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert_eq!(items[1], Err(MmapError::EntryTooSmall { offset: 24, size: 8 }));

        let buf = raw(&[(0x100000, 0x1000, 1)]);
        let items: Vec<_> = parse_multiboot_mmap(&buf[..20]).collect();
        assert_eq!(items, vec![Err(MmapError::Truncated { offset: 0 })]);
    }

    #[test]
    fn device_frames_are_the_holes_above_1m_minus_the_apics() {
        let map = MemoryMap::from_entries([
            MapEntry { base: 0, len: 0x9fc00, kind: RegionKind::Usable },
            MapEntry { base: 0x100000, len: 0x7f00000, kind: RegionKind::Usable },
            MapEntry { base: 0xfeffc000, len: 0x4000, kind: RegionKind::Reserved },
            MapEntry { base: 0xfffc0000, len: 0x40000, kind: RegionKind::Reserved },
        ])
        .unwrap();
        let d = map.device_frames(&[0xfee00000, 0xfec00000]);
        assert_eq!(
            d,
            alloc::vec![
                (0x8000, 0xfec00),
                (0xfec01, 0xfee00),
                (0xfee01, 0xfeffc),
                (0xff000, 0xfffc0),
                (0x100000, DEVICE_MEMORY_LIMIT / PAGE_SIZE)
            ]
        );
        // RAM is never in it.
        for (s, e) in d {
            for r in map.usable.iter() {
                assert!(e * PAGE_SIZE <= r.start || s * PAGE_SIZE >= r.end);
            }
        }
    }
}
