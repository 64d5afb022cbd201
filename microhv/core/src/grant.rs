//! Grant tables: how one domain lets another map one of its frames.
//!
//! A domain (the *granter*) grants one of its own frames to a named domain
//! (the *grantee*), read-only or writable, and gets back a [`GrantRef`]; it
//! passes that number to the grantee (e.g. over an event channel and a
//! shared ring), and the grantee asks microhv to map the frame. The
//! hypervisor checks the use against the grant ([`GrantTables::check`],
//! [`GrantTables::acquire_map`]) and installs the mapping with
//! `FrameTable::map_foreign` (`crate::pvmm`).
//!
//! # Kept by the hypervisor, not shared with the guest
//!
//! Xen's v1 grant table is an array of entries in guest memory that the
//! granter writes directly and Xen reads (and updates with flags such as
//! "in use") under a careful protocol of atomic reads and compare-exchange,
//! because the granter may change an entry at any moment. Here the table
//! lives in hypervisor memory and changes only through hypercalls
//! ([`GrantTables::grant`], [`GrantTables::end`]). That costs a hypercall
//! per grant, but there is no shared state to race on, every entry is
//! always well-formed, and revoking a mapped grant is simply refused
//! (-EBUSY) rather than left to the guest to get right.
//!
//! # Lifetimes
//!
//! * Refs start at 1; 0 is never valid. A ref is reused after
//!   [`GrantTables::end`], so a stale ref either fails (-EINVAL) or names the
//!   granter's newer grant, which is checked on its own terms.
//! * When the granter dies ([`GrantTables::remove_domain`]) its unmapped
//!   grants vanish and its mapped ones are kept, *dead*: every later check
//!   fails with -ESRCH, but [`GrantTables::release_map`] still works so that
//!   the grantees' mappings can drain. The last release removes the entry,
//!   and the last entry removes the dead table.
//! * Who frees the frames of a dead granter: the frame table, not this
//!   module. `FrameTable::teardown` keeps frames that are still mapped by
//!   other domains as orphans and reports them through
//!   `FrameTable::take_freed_orphans` once their last mapping is gone. The
//!   list [`GrantTables::remove_domain`] returns is informational (which
//!   frames are still held by grantees); the caller must not free them
//!   itself. So `release_map` returns `Ok(())`, never a frame to free: one
//!   authority, counting the mappings actually present in page tables.
//! * When the grantee dies, grants naming it are marked so that no later
//!   domain reusing its id can use them (-EPERM); their granters still end
//!   them as usual.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use shared_abi::{DomId, Errno, Mfn};

/// A grant reference: the granter's number for one grant. 0 is invalid.
pub type GrantRef = u32;

/// Default per-domain number of grants (refs `1..=256`).
pub const DEFAULT_MAX_GRANTS: u32 = 256;

/// One grant, as the hypervisor keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantEntry {
    /// The only domain that may use the grant.
    pub grantee: DomId,
    /// The granter's frame.
    pub mfn: Mfn,
    /// The grantee may only map it read-only.
    pub readonly: bool,
    /// Active mappings by the grantee.
    pub maps: u32,
    /// Those of `maps` that are writable.
    pub maps_writable: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    entry: GrantEntry,
    /// The grantee was removed: nobody may use the grant any more.
    grantee_gone: bool,
}

/// One granter's table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Table {
    /// `slots[r - 1]` is grant ref `r`; grown on demand up to `max`.
    slots: Vec<Option<Slot>>,
    max: u32,
    /// The granter is gone; only mapped entries are left, draining.
    dead: bool,
    in_use: u32,
}

impl Table {
    fn get(&self, gref: GrantRef) -> Option<&Slot> {
        let i = usize::try_from(gref).ok()?.checked_sub(1)?;
        self.slots.get(i)?.as_ref()
    }

    fn get_mut(&mut self, gref: GrantRef) -> Option<&mut Slot> {
        let i = usize::try_from(gref).ok()?.checked_sub(1)?;
        self.slots.get_mut(i)?.as_mut()
    }

    fn free(&mut self, gref: GrantRef) {
        if let Some(s) = usize::try_from(gref).ok().and_then(|r| r.checked_sub(1)).and_then(|i| self.slots.get_mut(i)) {
            if s.take().is_some() {
                self.in_use -= 1;
            }
        }
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
    }
}

/// The grant tables of all domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantTables {
    tables: BTreeMap<DomId, Table>,
}

impl GrantTables {
    /// No domains yet.
    pub fn new() -> Self {
        GrantTables { tables: BTreeMap::new() }
    }

    /// Gives `d` an empty table of at most `max` grants (refs `1..=max`).
    /// -EEXIST when `d` still has a table: alive, or dead with grants still
    /// mapped (see [`has_table`](Self::has_table)); its id cannot be reused
    /// until they drain.
    pub fn add_domain(&mut self, d: DomId, max: u32) -> Result<(), Errno> {
        if self.tables.contains_key(&d) {
            return Err(Errno::EEXIST);
        }
        self.tables.insert(d, Table { slots: Vec::new(), max, dead: false, in_use: 0 });
        Ok(())
    }

    /// True while `d` has a table: from [`add_domain`](Self::add_domain)
    /// until it is removed and the last mapping of its grants is released.
    pub fn has_table(&self, d: DomId) -> bool {
        self.tables.contains_key(&d)
    }

    fn live(&self, d: DomId) -> Result<&Table, Errno> {
        self.tables.get(&d).filter(|t| !t.dead).ok_or(Errno::ESRCH)
    }

    /// `granter` grants its frame `mfn` to `grantee`. The caller has checked
    /// that `granter` owns `mfn` (through the frame table).
    ///
    /// Errors: -ESRCH `granter` or `grantee` has no live table; -EINVAL
    /// `grantee == granter`; -ENOSPC all refs in use.
    pub fn grant(&mut self, granter: DomId, grantee: DomId, mfn: Mfn, readonly: bool) -> Result<GrantRef, Errno> {
        self.live(granter)?;
        if grantee == granter {
            return Err(Errno::EINVAL);
        }
        self.live(grantee)?;
        let t = self.tables.get_mut(&granter).ok_or(Errno::ESRCH)?;
        let i = match t.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None if (t.slots.len() as u64) < u64::from(t.max) => {
                t.slots.push(None);
                t.slots.len() - 1
            }
            None => return Err(Errno::ENOSPC),
        };
        let gref = GrantRef::try_from(i + 1).map_err(|_| Errno::ENOSPC)?;
        let entry = GrantEntry { grantee, mfn, readonly, maps: 0, maps_writable: 0 };
        t.slots[i] = Some(Slot { entry, grantee_gone: false });
        t.in_use += 1;
        Ok(gref)
    }

    /// Revokes grant `gref` of `granter`; the ref becomes free.
    ///
    /// Errors: -ESRCH `granter` has no live table; -EINVAL `gref` is 0, out
    /// of range or not in use; -EBUSY the grantee still maps it.
    pub fn end(&mut self, granter: DomId, gref: GrantRef) -> Result<(), Errno> {
        self.live(granter)?;
        let t = self.tables.get_mut(&granter).ok_or(Errno::ESRCH)?;
        let s = t.get(gref).ok_or(Errno::EINVAL)?;
        if s.entry.maps > 0 {
            return Err(Errno::EBUSY);
        }
        t.free(gref);
        Ok(())
    }

    /// Checks that `grantee` may use grant `gref` of `granter`, for writing
    /// if `write`, and returns the granted frame.
    ///
    /// Errors, in this order: -ESRCH the granter is gone (dead, or no
    /// table); -EINVAL no such grant (0, out of range, never made, ended:
    /// forged or stale refs); -EPERM granted to someone else, or its grantee
    /// was removed; -EACCES `write` on a read-only grant.
    pub fn check(&self, granter: DomId, gref: GrantRef, grantee: DomId, write: bool) -> Result<Mfn, Errno> {
        let s = self.live(granter)?.get(gref).ok_or(Errno::EINVAL)?;
        if s.entry.grantee != grantee || s.grantee_gone {
            return Err(Errno::EPERM);
        }
        if write && s.entry.readonly {
            return Err(Errno::EACCES);
        }
        Ok(s.entry.mfn)
    }

    /// [`check`](Self::check), then counts one more active mapping (a
    /// writable one if `write`). The caller then installs it with
    /// `FrameTable::map_foreign`, and calls [`release_map`](Self::release_map)
    /// if that fails. -ERANGE if a count would overflow.
    pub fn acquire_map(&mut self, granter: DomId, gref: GrantRef, grantee: DomId, write: bool) -> Result<Mfn, Errno> {
        let mfn = self.check(granter, gref, grantee, write)?;
        let s = self.tables.get_mut(&granter).and_then(|t| t.get_mut(gref)).ok_or(Errno::EINVAL)?;
        let maps = s.entry.maps.checked_add(1).ok_or(Errno::ERANGE)?;
        let maps_writable = s.entry.maps_writable.checked_add(u32::from(write)).ok_or(Errno::ERANGE)?;
        s.entry.maps = maps;
        s.entry.maps_writable = maps_writable;
        Ok(mfn)
    }

    /// Undoes one [`acquire_map`](Self::acquire_map) of the same kind
    /// (`write`). Works on dead granters' grants too; the last release of a
    /// dead grant removes it. Never returns a frame to free: see the module
    /// doc (the frame table reports freed orphans).
    ///
    /// Errors: -ESRCH `granter` has no table at all; -EINVAL no such grant,
    /// or no active mapping of that kind; -EPERM granted to someone else.
    pub fn release_map(&mut self, granter: DomId, gref: GrantRef, grantee: DomId, write: bool) -> Result<(), Errno> {
        let t = self.tables.get_mut(&granter).ok_or(Errno::ESRCH)?;
        let s = t.get_mut(gref).ok_or(Errno::EINVAL)?;
        if s.entry.grantee != grantee {
            return Err(Errno::EPERM);
        }
        let e = &mut s.entry;
        let of_kind = if write { e.maps_writable } else { e.maps - e.maps_writable };
        if of_kind == 0 {
            return Err(Errno::EINVAL);
        }
        e.maps -= 1;
        if write {
            e.maps_writable -= 1;
        }
        let unmapped = e.maps == 0;
        if t.dead && unmapped {
            t.free(gref);
            if t.in_use == 0 {
                self.tables.remove(&granter);
            }
        }
        Ok(())
    }

    /// Domain death. `d`'s unmapped grants vanish; its mapped grants stay,
    /// dead (every check -> -ESRCH), until their last
    /// [`release_map`](Self::release_map). Returns the frames of those
    /// grants (sorted, without repeats): frames other domains still map. The
    /// frame table keeps them (as orphans) and reports when they are free;
    /// the caller must not free them itself. Grants of other domains naming
    /// `d` as grantee become unusable (-EPERM) but can still be ended.
    pub fn remove_domain(&mut self, d: DomId) -> Vec<Mfn> {
        for (_, t) in self.tables.iter_mut().filter(|(&g, _)| g != d) {
            for s in t.slots.iter_mut().flatten() {
                if s.entry.grantee == d {
                    s.grantee_gone = true;
                }
            }
        }
        let Some(t) = self.tables.get_mut(&d) else {
            return Vec::new();
        };
        t.dead = true;
        let unmapped: Vec<GrantRef> = (1..=t.slots.len())
            .filter(|&r| t.slots[r - 1].is_some_and(|s| s.entry.maps == 0))
            .filter_map(|r| GrantRef::try_from(r).ok())
            .collect();
        for r in unmapped {
            t.free(r);
        }
        let mut held: Vec<Mfn> = t.slots.iter().flatten().map(|s| s.entry.mfn).collect();
        if t.in_use == 0 {
            self.tables.remove(&d);
        }
        held.sort();
        held.dedup();
        held
    }

    /// Grants of `d` in use (for a dead granter: those still mapped).
    pub fn grants_in_use(&self, d: DomId) -> u32 {
        self.tables.get(&d).map_or(0, |t| t.in_use)
    }

    /// A copy of grant `gref` of `granter` (alive or dead), if it exists.
    pub fn entry(&self, granter: DomId, gref: GrantRef) -> Option<GrantEntry> {
        self.tables.get(&granter)?.get(gref).map(|s| s.entry)
    }

    /// Some grant to `grantee` of frame `mfn` with an active mapping of the
    /// given kind, as (granter, ref). For the caller that learns of dropped
    /// foreign mappings (`FrameTable::take_dropped_foreign`, which reports
    /// frames, not refs) and must release their map counts.
    pub fn find_mapping(&self, grantee: DomId, mfn: Mfn, write: bool) -> Option<(DomId, GrantRef)> {
        self.tables.iter().find_map(|(&granter, t)| {
            t.slots.iter().enumerate().find_map(|(i, s)| {
                let e = s.as_ref()?.entry;
                let of_kind = if write { e.maps_writable } else { e.maps - e.maps_writable };
                let hit = e.grantee == grantee && e.mfn == mfn && of_kind > 0;
                hit.then(|| GrantRef::try_from(i + 1).ok().map(|r| (granter, r))).flatten()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: DomId = DomId(1);
    const B: DomId = DomId(2);
    const C: DomId = DomId(3);

    fn tables() -> GrantTables {
        let mut g = GrantTables::new();
        for d in [A, B, C] {
            g.add_domain(d, 4).unwrap();
        }
        g
    }

    #[test]
    fn grant_use_and_end() {
        let mut g = tables();
        let r = g.grant(A, B, Mfn(100), false).unwrap();
        assert_eq!(r, 1);
        assert_eq!(g.grants_in_use(A), 1);
        assert_eq!(g.check(A, r, B, true), Ok(Mfn(100)));
        assert_eq!(g.acquire_map(A, r, B, true), Ok(Mfn(100)));
        assert_eq!(g.acquire_map(A, r, B, false), Ok(Mfn(100)));
        assert_eq!(g.entry(A, r), Some(GrantEntry { grantee: B, mfn: Mfn(100), readonly: false, maps: 2, maps_writable: 1 }));
        assert_eq!(g.find_mapping(B, Mfn(100), true), Some((A, r)));
        assert_eq!(g.find_mapping(B, Mfn(101), true), None);
        g.release_map(A, r, B, true).unwrap();
        assert_eq!(g.find_mapping(B, Mfn(100), true), None);
        assert_eq!(g.find_mapping(B, Mfn(100), false), Some((A, r)));
        g.release_map(A, r, B, false).unwrap();
        assert_eq!(g.entry(A, r).map(|e| (e.maps, e.maps_writable)), Some((0, 0)));
        g.end(A, r).unwrap();
        assert_eq!(g.grants_in_use(A), 0);
        assert_eq!(g.entry(A, r), None);
        // The ref is reused.
        assert_eq!(g.grant(A, C, Mfn(7), true), Ok(1));
    }

    #[test]
    fn grant_errors() {
        let mut g = tables();
        assert_eq!(g.grant(A, A, Mfn(1), false), Err(Errno::EINVAL));
        assert_eq!(g.grant(A, DomId(9), Mfn(1), false), Err(Errno::ESRCH));
        assert_eq!(g.grant(DomId(9), A, Mfn(1), false), Err(Errno::ESRCH));
        assert_eq!(g.grant(A, DomId::INVALID, Mfn(1), false), Err(Errno::ESRCH));
        for k in 1..=4 {
            assert_eq!(g.grant(A, B, Mfn(k), false), Ok(k as u32));
        }
        assert_eq!(g.grant(A, B, Mfn(5), false), Err(Errno::ENOSPC));
        assert_eq!(g.grants_in_use(A), 4);
        g.end(A, 2).unwrap();
        assert_eq!(g.grant(A, C, Mfn(5), false), Ok(2));
        assert_eq!(g.add_domain(A, 4), Err(Errno::EEXIST));
        // A table of size 0 grants nothing.
        g.add_domain(DomId(4), 0).unwrap();
        assert_eq!(g.grant(DomId(4), A, Mfn(1), false), Err(Errno::ENOSPC));
    }

    #[test]
    fn forged_stale_and_misused_refs() {
        let mut g = tables();
        let r = g.grant(A, B, Mfn(100), true).unwrap();
        let before = g.clone();
        for forged in [0, 2, 4, 5, 1000, u32::MAX] {
            assert_eq!(g.check(A, forged, B, false), Err(Errno::EINVAL), "ref {forged}");
            assert_eq!(g.acquire_map(A, forged, B, false), Err(Errno::EINVAL));
            assert_eq!(g.release_map(A, forged, B, false), Err(Errno::EINVAL));
            assert_eq!(g.end(A, forged), Err(Errno::EINVAL));
        }
        // Wrong grantee, including the granter itself, and the wrong granter.
        assert_eq!(g.check(A, r, C, false), Err(Errno::EPERM));
        assert_eq!(g.check(A, r, A, false), Err(Errno::EPERM));
        assert_eq!(g.acquire_map(A, r, C, false), Err(Errno::EPERM));
        assert_eq!(g.check(B, r, B, false), Err(Errno::EINVAL));
        assert_eq!(g.check(DomId(9), r, B, false), Err(Errno::ESRCH));
        // Write through a read-only grant.
        assert_eq!(g.check(A, r, B, true), Err(Errno::EACCES));
        assert_eq!(g.acquire_map(A, r, B, true), Err(Errno::EACCES));
        // Releasing what was never acquired.
        assert_eq!(g.release_map(A, r, B, false), Err(Errno::EINVAL));
        assert_eq!(g.release_map(A, r, B, true), Err(Errno::EINVAL));
        assert_eq!(g.release_map(A, r, C, false), Err(Errno::EPERM));
        assert_eq!(g.release_map(DomId(9), r, B, false), Err(Errno::ESRCH));
        assert_eq!(g, before);
        // Stale after end.
        g.end(A, r).unwrap();
        assert_eq!(g.check(A, r, B, false), Err(Errno::EINVAL));
        assert_eq!(g.acquire_map(A, r, B, false), Err(Errno::EINVAL));
        assert_eq!(g.end(A, r), Err(Errno::EINVAL));
    }

    #[test]
    fn revoke_while_mapped_is_refused_until_unmapped() {
        let mut g = tables();
        let r = g.grant(A, B, Mfn(100), false).unwrap();
        g.acquire_map(A, r, B, true).unwrap();
        g.acquire_map(A, r, B, true).unwrap();
        assert_eq!(g.end(A, r), Err(Errno::EBUSY));
        // A read release cannot drop a writable mapping.
        assert_eq!(g.release_map(A, r, B, false), Err(Errno::EINVAL));
        g.release_map(A, r, B, true).unwrap();
        assert_eq!(g.end(A, r), Err(Errno::EBUSY));
        g.release_map(A, r, B, true).unwrap();
        assert_eq!(g.release_map(A, r, B, true), Err(Errno::EINVAL));
        g.end(A, r).unwrap();
        assert_eq!(g.grants_in_use(A), 0);
    }

    #[test]
    fn a_dead_granter_drains() {
        let mut g = tables();
        let mapped = g.grant(A, B, Mfn(100), false).unwrap();
        let mapped2 = g.grant(A, C, Mfn(100), true).unwrap();
        let idle = g.grant(A, B, Mfn(101), false).unwrap();
        let other = g.grant(A, C, Mfn(102), false).unwrap();
        g.acquire_map(A, mapped, B, true).unwrap();
        g.acquire_map(A, mapped2, C, false).unwrap();
        g.acquire_map(A, other, C, false).unwrap();

        let mut held = g.remove_domain(A);
        held.sort();
        assert_eq!(held, vec![Mfn(100), Mfn(102)]);
        assert_eq!(g.grants_in_use(A), 3);
        assert!(g.has_table(A));
        for r in [mapped, mapped2, idle, other, 0] {
            assert_eq!(g.check(A, r, B, false), Err(Errno::ESRCH));
            assert_eq!(g.acquire_map(A, r, C, false), Err(Errno::ESRCH));
            assert_eq!(g.end(A, r), Err(Errno::ESRCH));
        }
        assert_eq!(g.grant(A, B, Mfn(1), false), Err(Errno::ESRCH));
        assert_eq!(g.grant(B, A, Mfn(1), false), Err(Errno::ESRCH));
        // Its id cannot be reused while grants still drain.
        assert_eq!(g.add_domain(A, 4), Err(Errno::EEXIST));
        // The unmapped grant is gone.
        assert_eq!(g.release_map(A, idle, B, false), Err(Errno::EINVAL));
        // Releases still work and remove the entries.
        g.release_map(A, mapped, B, true).unwrap();
        assert_eq!(g.entry(A, mapped), None);
        assert_eq!(g.release_map(A, mapped, B, true), Err(Errno::EINVAL));
        g.release_map(A, mapped2, C, false).unwrap();
        assert_eq!(g.grants_in_use(A), 1);
        g.release_map(A, other, C, false).unwrap();
        assert_eq!(g.grants_in_use(A), 0);
        assert!(!g.has_table(A));
        assert_eq!(g.release_map(A, other, C, false), Err(Errno::ESRCH));
        g.add_domain(A, 4).unwrap();
        assert_eq!(g.grant(A, B, Mfn(1), false), Ok(1));
    }

    #[test]
    fn removing_an_unmapped_granter_leaves_nothing() {
        let mut g = tables();
        g.grant(A, B, Mfn(1), false).unwrap();
        assert_eq!(g.remove_domain(A), Vec::new());
        assert!(!g.has_table(A));
        assert_eq!(g.grants_in_use(A), 0);
        assert_eq!(g.remove_domain(A), Vec::new());
        assert_eq!(g.remove_domain(DomId(9)), Vec::new());
    }

    #[test]
    fn a_removed_grantees_grants_are_unusable_but_can_be_ended() {
        let mut g = tables();
        let r = g.grant(A, B, Mfn(100), false).unwrap();
        let r2 = g.grant(A, B, Mfn(101), false).unwrap();
        g.acquire_map(A, r2, B, true).unwrap();
        g.remove_domain(B);
        // A new domain that gets B's id inherits nothing.
        g.add_domain(B, 4).unwrap();
        assert_eq!(g.check(A, r, B, false), Err(Errno::EPERM));
        assert_eq!(g.acquire_map(A, r, B, false), Err(Errno::EPERM));
        g.end(A, r).unwrap();
        // The dead grantee's mapping is released (after its page tables
        // were torn down), then the grant can be ended.
        assert_eq!(g.end(A, r2), Err(Errno::EBUSY));
        g.release_map(A, r2, B, true).unwrap();
        g.end(A, r2).unwrap();
        assert_eq!(g.grants_in_use(A), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grant { granter: u16, grantee: u16, mfn: u64, readonly: bool },
        End { granter: u16, gref: u32 },
        Acquire { granter: u16, gref: u32, grantee: u16, write: bool },
        Release { granter: u16, gref: u32, grantee: u16, write: bool },
        Remove { d: u16 },
        Add { d: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let d = || 1..=4u16;
        let r = || 0..=4u32;
        prop_oneof![
            3 => (d(), d(), 1..=3u64, any::<bool>()).prop_map(|(granter, grantee, mfn, readonly)| Op::Grant { granter, grantee, mfn, readonly }),
            2 => (d(), r()).prop_map(|(granter, gref)| Op::End { granter, gref }),
            4 => (d(), r(), d(), any::<bool>()).prop_map(|(granter, gref, grantee, write)| Op::Acquire { granter, gref, grantee, write }),
            3 => (d(), r(), d(), any::<bool>()).prop_map(|(granter, gref, grantee, write)| Op::Release { granter, gref, grantee, write }),
            1 => d().prop_map(|d| Op::Remove { d }),
            1 => d().prop_map(|d| Op::Add { d }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Map counts always equal the mappings acquired and not released;
        /// refused operations change nothing; every mapping can be released
        /// and then everything drains.
        #[test]
        fn counts_follow_the_mappings(ops in prop::collection::vec(op(), 1..60)) {
            let mut g = GrantTables::new();
            for d in 1..=3 {
                g.add_domain(DomId(d), 3).unwrap();
            }
            // Outstanding mappings: (granter, ref, grantee, write).
            let mut maps: Vec<(DomId, GrantRef, DomId, bool)> = Vec::new();
            for op in ops {
                let before = g.clone();
                let r = match op {
                    Op::Grant { granter, grantee, mfn, readonly } => g.grant(DomId(granter), DomId(grantee), Mfn(mfn), readonly).map(|_| ()),
                    Op::End { granter, gref } => g.end(DomId(granter), gref),
                    Op::Acquire { granter, gref, grantee, write } => g.acquire_map(DomId(granter), gref, DomId(grantee), write).map(|mfn| {
                        assert_eq!(g.entry(DomId(granter), gref).map(|e| e.mfn), Some(mfn));
                        maps.push((DomId(granter), gref, DomId(grantee), write));
                    }),
                    Op::Release { granter, gref, grantee, write } => g.release_map(DomId(granter), gref, DomId(grantee), write).map(|()| {
                        let k = (DomId(granter), gref, DomId(grantee), write);
                        let i = maps.iter().position(|m| *m == k).expect("released a mapping never acquired");
                        maps.swap_remove(i);
                    }),
                    Op::Remove { d } => { g.remove_domain(DomId(d)); Ok(()) }
                    Op::Add { d } => g.add_domain(DomId(d), 3),
                };
                if r.is_err() {
                    prop_assert_eq!(&g, &before);
                }
                for d in 1..=4u16 {
                    let d = DomId(d);
                    let mut n = 0;
                    for gref in 1..=3 {
                        let Some(e) = g.entry(d, gref) else { continue };
                        n += 1;
                        let w = maps.iter().filter(|m| m.0 == d && m.1 == gref && m.3).count() as u32;
                        let all = maps.iter().filter(|m| m.0 == d && m.1 == gref).count() as u32;
                        prop_assert_eq!((e.maps, e.maps_writable), (all, w));
                        prop_assert!(!(e.readonly && w > 0));
                        prop_assert!(maps.iter().filter(|m| m.0 == d && m.1 == gref).all(|m| m.2 == e.grantee));
                    }
                    prop_assert_eq!(g.grants_in_use(d), n);
                }
            }
            for (granter, gref, grantee, write) in maps.drain(..) {
                prop_assert_eq!(g.release_map(granter, gref, grantee, write), Ok(()));
            }
            for d in 1..=4u16 {
                g.remove_domain(DomId(d));
                prop_assert!(!g.has_table(DomId(d)));
            }
        }
    }
}
