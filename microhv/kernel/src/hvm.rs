//! HVM domains on Intel VT-x: building one from an unmodified multiboot
//! kernel, its VMCS (guest state, host state, controls), the world switch
//! (VMLAUNCH/VMRESUME and the exit stub), and the glue from a VM exit to the
//! host-tested platform in `microhv_core::hvm` and back to the scheduler.
//!
//! The hardware extension is behind [`HwExtension`]: `Vmx` is its only
//! implementation today; an SVM one would provide the same four operations
//! over a VMCB. Everything above it (exit handling, devices, the loader)
//! is vendor-neutral.

use crate::domain::{self, EndReason, Hv};
use crate::mm::{self, Identity};
use crate::vmx::{self, CurrentVmcs};
use crate::{apic, time};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use microhv_core::cmdline::Cmdline;
use microhv_core::ept::Ept;
use microhv_core::hvm::{self as platform, loader, Action, CpuMsr, GuestCpu, Platform};
use microhv_core::machine::MachineMemory;
use microhv_core::paging::TableMemory;
use microhv_core::pvmm::Owner;
use microhv_core::sched::{VcpuId, DEFAULT_WEIGHT};
use microhv_core::vmx::cpuid::CpuidPolicy;
use microhv_core::vmx::vmcs::*;
use microhv_core::vmx::{adjust_controls, decode, VmExit, VmxError};
use shared_abi::{DomId, Mfn};

/// The hardware virtualization extension: what the rest of microhv needs
/// from VT-x (or, later, AMD SVM).
pub trait HwExtension {
    /// Per-vCPU hardware state (a VMCS, a VMCB).
    type Vcpu;
    /// Why HVM domains cannot run here, if they cannot.
    fn available() -> Result<(), String>;
    /// Prepares a vCPU that starts a multiboot kernel at `entry` in 32-bit
    /// protected mode (EAX = boot magic, EBX = `mbi`), with guest memory
    /// described by the second-level tables `npt` (the EPTP for VT-x, the
    /// nested CR3 for SVM).
    fn create_vcpu(entry: u32, mbi: u32, npt: u64) -> Result<Self::Vcpu, String>;
    /// Runs the vCPU until the next exit and decodes it.
    fn run(vcpu: &mut Self::Vcpu) -> Result<VmExit, String>;
    /// Releases the hardware state.
    fn destroy_vcpu(vcpu: Self::Vcpu);
}

/// Guest general-purpose registers while the guest is out (RSP lives in
/// the VMCS): index 0 = RAX .. 15 = R15, the hardware's numbering.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct GuestRegs(pub [u64; 16]);

/// One VT-x vCPU: its VMCS region and registers.
pub struct VmxVcpu {
    vmcs: u64,
    launched: bool,
    pub regs: GuestRegs,
    /// An event the CPU was delivering when the exit came (re-injected).
    reinject: Option<(u32, u32, u32)>,
}

/// The one implementation of [`HwExtension`] today.
pub struct Vmx;

// Controls (SDM vol. 3, chapter 25).
const PIN_EXT_INT: u32 = 1 << 0;
const PIN_NMI: u32 = 1 << 3;
const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
const IA32_VMX_MISC: u32 = 0x485;
const PROC_INT_WINDOW: u32 = 1 << 2;
const PROC_HLT: u32 = 1 << 7;
const PROC_MWAIT: u32 = 1 << 10;
const PROC_UNCOND_IO: u32 = 1 << 24;
const PROC_MONITOR: u32 = 1 << 29;
const PROC_SECONDARY: u32 = 1 << 31;
const PROC2_EPT: u32 = 1 << 1;
const PROC2_UNRESTRICTED: u32 = 1 << 7;
const EXIT_HOST_64: u32 = 1 << 9;
const EXIT_ACK_INT: u32 = 1 << 15;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;
const ENTRY_IA32E: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
/// CR0 bits microhv owns: PE and PG (long-mode switch), NE (fixed to 1).
const CR0_OWNED: u64 = platform::CR0_PE | platform::CR0_PG | CR0_NE;
const CR4_OWNED: u64 = CR4_VMXE;

const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED: u32 = 0x481;
const IA32_VMX_PROCBASED: u32 = 0x482;
const IA32_VMX_EXIT: u32 = 0x483;
const IA32_VMX_ENTRY: u32 = 0x484;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED2: u32 = 0x48b;
const IA32_VMX_TRUE_PINBASED: u32 = 0x48d;
const IA32_VMX_TRUE_PROCBASED: u32 = 0x48e;
const IA32_VMX_TRUE_EXIT: u32 = 0x48f;
const IA32_VMX_TRUE_ENTRY: u32 = 0x490;
const IA32_EFER: u32 = 0xc000_0080;

/// Interruption-information field: valid bit, types.
const INTR_VALID: u32 = 1 << 31;
const INTR_TYPE_EXT: u32 = 0 << 8;
const INTR_TYPE_HW_EXC: u32 = 3 << 8;
const INTR_ERROR_CODE: u32 = 1 << 11;

/// The VMCS that is current on this CPU (0: none of ours).
static CURRENT: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .section .text
    .global hvm_run
/* u64 hvm_run(GuestRegs *regs, u64 launched): enters the guest; returns 0
 * after a VM exit (the registers saved in *regs), 1 if the VM entry
 * instruction itself failed. */
hvm_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, 0x6c14          /* HOST_RSP: the exit lands on this stack */
    vmwrite rax, rsp
    test rsi, rsi
    mov rax, [rdi + 0]
    mov rcx, [rdi + 8]
    mov rdx, [rdi + 16]
    mov rbx, [rdi + 24]
    mov rbp, [rdi + 40]
    mov rsi, [rdi + 48]
    mov r8, [rdi + 64]
    mov r9, [rdi + 72]
    mov r10, [rdi + 80]
    mov r11, [rdi + 88]
    mov r12, [rdi + 96]
    mov r13, [rdi + 104]
    mov r14, [rdi + 112]
    mov r15, [rdi + 120]
    mov rdi, [rdi + 56]
    jnz 2f
    vmlaunch
    jmp 3f
2:  vmresume
3:  /* Only reached when VMLAUNCH/VMRESUME failed. */
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    mov eax, 1
    ret

    .global hvm_exit_stub
hvm_exit_stub:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0], rax
    mov [rdi + 8], rcx
    mov [rdi + 16], rdx
    mov [rdi + 24], rbx
    mov [rdi + 40], rbp
    mov [rdi + 48], rsi
    mov [rdi + 64], r8
    mov [rdi + 72], r9
    mov [rdi + 80], r10
    mov [rdi + 88], r11
    mov [rdi + 96], r12
    mov [rdi + 104], r13
    mov [rdi + 112], r14
    mov [rdi + 120], r15
    pop rax
    mov [rdi + 56], rax
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    xor eax, eax
    ret
"#
);

extern "C" {
    fn hvm_run(regs: *mut GuestRegs, launched: u64) -> u64;
    static hvm_exit_stub: u8;
}

fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading CR0/CR3/CR4 has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) v),
            3 => asm!("mov {}, cr3", out(reg) v),
            _ => asm!("mov {}, cr4", out(reg) v),
        }
    }
    v
}

/// The control value for `want`, checked against the capability MSR;
/// `what` names it in the error.
fn control(want: u32, msr: u32, what: &str) -> Result<u32, String> {
    adjust_controls(want, vmx::capability(msr)).map_err(|bits| format!("the CPU cannot set {what} bits {bits:#x}"))
}

fn err(what: &str, e: VmxError) -> String {
    format!("{what}: {e}")
}

/// Writes every VMCS field for a fresh vCPU (the VMCS is current).
fn setup_vmcs(entry: u32, eptp: u64) -> Result<(), String> {
    let v = &mut CurrentVmcs;
    let w = |r: Result<(), VmxError>| r.map_err(|e| err("VMWRITE", e));
    let true_ctls = vmx::capability(IA32_VMX_BASIC) & (1 << 55) != 0;
    let pick = |plain: u32, tru: u32| if true_ctls { tru } else { plain };
    let pin_msr = pick(IA32_VMX_PINBASED, IA32_VMX_TRUE_PINBASED);
    // The VMX preemption timer ends time slices where the CPU has it.
    let timer = if vmx::capability(pin_msr) >> 32 & PIN_PREEMPTION_TIMER as u64 != 0 { PIN_PREEMPTION_TIMER } else { 0 };
    let pin = control(PIN_EXT_INT | PIN_NMI | timer, pin_msr, "pin-based")?;
    let proc = control(
        PROC_HLT | PROC_MWAIT | PROC_UNCOND_IO | PROC_MONITOR | PROC_SECONDARY,
        pick(IA32_VMX_PROCBASED, IA32_VMX_TRUE_PROCBASED),
        "processor-based",
    )?;
    let proc2 = control(PROC2_EPT | PROC2_UNRESTRICTED, IA32_VMX_PROCBASED2, "secondary processor-based")?;
    let exit = control(EXIT_HOST_64 | EXIT_ACK_INT | EXIT_SAVE_EFER | EXIT_LOAD_EFER, pick(IA32_VMX_EXIT, IA32_VMX_TRUE_EXIT), "VM-exit")?;
    let entry_ctl = control(ENTRY_LOAD_EFER, pick(IA32_VMX_ENTRY, IA32_VMX_TRUE_ENTRY), "VM-entry")?;
    w(PinBasedControls::write(v, pin))?;
    w(ProcBasedControls::write(v, proc))?;
    w(SecondaryProcBasedControls::write(v, proc2))?;
    w(ExitControls::write(v, exit))?;
    w(EntryControls::write(v, entry_ctl))?;
    w(ExceptionBitmap::write(v, 0))?;
    w(Cr3TargetCount::write(v, 0))?;
    w(ExitMsrStoreCount::write(v, 0))?;
    w(ExitMsrLoadCount::write(v, 0))?;
    w(EntryMsrLoadCount::write(v, 0))?;
    w(EntryInterruptionInfo::write(v, 0))?;
    w(EptPointer::write(v, eptp))?;
    w(VmcsLinkPointer::write(v, u64::MAX))?;

    // Host state: microhv as it runs now.
    let mut gdtr = [0u8; 10];
    let mut idtr = [0u8; 10];
    // SAFETY: SGDT/SIDT store 10 bytes into our buffers.
    unsafe {
        asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr());
        asm!("sidt [{}]", in(reg) idtr.as_mut_ptr());
    }
    let gdt_base = u64::from_le_bytes(gdtr[2..10].try_into().unwrap_or([0; 8]));
    let idt_base = u64::from_le_bytes(idtr[2..10].try_into().unwrap_or([0; 8]));
    // SAFETY: the GDT is mapped (read-only alias) for its whole limit; the
    // TSS descriptor is entries 7 and 8 (selector 0x38).
    let (lo, hi) = unsafe { ((gdt_base as *const u64).add(7).read(), (gdt_base as *const u64).add(8).read()) };
    let tr_base = ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32);
    // SAFETY: EFER exists on every x86-64 CPU; reading it has no side effects.
    let efer = unsafe { x86_64::registers::model_specific::Msr::new(IA32_EFER).read() };
    w(HostCr0::write(v, read_cr(0)))?;
    w(HostCr3::write(v, read_cr(3)))?;
    w(HostCr4::write(v, read_cr(4)))?;
    w(HostCsSelector::write(v, crate::cpu::HV_CS))?;
    for f in [HostSsSelector::write, HostDsSelector::write, HostEsSelector::write] {
        w(f(v, crate::cpu::HV_DS))?;
    }
    w(HostFsSelector::write(v, 0))?;
    w(HostGsSelector::write(v, 0))?;
    w(HostTrSelector::write(v, crate::cpu::TSS_SEL))?;
    w(HostFsBase::write(v, 0))?;
    w(HostGsBase::write(v, 0))?;
    w(HostTrBase::write(v, tr_base))?;
    w(HostGdtrBase::write(v, gdt_base))?;
    w(HostIdtrBase::write(v, idt_base))?;
    w(HostIa32SysenterCs::write(v, 0))?;
    w(HostIa32SysenterEsp::write(v, 0))?;
    w(HostIa32SysenterEip::write(v, 0))?;
    w(HostIa32Efer::write(v, efer))?;
    // Only the address of the exit stub is taken.
    w(HostRip::write(v, core::ptr::addr_of!(hvm_exit_stub) as u64))?;

    // Guest state: 32-bit protected mode, flat segments, paging off, as
    // multiboot1 says (SDM vol. 3, "Checks on the Guest State Area").
    let cr0_fixed0 = vmx::capability(IA32_VMX_CR0_FIXED0) & !(platform::CR0_PE | platform::CR0_PG);
    let cr4_fixed0 = vmx::capability(IA32_VMX_CR4_FIXED0);
    w(GuestCr0::write(v, platform::CR0_PE | CR0_ET | CR0_NE | cr0_fixed0))?;
    w(Cr0ReadShadow::write(v, platform::CR0_PE | CR0_ET))?;
    w(Cr0GuestHostMask::write(v, CR0_OWNED))?;
    w(GuestCr4::write(v, CR4_VMXE | cr4_fixed0))?;
    w(Cr4ReadShadow::write(v, 0))?;
    w(Cr4GuestHostMask::write(v, CR4_OWNED))?;
    w(GuestCr3::write(v, 0))?;
    w(GuestDr7::write(v, 0x400))?;
    w(GuestRflags::write(v, 0x2))?;
    w(GuestRip::write(v, entry as u64))?;
    w(GuestRsp::write(v, 0))?;
    w(GuestCsSelector::write(v, 0x08))?;
    w(GuestCsBase::write(v, 0))?;
    w(GuestCsLimit::write(v, 0xffff_ffff))?;
    w(GuestCsAccessRights::write(v, 0xc09b))?;
    type Seg = (
        fn(&mut CurrentVmcs, u16) -> Result<(), VmxError>,
        fn(&mut CurrentVmcs, u64) -> Result<(), VmxError>,
        fn(&mut CurrentVmcs, u32) -> Result<(), VmxError>,
        fn(&mut CurrentVmcs, u32) -> Result<(), VmxError>,
    );
    let data: [Seg; 5] = [
        (GuestDsSelector::write, GuestDsBase::write, GuestDsLimit::write, GuestDsAccessRights::write),
        (GuestEsSelector::write, GuestEsBase::write, GuestEsLimit::write, GuestEsAccessRights::write),
        (GuestSsSelector::write, GuestSsBase::write, GuestSsLimit::write, GuestSsAccessRights::write),
        (GuestFsSelector::write, GuestFsBase::write, GuestFsLimit::write, GuestFsAccessRights::write),
        (GuestGsSelector::write, GuestGsBase::write, GuestGsLimit::write, GuestGsAccessRights::write),
    ];
    for (sel, base, limit, ar) in data {
        w(sel(v, 0x10))?;
        w(base(v, 0))?;
        w(limit(v, 0xffff_ffff))?;
        w(ar(v, 0xc093))?;
    }
    w(GuestLdtrSelector::write(v, 0))?;
    w(GuestLdtrBase::write(v, 0))?;
    w(GuestLdtrLimit::write(v, 0))?;
    w(GuestLdtrAccessRights::write(v, 1 << 16))?; // unusable
    w(GuestTrSelector::write(v, 0))?;
    w(GuestTrBase::write(v, 0))?;
    w(GuestTrLimit::write(v, 0x67))?;
    w(GuestTrAccessRights::write(v, 0x8b))?; // present, busy 32-bit TSS
    w(GuestGdtrBase::write(v, 0))?;
    w(GuestGdtrLimit::write(v, 0))?;
    w(GuestIdtrBase::write(v, 0))?;
    w(GuestIdtrLimit::write(v, 0))?;
    w(GuestInterruptibilityState::write(v, 0))?;
    w(GuestActivityState::write(v, 0))?;
    w(GuestPendingDebugExceptions::write(v, 0))?;
    w(GuestIa32Debugctl::write(v, 0))?;
    w(GuestIa32SysenterCs::write(v, 0))?;
    w(GuestIa32SysenterEsp::write(v, 0))?;
    w(GuestIa32SysenterEip::write(v, 0))?;
    w(GuestIa32Efer::write(v, 0))?;
    Ok(())
}

fn make_current(vmcs: u64) -> Result<(), String> {
    if CURRENT.load(Ordering::Relaxed) != vmcs {
        vmx::vmptrld(vmcs).map_err(|e| err("VMPTRLD", e))?;
        CURRENT.store(vmcs, Ordering::Relaxed);
    }
    Ok(())
}

impl HwExtension for Vmx {
    type Vcpu = VmxVcpu;

    fn available() -> Result<(), String> {
        vmx::ready().map(|_| ()).map_err(|why| why.to_string())
    }

    fn create_vcpu(entry: u32, mbi: u32, eptp: u64) -> Result<VmxVcpu, String> {
        let rev = vmx::ready().map_err(|w| w.to_string())?;
        let frame = mm::alloc_frame().ok_or("no memory for a VMCS")?;
        let pa = frame.addr();
        // SAFETY: a fresh frame of ours, identity-mapped; the first 4 bytes
        // hold the VMCS revision identifier.
        unsafe {
            core::ptr::write_bytes(pa as *mut u8, 0, 4096);
            (pa as *mut u32).write_volatile(rev);
        }
        let setup = || -> Result<(), String> {
            vmx::vmclear(pa).map_err(|e| err("VMCLEAR", e))?;
            CURRENT.store(0, Ordering::Relaxed);
            make_current(pa)?;
            setup_vmcs(entry, eptp)
        };
        if let Err(e) = setup() {
            let _ = vmx::vmclear(pa);
            CURRENT.store(0, Ordering::Relaxed);
            let _ = mm::free_frame(frame);
            return Err(e);
        }
        let mut regs = GuestRegs::default();
        regs.0[0] = loader::BOOT_MAGIC as u64;
        regs.0[3] = mbi as u64;
        Ok(VmxVcpu { vmcs: pa, launched: false, regs, reinject: None })
    }

    fn run(vcpu: &mut VmxVcpu) -> Result<VmExit, String> {
        make_current(vcpu.vmcs)?;
        let v = &mut CurrentVmcs;
        if let Some((info, code, len)) = vcpu.reinject.take() {
            let w = |r: Result<(), VmxError>| r.map_err(|e| err("VMWRITE", e));
            w(EntryInterruptionInfo::write(v, info))?;
            w(EntryExceptionErrorCode::write(v, code))?;
            w(EntryInstructionLength::write(v, len))?;
        }
        // SAFETY: the VMCS is current and complete (setup_vmcs); host state
        // is microhv's; the exit stub saves the guest registers into `regs`
        // and returns here on this stack.
        let failed = unsafe { hvm_run(&mut vcpu.regs, vcpu.launched as u64) };
        crate::cpu::restore_after_vm_exit();
        if failed != 0 {
            let n = VmInstructionError::read(v).unwrap_or(0);
            return Err(format!(
                "VM entry failed: error {n} ({})",
                microhv_core::vmx::vmcs::instruction_error_text(n)
            ));
        }
        vcpu.launched = true;
        let r = |x: Result<u64, VmxError>| x.unwrap_or(0);
        let reason = ExitReason::read(v).unwrap_or(u32::MAX);
        let q = r(ExitQualification::read(v));
        let gpa = r(GuestPhysicalAddress::read(v));
        let info = ExitInterruptionInfo::read(v).unwrap_or(0);
        let code = ExitInterruptionErrorCode::read(v).unwrap_or(0);
        let vect = IdtVectoringInfo::read(v).unwrap_or(0);
        if vect & INTR_VALID != 0 {
            let vcode = IdtVectoringErrorCode::read(v).unwrap_or(0);
            let len = ExitInstructionLength::read(v).unwrap_or(0);
            // Bit 12 is undefined in the vectoring field; the entry field wants it 0.
            vcpu.reinject = Some((vect & !(1 << 12), vcode, len));
        }
        Ok(decode(reason, q, gpa, info, code))
    }

    fn destroy_vcpu(vcpu: VmxVcpu) {
        let _ = vmx::vmclear(vcpu.vmcs);
        let _ = CURRENT.compare_exchange(vcpu.vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
        if let Err(e) = mm::free_frame(microhv_core::frame::Mfn(vcpu.vmcs >> 12)) {
            log::error!("VMCS frame {:#x} could not be freed: {e:?}", vcpu.vmcs);
        }
    }
}

/// The guest CPU as `microhv_core::hvm` sees it: registers plus the
/// current VMCS.
struct Live<'a> {
    regs: &'a mut GuestRegs,
    vmcs: CurrentVmcs,
    /// The guest's RAM frames (for instruction fetches), or none.
    ram: &'a [Mfn],
}

impl Live<'_> {
    fn cr4_fixed(v: u64) -> Option<u64> {
        let (f0, f1) = (vmx::capability(IA32_VMX_CR4_FIXED0), vmx::capability(IA32_VMX_CR4_FIXED1));
        let real = v | CR4_VMXE | f0;
        (real & !f1 == 0).then_some(real)
    }
}

impl GuestCpu for Live<'_> {
    fn gpr(&self, n: u8) -> u64 {
        match n & 15 {
            4 => GuestRsp::read(&self.vmcs).unwrap_or(0),
            i => self.regs.0[i as usize],
        }
    }
    fn set_gpr(&mut self, n: u8, val: u64) {
        match n & 15 {
            4 => {
                let _ = GuestRsp::write(&mut self.vmcs, val);
            }
            i => self.regs.0[i as usize] = val,
        }
    }
    fn rip(&self) -> u64 {
        GuestRip::read(&self.vmcs).unwrap_or(0)
    }
    fn set_rip(&mut self, rip: u64) {
        let _ = GuestRip::write(&mut self.vmcs, rip);
        let s = GuestInterruptibilityState::read(&self.vmcs).unwrap_or(0);
        let _ = GuestInterruptibilityState::write(&mut self.vmcs, s & !3);
    }
    fn code_segment(&self) -> (u64, bool) {
        let base = GuestCsBase::read(&self.vmcs).unwrap_or(0);
        let long = GuestCsAccessRights::read(&self.vmcs).unwrap_or(0) & (1 << 13) != 0;
        (base, long)
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        read_guest_phys(self.ram, gpa, buf).is_ok()
    }
    fn skip_instruction(&mut self) {
        let len = ExitInstructionLength::read(&self.vmcs).unwrap_or(0) as u64;
        let rip = self.rip().wrapping_add(len);
        let _ = GuestRip::write(&mut self.vmcs, rip);
        // The instruction is done: blocking by STI / MOV SS ends with it.
        let s = GuestInterruptibilityState::read(&self.vmcs).unwrap_or(0);
        let _ = GuestInterruptibilityState::write(&mut self.vmcs, s & !3);
    }
    fn cr(&self, n: u8) -> u64 {
        let v = &self.vmcs;
        match n {
            0 => {
                let real = GuestCr0::read(v).unwrap_or(0);
                (real & !CR0_OWNED) | (Cr0ReadShadow::read(v).unwrap_or(0) & CR0_OWNED)
            }
            3 => GuestCr3::read(v).unwrap_or(0),
            4 => {
                let real = GuestCr4::read(v).unwrap_or(0);
                (real & !CR4_OWNED) | (Cr4ReadShadow::read(v).unwrap_or(0) & CR4_OWNED)
            }
            _ => 0,
        }
    }
    fn set_cr(&mut self, n: u8, val: u64) -> Result<(), platform::lapic::GpFault> {
        use platform::lapic::GpFault;
        let cr4 = self.cr(4);
        let v = &mut self.vmcs;
        match n {
            0 => {
                if val >> 32 != 0 || (val | CR0_NE | CR0_ET) & !vmx::capability(IA32_VMX_CR0_FIXED1) != 0 {
                    return Err(GpFault);
                }
                let old_efer = GuestIa32Efer::read(v).unwrap_or(0);
                let efer = platform::paging_transition(val, cr4, old_efer)?;
                // PAE paging outside long mode would need the PDPTE fields: not offered.
                if val & platform::CR0_PG != 0 && cr4 & platform::CR4_PAE != 0 && efer & platform::EFER_LMA == 0 {
                    return Err(GpFault);
                }
                let fixed0 = vmx::capability(IA32_VMX_CR0_FIXED0) & !(platform::CR0_PE | platform::CR0_PG);
                let _ = GuestCr0::write(v, val | CR0_ET | CR0_NE | fixed0);
                let _ = Cr0ReadShadow::write(v, val);
                let _ = GuestIa32Efer::write(v, efer);
                let entry = EntryControls::read(v).unwrap_or(0);
                let entry = if efer & platform::EFER_LMA != 0 { entry | ENTRY_IA32E } else { entry & !ENTRY_IA32E };
                let _ = EntryControls::write(v, entry);
                Ok(())
            }
            3 => {
                let _ = GuestCr3::write(v, val);
                Ok(())
            }
            4 => {
                if val & CR4_VMXE != 0 {
                    return Err(GpFault);
                }
                let lma = GuestIa32Efer::read(v).unwrap_or(0) & platform::EFER_LMA != 0;
                if lma && val & platform::CR4_PAE == 0 {
                    return Err(GpFault);
                }
                let real = Self::cr4_fixed(val).ok_or(GpFault)?;
                let _ = GuestCr4::write(v, real);
                let _ = Cr4ReadShadow::write(v, val);
                Ok(())
            }
            _ => Err(GpFault),
        }
    }
    fn msr(&self, m: CpuMsr) -> u64 {
        let v = &self.vmcs;
        let r = match m {
            CpuMsr::Efer => GuestIa32Efer::read(v),
            CpuMsr::FsBase => GuestFsBase::read(v),
            CpuMsr::GsBase => GuestGsBase::read(v),
            CpuMsr::SysenterCs => GuestIa32SysenterCs::read(v).map(|x| x as u64),
            CpuMsr::SysenterEsp => GuestIa32SysenterEsp::read(v),
            CpuMsr::SysenterEip => GuestIa32SysenterEip::read(v),
        };
        r.unwrap_or(0)
    }
    fn set_msr(&mut self, m: CpuMsr, val: u64) {
        let v = &mut self.vmcs;
        let _ = match m {
            CpuMsr::Efer => GuestIa32Efer::write(v, val),
            CpuMsr::FsBase => GuestFsBase::write(v, val),
            CpuMsr::GsBase => GuestGsBase::write(v, val),
            CpuMsr::SysenterCs => GuestIa32SysenterCs::write(v, val as u32),
            CpuMsr::SysenterEsp => GuestIa32SysenterEsp::write(v, val),
            CpuMsr::SysenterEip => GuestIa32SysenterEip::write(v, val),
        };
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let v = &mut self.vmcs;
        let mut info = INTR_VALID | INTR_TYPE_HW_EXC | vector as u32;
        if let Some(c) = error_code {
            info |= INTR_ERROR_CODE;
            let _ = EntryExceptionErrorCode::write(v, c);
        }
        let _ = EntryInterruptionInfo::write(v, info);
    }
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    fn tsc(&self) -> u64 {
        time::rdtsc()
    }
}

/// An HVM domain's state beside the generic `Domain`.
pub struct HvmDomain {
    vcpu: VmxVcpu,
    ept: Ept<EptFrames>,
    pub platform: Platform,
    /// The `set_timer` deadline of a hybrid guest (VIRQ_TIMER), kept apart
    /// from the APIC timer; `vcpu.timer_deadline` wakes for the earlier.
    pv_timer: Option<u64>,
    /// UART output not yet in the console ring (Dom0 drains the ring).
    console_pending: Vec<u8>,
    /// What the multiboot information page says, kept to add modules.
    boot: BootPage,
    /// In `sched_poll`: RAX becomes 1 if an event woke it.
    polling: bool,
    /// System time of the last VM exit (for `DomainCounters::hv_ns`).
    last_exit_ns: Option<u64>,
}

struct BootPage {
    mem_end: u64,
    cmdline: String,
    next_free: u64,
    modules: Vec<loader::GuestModule>,
}

/// Largest kernel image `domctl_create_hvm` copies.
const HVM_IMAGE_MAX: u64 = 8 << 20;

/// UART output waiting for Dom0 beyond this is printed by microhv itself.
const CONSOLE_BACKLOG: usize = 8192;

/// EPT table frames come from the frame allocator, reached through the
/// identity mapping; they are freed when the domain ends.
pub struct EptFrames;

impl TableMemory for EptFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = mm::alloc_frame()?;
        // SAFETY: a fresh frame of ours, identity-mapped.
        unsafe { core::ptr::write_bytes(f.addr() as *mut u8, 0, 4096) };
        Some(f.addr())
    }
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        // SAFETY: `pa` is an EPT table frame this domain allocated (identity-mapped).
        unsafe { &mut *(pa as *mut [u64; 512]) }
    }
}

fn free_ept(ept: &Ept<EptFrames>) {
    vmx::invept_all();
    for t in ept.table_frames() {
        if let Err(e) = mm::free_frame(microhv_core::frame::Mfn(t >> 12)) {
            log::error!("EPT table {t:#x} could not be freed: {e:?}");
        }
    }
}

/// Builds an HVM domain from a multiboot kernel image (a module without the
/// PV note). Refused, with the reason, when VT-x is not usable.
pub fn create(hv: &mut Hv, id: DomId, file: &[u8], args: &str) -> Result<usize, String> {
    let c = Cmdline(args);
    let name = c.get("name").unwrap_or("hvm");
    let nr_pages = c.get("mem").and_then(domain::parse_pages).unwrap_or(2048);
    let weight = c.get("weight").and_then(|w| w.parse::<u16>().ok()).unwrap_or(DEFAULT_WEIGHT);
    build(hv, id, file, name, nr_pages, weight, c.get("cmdline").unwrap_or(args))
}

/// `domctl_create_hvm`: Dom0's toolstack asks for an HVM domain from one of
/// the boot modules it was handed. Returns the new domid.
pub fn domctl_create_hvm(
    hv: &mut Hv,
    cur: usize,
    spec: shared_abi::GuestVa,
    module: u64,
    cmdline: shared_abi::GuestVa,
    cmdline_len: u64,
) -> Result<u64, shared_abi::Errno> {
    use shared_abi::Errno;
    let mut b = [0u8; 56];
    crate::hypercall::read_guest(hv, cur, spec, &mut b)?;
    let nr = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
    let weight = u16::from_le_bytes([b[16], b[17]]);
    let end = b[24..56].iter().position(|&c| c == 0).unwrap_or(32);
    let name = core::str::from_utf8(&b[24..24 + end]).map_err(|_| Errno::EINVAL)?.to_string();
    if name.is_empty() || weight == 0 || cmdline_len > 1024 {
        return Err(Errno::EINVAL);
    }
    let mut cmd = alloc::vec![0u8; cmdline_len as usize];
    crate::hypercall::read_guest(hv, cur, cmdline, &mut cmd)?;
    let cmd = String::from_utf8(cmd).map_err(|_| Errno::EINVAL)?;
    let m = *hv.dom0_modules.get(usize::try_from(module).map_err(|_| Errno::EINVAL)?).ok_or(Errno::EINVAL)?;
    if hv.domains.iter().any(|d| d.ended.is_none() && d.name == name) {
        return Err(Errno::EEXIST);
    }
    if Vmx::available().is_err() {
        log::warn!("domctl_create_hvm '{name}': refused: {}", Vmx::available().err().unwrap_or_default());
        return Err(Errno::ENOSYS);
    }
    // A copy of the image (the module's frames are Dom0's), from the heap:
    // refused, not a crash, when it does not fit.
    if m.size > HVM_IMAGE_MAX {
        return Err(Errno::E2BIG);
    }
    let mut image = Vec::new();
    image.try_reserve_exact(m.size as usize).map_err(|_| Errno::ENOMEM)?;
    image.resize(m.size as usize, 0);
    for (i, chunk) in image.chunks_mut(4096).enumerate() {
        Identity.read_bytes(Mfn(m.start_mfn + i as u64), 0, chunk);
    }
    let id = DomId(hv.next_domid);
    if hv.next_domid >= DomId::INVALID.0 {
        return Err(Errno::ENOSPC);
    }
    match build(hv, id, &image, &name, nr, weight, &cmd) {
        Ok(_) => {
            hv.next_domid += 1;
            Ok(id.0 as u64)
        }
        Err(e) => {
            log::warn!("domctl_create_hvm: {e}");
            Err(Errno::EINVAL)
        }
    }
}

/// Builds and starts an HVM domain `name` with `nr_pages` of memory from a
/// multiboot kernel image.
fn build(hv: &mut Hv, id: DomId, file: &[u8], name: &str, nr_pages: u64, weight: u16, cmdline: &str) -> Result<usize, String> {
    let name = name.to_string();
    if let Err(why) = Vmx::available() {
        return Err(format!("{name}: HVM domain refused: {why}"));
    }
    // Guest memory, then two pages outside it (not in the EPT) for the
    // console and store rings shared with Dom0.
    if !(512..=262_144).contains(&nr_pages) {
        return Err(format!("{name}: HVM memory must be 2 MiB .. 1 GiB"));
    }
    let mem_end = (nr_pages - 1) * 4096;
    let image = loader::parse_multiboot_kernel(file, mem_end).map_err(|e| format!("{name}: not a usable multiboot kernel: {e}"))?;
    let idx = domain::alloc_domain(hv, id, &name, nr_pages + 2, nr_pages + 2, weight, false)?;
    let fail = |hv: &mut Hv, why: String| -> Result<usize, String> {
        domain::end(hv, idx, EndReason::Killed(why.clone()));
        Err(why)
    };
    let frames = hv.domains[idx].p2m.clone();
    // Copy the segments (the frames are zeroed, so bss needs nothing).
    for s in &image.segments {
        let from = s.file_offset as usize;
        write_guest_phys(&frames, s.gpa, &file[from..from + s.filesz as usize]);
    }
    write_guest_phys(&frames, loader::MBI_GPA, &loader::multiboot_info(mem_end, cmdline, &[]));
    let boot = BootPage { mem_end, cmdline: cmdline.to_string(), next_free: image.end(), modules: Vec::new() };
    // The last page is microhv's shared_info for the domain (events for hybrid guests).
    let d = &mut hv.domains[idx];
    d.shared_info = frames[nr_pages as usize - 1];
    hv.frames.set_special(d.shared_info, true);
    d.write_time_record();
    // Ports start masked, as for PV guests; upcalls come as a vector.
    let mask = core::mem::offset_of!(shared_abi::shared_info::SharedInfo, evtchn_mask);
    for w in 0..shared_abi::shared_info::EVTCHN_PORTS / 64 {
        Identity.write_u64(d.shared_info, mask / 8 + w, u64::MAX);
    }
    // EPT: guest frame i -> p2m[i], every frame checked to be the domain's.
    let mfns: Vec<u64> = frames[..nr_pages as usize].iter().map(|m| m.0).collect();
    let mut ept = match Ept::new(EptFrames) {
        Ok(e) => e,
        Err(e) => return fail(hv, format!("{name}: no memory for the EPT: {e:?}")),
    };
    let owner = Owner::Domain(id);
    if let Err(e) = ept.map_domain(&mfns, |m| hv.frames.owner(Mfn(m)) == owner) {
        free_ept(&ept);
        return fail(hv, format!("{name}: EPT could not be built: {e:?}"));
    }
    // The console and store rings shared with Dom0 (as `offer_channels`
    // does for PV DomUs). The store page is also the guest's, at the frame
    // after the console's: a hybrid guest finds it through CPUID leaf
    // 0x4000_0002 and talks to Dom0's store (and so reaches the split
    // drivers). The console page stays outside the EPT: microhv produces it.
    let channels = match offer_console(hv, id, frames[nr_pages as usize], frames[nr_pages as usize + 1]) {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!("{name}: no console or store ring for dom0 ({e:?}); the UART prints through microhv");
            None
        }
    };
    let store_gfn = nr_pages + 1;
    if channels.is_some() {
        let store = frames[store_gfn as usize];
        if hv.frames.owner(store) != owner {
            free_ept(&ept);
            return fail(hv, format!("{name}: store frame not the domain's"));
        }
        if let Err(e) = ept.map_4k(store_gfn * 4096, store.0, microhv_core::ept::Rights::RW) {
            free_ept(&ept);
            return fail(hv, format!("{name}: EPT could not map the store page: {e:?}"));
        }
    }
    let tables = ept.table_frames().len();
    let vcpu = match Vmx::create_vcpu(image.entry, loader::MBI_GPA as u32, ept.eptp()) {
        Ok(v) => v,
        Err(e) => {
            free_ept(&ept);
            return fail(hv, format!("{name}: VMCS set-up failed: {e}"));
        }
    };
    let tsc_hz = time::tsc_hz();
    let policy = CpuidPolicy {
        tsc_khz: (tsc_hz / 1000).min(u32::MAX as u64) as u32,
        apic_timer_khz: (platform::lapic::TIMER_HZ / 1000) as u32,
        evtchn_vector: platform::EVTCHN_VECTOR,
        shared_info_gfn: (nr_pages - 1) as u32,
        domid: id.0,
        store_gfn: if channels.is_some() { store_gfn as u32 } else { 0 },
        store_port: channels.map_or(0, |c| c.store_port),
    };
    let d = &mut hv.domains[idx];
    d.hvm = Some(Box::new(HvmDomain { vcpu, ept, platform: Platform::new(policy), pv_timer: None, console_pending: Vec::new(), boot, polling: false, last_exit_ns: None }));
    // The UART's output goes to Dom0's console backend like a PV DomU's
    // console ring (microhv is the ring's producer), so its lines come out
    // whole, as `[name] ...`; without Dom0 microhv prints them itself.
    d.channels = channels;
    hv.domains[idx].building = false;
    log::info!(
        "domain {} '{}': HVM (VT-x), {} pages ({} KiB), multiboot kernel entry {:#x} in 32-bit protected mode, EPT with {} tables, weight {weight}",
        id.0, name, nr_pages, nr_pages * 4, image.entry, tables
    );
    hv.sched.add(VcpuId(idx), weight);
    Ok(idx)
}

/// Writes `bytes` at guest-physical `gpa` of a domain whose frames are
/// `p2m` (the caller checked the range).
fn write_guest_phys(p2m: &[Mfn], gpa: u64, bytes: &[u8]) {
    let mut done = 0usize;
    while done < bytes.len() {
        let at = gpa + done as u64;
        let off = (at % 4096) as usize;
        let n = (4096 - off).min(bytes.len() - done);
        Identity.write_bytes(p2m[(at / 4096) as usize], off, &bytes[done..done + n]);
        done += n;
    }
}

/// Loads a boot module (`for=<name>` on its line) into the HVM domain
/// `target`, which has not run yet, after its kernel and earlier modules,
/// and lists it in the guest's multiboot information.
pub fn add_module(hv: &mut Hv, target: &str, file: &[u8], args: &str) -> Result<(), String> {
    let idx = hv
        .domains
        .iter()
        .position(|d| d.name == target && d.ended.is_none() && d.hvm.is_some())
        .ok_or_else(|| format!("for={target}: no HVM domain of that name (a module must follow its kernel's line)"))?;
    let d = &mut hv.domains[idx];
    let Some(h) = d.hvm.as_mut() else { return Err(format!("for={target}: not an HVM domain")) };
    if h.vcpu.launched || h.boot.modules.len() >= loader::MAX_MODULES {
        return Err(format!("for={target}: the domain has started or has {} modules already", loader::MAX_MODULES));
    }
    let (start, next) = loader::place_module(h.boot.next_free, file.len() as u64, h.boot.mem_end)
        .map_err(|e| format!("for={target}: the module does not fit in the guest's memory: {e}"))?;
    write_guest_phys(&d.p2m, start, file);
    h.boot.next_free = next;
    h.boot.modules.push(loader::GuestModule { start, end: start + file.len() as u64, cmdline: args.to_string() });
    let page = loader::multiboot_info(h.boot.mem_end, &h.boot.cmdline, &h.boot.modules);
    write_guest_phys(&d.p2m, loader::MBI_GPA, &page);
    log::info!("{target}: boot module '{args}' ({} bytes) at guest-physical {start:#x}", file.len());
    Ok(())
}

/// Console and store pages for Dom0's backends (as `offer_channels` does
/// for PV DomUs): granted to Dom0, each with an unbound port for it.
fn offer_console(hv: &mut Hv, id: DomId, console: Mfn, store: Mfn) -> Result<shared_abi::hypercall::DomainChannels, shared_abi::Errno> {
    for f in [console, store] {
        shared_abi::console::init(&mut domain::FramePage(f));
    }
    let dom0 = DomId::DOM0;
    let console_gref = hv.grants.grant(id, dom0, console, false)?;
    let store_gref = hv.grants.grant(id, dom0, store, false)?;
    let console_port = hv.evtchn.alloc_unbound(id, dom0)?;
    let store_port = hv.evtchn.alloc_unbound(id, dom0)?;
    Ok(shared_abi::hypercall::DomainChannels { console_gref, console_port, store_gref, store_port })
}

/// Bytes of UART output not yet taken by Dom0's console backend: what
/// waits in microhv plus what is unread in the ring (nothing while Dom0 is
/// not connected: then microhv prints the output itself, at once). Moves
/// waiting output into the ring first.
fn console_backlog(hv: &mut Hv, idx: usize) -> usize {
    console_out(hv, idx, &[]);
    let connected = console_connected(hv, idx);
    let d = &hv.domains[idx];
    let Some(h) = d.hvm.as_ref() else { return 0 };
    if !connected {
        return h.console_pending.len();
    }
    let console = d.p2m[d.p2m.len() - 2];
    h.console_pending.len() + shared_abi::console::out_pending(&domain::FramePage(console)).unwrap_or(0)
}

/// Dom0's console backend has bound the domain's console port.
fn console_connected(hv: &Hv, idx: usize) -> bool {
    let d = &hv.domains[idx];
    d.channels.is_some_and(|ch| {
        matches!(hv.evtchn.status(d.id, ch.console_port), Ok(microhv_core::evtchn::ChannelState::Interdomain { .. }))
    })
}

/// Moves UART output into the console ring and tells Dom0; prints it
/// directly while Dom0's backend is not connected (its port not bound yet),
/// and when the backlog grows too long.
fn console_out(hv: &mut Hv, idx: usize, bytes: &[u8]) {
    let d = &mut hv.domains[idx];
    let Some(h) = d.hvm.as_mut() else { return };
    h.console_pending.extend_from_slice(bytes);
    let connected = console_connected(hv, idx);
    let d = &mut hv.domains[idx];
    let Some(h) = d.hvm.as_mut() else { return };
    let (Some(ch), true) = (d.channels, connected) else {
        let out = core::mem::take(&mut h.console_pending);
        domain::console_write(d, &out);
        return;
    };
    let console = d.p2m[d.p2m.len() - 2];
    let n = shared_abi::console::write_out(&mut domain::FramePage(console), &h.console_pending);
    h.console_pending.drain(..n);
    if h.console_pending.len() > CONSOLE_BACKLOG {
        let out = core::mem::take(&mut h.console_pending);
        domain::console_write(d, &out);
    }
    if n > 0 {
        let id = d.id;
        if let Ok((rd, rp)) = hv.evtchn.send(id, ch.console_port) {
            if let Some(r) = domain::index_of(hv, rd) {
                domain::raise(hv, r, rp);
            }
        }
    }
}

/// Gives back what an HVM domain holds beyond its memory (VMCS, EPT), and
/// logs its exit counters.
pub fn destroy(d: &mut domain::Domain, h: Box<HvmDomain>) {
    let HvmDomain { vcpu, ept, platform, console_pending, .. } = *h;
    if !console_pending.is_empty() {
        domain::console_write(d, &console_pending);
    }
    let name = &d.name;
    let s = &platform.stats;
    log::info!(
        "{name}: {} VM exits (I/O {}, MSR {}, APIC MMIO {}, CPUID {}, HLT {}, CR {}, host interrupts {}, preemption timer {}, VMCALL {}), {} interrupts injected, {} unknown ports, {} refused MSR accesses",
        s.exits, s.io, s.msr, s.mmio, s.cpuid, s.hlt, s.cr, s.external, s.preempted, s.vmcall, platform.lapic.injected, s.unknown_ports, s.unknown_msrs
    );
    Vmx::destroy_vcpu(vcpu);
    free_ept(&ept);
}

/// VMCALL: the same table and handlers as PV hypercalls, limited to the
/// table's HVM column. Number in RAX, arguments in RDI, RSI, RDX, R10, R8,
/// result in RAX; pointers are guest-physical addresses. Returns true when
/// the scheduler must pick again.
fn vmcall(hv: &mut Hv, idx: usize) -> bool {
    use crate::hypercall::{dispatch, Outcome};
    use shared_abi::hypercall::{check_access, Call, GuestKind, CONSOLE_WRITE_MAX};
    use shared_abi::Errno;
    let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
    let r = h.vcpu.regs.0;
    // The call returns after the VMCALL instruction whatever happens.
    Live { regs: &mut h.vcpu.regs, vmcs: CurrentVmcs, ram: &[] }.skip_instruction();
    let nr = r[0];
    hv.domains[idx].counters.hypercalls += 1;
    let call = check_access(nr, GuestKind::Hvm, false).and_then(|_| Call::decode(nr, [r[7], r[6], r[2], r[10], r[8]]));
    let out = match call {
        Err(e) => Outcome::Ret(Err(e)),
        Ok(Call::ConsoleWrite { buf, len }) => Outcome::Ret(if len > CONSOLE_WRITE_MAX {
            Err(Errno::EINVAL)
        } else {
            let mut bytes = alloc::vec![0u8; len as usize];
            read_guest_phys(guest_frames(&hv.domains[idx]), buf.0, &mut bytes).map(|_| {
                // Same path as the UART: Dom0's console ring.
                console_out(hv, idx, &bytes);
                len
            })
        }),
        // Calls without guest pointers run the PV handlers unchanged.
        Ok(
            c @ (Call::Version { .. }
            | Call::SchedYield {}
            | Call::SchedBlock {}
            | Call::SchedShutdown { .. }
            | Call::SetTimer { .. }
            | Call::EvtchnBindVirq { .. }
            | Call::EvtchnAllocUnbound { .. }
            | Call::EvtchnBindInterdomain { .. }
            | Call::EvtchnSend { .. }
            | Call::EvtchnClose { .. }
            | Call::EvtchnUnmask { .. }
            | Call::GrantEnd { .. }),
        ) => dispatch(hv, idx, c),
        // Guest-physical pointers: copied through the domain's frames.
        Ok(Call::MemoryQuery { info }) => {
            let d = &hv.domains[idx];
            let pages = d.p2m.len().saturating_sub(2) as u64;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&pages.to_le_bytes());
            b[8..].copy_from_slice(&pages.to_le_bytes());
            Outcome::Ret(write_guest_checked(d, info.0, &b).map(|_| 0))
        }
        Ok(Call::EvtchnStatus { port, out }) => {
            let id = hv.domains[idx].id;
            let r = crate::hypercall::evtchn_status_record(hv, id, port).and_then(|b| write_guest_checked(&hv.domains[idx], out.0, &b));
            Outcome::Ret(r.map(|_| 0))
        }
        // A guest frame number stands for the frame: translated, then the
        // PV checks (the domain's own plain data frame) apply.
        Ok(Call::GrantAccess { grantee, frame, readonly }) => {
            let d = &hv.domains[idx];
            match guest_frames(d).get(frame.0 as usize) {
                Some(&mfn) => dispatch(hv, idx, Call::GrantAccess { grantee, frame: mfn, readonly }),
                None => Outcome::Ret(Err(Errno::EINVAL)),
            }
        }
        Ok(Call::SchedPoll { deadline_ns }) => {
            let out = dispatch(hv, idx, Call::SchedPoll { deadline_ns });
            if let (Outcome::Reschedule(_), Some(h)) = (&out, hv.domains[idx].hvm.as_mut()) {
                // Blocked: `domain::raise` marks the PV register copy when an
                // event wakes it; `run` hands that to the guest.
                h.polling = true;
                hv.domains[idx].vcpu.regs.rax = 0;
            }
            out
        }
        // The GrantCopy record and the local buffer are guest-physical.
        Ok(Call::GrantCopy { op }) => Outcome::Ret(hvm_grant_copy(hv, idx, op.0)),
        // Its own counters only (an HVM guest is never privileged).
        Ok(Call::DomainCountersGet { domid, out }) => {
            let d = &hv.domains[idx];
            let mut c = d.counters;
            if let Some(h) = d.hvm.as_ref() {
                let s = &h.platform.stats;
                (c.exits_io, c.exits_msr, c.exits_cpuid, c.exits_hlt, c.exits_apic) = (s.io, s.msr, s.cpuid, s.hlt, s.mmio);
                c.exits_other = s.exits.saturating_sub(s.io + s.msr + s.cpuid + s.hlt + s.mmio + s.vmcall);
            }
            Outcome::Ret(if domid != d.id {
                Err(Errno::EPERM)
            } else {
                write_guest_checked(d, out.0, &crate::hypercall::counters_bytes(&c)).map(|_| 0)
            })
        }
        Ok(_) => Outcome::Ret(Err(Errno::ENOSYS)),
    };
    if let Ok(Call::SetTimer { deadline_ns }) = call {
        if let Some(h) = hv.domains[idx].hvm.as_mut() {
            h.pv_timer = (deadline_ns != 0).then_some(deadline_ns);
        }
    }
    let mirror = hv.domains[idx].hvm.as_ref().and_then(|h| [h.platform.lapic.deadline(), h.pv_timer].into_iter().flatten().min());
    domain::set_timer(hv, idx, mirror);
    let (ret, resched) = match out {
        Outcome::Ret(v) => (v, false),
        Outcome::Reschedule(v) => (v, true),
        Outcome::Resumed => return true,
    };
    if let Err(e) = ret {
        log::debug!("{}: VMCALL {nr} -> {e:?}", hv.domains[idx].name);
    }
    match hv.domains[idx].hvm.as_mut() {
        Some(h) => {
            h.vcpu.regs.0[0] = Errno::encode(ret) as u64;
            resched
        }
        // The call ended the domain.
        None => true,
    }
}

/// `grant_copy` for an HVM guest: the same checks as PV
/// (`hypercall::grant_copy_plan`), copies to and from guest-physical memory.
fn hvm_grant_copy(hv: &Hv, idx: usize, op: u64) -> Result<u64, shared_abi::Errno> {
    let d = &hv.domains[idx];
    let mut b = [0u8; 32];
    read_guest_phys(guest_frames(d), op, &mut b)?;
    let p = crate::hypercall::grant_copy_plan(hv, d.id, &b)?;
    let mut buf = alloc::vec![0u8; p.len];
    if p.to_granted {
        read_guest_phys(guest_frames(d), p.local, &mut buf)?;
        Identity.write_bytes(p.mfn, p.offset, &buf);
    } else {
        Identity.read_bytes(p.mfn, p.offset, &mut buf);
        write_guest_checked(d, p.local, &buf)?;
    }
    Ok(p.len as u64)
}

/// The frames of a domain's guest-physical memory (without the two ring
/// pages microhv keeps outside it).
fn guest_frames(d: &domain::Domain) -> &[Mfn] {
    &d.p2m[..d.p2m.len().saturating_sub(2)]
}

/// Writes `bytes` at guest-physical `gpa`, inside the guest's memory only.
fn write_guest_checked(d: &domain::Domain, gpa: u64, bytes: &[u8]) -> Result<(), shared_abi::Errno> {
    let frames = guest_frames(d);
    let end = gpa.checked_add(bytes.len() as u64).ok_or(shared_abi::Errno::EFAULT)?;
    if end > frames.len() as u64 * 4096 {
        return Err(shared_abi::Errno::EFAULT);
    }
    write_guest_phys(frames, gpa, bytes);
    Ok(())
}

/// Copies guest-physical memory of a domain (through its p2m) into `buf`.
fn read_guest_phys(p2m: &[Mfn], gpa: u64, buf: &mut [u8]) -> Result<(), shared_abi::Errno> {
    let end = gpa.checked_add(buf.len() as u64).ok_or(shared_abi::Errno::EFAULT)?;
    if end > p2m.len() as u64 * 4096 {
        return Err(shared_abi::Errno::EFAULT);
    }
    let mut done = 0usize;
    while done < buf.len() {
        let at = gpa + done as u64;
        let off = (at % 4096) as usize;
        let n = (4096 - off).min(buf.len() - done);
        Identity.read_bytes(p2m[(at / 4096) as usize], off, &mut buf[done..done + n]);
        done += n;
    }
    Ok(())
}

/// Before an entry: fire the virtual timer, then inject the highest pending
/// interrupt if the guest can take it, or ask for an exit when it can.
/// Returns the vector injected on this entry, if any.
fn prepare_entry(h: &mut HvmDomain, now: u64, slice_end: u64) -> Option<u8> {
    h.platform.lapic.tick(now);
    let v = &mut CurrentVmcs;
    // The rest of the slice on the VMX preemption timer, which counts TSC
    // ticks divided by 2^(IA32_VMX_MISC[4:0]).
    if PinBasedControls::read(v).unwrap_or(0) & PIN_PREEMPTION_TIMER != 0 {
        let ns = slice_end.saturating_sub(now) as u128;
        let ticks = ns * time::tsc_hz() as u128 / 1_000_000_000;
        let shift = vmx::capability(IA32_VMX_MISC) & 0x1f;
        let _ = PreemptionTimerValue::write(v, (ticks >> shift).min(u32::MAX as u128) as u32);
    }
    let busy = h.vcpu.reinject.is_some() || EntryInterruptionInfo::read(v).unwrap_or(0) & INTR_VALID != 0;
    let proc = ProcBasedControls::read(v).unwrap_or(0);
    let mut window = false;
    let mut injected = None;
    if let Some(vector) = h.platform.lapic.pending() {
        let rflags = GuestRflags::read(v).unwrap_or(0);
        let blocked = GuestInterruptibilityState::read(v).unwrap_or(0) & 3 != 0;
        if !busy && rflags & (1 << 9) != 0 && !blocked {
            let _ = EntryInterruptionInfo::write(v, INTR_VALID | INTR_TYPE_EXT | vector as u32);
            h.platform.lapic.ack(vector);
            injected = Some(vector);
        } else {
            window = true;
        }
    }
    let want = if window { proc | PROC_INT_WINDOW } else { proc & !PROC_INT_WINDOW };
    if want != proc {
        let _ = ProcBasedControls::write(v, want);
    }
    injected
}

/// Runs HVM vCPU `idx` until something needs the scheduler: returns true
/// when the scheduler must pick again (slice over, vCPU blocked or ended).
pub fn run(hv: &mut Hv, idx: usize) -> bool {
    let resched = run_once(hv, idx);
    // The domain's time in microhv runs from its exit to its next entry,
    // unless another domain runs in between: stop the clock here, so that
    // `hv_ns` never counts other domains' time.
    if resched {
        let d = &mut hv.domains[idx];
        if let Some(t) = d.hvm.as_mut().and_then(|h| h.last_exit_ns.take()) {
            d.counters.hv_ns += time::nanos_since_boot().saturating_sub(t);
        }
    }
    resched
}

fn run_once(hv: &mut Hv, idx: usize) -> bool {
    let now = time::nanos_since_boot();
    let slice_end = hv.slice_end;
    let name = hv.domains[idx].name.clone();
    // A hybrid guest's set_timer deadline: its VIRQ_TIMER event (a vector).
    if let Some(h) = hv.domains[idx].hvm.as_mut() {
        if h.pv_timer.is_some_and(|t| t <= now) {
            h.pv_timer = None;
            domain::send_virq(hv, idx, shared_abi::hypercall::VIRQ_TIMER);
        }
    }
    // Woken from sched_poll: 1 if an event did it (see `domain::raise`).
    let woke_by_event = hv.domains[idx].vcpu.regs.rax == 1;
    let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
    if h.polling {
        h.polling = false;
        h.vcpu.regs.0[0] = woke_by_event as u64;
    }
    // Time in microhv since the last exit (handling it, and scheduling).
    if let Some(t) = h.last_exit_ns.take() {
        hv.domains[idx].counters.hv_ns += now.saturating_sub(t);
    }
    let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
    if let Err(e) = make_current(h.vcpu.vmcs) {
        domain::kill(hv, idx, e);
        return true;
    }
    // An injected event vector is the hybrid's upcall (counted as one).
    let injected = prepare_entry(h, now, slice_end);
    let exit = match Vmx::run(&mut h.vcpu) {
        Ok(e) => e,
        Err(e) => {
            domain::kill(hv, idx, e);
            return true;
        }
    };
    let now = time::nanos_since_boot();
    h.last_exit_ns = Some(now);
    if injected == Some(platform::EVTCHN_VECTOR) {
        hv.domains[idx].counters.upcalls += 1;
    }
    let action = if exit == VmExit::ExternalInterrupt {
        hv.domains[idx].counters.interrupts += 1;
        let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
        h.platform.stats.exits += 1;
        h.platform.stats.external += 1;
        Action::ExternalInterrupt
    } else {
        // A read of the UART's line status: move waiting output on into
        // the console ring first, then let LSR show what is still waiting.
        if let VmExit::IoInstruction { port, write: false, .. } = exit {
            if port == platform::uart::COM1_BASE + 5 {
                let backlog = console_backlog(hv, idx);
                if let Some(h) = hv.domains[idx].hvm.as_mut() {
                    h.platform.uart.tx_backlog = backlog;
                }
            }
        }
        let d = &mut hv.domains[idx];
        d.counters.entries += 1;
        d.counters.vm_exits += 1;
        let ram = &d.p2m[..d.p2m.len().saturating_sub(2)];
        let Some(h) = d.hvm.as_mut() else { return true };
        let mut live = Live { regs: &mut h.vcpu.regs, vmcs: CurrentVmcs, ram };
        platform::handle_exit(&mut live, &mut h.platform, exit, now)
    };
    let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
    let out = core::mem::take(&mut h.platform.output);
    let notes = core::mem::take(&mut h.platform.notes);
    let deadline = [h.platform.lapic.deadline(), h.pv_timer].into_iter().flatten().min();
    domain::set_timer(hv, idx, deadline);
    for n in notes {
        log::warn!("{name}: {n}");
    }
    if !out.is_empty() {
        console_out(hv, idx, &out);
    }
    match action {
        Action::Resume | Action::InterruptWindow => false,
        Action::ExternalInterrupt => {
            let info = ExitInterruptionInfo::read(&CurrentVmcs).unwrap_or(0);
            let vector = info as u8;
            if vector != apic::SPURIOUS_VECTOR {
                apic::eoi();
            }
            vector == apic::TIMER_VECTOR && now >= hv.slice_end
        }
        Action::Preempted => {
            if let Some(h) = hv.domains[idx].hvm.as_mut() {
                h.platform.stats.preempted += 1;
            }
            true
        }
        Action::Halt => {
            let Some(h) = hv.domains[idx].hvm.as_mut() else { return true };
            h.platform.lapic.tick(now);
            if h.platform.lapic.pending().is_some() {
                return false;
            }
            let rflags = GuestRflags::read(&CurrentVmcs).unwrap_or(0);
            if rflags & (1 << 9) == 0 {
                domain::kill(hv, idx, "HLT with interrupts disabled: the vCPU could never wake".into());
                return true;
            }
            hv.sched.block(VcpuId(idx), None);
            true
        }
        Action::Vmcall => vmcall(hv, idx),
        Action::PowerOff(code) => {
            let reason = if code == 0 { EndReason::Poweroff } else { EndReason::ExitCode(code) };
            domain::end(hv, idx, reason);
            true
        }
        Action::Kill(why) => {
            domain::kill(hv, idx, why);
            true
        }
    }
}
