//! Memory helpers for PV guests: the frame list (p2m), walking our own
//! (read-only) page tables, and changing mappings through `mmu_update`.

use shared_abi::hypercall::MmuUpdate;
use shared_abi::{Errno, GuestVa};

pub const PAGE: u64 = 4096;
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_USER: u64 = 1 << 2;
pub const PTE_NX: u64 = 1 << 63;
pub const PTE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

/// The pfn -> mfn list of the initial memory.
pub fn p2m() -> &'static [u64] {
    let si = crate::start_info();
    // SAFETY: microhv maps the p2m list (nr_pages u64s) read-write for us at p2m_va.
    unsafe { core::slice::from_raw_parts(si.p2m_va as *const u64, si.nr_pages as usize) }
}

/// Virtual address at which the initial mapping shows machine frame `mfn`.
pub fn mfn_to_va(mfn: u64) -> Option<u64> {
    let si = crate::start_info();
    p2m().iter().position(|&m| m == mfn).map(|pfn| si.virt_base + pfn as u64 * PAGE)
}

fn read_entry(table_mfn: u64, index: u64) -> Option<u64> {
    let va = mfn_to_va(table_mfn)?;
    // SAFETY: page tables are mapped read-only in the initial mapping; reading is allowed.
    Some(unsafe { core::ptr::read_volatile((va + index * 8) as *const u64) })
}

/// Machine addresses of the entries that map `va` at each level: L4, L3,
/// L2, L1 (for `mmu_update`). None if a table on the way is missing.
pub fn entry_maddrs(va: u64) -> Option<[u64; 4]> {
    let mut table = crate::start_info().pt_base_mfn;
    let mut out = [0u64; 4];
    for (i, level) in (1..=4u64).rev().enumerate() {
        let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        out[i] = (table << 12) + idx * 8;
        if level > 1 {
            let e = read_entry(table, idx)?;
            if e & PTE_PRESENT == 0 {
                return None;
            }
            table = (e & PTE_ADDR) >> 12;
        }
    }
    Some(out)
}

/// Machine address of the L1 entry that maps `va` (for `mmu_update`).
pub fn l1_entry_maddr(va: u64) -> Option<u64> {
    entry_maddrs(va).map(|e| e[3])
}

/// Reads the page-table entry at machine address `maddr` (through the
/// read-only mapping of our tables).
pub fn read_maddr(maddr: u64) -> Option<u64> {
    read_entry(maddr >> 12, (maddr & 0xfff) / 8)
}

/// Applies page-table updates; returns how many were applied before an error.
pub fn mmu_update(reqs: &[MmuUpdate]) -> Result<(), (usize, Errno)> {
    let mut done: u64 = 0;
    // SAFETY: `reqs` is valid for reading, `done` for writing.
    let r = unsafe {
        crate::hypercall::mmu_update(
            GuestVa(reqs.as_ptr() as u64),
            reqs.len() as u64,
            GuestVa(&mut done as *mut u64 as u64),
        )
    };
    r.map(|_| ()).map_err(|e| (done as usize, e))
}

/// Maps machine frame `mfn` at `va` (whose L1 table must exist).
pub fn map(va: u64, mfn: u64, writable: bool) -> Result<(), Errno> {
    let ptr = l1_entry_maddr(va).ok_or(Errno::ENOENT)?;
    let val = (mfn << 12) | PTE_PRESENT | PTE_NX | if writable { PTE_RW } else { 0 };
    mmu_update(&[MmuUpdate { ptr, val }]).map_err(|(_, e)| e)?;
    invlpg(va);
    Ok(())
}

/// Removes the mapping at `va`.
pub fn unmap(va: u64) -> Result<(), Errno> {
    let ptr = l1_entry_maddr(va).ok_or(Errno::ENOENT)?;
    mmu_update(&[MmuUpdate { ptr, val: 0 }]).map_err(|(_, e)| e)?;
    invlpg(va);
    Ok(())
}

pub fn invlpg(va: u64) {
    // SAFETY: no memory is accessed through the argument.
    let _ = unsafe { crate::hypercall::invlpg(GuestVa(va)) };
}

/// The machine frame currently mapped at `va`, from our page tables.
#[cfg(not(feature = "hvm"))]
pub fn translate(va: u64) -> Option<u64> {
    let ptr = l1_entry_maddr(va)?;
    let e = read_entry(ptr >> 12, (ptr & 0xfff) / 8)?;
    (e & PTE_PRESENT != 0).then_some((e & PTE_ADDR) >> 12)
}

/// A hybrid guest's frame number for `va`: the guest frame, as its memory
/// is identity-mapped (microhv translates guest frames itself).
#[cfg(feature = "hvm")]
pub fn translate(va: u64) -> Option<u64> {
    Some(va >> 12)
}

/// Current and maximum pages of this domain.
pub fn memory_query() -> Result<shared_abi::hypercall::MemoryInfo, Errno> {
    let mut info = shared_abi::hypercall::MemoryInfo::default();
    // SAFETY: `info` is valid for writing.
    unsafe { crate::hypercall::memory_query(GuestVa(&mut info as *mut _ as u64)) }?;
    Ok(info)
}

/// Frees up `n` virtual page slots at the end of the initial mapping (the
/// pages kept out of the heap with `init_heap(si, n)`): unmaps them so their
/// L1 entries are empty and can take grant mappings. Returns their addresses.
pub fn free_slots<const N: usize>() -> Result<[u64; N], Errno> {
    let si = crate::start_info();
    let first = si.virt_base + (si.nr_pages - N as u64) * PAGE;
    let vas: [u64; N] = core::array::from_fn(|i| first + i as u64 * PAGE);
    for &va in &vas {
        if translate(va).is_some() {
            unmap(va)?;
        }
    }
    Ok(vas)
}

/// A 4 KiB page shared with another domain or with microhv, accessed with
/// volatile reads and writes and sequentially consistent fences (the other
/// side may change it at any time).
pub struct SharedPage(pub *mut u8);

impl shared_abi::ring::SharedMem for SharedPage {
    fn read_u32(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4) && off + 4 <= 4096);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: in-bounds, aligned read of a page this guest has mapped.
        let v = unsafe { (self.0.add(off) as *const u32).read_volatile() };
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        v
    }
    fn write_u32(&mut self, off: usize, v: u32) {
        assert!(off.is_multiple_of(4) && off + 4 <= 4096);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: as above, for writing (the page is mapped writable).
        unsafe { (self.0.add(off) as *mut u32).write_volatile(v) };
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= 4096);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: in-bounds byte read of the mapped page.
            *b = unsafe { self.0.add(off + i).read_volatile() };
        }
    }
    fn write(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= 4096);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in-bounds byte write of the mapped, writable page.
            unsafe { self.0.add(off + i).write_volatile(*b) };
        }
    }
}

/// Like [`free_slots`], for many slots (returned on the heap): frees the
/// `n` pages below the last `skip` pages of the initial mapping.
pub fn free_slots_vec(n: u64, skip: u64) -> Result<alloc::vec::Vec<u64>, Errno> {
    let si = crate::start_info();
    let first = si.virt_base + (si.nr_pages - skip - n) * PAGE;
    let mut out = alloc::vec::Vec::with_capacity(n as usize);
    for i in 0..n {
        let va = first + i * PAGE;
        if translate(va).is_some() {
            unmap(va)?;
        }
        out.push(va);
    }
    Ok(out)
}
