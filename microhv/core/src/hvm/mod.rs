//! The HVM platform: what an unmodified guest in VMX non-root mode sees
//! besides its memory, and what each VM exit does to it. Vendor-neutral and
//! host-tested: the kernel's VT-x backend implements [`GuestCpu`] over the
//! VMCS and its saved registers, decodes the exit into
//! [`VmExit`](crate::vmx::VmExit) and calls [`handle_exit`]; an AMD SVM
//! backend would do the same over a VMCB.
//!
//! Devices: a 16550 UART at 0x3f8 ([`uart`]), the local APIC in x2APIC mode
//! ([`lapic`]), the PICs (masked, never deliver) and the PIT ([`legacy`]),
//! and port 0xf4, where a write powers the guest off with that exit code
//! (as QEMU's isa-debug-exit does). The APIC also answers at its xAPIC
//! address 0xfee00000: such accesses are EPT violations, emulated by
//! decoding the guest's `MOV` ([`mmio`]). Unknown ports read as all ones and
//! ignore writes; unknown MSRs raise #GP in the guest; both are counted and
//! the first few are logged. [`loader`] puts a multiboot kernel in memory.

pub mod lapic;
pub mod legacy;
pub mod loader;
pub mod mmio;
pub mod uart;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::vmx::cpuid::{self, CpuidPolicy};
use crate::vmx::{CrAccessKind, VmExit};
use lapic::{GpFault, VLapic};
use legacy::{Pic, Pit};
use uart::{Uart16550, COM1_BASE};

/// The vector on which event-channel upcalls reach an HVM guest (reported
/// in CPUID leaf 0x4000_0001 EBX, with the `shared_info` frame in ECX).
pub const EVTCHN_VECTOR: u8 = 0xf3;

/// Port where a write ends the guest with that value as its exit code.
pub const POWEROFF_PORT: u16 = 0xf4;
/// How many unknown port / MSR accesses are logged (the rest are counted).
pub const LOG_LIMIT: u32 = 8;

/// Exception vectors the platform injects.
pub const VEC_UD: u8 = 6;
pub const VEC_GP: u8 = 13;

/// MSRs that live in the vendor's guest-state area (VMCS / VMCB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMsr {
    Efer,
    FsBase,
    GsBase,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
}

/// EFER bits a guest may set: SCE, LME, LMA (read-only), NXE.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
const EFER_ALLOWED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;

/// The guest's CPU as the exit handler needs it. The backend keeps the
/// vendor details (shadows, fixed bits, entry controls).
pub trait GuestCpu {
    /// General-purpose register `n` (0 = RAX .. 15 = R15; 4 = RSP).
    fn gpr(&self, n: u8) -> u64;
    fn set_gpr(&mut self, n: u8, v: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, rip: u64);
    /// CS base and whether CS is a 64-bit code segment (CS.L).
    fn code_segment(&self) -> (u64, bool);
    /// Reads guest-physical memory (the guest's own RAM only); false when
    /// any byte is outside it.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Moves RIP past the instruction that exited.
    fn skip_instruction(&mut self);
    /// Control register `n` as the guest sees it.
    fn cr(&self, n: u8) -> u64;
    /// MOV to CR `n`; the backend applies it (long-mode switch included,
    /// see [`paging_transition`]) or refuses it with #GP.
    fn set_cr(&mut self, n: u8, v: u64) -> Result<(), GpFault>;
    fn msr(&self, m: CpuMsr) -> u64;
    fn set_msr(&mut self, m: CpuMsr, v: u64);
    /// Queues a hardware exception for the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// The real CPU's CPUID answer.
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The time-stamp counter as the guest sees it.
    fn tsc(&self) -> u64;
}

/// What the kernel must do after [`handle_exit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again (after injecting what is pending).
    Resume,
    /// HLT: block the vCPU until its next interrupt.
    Halt,
    /// A host interrupt arrived (the kernel acknowledges it).
    ExternalInterrupt,
    /// The guest can take an interrupt now.
    InterruptWindow,
    /// The preemption timer ran out: reschedule.
    Preempted,
    /// VMCALL: the kernel dispatches through the hypercall table.
    Vmcall,
    /// Port 0xf4: the guest powers off with this code.
    PowerOff(u32),
    /// End the domain, with the reason to log.
    Kill(String),
}

/// Counters of what the guest did, for the end-of-domain report.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    pub exits: u64,
    pub io: u64,
    pub msr: u64,
    pub cpuid: u64,
    pub hlt: u64,
    pub cr: u64,
    pub external: u64,
    pub vmcall: u64,
    pub mmio: u64,
    /// Slices ended by the preemption timer.
    pub preempted: u64,
    pub unknown_ports: u32,
    /// MSR accesses refused with #GP (unknown MSR or bad value).
    pub unknown_msrs: u32,
}

/// The emulated platform of one HVM guest.
#[derive(Clone, Debug)]
pub struct Platform {
    pub uart: Uart16550,
    pub pic: [Pic; 2],
    pub pit: Pit,
    pub lapic: VLapic,
    pub cpuid: CpuidPolicy,
    /// Console bytes written to the UART, for the kernel to print.
    pub output: Vec<u8>,
    /// Things worth a log line (unknown ports and MSRs), for the kernel.
    pub notes: Vec<String>,
    pub stats: ExitStats,
    pat: u64,
    /// STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, TSC_AUX: kept, never
    /// loaded into the real CPU (the guest gets them back on RDMSR).
    saved: [u64; 6],
}

const SAVED_MSRS: [u32; 6] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102, 0xc000_0103];
const MSR_TSC: u32 = 0x10;
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_MTRRCAP: u32 = 0xfe;
const MSR_MISC_ENABLE: u32 = 0x1a0;
const MSR_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// APIC base as the guest sees it: 0xfee00000, BSP, xAPIC enable, x2APIC enable.
pub const APIC_BASE_VALUE: u64 = 0xfee0_0000 | (1 << 8) | (1 << 10) | (1 << 11);

fn cpu_msr(msr: u32) -> Option<CpuMsr> {
    Some(match msr {
        0xc000_0080 => CpuMsr::Efer,
        0xc000_0100 => CpuMsr::FsBase,
        0xc000_0101 => CpuMsr::GsBase,
        0x174 => CpuMsr::SysenterCs,
        0x175 => CpuMsr::SysenterEsp,
        0x176 => CpuMsr::SysenterEip,
        _ => return None,
    })
}

/// Checks a WRMSR to EFER: unknown bits fault, LMA is kept as it is (the
/// CPU owns it), LME cannot change while paging is on.
pub fn efer_write(old: u64, new: u64, paging: bool) -> Result<u64, GpFault> {
    if new & !EFER_ALLOWED != 0 || (paging && (new ^ old) & EFER_LME != 0) {
        return Err(GpFault);
    }
    Ok((new & !EFER_LMA) | (old & EFER_LMA))
}

/// The EFER that results from a MOV to CR0 (`cr0`), given CR4 and EFER:
/// turning paging on with LME set enters long mode (LMA), which needs PAE;
/// turning it off leaves long mode. PG without PE faults.
pub fn paging_transition(cr0: u64, cr4: u64, efer: u64) -> Result<u64, GpFault> {
    if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
        return Err(GpFault);
    }
    if cr0 & CR0_PG == 0 {
        return Ok(efer & !EFER_LMA);
    }
    if efer & EFER_LME != 0 {
        if cr4 & CR4_PAE == 0 {
            return Err(GpFault);
        }
        return Ok(efer | EFER_LMA);
    }
    Ok(efer)
}

impl Platform {
    pub fn new(cpuid: CpuidPolicy) -> Self {
        Platform {
            uart: Uart16550::new(),
            pic: [Pic::default(), Pic::default()],
            pit: Pit::default(),
            lapic: VLapic::new(),
            cpuid,
            output: Vec::new(),
            notes: Vec::new(),
            stats: ExitStats::default(),
            pat: 0x0007_0406_0007_0406,
            saved: [0; 6],
        }
    }

    fn note_port(&mut self, what: &str, port: u16, size: u8) {
        self.stats.unknown_ports += 1;
        if self.stats.unknown_ports <= LOG_LIMIT {
            self.notes.push(format!("{what} of unknown port {port:#x} ({size} bytes): reads as all ones, writes ignored"));
        }
    }

    fn note_msr(&mut self, what: &str, msr: u32) {
        self.stats.unknown_msrs += 1;
        if self.stats.unknown_msrs <= LOG_LIMIT {
            self.notes.push(format!("{what} of MSR {msr:#x} refused (unknown MSR or bad value): #GP injected"));
        }
    }

    /// An IN of `size` bytes (1, 2 or 4) from `port`.
    pub fn io_in(&mut self, port: u16, size: u8, now: u64) -> u32 {
        let v: u8 = match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => self.uart.read(p - COM1_BASE),
            0x20 | 0xa0 => self.pic[(port >> 7) as usize & 1].read_command(),
            0x21 | 0xa1 => self.pic[(port >> 7) as usize & 1].read_data(),
            0x40..=0x42 => self.pit.read_counter((port - 0x40) as usize, now),
            0x43 => 0xff,
            0x61 => self.pit.read_port61(now),
            POWEROFF_PORT => 0,
            0x80 => 0,
            _ => {
                self.note_port("read", port, size);
                return mask(size);
            }
        };
        v as u32
    }

    /// An OUT of `value` (`size` bytes) to `port`. Returns the power-off code
    /// for port 0xf4.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32, now: u64) -> Option<u32> {
        let b = value as u8;
        match port {
            POWEROFF_PORT => return Some(value & mask(size)),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Some(c) = self.uart.write(p - COM1_BASE, b) {
                    self.output.push(c);
                }
            }
            0x20 | 0xa0 => self.pic[(port >> 7) as usize & 1].write_command(b),
            0x21 | 0xa1 => self.pic[(port >> 7) as usize & 1].write_data(b),
            0x40..=0x42 => self.pit.write_counter((port - 0x40) as usize, b, now),
            0x43 => self.pit.write_control(b, now),
            0x61 => self.pit.write_port61(b, now),
            // POST codes: accepted and dropped.
            0x80 => {}
            _ => self.note_port("write", port, size),
        }
        None
    }

    /// RDMSR: the value, or #GP.
    pub fn rdmsr<C: GuestCpu>(&mut self, cpu: &C, msr: u32, now: u64) -> Result<u64, GpFault> {
        if let Some(m) = cpu_msr(msr) {
            return Ok(cpu.msr(m));
        }
        if let Some(i) = SAVED_MSRS.iter().position(|&m| m == msr) {
            return Ok(self.saved[i]);
        }
        let r = match msr {
            MSR_TSC => Ok(cpu.tsc()),
            MSR_APIC_BASE => Ok(APIC_BASE_VALUE),
            MSR_MTRRCAP => Ok(0),
            MSR_MISC_ENABLE => Ok(1),
            MSR_PAT => Ok(self.pat),
            MSR_MTRR_DEF_TYPE => Ok(0x806),
            m if (lapic::MSR_FIRST..=lapic::MSR_LAST).contains(&m) => self.lapic.read_msr(m, now),
            _ => Err(GpFault),
        };
        if r.is_err() {
            self.note_msr("rdmsr", msr);
        }
        r
    }

    /// WRMSR: applied, or #GP.
    pub fn wrmsr<C: GuestCpu>(&mut self, cpu: &mut C, msr: u32, value: u64, now: u64) -> Result<(), GpFault> {
        let r = if let Some(m) = cpu_msr(msr) {
            let ok = match m {
                CpuMsr::Efer => efer_write(cpu.msr(m), value, cpu.cr(0) & CR0_PG != 0),
                CpuMsr::FsBase | CpuMsr::GsBase | CpuMsr::SysenterEsp | CpuMsr::SysenterEip => {
                    if crate::paging::is_canonical(value) { Ok(value) } else { Err(GpFault) }
                }
                CpuMsr::SysenterCs => Ok(value & 0xffff_ffff),
            };
            ok.map(|v| cpu.set_msr(m, v))
        } else if let Some(i) = SAVED_MSRS.iter().position(|&m| m == msr) {
            self.saved[i] = value;
            Ok(())
        } else {
            match msr {
                // The APIC stays at its address in x2APIC mode; a write that
                // keeps that is accepted, anything else faults.
                MSR_APIC_BASE if value & !(0xfff) == APIC_BASE_VALUE & !0xfff => Ok(()),
                MSR_PAT => {
                    // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                    if value.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4..=7)) {
                        self.pat = value;
                        Ok(())
                    } else {
                        Err(GpFault)
                    }
                }
                MSR_MISC_ENABLE | MSR_MTRR_DEF_TYPE => Ok(()),
                m if (lapic::MSR_FIRST..=lapic::MSR_LAST).contains(&m) => self.lapic.write_msr(m, value, now),
                _ => Err(GpFault),
            }
        };
        if r.is_err() {
            self.note_msr("wrmsr", msr);
        }
        r
    }
}

fn mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// Handles one decoded VM exit: emulates the instruction or device access,
/// or says what the kernel must do. Never panics on guest input.
pub fn handle_exit<C: GuestCpu>(cpu: &mut C, p: &mut Platform, exit: VmExit, now: u64) -> Action {
    p.stats.exits += 1;
    match exit {
        VmExit::Cpuid => {
            p.stats.cpuid += 1;
            let (leaf, sub) = (cpu.gpr(0) as u32, cpu.gpr(1) as u32);
            let out = cpuid::filter(leaf, sub, cpu.host_cpuid(leaf, sub), &p.cpuid);
            for (r, v) in [(0, out[0]), (3, out[1]), (1, out[2]), (2, out[3])] {
                cpu.set_gpr(r, v as u64);
            }
            cpu.skip_instruction();
            Action::Resume
        }
        VmExit::Hlt => {
            p.stats.hlt += 1;
            cpu.skip_instruction();
            Action::Halt
        }
        VmExit::Rdmsr => {
            p.stats.msr += 1;
            let msr = cpu.gpr(1) as u32;
            match p.rdmsr(cpu, msr, now) {
                Ok(v) => {
                    cpu.set_gpr(0, v & 0xffff_ffff);
                    cpu.set_gpr(2, v >> 32);
                    cpu.skip_instruction();
                }
                Err(GpFault) => cpu.inject_exception(VEC_GP, Some(0)),
            }
            Action::Resume
        }
        VmExit::Wrmsr => {
            p.stats.msr += 1;
            let msr = cpu.gpr(1) as u32;
            let value = (cpu.gpr(2) << 32) | (cpu.gpr(0) & 0xffff_ffff);
            match p.wrmsr(cpu, msr, value, now) {
                Ok(()) => cpu.skip_instruction(),
                Err(GpFault) => cpu.inject_exception(VEC_GP, Some(0)),
            }
            Action::Resume
        }
        VmExit::IoInstruction { port, size, write, string, rep } => {
            p.stats.io += 1;
            if string || rep || !matches!(size, 1 | 2 | 4) {
                return Action::Kill(format!("string or malformed I/O instruction on port {port:#x} (INS/OUTS are not emulated)"));
            }
            if write {
                let v = cpu.gpr(0) as u32 & mask(size);
                cpu.skip_instruction();
                if let Some(code) = p.io_out(port, size, v, now) {
                    return Action::PowerOff(code);
                }
            } else {
                let v = p.io_in(port, size, now) & mask(size);
                let rax = cpu.gpr(0);
                // A 32-bit IN zero-extends into RAX; 8/16-bit ones merge.
                let new = if size == 4 { v as u64 } else { (rax & !(mask(size) as u64)) | v as u64 };
                cpu.set_gpr(0, new);
                cpu.skip_instruction();
            }
            Action::Resume
        }
        // CR8 is the APIC's task priority (bits 7:4 of the TPR).
        VmExit::CrAccess { cr: 8, kind, gpr } => {
            p.stats.cr += 1;
            let r = match kind {
                CrAccessKind::MovTo if cpu.gpr(gpr) <= 15 => p.lapic.write_msr(lapic::MSR_FIRST + 8, cpu.gpr(gpr) << 4, now),
                CrAccessKind::MovFrom => {
                    let tpr = p.lapic.read_msr(lapic::MSR_FIRST + 8, now).unwrap_or(0);
                    cpu.set_gpr(gpr, tpr >> 4);
                    Ok(())
                }
                _ => Err(GpFault),
            };
            match r {
                Ok(()) => cpu.skip_instruction(),
                Err(GpFault) => cpu.inject_exception(VEC_GP, Some(0)),
            }
            Action::Resume
        }
        VmExit::CrAccess { cr, kind, gpr } => {
            p.stats.cr += 1;
            let r = match kind {
                CrAccessKind::MovTo => cpu.set_cr(cr, cpu.gpr(gpr)),
                CrAccessKind::MovFrom => {
                    cpu.set_gpr(gpr, cpu.cr(cr));
                    Ok(())
                }
                CrAccessKind::Clts => cpu.set_cr(0, cpu.cr(0) & !8),
                // LMSW changes PE, MP, EM, TS and cannot clear PE.
                CrAccessKind::Lmsw { source } => {
                    let cr0 = cpu.cr(0);
                    cpu.set_cr(0, (cr0 & !0xe) | (source as u64 & 0xf) | (cr0 & CR0_PE))
                }
            };
            match r {
                Ok(()) => cpu.skip_instruction(),
                Err(GpFault) => cpu.inject_exception(VEC_GP, Some(0)),
            }
            Action::Resume
        }
        VmExit::Xsetbv | VmExit::Invlpg => {
            // XSAVE is hidden by the CPUID policy: XSETBV is undefined here.
            // INVLPG is not intercepted (EPT); if it exits anyway it is a no-op.
            if exit == VmExit::Invlpg {
                cpu.skip_instruction();
            } else {
                cpu.inject_exception(VEC_UD, None);
            }
            Action::Resume
        }
        VmExit::ExternalInterrupt => {
            p.stats.external += 1;
            Action::ExternalInterrupt
        }
        VmExit::InterruptWindow => Action::InterruptWindow,
        VmExit::PreemptionTimer => Action::Preempted,
        VmExit::Vmcall => {
            p.stats.vmcall += 1;
            Action::Vmcall
        }
        VmExit::TripleFault => Action::Kill(format!("triple fault at rip {:#x}", cpu.rip())),
        VmExit::EptViolation { gpa, fetch: false, .. } if gpa & !0xfff == mmio::APIC_MMIO_BASE => {
            p.stats.mmio += 1;
            emulate_apic_access(cpu, p, gpa, now)
        }
        VmExit::EptViolation { gpa, read, write, fetch, .. } => {
            let what = if fetch { "instruction fetch" } else if write { "write" } else if read { "read" } else { "access" };
            Action::Kill(format!("EPT violation: {what} at guest-physical {gpa:#x} (not guest memory; MMIO is not emulated) at rip {:#x}", cpu.rip()))
        }
        VmExit::EptMisconfig { gpa } => Action::Kill(format!("EPT misconfiguration at guest-physical {gpa:#x}")),
        VmExit::ExceptionOrNmi { vector, .. } => {
            Action::Kill(format!("unexpected exception/NMI exit, vector {vector} at rip {:#x}", cpu.rip()))
        }
        VmExit::EntryFailure { reason, qualification } => {
            Action::Kill(format!("VM entry failed (reason {reason}, qualification {qualification:#x})"))
        }
        VmExit::Unknown { reason, qualification } => {
            Action::Kill(format!("unsupported VM exit (reason {reason}, qualification {qualification:#x}) at rip {:#x}", cpu.rip()))
        }
    }
}

/// An access to the xAPIC page: fetch and decode the guest's instruction,
/// do it on the local APIC, step over it. What cannot be decoded ends the
/// guest.
fn emulate_apic_access<C: GuestCpu>(cpu: &mut C, p: &mut Platform, gpa: u64, now: u64) -> Action {
    let rip = cpu.rip();
    let (base, long) = cpu.code_segment();
    let la = if long { rip } else { base.wrapping_add(rip) & 0xffff_ffff };
    let paging = mmio::Paging { cr0: cpu.cr(0), cr3: cpu.cr(3), cr4: cpu.cr(4), efer: cpu.msr(CpuMsr::Efer) };
    let mut bytes = [0u8; 15];
    let mut n = 0;
    while n < bytes.len() {
        let read8 = |a: u64| {
            let mut w = [0u8; 8];
            cpu.read_phys(a, &mut w).then(|| u64::from_le_bytes(w))
        };
        let Some(pa) = mmio::guest_to_phys(paging, la.wrapping_add(n as u64), read8) else { break };
        if !cpu.read_phys(pa, &mut bytes[n..n + 1]) {
            break;
        }
        n += 1;
    }
    let Some(d) = mmio::decode_mov(&bytes[..n], long) else {
        return Action::Kill(format!("access to the local APIC page at {gpa:#x} by an instruction that is not emulated (at rip {rip:#x}: {:02x?})", &bytes[..n.min(8)]));
    };
    let offset = gpa & 0xfff;
    match d.op {
        mmio::MmioOp::Load { reg, size: 4 } => {
            let v = p.lapic.read_mmio(offset, now) as u64;
            cpu.set_gpr(reg, v);
        }
        mmio::MmioOp::StoreReg { reg, size: 4 } => {
            let v = cpu.gpr(reg) as u32;
            p.lapic.write_mmio(offset, v, now);
        }
        mmio::MmioOp::StoreImm { value, size: 4 } => p.lapic.write_mmio(offset, value, now),
        _ => return Action::Kill(format!("{}-byte access to the local APIC page at {gpa:#x} (registers are 32-bit) at rip {rip:#x}", match d.op {
            mmio::MmioOp::Load { size, .. } | mmio::MmioOp::StoreReg { size, .. } | mmio::MmioOp::StoreImm { size, .. } => size,
        })),
    }
    cpu.set_rip(rip.wrapping_add(d.len as u64));
    Action::Resume
}

#[cfg(test)]
mod tests;
