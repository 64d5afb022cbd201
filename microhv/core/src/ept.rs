//! Extended page tables (EPT) for HVM domains: the second-stage translation
//! from guest-physical to host-physical addresses that Intel VT-x applies to
//! every guest memory access (Intel SDM vol. 3C, "EPT Translation Mechanism").
//!
//! The layout follows the SDM:
//!
//! * a 4-level walk (PML4 -> PDPT -> PD -> PT), 9 bits of guest-physical
//!   address per level, so guest-physical addresses are below 2^48;
//! * bits 2:0 of every entry are read / write / execute; an entry with all
//!   three clear is *not present*, and a guest access through it is an EPT
//!   violation (a VM exit the hypervisor handles);
//! * an entry that is writable but not readable is an EPT *misconfiguration*,
//!   so [`Rights`] with `write && !read` are refused with `EINVAL`;
//! * non-leaf entries are `R|W|X` with bits 7:3 zero (reserved / "points to a
//!   table"); access is decided by the leaf alone;
//! * leaves are 4 KiB only (no large pages here) and carry memory type WB (6)
//!   in bits 5:3, with "ignore PAT" (bit 6) clear so the guest's PAT still
//!   combines with it;
//! * the EPT pointer (EPTP, a VMCS field) holds the PML4's address, the
//!   page-walk length minus one (3) in bits 5:3 and the memory type used for
//!   the walk itself (WB) in bits 2:0; bit 6 enables accessed/dirty flags.
//!
//! Table frames come from a [`TableMemory`], as for the hypervisor's own
//! page tables, so tests run against a fake memory. Changing or removing a
//! mapping of a running guest also needs an `INVEPT` by the caller; this
//! module only edits the tables.

use alloc::vec::Vec;
use shared_abi::Errno;

use crate::paging::{index, TableMemory, ADDR_MASK};
use crate::PAGE_SIZE;

/// Read access (bit 0).
pub const EPT_READ: u64 = 1 << 0;
/// Write access (bit 1). Invalid without [`EPT_READ`].
pub const EPT_WRITE: u64 = 1 << 1;
/// Execute access (bit 2).
pub const EPT_EXEC: u64 = 1 << 2;
/// Access bits of an entry; the entry is present when any of them is set.
pub const EPT_RWX: u64 = EPT_READ | EPT_WRITE | EPT_EXEC;
/// Shift of the memory-type field (bits 5:3) of a leaf entry.
pub const EPT_MEMTYPE_SHIFT: u32 = 3;
/// The memory-type field of a leaf entry.
pub const EPT_MEMTYPE_MASK: u64 = 0b111 << EPT_MEMTYPE_SHIFT;
/// Memory type uncacheable.
pub const MEMTYPE_UC: u64 = 0;
/// Memory type write-back.
pub const MEMTYPE_WB: u64 = 6;
/// Leaf memory-type field for write-back.
pub const EPT_MEMTYPE_WB: u64 = MEMTYPE_WB << EPT_MEMTYPE_SHIFT;
/// Ignore the guest's PAT for this leaf (bit 6).
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// Large-page leaf in a PDPT or PD entry (bit 7); never set by this module.
pub const EPT_LARGE: u64 = 1 << 7;

/// EPTP bits 5:3: page-walk length minus one, for a 4-level walk.
pub const EPTP_WALK_4: u64 = 3 << 3;
/// EPTP bit 6: enable accessed/dirty flags (only if the CPU reports support
/// in `IA32_VMX_EPT_VPID_CAP` bit 21).
pub const EPTP_ENABLE_AD: u64 = 1 << 6;

/// Guest-physical addresses a 4-level EPT translates: `[0, 2^48)`.
pub const GPA_LIMIT: u64 = 1 << 48;

/// Access rights of a guest-physical page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rights {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Rights {
    /// Read, write and execute: ordinary guest RAM.
    pub const RWX: Rights = Rights { read: true, write: true, exec: true };
    /// Read and write, no execute.
    pub const RW: Rights = Rights { read: true, write: true, exec: false };
    /// Read only.
    pub const R: Rights = Rights { read: true, write: false, exec: false };
    /// Read and execute.
    pub const RX: Rights = Rights { read: true, write: false, exec: true };

    /// Bits 2:0 of an entry with these rights.
    pub const fn bits(self) -> u64 {
        ((self.read as u64) * EPT_READ) | ((self.write as u64) * EPT_WRITE) | ((self.exec as u64) * EPT_EXEC)
    }

    /// The rights in bits 2:0 of `entry`.
    pub const fn from_entry(entry: u64) -> Rights {
        Rights { read: entry & EPT_READ != 0, write: entry & EPT_WRITE != 0, exec: entry & EPT_EXEC != 0 }
    }

    /// True when a leaf with these rights is a valid, present EPT entry:
    /// not write-without-read (a misconfiguration) and not no-access (which
    /// would be indistinguishable from a hole).
    ///
    /// Execute-only is accepted; it is valid only on CPUs that report it in
    /// `IA32_VMX_EPT_VPID_CAP` bit 0, which the caller checks.
    // Written as the two rules above, not in clippy's minimal form.
    #[allow(clippy::nonminimal_bool)]
    pub const fn is_valid(self) -> bool {
        !(self.write && !self.read) && (self.read || self.write || self.exec)
    }
}

/// Largest frame number whose address fits an entry's address field.
const MFN_LIMIT: u64 = (ADDR_MASK >> 12) + 1;

/// One EPT hierarchy, owning its table memory.
pub struct Ept<M: TableMemory> {
    root: u64,
    mem: M,
    /// Every table allocated, root first; tables are never freed while the
    /// EPT lives, so this is exactly the tree's table frames.
    tables: Vec<u64>,
}

impl<M: TableMemory> Ept<M> {
    /// An empty EPT: a zeroed PML4, so every guest-physical access is an
    /// EPT violation until mapped. `ENOMEM` when no table frame is left.
    pub fn new(mut mem: M) -> Result<Self, Errno> {
        let root = mem.alloc_table().ok_or(Errno::ENOMEM)?;
        Ok(Ept { root, mem, tables: alloc::vec![root] })
    }

    /// Physical address of the EPT PML4.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The table memory (e.g. to free the frames of [`Ept::table_frames`]).
    pub fn memory(&mut self) -> &mut M {
        &mut self.mem
    }

    /// The EPTP value for the VMCS: PML4 address | walk length 4 (3 in bits
    /// 5:3) | walk memory type WB (6 in bits 2:0). A/D flags stay off; OR in
    /// [`EPTP_ENABLE_AD`] when the CPU supports them and they are wanted.
    pub fn eptp(&self) -> u64 {
        (self.root & ADDR_MASK) | EPTP_WALK_4 | MEMTYPE_WB
    }

    /// Checks a guest-physical page address: aligned and below 2^48.
    fn check_gpa(gpa: u64) -> Result<(), Errno> {
        if !gpa.is_multiple_of(PAGE_SIZE) || gpa >= GPA_LIMIT {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// The PT covering `gpa`, or `None` when a level above is not present.
    fn walk(&mut self, gpa: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let e = self.mem.table(table)[index(gpa, level)];
            if e & EPT_RWX == 0 {
                return None;
            }
            table = e & ADDR_MASK;
        }
        Some(table)
    }

    /// The PT covering `gpa`, creating PDPT / PD / PT on the way.
    fn walk_create(&mut self, gpa: u64) -> Result<u64, Errno> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let i = index(gpa, level);
            let e = self.mem.table(table)[i];
            if e & EPT_RWX != 0 {
                table = e & ADDR_MASK;
            } else {
                let new = self.mem.alloc_table().ok_or(Errno::ENOMEM)?;
                self.tables.push(new);
                // Non-leaf: full rights, bits 7:3 zero; the leaf decides.
                self.mem.table(table)[i] = new | EPT_RWX;
                table = new;
            }
        }
        Ok(table)
    }

    /// Maps guest-physical page `gpa` to machine frame `mfn` with `rights`
    /// and memory type WB.
    ///
    /// `EINVAL`: `gpa` not page-aligned or `>= 2^48`, `mfn` too large for an
    /// entry, or `rights` invalid (write without read, or no access at all).
    /// `EEXIST`: `gpa` is already mapped. `ENOMEM`: out of table frames
    /// (tables created so far stay, empty, and are in [`Ept::table_frames`]).
    pub fn map_4k(&mut self, gpa: u64, mfn: u64, rights: Rights) -> Result<(), Errno> {
        Self::check_gpa(gpa)?;
        if mfn >= MFN_LIMIT || !rights.is_valid() {
            return Err(Errno::EINVAL);
        }
        // Refuse an existing mapping before allocating anything.
        if let Some(pt) = self.walk(gpa) {
            if self.mem.table(pt)[index(gpa, 1)] & EPT_RWX != 0 {
                return Err(Errno::EEXIST);
            }
        }
        let pt = self.walk_create(gpa)?;
        let slot = &mut self.mem.table(pt)[index(gpa, 1)];
        *slot = (mfn << 12) | EPT_MEMTYPE_WB | rights.bits();
        Ok(())
    }

    /// Removes the mapping of guest-physical page `gpa` and returns the
    /// machine frame it mapped. Tables are kept. The caller must `INVEPT`
    /// before reusing the frame if the guest may have run with the mapping.
    ///
    /// `EINVAL`: `gpa` not page-aligned or `>= 2^48`. `ENOENT`: not mapped.
    pub fn unmap_4k(&mut self, gpa: u64) -> Result<u64, Errno> {
        Self::check_gpa(gpa)?;
        let pt = self.walk(gpa).ok_or(Errno::ENOENT)?;
        let slot = &mut self.mem.table(pt)[index(gpa, 1)];
        if *slot & EPT_RWX == 0 {
            return Err(Errno::ENOENT);
        }
        let old = (*slot & ADDR_MASK) >> 12;
        *slot = 0;
        Ok(old)
    }

    /// Host-physical address and rights for guest-physical address `gpa`
    /// (any offset), or `None` when a guest access there would be an EPT
    /// violation (not mapped, or `gpa >= 2^48`).
    pub fn translate(&mut self, gpa: u64) -> Option<(u64, Rights)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let pt = self.walk(gpa)?;
        let e = self.mem.table(pt)[index(gpa, 1)];
        if e & EPT_RWX == 0 {
            return None;
        }
        Some(((e & ADDR_MASK) | (gpa & (PAGE_SIZE - 1)), Rights::from_entry(e)))
    }

    /// Maps guest frame `i` to `frames[i]` (RWX, WB) for every `i`, after
    /// checking with `owns` (backed by the frame table, e.g.
    /// `|m| ft.owner(Mfn(m)) == Owner::Domain(dom)`) that every frame belongs
    /// to the domain.
    ///
    /// All frames are checked before any table is touched, so `EPERM` (a
    /// frame the domain does not own) leaves this EPT unchanged. `EINVAL`:
    /// more than 2^36 frames or an out-of-range frame number; `EEXIST`: guest
    /// frame `i` is already mapped; `ENOMEM`: out of table frames. After
    /// `EEXIST` / `ENOMEM` some pages are mapped: the caller discards the
    /// EPT (freeing [`Ept::table_frames`]) rather than running the guest.
    /// Duplicate frames in `frames` are not refused; they alias.
    pub fn map_domain(&mut self, frames: &[u64], owns: impl Fn(u64) -> bool) -> Result<(), Errno> {
        Self::check_domain_frames(frames, owns)?;
        self.map_frames(frames)
    }

    /// The checks of [`Ept::map_domain`] that need no table.
    fn check_domain_frames(frames: &[u64], owns: impl Fn(u64) -> bool) -> Result<(), Errno> {
        if frames.len() as u64 > GPA_LIMIT / PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        if frames.iter().any(|&mfn| !owns(mfn)) {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    fn map_frames(&mut self, frames: &[u64]) -> Result<(), Errno> {
        for (gfn, &mfn) in frames.iter().enumerate() {
            self.map_4k(gfn as u64 * PAGE_SIZE, mfn, Rights::RWX)?;
        }
        Ok(())
    }

    /// Builds a domain's whole guest-physical space: a new EPT with guest
    /// frame `i` mapped to `frames[i]` (RWX, WB) for `i in 0..frames.len()`,
    /// and nothing else, so any access above is an EPT violation.
    ///
    /// Errors as for [`Ept::map_domain`]. Ownership is checked before the
    /// root table is even allocated, so `EPERM` allocates and writes nothing.
    /// On a later error the partly built EPT is dropped together with `mem`;
    /// a caller whose `M` cannot reclaim frames on drop uses [`Ept::new`] +
    /// [`Ept::map_domain`] instead and frees [`Ept::table_frames`] on error.
    pub fn build_for_domain(mem: M, frames: &[u64], owns: impl Fn(u64) -> bool) -> Result<Self, Errno> {
        Self::check_domain_frames(frames, owns)?;
        let mut ept = Self::new(mem)?;
        ept.map_frames(frames)?;
        Ok(ept)
    }

    /// Every table frame of this EPT (PML4, PDPTs, PDs, PTs), each once,
    /// root first, so the caller can free them when the domain is destroyed.
    /// Includes tables left empty by `unmap_4k` or a failed map.
    pub fn table_frames(&self) -> Vec<u64> {
        self.tables.clone()
    }

    /// The tables reachable by walking the tree, root first (tests check
    /// it against [`Ept::table_frames`]).
    #[cfg(test)]
    fn walk_tables(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        self.collect(self.root, 4, &mut out);
        out
    }

    #[cfg(test)]
    fn collect(&mut self, table: u64, level: u32, out: &mut Vec<u64>) {
        out.push(table);
        if level == 1 {
            return;
        }
        for i in 0..512 {
            let e = self.mem.table(table)[i];
            if e & EPT_RWX != 0 {
                self.collect(e & ADDR_MASK, level - 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::fake::FakeTables;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Table memory borrowed from a [`FakeTables`] the test keeps, so it can
    /// be inspected after the EPT is gone.
    struct Borrowed<'a>(&'a mut FakeTables);

    impl TableMemory for Borrowed<'_> {
        fn alloc_table(&mut self) -> Option<u64> {
            self.0.alloc_table()
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            self.0.table(pa)
        }
    }

    fn ept() -> Ept<FakeTables> {
        Ept::new(FakeTables::new(64)).unwrap()
    }

    #[test]
    fn map_translate_round_trip_with_offsets() {
        let mut e = ept();
        e.map_4k(0x1000, 0x42, Rights::RWX).unwrap();
        e.map_4k(0x7f_ffff_f000, 0x43, Rights::RX).unwrap();
        assert_eq!(e.translate(0x1000), Some((0x42_000, Rights::RWX)));
        assert_eq!(e.translate(0x1abc), Some((0x42_abc, Rights::RWX)));
        assert_eq!(e.translate(0x1fff), Some((0x42_fff, Rights::RWX)));
        assert_eq!(e.translate(0x7f_ffff_f123), Some((0x43_123, Rights::RX)));
    }

    #[test]
    fn leaf_and_table_entry_bits() {
        let mut e = ept();
        e.map_4k(0x5000, 0x99, Rights::R).unwrap();
        let root = e.root();
        let mut t = root;
        for level in (2..=4).rev() {
            let ent = e.memory().table(t)[index(0x5000, level)];
            assert_eq!(ent & !ADDR_MASK, EPT_RWX, "non-leaf level {level}: RWX, bits 7:3 zero");
            t = ent & ADDR_MASK;
        }
        let leaf = e.memory().table(t)[5];
        assert_eq!(leaf, 0x99_000 | (6 << 3) | EPT_READ);
        assert_eq!(leaf & EPT_MEMTYPE_MASK, EPT_MEMTYPE_WB);
        assert_eq!(leaf & (EPT_IGNORE_PAT | EPT_LARGE), 0);
    }

    #[test]
    fn holes_are_not_mapped() {
        let mut e = ept();
        e.map_4k(0x2000, 7, Rights::RWX).unwrap();
        assert_eq!(e.translate(0x1fff), None);
        assert_eq!(e.translate(0x3000), None);
        assert_eq!(e.translate(0x20_2000), None); // other PT
        assert_eq!(e.translate(0x80_0000_0000), None); // other PML4 entry
        assert_eq!(e.translate(GPA_LIMIT + 0x2000), None);
        assert_eq!(e.translate(u64::MAX), None);
    }

    #[test]
    fn refuses_bad_arguments_and_double_maps() {
        let mut e = ept();
        assert_eq!(e.map_4k(0x1001, 1, Rights::RWX), Err(Errno::EINVAL));
        assert_eq!(e.map_4k(GPA_LIMIT, 1, Rights::RWX), Err(Errno::EINVAL));
        assert_eq!(e.map_4k(!0xfff, 1, Rights::RWX), Err(Errno::EINVAL));
        assert_eq!(e.map_4k(0x1000, 1 << 40, Rights::RWX), Err(Errno::EINVAL));
        e.map_4k(GPA_LIMIT - 0x1000, 1, Rights::RWX).unwrap();
        e.map_4k(0x1000, 2, Rights::RW).unwrap();
        assert_eq!(e.map_4k(0x1000, 3, Rights::RWX), Err(Errno::EEXIST));
        assert_eq!(e.translate(0x1000), Some((0x2000, Rights::RW)));
    }

    #[test]
    fn write_without_read_and_no_access_are_refused() {
        let mut e = ept();
        let wo = Rights { read: false, write: true, exec: false };
        let wx = Rights { read: false, write: true, exec: true };
        let none = Rights { read: false, write: false, exec: false };
        for r in [wo, wx, none] {
            assert_eq!(e.map_4k(0x1000, 1, r), Err(Errno::EINVAL));
        }
        assert_eq!(e.translate(0x1000), None);
        assert_eq!(e.table_frames(), vec![e.root()], "refusal allocated no tables");
        let xo = Rights { read: false, write: false, exec: true };
        e.map_4k(0x1000, 1, xo).unwrap();
        assert_eq!(e.translate(0x1000), Some((0x1000, xo)));
    }

    #[test]
    fn unmap_returns_old_mfn() {
        let mut e = ept();
        e.map_4k(0x3000, 0xabc, Rights::RWX).unwrap();
        assert_eq!(e.unmap_4k(0x3000), Ok(0xabc));
        assert_eq!(e.translate(0x3000), None);
        assert_eq!(e.unmap_4k(0x3000), Err(Errno::ENOENT));
        assert_eq!(e.unmap_4k(0x40_0000_0000), Err(Errno::ENOENT));
        assert_eq!(e.unmap_4k(0x3008), Err(Errno::EINVAL));
        assert_eq!(e.unmap_4k(GPA_LIMIT), Err(Errno::EINVAL));
        e.map_4k(0x3000, 0xdef, Rights::R).unwrap();
        assert_eq!(e.translate(0x3000), Some((0xdef_000, Rights::R)));
    }

    #[test]
    fn eptp_bits() {
        let e = ept();
        let p = e.eptp();
        assert_eq!(p & 0b111, 6, "WB walk memory type");
        assert_eq!((p >> 3) & 0b111, 3, "4-level walk");
        assert_eq!(p & EPTP_ENABLE_AD, 0, "A/D off by default");
        assert_eq!(p & 0xf80, 0, "bits 11:7 zero");
        assert_eq!(p & ADDR_MASK, e.root());
        assert_eq!(p, e.root() | 0x1e);
    }

    #[test]
    fn table_frames_lists_each_table_once() {
        let mut fake = FakeTables::new(64);
        let mut e = Ept::new(Borrowed(&mut fake)).unwrap();
        assert_eq!(e.table_frames(), vec![e.root()]);
        e.map_4k(0x0000, 1, Rights::RWX).unwrap();
        e.map_4k(0x1000, 2, Rights::RWX).unwrap(); // same PT
        e.map_4k(0x20_0000, 3, Rights::RWX).unwrap(); // new PT
        e.map_4k(0x4000_0000, 4, Rights::RWX).unwrap(); // new PD + PT
        e.map_4k(0x80_0000_0000, 5, Rights::RWX).unwrap(); // new PDPT + PD + PT
        let frames = e.table_frames();
        assert_eq!(frames.len(), 1 + 2 + 3 + 4);
        assert_eq!(e.walk_tables(), frames, "recorded == reachable");
        assert_eq!(frames[0], e.root());
        let set: BTreeSet<u64> = frames.iter().copied().collect();
        assert_eq!(set.len(), frames.len());
        drop(e);
        assert_eq!(set, fake.tables.keys().copied().collect(), "exactly the allocated tables");
    }

    #[test]
    fn build_for_domain_maps_exactly_its_frames() {
        let frames: Vec<u64> = (0..600).map(|i| 0x1000 + 3 * i).collect();
        let owned: BTreeSet<u64> = frames.iter().copied().collect();
        let mut e = Ept::build_for_domain(FakeTables::new(64), &frames, |m| owned.contains(&m)).unwrap();
        for (gfn, &mfn) in frames.iter().enumerate() {
            let gpa = gfn as u64 * PAGE_SIZE;
            assert_eq!(e.translate(gpa + 0x10), Some(((mfn << 12) + 0x10, Rights::RWX)));
        }
        let mapped = (0..1024u64).filter(|g| e.translate(g * PAGE_SIZE).is_some()).count();
        assert_eq!(mapped, frames.len());
        assert_eq!(e.translate(600 * PAGE_SIZE), None);
        // 600 pages: PML4, PDPT, PD, two PTs.
        assert_eq!(e.table_frames().len(), 5);
    }

    #[test]
    fn build_for_domain_refuses_a_foreign_frame_before_writing() {
        let owned: BTreeSet<u64> = (100..110).collect();
        for foreign_at in [0usize, 5, 9] {
            let mut frames: Vec<u64> = (100..110).collect();
            frames[foreign_at] = 7;
            let mut fake = FakeTables::new(64);
            let r = Ept::build_for_domain(Borrowed(&mut fake), &frames, |m| owned.contains(&m));
            assert_eq!(r.err(), Some(Errno::EPERM));
            assert!(fake.tables.is_empty(), "no table allocated or written");
        }
        // map_domain on an existing EPT: unchanged on EPERM.
        let mut fake = FakeTables::new(64);
        let mut e = Ept::new(Borrowed(&mut fake)).unwrap();
        assert_eq!(e.map_domain(&[100, 101, 7], |m| owned.contains(&m)), Err(Errno::EPERM));
        assert_eq!(e.translate(0), None);
        drop(e);
        assert_eq!(fake.tables.len(), 1);
        assert!(fake.tables.values().all(|t| t.iter().all(|&x| x == 0)));
    }

    #[test]
    fn build_for_domain_empty_and_out_of_tables() {
        let mut e = Ept::build_for_domain(FakeTables::new(64), &[], |_| true).unwrap();
        assert_eq!(e.table_frames().len(), 1);
        assert_eq!(e.translate(0), None);
        assert_eq!(Ept::build_for_domain(FakeTables::new(0), &[1], |_| true).err(), Some(Errno::ENOMEM));
        assert_eq!(Ept::build_for_domain(FakeTables::new(3), &[1], |_| true).err(), Some(Errno::ENOMEM));
        let mut e = Ept::new(FakeTables::new(2)).unwrap();
        assert_eq!(e.map_4k(0, 1, Rights::RWX), Err(Errno::ENOMEM));
        assert_eq!(e.translate(0), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Map(u64, u64, Rights),
        Unmap(u64),
    }

    fn gpa() -> impl Strategy<Value = u64> {
        // A few slots spread over PT / PD / PDPT / PML4 boundaries.
        (0u64..8, 0usize..4).prop_map(|(p, hi)| p * PAGE_SIZE + [0, 0x20_0000, 0x4000_0000, 0x80_0000_0000][hi])
    }

    fn rights() -> impl Strategy<Value = Rights> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read, write, exec)| Rights { read, write, exec })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (gpa(), 0u64..1 << 20, rights()).prop_map(|(g, m, r)| Op::Map(g, m, r)),
            gpa().prop_map(Op::Unmap),
        ]
    }

    proptest! {
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..64)) {
            let mut e = Ept::new(FakeTables::new(64)).unwrap();
            let mut model: BTreeMap<u64, (u64, Rights)> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Map(g, m, r) => {
                        let want = if !r.is_valid() {
                            Err(Errno::EINVAL)
                        } else if model.contains_key(&g) {
                            Err(Errno::EEXIST)
                        } else {
                            model.insert(g, (m, r));
                            Ok(())
                        };
                        prop_assert_eq!(e.map_4k(g, m, r), want);
                    }
                    Op::Unmap(g) => {
                        let want = model.remove(&g).map(|(m, _)| m).ok_or(Errno::ENOENT);
                        prop_assert_eq!(e.unmap_4k(g), want);
                    }
                }
            }
            for p in 0..8u64 {
                for base in [0, 0x20_0000, 0x4000_0000, 0x80_0000_0000] {
                    let g = base + p * PAGE_SIZE;
                    let want = model.get(&g).map(|&(m, r)| ((m << 12) | 0x123, r));
                    prop_assert_eq!(e.translate(g | 0x123), want);
                }
            }
            let frames = e.table_frames();
            let set: BTreeSet<u64> = frames.iter().copied().collect();
            prop_assert_eq!(set.len(), frames.len());
            let mut walked = e.walk_tables();
            walked.sort_unstable();
            prop_assert_eq!(walked, set.into_iter().collect::<Vec<_>>());
        }
    }
}
