//! Loading an unmodified multiboot1 kernel into an HVM guest's memory: the
//! image checks and segment list ([`parse_multiboot_kernel`]) and the
//! multiboot information page ([`multiboot_info`]). The kernel copies the
//! bytes into the guest's frames; nothing here touches memory.
//!
//! Guest-physical layout: page 0 stays zero; the multiboot information page
//! is at [`MBI_GPA`]; the kernel loads at its own addresses, which must lie
//! in `[1 MiB, guest memory end)`; boot modules follow the kernel, each on
//! a page boundary ([`place_module`]); the guest's last page is reserved
//! for microhv's `shared_info` (marked reserved in the memory map).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use elf::endian::AnyEndian;
use elf::ElfBytes;

/// Where the multiboot information page goes.
pub const MBI_GPA: u64 = 0x9000;
/// The lowest address a kernel segment may load at.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;
/// Multiboot1 header magic (in the image) and boot magic (in EAX).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
const HEADER_SEARCH: usize = 8192;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Header flag bits 0..15 this loader can honour: 0 (page-aligned modules),
/// 1 (memory information); bit 2 (video mode) is ignored as allowed.
const FLAGS_REQUIRED_KNOWN: u32 = 0b11;

/// One piece of the image to copy: `filesz` bytes from `file_offset` to
/// guest-physical `gpa`, then zeros up to `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub file_offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A checked multiboot kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvmImage {
    pub entry: u32,
    pub segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    NoMultibootHeader,
    BadChecksum,
    /// Header flag bits 0..15 asking for something this loader cannot give.
    UnsupportedFlags(u32),
    NotElf,
    /// A segment outside `[1 MiB, guest memory end)` or outside the file.
    SegmentOutOfRange { gpa: u64, memsz: u64 },
    Overlap,
    EntryOutside(u64),
    NothingToLoad,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NoMultibootHeader => write!(f, "no multiboot1 header in the first 8 KiB"),
            LoadError::BadChecksum => write!(f, "multiboot header checksum is wrong"),
            LoadError::UnsupportedFlags(fl) => write!(f, "multiboot header flags {fl:#x} ask for features microhv does not offer"),
            LoadError::NotElf => write!(f, "not an ELF file (and no a.out-kludge addresses in the multiboot header)"),
            LoadError::SegmentOutOfRange { gpa, memsz } => {
                write!(f, "segment at {gpa:#x} ({memsz:#x} bytes) is outside the guest's memory (from 1 MiB) or the file")
            }
            LoadError::Overlap => write!(f, "segments overlap"),
            LoadError::EntryOutside(e) => write!(f, "entry point {e:#x} is not inside a loaded segment below 4 GiB"),
            LoadError::NothingToLoad => write!(f, "no loadable segment"),
        }
    }
}

fn u32_at(file: &[u8], off: usize) -> Option<u32> {
    file.get(off..off + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Finds the multiboot1 header: (file offset, flags).
fn find_header(file: &[u8]) -> Result<(usize, u32), LoadError> {
    let end = file.len().min(HEADER_SEARCH);
    let mut off = 0;
    while off + 12 <= end {
        if u32_at(file, off) == Some(HEADER_MAGIC) {
            let flags = u32_at(file, off + 4).unwrap_or(0);
            let sum = u32_at(file, off + 8).unwrap_or(0);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) != 0 {
                return Err(LoadError::BadChecksum);
            }
            return Ok((off, flags));
        }
        off += 4;
    }
    Err(LoadError::NoMultibootHeader)
}

/// Checks a multiboot1 kernel for a guest with `mem_end` bytes of usable
/// memory and lists what to copy where. ELF images (32- or 64-bit) load by
/// their program headers' physical addresses; images with the a.out-kludge
/// flag load by the header's addresses. Never panics.
pub fn parse_multiboot_kernel(file: &[u8], mem_end: u64) -> Result<HvmImage, LoadError> {
    let (hdr, flags) = find_header(file)?;
    let unknown = flags & 0xffff & !(FLAGS_REQUIRED_KNOWN | 0b100);
    if unknown != 0 {
        return Err(LoadError::UnsupportedFlags(flags));
    }
    let mut segments = Vec::new();
    let entry: u64;
    if flags & FLAG_AOUT_KLUDGE != 0 {
        let field = |i: usize| u32_at(file, hdr + 12 + 4 * i).map(|v| v as u64).ok_or(LoadError::NoMultibootHeader);
        let (header_addr, load_addr, load_end, bss_end) = (field(0)?, field(1)?, field(2)?, field(3)?);
        entry = field(4)?;
        let file_offset = (hdr as u64).checked_sub(header_addr.checked_sub(load_addr).ok_or(LoadError::NotElf)?).ok_or(LoadError::NotElf)?;
        let filesz = if load_end == 0 { file.len() as u64 - file_offset } else { load_end.saturating_sub(load_addr) };
        let memsz = if bss_end == 0 { filesz } else { bss_end.saturating_sub(load_addr).max(filesz) };
        segments.push(Segment { gpa: load_addr, file_offset, filesz, memsz });
    } else {
        let elf = ElfBytes::<AnyEndian>::minimal_parse(file).map_err(|_| LoadError::NotElf)?;
        entry = elf.ehdr.e_entry;
        let phdrs = elf.segments().ok_or(LoadError::NothingToLoad)?;
        for p in phdrs.iter().filter(|p| p.p_type == elf::abi::PT_LOAD && p.p_memsz > 0) {
            segments.push(Segment { gpa: p.p_paddr, file_offset: p.p_offset, filesz: p.p_filesz, memsz: p.p_memsz });
        }
    }
    if segments.is_empty() {
        return Err(LoadError::NothingToLoad);
    }
    for s in &segments {
        let out = LoadError::SegmentOutOfRange { gpa: s.gpa, memsz: s.memsz };
        let end = s.gpa.checked_add(s.memsz).ok_or(out.clone())?;
        let file_end = s.file_offset.checked_add(s.filesz).ok_or(out.clone())?;
        if s.gpa < KERNEL_MIN_GPA || end > mem_end || s.filesz > s.memsz || file_end > file.len() as u64 {
            return Err(out);
        }
    }
    let mut sorted = segments.clone();
    sorted.sort_by_key(|s| s.gpa);
    if sorted.windows(2).any(|w| w[0].gpa + w[0].memsz > w[1].gpa) {
        return Err(LoadError::Overlap);
    }
    if entry > u32::MAX as u64 || !segments.iter().any(|s| (s.gpa..s.gpa + s.memsz).contains(&entry)) {
        return Err(LoadError::EntryOutside(entry));
    }
    Ok(HvmImage { entry: entry as u32, segments: sorted })
}

/// Most boot modules one HVM guest can get.
pub const MAX_MODULES: usize = 16;
/// Bytes of each module's string kept in the information page.
const MODULE_STRING_MAX: usize = 111;

/// A boot module in guest memory: `[start, end)` and its string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestModule {
    pub start: u64,
    pub end: u64,
    pub cmdline: alloc::string::String,
}

impl HvmImage {
    /// First page after the kernel's segments.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.gpa + s.memsz).max().unwrap_or(KERNEL_MIN_GPA).next_multiple_of(4096)
    }
}

/// Where a module of `len` bytes goes: at `next_free` (page-aligned), if it
/// fits below `mem_end`. Returns its start and the next free address.
pub fn place_module(next_free: u64, len: u64, mem_end: u64) -> Result<(u64, u64), LoadError> {
    let out = LoadError::SegmentOutOfRange { gpa: next_free, memsz: len };
    let start = next_free.checked_next_multiple_of(4096).ok_or(out.clone())?;
    let end = start.checked_add(len).filter(|&e| e <= mem_end).ok_or(out.clone())?;
    let next = end.checked_next_multiple_of(4096).ok_or(out.clone())?.max(start.checked_add(4096).ok_or(out)?);
    Ok((start, next))
}

/// The multiboot information page for a guest with `mem_end` bytes of
/// usable memory (then one reserved page), placed at [`MBI_GPA`]: memory
/// sizes, the memory map, the command line (truncated to about 1 KiB), the
/// boot loader name and up to [`MAX_MODULES`] modules (strings truncated).
pub fn multiboot_info(mem_end: u64, cmdline: &str, modules: &[GuestModule]) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    let base = MBI_GPA as u32;
    let put32 = |p: &mut [u8], off: usize, v: u32| p[off..off + 4].copy_from_slice(&v.to_le_bytes());
    // flags: mem (0), cmdline (2), mods (3), mmap (6), loader name (9).
    put32(&mut page, 0, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9));
    put32(&mut page, 4, 639);
    put32(&mut page, 8, (mem_end.saturating_sub(KERNEL_MIN_GPA) / 1024).min(u32::MAX as u64) as u32);
    let (mmap_off, cmd_off, name_off) = (0x100usize, 0x200usize, 0x700usize);
    put32(&mut page, 16, base + cmd_off as u32);
    let (mods_off, strings_off) = (0x800usize, 0x900usize);
    let modules = &modules[..modules.len().min(MAX_MODULES)];
    put32(&mut page, 20, modules.len() as u32);
    put32(&mut page, 24, base + mods_off as u32);
    for (i, m) in modules.iter().enumerate() {
        let o = mods_off + i * 16;
        let s = strings_off + i * (MODULE_STRING_MAX + 1);
        put32(&mut page, o, m.start as u32);
        put32(&mut page, o + 4, m.end as u32);
        put32(&mut page, o + 8, base + s as u32);
        let b = m.cmdline.as_bytes();
        let n = b.len().min(MODULE_STRING_MAX);
        page[s..s + n].copy_from_slice(&b[..n]);
    }
    let entries: [(u64, u64, u32); 3] = [(0, 0x9fc00, 1), (KERNEL_MIN_GPA, mem_end - KERNEL_MIN_GPA, 1), (mem_end, 4096, 2)];
    for (i, (b, l, t)) in entries.iter().enumerate() {
        let o = mmap_off + i * 24;
        put32(&mut page, o, 20);
        page[o + 4..o + 12].copy_from_slice(&b.to_le_bytes());
        page[o + 12..o + 20].copy_from_slice(&l.to_le_bytes());
        put32(&mut page, o + 20, *t);
    }
    put32(&mut page, 44, (entries.len() * 24) as u32);
    put32(&mut page, 48, base + mmap_off as u32);
    let cmd = cmdline.as_bytes();
    let n = cmd.len().min(name_off - cmd_off - 1);
    page[cmd_off..cmd_off + n].copy_from_slice(&cmd[..n]);
    put32(&mut page, 64, base + name_off as u32);
    page[name_off..name_off + 7].copy_from_slice(b"microhv");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 with one PT_LOAD at `paddr` and a multiboot header.
    fn elf32(paddr: u32, entry: u32, filesz: u32, memsz: u32, flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 + filesz as usize];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 1; // 32-bit
        f[5] = 1; // little-endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        f[40..42].copy_from_slice(&52u16.to_le_bytes()); // ehsize
        f[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
        f[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
        f[46..48].copy_from_slice(&40u16.to_le_bytes());
        let ph = 52;
        let w = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
        w(&mut f, ph, 1); // PT_LOAD
        w(&mut f, ph + 4, 0x1000); // offset
        w(&mut f, ph + 8, paddr);
        w(&mut f, ph + 12, paddr);
        w(&mut f, ph + 16, filesz);
        w(&mut f, ph + 20, memsz);
        w(&mut f, ph + 24, 5);
        // Multiboot header at 0x1000 (inside the first 8 KiB).
        w(&mut f, 0x1000, HEADER_MAGIC);
        w(&mut f, 0x1004, flags);
        w(&mut f, 0x1008, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)));
        f
    }

    #[test]
    fn elf32_multiboot_kernel_loads_by_physical_address() {
        let f = elf32(0x10_0000, 0x10_0010, 0x100, 0x3000, 3);
        let img = parse_multiboot_kernel(&f, 8 << 20).unwrap();
        assert_eq!(img.entry, 0x10_0010);
        assert_eq!(img.segments, vec![Segment { gpa: 0x10_0000, file_offset: 0x1000, filesz: 0x100, memsz: 0x3000 }]);
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        assert_eq!(parse_multiboot_kernel(&[0u8; 100], 8 << 20), Err(LoadError::NoMultibootHeader));
        let mut f = elf32(0x10_0000, 0x10_0010, 0x100, 0x100, 3);
        f[0x1008] ^= 1;
        assert_eq!(parse_multiboot_kernel(&f, 8 << 20), Err(LoadError::BadChecksum));
        let f = elf32(0x10_0000, 0x10_0010, 0x100, 0x100, 3 | 1 << 5);
        assert!(matches!(parse_multiboot_kernel(&f, 8 << 20), Err(LoadError::UnsupportedFlags(_))));
        // Below 1 MiB, past the end of memory, entry outside.
        let f = elf32(0x8000, 0x8000, 0x100, 0x100, 3);
        assert!(matches!(parse_multiboot_kernel(&f, 8 << 20), Err(LoadError::SegmentOutOfRange { .. })));
        let f = elf32(0x7f_f000, 0x7f_f000, 0x100, 0x2000, 3);
        assert!(matches!(parse_multiboot_kernel(&f, 8 << 20), Err(LoadError::SegmentOutOfRange { .. })));
        let f = elf32(0x10_0000, 0x20_0000, 0x100, 0x100, 3);
        assert_eq!(parse_multiboot_kernel(&f, 8 << 20), Err(LoadError::EntryOutside(0x20_0000)));
        // filesz past the end of the file.
        let mut f = elf32(0x10_0000, 0x10_0000, 0x100, 0x100, 3);
        f.truncate(0x1080);
        assert!(parse_multiboot_kernel(&f, 8 << 20).is_err());
    }

    #[test]
    fn aout_kludge_addresses_are_used() {
        // Header at file offset 0 describing a load at 1 MiB.
        let mut f = vec![0u8; 0x2000];
        let flags = 1 << 16 | 3;
        let w = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
        w(&mut f, 0, HEADER_MAGIC);
        w(&mut f, 4, flags);
        w(&mut f, 8, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)));
        w(&mut f, 12, 0x10_0000); // header_addr
        w(&mut f, 16, 0x10_0000); // load_addr
        w(&mut f, 20, 0x10_2000); // load_end
        w(&mut f, 24, 0x10_4000); // bss_end
        w(&mut f, 28, 0x10_0020); // entry
        let img = parse_multiboot_kernel(&f, 8 << 20).unwrap();
        assert_eq!(img.entry, 0x10_0020);
        assert_eq!(img.segments, vec![Segment { gpa: 0x10_0000, file_offset: 0, filesz: 0x2000, memsz: 0x4000 }]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut f = elf32(0x10_0000, 0x10_0010, 0x100, 0x3000, 3);
        for i in 0..f.len().min(0x200) {
            for v in [0u8, 0xff, 0x80] {
                let old = f[i];
                f[i] = v;
                let _ = parse_multiboot_kernel(&f, 8 << 20);
                f[i] = old;
            }
        }
    }

    #[test]
    fn multiboot_info_describes_memory_and_command_line() {
        let p = multiboot_info(8 << 20, "name=hvm1 demo", &[]);
        let r = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        assert_eq!(r(0) & (1 << 6), 1 << 6);
        assert_eq!(r(8), (7 << 20) / 1024);
        let cmd = (r(16) - MBI_GPA as u32) as usize;
        assert_eq!(&p[cmd..cmd + 14], b"name=hvm1 demo");
        assert_eq!(p[cmd + 14], 0);
        assert_eq!(r(44), 72);
        let mm = (r(48) - MBI_GPA as u32) as usize;
        // Second entry: usable from 1 MiB to the end.
        assert_eq!(u64::from_le_bytes(p[mm + 24 + 4..mm + 24 + 12].try_into().unwrap()), 0x10_0000);
        assert_eq!(r(mm + 48 + 20), 2, "shared_info page reserved");
        let long = "x".repeat(5000);
        let p = multiboot_info(8 << 20, &long, &[]);
        assert_eq!(p.len(), 4096);
    }

    #[test]
    fn modules_follow_the_kernel_page_aligned_and_are_listed() {
        let f = elf32(0x10_0000, 0x10_0010, 0x100, 0x3001, 3);
        let img = parse_multiboot_kernel(&f, 8 << 20).unwrap();
        assert_eq!(img.end(), 0x10_4000);
        let (a, next) = place_module(img.end(), 5000, 8 << 20).unwrap();
        assert_eq!((a, next), (0x10_4000, 0x10_6000));
        let (b, next) = place_module(next, 0, 8 << 20).unwrap();
        assert_eq!((b, next), (0x10_6000, 0x10_7000), "an empty module still gets its own page");
        assert!(place_module(next, 8 << 20, 8 << 20).is_err(), "past the end of memory");
        assert!(place_module(u64::MAX - 10, 100, u64::MAX).is_err(), "no overflow");
        let long = "m".repeat(300);
        let mods = [
            GuestModule { start: a, end: a + 5000, cmdline: "one.bin for=hvm1".into() },
            GuestModule { start: b, end: b, cmdline: long.clone() },
        ];
        let p = multiboot_info(8 << 20, "x", &mods);
        let r = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        assert_eq!(r(0) & (1 << 3), 1 << 3);
        assert_eq!(r(20), 2);
        let list = (r(24) - MBI_GPA as u32) as usize;
        assert_eq!((r(list), r(list + 4)), (a as u32, a as u32 + 5000));
        let s = (r(list + 8) - MBI_GPA as u32) as usize;
        assert_eq!(&p[s..s + 16], b"one.bin for=hvm1");
        assert_eq!(p[s + 16], 0);
        let s2 = (r(list + 16 + 8) - MBI_GPA as u32) as usize;
        assert_eq!(p[s2 + MODULE_STRING_MAX], 0, "long strings are cut and terminated");
        // More modules than fit: only MAX_MODULES are listed.
        let many = vec![mods[0].clone(); 40];
        let p = multiboot_info(8 << 20, "x", &many);
        assert_eq!(u32::from_le_bytes(p[20..24].try_into().unwrap()), MAX_MODULES as u32);
    }
}
