//! x86-64 4-level page tables, built through a [`TableMemory`] so that the
//! same code builds the hypervisor's tables on the machine and runs against a
//! fake memory in tests.

use bitflags::bitflags;

bitflags! {
    /// Bits of a page-table entry (Intel SDM vol. 3, 4.5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PteFlags: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const NO_CACHE = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// PS: a 2 MiB (PD) or 1 GiB (PDPT) leaf.
        const HUGE = 1 << 7;
        const GLOBAL = 1 << 8;
        const NO_EXECUTE = 1 << 63;
    }
}

/// Physical address bits of an entry (52-bit physical addresses).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
pub const SIZE_4K: u64 = 1 << 12;
pub const SIZE_2M: u64 = 1 << 21;
pub const SIZE_1G: u64 = 1 << 30;

/// Index of `va` in the table at `level` (4 = PML4 ... 1 = PT).
pub const fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// True when `va` is canonical (bits 63..47 all equal).
pub const fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

/// Where page-table frames come from and how to reach them.
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned frame for a new table, by physical address.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The table at physical address `pa`.
    fn table(&mut self, pa: u64) -> &mut [u64; 512];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    OutOfMemory,
    Unaligned,
    NonCanonical,
    /// Something is already mapped there (a leaf, or a huge page in the way).
    AlreadyMapped(u64),
}

/// Owner of one page-table tree.
pub struct PageTables<M: TableMemory> {
    root: u64,
    mem: M,
}

impl<M: TableMemory> PageTables<M> {
    pub fn new(mut mem: M) -> Result<Self, MapError> {
        let root = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        Ok(PageTables { root, mem })
    }

    /// Wraps an existing tree whose PML4 is at `root`.
    pub fn from_root(root: u64, mem: M) -> Self {
        PageTables { root, mem }
    }

    /// Physical address of the PML4 (the CR3 value).
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn memory(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Walks down to the table at `level` for `va`, creating tables on the way.
    fn walk_create(&mut self, va: u64, level: u32) -> Result<u64, MapError> {
        let mut table = self.root;
        for l in ((level + 1)..=4).rev() {
            let i = index(va, l);
            let e = self.mem.table(table)[i];
            if e & PteFlags::PRESENT.bits() != 0 {
                if e & PteFlags::HUGE.bits() != 0 {
                    return Err(MapError::AlreadyMapped(va));
                }
                table = e & ADDR_MASK;
            } else {
                let new = self.mem.alloc_table().ok_or(MapError::OutOfMemory)?;
                // Intermediate entries are permissive; leaves decide access.
                self.mem.table(table)[i] = new | (PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER).bits();
                table = new;
            }
        }
        Ok(table)
    }

    fn map_leaf(&mut self, va: u64, pa: u64, flags: PteFlags, level: u32, size: u64) -> Result<(), MapError> {
        if !is_canonical(va) {
            return Err(MapError::NonCanonical);
        }
        if !va.is_multiple_of(size) || !pa.is_multiple_of(size) {
            return Err(MapError::Unaligned);
        }
        let t = self.walk_create(va, level)?;
        let i = index(va, level);
        let slot = &mut self.mem.table(t)[i];
        if *slot & PteFlags::PRESENT.bits() != 0 {
            return Err(MapError::AlreadyMapped(va));
        }
        let huge = if level > 1 { PteFlags::HUGE } else { PteFlags::empty() };
        *slot = (pa & ADDR_MASK) | (flags | huge | PteFlags::PRESENT).bits();
        Ok(())
    }

    pub fn map_4k(&mut self, va: u64, pa: u64, flags: PteFlags) -> Result<(), MapError> {
        self.map_leaf(va, pa, flags - PteFlags::HUGE, 1, SIZE_4K)
    }

    pub fn map_2m(&mut self, va: u64, pa: u64, flags: PteFlags) -> Result<(), MapError> {
        self.map_leaf(va, pa, flags, 2, SIZE_2M)
    }

    /// Maps `[pa, pa+len)` at `va` with the largest pages that fit.
    pub fn map_range(&mut self, va: u64, pa: u64, len: u64, flags: PteFlags) -> Result<(), MapError> {
        if !va.is_multiple_of(SIZE_4K) || !pa.is_multiple_of(SIZE_4K) || !len.is_multiple_of(SIZE_4K) {
            return Err(MapError::Unaligned);
        }
        let mut off = 0;
        while off < len {
            let (v, p) = (va + off, pa + off);
            if v % SIZE_2M == 0 && p % SIZE_2M == 0 && len - off >= SIZE_2M {
                self.map_2m(v, p, flags)?;
                off += SIZE_2M;
            } else {
                self.map_4k(v, p, flags)?;
                off += SIZE_4K;
            }
        }
        Ok(())
    }

    /// Translates `va` to its physical address and leaf flags.
    pub fn translate(&mut self, va: u64) -> Option<(u64, PteFlags)> {
        if !is_canonical(va) {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let e = self.mem.table(table)[index(va, level)];
            if e & PteFlags::PRESENT.bits() == 0 {
                return None;
            }
            let leaf = level == 1 || (level <= 3 && e & PteFlags::HUGE.bits() != 0);
            if leaf {
                let size = 1u64 << (12 + 9 * (level - 1));
                let base = e & ADDR_MASK & !(size - 1);
                return Some((base + (va & (size - 1)), PteFlags::from_bits_retain(e & !ADDR_MASK)));
            }
            table = e & ADDR_MASK;
        }
        None
    }
}

#[cfg(test)]
pub mod fake {
    //! A fake physical memory of page tables for tests.
    use super::TableMemory;
    use std::collections::BTreeMap;

    #[derive(Default)]
    pub struct FakeTables {
        pub tables: BTreeMap<u64, Box<[u64; 512]>>,
        pub next: u64,
        pub limit: usize,
    }

    impl FakeTables {
        pub fn new(limit: usize) -> Self {
            FakeTables { tables: BTreeMap::new(), next: 0x100_0000, limit }
        }
    }

    impl TableMemory for FakeTables {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() >= self.limit {
                return None;
            }
            let pa = self.next;
            self.next += 0x1000;
            self.tables.insert(pa, Box::new([0; 512]));
            Some(pa)
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            self.tables.get_mut(&pa).expect("walk reached a frame that is not a table")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeTables;
    use super::*;

    const RX: PteFlags = PteFlags::empty();
    fn rw_nx() -> PteFlags {
        PteFlags::WRITABLE | PteFlags::NO_EXECUTE
    }

    #[test]
    fn map_and_translate_4k_and_2m() {
        let mut pt = PageTables::new(FakeTables::new(16)).unwrap();
        pt.map_4k(0x20_1000, 0x20_1000, RX).unwrap();
        pt.map_2m(0x4000_0000, 0x80_0000, rw_nx()).unwrap();
        let (pa, f) = pt.translate(0x20_1abc).unwrap();
        assert_eq!(pa, 0x20_1abc);
        assert!(!f.contains(PteFlags::WRITABLE) && !f.contains(PteFlags::NO_EXECUTE));
        let (pa, f) = pt.translate(0x4012_3456).unwrap();
        assert_eq!(pa, 0x80_0000 + 0x12_3456);
        assert!(f.contains(PteFlags::WRITABLE | PteFlags::NO_EXECUTE | PteFlags::HUGE));
        assert_eq!(pt.translate(0x20_2000), None);
    }

    #[test]
    fn refuses_overlaps_unaligned_and_noncanonical() {
        let mut pt = PageTables::new(FakeTables::new(16)).unwrap();
        pt.map_2m(0x20_0000, 0x20_0000, RX).unwrap();
        assert_eq!(pt.map_4k(0x20_1000, 0x1000, RX), Err(MapError::AlreadyMapped(0x20_1000)));
        assert_eq!(pt.map_2m(0x20_0000, 0x40_0000, RX), Err(MapError::AlreadyMapped(0x20_0000)));
        assert_eq!(pt.map_4k(0x1001, 0x1000, RX), Err(MapError::Unaligned));
        assert_eq!(pt.map_4k(0x0000_8000_0000_0000, 0x1000, RX), Err(MapError::NonCanonical));
    }

    #[test]
    fn map_range_uses_large_pages_where_possible() {
        let mut pt = PageTables::new(FakeTables::new(16)).unwrap();
        // 4 KiB head, one 2 MiB page, 4 KiB tail.
        pt.map_range(0x1f_f000, 0x1f_f000, 0x20_2000, rw_nx()).unwrap();
        assert!(!pt.translate(0x1f_f000).unwrap().1.contains(PteFlags::HUGE));
        assert!(pt.translate(0x20_0000).unwrap().1.contains(PteFlags::HUGE));
        assert!(!pt.translate(0x40_0000).unwrap().1.contains(PteFlags::HUGE));
        assert_eq!(pt.translate(0x40_1000), None);
    }

    #[test]
    fn out_of_table_memory_is_an_error() {
        let mut pt = PageTables::new(FakeTables::new(2)).unwrap();
        assert_eq!(pt.map_4k(0x1000, 0x1000, RX), Err(MapError::OutOfMemory));
    }
}
