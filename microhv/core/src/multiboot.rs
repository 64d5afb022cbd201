//! Reading the multiboot1 information structure that QEMU or GRUB leave us.
//!
//! The structure lives in guest-physical memory; the reader goes through the
//! [`PhysMem`] trait so that tests can hand it a fake memory. Every length
//! and count that comes from the boot loader is bounded before use.

use crate::range::Range;

/// Magic value in EAX when a multiboot1 loader enters the kernel.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

const FLAG_MEM: u32 = 1 << 0;
const FLAG_CMDLINE: u32 = 1 << 2;
const FLAG_MODS: u32 = 1 << 3;
const FLAG_MMAP: u32 = 1 << 6;
const FLAG_LOADER_NAME: u32 = 1 << 9;

/// Upper bounds on what we accept from the loader.
pub const MAX_MODULES: usize = 32;
pub const MAX_STRING: usize = 256;
pub const MAX_MMAP_BYTES: usize = 4096;

/// Read access to physical memory.
pub trait PhysMem {
    /// Copies `buf.len()` bytes from physical address `addr`; false if not readable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    BadMagic(u32),
    Unreadable(&'static str),
    NoMemoryMap,
    TooManyModules(u32),
    MmapTooLarge(u32),
}

/// A NUL-terminated string copied out of the boot info (truncated to `MAX_STRING`).
#[derive(Clone, Copy)]
pub struct BootString {
    bytes: [u8; MAX_STRING],
    len: usize,
}

impl BootString {
    pub const fn empty() -> Self {
        BootString { bytes: [0; MAX_STRING], len: 0 }
    }
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.bytes[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl core::fmt::Debug for BootString {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

fn read_string<M: PhysMem>(mem: &M, addr: u64) -> BootString {
    let mut s = BootString::empty();
    let mut byte = [0u8; 1];
    while s.len < MAX_STRING {
        if !mem.read(addr + s.len as u64, &mut byte) || byte[0] == 0 {
            break;
        }
        s.bytes[s.len] = byte[0];
        s.len += 1;
    }
    s
}

/// One boot module (an ELF image or a file handed to Dom0).
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub range: Range,
    pub name: BootString,
}

/// What microhv keeps from the multiboot information structure.
pub struct BootInfo {
    pub cmdline: BootString,
    pub loader_name: BootString,
    pub mem_lower_kib: u32,
    pub mem_upper_kib: u32,
    pub mmap_addr: u64,
    pub mmap_len: usize,
    pub modules: [Option<Module>; MAX_MODULES],
    pub module_count: usize,
}

impl BootInfo {
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().take(self.module_count).flatten()
    }

    /// Reads the info structure at `mbi_addr`; `magic` is what the loader put in EAX.
    pub fn read<M: PhysMem>(mem: &M, magic: u32, mbi_addr: u64) -> Result<Self, BootInfoError> {
        if magic != BOOTLOADER_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let mut hdr = [0u8; 72];
        if !mem.read(mbi_addr, &mut hdr) {
            return Err(BootInfoError::Unreadable("multiboot info"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
        let flags = u32_at(0);
        let mut info = BootInfo {
            cmdline: BootString::empty(),
            loader_name: BootString::empty(),
            mem_lower_kib: 0,
            mem_upper_kib: 0,
            mmap_addr: 0,
            mmap_len: 0,
            modules: [None; MAX_MODULES],
            module_count: 0,
        };
        if flags & FLAG_MEM != 0 {
            info.mem_lower_kib = u32_at(4);
            info.mem_upper_kib = u32_at(8);
        }
        if flags & FLAG_CMDLINE != 0 {
            info.cmdline = read_string(mem, u32_at(16) as u64);
        }
        if flags & FLAG_LOADER_NAME != 0 {
            info.loader_name = read_string(mem, u32_at(64) as u64);
        }
        if flags & FLAG_MMAP == 0 {
            return Err(BootInfoError::NoMemoryMap);
        }
        let mmap_len = u32_at(44);
        if mmap_len as usize > MAX_MMAP_BYTES {
            return Err(BootInfoError::MmapTooLarge(mmap_len));
        }
        info.mmap_len = mmap_len as usize;
        info.mmap_addr = u32_at(48) as u64;
        if flags & FLAG_MODS != 0 {
            let count = u32_at(20);
            if count as usize > MAX_MODULES {
                return Err(BootInfoError::TooManyModules(count));
            }
            let base = u32_at(24) as u64;
            for i in 0..count as usize {
                let mut m = [0u8; 16];
                if !mem.read(base + 16 * i as u64, &mut m) {
                    return Err(BootInfoError::Unreadable("module list"));
                }
                let f = |o: usize| u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]]) as u64;
                let (start, end) = (f(0), f(4));
                info.modules[i] = Some(Module {
                    range: Range::new(start, end.max(start)),
                    name: read_string(mem, f(8)),
                });
            }
            info.module_count = count as usize;
        }
        Ok(info)
    }

    /// Copies the raw memory map into `buf` (at most `MAX_MMAP_BYTES`).
    pub fn read_mmap<'b, M: PhysMem>(&self, mem: &M, buf: &'b mut [u8; MAX_MMAP_BYTES]) -> Result<&'b [u8], BootInfoError> {
        let out = &mut buf[..self.mmap_len];
        if !mem.read(self.mmap_addr, out) {
            return Err(BootInfoError::Unreadable("memory map"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeMem(Vec<u8>);
    impl PhysMem for FakeMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let a = addr as usize;
            match self.0.get(a..a + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn put32(m: &mut [u8], at: usize, v: u32) {
        m[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn image() -> FakeMem {
        let mut m = vec![0u8; 0x2000];
        put32(&mut m, 0, FLAG_MEM | FLAG_CMDLINE | FLAG_MODS | FLAG_MMAP | FLAG_LOADER_NAME);
        put32(&mut m, 4, 639);
        put32(&mut m, 8, 130048);
        put32(&mut m, 16, 0x400);
        m[0x400..0x40c].copy_from_slice(b"loglevel=dbg");
        put32(&mut m, 20, 2);
        put32(&mut m, 24, 0x500);
        for (i, (s, e, name)) in [(0x100000u32, 0x180000u32, 0x600u32), (0x180000, 0x1a0000, 0x610)].iter().enumerate() {
            put32(&mut m, 0x500 + 16 * i, *s);
            put32(&mut m, 0x504 + 16 * i, *e);
            put32(&mut m, 0x508 + 16 * i, *name);
        }
        m[0x600..0x608].copy_from_slice(b"dom0.elf");
        m[0x610..0x618].copy_from_slice(b"domu.elf");
        put32(&mut m, 44, 48);
        put32(&mut m, 48, 0x700);
        put32(&mut m, 64, 0x800);
        m[0x800..0x804].copy_from_slice(b"QEMU");
        FakeMem(m)
    }

    #[test]
    fn reads_cmdline_modules_and_mmap_location() {
        let mem = image();
        let info = BootInfo::read(&mem, BOOTLOADER_MAGIC, 0).unwrap();
        assert_eq!(info.cmdline.as_str(), "loglevel=dbg");
        assert_eq!(info.loader_name.as_str(), "QEMU");
        let mods: Vec<_> = info.modules().collect();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].name.as_str(), "dom0.elf");
        assert_eq!(mods[1].range, Range::new(0x180000, 0x1a0000));
        assert_eq!(info.mmap_len, 48);
        let mut buf = [0u8; MAX_MMAP_BYTES];
        assert_eq!(info.read_mmap(&mem, &mut buf).unwrap().len(), 48);
    }

    #[test]
    fn rejects_bad_magic_and_absurd_counts() {
        let mut mem = image();
        assert_eq!(BootInfo::read(&mem, 0x1234, 0).err(), Some(BootInfoError::BadMagic(0x1234)));
        put32(&mut mem.0, 20, 10_000);
        assert_eq!(BootInfo::read(&mem, BOOTLOADER_MAGIC, 0).err(), Some(BootInfoError::TooManyModules(10_000)));
        put32(&mut mem.0, 20, 2);
        put32(&mut mem.0, 44, 1 << 20);
        assert!(matches!(BootInfo::read(&mem, BOOTLOADER_MAGIC, 0), Err(BootInfoError::MmapTooLarge(_))));
        put32(&mut mem.0, 0, 0);
        assert_eq!(BootInfo::read(&mem, BOOTLOADER_MAGIC, 0).err(), Some(BootInfoError::NoMemoryMap));
    }

    #[test]
    fn unterminated_strings_are_bounded() {
        let mut mem = image();
        for b in &mut mem.0[0x400..0x400 + 2 * MAX_STRING] {
            *b = b'a';
        }
        let info = BootInfo::read(&mem, BOOTLOADER_MAGIC, 0).unwrap();
        assert_eq!(info.cmdline.as_str().len(), MAX_STRING);
    }
}
