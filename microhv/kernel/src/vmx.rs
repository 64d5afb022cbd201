//! VT-x on the real (emulated) CPU: detection, VMXON, and a first VMCS. The
//! logic (field encodings, exit decoding, EPT) is host-tested in
//! `microhv_core::vmx` / `ept`; this file holds the instructions.
//!
//! At boot microhv enters VMX operation and checks a VMCS field round trip
//! ([`probe`]); HVM domains (`hvm.rs`) then use the wrappers here.

use crate::mm;
use core::arch::asm;
use microhv_core::vmx::vmcs::{GuestRip, VmInstructionError};
use microhv_core::vmx::{VmcsAccess, VmxError};
use x86_64::registers::model_specific::Msr;

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const FC_LOCK: u64 = 1 << 0;
const FC_VMXON_OUTSIDE_SMX: u64 = 1 << 2;
const CR4_VMXE: u64 = 1 << 13;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;

/// Set once VMXON succeeded at boot.
static READY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static REVISION: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static WHY_NOT: spin::Mutex<&'static str> = spin::Mutex::new("VT-x was not probed");

/// The VMCS revision when VMX operation is on; otherwise why not.
pub fn ready() -> Result<u32, &'static str> {
    if READY.load(core::sync::atomic::Ordering::Relaxed) {
        Ok(REVISION.load(core::sync::atomic::Ordering::Relaxed))
    } else {
        Err(*WHY_NOT.lock())
    }
}

/// Reads a VMX capability MSR.
pub fn capability(msr: u32) -> u64 {
    // SAFETY: only called after VMXON succeeded, so the VMX capability MSRs
    // (0x480..0x491) exist; reading them has no side effects.
    unsafe { Msr::new(msr).read() }
}

/// VMPTRLD: makes the VMCS at `pa` current.
pub fn vmptrld(pa: u64) -> Result<(), VmxError> {
    let flags: u64;
    // SAFETY: `pa` is a VMCS region of ours (4 KiB, revision written).
    unsafe { asm!("vmptrld [{p}]", "pushfq", "pop {f}", p = in(reg) &pa, f = out(reg) flags) };
    check(flags)
}

/// VMCLEAR: writes the VMCS at `pa` back to memory and marks it clear.
pub fn vmclear(pa: u64) -> Result<(), VmxError> {
    let flags: u64;
    // SAFETY: `pa` is a VMCS region of ours.
    unsafe { asm!("vmclear [{p}]", "pushfq", "pop {f}", p = in(reg) &pa, f = out(reg) flags) };
    check(flags)
}

/// INVEPT (all contexts), when the CPU offers it: drops cached EPT
/// translations before EPT table frames are reused.
pub fn invept_all() {
    let cap = capability(IA32_VMX_EPT_VPID_CAP);
    // Bit 20: INVEPT supported; bit 26: all-context type.
    if cap & (1 << 20) == 0 || cap & (1 << 26) == 0 {
        return;
    }
    let desc = [0u64; 2];
    // SAFETY: INVEPT type 2 (all contexts) with a zero descriptor only drops
    // cached translations.
    unsafe { asm!("invept {t}, [{d}]", t = in(reg) 2u64, d = in(reg) &desc) };
}

/// RFLAGS after a VMX instruction: CF set = VMfailInvalid, ZF set =
/// VMfailValid (the error number is then in the VM-instruction error field).
fn check(rflags: u64) -> Result<(), VmxError> {
    if rflags & 1 != 0 {
        Err(VmxError::FailInvalid)
    } else if rflags & (1 << 6) != 0 {
        Err(VmxError::FailValid(0))
    } else {
        Ok(())
    }
}

/// The current VMCS, through VMREAD/VMWRITE.
pub struct CurrentVmcs;

impl CurrentVmcs {
    /// Fills in the VM-instruction error number of a VMfailValid.
    fn detail(&self, e: VmxError) -> VmxError {
        match e {
            VmxError::FailValid(_) => VmxError::FailValid(VmInstructionError::read(self).unwrap_or(0)),
            other => other,
        }
    }
}

impl VmcsAccess for CurrentVmcs {
    fn vmread(&self, encoding: u32) -> Result<u64, VmxError> {
        let value: u64;
        let flags: u64;
        // SAFETY: VMREAD only reads the current VMCS; failures are reported in RFLAGS.
        unsafe {
            asm!("vmread {v}, {e}", "pushfq", "pop {f}", v = out(reg) value, e = in(reg) encoding as u64, f = out(reg) flags);
        }
        check(flags).map(|_| value).map_err(|e| self.detail(e))
    }

    fn vmwrite(&mut self, encoding: u32, value: u64) -> Result<(), VmxError> {
        let flags: u64;
        // SAFETY: VMWRITE changes only the current VMCS (not yet used to run
        // anything); failures are reported in RFLAGS.
        unsafe {
            asm!("vmwrite {e}, {v}", "pushfq", "pop {f}", e = in(reg) encoding as u64, v = in(reg) value, f = out(reg) flags);
        }
        check(flags).map_err(|e| self.detail(e))
    }
}

/// Whether this CPU has VT-x (CPUID.1:ECX.VMX).
pub fn available() -> bool {
    // CPUID leaf 1 exists on every x86-64 CPU.
    let r = core::arch::x86_64::__cpuid(1);
    r.ecx & (1 << 5) != 0
}

/// Enters VMX operation and checks a VMCS round trip. Logs what it finds;
/// returns the VMCS revision on success.
pub fn probe() -> Result<u32, &'static str> {
    let r = probe_inner();
    match r {
        Ok(rev) => {
            REVISION.store(rev, core::sync::atomic::Ordering::Relaxed);
            READY.store(true, core::sync::atomic::Ordering::Relaxed);
        }
        Err(why) => *WHY_NOT.lock() = why,
    }
    r
}

fn probe_inner() -> Result<u32, &'static str> {
    if !available() {
        return Err("this CPU has no VMX (QEMU TCG emulates none)");
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX; reading it has no side effects.
    let fc = unsafe { Msr::new(IA32_FEATURE_CONTROL).read() };
    if fc & FC_LOCK == 0 {
        // SAFETY: enabling VMXON in the unlocked feature-control MSR, as firmware would.
        unsafe { Msr::new(IA32_FEATURE_CONTROL).write(fc | FC_LOCK | FC_VMXON_OUTSIDE_SMX) };
    } else if fc & FC_VMXON_OUTSIDE_SMX == 0 {
        return Err("VMX is disabled by the firmware (IA32_FEATURE_CONTROL locked)");
    }
    // SAFETY: IA32_VMX_BASIC exists on every CPU with VMX; reading it has no side effects.
    let basic = unsafe { Msr::new(IA32_VMX_BASIC).read() };
    let revision = (basic & 0x7fff_ffff) as u32;
    // CR0 and CR4 must satisfy the VMX fixed bits.
    // SAFETY: reading the VMX capability MSRs and adjusting CR0/CR4 within the
    // bits they require (NE, VMXE); paging and protection stay as they are.
    unsafe {
        let cr0: u64;
        let cr4: u64;
        asm!("mov {}, cr0", out(reg) cr0);
        asm!("mov {}, cr4", out(reg) cr4);
        let cr0 = (cr0 | Msr::new(IA32_VMX_CR0_FIXED0).read()) & Msr::new(IA32_VMX_CR0_FIXED1).read();
        let cr4 = ((cr4 | CR4_VMXE) | Msr::new(IA32_VMX_CR4_FIXED0).read()) & Msr::new(IA32_VMX_CR4_FIXED1).read();
        asm!("mov cr0, {}", in(reg) cr0);
        asm!("mov cr4, {}", in(reg) cr4);
    }
    let vmxon = mm::alloc_frame().ok_or("no memory for the VMXON region")?;
    let vmcs = mm::alloc_frame().ok_or("no memory for a VMCS")?;
    for f in [vmxon, vmcs] {
        // SAFETY: fresh frames of ours, identity-mapped; the first 4 bytes hold
        // the revision identifier, as the SDM requires.
        unsafe {
            core::ptr::write_bytes(f.addr() as *mut u8, 0, 4096);
            (f.addr() as *mut u32).write_volatile(revision);
        }
    }
    let (on_pa, vmcs_pa) = (vmxon.addr(), vmcs.addr());
    let flags: u64;
    // SAFETY: VMXON with a valid, aligned region; CR0/CR4 meet the fixed bits.
    unsafe { asm!("vmxon [{p}]", "pushfq", "pop {f}", p = in(reg) &on_pa, f = out(reg) flags) };
    check(flags).map_err(|_| "VMXON failed")?;
    let flags: u64;
    // SAFETY: VMCLEAR then VMPTRLD of our own VMCS region.
    unsafe {
        asm!("vmclear [{p}]", "vmptrld [{p}]", "pushfq", "pop {f}", p = in(reg) &vmcs_pa, f = out(reg) flags);
    }
    check(flags).map_err(|_| "VMPTRLD failed")?;
    let mut v = CurrentVmcs;
    GuestRip::write(&mut v, 0x1234_5678).map_err(|_| "VMWRITE failed")?;
    if GuestRip::read(&v).map_err(|_| "VMREAD failed")? != 0x1234_5678 {
        return Err("a VMCS field did not read back");
    }
    Ok(revision)
}
