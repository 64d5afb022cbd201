//! Memory-mapped I/O for HVM guests: what an EPT violation needs to be
//! emulated instead of fatal. The guest's instruction is fetched through its
//! own page tables ([`guest_to_phys`]) and decoded ([`decode_mov`]); only the
//! plain `MOV` forms that compilers emit for device registers are
//! understood, anything else stays fatal. Today the one MMIO device is the
//! local APIC page at 0xfee00000 (xAPIC mode, see `VLapic::read_mmio`).

/// The xAPIC register page.
pub const APIC_MMIO_BASE: u64 = 0xfee0_0000;

const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Paging state needed to walk the guest's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Guest-linear to guest-physical through the guest's tables: no paging,
/// 4-level long-mode paging (4 KiB, 2 MiB, 1 GiB pages) or 32-bit paging
/// (4 KiB and, with CR4.PSE, 4 MiB pages). `read` reads a guest-physical
/// 8-byte word (None outside guest memory). PAE paging outside long mode is
/// not offered to guests, so it is not walked.
pub fn guest_to_phys(p: Paging, la: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    if p.cr0 & super::CR0_PG == 0 {
        return Some(la & 0xffff_ffff);
    }
    if p.efer & super::EFER_LMA != 0 {
        let mut table = p.cr3 & ADDR;
        for level in (1..=4).rev() {
            let idx = (la >> (12 + 9 * (level - 1))) & 0x1ff;
            let e = read(table + idx * 8)?;
            if e & PTE_P == 0 {
                return None;
            }
            if (level == 2 || level == 3) && e & PTE_PS != 0 {
                let size = 1u64 << (12 + 9 * (level - 1));
                return Some((e & ADDR & !(size - 1)) | (la & (size - 1)));
            }
            table = e & ADDR;
        }
        return Some(table | (la & 0xfff));
    }
    if p.cr4 & super::CR4_PAE != 0 {
        return None;
    }
    let la = la & 0xffff_ffff;
    let pde = read(((p.cr3 & 0xffff_f000) + ((la >> 22) << 2)) & !7)? >> (if (la >> 22) & 1 == 1 { 32 } else { 0 }) & 0xffff_ffff;
    if pde & PTE_P == 0 {
        return None;
    }
    if pde & PTE_PS != 0 && p.cr4 & (1 << 4) != 0 {
        return Some((pde & 0xffc0_0000) | (la & 0x3f_ffff));
    }
    let pt = pde & 0xffff_f000;
    let idx = (la >> 12) & 0x3ff;
    let pte = read((pt + idx * 4) & !7)? >> (if idx & 1 == 1 { 32 } else { 0 }) & 0xffff_ffff;
    if pte & PTE_P == 0 {
        return None;
    }
    Some((pte & 0xffff_f000) | (la & 0xfff))
}

/// What a decoded instruction does to the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// `MOV reg, [mem]`: load `size` bytes into GPR `reg` (zero-extended for
    /// 4 bytes in 64-bit mode, merged for 1 and 2).
    Load { reg: u8, size: u8 },
    /// `MOV [mem], reg`: store the low `size` bytes of GPR `reg`.
    StoreReg { reg: u8, size: u8 },
    /// `MOV [mem], imm`: store an immediate.
    StoreImm { value: u32, size: u8 },
}

/// A decoded instruction and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub op: MmioOp,
    pub len: u8,
}

/// Decodes the `MOV` forms used for device registers: 88/89 (store r8 /
/// r16/32/64), 8A/8B (load), C6/C7 /0 (store immediate), with an operand-size
/// prefix (66) and, in 64-bit code, REX. Memory operands only (ModRM.mod !=
/// 3), any addressing form (SIB, displacements, RIP-relative): the address
/// itself comes from the exit. `long` is true for 64-bit code (CS.L).
/// Returns None for anything else, never panics.
pub fn decode_mov(bytes: &[u8], long: bool) -> Option<Decoded> {
    let mut i = 0;
    let mut opsize16 = false;
    let mut rex = 0u8;
    while i < bytes.len() && i < 4 {
        match bytes[i] {
            0x66 => opsize16 = true,
            // Segment overrides change the address, which the exit already gives.
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            _ => break,
        }
        i += 1;
    }
    if long && (0x40..=0x4f).contains(bytes.get(i)?) {
        rex = bytes[i];
        i += 1;
    }
    let opcode = *bytes.get(i)?;
    i += 1;
    let modrm = *bytes.get(i)?;
    i += 1;
    let mode = modrm >> 6;
    let reg = ((modrm >> 3) & 7) | if rex & 4 != 0 { 8 } else { 0 };
    let rm = modrm & 7;
    if mode == 3 {
        return None;
    }
    // Addressing bytes: SIB, then the displacement.
    let mut disp = match mode {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *bytes.get(i)?;
        i += 1;
        if mode == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if mode == 0 && rm == 5 {
        disp = 4;
    }
    i += disp;
    let wide = if rex & 8 != 0 { 8 } else if opsize16 { 2 } else { 4 };
    let op = match opcode {
        0x88 => MmioOp::StoreReg { reg, size: 1 },
        0x89 => MmioOp::StoreReg { reg, size: wide },
        0x8a => MmioOp::Load { reg, size: 1 },
        0x8b => MmioOp::Load { reg, size: wide },
        0xc6 | 0xc7 if (modrm >> 3) & 7 == 0 => {
            let n = if opcode == 0xc6 { 1 } else if opsize16 { 2 } else { 4 };
            let imm = bytes.get(i..i + n)?;
            i += n;
            let mut v = [0u8; 4];
            v[..n].copy_from_slice(imm);
            let value = u32::from_le_bytes(v);
            // A 64-bit store of a sign-extended imm32 is wider than any APIC register: refused.
            if rex & 8 != 0 {
                return None;
            }
            MmioOp::StoreImm { value, size: n as u8 }
        }
        _ => return None,
    };
    if i > bytes.len() || i > 15 {
        return None;
    }
    // 8-bit registers 4..7 without REX are AH..BH: not supported.
    if let MmioOp::Load { reg, size: 1 } | MmioOp::StoreReg { reg, size: 1 } = op {
        if rex == 0 && (4..8).contains(&reg) {
            return None;
        }
    }
    Some(Decoded { op, len: i as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn decodes_the_usual_apic_accesses() {
        // mov dword [rax + 0xb0], 0  (EOI)
        assert_eq!(
            decode_mov(&[0xc7, 0x80, 0xb0, 0, 0, 0, 0, 0, 0, 0], true),
            Some(Decoded { op: MmioOp::StoreImm { value: 0, size: 4 }, len: 10 })
        );
        // mov [rdi + 0x380], esi
        assert_eq!(decode_mov(&[0x89, 0xb7, 0x80, 3, 0, 0], true), Some(Decoded { op: MmioOp::StoreReg { reg: 6, size: 4 }, len: 6 }));
        // mov eax, [rcx + rdx*1 + 0x20]  (SIB + disp8)
        assert_eq!(decode_mov(&[0x8b, 0x44, 0x11, 0x20], true), Some(Decoded { op: MmioOp::Load { reg: 0, size: 4 }, len: 4 }));
        // mov r9d, [rip + disp32]
        assert_eq!(decode_mov(&[0x44, 0x8b, 0x0d, 1, 2, 3, 4], true), Some(Decoded { op: MmioOp::Load { reg: 9, size: 4 }, len: 7 }));
        // mov [0xfee000b0], eax in 32-bit code (mod 0, rm 5: disp32)
        assert_eq!(decode_mov(&[0x89, 0x05, 0xb0, 0, 0xe0, 0xfe], false), Some(Decoded { op: MmioOp::StoreReg { reg: 0, size: 4 }, len: 6 }));
        // mov ax, [rbx] with 66
        assert_eq!(decode_mov(&[0x66, 0x8b, 0x03], true), Some(Decoded { op: MmioOp::Load { reg: 0, size: 2 }, len: 3 }));
        // mov rax, [rbx]: 8 bytes
        assert_eq!(decode_mov(&[0x48, 0x8b, 0x03], true), Some(Decoded { op: MmioOp::Load { reg: 0, size: 8 }, len: 3 }));
        // SIB with no base (mod 0, base 5): disp32 follows.
        assert_eq!(decode_mov(&[0x8b, 0x04, 0x25, 0xb0, 0, 0xe0, 0xfe], true), Some(Decoded { op: MmioOp::Load { reg: 0, size: 4 }, len: 7 }));
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(decode_mov(&[0x89, 0xc0], true), None, "register to register");
        assert_eq!(decode_mov(&[0x01, 0x03], true), None, "add");
        assert_eq!(decode_mov(&[0xc7, 0x08, 0, 0, 0, 0], true), None, "C7 /1");
        assert_eq!(decode_mov(&[0x8a, 0x23], true), None, "AH");
        assert_eq!(decode_mov(&[0x8b], true), None, "truncated");
        assert_eq!(decode_mov(&[0xc7, 0x80, 0xb0, 0, 0], true), None, "truncated displacement");
        assert_eq!(decode_mov(&[], false), None);
        for a in 0..=255u8 {
            for b in [0u8, 0x05, 0x44, 0x80, 0xc0, 0xff] {
                let _ = decode_mov(&[a, b, 0x25, 1, 2], true);
                let _ = decode_mov(&[0x66, a, b], false);
            }
        }
    }

    fn mem(words: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
        let m: HashMap<u64, u64> = words.iter().copied().collect();
        move |a| m.get(&a).copied().or(Some(0))
    }

    #[test]
    fn walks_long_mode_tables() {
        let p = Paging { cr0: super::super::CR0_PG | 1, cr3: 0x1000, cr4: super::super::CR4_PAE, efer: super::super::EFER_LMA };
        // 0xfee00000: PML4[0] -> 0x2000; PDPT[3] -> 0x3000; PD[503] = 2 MiB page.
        let m = mem(&[(0x1000, 0x2003), (0x2000 + 3 * 8, 0x3003), (0x3000 + 503 * 8, 0xfee0_0000 | 0x9b)]);
        assert_eq!(guest_to_phys(p, 0xfee0_00b0, &m), Some(0xfee0_00b0));
        assert_eq!(guest_to_phys(p, 0x1234_5678, &m), None, "not present");
        // A 4 KiB mapping through a PT.
        let m = mem(&[(0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x4000 + 5 * 8, 0x7000 | 3)]);
        assert_eq!(guest_to_phys(p, 0x5123, &m), Some(0x7123));
        // No paging: linear is physical.
        assert_eq!(guest_to_phys(Paging { cr0: 1, cr3: 0, cr4: 0, efer: 0 }, 0xfee0_0020, &m), Some(0xfee0_0020));
    }

    #[test]
    fn walks_32_bit_tables() {
        let p = Paging { cr0: super::super::CR0_PG | 1, cr3: 0x1000, cr4: 1 << 4, efer: 0 };
        // PDE 0x3fb (for 0xfec00000) is a 4 MiB page; PDE 1 points at a PT at 0x5000.
        let pde_hi = 0x3fbu64;
        let m = mem(&[((0x1000 + pde_hi * 4) & !7, (0xfec0_0083u64) << 32), ((0x1000 + 4) & !7, 0x5003 << 32), (0x5000 + 8, 0x9003)]);
        assert_eq!(guest_to_phys(p, 0xfee0_00b0, &m), Some(0xfee0_00b0));
        assert_eq!(guest_to_phys(p, 0x0040_2010, &m), Some(0x9010));
    }
}
