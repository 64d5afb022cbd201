//! Exit-handling tests against a fake guest CPU.

use super::*;
use crate::vmx::exit::decode;

#[derive(Default)]
struct FakeCpu {
    /// Guest-physical memory (sparse, byte-addressed).
    mem: std::collections::HashMap<u64, u8>,
    gpr: [u64; 16],
    rip: u64,
    len: u64,
    cr: [u64; 5],
    efer: u64,
    fs: u64,
    injected: Vec<(u8, Option<u32>)>,
}

impl GuestCpu for FakeCpu {
    fn gpr(&self, n: u8) -> u64 {
        self.gpr[n as usize & 15]
    }
    fn set_gpr(&mut self, n: u8, v: u64) {
        self.gpr[n as usize & 15] = v;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn code_segment(&self) -> (u64, bool) {
        (0, self.efer & EFER_LMA != 0)
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            match self.mem.get(&(gpa + i as u64)) {
                Some(v) => *b = *v,
                None => return false,
            }
        }
        true
    }
    fn skip_instruction(&mut self) {
        self.rip += self.len;
    }
    fn cr(&self, n: u8) -> u64 {
        self.cr.get(n as usize).copied().unwrap_or(0)
    }
    fn set_cr(&mut self, n: u8, v: u64) -> Result<(), GpFault> {
        if n == 0 {
            self.efer = paging_transition(v, self.cr[4], self.efer)?;
        }
        *self.cr.get_mut(n as usize).ok_or(GpFault)? = v;
        Ok(())
    }
    fn msr(&self, m: CpuMsr) -> u64 {
        match m {
            CpuMsr::Efer => self.efer,
            CpuMsr::FsBase => self.fs,
            _ => 0,
        }
    }
    fn set_msr(&mut self, m: CpuMsr, v: u64) {
        match m {
            CpuMsr::Efer => self.efer = v,
            CpuMsr::FsBase => self.fs = v,
            _ => {}
        }
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push((vector, error_code));
    }
    fn host_cpuid(&self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
        [0x11, 0x22, 0x33 | cpuid::LEAF1_ECX_VMX, 0x44]
    }
    fn tsc(&self) -> u64 {
        12345
    }
}

fn cpu() -> FakeCpu {
    FakeCpu { rip: 0x1000, len: 2, ..Default::default() }
}

fn plat() -> Platform {
    Platform::new(CpuidPolicy { tsc_khz: 1_000_000, apic_timer_khz: 100_000, evtchn_vector: EVTCHN_VECTOR, shared_info_gfn: 2047, domid: 1, store_gfn: 0, store_port: 0 })
}

/// An I/O exit as the hardware reports it (qualification layout, SDM table 28-5).
fn io(port: u16, size: u8, write: bool) -> VmExit {
    let q = (port as u64) << 16 | (size as u64 - 1) | if write { 0 } else { 8 };
    decode(30, q, 0, 0, 0)
}

#[test]
fn uart_output_is_collected_and_rip_advances() {
    let (mut c, mut p) = (cpu(), plat());
    for b in b"hi\n" {
        c.gpr[0] = 0xdead_0000 | *b as u64;
        assert_eq!(handle_exit(&mut c, &mut p, io(0x3f8, 1, true), 0), Action::Resume);
    }
    assert_eq!(p.output, b"hi\n");
    assert_eq!(c.rip, 0x1006);
    c.gpr[0] = 0xffff_ffff_ffff_ff00;
    handle_exit(&mut c, &mut p, io(0x3fd, 1, false), 0);
    assert_eq!(c.gpr[0], 0xffff_ffff_ffff_ff60, "8-bit IN merges into AL: LSR says THR empty");
}

#[test]
fn port_f4_powers_off_with_the_code() {
    let (mut c, mut p) = (cpu(), plat());
    c.gpr[0] = 0x1_0003;
    assert_eq!(handle_exit(&mut c, &mut p, io(0xf4, 1, true), 0), Action::PowerOff(3));
    c.gpr[0] = 0x1_0003;
    assert_eq!(handle_exit(&mut c, &mut p, io(0xf4, 4, true), 0), Action::PowerOff(0x1_0003));
}

#[test]
fn unknown_ports_read_all_ones_and_are_logged_a_few_times() {
    let (mut c, mut p) = (cpu(), plat());
    c.gpr[0] = 0x1234_5678_0000_0000;
    assert_eq!(handle_exit(&mut c, &mut p, io(0x1234, 4, false), 0), Action::Resume);
    assert_eq!(c.gpr[0], 0xffff_ffff, "32-bit IN zero-extends");
    for _ in 0..20 {
        handle_exit(&mut c, &mut p, io(0x5555, 2, true), 0);
    }
    assert_eq!(p.stats.unknown_ports, 21);
    assert_eq!(p.notes.len(), LOG_LIMIT as usize);
    assert!(p.notes[0].contains("0x1234"));
}

#[test]
fn string_io_ends_the_guest() {
    let (mut c, mut p) = (cpu(), plat());
    let q = (0x3f8u64 << 16) | (1 << 4);
    assert!(matches!(handle_exit(&mut c, &mut p, decode(30, q, 0, 0, 0), 0), Action::Kill(_)));
}

#[test]
fn cpuid_goes_through_the_policy() {
    let (mut c, mut p) = (cpu(), plat());
    c.gpr[0] = 1;
    handle_exit(&mut c, &mut p, decode(10, 0, 0, 0, 0), 0);
    assert_eq!(c.gpr[1] as u32 & cpuid::LEAF1_ECX_VMX, 0);
    assert_ne!(c.gpr[1] as u32 & cpuid::LEAF1_ECX_HYPERVISOR, 0);
    c.gpr[0] = cpuid::HV_LEAF_TIMING as u64;
    handle_exit(&mut c, &mut p, decode(10, 0, 0, 0, 0), 0);
    assert_eq!((c.gpr[0], c.gpr[3]), (1_000_000, 100_000));
    assert_eq!(c.rip, 0x1004);
}

#[test]
fn msrs_efer_apic_and_unknown() {
    let (mut c, mut p) = (cpu(), plat());
    // WRMSR EFER.LME, then read it back.
    c.gpr[1] = 0xc000_0080;
    c.gpr[0] = EFER_LME;
    c.gpr[2] = 0;
    assert_eq!(handle_exit(&mut c, &mut p, decode(32, 0, 0, 0, 0), 0), Action::Resume);
    assert_eq!(c.efer, EFER_LME);
    c.gpr[0] = 0;
    handle_exit(&mut c, &mut p, decode(31, 0, 0, 0, 0), 0);
    assert_eq!(c.gpr[0], EFER_LME);
    // Reserved EFER bit: #GP, RIP unchanged.
    let rip = c.rip;
    c.gpr[0] = 1 << 3;
    handle_exit(&mut c, &mut p, decode(32, 0, 0, 0, 0), 0);
    assert_eq!(c.injected, vec![(VEC_GP, Some(0))]);
    assert_eq!(c.rip, rip);
    // APIC base says x2APIC enabled.
    c.gpr[1] = 0x1b;
    handle_exit(&mut c, &mut p, decode(31, 0, 0, 0, 0), 0);
    assert_eq!(c.gpr[0], APIC_BASE_VALUE);
    // Unknown MSR: #GP and a note.
    c.gpr[1] = 0xdead;
    handle_exit(&mut c, &mut p, decode(31, 0, 0, 0, 0), 0);
    assert_eq!(c.injected.len(), 2);
    assert_eq!(p.stats.unknown_msrs, 2, "the bad EFER write and the unknown MSR");
    assert!(p.notes[1].contains("0xdead"));
    // A non-canonical FS base faults.
    c.gpr[1] = 0xc000_0100;
    c.gpr[0] = 0;
    c.gpr[2] = 0x8000;
    handle_exit(&mut c, &mut p, decode(32, 0, 0, 0, 0), 0);
    assert_eq!(c.injected.len(), 3);
}

#[test]
fn x2apic_timer_through_wrmsr() {
    let (mut c, mut p) = (cpu(), plat());
    let wr = |c: &mut FakeCpu, p: &mut Platform, msr: u32, v: u64| {
        c.gpr[1] = msr as u64;
        c.gpr[0] = v & 0xffff_ffff;
        c.gpr[2] = v >> 32;
        handle_exit(c, p, decode(32, 0, 0, 0, 0), 1000)
    };
    wr(&mut c, &mut p, 0x80f, 0x1ff);
    wr(&mut c, &mut p, 0x83e, 0b1011);
    wr(&mut c, &mut p, 0x832, 0x30);
    wr(&mut c, &mut p, 0x838, 100);
    assert_eq!(p.lapic.deadline(), Some(1000 + 1000));
    assert!(c.injected.is_empty());
}

#[test]
fn xapic_accesses_are_decoded_and_emulated() {
    let (mut c, mut p) = (cpu(), plat());
    // Paging off (32-bit protected mode): linear = physical.
    c.cr[0] = 1;
    let code = [
        0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe, 0xff, 0x01, 0x00, 0x00, // mov dword [0xfee000f0], 0x1ff
        0x8b, 0x0d, 0x30, 0x00, 0xe0, 0xfe, // mov ecx, [0xfee00030]
        0x0f, 0x0b, // ud2: not a MOV
    ];
    for (i, b) in code.iter().enumerate() {
        c.mem.insert(0x1000 + i as u64, *b);
    }
    c.rip = 0x1000;
    let ept = |gpa: u64, write: bool| decode(48, if write { 2 } else { 1 }, gpa, 0, 0);
    assert_eq!(handle_exit(&mut c, &mut p, ept(0xfee0_00f0, true), 0), Action::Resume);
    assert!(p.lapic.enabled());
    assert_eq!(c.rip, 0x100a);
    assert_eq!(handle_exit(&mut c, &mut p, ept(0xfee0_0030, false), 0), Action::Resume);
    assert_eq!(c.gpr[1] & 0xff, 0x14, "version register");
    assert_eq!(c.rip, 0x1010);
    match handle_exit(&mut c, &mut p, ept(0xfee0_0030, false), 0) {
        Action::Kill(why) => assert!(why.contains("not emulated"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Code the guest cannot even reach (RIP outside its memory): ended too.
    c.rip = 0x9999_0000;
    assert!(matches!(handle_exit(&mut c, &mut p, ept(0xfee0_0030, false), 0), Action::Kill(_)));
    // Other MMIO addresses stay fatal.
    c.rip = 0x1000;
    assert!(matches!(handle_exit(&mut c, &mut p, ept(0xfec0_0000, true), 0), Action::Kill(_)));
    assert_eq!(p.stats.mmio, 4);
}

#[test]
fn cr8_is_the_task_priority() {
    let (mut c, mut p) = (cpu(), plat());
    c.gpr[3] = 4;
    // MOV CR8, RBX; then MOV RAX, CR8.
    assert_eq!(handle_exit(&mut c, &mut p, decode(28, 8 | 3 << 8, 0, 0, 0), 0), Action::Resume);
    assert_eq!(p.lapic.read_msr(0x808, 0), Ok(0x40));
    handle_exit(&mut c, &mut p, decode(28, 8 | 1 << 4, 0, 0, 0), 0);
    assert_eq!(c.gpr[0], 4);
    // Reserved bits: #GP.
    c.gpr[3] = 16;
    handle_exit(&mut c, &mut p, decode(28, 8 | 3 << 8, 0, 0, 0), 0);
    assert_eq!(c.injected, vec![(VEC_GP, Some(0))]);
}

#[test]
fn long_mode_switch_rules() {
    assert_eq!(paging_transition(CR0_PG, 0, 0), Err(GpFault), "PG without PE");
    assert_eq!(paging_transition(CR0_PG | CR0_PE, 0, EFER_LME), Err(GpFault), "long mode without PAE");
    assert_eq!(paging_transition(CR0_PG | CR0_PE, CR4_PAE, EFER_LME), Ok(EFER_LME | EFER_LMA));
    assert_eq!(paging_transition(CR0_PE, CR4_PAE, EFER_LME | EFER_LMA), Ok(EFER_LME));
    assert_eq!(efer_write(EFER_LME | EFER_LMA, EFER_LME | EFER_NXE, true), Ok(EFER_LME | EFER_LMA | EFER_NXE));
    assert_eq!(efer_write(EFER_LME | EFER_LMA, 0, true), Err(GpFault), "LME cannot change with paging on");
    // Through the CR-access exit: MOV CR0, RBX (gpr 3).
    let (mut c, mut p) = (cpu(), plat());
    c.cr[4] = CR4_PAE;
    c.efer = EFER_LME;
    c.gpr[3] = CR0_PG | CR0_PE;
    let q = 3 << 8; // MOV to CR0 from RBX
    assert_eq!(handle_exit(&mut c, &mut p, decode(28, q, 0, 0, 0), 0), Action::Resume);
    assert_eq!(c.efer & EFER_LMA, EFER_LMA);
    // MOV RAX, CR0 (mov from): qualification kind 1.
    let q = 1 << 4;
    handle_exit(&mut c, &mut p, decode(28, q, 0, 0, 0), 0);
    assert_eq!(c.gpr[0], CR0_PG | CR0_PE);
}

#[test]
fn fatal_exits_end_the_guest_with_reasons() {
    let (mut c, mut p) = (cpu(), plat());
    let kill = |a: Action| match a {
        Action::Kill(why) => why,
        other => panic!("expected Kill, got {other:?}"),
    };
    assert!(kill(handle_exit(&mut c, &mut p, decode(2, 0, 0, 0, 0), 0)).contains("triple fault"));
    assert!(kill(handle_exit(&mut c, &mut p, decode(48, 2, 0xfec0_0000, 0, 0), 0)).contains("write at guest-physical 0xfec00000"));
    assert!(kill(handle_exit(&mut c, &mut p, decode(33 | 1 << 31, 0, 0, 0, 0), 0)).contains("VM entry failed"));
    assert!(kill(handle_exit(&mut c, &mut p, decode(9, 0, 0, 0, 0), 0)).contains("unsupported VM exit (reason 9"));
    assert_eq!(handle_exit(&mut c, &mut p, decode(12, 0, 0, 0, 0), 0), Action::Halt);
    assert_eq!(handle_exit(&mut c, &mut p, decode(18, 0, 0, 0, 0), 0), Action::Vmcall);
}

#[test]
fn every_exit_reason_and_qualification_is_handled_without_panicking() {
    let (mut c, mut p) = (cpu(), plat());
    for reason in 0..70u32 {
        for q in [0u64, 1, 0x10, 0x20, 0x30, 0xffff_ffff_ffff_ffff, 0x3f8_0000] {
            for g in [0u64, u64::MAX] {
                c.gpr = [g; 16];
                let _ = handle_exit(&mut c, &mut p, decode(reason, q, g, 0x8000_0b0e, 7), g);
            }
        }
    }
}
