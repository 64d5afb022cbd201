//! Decoding VM exits (Intel SDM vol. 3, "VM Exits", and appendix C for the
//! basic exit reasons).

/// Basic exit reasons (bits 15:0 of the exit-reason field).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const INVLPG: u16 = 14;
    pub const VMCALL: u16 = 18;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    /// VM-entry failure due to MSR loading.
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    /// VM-entry failure due to a machine-check event.
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const XSETBV: u16 = 55;
}

/// Bit 31 of the exit-reason field: the VM entry failed.
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// Interruption-information bits (VM-exit interruption information).
const INTR_INFO_ERROR_CODE_VALID: u32 = 1 << 11;

/// What kind of control-register access caused a CR-access exit
/// (exit qualification bits 5:4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccessKind {
    /// MOV to CR (from the GPR).
    MovTo,
    /// MOV from CR (to the GPR).
    MovFrom,
    /// CLTS.
    Clts,
    /// LMSW with its 16-bit source operand (qualification bits 31:16).
    Lmsw { source: u16 },
}

/// A decoded VM exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    ExceptionOrNmi { vector: u8, error_code: Option<u32> },
    ExternalInterrupt,
    TripleFault,
    InterruptWindow,
    Cpuid,
    Hlt,
    Invlpg,
    Rdmsr,
    Wrmsr,
    Vmcall,
    /// `gpr` is the general-purpose register number (0 = RAX ... 15 = R15).
    CrAccess { cr: u8, kind: CrAccessKind, gpr: u8 },
    /// `size` is in bytes (1, 2 or 4); `write` is OUT/OUTS.
    IoInstruction { port: u16, size: u8, write: bool, string: bool, rep: bool },
    EptViolation { gpa: u64, read: bool, write: bool, fetch: bool, gla_valid: bool },
    EptMisconfig { gpa: u64 },
    PreemptionTimer,
    Xsetbv,
    /// The VM entry failed (bit 31 of the exit reason); `reason` is the basic reason.
    EntryFailure { reason: u16, qualification: u64 },
    /// A reason this decoder does not handle.
    Unknown { reason: u16, qualification: u64 },
}

/// Decodes a VM exit from the exit reason, exit qualification, guest-physical
/// address, VM-exit interruption information and its error code. Never panics.
pub fn decode(reason: u32, qualification: u64, gpa: u64, intr_info: u32, intr_error: u32) -> VmExit {
    let basic = reason as u16;
    if reason & EXIT_REASON_ENTRY_FAILURE != 0 {
        return VmExit::EntryFailure { reason: basic, qualification };
    }
    let q = qualification;
    match basic {
        reason::EXCEPTION_OR_NMI => VmExit::ExceptionOrNmi {
            vector: intr_info as u8,
            error_code: (intr_info & INTR_INFO_ERROR_CODE_VALID != 0).then_some(intr_error),
        },
        reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
        reason::TRIPLE_FAULT => VmExit::TripleFault,
        reason::INTERRUPT_WINDOW => VmExit::InterruptWindow,
        reason::CPUID => VmExit::Cpuid,
        reason::HLT => VmExit::Hlt,
        reason::INVLPG => VmExit::Invlpg,
        reason::RDMSR => VmExit::Rdmsr,
        reason::WRMSR => VmExit::Wrmsr,
        reason::VMCALL => VmExit::Vmcall,
        reason::CR_ACCESS => {
            let kind = match (q >> 4) & 3 {
                0 => CrAccessKind::MovTo,
                1 => CrAccessKind::MovFrom,
                2 => CrAccessKind::Clts,
                _ => CrAccessKind::Lmsw { source: (q >> 16) as u16 },
            };
            VmExit::CrAccess { cr: (q & 0xF) as u8, kind, gpr: ((q >> 8) & 0xF) as u8 }
        }
        reason::IO_INSTRUCTION => VmExit::IoInstruction {
            port: (q >> 16) as u16,
            size: (q & 7) as u8 + 1,
            write: q & (1 << 3) == 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
        },
        reason::EPT_VIOLATION => VmExit::EptViolation {
            gpa,
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            gla_valid: q & (1 << 7) != 0,
        },
        reason::EPT_MISCONFIG => VmExit::EptMisconfig { gpa },
        reason::PREEMPTION_TIMER => VmExit::PreemptionTimer,
        reason::XSETBV => VmExit::Xsetbv,
        _ => VmExit::Unknown { reason: basic, qualification },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(reason: u32) -> VmExit {
        decode(reason, 0, 0, 0, 0)
    }

    #[test]
    fn reasons_without_payload() {
        assert_eq!(simple(1), VmExit::ExternalInterrupt);
        assert_eq!(simple(2), VmExit::TripleFault);
        assert_eq!(simple(7), VmExit::InterruptWindow);
        assert_eq!(simple(10), VmExit::Cpuid);
        assert_eq!(simple(12), VmExit::Hlt);
        assert_eq!(simple(14), VmExit::Invlpg);
        assert_eq!(simple(18), VmExit::Vmcall);
        assert_eq!(simple(31), VmExit::Rdmsr);
        assert_eq!(simple(32), VmExit::Wrmsr);
        assert_eq!(simple(52), VmExit::PreemptionTimer);
        assert_eq!(simple(55), VmExit::Xsetbv);
    }

    #[test]
    fn exception_with_and_without_error_code() {
        // #GP (13), hardware exception (type 3), error code valid, valid bit.
        let info = (1 << 31) | (1 << 11) | (3 << 8) | 13;
        assert_eq!(
            decode(0, 0, 0, info, 0x18),
            VmExit::ExceptionOrNmi { vector: 13, error_code: Some(0x18) }
        );
        // #UD (6): no error code; the error-code field is ignored.
        let info = (1 << 31) | (3 << 8) | 6;
        assert_eq!(decode(0, 0, 0, info, 0xdead), VmExit::ExceptionOrNmi { vector: 6, error_code: None });
        // NMI: vector 2, type 2.
        let info = (1 << 31) | (2 << 8) | 2;
        assert_eq!(decode(0, 0, 0, info, 0), VmExit::ExceptionOrNmi { vector: 2, error_code: None });
    }

    #[test]
    fn cr_access() {
        // MOV CR3, RBX: cr 3, type 0, gpr 3.
        assert_eq!(
            decode(28, (3 << 8) | 3, 0, 0, 0),
            VmExit::CrAccess { cr: 3, kind: CrAccessKind::MovTo, gpr: 3 }
        );
        // MOV R12, CR8: cr 8, type 1, gpr 12.
        assert_eq!(
            decode(28, (12 << 8) | (1 << 4) | 8, 0, 0, 0),
            VmExit::CrAccess { cr: 8, kind: CrAccessKind::MovFrom, gpr: 12 }
        );
        // CLTS: cr 0, type 2.
        assert_eq!(decode(28, 2 << 4, 0, 0, 0), VmExit::CrAccess { cr: 0, kind: CrAccessKind::Clts, gpr: 0 });
        // LMSW 0x0011: cr 0, type 3, source data in 31:16.
        assert_eq!(
            decode(28, (0x0011 << 16) | (3 << 4), 0, 0, 0),
            VmExit::CrAccess { cr: 0, kind: CrAccessKind::Lmsw { source: 0x11 }, gpr: 0 }
        );
    }

    #[test]
    fn io_instruction() {
        // OUT DX, AL to port 0x3f8: size 1 (0), direction out (bit 3 = 0).
        assert_eq!(
            decode(30, 0x3f8 << 16, 0, 0, 0),
            VmExit::IoInstruction { port: 0x3f8, size: 1, write: true, string: false, rep: false }
        );
        // REP INSD from port 0xcfc: size 4 (3), in, string, rep.
        let q = (0xcfc << 16) | (1 << 5) | (1 << 4) | (1 << 3) | 3;
        assert_eq!(
            decode(30, q, 0, 0, 0),
            VmExit::IoInstruction { port: 0xcfc, size: 4, write: false, string: true, rep: true }
        );
        // IN AX, 0x60: size 2 (1), in.
        assert_eq!(
            decode(30, (0x60 << 16) | (1 << 3) | 1, 0, 0, 0),
            VmExit::IoInstruction { port: 0x60, size: 2, write: false, string: false, rep: false }
        );
    }

    #[test]
    fn ept_violation_and_misconfig() {
        assert_eq!(
            decode(48, (1 << 7) | 2, 0xfee0_0000, 0, 0),
            VmExit::EptViolation { gpa: 0xfee0_0000, read: false, write: true, fetch: false, gla_valid: true }
        );
        assert_eq!(
            decode(48, 1 | 4, 0x1000, 0, 0),
            VmExit::EptViolation { gpa: 0x1000, read: true, write: false, fetch: true, gla_valid: false }
        );
        assert_eq!(decode(49, 0, 0x8000_0000, 0, 0), VmExit::EptMisconfig { gpa: 0x8000_0000 });
    }

    #[test]
    fn entry_failure() {
        assert_eq!(
            decode(EXIT_REASON_ENTRY_FAILURE | 33, 0, 0, 0, 0),
            VmExit::EntryFailure { reason: 33, qualification: 0 }
        );
        // MSR loading failure: the qualification is the failing entry's index.
        assert_eq!(
            decode(EXIT_REASON_ENTRY_FAILURE | 34, 2, 0, 0, 0),
            VmExit::EntryFailure { reason: 34, qualification: 2 }
        );
    }

    #[test]
    fn unknown_reasons_never_panic() {
        assert_eq!(decode(9, 0x42, 0, 0, 0), VmExit::Unknown { reason: 9, qualification: 0x42 });
        assert_eq!(decode(0xFFFF, 7, 0, 0, 0), VmExit::Unknown { reason: 0xFFFF, qualification: 7 });
        // Every basic reason with arbitrary payloads decodes to something.
        for r in 0..=u16::MAX as u32 {
            let _ = decode(r, u64::MAX, u64::MAX, u32::MAX, u32::MAX);
        }
        let _ = decode(u32::MAX, u64::MAX, u64::MAX, u32::MAX, u32::MAX);
    }
}
