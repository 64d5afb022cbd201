//! PV memory management: the frame table records, for every machine frame, who
//! owns it, whether it is ordinary data or a page table of some level, and how
//! many references keep it in that state. Guest page tables are validated
//! before use, stay read-only to the guest while they are tables, and change
//! only through [`FrameTable::mmu_update`], so a PV guest can never map memory
//! that is not its own (other than frames granted to it, installed by the
//! hypervisor: see "Foreign mappings" below) nor write to its own page tables.
//!
//! The model is a simplified form of Xen's page types:
//!
//! * A frame's *type* is `Writable` (ordinary data) or `PageTable(level)`. It
//!   is a page table exactly while `type_refs > 0`; the references are a pin,
//!   a present entry of a validated table one level up, or a vCPU's CR3
//!   ([`FrameTable::get_base`]).
//! * A validated L1 entry counts as a mapping of its target (`map_count`), and
//!   as a writable mapping (`writable_count`) when it has RW. A frame with a
//!   writable mapping can never become a page table, and a page table can
//!   never be mapped writable: the two states exclude each other.
//! * When the last type reference goes, the table is devalidated: the
//!   references its entries held are dropped, recursively, and it becomes
//!   `Writable` again.
//!
//! Levels strictly decrease along references (an L(n) entry references an
//! L(n-1) table), so references can never form a cycle and recursion is at
//! most four deep.
//!
//! # Foreign (grant) mappings
//!
//! An L1 entry normally maps a frame of the table's owner. The one way to put
//! another domain's frame into a domain's L1 is [`FrameTable::map_foreign`],
//! called by the hypervisor after the grant tables (`crate::grant`) have
//! authorised the access; [`FrameTable::unmap_foreign`] takes it out again.
//!
//! * Foreign entries are recorded in a side table keyed by the entry's machine
//!   address (`ptr`), so they need no spare PTE bit and cannot be forged: an
//!   entry is foreign exactly when the side table says so.
//! * They count in the target's `map_count` (and `writable_count` when RW),
//!   like any other L1 mapping. So while a frame is mapped by a grantee its
//!   owner can neither release it (-EBUSY) nor, if it is mapped writable,
//!   turn it into a page table (-EBUSY).
//! * [`FrameTable::mmu_update`] cannot create one (the target is not owned:
//!   -EPERM) nor overwrite or clear one (-EBUSY): only `unmap_foreign` does.
//!   A foreign frame can never become a page table of the mapper, because
//!   every non-leaf reference and every pin requires ownership.
//! * When an L1 holding foreign entries is devalidated (unpin, its last
//!   reference dropped by `mmu_update`, `put_base` or `teardown`), the
//!   foreign entries are dropped: their counts go, the entry in memory is
//!   cleared, and they are reported by [`FrameTable::take_dropped_foreign`]
//!   so that the caller can release the grant map counts.
//! * Frame lifetime when the *granter* dies: `teardown` does not free frames
//!   that other domains still map. They become *orphans*: owned by
//!   [`Owner::Hypervisor`] (no domain can map or assign them), not returned
//!   by `teardown`. When the last foreign mapping of an orphan goes (through
//!   `unmap_foreign` or devalidation of the mapper's L1), it becomes
//!   [`Owner::Free`] and is reported once by [`FrameTable::take_freed_orphans`].
//!   The frame table is the single authority on when such a frame may be
//!   reused; the grant tables only keep the grant bookkeeping.
//! * [`FrameTable::translate`] (hypercall buffers) only follows frames the
//!   domain owns, so foreign mappings cannot be used as hypercall buffers.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use shared_abi::{DomId, Errno};

use crate::machine::{MachineMemory, Mfn};
use crate::paging::{index, is_canonical, PteFlags, ADDR_MASK};

/// The L4 slot reserved for the hypervisor's entry area in every guest L4.
/// Validation ignores it, pinning an L4 overwrites it, guests cannot update it.
pub const HV_L4_SLOT: usize = 511;

/// Entries per table.
const ENTRIES: usize = 512;
const PAGE: u64 = 4096;

const P: u64 = PteFlags::PRESENT.bits();
const RW: u64 = PteFlags::WRITABLE.bits();
/// Flag bits a guest may set in a non-leaf entry (L2, L3, L4).
const UPPER_FLAGS: u64 = PteFlags::PRESENT.bits()
    | PteFlags::WRITABLE.bits()
    | PteFlags::USER.bits()
    | PteFlags::WRITE_THROUGH.bits()
    | PteFlags::NO_CACHE.bits()
    | PteFlags::ACCESSED.bits()
    | PteFlags::DIRTY.bits()
    | PteFlags::NO_EXECUTE.bits();
/// Everything a guest may set in an L1 entry; any other bit is refused.
const L1_ALLOWED: u64 = ADDR_MASK | UPPER_FLAGS | PteFlags::GLOBAL.bits();
/// Everything a guest may set in an L2/L3/L4 entry (no PS: no huge pages).
const UPPER_ALLOWED: u64 = ADDR_MASK | UPPER_FLAGS;

/// Who a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Given back by a domain; the allocator may hand it out again.
    Free,
    /// Used by microhv itself (or not yet handed to anyone).
    Hypervisor,
    /// Belongs to this domain.
    Domain(DomId),
}

/// What a frame is currently used as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// Ordinary data: may be mapped writable.
    Writable,
    /// A validated page table of this level (1 = PT ... 4 = PML4).
    PageTable(u8),
}

/// Everything the frame table knows about one frame (a copy, see [`FrameTable::info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub owner: Owner,
    pub ty: FrameType,
    /// References keeping `ty` a page table: pin, entries of validated tables
    /// one level up, CR3 references. Always 0 for `Writable`.
    pub type_refs: u32,
    /// Pinned by its owner with [`FrameTable::pin`].
    pub pinned: bool,
    /// Present entries of validated L1 tables that point at this frame: the
    /// owner's own mappings plus other domains' foreign (grant) mappings.
    pub map_count: u32,
    /// Those of `map_count` that have RW.
    pub writable_count: u32,
    /// Cannot be released (e.g. the domain's shared_info page).
    pub special: bool,
}

impl FrameInfo {
    const HYPERVISOR: FrameInfo = FrameInfo {
        owner: Owner::Hypervisor,
        ty: FrameType::Writable,
        type_refs: 0,
        pinned: false,
        map_count: 0,
        writable_count: 0,
        special: false,
    };
}

/// A foreign (grant) mapping in an L1 entry, as reported by
/// [`FrameTable::foreign_mapping`] and [`FrameTable::take_dropped_foreign`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignMapping {
    /// The domain whose L1 table holds the entry.
    pub mapper: DomId,
    /// Machine address of the entry (table mfn * 4096 + index * 8).
    pub ptr: u64,
    /// The foreign frame it maps.
    pub mfn: Mfn,
    /// Mapped with RW.
    pub writable: bool,
}

/// What the side table keeps about one foreign entry (the mapper is the
/// owner of the table holding it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ForeignEntry {
    mfn: Mfn,
    writable: bool,
}

/// Per-frame ownership and type information for frames `0..nr_frames`
/// (20 bytes per frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameTable {
    frames: Vec<FrameInfo>,
    hv_l4_entry: u64,
    /// Frames owned per domain, so that [`FrameTable::frames_owned`] is cheap.
    owned: BTreeMap<DomId, u64>,
    /// Foreign entries of validated L1 tables, by entry machine address.
    foreign: BTreeMap<u64, ForeignEntry>,
    /// Foreign entries dropped by devalidation, not yet taken by the caller.
    dropped: Vec<ForeignMapping>,
    /// Frames of dead domains kept (as [`Owner::Hypervisor`]) because other
    /// domains still map them.
    orphans: BTreeSet<u64>,
    /// Orphans whose last mapping went; now [`Owner::Free`], not yet taken.
    freed_orphans: Vec<Mfn>,
    /// Device memory (MMIO) each domain may map: half-open MFN ranges that
    /// are never RAM. See [`FrameTable::permit_io`].
    io: BTreeMap<DomId, Vec<(u64, u64)>>,
}

impl FrameTable {
    /// Frames `0..nr_frames` exist and all start as [`Owner::Hypervisor`],
    /// i.e. not mappable by guests. `hv_l4_entry` is the raw entry written
    /// into slot [`HV_L4_SLOT`] of every L4 when it is pinned.
    pub fn new(nr_frames: u64, hv_l4_entry: u64) -> Self {
        let n = usize::try_from(nr_frames).expect("frame count fits in usize");
        FrameTable {
            frames: alloc::vec![FrameInfo::HYPERVISOR; n],
            hv_l4_entry,
            owned: BTreeMap::new(),
            foreign: BTreeMap::new(),
            dropped: Vec::new(),
            orphans: BTreeSet::new(),
            freed_orphans: Vec::new(),
            io: BTreeMap::new(),
        }
    }

    /// Lets `dom` map the device-memory frames `start..end` in its L1 tables
    /// (the device MMIO ranges Dom0 owns). Such entries take no reference:
    /// these frames are not RAM and have no owner in the table. The caller
    /// must pass ranges that hold no RAM frame (microhv derives them from the
    /// memory map), and -EINVAL comes back for a range overlapping a frame
    /// some domain or the allocator holds.
    pub fn permit_io(&mut self, dom: DomId, start: u64, end: u64) -> Result<(), Errno> {
        if start >= end {
            return Err(Errno::EINVAL);
        }
        let first = start.min(self.frames.len() as u64);
        let last = end.min(self.frames.len() as u64);
        if self.frames[first as usize..last as usize].iter().any(|f| f.owner != Owner::Hypervisor) {
            return Err(Errno::EINVAL);
        }
        self.io.entry(dom).or_default().push((start, end));
        Ok(())
    }

    /// Whether `dom` may map the device frame `mfn`.
    pub fn io_permitted(&self, dom: DomId, mfn: u64) -> bool {
        self.io.get(&dom).is_some_and(|v| v.iter().any(|&(s, e)| (s..e).contains(&mfn)))
    }

    fn is_io(&self, mfn: u64) -> bool {
        self.io.values().flatten().any(|&(s, e)| (s..e).contains(&mfn))
    }

    /// Changes the entry written into slot [`HV_L4_SLOT`] by later pins.
    pub fn set_hv_l4_entry(&mut self, v: u64) {
        self.hv_l4_entry = v;
    }

    /// Number of frames described.
    pub fn nr_frames(&self) -> u64 {
        self.frames.len() as u64
    }

    fn slot(&self, mfn: Mfn) -> Option<usize> {
        usize::try_from(mfn.0).ok().filter(|&i| i < self.frames.len())
    }

    /// Everything known about `mfn`, or `None` when it is out of range.
    pub fn info(&self, mfn: Mfn) -> Option<FrameInfo> {
        self.slot(mfn).map(|i| self.frames[i])
    }

    /// Owner of `mfn`; frames out of range count as the hypervisor's.
    pub fn owner(&self, mfn: Mfn) -> Owner {
        self.info(mfn).map_or(Owner::Hypervisor, |f| f.owner)
    }

    /// Current type of `mfn`, or `None` when it is out of range.
    pub fn frame_type(&self, mfn: Mfn) -> Option<FrameType> {
        self.info(mfn).map(|f| f.ty)
    }

    /// Number of frames `dom` owns.
    pub fn frames_owned(&self, dom: DomId) -> u64 {
        self.owned.get(&dom).copied().unwrap_or(0)
    }

    /// Gives `mfn` to `dom` as an unreferenced `Writable` frame. It must be
    /// [`Owner::Hypervisor`] or [`Owner::Free`]: -EINVAL out of range, -EBUSY
    /// when a domain owns it or anything still references it.
    pub fn assign(&mut self, mfn: Mfn, dom: DomId) -> Result<(), Errno> {
        let i = self.slot(mfn).ok_or(Errno::EINVAL)?;
        let f = &mut self.frames[i];
        if matches!(f.owner, Owner::Domain(_))
            || f.ty != FrameType::Writable
            || f.type_refs != 0
            || f.pinned
            || f.map_count != 0
        {
            return Err(Errno::EBUSY);
        }
        *f = FrameInfo { owner: Owner::Domain(dom), ..FrameInfo::HYPERVISOR };
        *self.owned.entry(dom).or_insert(0) += 1;
        Ok(())
    }

    /// Marks a frame "special" (e.g. a domain's shared_info page, which
    /// microhv writes to): it cannot be released, nor become a page table,
    /// while special. Set it while the frame is still `Writable` (e.g. right
    /// after [`assign`](Self::assign)). Out-of-range frames are ignored.
    pub fn set_special(&mut self, mfn: Mfn, special: bool) {
        if let Some(i) = self.slot(mfn) {
            debug_assert!(!special || self.frames[i].ty == FrameType::Writable, "special page table {mfn:?}");
            self.frames[i].special = special;
        }
    }

    /// Balloons down one frame of `dom`: it becomes [`Owner::Free`] and the
    /// caller gives it back to the allocator. -EPERM when `dom` does not own
    /// it; -EBUSY when it is special, pinned, a page table or still mapped.
    pub fn release(&mut self, mfn: Mfn, dom: DomId) -> Result<(), Errno> {
        if self.owner(mfn) != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        let i = self.slot(mfn).ok_or(Errno::EPERM)?;
        let f = &mut self.frames[i];
        if f.special || f.pinned || f.type_refs != 0 || f.ty != FrameType::Writable || f.map_count != 0 {
            return Err(Errno::EBUSY);
        }
        *f = FrameInfo { owner: Owner::Free, ..FrameInfo::HYPERVISOR };
        self.drop_owned(dom, 1);
        Ok(())
    }

    fn drop_owned(&mut self, dom: DomId, n: u64) {
        if let Some(c) = self.owned.get_mut(&dom) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.owned.remove(&dom);
            }
        }
    }

    /// Validates `mfn` (owned by `dom`) as a page table of `level` (1..=4),
    /// recursively, and pins it so that it stays one until [`unpin`](Self::unpin).
    /// Pinning an L4 writes the hypervisor entry into slot [`HV_L4_SLOT`].
    ///
    /// Errors: -EINVAL bad level, frame out of range, bad entry or wrong type;
    /// -EPERM not the domain's frame (or an entry maps one); -EEXIST already
    /// pinned; -EBUSY mapped writable; -EACCES an L1 entry maps a page table
    /// writable. On error nothing has changed.
    pub fn pin<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, mfn: Mfn, level: u8) -> Result<(), Errno> {
        if !(1..=4).contains(&level) {
            return Err(Errno::EINVAL);
        }
        let i = self.slot(mfn).ok_or(Errno::EINVAL)?;
        if self.frames[i].owner != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        if self.frames[i].pinned {
            return Err(Errno::EEXIST);
        }
        self.get_type(mem, dom, i, level)?;
        self.frames[i].pinned = true;
        if level == 4 {
            mem.write_u64(mfn, HV_L4_SLOT, self.hv_l4_entry);
        }
        Ok(())
    }

    /// Drops the pin on `mfn`; the table is devalidated when nothing else
    /// references it (L1s then lose their foreign entries, see
    /// [`take_dropped_foreign`](Self::take_dropped_foreign)). -EPERM not the
    /// domain's frame, -EINVAL not pinned.
    pub fn unpin<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, mfn: Mfn) -> Result<(), Errno> {
        if self.owner(mfn) != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        let i = self.slot(mfn).ok_or(Errno::EPERM)?;
        if !self.frames[i].pinned {
            return Err(Errno::EINVAL);
        }
        self.frames[i].pinned = false;
        self.put_type(mem, i);
        Ok(())
    }

    /// Ok if `mfn` is a pinned L4 owned by `dom` (may be loaded into CR3).
    /// -EPERM not the domain's, -EINVAL not a pinned L4.
    pub fn check_base(&self, dom: DomId, mfn: Mfn) -> Result<(), Errno> {
        if self.owner(mfn) != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        match self.info(mfn) {
            Some(f) if f.pinned && f.ty == FrameType::PageTable(4) => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// [`check_base`](Self::check_base), then takes a type reference on the L4
    /// for a vCPU's CR3, so that unpinning it while it is loaded does not
    /// devalidate it. Give it back with [`put_base`](Self::put_base) when the
    /// vCPU switches away. [`teardown`](Self::teardown) drops leftovers.
    pub fn get_base(&mut self, dom: DomId, mfn: Mfn) -> Result<(), Errno> {
        self.check_base(dom, mfn)?;
        let i = self.slot(mfn).ok_or(Errno::EINVAL)?;
        self.frames[i].type_refs = self.frames[i].type_refs.checked_add(1).ok_or(Errno::ERANGE)?;
        Ok(())
    }

    /// Drops a reference taken by [`get_base`](Self::get_base); devalidates
    /// the L4 if it was the last one. -EINVAL when there is no such reference.
    pub fn put_base<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, mfn: Mfn) -> Result<(), Errno> {
        if self.owner(mfn) != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        let i = self.slot(mfn).ok_or(Errno::EPERM)?;
        let f = self.frames[i];
        let base_refs = f.type_refs.saturating_sub(u32::from(f.pinned));
        if f.ty != FrameType::PageTable(4) || base_refs == 0 {
            return Err(Errno::EINVAL);
        }
        self.put_type(mem, i);
        Ok(())
    }

    /// Writes one entry of one of `dom`'s validated tables. `ptr` is the
    /// entry's machine address (table mfn * 4096 + index * 8), `val` the new
    /// raw entry. The new entry is validated first (taking its references),
    /// then the old entry's references are dropped, then the entry is written.
    ///
    /// Errors: -EINVAL unaligned `ptr`, the frame is not a validated table, or
    /// a bad entry; -EPERM not the domain's table, slot [`HV_L4_SLOT`] of an
    /// L4, or the entry maps a frame the domain does not own; -EBUSY the entry
    /// is a foreign mapping (only [`unmap_foreign`](Self::unmap_foreign) may
    /// change it); plus the errors of validation (see [`pin`](Self::pin)). On
    /// error nothing has changed.
    ///
    /// Dropping the last reference to an L1 drops its foreign entries: see
    /// [`take_dropped_foreign`](Self::take_dropped_foreign).
    pub fn mmu_update<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, ptr: u64, val: u64) -> Result<(), Errno> {
        if ptr & 7 != 0 {
            return Err(Errno::EINVAL);
        }
        let table = Mfn(ptr / PAGE);
        let idx = ((ptr % PAGE) / 8) as usize;
        if self.owner(table) != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        let t = self.info(table).ok_or(Errno::EPERM)?;
        let level = match t.ty {
            FrameType::PageTable(l) if t.type_refs > 0 => l,
            _ => return Err(Errno::EINVAL),
        };
        if level == 4 && idx == HV_L4_SLOT {
            return Err(Errno::EPERM);
        }
        if self.foreign.contains_key(&ptr) {
            return Err(Errno::EBUSY);
        }
        self.get_entry(mem, dom, val, level)?;
        let old = mem.read_u64(table, idx);
        self.put_entry(mem, old, level);
        mem.write_u64(table, idx, val);
        Ok(())
    }

    /// Installs, in `dom`'s validated L1 table entry at machine address
    /// `ptr`, a mapping of the foreign frame `mfn` owned by `granter`. The
    /// caller has already authorised it through a grant (see `crate::grant`);
    /// naming the granter here makes sure the frame still belongs to it (a
    /// frame released and handed to someone else since the grant was made is
    /// refused). The entry becomes present, NX, and RW iff `writable`; it
    /// counts as a mapping of `mfn` (so its owner cannot release it) and can
    /// only be removed by [`unmap_foreign`](Self::unmap_foreign) or by
    /// devalidation of the table (see [`take_dropped_foreign`](Self::take_dropped_foreign)).
    ///
    /// Errors: -EINVAL unaligned `ptr`, not a validated L1, `granter == dom`
    /// or `mfn` out of range; -EPERM the table is not `dom`'s or `mfn` is not
    /// `granter`'s; -EBUSY the entry is present; -EACCES `writable` and `mfn`
    /// is a page table; -ERANGE a count would overflow. On error nothing has
    /// changed.
    pub fn map_foreign<M: MachineMemory>(
        &mut self,
        mem: &mut M,
        dom: DomId,
        ptr: u64,
        granter: DomId,
        mfn: Mfn,
        writable: bool,
    ) -> Result<(), Errno> {
        let (table, idx) = self.l1_slot(dom, ptr)?;
        if granter == dom {
            return Err(Errno::EINVAL);
        }
        let t = self.slot(mfn).ok_or(Errno::EINVAL)?;
        if mfn.addr() & !ADDR_MASK != 0 {
            return Err(Errno::EINVAL);
        }
        if self.frames[t].owner != Owner::Domain(granter) {
            return Err(Errno::EPERM);
        }
        if mem.read_u64(table, idx) & P != 0 || self.foreign.contains_key(&ptr) {
            return Err(Errno::EBUSY);
        }
        let f = &mut self.frames[t];
        if writable && f.ty != FrameType::Writable {
            return Err(Errno::EACCES);
        }
        let map_count = f.map_count.checked_add(1).ok_or(Errno::ERANGE)?;
        let writable_count = f.writable_count.checked_add(u32::from(writable)).ok_or(Errno::ERANGE)?;
        f.map_count = map_count;
        f.writable_count = writable_count;
        self.foreign.insert(ptr, ForeignEntry { mfn, writable });
        let rw = if writable { RW } else { 0 };
        mem.write_u64(table, idx, mfn.addr() | P | rw | PteFlags::NO_EXECUTE.bits());
        Ok(())
    }

    /// Removes a mapping made by [`map_foreign`](Self::map_foreign): the
    /// entry at `ptr` in `dom`'s L1 must be a foreign entry mapping exactly
    /// `mfn`. The entry is cleared and its counts dropped. If `mfn` is an
    /// orphan (its owner is dead) and this was its last mapping, it becomes
    /// free: see [`take_freed_orphans`](Self::take_freed_orphans).
    ///
    /// Errors: -EINVAL unaligned `ptr`, not a validated L1, no foreign entry
    /// there, or it maps another frame; -EPERM the table is not `dom`'s.
    pub fn unmap_foreign<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, ptr: u64, mfn: Mfn) -> Result<(), Errno> {
        let (table, idx) = self.l1_slot(dom, ptr)?;
        let fe = *self.foreign.get(&ptr).ok_or(Errno::EINVAL)?;
        if fe.mfn != mfn {
            return Err(Errno::EINVAL);
        }
        self.foreign.remove(&ptr);
        mem.write_u64(table, idx, 0);
        self.drop_foreign_ref(fe);
        Ok(())
    }

    /// The foreign mapping in the entry at `ptr`, if that entry is one.
    pub fn foreign_mapping(&self, ptr: u64) -> Option<ForeignMapping> {
        let fe = self.foreign.get(&ptr)?;
        let Owner::Domain(mapper) = self.owner(Mfn(ptr / PAGE)) else {
            debug_assert!(false, "foreign entry {ptr:#x} in a table no domain owns");
            return None;
        };
        Some(ForeignMapping { mapper, ptr, mfn: fe.mfn, writable: fe.writable })
    }

    /// Number of foreign entries currently installed, in all domains.
    pub fn foreign_count(&self) -> usize {
        self.foreign.len()
    }

    /// Foreign entries removed because the L1 holding them was devalidated
    /// (unpin, last reference dropped, teardown) since the last call. Their
    /// counts are already dropped here; the caller releases the matching
    /// grant map counts (`GrantTables::release_map`).
    pub fn take_dropped_foreign(&mut self) -> Vec<ForeignMapping> {
        core::mem::take(&mut self.dropped)
    }

    /// Orphans (frames of torn-down domains kept because other domains still
    /// mapped them) whose last mapping has gone since the last call. They
    /// are [`Owner::Free`] now; give them back to the allocator.
    pub fn take_freed_orphans(&mut self) -> Vec<Mfn> {
        core::mem::take(&mut self.freed_orphans)
    }

    /// Number of orphans still mapped by some domain (owned by
    /// [`Owner::Hypervisor`] until then).
    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    /// The (table, index) of the entry at `ptr`, which must be in a
    /// validated L1 of `dom`.
    fn l1_slot(&self, dom: DomId, ptr: u64) -> Result<(Mfn, usize), Errno> {
        if ptr & 7 != 0 {
            return Err(Errno::EINVAL);
        }
        let table = Mfn(ptr / PAGE);
        let t = self.info(table).filter(|t| t.owner == Owner::Domain(dom)).ok_or(Errno::EPERM)?;
        if t.ty != FrameType::PageTable(1) || t.type_refs == 0 {
            return Err(Errno::EINVAL);
        }
        Ok((table, ((ptr % PAGE) / 8) as usize))
    }

    /// Drops the counts a foreign entry held on its target; frees an orphan
    /// on its last mapping.
    fn drop_foreign_ref(&mut self, fe: ForeignEntry) {
        let Some(t) = self.slot(fe.mfn) else {
            debug_assert!(false, "foreign entry points out of range");
            return;
        };
        let f = &mut self.frames[t];
        debug_assert!(f.map_count > 0, "map_count underflow on frame {t:#x}");
        f.map_count = f.map_count.saturating_sub(1);
        if fe.writable {
            debug_assert!(f.writable_count > 0, "writable_count underflow on frame {t:#x}");
            f.writable_count = f.writable_count.saturating_sub(1);
        }
        if f.map_count == 0 && self.orphans.remove(&fe.mfn.0) {
            self.frames[t] = FrameInfo { owner: Owner::Free, ..FrameInfo::HYPERVISOR };
            self.freed_orphans.push(fe.mfn);
        }
    }

    /// Drops every foreign entry of the L1 table `i`, which is being
    /// devalidated: clears it in memory and reports it.
    fn drop_foreign_entries<M: MachineMemory>(&mut self, mem: &mut M, i: usize) {
        let base = i as u64 * PAGE;
        if self.foreign.range(base..base + PAGE).next().is_none() {
            return;
        }
        let Owner::Domain(mapper) = self.frames[i].owner else {
            debug_assert!(false, "foreign entries in a table no domain owns");
            return;
        };
        let entries: Vec<(u64, ForeignEntry)> = self.foreign.range(base..base + PAGE).map(|(&p, &fe)| (p, fe)).collect();
        for (ptr, fe) in entries {
            self.foreign.remove(&ptr);
            mem.write_u64(Mfn(i as u64), ((ptr % PAGE) / 8) as usize, 0);
            self.drop_foreign_ref(fe);
            self.dropped.push(ForeignMapping { mapper, ptr, mfn: fe.mfn, writable: fe.writable });
        }
    }

    /// Translates the guest virtual address `va` through the tables rooted at
    /// `l4` (a validated L4 of `dom`), as a supervisor access, to a machine
    /// address. -EFAULT when it is not canonical, lies in slot
    /// [`HV_L4_SLOT`], is not present, is not writable at every level when
    /// `write`, or does not end in a frame `dom` owns.
    pub fn translate<M: MachineMemory>(&self, mem: &M, dom: DomId, l4: Mfn, va: u64, write: bool) -> Result<u64, Errno> {
        if !is_canonical(va) || index(va, 4) == HV_L4_SLOT {
            return Err(Errno::EFAULT);
        }
        let mine = |mfn: Mfn| self.info(mfn).filter(|f| f.owner == Owner::Domain(dom));
        if mine(l4).map(|f| f.ty) != Some(FrameType::PageTable(4)) {
            return Err(Errno::EFAULT);
        }
        let mut table = l4;
        for level in (1..=4u32).rev() {
            let e = mem.read_u64(table, index(va, level));
            if e & P == 0 || (write && e & RW == 0) || (level > 1 && e & PteFlags::HUGE.bits() != 0) {
                return Err(Errno::EFAULT);
            }
            table = Mfn((e & ADDR_MASK) / PAGE);
            let ty = mine(table).ok_or(Errno::EFAULT)?.ty;
            // Validation makes these impossible; checked again as a last line.
            let not_the_next_table = level > 1 && ty != FrameType::PageTable(level as u8 - 1);
            let writing_a_table = level == 1 && write && ty != FrameType::Writable;
            if not_the_next_table || writing_a_table {
                return Err(Errno::EFAULT);
            }
        }
        Ok(table.0 * PAGE + va % PAGE)
    }

    /// Copies `buf.len()` bytes from guest address `va` (see
    /// [`translate`](Self::translate)). -EFAULT when any byte is not readable
    /// or the range wraps around.
    pub fn copy_from_guest<M: MachineMemory>(&self, mem: &M, dom: DomId, l4: Mfn, va: u64, buf: &mut [u8]) -> Result<(), Errno> {
        for (off, n) in chunks(va, buf.len())? {
            let ma = self.translate(mem, dom, l4, va + off as u64, false)?;
            mem.read_bytes(Mfn(ma / PAGE), (ma % PAGE) as usize, &mut buf[off..off + n]);
        }
        Ok(())
    }

    /// Copies `data` to guest address `va`. Every page is checked before
    /// anything is written, so on -EFAULT guest memory is unchanged.
    pub fn copy_to_guest<M: MachineMemory>(&self, mem: &mut M, dom: DomId, l4: Mfn, va: u64, data: &[u8]) -> Result<(), Errno> {
        // Within one page (a bounced exception frame, a status record): one
        // walk checks it and gives the address.
        if !data.is_empty() && (va % PAGE) as usize + data.len() <= PAGE as usize {
            let ma = self.translate(mem, dom, l4, va, true)?;
            mem.write_bytes(Mfn(ma / PAGE), (ma % PAGE) as usize, data);
            return Ok(());
        }
        for (off, _) in chunks(va, data.len())? {
            self.translate(mem, dom, l4, va + off as u64, true)?;
        }
        for (off, n) in chunks(va, data.len())? {
            let ma = self.translate(mem, dom, l4, va + off as u64, true)?;
            mem.write_bytes(Mfn(ma / PAGE), (ma % PAGE) as usize, &data[off..off + n]);
        }
        Ok(())
    }

    /// Destroys `dom`'s memory state: unpins everything, drops every
    /// reference its tables (and CR3 references) hold, and makes all its
    /// frames [`Owner::Free`]. Returns those frames, for the allocator. The
    /// caller must have switched every CPU away from the domain's tables.
    ///
    /// Foreign entries in `dom`'s tables are dropped and reported by
    /// [`take_dropped_foreign`](Self::take_dropped_foreign). Frames of `dom`
    /// that other domains still map (through grants) are not freed nor
    /// returned: they become orphans, owned by [`Owner::Hypervisor`], and are
    /// reported by [`take_freed_orphans`](Self::take_freed_orphans) once
    /// their last mapping goes.
    pub fn teardown<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId) -> Vec<Mfn> {
        let owner = Owner::Domain(dom);
        for i in 0..self.frames.len() {
            if self.frames[i].owner == owner && self.frames[i].pinned {
                self.frames[i].pinned = false;
                self.put_type(mem, i);
            }
        }
        // What is left are CR3 references on L4s. Top-down, every remaining
        // reference on a table of this level can only be such a leftover.
        for level in (1..=4).rev() {
            for i in 0..self.frames.len() {
                let f = self.frames[i];
                if f.owner == owner && f.ty == FrameType::PageTable(level) && f.type_refs > 0 {
                    self.frames[i].type_refs = 1;
                    self.put_type(mem, i);
                }
            }
        }
        // Whatever mappings remain are other domains' foreign entries.
        let mut freed = Vec::new();
        for (i, f) in self.frames.iter_mut().enumerate() {
            if f.owner != owner {
                continue;
            }
            if f.map_count > 0 {
                *f = FrameInfo { map_count: f.map_count, writable_count: f.writable_count, ..FrameInfo::HYPERVISOR };
                self.orphans.insert(i as u64);
            } else {
                *f = FrameInfo { owner: Owner::Free, ..FrameInfo::HYPERVISOR };
                freed.push(Mfn(i as u64));
            }
        }
        self.owned.remove(&dom);
        self.io.remove(&dom);
        freed
    }

    // ---- type references ----------------------------------------------

    /// Takes a type reference making frame `i` (owned by `dom`) a
    /// `PageTable(level)`, validating it when it was not one yet.
    fn get_type<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, i: usize, level: u8) -> Result<(), Errno> {
        let f = &mut self.frames[i];
        match f.ty {
            FrameType::PageTable(l) if l == level => {
                f.type_refs = f.type_refs.checked_add(1).ok_or(Errno::ERANGE)?;
                return Ok(());
            }
            FrameType::PageTable(_) => return Err(Errno::EINVAL),
            FrameType::Writable => {}
        }
        // Special frames are written by microhv itself: as tables, those
        // writes would become unvalidated entries.
        if f.writable_count > 0 || f.special {
            return Err(Errno::EBUSY);
        }
        // Typed before its entries are checked: an entry of the table itself
        // (or of one below it) that maps it writable is then refused.
        f.ty = FrameType::PageTable(level);
        f.type_refs = 1;
        if let Err(e) = self.validate(mem, dom, i, level) {
            let f = &mut self.frames[i];
            f.ty = FrameType::Writable;
            f.type_refs = 0;
            return Err(e);
        }
        Ok(())
    }

    /// Drops a type reference of frame `i`, devalidating it on the last one.
    /// A devalidated L1 loses its foreign entries (see [`Self::take_dropped_foreign`]).
    fn put_type<M: MachineMemory>(&mut self, mem: &mut M, i: usize) {
        let f = &mut self.frames[i];
        debug_assert!(f.type_refs > 0, "type_refs underflow on frame {i:#x}");
        f.type_refs = f.type_refs.saturating_sub(1);
        if f.type_refs == 0 {
            if let FrameType::PageTable(level) = f.ty {
                if level == 1 {
                    self.drop_foreign_entries(mem, i);
                }
                self.for_each_entry(mem, i, level, ENTRIES, |ft, mem, e| ft.put_entry(mem, e, level));
                self.frames[i].ty = FrameType::Writable;
            }
        }
    }

    /// Checks every entry of table `i`; on failure drops what the entries
    /// before the bad one took, so that nothing has changed.
    fn validate<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, i: usize, level: u8) -> Result<(), Errno> {
        let table = Mfn(i as u64);
        for idx in 0..ENTRIES {
            if level == 4 && idx == HV_L4_SLOT {
                continue;
            }
            let e = mem.read_u64(table, idx);
            if let Err(err) = self.get_entry(mem, dom, e, level) {
                self.for_each_entry(mem, i, level, idx, |ft, mem, e| ft.put_entry(mem, e, level));
                return Err(err);
            }
        }
        Ok(())
    }

    /// Calls `f` on the entries `0..end` of table `i` that validation counts.
    fn for_each_entry<M: MachineMemory>(&mut self, mem: &mut M, i: usize, level: u8, end: usize, mut f: impl FnMut(&mut Self, &mut M, u64)) {
        for idx in 0..end {
            if level == 4 && idx == HV_L4_SLOT {
                continue;
            }
            let e = mem.read_u64(Mfn(i as u64), idx);
            f(self, mem, e);
        }
    }

    /// Validates one entry of a table of `level` and takes the references it
    /// needs. Non-present entries need nothing.
    fn get_entry<M: MachineMemory>(&mut self, mem: &mut M, dom: DomId, e: u64, level: u8) -> Result<(), Errno> {
        if e & P == 0 {
            return Ok(());
        }
        let allowed = if level == 1 { L1_ALLOWED } else { UPPER_ALLOWED };
        if e & !allowed != 0 {
            return Err(Errno::EINVAL);
        }
        // Device memory the domain owns: mapped as is, without references.
        if level == 1 && self.io_permitted(dom, (e & ADDR_MASK) / PAGE) {
            return Ok(());
        }
        let t = self.slot(Mfn((e & ADDR_MASK) / PAGE)).ok_or(Errno::EINVAL)?;
        if self.frames[t].owner != Owner::Domain(dom) {
            return Err(Errno::EPERM);
        }
        if level > 1 {
            return self.get_type(mem, dom, t, level - 1);
        }
        let f = &mut self.frames[t];
        let rw = e & RW != 0;
        if rw && f.ty != FrameType::Writable {
            return Err(Errno::EACCES);
        }
        let map_count = f.map_count.checked_add(1).ok_or(Errno::ERANGE)?;
        let writable_count = f.writable_count.checked_add(u32::from(rw)).ok_or(Errno::ERANGE)?;
        f.map_count = map_count;
        f.writable_count = writable_count;
        Ok(())
    }

    /// Drops the references a validated entry of a table of `level` holds.
    fn put_entry<M: MachineMemory>(&mut self, mem: &mut M, e: u64, level: u8) {
        if e & P == 0 {
            return;
        }
        if level == 1 && self.is_io((e & ADDR_MASK) / PAGE) {
            return;
        }
        let Some(t) = self.slot(Mfn((e & ADDR_MASK) / PAGE)) else {
            debug_assert!(false, "validated entry {e:#x} points out of range");
            return;
        };
        if level > 1 {
            self.put_type(mem, t);
            return;
        }
        let f = &mut self.frames[t];
        debug_assert!(f.map_count > 0, "map_count underflow on frame {t:#x}");
        f.map_count = f.map_count.saturating_sub(1);
        if e & RW != 0 {
            debug_assert!(f.writable_count > 0, "writable_count underflow on frame {t:#x}");
            f.writable_count = f.writable_count.saturating_sub(1);
        }
    }
}

/// Splits `[va, va + len)` at page boundaries into (offset into the buffer,
/// length) pieces. -EFAULT when the range wraps around the address space.
fn chunks(va: u64, len: usize) -> Result<impl Iterator<Item = (usize, usize)>, Errno> {
    va.checked_add(len as u64).ok_or(Errno::EFAULT)?;
    let mut off = 0usize;
    Ok(core::iter::from_fn(move || {
        if off >= len {
            return None;
        }
        let in_page = ((va + off as u64) % PAGE) as usize;
        let n = (PAGE as usize - in_page).min(len - off);
        let piece = (off, n);
        off += n;
        Some(piece)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::FakeMachine;
    use proptest::prelude::*;

    const D: DomId = DomId(1);
    const E: DomId = DomId(2);
    const NR: u64 = 64;
    /// Domain D owns 1..=40, E owns 41..=50, the rest are the hypervisor's.
    const HV_FRAME: u64 = 60;
    const HV_ENTRY: u64 = (HV_FRAME << 12) | P | RW;
    const US: u64 = PteFlags::USER.bits();
    const PS: u64 = PteFlags::HUGE.bits();
    const G: u64 = PteFlags::GLOBAL.bits();

    // The standard guest: L4 1 -> L3 2 -> L2 3 -> L1 4, which maps data
    // frames 10..20 RW at va 0..0xa000 and itself read-only at 0xa000.
    const L4: u64 = 1;
    const L3: u64 = 2;
    const L2: u64 = 3;
    const L1: u64 = 4;
    const SELF_VA: u64 = 0xa000;

    fn pte(mfn: u64, flags: u64) -> u64 {
        (mfn << 12) | flags
    }
    fn ptr(table: u64, idx: u64) -> u64 {
        table * PAGE + idx * 8
    }
    fn set(m: &mut FakeMachine, table: u64, idx: usize, val: u64) {
        m.write_u64(Mfn(table), idx, val);
    }
    fn info(ft: &FrameTable, mfn: u64) -> FrameInfo {
        ft.info(Mfn(mfn)).unwrap()
    }

    fn setup() -> (FrameTable, FakeMachine) {
        let mut ft = FrameTable::new(NR, HV_ENTRY);
        for m in 1..=40 {
            ft.assign(Mfn(m), D).unwrap();
        }
        for m in 41..=50 {
            ft.assign(Mfn(m), E).unwrap();
        }
        (ft, FakeMachine::default())
    }

    fn guest() -> (FrameTable, FakeMachine) {
        let (ft, mut m) = setup();
        set(&mut m, L4, 0, pte(L3, P | RW));
        set(&mut m, L3, 0, pte(L2, P | RW));
        set(&mut m, L2, 0, pte(L1, P | RW | US));
        for k in 0..10 {
            set(&mut m, L1, k, pte(10 + k as u64, P | RW | G));
        }
        set(&mut m, L1, 10, pte(L1, P));
        (ft, m)
    }

    fn pinned_guest() -> (FrameTable, FakeMachine) {
        let (mut ft, mut m) = guest();
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();
        (ft, m)
    }

    #[test]
    fn frame_info_stays_small() {
        // The table is allocated on microhv's heap: one entry per machine frame.
        assert!(core::mem::size_of::<FrameInfo>() <= 20);
    }

    #[test]
    fn a_correct_hierarchy_pins_and_translates() {
        let (ft, m) = pinned_guest();
        for (mfn, level) in [(L4, 4), (L3, 3), (L2, 2), (L1, 1)] {
            let f = info(&ft, mfn);
            assert_eq!(f.ty, FrameType::PageTable(level));
            assert_eq!(f.type_refs, 1);
            assert_eq!(f.pinned, mfn == L4);
        }
        assert_eq!(info(&ft, 10).map_count, 1);
        assert_eq!(info(&ft, 10).writable_count, 1);
        assert_eq!((info(&ft, L1).map_count, info(&ft, L1).writable_count), (1, 0));
        assert_eq!(m.read_u64(Mfn(L4), HV_L4_SLOT), HV_ENTRY);
        assert_eq!(ft.check_base(D, Mfn(L4)), Ok(()));
        assert_eq!(ft.check_base(D, Mfn(L3)), Err(Errno::EINVAL));
        assert_eq!(ft.check_base(E, Mfn(L4)), Err(Errno::EPERM));

        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x1234, false), Ok(11 * PAGE + 0x234));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x1234, true), Ok(11 * PAGE + 0x234));
        assert_eq!(ft.translate(&m, D, Mfn(L4), SELF_VA + 8, false), Ok(L1 * PAGE + 8));
        assert_eq!(ft.translate(&m, D, Mfn(L4), SELF_VA + 8, true), Err(Errno::EFAULT));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0xb000, false), Err(Errno::EFAULT));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x20_0000, false), Err(Errno::EFAULT));
        assert_eq!(ft.translate(&m, E, Mfn(L4), 0x1000, false), Err(Errno::EFAULT));
        // Only a validated L4 can be a root.
        assert_eq!(ft.translate(&m, D, Mfn(L3), 0x1000, false), Err(Errno::EFAULT));
    }

    #[test]
    fn hypervisor_free_and_out_of_range_frames_cannot_be_mapped() {
        let (mut ft, mut m) = guest();
        set(&mut m, L1, 11, pte(HV_FRAME, P));
        assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EPERM));
        set(&mut m, L1, 11, pte(1000, P));
        assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EINVAL));
        set(&mut m, L1, 11, 0);
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();
        ft.release(Mfn(30), D).unwrap();
        assert_eq!(ft.owner(Mfn(30)), Owner::Free);
        for target in [30, HV_FRAME] {
            assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), pte(target, P)), Err(Errno::EPERM));
        }
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(HV_FRAME, P)), Err(Errno::EPERM));
        assert_eq!(ft.pin(&mut m, D, Mfn(HV_FRAME), 1), Err(Errno::EPERM));
        assert_eq!(ft.pin(&mut m, D, Mfn(NR), 1), Err(Errno::EINVAL));
    }

    #[test]
    fn device_memory_is_mappable_only_by_the_domain_it_was_permitted_to() {
        let (mut ft, mut m) = pinned_guest();
        // Frames 1000..1004 are device memory beyond RAM, 61..62 a hole in it.
        assert_eq!(ft.permit_io(D, 1000, 1004), Ok(()));
        assert_eq!(ft.permit_io(D, 61, 62), Ok(()));
        // Ranges holding a frame someone owns are refused.
        assert_eq!(ft.permit_io(D, 40, 42), Err(Errno::EINVAL));
        assert_eq!(ft.permit_io(D, 5, 5), Err(Errno::EINVAL));
        let uc = PteFlags::NO_CACHE.bits() | PteFlags::WRITE_THROUGH.bits();
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), pte(1001, P | RW | uc)), Ok(()));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 12), pte(61, P | RW)), Ok(()));
        // Nobody else: the other domain gets the usual refusal.
        assert!(!ft.io_permitted(E, 1001));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 13), pte(1004, P | RW)), Err(Errno::EINVAL));
        // Not as a table, and never a hypercall buffer.
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(1001, P | RW)), Err(Errno::EINVAL));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 11 * PAGE, false), Err(Errno::EFAULT));
        // Unmapping and tearing down take no references that were not there.
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), 0), Ok(()));
        assert_eq!(info(&ft, 61).map_count, 0);
        let freed = ft.teardown(&mut m, D);
        assert_eq!(freed.len(), 40);
        assert!(!ft.io_permitted(D, 1001));
    }

    #[test]
    fn another_domains_frame_cannot_be_mapped() {
        let (mut ft, mut m) = guest();
        set(&mut m, L1, 11, pte(41, P));
        assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EPERM));
        set(&mut m, L1, 11, 0);
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), pte(41, P | RW)), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(41, P)), Err(Errno::EPERM));
        // Nor may it update or pin another domain's frames.
        assert_eq!(ft.mmu_update(&mut m, E, ptr(L1, 11), 0), Err(Errno::EPERM));
        assert_eq!(ft.pin(&mut m, E, Mfn(L4), 4), Err(Errno::EPERM));
        assert_eq!(ft.unpin(&mut m, E, Mfn(L4)), Err(Errno::EPERM));
        assert_eq!(info(&ft, 41).map_count, 0);
    }

    #[test]
    fn page_tables_cannot_be_mapped_writable() {
        // At pin time: the L1 mapping itself RW, or a higher table RW.
        for (idx, target) in [(10, L1), (11, L3), (11, L4)] {
            let (mut ft, mut m) = guest();
            set(&mut m, L1, idx, pte(target, P | RW));
            let before = ft.clone();
            assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EACCES), "target {target}");
            assert_eq!(ft, before);
        }
        // Through mmu_update.
        let (mut ft, mut m) = pinned_guest();
        for target in [L1, L2, L3, L4] {
            assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), pte(target, P | RW)), Err(Errno::EACCES));
        }
        // Read-only mappings of page tables are fine.
        ft.mmu_update(&mut m, D, ptr(L1, 11), pte(L2, P | US)).unwrap();
        assert_eq!(info(&ft, L2).map_count, 1);
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0xb000, false), Ok(L2 * PAGE));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0xb000, true), Err(Errno::EFAULT));
    }

    #[test]
    fn a_writable_mapped_frame_cannot_become_a_table() {
        let (mut ft, mut m) = pinned_guest();
        assert_eq!(ft.pin(&mut m, D, Mfn(10), 1), Err(Errno::EBUSY));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(10, P | RW)), Err(Errno::EBUSY));
        assert_eq!(ft.frame_type(Mfn(10)), Some(FrameType::Writable));
        // Nor can a special frame (microhv writes to it).
        ft.set_special(Mfn(20), true);
        assert_eq!(ft.pin(&mut m, D, Mfn(20), 1), Err(Errno::EBUSY));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(20, P)), Err(Errno::EBUSY));
        ft.mmu_update(&mut m, D, ptr(L1, 11), pte(20, P | RW)).unwrap(); // as data it is fine
        // After the writable mapping goes (read-only stays), it can.
        ft.mmu_update(&mut m, D, ptr(L1, 0), pte(10, P)).unwrap();
        assert_eq!(info(&ft, 10).writable_count, 0);
        ft.mmu_update(&mut m, D, ptr(L2, 1), pte(10, P | RW)).unwrap();
        assert_eq!(ft.frame_type(Mfn(10)), Some(FrameType::PageTable(1)));
        // A table of one level cannot be used as another.
        assert_eq!(ft.pin(&mut m, D, Mfn(10), 2), Err(Errno::EINVAL));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L3, 1), pte(10, P)), Err(Errno::EINVAL));
    }

    #[test]
    fn huge_pages_and_reserved_bits_are_refused() {
        let bad = [
            (L2, 0, pte(L1, P | RW | PS)),
            (L3, 0, pte(L2, P | PS)),
            (L4, 0, pte(L3, P | G)),
            (L1, 11, pte(20, P | PS)), // PAT
            (L1, 11, pte(20, P | 1 << 9)),
            (L1, 11, pte(20, P | 1 << 52)),
            (L1, 11, pte(20, P | 1 << 62)),
        ];
        for (table, idx, val) in bad {
            let (mut ft, mut m) = guest();
            set(&mut m, table, idx, val);
            let before = ft.clone();
            assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EINVAL), "{val:#x} in {table}");
            assert_eq!(ft, before);
            let (mut ft, mut m) = pinned_guest();
            let idx = if table == L4 { 1 } else { idx as u64 + 1 };
            assert_eq!(ft.mmu_update(&mut m, D, ptr(table, idx), val), Err(Errno::EINVAL), "{val:#x} in {table}");
        }
        // Non-present entries may hold anything; G and NX in L1 are fine.
        let (mut ft, mut m) = guest();
        set(&mut m, L2, 1, !P);
        set(&mut m, L1, 11, pte(20, P | G | 1 << 63));
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();
    }

    #[test]
    fn a_failed_pin_leaves_everything_as_it_was() {
        let (mut ft, mut m) = guest();
        // L1 4 is already in use (pinned on its own); a second L1 (5) is new
        // and its last entry maps a foreign frame, deep below everything else.
        ft.pin(&mut m, D, Mfn(L1), 1).unwrap();
        set(&mut m, L2, 1, pte(5, P | RW));
        set(&mut m, L2, 2, pte(L1, P));
        set(&mut m, L3, 1, pte(6, P)); // another L2, fine
        set(&mut m, 6, 0, pte(L1, P));
        for k in 0..5 {
            set(&mut m, 5, k, pte(20 + k as u64, P | RW));
        }
        set(&mut m, 5, 5, pte(L1, P));
        set(&mut m, 5, 511, pte(45, P));
        set(&mut m, L4, HV_L4_SLOT, 0xdead_beef); // ignored, and not overwritten on failure
        let before = ft.clone();
        let mem_before = m.frames.clone();
        let writes = m.entry_writes.len();
        assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EPERM));
        assert_eq!(ft, before);
        assert_eq!(m.frames, mem_before);
        assert_eq!(m.entry_writes.len(), writes);
        assert_eq!(info(&ft, L1).type_refs, 1);
        assert_eq!(info(&ft, 5).ty, FrameType::Writable);
        assert_eq!(info(&ft, 20).map_count, 0);
        // Fixed, it pins, and slot 511 now holds the hypervisor entry.
        set(&mut m, 5, 511, 0);
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();
        assert_eq!(info(&ft, L1).type_refs, 4);
        assert_eq!(info(&ft, 20).writable_count, 1);
        assert_eq!(m.read_u64(Mfn(L4), HV_L4_SLOT), HV_ENTRY);
    }

    #[test]
    fn mmu_update_checks_the_table_and_the_slot() {
        let (mut ft, mut m) = pinned_guest();
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L4, 511), 0), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L4, 511), pte(L3, P)), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 1) + 4, 0), Err(Errno::EINVAL));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(10, 0), 0), Err(Errno::EINVAL)); // not a table
        assert_eq!(ft.mmu_update(&mut m, D, ptr(HV_FRAME, 0), 0), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, u64::MAX - 7, 0), Err(Errno::EPERM));
        assert_eq!(m.read_u64(Mfn(L4), HV_L4_SLOT), HV_ENTRY);
        // The same table hooked twice, then unhooked twice.
        ft.mmu_update(&mut m, D, ptr(L2, 1), pte(L1, P)).unwrap();
        assert_eq!(info(&ft, L1).type_refs, 2);
        ft.mmu_update(&mut m, D, ptr(L2, 1), 0).unwrap();
        // Replacing an entry by itself keeps the table validated.
        ft.mmu_update(&mut m, D, ptr(L2, 0), pte(L1, P | RW)).unwrap();
        assert_eq!(info(&ft, L1).type_refs, 1);
        assert_eq!(m.read_u64(Mfn(L2), 0), pte(L1, P | RW));
        // A new, empty L1 comes and goes.
        ft.mmu_update(&mut m, D, ptr(L2, 1), pte(7, P | RW)).unwrap();
        assert_eq!(ft.frame_type(Mfn(7)), Some(FrameType::PageTable(1)));
        ft.mmu_update(&mut m, D, ptr(L2, 1), 0).unwrap();
        assert_eq!(info(&ft, 7), FrameInfo { owner: Owner::Domain(D), ..FrameInfo::HYPERVISOR });
        // Unhooking the only L1 devalidates it and drops its mappings.
        ft.mmu_update(&mut m, D, ptr(L2, 0), 0).unwrap();
        assert_eq!(ft.frame_type(Mfn(L1)), Some(FrameType::Writable));
        assert_eq!(info(&ft, 10).map_count, 0);
        assert_eq!(info(&ft, L1).map_count, 0);
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 0), 0), Err(Errno::EINVAL));
    }

    #[test]
    fn release_needs_an_unmapped_plain_frame() {
        let (mut ft, mut m) = pinned_guest();
        assert_eq!(ft.frames_owned(D), 40);
        assert_eq!(ft.release(Mfn(10), D), Err(Errno::EBUSY)); // mapped
        assert_eq!(ft.release(Mfn(L2), D), Err(Errno::EBUSY)); // page table
        assert_eq!(ft.release(Mfn(L4), D), Err(Errno::EBUSY)); // pinned
        assert_eq!(ft.release(Mfn(41), D), Err(Errno::EPERM));
        assert_eq!(ft.release(Mfn(HV_FRAME), D), Err(Errno::EPERM));
        assert_eq!(ft.release(Mfn(1000), D), Err(Errno::EPERM));
        ft.set_special(Mfn(30), true);
        assert_eq!(ft.release(Mfn(30), D), Err(Errno::EBUSY));
        ft.set_special(Mfn(30), false);
        ft.release(Mfn(30), D).unwrap();

        ft.mmu_update(&mut m, D, ptr(L1, 0), 0).unwrap();
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x10, false), Err(Errno::EFAULT));
        ft.release(Mfn(10), D).unwrap();
        assert_eq!(ft.owner(Mfn(10)), Owner::Free);
        assert_eq!(ft.frames_owned(D), 38);
        assert_eq!(ft.release(Mfn(10), D), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 0), pte(10, P)), Err(Errno::EPERM));
        // A free frame can be handed out again, a domain's cannot.
        assert_eq!(ft.assign(Mfn(11), E), Err(Errno::EBUSY));
        assert_eq!(ft.assign(Mfn(NR), E), Err(Errno::EINVAL));
        ft.assign(Mfn(10), E).unwrap();
        assert_eq!(ft.frames_owned(E), 11);
    }

    #[test]
    fn unpin_devalidates_and_pin_rules() {
        let (mut ft, mut m) = pinned_guest();
        assert_eq!(ft.pin(&mut m, D, Mfn(L4), 4), Err(Errno::EEXIST));
        assert_eq!(ft.pin(&mut m, D, Mfn(20), 0), Err(Errno::EINVAL));
        assert_eq!(ft.pin(&mut m, D, Mfn(20), 5), Err(Errno::EINVAL));
        assert_eq!(ft.unpin(&mut m, D, Mfn(L3)), Err(Errno::EINVAL));
        // Pinning a table that is also referenced: unpinning the L4 keeps it.
        ft.pin(&mut m, D, Mfn(L1), 1).unwrap();
        ft.unpin(&mut m, D, Mfn(L4)).unwrap();
        assert_eq!(ft.unpin(&mut m, D, Mfn(L4)), Err(Errno::EINVAL));
        for mfn in [L4, L3, L2] {
            assert_eq!(info(&ft, mfn), FrameInfo { owner: Owner::Domain(D), ..FrameInfo::HYPERVISOR });
        }
        assert_eq!(info(&ft, L1).type_refs, 1);
        assert_eq!(info(&ft, 10).writable_count, 1);
        assert_eq!(ft.check_base(D, Mfn(L4)), Err(Errno::EINVAL));
        ft.unpin(&mut m, D, Mfn(L1)).unwrap();
        assert_eq!(info(&ft, 10).map_count, 0);
        // Everything is plain data again and can be released.
        for mfn in [L4, L3, L2, L1, 10] {
            ft.release(Mfn(mfn), D).unwrap();
        }
    }

    #[test]
    fn a_loaded_base_survives_unpin() {
        let (mut ft, mut m) = pinned_guest();
        assert_eq!(ft.get_base(D, Mfn(L3)), Err(Errno::EINVAL));
        assert_eq!(ft.put_base(&mut m, D, Mfn(L4)), Err(Errno::EINVAL));
        ft.get_base(D, Mfn(L4)).unwrap();
        ft.unpin(&mut m, D, Mfn(L4)).unwrap();
        assert_eq!(ft.frame_type(Mfn(L4)), Some(FrameType::PageTable(4)));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 11), pte(L4, P | RW)), Err(Errno::EACCES));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x10, false), Ok(10 * PAGE + 0x10));
        ft.put_base(&mut m, D, Mfn(L4)).unwrap();
        assert_eq!(ft.frame_type(Mfn(L4)), Some(FrameType::Writable));
        assert_eq!(info(&ft, 10).map_count, 0);
    }

    #[test]
    fn teardown_frees_every_frame_and_every_reference() {
        let (mut ft, mut m) = pinned_guest();
        ft.pin(&mut m, D, Mfn(L1), 1).unwrap();
        set(&mut m, 8, 0, pte(21, P | RW));
        ft.pin(&mut m, D, Mfn(8), 1).unwrap();
        ft.get_base(D, Mfn(L4)).unwrap();
        ft.get_base(D, Mfn(L4)).unwrap();
        ft.set_special(Mfn(39), true);
        let e_before: Vec<_> = (41..=50).map(|f| info(&ft, f)).collect();

        let mut freed = ft.teardown(&mut m, D);
        freed.sort();
        assert_eq!(freed, (1..=40).map(Mfn).collect::<Vec<_>>());
        assert_eq!(ft.frames_owned(D), 0);
        for f in 1..=40 {
            assert_eq!(info(&ft, f), FrameInfo { owner: Owner::Free, ..FrameInfo::HYPERVISOR }, "frame {f}");
        }
        assert_eq!((41..=50).map(|f| info(&ft, f)).collect::<Vec<_>>(), e_before);
        assert_eq!(ft.frames_owned(E), 10);
        assert_eq!(ft.teardown(&mut m, D), Vec::new());
        // The frames can be given to someone else.
        ft.assign(Mfn(L4), E).unwrap();
    }

    #[test]
    fn translate_refuses_hypervisor_slot_non_canonical_and_foreign_frames() {
        let (ft, mut m) = pinned_guest();
        let hv_va = shared_abi::HYPERVISOR_VA_START;
        assert_eq!(index(hv_va, 4), HV_L4_SLOT);
        assert_eq!(ft.translate(&m, D, Mfn(L4), hv_va, false), Err(Errno::EFAULT));
        assert_eq!(ft.translate(&m, D, Mfn(L4), u64::MAX, false), Err(Errno::EFAULT));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x0000_8000_0000_0000, false), Err(Errno::EFAULT));
        // Should a validated table ever point elsewhere (it cannot through
        // this module), translate still refuses it.
        set(&mut m, L1, 0, pte(41, P | RW));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x10, false), Err(Errno::EFAULT));
        set(&mut m, L1, 0, pte(HV_FRAME, P | RW));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x10, false), Err(Errno::EFAULT));
        set(&mut m, L2, 0, pte(HV_FRAME, P | RW));
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0x1010, false), Err(Errno::EFAULT));
    }

    #[test]
    fn copies_cross_page_boundaries() {
        let (ft, mut m) = pinned_guest();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8 ^ 0x5a).collect();
        ft.copy_to_guest(&mut m, D, Mfn(L4), 0x0ffc, &data).unwrap();
        let mut head = [0u8; 4];
        m.read_bytes(Mfn(10), 0xffc, &mut head);
        assert_eq!(head, data[..4]);
        let mut tail = [0u8; 4];
        m.read_bytes(Mfn(12), 0, &mut tail);
        assert_eq!(tail, data[4 + 4096..4 + 4100]);
        let mut back = vec![0u8; 5000];
        ft.copy_from_guest(&m, D, Mfn(L4), 0x0ffc, &mut back).unwrap();
        assert_eq!(back, data);
        // Crossing into the read-only page: readable, not writable, nothing written.
        let mut two = [0u8; 16];
        ft.copy_from_guest(&m, D, Mfn(L4), SELF_VA - 8, &mut two).unwrap();
        let before = m.frames.clone();
        assert_eq!(ft.copy_to_guest(&mut m, D, Mfn(L4), SELF_VA - 8, &[1; 16]), Err(Errno::EFAULT));
        assert_eq!(m.frames, before);
        // Into an unmapped page, wrapping, and the empty copy.
        assert_eq!(ft.copy_from_guest(&m, D, Mfn(L4), 0xaff8, &mut two), Err(Errno::EFAULT));
        assert_eq!(ft.copy_from_guest(&m, D, Mfn(L4), u64::MAX - 2, &mut two), Err(Errno::EFAULT));
        ft.copy_to_guest(&mut m, D, Mfn(L4), 0xfff_0000, &[]).unwrap();
    }

    const NX: u64 = PteFlags::NO_EXECUTE.bits();

    #[test]
    fn map_foreign_installs_and_unmap_foreign_removes() {
        let (mut ft, mut m) = pinned_guest();
        let p = ptr(L1, 11);
        ft.map_foreign(&mut m, D, p, E, Mfn(41), true).unwrap();
        assert_eq!(m.read_u64(Mfn(L1), 11), pte(41, P | RW | NX));
        assert_eq!((info(&ft, 41).map_count, info(&ft, 41).writable_count), (1, 1));
        assert_eq!(ft.foreign_mapping(p), Some(ForeignMapping { mapper: D, ptr: p, mfn: Mfn(41), writable: true }));
        assert_eq!(ft.foreign_mapping(ptr(L1, 0)), None);
        assert_eq!(ft.foreign_count(), 1);
        // While mapped, the granter can neither release it nor make it a table.
        assert_eq!(ft.release(Mfn(41), E), Err(Errno::EBUSY));
        assert_eq!(ft.pin(&mut m, E, Mfn(41), 1), Err(Errno::EBUSY));
        // A read-only foreign mapping, of a frame that is one of E's tables.
        ft.pin(&mut m, E, Mfn(45), 1).unwrap();
        assert_eq!(ft.map_foreign(&mut m, D, ptr(L1, 12), E, Mfn(45), true), Err(Errno::EACCES));
        ft.map_foreign(&mut m, D, ptr(L1, 12), E, Mfn(45), false).unwrap();
        assert_eq!(m.read_u64(Mfn(L1), 12), pte(45, P | NX));
        assert_eq!((info(&ft, 45).map_count, info(&ft, 45).writable_count), (1, 0));

        // Every refusal, and none of them changes anything.
        let before = (ft.clone(), m.frames.clone());
        let bad = [
            (D, p + 4, E, 42, false, Errno::EINVAL),         // unaligned
            (D, ptr(L2, 5), E, 42, false, Errno::EINVAL),    // an L2, not an L1
            (D, ptr(10, 5), E, 42, false, Errno::EINVAL),    // not a table
            (D, ptr(45, 5), E, 42, false, Errno::EPERM),     // E's table
            (D, ptr(HV_FRAME, 5), E, 42, false, Errno::EPERM),
            (D, u64::MAX - 7, E, 42, false, Errno::EPERM),
            (D, ptr(L1, 13), D, 20, false, Errno::EINVAL),   // own frame
            (D, ptr(L1, 13), E, NR, false, Errno::EINVAL),   // out of range
            (D, ptr(L1, 13), E, 20, false, Errno::EPERM),    // not the granter's
            (D, ptr(L1, 13), E, HV_FRAME, false, Errno::EPERM),
            (D, ptr(L1, 13), DomId(9), 42, false, Errno::EPERM),
            (D, ptr(L1, 0), E, 42, false, Errno::EBUSY),     // present entry
            (D, p, E, 42, false, Errno::EBUSY),              // already foreign
            (E, ptr(L1, 13), D, 42, false, Errno::EPERM),    // not E's table
        ];
        for (dom, at, granter, mfn, w, err) in bad {
            assert_eq!(ft.map_foreign(&mut m, dom, at, granter, Mfn(mfn), w), Err(err), "{at:#x} {mfn}");
            assert!(ft.unmap_foreign(&mut m, dom, at, Mfn(mfn)).is_err());
        }
        assert_eq!(ft.unmap_foreign(&mut m, D, p, Mfn(42)), Err(Errno::EINVAL)); // other frame
        assert_eq!(ft.unmap_foreign(&mut m, D, ptr(L1, 0), Mfn(10)), Err(Errno::EINVAL)); // own entry
        assert_eq!(ft.unmap_foreign(&mut m, D, p + 4, Mfn(41)), Err(Errno::EINVAL));
        assert_eq!(ft.unmap_foreign(&mut m, E, p, Mfn(41)), Err(Errno::EPERM));
        assert!((ft.clone(), m.frames.clone()) == before);

        ft.unmap_foreign(&mut m, D, p, Mfn(41)).unwrap();
        assert_eq!(m.read_u64(Mfn(L1), 11), 0);
        assert_eq!((info(&ft, 41).map_count, info(&ft, 41).writable_count), (0, 0));
        assert_eq!(ft.unmap_foreign(&mut m, D, p, Mfn(41)), Err(Errno::EINVAL));
        ft.unmap_foreign(&mut m, D, ptr(L1, 12), Mfn(45)).unwrap();
        assert_eq!(ft.foreign_count(), 0);
        assert_eq!(ft.take_dropped_foreign(), Vec::new()); // explicit unmaps are not reported
        ft.release(Mfn(41), E).unwrap();
        // The slot is an ordinary entry again.
        ft.mmu_update(&mut m, D, p, pte(20, P)).unwrap();
    }

    #[test]
    fn mmu_update_cannot_create_change_or_remove_foreign_entries() {
        let (mut ft, mut m) = pinned_guest();
        let p = ptr(L1, 11);
        ft.map_foreign(&mut m, D, p, E, Mfn(41), false).unwrap();
        let before = (ft.clone(), m.frames.clone());
        for val in [0, pte(20, P), pte(20, P | RW), pte(41, P), pte(41, P | NX), pte(41, P | RW | NX), !P] {
            assert_eq!(ft.mmu_update(&mut m, D, p, val), Err(Errno::EBUSY), "{val:#x}");
        }
        // Creating one directly, or using a foreign frame as a table, is refused.
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 12), pte(41, P)), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L2, 1), pte(41, P)), Err(Errno::EPERM));
        assert_eq!(ft.pin(&mut m, D, Mfn(41), 1), Err(Errno::EPERM));
        // Hypercall buffers never resolve to a foreign frame.
        assert_eq!(ft.translate(&m, D, Mfn(L4), 0xb000, false), Err(Errno::EFAULT));
        assert!((ft.clone(), m.frames.clone()) == before);
        // Neighbouring entries still work.
        ft.mmu_update(&mut m, D, ptr(L1, 12), pte(21, P | RW)).unwrap();
        assert_eq!(ft.foreign_mapping(p).map(|f| f.mfn), Some(Mfn(41)));
    }

    #[test]
    fn devalidating_an_l1_drops_and_reports_its_foreign_entries() {
        // Through unpin.
        let (mut ft, mut m) = pinned_guest();
        ft.map_foreign(&mut m, D, ptr(L1, 11), E, Mfn(41), true).unwrap();
        ft.map_foreign(&mut m, D, ptr(L1, 12), E, Mfn(42), false).unwrap();
        ft.unpin(&mut m, D, Mfn(L4)).unwrap();
        let mut dropped = ft.take_dropped_foreign();
        dropped.sort_by_key(|f| f.ptr);
        assert_eq!(
            dropped,
            vec![
                ForeignMapping { mapper: D, ptr: ptr(L1, 11), mfn: Mfn(41), writable: true },
                ForeignMapping { mapper: D, ptr: ptr(L1, 12), mfn: Mfn(42), writable: false },
            ]
        );
        assert_eq!(ft.take_dropped_foreign(), Vec::new());
        assert_eq!((m.read_u64(Mfn(L1), 11), m.read_u64(Mfn(L1), 12)), (0, 0));
        assert_eq!((info(&ft, 41).map_count, info(&ft, 41).writable_count, info(&ft, 42).map_count), (0, 0, 0));
        assert_eq!(ft.foreign_count(), 0);
        // The old L1 re-validates cleanly (nothing foreign was left in it).
        ft.pin(&mut m, D, Mfn(L4), 4).unwrap();

        // Through mmu_update unhooking the L1; a pinned L1 keeps them.
        ft.map_foreign(&mut m, D, ptr(L1, 11), E, Mfn(41), true).unwrap();
        ft.pin(&mut m, D, Mfn(L1), 1).unwrap();
        ft.mmu_update(&mut m, D, ptr(L2, 0), 0).unwrap();
        assert_eq!(ft.take_dropped_foreign(), Vec::new());
        assert_eq!(info(&ft, 41).map_count, 1);
        ft.unpin(&mut m, D, Mfn(L1)).unwrap();
        assert_eq!(ft.take_dropped_foreign().len(), 1);
        assert_eq!(info(&ft, 41).map_count, 0);
        assert_eq!(ft.unmap_foreign(&mut m, D, ptr(L1, 11), Mfn(41)), Err(Errno::EINVAL));
    }

    #[test]
    fn teardown_reports_foreign_entries_and_keeps_mapped_frames_as_orphans() {
        let (mut ft, mut m) = pinned_guest();
        // D maps E's 41 (RW) and 42 (RO); E maps D's 30 in its own L1 (45).
        ft.map_foreign(&mut m, D, ptr(L1, 11), E, Mfn(41), true).unwrap();
        ft.map_foreign(&mut m, D, ptr(L1, 12), E, Mfn(42), false).unwrap();
        ft.pin(&mut m, E, Mfn(45), 1).unwrap();
        ft.map_foreign(&mut m, E, ptr(45, 0), D, Mfn(30), false).unwrap();

        // E dies: its mapping of 30 is reported, 41 and 42 stay as orphans.
        let mut freed = ft.teardown(&mut m, E);
        freed.sort();
        assert_eq!(freed, [43, 44, 45, 46, 47, 48, 49, 50].map(Mfn).to_vec());
        assert_eq!(
            ft.take_dropped_foreign(),
            vec![ForeignMapping { mapper: E, ptr: ptr(45, 0), mfn: Mfn(30), writable: false }]
        );
        assert_eq!(info(&ft, 30).map_count, 0);
        assert_eq!(ft.orphan_count(), 2);
        assert_eq!(ft.frames_owned(E), 0);
        let o = info(&ft, 41);
        assert_eq!((o.owner, o.map_count, o.writable_count), (Owner::Hypervisor, 1, 1));
        assert_eq!(ft.take_freed_orphans(), Vec::new());
        // Nobody can take or map an orphan meanwhile.
        assert_eq!(ft.assign(Mfn(41), D), Err(Errno::EBUSY));
        assert_eq!(ft.release(Mfn(41), E), Err(Errno::EPERM));
        assert_eq!(ft.map_foreign(&mut m, D, ptr(L1, 13), E, Mfn(41), false), Err(Errno::EPERM));
        assert_eq!(ft.mmu_update(&mut m, D, ptr(L1, 13), pte(41, P)), Err(Errno::EPERM));
        // A frame E gave back is not E's any more either.
        assert_eq!(ft.map_foreign(&mut m, D, ptr(L1, 13), E, Mfn(43), false), Err(Errno::EPERM));

        // D unmaps 41: it is free now, reported once.
        ft.unmap_foreign(&mut m, D, ptr(L1, 11), Mfn(41)).unwrap();
        assert_eq!(ft.take_freed_orphans(), vec![Mfn(41)]);
        assert_eq!(ft.take_freed_orphans(), Vec::new());
        assert_eq!(info(&ft, 41), FrameInfo { owner: Owner::Free, ..FrameInfo::HYPERVISOR });
        assert_eq!(ft.orphan_count(), 1);

        // D dies: its mapping of 42 is reported and 42 is freed with it.
        let freed = ft.teardown(&mut m, D);
        assert_eq!(freed.len(), 40);
        assert_eq!(
            ft.take_dropped_foreign(),
            vec![ForeignMapping { mapper: D, ptr: ptr(L1, 12), mfn: Mfn(42), writable: false }]
        );
        assert_eq!(ft.take_freed_orphans(), vec![Mfn(42)]);
        assert_eq!(ft.orphan_count(), 0);
        assert_eq!(ft.foreign_count(), 0);
        for f in 0..NR {
            let i = info(&ft, f);
            assert_eq!((i.type_refs, i.map_count, i.writable_count), (0, 0, 0), "frame {f}");
        }
        ft.assign(Mfn(42), D).unwrap();
    }

    /// Recomputes every count from the tables in memory and compares.
    fn check_consistent(ft: &FrameTable, m: &FakeMachine) -> Result<(), TestCaseError> {
        let n = ft.nr_frames() as usize;
        let (mut refs, mut maps, mut writable) = (vec![0u32; n], vec![0u32; n], vec![0u32; n]);
        let mut foreign = 0;
        for f in 0..n {
            let i = info(ft, f as u64);
            refs[f] += u32::from(i.pinned);
            let FrameType::PageTable(level) = i.ty else {
                prop_assert!(i.type_refs == 0 && !i.pinned, "frame {} {:?}", f, i);
                continue;
            };
            prop_assert!(i.type_refs > 0);
            let mut bytes = [0u8; 4096];
            m.read_bytes(Mfn(f as u64), 0, &mut bytes);
            for (idx, e) in bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).enumerate() {
                let at = f as u64 * PAGE + idx as u64 * 8;
                if e & P == 0 || (level == 4 && idx == HV_L4_SLOT) {
                    prop_assert!(ft.foreign_mapping(at).is_none());
                    continue;
                }
                let t = ((e & ADDR_MASK) >> 12) as usize;
                prop_assert!(t < n);
                if let Some(fm) = ft.foreign_mapping(at) {
                    prop_assert_eq!(level, 1);
                    prop_assert_eq!(fm.mfn, Mfn(t as u64));
                    prop_assert_eq!(fm.writable, e & RW != 0);
                    prop_assert_eq!(Owner::Domain(fm.mapper), i.owner);
                    prop_assert!(ft.owner(fm.mfn) != i.owner);
                    foreign += 1;
                } else {
                    prop_assert_eq!(ft.owner(Mfn(t as u64)), i.owner);
                }
                if level == 1 {
                    maps[t] += 1;
                    writable[t] += u32::from(e & RW != 0);
                } else {
                    refs[t] += 1;
                    prop_assert_eq!(ft.frame_type(Mfn(t as u64)), Some(FrameType::PageTable(level - 1)));
                }
            }
        }
        for f in 0..n {
            let i = info(ft, f as u64);
            prop_assert!(!(matches!(i.ty, FrameType::PageTable(_)) && i.writable_count > 0), "frame {} {:?}", f, i);
            prop_assert_eq!((i.type_refs, i.map_count, i.writable_count), (refs[f], maps[f], writable[f]), "frame {}", f);
        }
        prop_assert_eq!(foreign, ft.foreign_count());
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Update { table: u64, idx: usize, target: u64, flags: u64 },
        Pin { mfn: u64, level: u8 },
        Unpin { mfn: u64 },
        Release { mfn: u64 },
        MapForeign { table: u64, idx: usize, writable: bool },
        UnmapForeign { table: u64, idx: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Frames 1..=10 are the domain's, 11 is E's, 12 the hypervisor's, 13 out of range.
        let flags = prop::sample::select(vec![0, P, P, P | RW, P | RW, P | RW, P | RW | US, P | PS, P | G, P | 1 << 52, RW]);
        prop_oneof![
            6 => (1..=10u64, prop::sample::select(vec![0usize, 1, 2, 511]), 1..=13u64, flags)
                .prop_map(|(table, idx, target, flags)| Op::Update { table, idx, target, flags }),
            2 => (1..=10u64, 1..=4u8).prop_map(|(mfn, level)| Op::Pin { mfn, level }),
            1 => (1..=10u64).prop_map(|mfn| Op::Unpin { mfn }),
            1 => (1..=10u64).prop_map(|mfn| Op::Release { mfn }),
            2 => (1..=10u64, prop::sample::select(vec![0usize, 1, 2, 511]), any::<bool>())
                .prop_map(|(table, idx, writable)| Op::MapForeign { table, idx, writable }),
            1 => (1..=10u64, prop::sample::select(vec![0usize, 1, 2, 511]))
                .prop_map(|(table, idx)| Op::UnmapForeign { table, idx }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever a guest asks for: counts always match the tables, no
        /// frame is both a page table and writable-mapped, and a refused
        /// request changes nothing.
        #[test]
        fn random_updates_keep_the_invariants(ops in prop::collection::vec(op(), 1..80), e_dies_first in any::<bool>()) {
            let mut ft = FrameTable::new(13, HV_ENTRY);
            for f in 1..=10 {
                ft.assign(Mfn(f), D).unwrap();
            }
            ft.assign(Mfn(11), E).unwrap();
            let mut m = FakeMachine::default();
            ft.pin(&mut m, D, Mfn(1), 4).unwrap();
            for op in ops {
                let (ft_before, mem_before) = (ft.clone(), m.frames.clone());
                let r = match op {
                    Op::Update { table, idx, target, flags } => {
                        ft.mmu_update(&mut m, D, ptr(table, idx as u64), pte(target, flags))
                    }
                    Op::Pin { mfn, level } => ft.pin(&mut m, D, Mfn(mfn), level),
                    Op::Unpin { mfn } => ft.unpin(&mut m, D, Mfn(mfn)),
                    Op::Release { mfn } => ft.release(Mfn(mfn), D),
                    // Frame 11 is E's, granted to D.
                    Op::MapForeign { table, idx, writable } => {
                        ft.map_foreign(&mut m, D, ptr(table, idx as u64), E, Mfn(11), writable)
                    }
                    Op::UnmapForeign { table, idx } => ft.unmap_foreign(&mut m, D, ptr(table, idx as u64), Mfn(11)),
                };
                if r.is_err() {
                    prop_assert_eq!(&ft, &ft_before);
                    prop_assert!(m.frames == mem_before);
                }
                check_consistent(&ft, &m)?;
            }
            // Every foreign entry is either still installed or was reported.
            let dropped = ft.take_dropped_foreign();
            prop_assert!(dropped.iter().all(|d| d.mapper == D && d.mfn == Mfn(11)));
            let mapped = info(&ft, 11).map_count;
            prop_assert_eq!(mapped as usize, ft.foreign_count());
            if e_dies_first {
                prop_assert_eq!(ft.teardown(&mut m, E).len(), usize::from(mapped == 0));
                prop_assert_eq!(ft.orphan_count(), usize::from(mapped > 0));
            }
            let owned = ft.frames_owned(D);
            let freed = ft.teardown(&mut m, D);
            prop_assert_eq!(freed.len() as u64, owned);
            prop_assert_eq!(ft.take_dropped_foreign().len(), mapped as usize);
            prop_assert_eq!(ft.foreign_count(), 0);
            prop_assert_eq!(ft.orphan_count(), 0);
            let orphans_freed = ft.take_freed_orphans();
            prop_assert_eq!(orphans_freed.len(), usize::from(e_dies_first && mapped > 0));
            prop_assert_eq!(ft.frames_owned(D), 0);
            prop_assert!(freed.iter().all(|f| (1..=10).contains(&f.0)));
            for f in 0..13 {
                let i = info(&ft, f);
                prop_assert_eq!((i.type_refs, i.map_count, i.writable_count, i.pinned), (0, 0, 0, false));
            }
        }
    }
}
