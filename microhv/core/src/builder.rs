//! The PV domain builder: it validates a microhv PV kernel (an ELF64 x86-64
//! executable carrying the microhv PV note) and lays out a new domain's
//! initial memory from it. It owns the ELF checks ([`parse_pv_image`]) and the
//! boot layout ([`build`]): kernel segments, `start_info`, the p2m list, the
//! initial page tables and the boot stack, all written through
//! [`MachineMemory`] so the logic runs on the host in tests.
//!
//! # Boot layout
//!
//! The caller allocates the domain's `nr_pages` machine frames (in any order,
//! not necessarily contiguous) and passes them as `frames[pfn]`. Guest pfn
//! `i` is mapped at virtual address `virt_base + i * 4096`, where `virt_base`
//! is the lowest kernel segment address rounded down to a page. In pfn order:
//!
//! | part          | pages                           | contents                                 | leaf mapping      |
//! |---------------|---------------------------------|------------------------------------------|-------------------|
//! | kernel        | `(virt_end - virt_base) / 4096` | the segments, from pfn 0                 | per segment       |
//! | `start_info`  | 1                               | [`StartInfo`] at offset 0                | RW, NX            |
//! | `shared_info` | 1                               | zero (the hypervisor fills it later)     | RW, NX            |
//! | p2m list      | `ceil(nr_pages * 8 / 4096)`     | little-endian `u64` mfn of every pfn     | RW, NX            |
//! | page tables   | `1 + L3 + L2 + L1`              | the L4, then the L3s, L2s and L1s        | read-only, NX     |
//! | boot stack    | [`BOOT_STACK_PAGES`]            | zero; `stack_top` is the VA of its end   | RW, NX            |
//! | free          | up to `nr_pages`                | zero, from `first_free_pfn`              | RW, NX            |
//!
//! A kernel page is writable if any segment touching it is writable and
//! executable (no NX) if any segment touching it is executable; pages inside
//! `virt_base .. virt_end` that no segment touches are mapped like free pages.
//! Every frame is zeroed before anything is written, so bss and padding read
//! as zero.
//!
//! The page tables map all `nr_pages` pfns with 4 KiB pages only. The number
//! of tables is exact: one L1 per 2 MiB region, one L2 per 1 GiB region and
//! one L3 per 512 GiB region that `virt_base .. virt_base + nr_pages * 4096`
//! touches (so it depends on how `virt_base` is aligned), plus the L4.
//! Non-leaf entries are `P|RW`; leaves use only `P`, `RW` and `NX`. Because
//! the table count depends on `nr_pages`, the smallest domain that fits is a
//! fixed point, which [`pages_needed`] computes and
//! [`BuildError::MemoryTooSmall`] reports.
//!
//! All kernel addresses lie in the lower canonical half, so the tree never
//! touches the hypervisor's L4 slot 511. The L4 is returned unpinned: the
//! caller pins it through the PV memory-management validator.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use elf::abi;
use elf::endian::LittleEndian;
use elf::parse::ParseError;
use elf::ElfBytes;

use shared_abi::note::{NOTE_NAME, NOTE_TYPE_PV};
use shared_abi::start_info::{StartInfo, SIF_PRIVILEGED, START_INFO_MAGIC};
use shared_abi::{DomId, ABI_VERSION, HYPERVISOR_VA_START};

use crate::machine::{MachineMemory, Mfn};
use crate::paging::{index, PteFlags, ADDR_MASK};

/// Size of a guest page.
pub const PAGE: u64 = 4096;
/// Pages of boot stack given to the guest.
pub const BOOT_STACK_PAGES: u64 = 4;
/// End (exclusive) of the lower canonical half; kernel segments and the
/// whole initial mapping must lie below it.
pub const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;

/// Largest machine frame number a page-table entry can hold (52-bit physical addresses).
const MAX_MFN: u64 = ADDR_MASK >> 12;
const PTE_P: u64 = PteFlags::PRESENT.bits();
const PTE_RW: u64 = PteFlags::WRITABLE.bits();
const PTE_NX: u64 = PteFlags::NO_EXECUTE.bits();
/// Flags of every non-leaf entry: leaves decide the access.
const NON_LEAF: u64 = PTE_P | PTE_RW;

/// Size of the ELF64 file header.
const EHDR64_SIZE: usize = 64;

/// Why an image could not be parsed or a domain could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// The file does not start with the ELF magic.
    NotElf,
    /// A header, segment or note lies (partly) past the end of the file.
    Truncated,
    /// Not an ELF64 file.
    WrongClass,
    /// Not a little-endian file.
    WrongEndian,
    /// `e_machine` is not x86-64 (62).
    WrongArch,
    /// `e_type` is not `ET_EXEC`.
    NotExecutable,
    /// No microhv PV note: the image is not a PV kernel.
    NoPvNote,
    /// The PV note names another ABI major version.
    AbiMismatch { found: u32, expected: u32 },
    /// No `PT_LOAD` segment with a non-zero memory size.
    NoLoadableSegments,
    /// A segment wraps around or does not lie in the lower canonical half.
    SegmentOutOfRange { vaddr: u64, memsz: u64 },
    /// Two loadable segments share bytes.
    SegmentOverlap,
    /// The entry point is not inside an executable segment.
    EntryOutsideImage(u64),
    /// The image plus the boot layout need more pages than the domain has;
    /// `needed_pages` is the smallest domain size that works.
    MemoryTooSmall { needed_pages: u64, have_pages: u64 },
    /// The caller's inputs cannot be laid out (frames, limits, addresses).
    BadLayout(&'static str),
    /// Headers or notes that are inconsistent in a way the other variants do not name.
    Malformed(&'static str),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NotElf => write!(f, "not an ELF file (bad magic)"),
            BuildError::Truncated => write!(f, "ELF file truncated: a header, segment or note lies past its end"),
            BuildError::WrongClass => write!(f, "not a 64-bit ELF file"),
            BuildError::WrongEndian => write!(f, "not a little-endian ELF file"),
            BuildError::WrongArch => write!(f, "ELF file is not for x86-64"),
            BuildError::NotExecutable => write!(f, "ELF file is not an executable (ET_EXEC)"),
            BuildError::NoPvNote => write!(f, "no microhv PV note: not a microhv PV kernel"),
            BuildError::AbiMismatch { found, expected } => {
                write!(f, "kernel was built for microhv ABI {found}, this hypervisor speaks ABI {expected}")
            }
            BuildError::NoLoadableSegments => write!(f, "ELF file has no loadable segments"),
            BuildError::SegmentOutOfRange { vaddr, memsz } => write!(
                f,
                "segment at {vaddr:#x} of {memsz:#x} bytes does not lie in the lower canonical half"
            ),
            BuildError::SegmentOverlap => write!(f, "loadable segments overlap"),
            BuildError::EntryOutsideImage(entry) => {
                write!(f, "entry point {entry:#x} is not inside an executable segment")
            }
            BuildError::MemoryTooSmall { needed_pages, have_pages } => write!(
                f,
                "memory too small: the image and boot layout need {needed_pages} pages, the domain has {have_pages}"
            ),
            BuildError::BadLayout(why) => write!(f, "cannot lay out the domain: {why}"),
            BuildError::Malformed(why) => write!(f, "malformed ELF file: {why}"),
        }
    }
}

/// One loadable segment of a validated image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub file_offset: u64,
    /// Bytes copied from the file; the rest up to `memsz` stays zero.
    pub filesz: u64,
    pub memsz: u64,
    pub writable: bool,
    pub executable: bool,
}

impl Segment {
    /// End (exclusive) of the segment in memory; cannot overflow for a parsed image.
    pub fn end(&self) -> u64 {
        self.vaddr.saturating_add(self.memsz)
    }
}

/// A validated PV kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvImage {
    pub entry: u64,
    /// Lowest segment address rounded down to a page.
    pub virt_base: u64,
    /// Highest segment end rounded up to a page.
    pub virt_end: u64,
    /// Loadable segments with a non-zero memory size, sorted by address.
    pub segments: Vec<Segment>,
    /// ABI major version from the PV note (equal to `ABI_VERSION.0`).
    pub abi_major: u32,
}

impl PvImage {
    /// Pages the kernel segments span: `(virt_end - virt_base) / PAGE`.
    pub fn kernel_pages(&self) -> u64 {
        self.virt_end.saturating_sub(self.virt_base) / PAGE
    }
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

fn map_parse_error(e: ParseError) -> BuildError {
    match e {
        ParseError::BadMagic(_) => BuildError::NotElf,
        ParseError::UnsupportedElfClass(_) => BuildError::WrongClass,
        ParseError::UnsupportedElfEndianness(_) => BuildError::WrongEndian,
        // A table whose offset + size runs past the file (or overflows) is
        // what a truncated file looks like.
        ParseError::SliceReadError(_)
        | ParseError::TryFromSliceError(_)
        | ParseError::IntegerOverflow
        | ParseError::TryFromIntError(_) => BuildError::Truncated,
        ParseError::UnsupportedVersion(_) => BuildError::Malformed("unsupported ELF version"),
        ParseError::BadEntsize(_) => BuildError::Malformed("unexpected program or section header entry size"),
        _ => BuildError::Malformed("unparseable ELF headers"),
    }
}

/// Checks `e_ident` by hand so that each problem gets its own error, then
/// lets the `elf` crate (safe, bounds-checked, no alignment needs) locate the
/// program and section header tables.
fn open_elf(file: &[u8]) -> Result<ElfBytes<'_, LittleEndian>, BuildError> {
    if file.is_empty() {
        return Err(BuildError::NotElf);
    }
    let n = file.len().min(abi::ELFMAGIC.len());
    if file.get(..n) != abi::ELFMAGIC.get(..n) {
        return Err(BuildError::NotElf);
    }
    match file.get(abi::EI_CLASS) {
        None => return Err(BuildError::Truncated),
        Some(&abi::ELFCLASS64) => {}
        Some(_) => return Err(BuildError::WrongClass),
    }
    match file.get(abi::EI_DATA) {
        None => return Err(BuildError::Truncated),
        Some(&abi::ELFDATA2LSB) => {}
        Some(_) => return Err(BuildError::WrongEndian),
    }
    if file.len() < EHDR64_SIZE {
        return Err(BuildError::Truncated);
    }
    ElfBytes::<LittleEndian>::minimal_parse(file).map_err(map_parse_error)
}

/// The `size` bytes at `offset` in `file`, or `Truncated`.
fn file_range(file: &[u8], offset: u64, size: u64) -> Result<&[u8], BuildError> {
    let start = usize::try_from(offset).map_err(|_| BuildError::Truncated)?;
    let len = usize::try_from(size).map_err(|_| BuildError::Truncated)?;
    let end = start.checked_add(len).ok_or(BuildError::Truncated)?;
    file.get(start..end).ok_or(BuildError::Truncated)
}

fn read_u32_le(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Walks the notes in `data` (a `PT_NOTE` segment or `SHT_NOTE` section)
/// looking for the PV note; returns its descriptor (the ABI major).
///
/// Entries are padded to 4 bytes, or to 8 when the container says so (the
/// GNU toolchain's practice for both ELF classes).
fn scan_notes(data: &[u8], container_align: u64) -> Result<Option<u32>, BuildError> {
    const RUNS_PAST: BuildError = BuildError::Malformed("a note runs past the end of its segment or section");
    let align: u64 = if container_align == 8 { 8 } else { 4 };
    let mut off: usize = 0;
    while data.len().saturating_sub(off) >= 12 {
        let (Some(namesz), Some(descsz), Some(ntype)) =
            (read_u32_le(data, off), read_u32_le(data, off + 4), read_u32_le(data, off + 8))
        else {
            return Err(RUNS_PAST);
        };
        let name_start = off as u64 + 12;
        let name_end = name_start + u64::from(namesz);
        let desc_start = align_up(name_end, align).ok_or(RUNS_PAST)?;
        let desc_end = desc_start + u64::from(descsz);
        let name = file_range(data, name_start, u64::from(namesz)).map_err(|_| RUNS_PAST)?;
        let desc = file_range(data, desc_start, u64::from(descsz)).map_err(|_| RUNS_PAST)?;
        if name == NOTE_NAME && ntype == NOTE_TYPE_PV {
            let major: [u8; 4] =
                desc.try_into().map_err(|_| BuildError::Malformed("the PV note's descriptor is not 4 bytes"))?;
            return Ok(Some(u32::from_le_bytes(major)));
        }
        // The last note's trailing padding may be missing: the loop condition ends the walk.
        off = match align_up(desc_end, align).and_then(|next| usize::try_from(next).ok()) {
            Some(next) => next,
            None => break,
        };
    }
    Ok(None)
}

/// Looks for the PV note in every `PT_NOTE` segment, then every `SHT_NOTE` section.
fn find_pv_note(elf: &ElfBytes<'_, LittleEndian>, file: &[u8]) -> Result<Option<u32>, BuildError> {
    for ph in elf.segments().iter().flat_map(|t| t.iter()) {
        if ph.p_type == abi::PT_NOTE {
            if let Some(major) = scan_notes(file_range(file, ph.p_offset, ph.p_filesz)?, ph.p_align)? {
                return Ok(Some(major));
            }
        }
    }
    for sh in elf.section_headers().iter().flat_map(|t| t.iter()) {
        if sh.sh_type == abi::SHT_NOTE {
            if let Some(major) = scan_notes(file_range(file, sh.sh_offset, sh.sh_size)?, sh.sh_addralign)? {
                return Ok(Some(major));
            }
        }
    }
    Ok(None)
}

/// True if the file is an ELF file with the microhv PV note, whatever ABI
/// version the note names (a PV kernel for another ABI is still PV; it is
/// [`parse_pv_image`] that refuses it).
pub fn has_pv_note(file: &[u8]) -> bool {
    match open_elf(file) {
        Ok(elf) => matches!(find_pv_note(&elf, file), Ok(Some(_))),
        Err(_) => false,
    }
}

/// Validates a PV kernel image and describes its loadable segments.
///
/// Checks, in order: the ELF identification (magic, ELF64, little-endian)
/// and headers; `e_machine` (x86-64) and `e_type` (`ET_EXEC`); that every
/// `PT_LOAD` and `PT_NOTE` lies inside the file; the PV note (name
/// `"microhv\0"`, type `NOTE_TYPE_PV`, 4-byte descriptor equal to the ABI
/// major) in a `PT_NOTE` segment or `SHT_NOTE` section; then for each
/// `PT_LOAD` with a non-zero memory size: `filesz <= memsz`, no address
/// overflow and the whole segment below [`LOWER_HALF_END`]; that segments do
/// not overlap; and that the entry point is inside an executable segment.
/// Never panics, whatever the input.
pub fn parse_pv_image(file: &[u8]) -> Result<PvImage, BuildError> {
    let elf = open_elf(file)?;
    if elf.ehdr.e_machine != abi::EM_X86_64 {
        return Err(BuildError::WrongArch);
    }
    if elf.ehdr.e_type != abi::ET_EXEC {
        return Err(BuildError::NotExecutable);
    }
    let phdrs = || elf.segments().into_iter().flat_map(|t| t.into_iter());
    for ph in phdrs() {
        if ph.p_type == abi::PT_LOAD || ph.p_type == abi::PT_NOTE {
            file_range(file, ph.p_offset, ph.p_filesz)?;
        }
    }

    let expected = u32::from(ABI_VERSION.0);
    let found = find_pv_note(&elf, file)?.ok_or(BuildError::NoPvNote)?;
    if found != expected {
        return Err(BuildError::AbiMismatch { found, expected });
    }

    let mut segments = Vec::new();
    for ph in phdrs() {
        if ph.p_type != abi::PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(BuildError::Malformed("a segment's file size exceeds its memory size"));
        }
        if !matches!(ph.p_vaddr.checked_add(ph.p_memsz), Some(end) if end <= LOWER_HALF_END) {
            return Err(BuildError::SegmentOutOfRange { vaddr: ph.p_vaddr, memsz: ph.p_memsz });
        }
        segments.push(Segment {
            vaddr: ph.p_vaddr,
            file_offset: ph.p_offset,
            filesz: ph.p_filesz,
            memsz: ph.p_memsz,
            writable: ph.p_flags & abi::PF_W != 0,
            executable: ph.p_flags & abi::PF_X != 0,
        });
    }
    segments.sort_unstable_by_key(|s| s.vaddr);
    let (Some(first), Some(last_end)) = (segments.first(), segments.iter().map(Segment::end).max()) else {
        return Err(BuildError::NoLoadableSegments);
    };
    if segments.windows(2).any(|w| w[0].end() > w[1].vaddr) {
        return Err(BuildError::SegmentOverlap);
    }
    let entry = elf.ehdr.e_entry;
    if !segments.iter().any(|s| s.executable && s.vaddr <= entry && entry < s.end()) {
        return Err(BuildError::EntryOutsideImage(entry));
    }
    let virt_base = first.vaddr & !(PAGE - 1);
    // last_end <= LOWER_HALF_END, which is page aligned: no overflow.
    let virt_end = align_up(last_end, PAGE).ok_or(BuildError::BadLayout("image end overflows"))?;
    Ok(PvImage { entry, virt_base, virt_end, segments, abi_major: found })
}

/// How many page-table frames of each level map a range of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    pub l3: u64,
    pub l2: u64,
    pub l1: u64,
}

impl TableCounts {
    /// All page-table frames, the L4 included.
    pub fn total(&self) -> u64 {
        1 + self.l3 + self.l2 + self.l1
    }
}

/// Tables needed to map `nr_pages` 4 KiB pages from `virt_base` (page
/// aligned): one per 2 MiB / 1 GiB / 512 GiB region the range touches. The
/// caller guarantees `virt_base + nr_pages * PAGE` does not overflow.
pub fn table_counts(virt_base: u64, nr_pages: u64) -> TableCounts {
    if nr_pages == 0 {
        return TableCounts { l3: 0, l2: 0, l1: 0 };
    }
    let last = virt_base + (nr_pages * PAGE - 1);
    let regions = |shift: u32| (last >> shift) - (virt_base >> shift) + 1;
    TableCounts { l3: regions(39), l2: regions(30), l1: regions(21) }
}

/// Where each part of the boot layout goes (pfns), for a domain of `nr_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    pub nr_pages: u64,
    pub kernel_pages: u64,
    pub start_info_pfn: u64,
    pub shared_info_pfn: u64,
    pub p2m_pfn: u64,
    pub p2m_pages: u64,
    /// First page-table frame (the L4); then the L3s, L2s and L1s.
    pub pt_pfn: u64,
    pub tables: TableCounts,
    pub stack_pfn: u64,
    /// First pfn after the boot stack.
    pub first_free_pfn: u64,
}

impl BootLayout {
    /// The layout for `nr_pages`, without checking that it fits in them.
    fn place(virt_base: u64, kernel_pages: u64, nr_pages: u64) -> Result<BootLayout, BuildError> {
        let map_end = nr_pages.checked_mul(PAGE).and_then(|len| virt_base.checked_add(len));
        if !matches!(map_end, Some(end) if end <= LOWER_HALF_END) {
            return Err(BuildError::BadLayout("the domain's memory would extend past the lower canonical half"));
        }
        // From here on every count is below 2^35: plain arithmetic cannot overflow.
        let tables = table_counts(virt_base, nr_pages);
        let start_info_pfn = kernel_pages;
        let p2m_pfn = start_info_pfn + 2;
        let p2m_pages = (nr_pages * 8).div_ceil(PAGE);
        let pt_pfn = p2m_pfn + p2m_pages;
        let stack_pfn = pt_pfn + tables.total();
        Ok(BootLayout {
            nr_pages,
            kernel_pages,
            start_info_pfn,
            shared_info_pfn: start_info_pfn + 1,
            p2m_pfn,
            p2m_pages,
            pt_pfn,
            tables,
            stack_pfn,
            first_free_pfn: stack_pfn + BOOT_STACK_PAGES,
        })
    }

    /// The smallest domain size `>= from` whose layout fits in it.
    ///
    /// `first_free_pfn` grows with the domain (p2m and tables), so this is a
    /// fixed point. The needed count `f(n)` never decreases as `n` grows, so
    /// if `f(n) > n` no size in `n..f(n)` can work and we jump to `f(n)`.
    fn smallest_fit(virt_base: u64, kernel_pages: u64, from: u64) -> Result<u64, BuildError> {
        let mut n = from;
        for _ in 0..64 {
            let need = Self::place(virt_base, kernel_pages, n)?.first_free_pfn;
            if need <= n {
                return Ok(n);
            }
            n = need;
        }
        Err(BuildError::BadLayout("the boot layout size does not converge"))
    }

    /// The layout for an image in a domain of `nr_pages`, or `MemoryTooSmall`
    /// naming the smallest size that would work.
    pub fn new(image: &PvImage, nr_pages: u64) -> Result<BootLayout, BuildError> {
        let kernel_pages = image.kernel_pages();
        let layout = Self::place(image.virt_base, kernel_pages, nr_pages)?;
        if layout.first_free_pfn <= nr_pages {
            return Ok(layout);
        }
        let needed_pages = Self::smallest_fit(image.virt_base, kernel_pages, nr_pages)?;
        Err(BuildError::MemoryTooSmall { needed_pages, have_pages: nr_pages })
    }

    pub fn nr_pt_frames(&self) -> u64 {
        self.tables.total()
    }

    fn is_table(&self, pfn: u64) -> bool {
        (self.pt_pfn..self.stack_pfn).contains(&pfn)
    }
}

/// The smallest number of pages a domain needs for this image and the boot layout.
pub fn pages_needed(image: &PvImage) -> Result<u64, BuildError> {
    BootLayout::smallest_fit(image.virt_base, image.kernel_pages(), 0)
}

/// What the toolstack asks for.
#[derive(Debug, Clone)]
pub struct DomainConfig<'a> {
    pub domid: DomId,
    pub name: &'a str,
    /// Copied into `start_info` (truncated to 255 bytes, as `StartInfo::set_cmdline` does).
    pub cmdline: &'a str,
    pub privileged: bool,
    /// The domain's memory limit in pages; at least `frames.len()`.
    pub max_pages: u64,
}

/// The result of [`build`]: what the caller needs to pin the tables and start the vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltDomain {
    /// Top-level table, not yet pinned (the caller pins it with the pvmm validator).
    pub l4: Mfn,
    /// Every page-table frame with its level (4 = L4 .. 1 = L1), L4 first.
    pub pt_frames: Vec<(Mfn, u8)>,
    pub entry: u64,
    pub stack_top: u64,
    pub start_info_va: u64,
    pub shared_info_va: u64,
    pub shared_info_mfn: Mfn,
    pub virt_base: u64,
    pub first_free_pfn: u64,
    pub nr_pages: u64,
    /// VA of the p2m list.
    pub p2m_va: u64,
    /// Where everything went.
    pub layout: BootLayout,
}

/// Checks that `image` is self-consistent (it may not come from [`parse_pv_image`]).
fn check_image(image: &PvImage) -> Result<(), BuildError> {
    if !image.virt_base.is_multiple_of(PAGE)
        || !image.virt_end.is_multiple_of(PAGE)
        || image.virt_end < image.virt_base
        || image.virt_end > LOWER_HALF_END
    {
        return Err(BuildError::BadLayout("image bounds are not page-aligned or not in the lower half"));
    }
    if image.segments.iter().any(|s| {
        s.filesz > s.memsz || s.vaddr < image.virt_base || s.vaddr.checked_add(s.memsz).is_none_or(|e| e > image.virt_end)
    }) {
        return Err(BuildError::BadLayout("a segment lies outside the image bounds"));
    }
    Ok(())
}

/// Checks the caller's frame list: frames must fit a page-table entry and be distinct.
fn check_frames(frames: &[Mfn]) -> Result<(), BuildError> {
    if frames.iter().any(|m| m.0 > MAX_MFN) {
        return Err(BuildError::BadLayout("a machine frame number is beyond 52-bit physical addresses"));
    }
    let mut sorted: Vec<u64> = frames.iter().map(|m| m.0).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(BuildError::BadLayout("the frame list names a machine frame twice"));
    }
    Ok(())
}

/// Copies `bytes` into guest memory at `va`, page by page.
fn copy_to_guest<M: MachineMemory>(mem: &mut M, frames: &[Mfn], virt_base: u64, va: u64, bytes: &[u8]) {
    let mut va = va;
    let mut rest = bytes;
    while !rest.is_empty() {
        let pfn = ((va - virt_base) / PAGE) as usize;
        let off = (va % PAGE) as usize;
        let n = rest.len().min(PAGE as usize - off);
        mem.write_bytes(frames[pfn], off, &rest[..n]);
        va += n as u64;
        rest = &rest[n..];
    }
}

/// Per kernel page: whether a segment touches it, and the union of their permissions.
#[derive(Clone, Copy, Default)]
struct PagePerm {
    used: bool,
    writable: bool,
    executable: bool,
}

fn kernel_page_perms(image: &PvImage) -> Vec<PagePerm> {
    let mut perms = vec![PagePerm::default(); image.kernel_pages() as usize];
    for s in image.segments.iter().filter(|s| s.memsz > 0) {
        let first = (s.vaddr - image.virt_base) / PAGE;
        let last = (s.end() - 1 - image.virt_base) / PAGE;
        for p in &mut perms[first as usize..=last as usize] {
            p.used = true;
            p.writable |= s.writable;
            p.executable |= s.executable;
        }
    }
    perms
}

/// Builds a PV domain's initial memory in `frames` (`frames[pfn]` is the
/// machine frame of guest pfn; `nr_pages = frames.len()`), following the
/// layout in the module documentation.
///
/// All checks happen before the first write: on error guest memory is
/// untouched. `file` must be the file `image` was parsed from.
pub fn build<M: MachineMemory>(
    mem: &mut M,
    image: &PvImage,
    file: &[u8],
    frames: &[Mfn],
    cfg: &DomainConfig,
) -> Result<BuiltDomain, BuildError> {
    let nr_pages = frames.len() as u64;
    check_image(image)?;
    let layout = BootLayout::new(image, nr_pages)?;
    if cfg.max_pages < nr_pages {
        return Err(BuildError::BadLayout("max_pages is below the initial allocation"));
    }
    check_frames(frames)?;
    let contents = image
        .segments
        .iter()
        .map(|s| Ok((s.vaddr, file_range(file, s.file_offset, s.filesz)?)))
        .collect::<Result<Vec<_>, BuildError>>()?;

    let virt_base = image.virt_base;
    let va_of = |pfn: u64| virt_base + pfn * PAGE;
    // Assert-as-error: the tree must stay out of the hypervisor's L4 slot.
    let last_va = va_of(nr_pages - 1);
    if last_va >= HYPERVISOR_VA_START || index(last_va, 4) == 511 {
        return Err(BuildError::BadLayout("the mapping would reach the hypervisor's L4 slot"));
    }
    let frame = |pfn: u64| frames[pfn as usize];

    // 1. Clean memory, then the kernel's file bytes (bss stays zero).
    for &mfn in frames {
        mem.zero(mfn);
    }
    for (vaddr, bytes) in contents {
        copy_to_guest(mem, frames, virt_base, vaddr, bytes);
    }

    // 2. The p2m list.
    for (pfn, mfn) in frames.iter().enumerate() {
        mem.write_u64(frame(layout.p2m_pfn + pfn as u64 / 512), pfn % 512, mfn.0);
    }

    // 3. Page tables. Table frames are ordered L4, L3s, L2s, L1s; the table
    // for a level is picked by which region of that level `va` is in.
    let t = layout.tables;
    let l3_of = |va: u64| layout.pt_pfn + 1 + ((va >> 39) - (virt_base >> 39));
    let l2_of = |va: u64| layout.pt_pfn + 1 + t.l3 + ((va >> 30) - (virt_base >> 30));
    let l1_of = |va: u64| layout.pt_pfn + 1 + t.l3 + t.l2 + ((va >> 21) - (virt_base >> 21));
    let perms = kernel_page_perms(image);
    let leaf_flags = |pfn: u64| -> u64 {
        match perms.get(pfn as usize) {
            Some(p) if p.used => {
                PTE_P | if p.writable { PTE_RW } else { 0 } | if p.executable { 0 } else { PTE_NX }
            }
            _ if layout.is_table(pfn) => PTE_P | PTE_NX,
            _ => PTE_P | PTE_RW | PTE_NX,
        }
    };
    let l4 = frame(layout.pt_pfn);
    for pfn in 0..nr_pages {
        let va = va_of(pfn);
        // Link each table into its parent when the first page it maps comes by.
        if pfn == 0 || va % (1 << 39) == 0 {
            mem.write_u64(l4, index(va, 4), frame(l3_of(va)).addr() | NON_LEAF);
        }
        if pfn == 0 || va % (1 << 30) == 0 {
            mem.write_u64(frame(l3_of(va)), index(va, 3), frame(l2_of(va)).addr() | NON_LEAF);
        }
        if pfn == 0 || va % (1 << 21) == 0 {
            mem.write_u64(frame(l2_of(va)), index(va, 2), frame(l1_of(va)).addr() | NON_LEAF);
        }
        mem.write_u64(frame(l1_of(va)), index(va, 1), frame(pfn).addr() | leaf_flags(pfn));
    }
    let levels = [(4u8, 1u64), (3, t.l3), (2, t.l2), (1, t.l1)];
    let pt_frames: Vec<(Mfn, u8)> = levels
        .iter()
        .flat_map(|&(level, count)| core::iter::repeat_n(level, count as usize))
        .enumerate()
        .map(|(k, level)| (frame(layout.pt_pfn + k as u64), level))
        .collect();

    // 4. start_info.
    let mut si = StartInfo::zeroed();
    si.magic = START_INFO_MAGIC;
    si.abi_major = ABI_VERSION.0;
    si.abi_minor = ABI_VERSION.1;
    si.flags = if cfg.privileged { SIF_PRIVILEGED } else { 0 };
    si.domid = cfg.domid.0;
    si.nr_pages = nr_pages;
    si.max_pages = cfg.max_pages;
    si.virt_base = virt_base;
    si.shared_info_va = va_of(layout.shared_info_pfn);
    si.pt_base_va = va_of(layout.pt_pfn);
    si.pt_base_mfn = l4.0;
    si.nr_pt_frames = layout.nr_pt_frames();
    si.p2m_va = va_of(layout.p2m_pfn);
    si.first_free_pfn = layout.first_free_pfn;
    si.set_cmdline(cfg.cmdline);
    si.set_name(cfg.name);
    mem.write_bytes(frame(layout.start_info_pfn), 0, &si.as_bytes());

    Ok(BuiltDomain {
        l4,
        pt_frames,
        entry: image.entry,
        stack_top: va_of(layout.first_free_pfn),
        start_info_va: va_of(layout.start_info_pfn),
        shared_info_va: va_of(layout.shared_info_pfn),
        shared_info_mfn: frame(layout.shared_info_pfn),
        virt_base,
        first_free_pfn: layout.first_free_pfn,
        nr_pages,
        p2m_va: va_of(layout.p2m_pfn),
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::FakeMachine;
    use crate::paging::fake::FakeTables;
    use crate::paging::PageTables;
    use proptest::prelude::*;
    use std::string::String;

    // ---- Hand-assembled ELF images -------------------------------------

    const PF_R: u32 = 4;
    const RX: u32 = PF_R | abi::PF_X;
    const RW: u32 = PF_R | abi::PF_W;

    struct TestSeg {
        ptype: u32,
        flags: u32,
        vaddr: u64,
        data: Vec<u8>,
        memsz: u64,
        align: u64,
    }

    struct TestElf {
        class: u8,
        data_enc: u8,
        machine: u16,
        etype: u16,
        entry: u64,
        segs: Vec<TestSeg>,
        /// Note bytes placed in an `SHT_NOTE` section (with a section header table).
        note_section: Option<Vec<u8>>,
    }

    /// One note entry, name and descriptor padded to `align`.
    fn note_aligned(name: &[u8], ntype: u32, desc: &[u8], align: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ntype.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(align), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(align), 0);
        v
    }

    fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        note_aligned(name, ntype, desc, 4)
    }

    fn pv_note(major: u32) -> Vec<u8> {
        note(NOTE_NAME, NOTE_TYPE_PV, &major.to_le_bytes())
    }

    fn note_seg(data: Vec<u8>) -> TestSeg {
        TestSeg { ptype: abi::PT_NOTE, flags: PF_R, vaddr: 0, memsz: 0, data, align: 4 }
    }

    fn load(flags: u32, vaddr: u64, data: Vec<u8>, memsz: u64) -> TestSeg {
        TestSeg { ptype: abi::PT_LOAD, flags, vaddr, data, memsz, align: PAGE }
    }

    const TEXT_VA: u64 = 0x40_0000;
    const TEXT_LEN: usize = 0x1234;
    const DATA_VA: u64 = 0x40_2000;
    const DATA_LEN: usize = 0x100;
    const DATA_MEMSZ: u64 = 0x2100;
    const ENTRY: u64 = TEXT_VA + 0x10;

    fn text_bytes() -> Vec<u8> {
        (0..TEXT_LEN).map(|i| (i * 7 + 1) as u8).collect()
    }
    fn data_bytes() -> Vec<u8> {
        (0..DATA_LEN).map(|i| 0xa5 ^ i as u8).collect()
    }

    /// A valid kernel: PV note, RX text (0x40_0000, 0x1234 bytes), RW data
    /// (0x40_2000, 0x100 bytes of file, bss up to 0x40_4100).
    fn valid() -> TestElf {
        TestElf {
            class: abi::ELFCLASS64,
            data_enc: abi::ELFDATA2LSB,
            machine: abi::EM_X86_64,
            etype: abi::ET_EXEC,
            entry: ENTRY,
            segs: vec![
                note_seg(pv_note(ABI_VERSION.0 as u32)),
                load(RX, TEXT_VA, text_bytes(), TEXT_LEN as u64),
                load(RW, DATA_VA, data_bytes(), DATA_MEMSZ),
            ],
            note_section: None,
        }
    }

    impl TestElf {
        /// Layout: ELF header, program headers, segment payloads (8-aligned),
        /// then an optional note section and section header table.
        fn emit(&self) -> Vec<u8> {
            let phoff = 64usize;
            let mut payload_at = phoff + 56 * self.segs.len();
            let mut payload = Vec::new();
            let mut offsets = Vec::new();
            for s in &self.segs {
                payload_at = payload_at.next_multiple_of(8);
                offsets.push(payload_at);
                payload.push((payload_at, s.data.clone()));
                payload_at += s.data.len();
            }
            let mut shdr_info = None;
            if let Some(n) = &self.note_section {
                let at = payload_at.next_multiple_of(8);
                payload.push((at, n.clone()));
                let shoff = (at + n.len()).next_multiple_of(8);
                shdr_info = Some((at, n.len(), shoff));
                payload_at = shoff + 2 * 64;
            }
            let mut f = vec![0u8; payload_at];
            f[..4].copy_from_slice(&abi::ELFMAGIC);
            f[4] = self.class;
            f[5] = self.data_enc;
            f[6] = 1; // EV_CURRENT
            f[16..18].copy_from_slice(&self.etype.to_le_bytes());
            f[18..20].copy_from_slice(&self.machine.to_le_bytes());
            f[20..24].copy_from_slice(&1u32.to_le_bytes());
            f[24..32].copy_from_slice(&self.entry.to_le_bytes());
            f[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
            f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
            f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
            f[56..58].copy_from_slice(&(self.segs.len() as u16).to_le_bytes());
            f[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
            for (i, s) in self.segs.iter().enumerate() {
                let p = phoff + 56 * i;
                f[p..p + 4].copy_from_slice(&s.ptype.to_le_bytes());
                f[p + 4..p + 8].copy_from_slice(&s.flags.to_le_bytes());
                f[p + 8..p + 16].copy_from_slice(&(offsets[i] as u64).to_le_bytes());
                f[p + 16..p + 24].copy_from_slice(&s.vaddr.to_le_bytes());
                f[p + 24..p + 32].copy_from_slice(&s.vaddr.to_le_bytes());
                f[p + 32..p + 40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
                f[p + 40..p + 48].copy_from_slice(&s.memsz.to_le_bytes());
                f[p + 48..p + 56].copy_from_slice(&s.align.to_le_bytes());
            }
            for (at, bytes) in payload {
                f[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            if let Some((at, len, shoff)) = shdr_info {
                f[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
                f[60..62].copy_from_slice(&2u16.to_le_bytes()); // e_shnum: null + note
                let s = shoff + 64; // section 1
                f[s + 4..s + 8].copy_from_slice(&abi::SHT_NOTE.to_le_bytes());
                f[s + 24..s + 32].copy_from_slice(&(at as u64).to_le_bytes());
                f[s + 32..s + 40].copy_from_slice(&(len as u64).to_le_bytes());
                f[s + 48..s + 56].copy_from_slice(&4u64.to_le_bytes());
            }
            f
        }
    }

    // ---- Building helpers ------------------------------------------------

    /// Distinct, descending, non-contiguous machine frames.
    fn frames(n: u64) -> Vec<Mfn> {
        (0..n).map(|i| Mfn(0x9_0000 + (n - 1 - i) * 3)).collect()
    }

    fn cfg(max_pages: u64) -> DomainConfig<'static> {
        DomainConfig { domid: DomId(7), name: "domu-test", cmdline: "console=hvc0 x=1", privileged: false, max_pages }
    }

    fn build_valid(file: &[u8], nr: u64) -> (FakeMachine, PvImage, Vec<Mfn>, BuiltDomain) {
        let image = parse_pv_image(file).unwrap();
        let fr = frames(nr);
        let mut mem = FakeMachine::default();
        let built = build(&mut mem, &image, file, &fr, &cfg(nr + 16)).unwrap();
        (mem, image, fr, built)
    }

    /// The built tree, copied into `paging`'s fake so its (independent) walker can translate.
    fn tables_of(mem: &FakeMachine, built: &BuiltDomain) -> PageTables<FakeTables> {
        let mut ft = FakeTables::new(0);
        for &(mfn, _) in &built.pt_frames {
            let mut t = Box::new([0u64; 512]);
            for (i, e) in t.iter_mut().enumerate() {
                *e = mem.read_u64(mfn, i);
            }
            ft.tables.insert(mfn.addr(), t);
        }
        PageTables::from_root(built.l4.addr(), ft)
    }

    fn read_guest(mem: &FakeMachine, fr: &[Mfn], virt_base: u64, va: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut va = va;
        while out.len() < len {
            let off = (va % PAGE) as usize;
            let n = (len - out.len()).min(PAGE as usize - off);
            let mut buf = vec![0u8; n];
            mem.read_bytes(fr[((va - virt_base) / PAGE) as usize], off, &mut buf);
            out.extend_from_slice(&buf);
            va += n as u64;
        }
        out
    }

    fn flags(rw: bool, nx: bool) -> PteFlags {
        let mut f = PteFlags::PRESENT;
        f.set(PteFlags::WRITABLE, rw);
        f.set(PteFlags::NO_EXECUTE, nx);
        f
    }

    /// Checks every pfn maps to its frame and that the tree uses only P/RW/NX
    /// with `P|RW` non-leaf entries; returns the leaf flags by pfn.
    fn check_mapping(mem: &FakeMachine, fr: &[Mfn], built: &BuiltDomain) -> Vec<PteFlags> {
        let mut pt = tables_of(mem, built);
        let out: Vec<PteFlags> = (0..fr.len() as u64)
            .map(|pfn| {
                let va = built.virt_base + pfn * PAGE + 0x123;
                let (pa, f) = pt.translate(va).unwrap_or_else(|| panic!("pfn {pfn} unmapped"));
                assert_eq!(pa, fr[pfn as usize].addr() + 0x123, "pfn {pfn}");
                f
            })
            .collect();
        let allowed = ADDR_MASK | PTE_P | PTE_RW | PTE_NX;
        let mut leaves = 0;
        for &(mfn, level) in &built.pt_frames {
            for i in 0..512 {
                let e = mem.read_u64(mfn, i);
                assert_eq!(e & !allowed, 0, "bad bits in {e:#x}");
                if e != 0 && level > 1 {
                    assert_eq!(e & !ADDR_MASK, NON_LEAF, "non-leaf entry {e:#x}");
                }
                if e != 0 && level == 1 {
                    leaves += 1;
                }
            }
        }
        assert_eq!(leaves, fr.len(), "exactly the domain's pages are mapped");
        // Nothing mapped just below or above the domain.
        if built.virt_base > 0 {
            assert_eq!(pt.translate(built.virt_base - 1), None);
        }
        assert_eq!(pt.translate(built.virt_base + fr.len() as u64 * PAGE), None);
        out
    }

    // ---- Parsing ---------------------------------------------------------

    #[test]
    fn valid_image_parses() {
        let file = valid().emit();
        let img = parse_pv_image(&file).unwrap();
        assert_eq!(img.entry, ENTRY);
        assert_eq!(img.virt_base, TEXT_VA);
        assert_eq!(img.virt_end, 0x40_5000);
        assert_eq!(img.kernel_pages(), 5);
        assert_eq!(img.abi_major, ABI_VERSION.0 as u32);
        assert_eq!(img.segments.len(), 2);
        let (t, d) = (&img.segments[0], &img.segments[1]);
        assert_eq!((t.vaddr, t.filesz, t.memsz, t.writable, t.executable), (TEXT_VA, 0x1234, 0x1234, false, true));
        assert_eq!((d.vaddr, d.filesz, d.memsz, d.writable, d.executable), (DATA_VA, 0x100, DATA_MEMSZ, true, false));
        assert_eq!(&file[t.file_offset as usize..][..TEXT_LEN], &text_bytes()[..]);
        assert!(has_pv_note(&file));
    }

    #[test]
    fn no_alignment_is_required_of_the_file_buffer() {
        let file = valid().emit();
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&file);
        assert_eq!(parse_pv_image(&shifted[1..]), parse_pv_image(&file));
    }

    #[test]
    fn every_truncation_is_refused_without_panicking() {
        for spec in [valid(), TestElf { segs: vec![load(RX, TEXT_VA, text_bytes(), 0x1234)], note_section: Some(pv_note(1)), ..valid() }] {
            let file = spec.emit();
            assert!(parse_pv_image(&file).is_ok());
            assert_eq!(parse_pv_image(&[]), Err(BuildError::NotElf));
            for len in 1..file.len() {
                assert_eq!(parse_pv_image(&file[..len]), Err(BuildError::Truncated), "cut at {len}");
                let _ = has_pv_note(&file[..len]);
            }
        }
    }

    #[test]
    fn identification_errors() {
        assert_eq!(parse_pv_image(b"#!/bin/sh\necho not an elf\n"), Err(BuildError::NotElf));
        assert!(!has_pv_note(b"MZ\x90\x00"));
        let mut f = valid().emit();
        f[4] = abi::ELFCLASS32;
        assert_eq!(parse_pv_image(&f), Err(BuildError::WrongClass));
        f[4] = 0;
        assert_eq!(parse_pv_image(&f), Err(BuildError::WrongClass));
        let f = TestElf { data_enc: abi::ELFDATA2MSB, ..valid() }.emit();
        assert_eq!(parse_pv_image(&f), Err(BuildError::WrongEndian));
        let f = TestElf { machine: 3, ..valid() }.emit();
        assert_eq!(parse_pv_image(&f), Err(BuildError::WrongArch));
        let f = TestElf { etype: abi::ET_DYN, ..valid() }.emit();
        assert_eq!(parse_pv_image(&f), Err(BuildError::NotExecutable));
        let mut f = valid().emit();
        f[6] = 2;
        assert!(matches!(parse_pv_image(&f), Err(BuildError::Malformed(_))));
        let mut f = valid().emit();
        f[54] = 55; // e_phentsize
        assert!(matches!(parse_pv_image(&f), Err(BuildError::Malformed(_))));
    }

    #[test]
    fn a_32_bit_elf_is_refused() {
        // A genuine ELF32 header: 52 bytes, x86 (3).
        let mut f = vec![0u8; 52];
        f[..4].copy_from_slice(&abi::ELFMAGIC);
        f[4] = abi::ELFCLASS32;
        f[5] = abi::ELFDATA2LSB;
        f[6] = 1;
        f[16] = 2;
        f[18] = 3;
        assert_eq!(parse_pv_image(&f), Err(BuildError::WrongClass));
    }

    #[test]
    fn the_note_is_required_and_must_match() {
        let mut e = valid();
        e.segs.remove(0);
        let f = e.emit();
        assert_eq!(parse_pv_image(&f), Err(BuildError::NoPvNote));
        assert!(!has_pv_note(&f));

        let mut e = valid();
        e.segs[0] = note_seg(note(b"Xen\0", NOTE_TYPE_PV, &1u32.to_le_bytes()));
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::NoPvNote));
        let mut e = valid();
        e.segs[0] = note_seg(note(NOTE_NAME, 1, &1u32.to_le_bytes()));
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::NoPvNote));
        let mut e = valid();
        e.segs[0] = note_seg(note(b"microhv", NOTE_TYPE_PV, &1u32.to_le_bytes())); // no NUL
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::NoPvNote));

        let mut e = valid();
        e.segs[0] = note_seg(pv_note(2));
        let f = e.emit();
        assert_eq!(parse_pv_image(&f), Err(BuildError::AbiMismatch { found: 2, expected: 1 }));
        assert!(has_pv_note(&f), "a PV kernel for another ABI is still PV");

        let mut e = valid();
        e.segs[0] = note_seg(note(NOTE_NAME, NOTE_TYPE_PV, &[1, 0]));
        assert!(matches!(parse_pv_image(&e.emit()), Err(BuildError::Malformed(_))));
    }

    #[test]
    fn the_note_is_found_after_other_notes_and_in_sections() {
        let mut notes = note(b"GNU\0", 3, &[0xab; 20]);
        notes.extend(pv_note(1));
        let mut e = valid();
        e.segs[0] = note_seg(notes);
        assert!(parse_pv_image(&e.emit()).is_ok());

        // An 8-byte aligned note segment (as for .note.gnu.property): entries
        // and descriptors are padded to 8, so the PV descriptor sits at 24, not 20.
        let mut notes = note_aligned(b"GNU\0", 5, &[1; 12], 8);
        notes.extend(note_aligned(NOTE_NAME, NOTE_TYPE_PV, &1u32.to_le_bytes(), 8));
        let mut e = valid();
        e.segs[0] = TestSeg { align: 8, ..note_seg(notes) };
        assert!(parse_pv_image(&e.emit()).is_ok());

        let mut e = valid();
        e.segs.remove(0);
        e.note_section = Some(pv_note(1));
        let f = e.emit();
        assert!(has_pv_note(&f));
        assert!(parse_pv_image(&f).is_ok());
    }

    #[test]
    fn segment_errors() {
        let mut e = valid();
        e.entry = DATA_VA + 8; // in a segment, not an executable one
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::EntryOutsideImage(DATA_VA + 8)));
        e.entry = TEXT_VA + TEXT_LEN as u64; // one past the text
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::EntryOutsideImage(TEXT_VA + 0x1234)));

        let mut e = valid();
        e.segs[2].vaddr = TEXT_VA + 0x1000; // data starts inside the text
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::SegmentOverlap));

        let mut e = valid();
        e.segs[2].vaddr = 0xffff_ffff_8000_0000;
        assert_eq!(
            parse_pv_image(&e.emit()),
            Err(BuildError::SegmentOutOfRange { vaddr: 0xffff_ffff_8000_0000, memsz: DATA_MEMSZ })
        );
        e.segs[2].vaddr = LOWER_HALF_END - 0x1000; // crosses into the hole
        assert!(matches!(parse_pv_image(&e.emit()), Err(BuildError::SegmentOutOfRange { .. })));
        e.segs[2].vaddr = u64::MAX - 0x10; // wraps
        assert!(matches!(parse_pv_image(&e.emit()), Err(BuildError::SegmentOutOfRange { .. })));

        let mut e = valid();
        e.segs[2].memsz = 0x10; // less than its 0x100 file bytes
        assert!(matches!(parse_pv_image(&e.emit()), Err(BuildError::Malformed(_))));

        let mut e = valid();
        e.segs.truncate(1);
        assert_eq!(parse_pv_image(&e.emit()), Err(BuildError::NoLoadableSegments));
    }

    #[test]
    fn segments_may_share_a_page_and_are_sorted() {
        let mut e = valid();
        e.segs.swap(1, 2);
        e.segs[1].vaddr = TEXT_VA + TEXT_LEN as u64; // data right after text, same page
        let img = parse_pv_image(&e.emit()).unwrap();
        assert_eq!(img.segments[0].vaddr, TEXT_VA);
        assert_eq!(img.virt_end, (TEXT_VA + 0x1234 + DATA_MEMSZ).next_multiple_of(PAGE));
    }

    // ---- Layout ----------------------------------------------------------

    #[test]
    fn table_counts_depend_on_alignment() {
        assert_eq!(table_counts(0x40_0000, 512), TableCounts { l3: 1, l2: 1, l1: 1 });
        assert_eq!(table_counts(0x40_0000, 513), TableCounts { l3: 1, l2: 1, l1: 2 });
        assert_eq!(table_counts(0x40_1000, 512), TableCounts { l3: 1, l2: 1, l1: 2 });
        assert_eq!(table_counts(0x1f_f000, 2), TableCounts { l3: 1, l2: 1, l1: 2 });
        assert_eq!(table_counts(0x3fff_f000, 2), TableCounts { l3: 1, l2: 2, l1: 2 });
        assert_eq!(table_counts(0x7f_ffff_f000, 2), TableCounts { l3: 2, l2: 2, l1: 2 });
        assert_eq!(table_counts(0, 512 * 512 + 1), TableCounts { l3: 1, l2: 2, l1: 513 });
        assert_eq!(table_counts(0x1000, 0), TableCounts { l3: 0, l2: 0, l1: 0 });
    }

    #[test]
    fn pages_needed_is_the_smallest_fixed_point() {
        let img = parse_pv_image(&valid().emit()).unwrap();
        // 5 kernel + start_info + shared_info + 1 p2m + 4 tables + 4 stack.
        assert_eq!(pages_needed(&img), Ok(16));
        // A 505-page kernel: 505 + 2 + 1 + 4 + 4 = 516 > 512 pages, so the p2m
        // and the L1s both grow: 505 + 2 + 2 + 5 + 4 = 518.
        let big = PvImage { virt_end: img.virt_base + 505 * PAGE, ..img.clone() };
        let n = pages_needed(&big).unwrap();
        assert_eq!(n, 518);
        let l = BootLayout::new(&big, n).unwrap();
        assert_eq!(l.first_free_pfn, n);
        assert_eq!((l.p2m_pages, l.tables.l1), (2, 2));
        assert!(BootLayout::new(&big, n - 1).is_err());
    }

    // ---- Building --------------------------------------------------------

    #[test]
    fn builds_the_documented_layout() {
        let file = valid().emit();
        let nr = 64;
        let (mem, img, fr, b) = build_valid(&file, nr);
        let va = |pfn: u64| TEXT_VA + pfn * PAGE;
        assert_eq!(b.entry, ENTRY);
        assert_eq!(b.virt_base, TEXT_VA);
        assert_eq!(b.nr_pages, nr);
        assert_eq!(b.start_info_va, va(5));
        assert_eq!(b.shared_info_va, va(6));
        assert_eq!(b.shared_info_mfn, fr[6]);
        assert_eq!(b.p2m_va, va(7));
        assert_eq!(b.l4, fr[8]);
        assert_eq!(b.pt_frames, vec![(fr[8], 4), (fr[9], 3), (fr[10], 2), (fr[11], 1)]);
        assert_eq!(b.stack_top, va(16));
        assert_eq!(b.first_free_pfn, 16);
        assert_eq!(b.layout.stack_pfn, 12);

        // Page tables: each pfn at its frame, with the documented permissions.
        let f = check_mapping(&mem, &fr, &b);
        let (rx, ro_nx, rw_nx) = (flags(false, false), flags(false, true), flags(true, true));
        assert_eq!(&f[0..2], &[rx, rx], "text");
        assert_eq!(&f[2..5], &[rw_nx; 3], "data + bss");
        assert_eq!(&f[5..8], &[rw_nx; 3], "start_info, shared_info, p2m");
        assert_eq!(&f[8..12], &[ro_nx; 4], "page tables");
        assert!(f[12..].iter().all(|&x| x == rw_nx), "stack and free pages");

        // Segment bytes copied; bss, the rest of the text page and shared_info zero.
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, TEXT_VA, TEXT_LEN), text_bytes());
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, va(1) + 0x234, 0xdcc), vec![0; 0xdcc]);
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, DATA_VA, DATA_LEN), data_bytes());
        let bss = (DATA_MEMSZ - DATA_LEN as u64) as usize;
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, DATA_VA + DATA_LEN as u64, bss), vec![0; bss]);
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, b.shared_info_va, 4096), vec![0; 4096]);

        // p2m.
        for pfn in 0..nr as usize {
            assert_eq!(mem.read_u64(fr[7], pfn), fr[pfn].0);
        }

        // start_info.
        let mut raw = [0u8; 448];
        mem.read_bytes(fr[5], 0, &mut raw);
        let mut want = StartInfo::zeroed();
        want.magic = START_INFO_MAGIC;
        want.abi_major = ABI_VERSION.0;
        want.abi_minor = ABI_VERSION.1;
        want.domid = 7;
        want.nr_pages = nr;
        want.max_pages = nr + 16;
        want.virt_base = TEXT_VA;
        want.shared_info_va = va(6);
        want.pt_base_va = va(8);
        want.pt_base_mfn = fr[8].0;
        want.nr_pt_frames = 4;
        want.p2m_va = va(7);
        want.first_free_pfn = 16;
        want.set_cmdline("console=hvc0 x=1");
        want.set_name("domu-test");
        assert_eq!(raw, want.as_bytes());
        assert_eq!(raw[12], 0, "not privileged");
        let _ = img;
    }

    #[test]
    fn privileged_flag_and_an_unaligned_base_crossing_a_2m_boundary() {
        let mut e = valid();
        e.segs[1].vaddr = 0x5f_f000; // one page below 6 MiB
        e.segs[2].vaddr = 0x60_1000;
        e.entry = 0x5f_f000;
        let file = e.emit();
        let image = parse_pv_image(&file).unwrap();
        let fr = frames(600);
        let mut mem = FakeMachine::default();
        let c = DomainConfig { privileged: true, ..cfg(600) };
        let b = build(&mut mem, &image, &file, &fr, &c).unwrap();
        // 600 pages from 0x5f_f000 touch three 2 MiB regions.
        assert_eq!(b.layout.tables, TableCounts { l3: 1, l2: 1, l1: 3 });
        assert_eq!(b.layout.p2m_pages, 2);
        let levels: Vec<u8> = b.pt_frames.iter().map(|&(_, l)| l).collect();
        assert_eq!(levels, vec![4, 3, 2, 1, 1, 1]);
        let f = check_mapping(&mem, &fr, &b);
        let pt = b.layout.pt_pfn as usize;
        assert!(f[pt..pt + 6].iter().all(|&x| x == flags(false, true)));
        assert_eq!(read_guest(&mem, &fr, b.virt_base, 0x5f_f000, TEXT_LEN), text_bytes());
        let mut raw = [0u8; 16];
        mem.read_bytes(fr[b.layout.start_info_pfn as usize], 0, &mut raw);
        assert_eq!(raw[12] as u32, SIF_PRIVILEGED);
    }

    #[test]
    fn a_page_shared_by_two_segments_gets_the_union_of_permissions() {
        let mut e = valid();
        e.segs[2].vaddr = TEXT_VA + TEXT_LEN as u64;
        let file = e.emit();
        let (mem, _, fr, b) = build_valid(&file, 64);
        let f = check_mapping(&mem, &fr, &b);
        assert_eq!(f[0], flags(false, false), "text only");
        assert_eq!(f[1], flags(true, false), "text + data: RW and executable");
        assert_eq!(f[2], flags(true, true), "data only");
        assert_eq!(read_guest(&mem, &fr, TEXT_VA, TEXT_VA + TEXT_LEN as u64, DATA_LEN), data_bytes());
    }

    #[test]
    fn gap_pages_between_segments_are_plain_memory() {
        let mut e = valid();
        e.segs[2].vaddr = TEXT_VA + 0x4000;
        let (mem, _, fr, b) = build_valid(&e.emit(), 64);
        let f = check_mapping(&mem, &fr, &b);
        assert_eq!(&f[2..4], &[flags(true, true); 2]);
    }

    #[test]
    fn memory_too_small_at_the_exact_boundary() {
        let file = valid().emit();
        let image = parse_pv_image(&file).unwrap();
        let mut mem = FakeMachine::default();
        let err = build(&mut mem, &image, &file, &frames(3), &cfg(100)).unwrap_err();
        assert_eq!(err, BuildError::MemoryTooSmall { needed_pages: 16, have_pages: 3 });
        let err = build(&mut mem, &image, &file, &frames(15), &cfg(100)).unwrap_err();
        assert_eq!(err, BuildError::MemoryTooSmall { needed_pages: 16, have_pages: 15 });
        assert!(mem.frames.is_empty() && mem.entry_writes.is_empty(), "nothing written on error");
        let b = build(&mut mem, &image, &file, &frames(16), &cfg(100)).unwrap();
        assert_eq!(b.first_free_pfn, 16);
        assert_eq!(b.stack_top, TEXT_VA + 16 * PAGE);
        check_mapping(&mem, &frames(16), &b);
        assert!(build(&mut FakeMachine::default(), &image, &file, &[], &cfg(100)).is_err());

        // Past 512 pages the p2m and the L1s grow with the domain (see
        // pages_needed_is_the_smallest_fixed_point): the boundary still holds.
        let big = PvImage { virt_end: image.virt_base + 505 * PAGE, ..image.clone() };
        let need = pages_needed(&big).unwrap();
        let e = build(&mut FakeMachine::default(), &big, &file, &frames(need - 1), &cfg(10_000)).unwrap_err();
        assert_eq!(e, BuildError::MemoryTooSmall { needed_pages: need, have_pages: need - 1 });
        let e = build(&mut FakeMachine::default(), &big, &file, &frames(512), &cfg(10_000)).unwrap_err();
        assert_eq!(e, BuildError::MemoryTooSmall { needed_pages: need, have_pages: 512 });
        let mut mem = FakeMachine::default();
        let b = build(&mut mem, &big, &file, &frames(need), &cfg(10_000)).unwrap();
        assert_eq!((b.layout.p2m_pages, b.layout.tables.l1, b.first_free_pfn), (2, 2, need));
        check_mapping(&mem, &frames(need), &b);
    }

    #[test]
    fn caller_errors() {
        let file = valid().emit();
        let image = parse_pv_image(&file).unwrap();
        let mut mem = FakeMachine::default();
        let mut fr = frames(32);
        assert!(matches!(build(&mut mem, &image, &file, &fr, &cfg(31)), Err(BuildError::BadLayout(_))));
        assert_eq!(build(&mut mem, &image, &file[..file.len() - 1], &fr, &cfg(32)), Err(BuildError::Truncated));
        fr[20] = fr[3];
        assert!(matches!(build(&mut mem, &image, &file, &fr, &cfg(32)), Err(BuildError::BadLayout(_))));
        fr[20] = Mfn(1 << 40);
        assert!(matches!(build(&mut mem, &image, &file, &fr, &cfg(32)), Err(BuildError::BadLayout(_))));
        let odd = PvImage { virt_base: image.virt_base + 1, ..image.clone() };
        assert!(matches!(build(&mut mem, &odd, &file, &frames(32), &cfg(32)), Err(BuildError::BadLayout(_))));
        // A domain whose memory would run past the lower half.
        let high = PvImage {
            virt_base: LOWER_HALF_END - 0x8000,
            virt_end: LOWER_HALF_END - 0x3000,
            segments: image
                .segments
                .iter()
                .map(|s| Segment { vaddr: s.vaddr - TEXT_VA + LOWER_HALF_END - 0x8000, ..s.clone() })
                .collect(),
            ..image.clone()
        };
        assert!(matches!(build(&mut mem, &high, &file, &frames(32), &cfg(32)), Err(BuildError::BadLayout(_))));
        assert!(mem.frames.is_empty(), "nothing written on error");
    }

    #[test]
    fn error_messages_read_well() {
        let e = BuildError::MemoryTooSmall { needed_pages: 300, have_pages: 256 };
        assert_eq!(e.to_string(), "memory too small: the image and boot layout need 300 pages, the domain has 256");
        assert_eq!(
            BuildError::AbiMismatch { found: 2, expected: 1 }.to_string(),
            "kernel was built for microhv ABI 2, this hypervisor speaks ABI 1"
        );
        let all = [
            BuildError::NotElf,
            BuildError::Truncated,
            BuildError::WrongClass,
            BuildError::WrongEndian,
            BuildError::WrongArch,
            BuildError::NotExecutable,
            BuildError::NoPvNote,
            BuildError::NoLoadableSegments,
            BuildError::SegmentOutOfRange { vaddr: 1, memsz: 2 },
            BuildError::SegmentOverlap,
            BuildError::EntryOutsideImage(5),
            BuildError::BadLayout("x"),
            BuildError::Malformed("y"),
        ];
        for e in all {
            let s: String = e.to_string();
            assert!(!s.is_empty() && !s.contains('\n'));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn mutated_images_never_panic(
            header_edits in proptest::collection::vec((0usize..400, any::<u8>()), 0..8),
            any_edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let mut file = valid().emit();
            for (i, b) in header_edits {
                file[i] = b;
            }
            for (i, b) in any_edits {
                let i = i.index(file.len());
                file[i] = b;
            }
            if do_cut {
                file.truncate(cut.index(file.len()));
            }
            let _ = has_pv_note(&file);
            if let Ok(image) = parse_pv_image(&file) {
                prop_assert!(image.virt_base <= image.virt_end && image.virt_end <= LOWER_HALF_END);
                // Whatever parses must also build (or be refused cleanly).
                let fr = frames(48);
                let mut mem = FakeMachine::default();
                if let Ok(b) = build(&mut mem, &image, &file, &fr, &cfg(48)) {
                    prop_assert_eq!(b.nr_pages, 48);
                }
            }
        }
    }
}
