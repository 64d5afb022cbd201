//! Typed VMCS field accessors.
//!
//! Every field is a zero-sized type with its encoding (`ENCODING`), width
//! (`WIDTH`) and associated functions `read` and — only for writable fields —
//! `write`, taking the value type that matches the field's width. Writing a
//! read-only field is therefore a compile error:
//!
//! ```compile_fail
//! use microhv_core::vmx::vmcs::{ExitReason, VmcsAccess};
//! fn f(v: &mut impl VmcsAccess) {
//!     // ExitReason is read-only: it has no `write`.
//!     let _ = ExitReason::write(v, 0);
//! }
//! ```
//!
//! whereas a read-write field compiles:
//!
//! ```
//! use microhv_core::vmx::vmcs::{GuestRip, VmcsAccess};
//! fn f(v: &mut impl VmcsAccess) {
//!     let _ = GuestRip::write(v, 0x1000);
//! }
//! ```
//!
//! Encodings are from Intel SDM vol. 3, appendix B. An encoding's bits say
//! what it is: bit 0 access type (full/high), bits 9:1 index, bits 11:10 type
//! (0 control, 1 VM-exit information, 2 guest state, 3 host state), bits 14:13
//! width (0 16-bit, 1 64-bit, 2 32-bit, 3 natural); the tests check each
//! declaration against these rules.

use core::fmt;

/// Access to the current VMCS. The kernel implements it with VMREAD/VMWRITE.
pub trait VmcsAccess {
    /// Reads the field with this encoding (zero-extended to 64 bits).
    fn vmread(&self, encoding: u32) -> Result<u64, VmxError>;
    /// Writes the field with this encoding.
    fn vmwrite(&mut self, encoding: u32, value: u64) -> Result<(), VmxError>;
}

/// A failed VMX instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// VMfailInvalid: there is no current VMCS (CF=1).
    FailInvalid,
    /// VMfailValid (ZF=1) with the VM-instruction error number from the VMCS.
    FailValid(u32),
    /// The backend does not know or support this field encoding.
    UnsupportedField(u32),
}

/// Text for a VM-instruction error number (SDM vol. 3, "VM Instruction Error Numbers").
pub fn instruction_error_text(n: u32) -> &'static str {
    match n {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmxError::FailInvalid => write!(f, "VMX instruction failed: no current VMCS"),
            VmxError::FailValid(n) => {
                write!(f, "VMX instruction failed: error {n} ({})", instruction_error_text(n))
            }
            VmxError::UnsupportedField(e) => write!(f, "unsupported VMCS field {e:#06x}"),
        }
    }
}

/// Width of a VMCS field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W16,
    W32,
    W64,
    /// 64 bits on x86_64.
    Natural,
}

/// Description of one declared field (for tests and debugging dumps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    pub name: &'static str,
    pub encoding: u32,
    pub width: Width,
    pub writable: bool,
}

macro_rules! field_ty {
    (W16) => { u16 };
    (W32) => { u32 };
    (W64) => { u64 };
    (Natural) => { u64 };
}

macro_rules! field_writable {
    (RW) => { true };
    (RO) => { false };
}

macro_rules! vmcs_field {
    (@common $(#[$m:meta])* $name:ident, $enc:literal, $w:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name;

        impl $name {
            /// The field's VMCS encoding.
            pub const ENCODING: u32 = $enc;
            /// The field's width.
            pub const WIDTH: Width = Width::$w;

            /// Reads the field (bits beyond its width are dropped).
            pub fn read<V: VmcsAccess + ?Sized>(v: &V) -> Result<field_ty!($w), VmxError> {
                v.vmread($enc).map(|x| x as field_ty!($w))
            }
        }
    };
    ($(#[$m:meta])* $name:ident, $enc:literal, $w:ident, RW) => {
        vmcs_field!(@common $(#[$m])* $name, $enc, $w);

        impl $name {
            /// Writes the field.
            pub fn write<V: VmcsAccess + ?Sized>(v: &mut V, value: field_ty!($w)) -> Result<(), VmxError> {
                v.vmwrite($enc, value as u64)
            }
        }
    };
    ($(#[$m:meta])* $name:ident, $enc:literal, $w:ident, RO) => {
        vmcs_field!(@common $(#[$m])* $name, $enc, $w);
    };
}

macro_rules! vmcs_fields {
    ($($(#[$m:meta])* $name:ident = $enc:literal, $w:ident, $acc:ident;)*) => {
        $(vmcs_field!($(#[$m])* $name, $enc, $w, $acc);)*

        /// Every field declared in this module.
        pub const FIELDS: &[FieldInfo] = &[$(FieldInfo {
            name: stringify!($name),
            encoding: $enc,
            width: Width::$w,
            writable: field_writable!($acc),
        }),*];
    };
}

vmcs_fields! {
    // --- 16-bit control ---
    /// Virtual-processor identifier.
    Vpid = 0x0000, W16, RW;

    // --- 16-bit guest state ---
    /// Guest ES selector.
    GuestEsSelector = 0x0800, W16, RW;
    /// Guest CS selector.
    GuestCsSelector = 0x0802, W16, RW;
    /// Guest SS selector.
    GuestSsSelector = 0x0804, W16, RW;
    /// Guest DS selector.
    GuestDsSelector = 0x0806, W16, RW;
    /// Guest FS selector.
    GuestFsSelector = 0x0808, W16, RW;
    /// Guest GS selector.
    GuestGsSelector = 0x080A, W16, RW;
    /// Guest LDTR selector.
    GuestLdtrSelector = 0x080C, W16, RW;
    /// Guest TR selector.
    GuestTrSelector = 0x080E, W16, RW;

    // --- 16-bit host state ---
    /// Host ES selector.
    HostEsSelector = 0x0C00, W16, RW;
    /// Host CS selector.
    HostCsSelector = 0x0C02, W16, RW;
    /// Host SS selector.
    HostSsSelector = 0x0C04, W16, RW;
    /// Host DS selector.
    HostDsSelector = 0x0C06, W16, RW;
    /// Host FS selector.
    HostFsSelector = 0x0C08, W16, RW;
    /// Host GS selector.
    HostGsSelector = 0x0C0A, W16, RW;
    /// Host TR selector.
    HostTrSelector = 0x0C0C, W16, RW;

    // --- 64-bit control ---
    /// I/O bitmap A address (ports 0x0000-0x7fff).
    IoBitmapA = 0x2000, W64, RW;
    /// I/O bitmap B address (ports 0x8000-0xffff).
    IoBitmapB = 0x2002, W64, RW;
    /// MSR bitmaps address.
    MsrBitmaps = 0x2004, W64, RW;
    /// TSC offset.
    TscOffset = 0x2010, W64, RW;
    /// Extended-page-table pointer (EPTP).
    EptPointer = 0x201A, W64, RW;

    // --- 64-bit read-only data ---
    /// Guest-physical address of an EPT violation / misconfiguration.
    GuestPhysicalAddress = 0x2400, W64, RO;

    // --- 64-bit guest state ---
    /// VMCS link pointer (all ones when unused).
    VmcsLinkPointer = 0x2800, W64, RW;
    /// Guest IA32_DEBUGCTL.
    GuestIa32Debugctl = 0x2802, W64, RW;
    /// Guest IA32_PAT.
    GuestIa32Pat = 0x2804, W64, RW;
    /// Guest IA32_EFER.
    GuestIa32Efer = 0x2806, W64, RW;

    // --- 64-bit host state ---
    /// Host IA32_PAT.
    HostIa32Pat = 0x2C00, W64, RW;
    /// Host IA32_EFER.
    HostIa32Efer = 0x2C02, W64, RW;

    // --- 32-bit control ---
    /// Pin-based VM-execution controls.
    PinBasedControls = 0x4000, W32, RW;
    /// Primary processor-based VM-execution controls.
    ProcBasedControls = 0x4002, W32, RW;
    /// Exception bitmap.
    ExceptionBitmap = 0x4004, W32, RW;
    /// Page-fault error-code mask.
    PageFaultErrorCodeMask = 0x4006, W32, RW;
    /// Page-fault error-code match.
    PageFaultErrorCodeMatch = 0x4008, W32, RW;
    /// CR3-target count.
    Cr3TargetCount = 0x400A, W32, RW;
    /// Primary VM-exit controls.
    ExitControls = 0x400C, W32, RW;
    /// VM-exit MSR-store count.
    ExitMsrStoreCount = 0x400E, W32, RW;
    /// VM-exit MSR-load count.
    ExitMsrLoadCount = 0x4010, W32, RW;
    /// VM-entry controls.
    EntryControls = 0x4012, W32, RW;
    /// VM-entry MSR-load count.
    EntryMsrLoadCount = 0x4014, W32, RW;
    /// VM-entry interruption-information field (event injection).
    EntryInterruptionInfo = 0x4016, W32, RW;
    /// VM-entry exception error code.
    EntryExceptionErrorCode = 0x4018, W32, RW;
    /// VM-entry instruction length (software interrupts/exceptions).
    EntryInstructionLength = 0x401A, W32, RW;
    /// Secondary processor-based VM-execution controls.
    SecondaryProcBasedControls = 0x401E, W32, RW;

    // --- 32-bit read-only data ---
    /// VM-instruction error number.
    VmInstructionError = 0x4400, W32, RO;
    /// Exit reason (bits 15:0 basic reason, bit 31 VM-entry failure).
    ExitReason = 0x4402, W32, RO;
    /// VM-exit interruption information.
    ExitInterruptionInfo = 0x4404, W32, RO;
    /// VM-exit interruption error code.
    ExitInterruptionErrorCode = 0x4406, W32, RO;
    /// IDT-vectoring information.
    IdtVectoringInfo = 0x4408, W32, RO;
    /// IDT-vectoring error code.
    IdtVectoringErrorCode = 0x440A, W32, RO;
    /// VM-exit instruction length.
    ExitInstructionLength = 0x440C, W32, RO;
    /// VM-exit instruction information.
    ExitInstructionInfo = 0x440E, W32, RO;

    // --- 32-bit guest state ---
    /// Guest ES limit.
    GuestEsLimit = 0x4800, W32, RW;
    /// Guest CS limit.
    GuestCsLimit = 0x4802, W32, RW;
    /// Guest SS limit.
    GuestSsLimit = 0x4804, W32, RW;
    /// Guest DS limit.
    GuestDsLimit = 0x4806, W32, RW;
    /// Guest FS limit.
    GuestFsLimit = 0x4808, W32, RW;
    /// Guest GS limit.
    GuestGsLimit = 0x480A, W32, RW;
    /// Guest LDTR limit.
    GuestLdtrLimit = 0x480C, W32, RW;
    /// Guest TR limit.
    GuestTrLimit = 0x480E, W32, RW;
    /// Guest GDTR limit.
    GuestGdtrLimit = 0x4810, W32, RW;
    /// Guest IDTR limit.
    GuestIdtrLimit = 0x4812, W32, RW;
    /// Guest ES access rights.
    GuestEsAccessRights = 0x4814, W32, RW;
    /// Guest CS access rights.
    GuestCsAccessRights = 0x4816, W32, RW;
    /// Guest SS access rights.
    GuestSsAccessRights = 0x4818, W32, RW;
    /// Guest DS access rights.
    GuestDsAccessRights = 0x481A, W32, RW;
    /// Guest FS access rights.
    GuestFsAccessRights = 0x481C, W32, RW;
    /// Guest GS access rights.
    GuestGsAccessRights = 0x481E, W32, RW;
    /// Guest LDTR access rights.
    GuestLdtrAccessRights = 0x4820, W32, RW;
    /// Guest TR access rights.
    GuestTrAccessRights = 0x4822, W32, RW;
    /// Guest interruptibility state.
    GuestInterruptibilityState = 0x4824, W32, RW;
    /// Guest activity state.
    GuestActivityState = 0x4826, W32, RW;
    /// Guest IA32_SYSENTER_CS.
    GuestIa32SysenterCs = 0x482A, W32, RW;
    /// VMX-preemption timer value.
    PreemptionTimerValue = 0x482E, W32, RW;

    // --- 32-bit host state ---
    /// Host IA32_SYSENTER_CS.
    HostIa32SysenterCs = 0x4C00, W32, RW;

    // --- natural-width control ---
    /// CR0 guest/host mask.
    Cr0GuestHostMask = 0x6000, Natural, RW;
    /// CR4 guest/host mask.
    Cr4GuestHostMask = 0x6002, Natural, RW;
    /// CR0 read shadow.
    Cr0ReadShadow = 0x6004, Natural, RW;
    /// CR4 read shadow.
    Cr4ReadShadow = 0x6006, Natural, RW;

    // --- natural-width read-only data ---
    /// Exit qualification.
    ExitQualification = 0x6400, Natural, RO;
    /// Guest-linear address.
    GuestLinearAddress = 0x640A, Natural, RO;

    // --- natural-width guest state ---
    /// Guest CR0.
    GuestCr0 = 0x6800, Natural, RW;
    /// Guest CR3.
    GuestCr3 = 0x6802, Natural, RW;
    /// Guest CR4.
    GuestCr4 = 0x6804, Natural, RW;
    /// Guest ES base.
    GuestEsBase = 0x6806, Natural, RW;
    /// Guest CS base.
    GuestCsBase = 0x6808, Natural, RW;
    /// Guest SS base.
    GuestSsBase = 0x680A, Natural, RW;
    /// Guest DS base.
    GuestDsBase = 0x680C, Natural, RW;
    /// Guest FS base.
    GuestFsBase = 0x680E, Natural, RW;
    /// Guest GS base.
    GuestGsBase = 0x6810, Natural, RW;
    /// Guest LDTR base.
    GuestLdtrBase = 0x6812, Natural, RW;
    /// Guest TR base.
    GuestTrBase = 0x6814, Natural, RW;
    /// Guest GDTR base.
    GuestGdtrBase = 0x6816, Natural, RW;
    /// Guest IDTR base.
    GuestIdtrBase = 0x6818, Natural, RW;
    /// Guest DR7.
    GuestDr7 = 0x681A, Natural, RW;
    /// Guest RSP.
    GuestRsp = 0x681C, Natural, RW;
    /// Guest RIP.
    GuestRip = 0x681E, Natural, RW;
    /// Guest RFLAGS.
    GuestRflags = 0x6820, Natural, RW;
    /// Guest pending debug exceptions.
    GuestPendingDebugExceptions = 0x6822, Natural, RW;
    /// Guest IA32_SYSENTER_ESP.
    GuestIa32SysenterEsp = 0x6824, Natural, RW;
    /// Guest IA32_SYSENTER_EIP.
    GuestIa32SysenterEip = 0x6826, Natural, RW;

    // --- natural-width host state ---
    /// Host CR0.
    HostCr0 = 0x6C00, Natural, RW;
    /// Host CR3.
    HostCr3 = 0x6C02, Natural, RW;
    /// Host CR4.
    HostCr4 = 0x6C04, Natural, RW;
    /// Host FS base.
    HostFsBase = 0x6C06, Natural, RW;
    /// Host GS base.
    HostGsBase = 0x6C08, Natural, RW;
    /// Host TR base.
    HostTrBase = 0x6C0A, Natural, RW;
    /// Host GDTR base.
    HostGdtrBase = 0x6C0C, Natural, RW;
    /// Host IDTR base.
    HostIdtrBase = 0x6C0E, Natural, RW;
    /// Host IA32_SYSENTER_ESP.
    HostIa32SysenterEsp = 0x6C10, Natural, RW;
    /// Host IA32_SYSENTER_EIP.
    HostIa32SysenterEip = 0x6C12, Natural, RW;
    /// Host RSP.
    HostRsp = 0x6C14, Natural, RW;
    /// Host RIP.
    HostRip = 0x6C16, Natural, RW;
}

/// Applies a VMX capability MSR (e.g. IA32_VMX_PINBASED_CTLS or its TRUE_
/// variant) to a desired control value.
///
/// Bits 31:0 of the MSR are the allowed-0 settings (a 1 there means the
/// control must be 1); bits 63:32 are the allowed-1 settings (a 0 there means
/// the control must be 0). Returns the value to write, with the required bits
/// forced on, or `Err` with the desired bits the processor does not allow.
pub fn adjust_controls(desired: u32, capability_msr: u64) -> Result<u32, u32> {
    let must_be_one = capability_msr as u32;
    let may_be_one = (capability_msr >> 32) as u32;
    let refused = desired & !may_be_one;
    if refused != 0 {
        return Err(refused);
    }
    Ok((desired | must_be_one) & may_be_one)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::string::ToString;

    /// A VMCS stand-in: unwritten fields read as VMfailValid(12), like
    /// VMREAD of an unsupported component.
    #[derive(Default)]
    struct FakeVmcs {
        fields: HashMap<u32, u64>,
        writes: usize,
    }

    impl VmcsAccess for FakeVmcs {
        fn vmread(&self, encoding: u32) -> Result<u64, VmxError> {
            self.fields.get(&encoding).copied().ok_or(VmxError::FailValid(12))
        }
        fn vmwrite(&mut self, encoding: u32, value: u64) -> Result<(), VmxError> {
            self.writes += 1;
            self.fields.insert(encoding, value);
            Ok(())
        }
    }

    #[test]
    fn encodings_are_consistent_with_their_declaration() {
        let mut seen = HashSet::new();
        for f in FIELDS {
            assert!(seen.insert(f.encoding), "{} duplicates an encoding", f.name);
            assert_eq!(f.encoding & 1, 0, "{}: must be the full access type", f.name);
            assert_eq!(f.encoding & !0x6FFF, 0, "{}: reserved bits set", f.name);
            let width = match (f.encoding >> 13) & 3 {
                0 => Width::W16,
                1 => Width::W64,
                2 => Width::W32,
                _ => Width::Natural,
            };
            assert_eq!(width, f.width, "{}: width bits disagree", f.name);
            let kind = (f.encoding >> 10) & 3;
            // Type 1 is VM-exit information: read-only. Everything else we declare RW.
            assert_eq!(kind == 1, !f.writable, "{}: access disagrees with type", f.name);
            // Names say which area a field belongs to.
            if f.name.starts_with("Guest") && kind != 1 && f.name != "GuestPhysicalAddress" {
                assert_eq!(kind, 2, "{}: not in the guest-state area", f.name);
            }
            if f.name.starts_with("Host") {
                assert_eq!(kind, 3, "{}: not in the host-state area", f.name);
            }
        }
    }

    #[test]
    fn spot_check_well_known_encodings() {
        // Values as listed in SDM appendix B.
        assert_eq!(GuestRip::ENCODING, 0x681E);
        assert_eq!(GuestRsp::ENCODING, 0x681C);
        assert_eq!(GuestRflags::ENCODING, 0x6820);
        assert_eq!(HostRip::ENCODING, 0x6C16);
        assert_eq!(HostRsp::ENCODING, 0x6C14);
        assert_eq!(ExitReason::ENCODING, 0x4402);
        assert_eq!(ExitQualification::ENCODING, 0x6400);
        assert_eq!(EptPointer::ENCODING, 0x201A);
        assert_eq!(VmcsLinkPointer::ENCODING, 0x2800);
        assert_eq!(SecondaryProcBasedControls::ENCODING, 0x401E);
        assert_eq!(PreemptionTimerValue::ENCODING, 0x482E);
        assert_eq!(GuestTrAccessRights::ENCODING, 0x4822);
    }

    #[test]
    fn typed_write_then_read_round_trips() {
        let mut v = FakeVmcs::default();
        GuestRip::write(&mut v, 0xFFFF_8000_0010_0000).unwrap();
        GuestCsSelector::write(&mut v, 0x10).unwrap();
        PinBasedControls::write(&mut v, 0x16).unwrap();
        VmcsLinkPointer::write(&mut v, u64::MAX).unwrap();
        assert_eq!(GuestRip::read(&v), Ok(0xFFFF_8000_0010_0000));
        assert_eq!(GuestCsSelector::read(&v), Ok(0x10u16));
        assert_eq!(PinBasedControls::read(&v), Ok(0x16u32));
        assert_eq!(VmcsLinkPointer::read(&v), Ok(u64::MAX));
        assert_eq!(v.fields[&0x0802], 0x10);
        assert_eq!(v.writes, 4);
    }

    #[test]
    fn read_only_fields_are_readable_and_narrow_reads_truncate() {
        // `ExitReason::write` does not exist (see the compile_fail doctest in
        // the module docs); the fake is filled directly instead.
        let mut v = FakeVmcs::default();
        v.fields.insert(ExitReason::ENCODING, 0x8000_0021);
        v.fields.insert(GuestEsSelector::ENCODING, 0x1_0008);
        assert_eq!(ExitReason::read(&v), Ok(0x8000_0021u32));
        assert_eq!(GuestEsSelector::read(&v), Ok(0x0008u16));
    }

    #[test]
    fn errors_propagate_and_display() {
        let v = FakeVmcs::default();
        assert_eq!(ExitQualification::read(&v), Err(VmxError::FailValid(12)));
        assert_eq!(
            VmxError::FailValid(12).to_string(),
            "VMX instruction failed: error 12 (VMREAD/VMWRITE from/to unsupported VMCS component)"
        );
        assert_eq!(VmxError::FailInvalid.to_string(), "VMX instruction failed: no current VMCS");
        assert_eq!(VmxError::UnsupportedField(0x681e).to_string(), "unsupported VMCS field 0x681e");
        assert_eq!(instruction_error_text(999), "unknown VM-instruction error");
    }

    #[test]
    fn adjust_controls_forces_required_bits() {
        // allowed-0 = 0x16 (bits 1, 2, 4 must be 1), allowed-1 = 0xFF.
        let msr = (0xFFu64 << 32) | 0x16;
        assert_eq!(adjust_controls(0x01, msr), Ok(0x17));
        assert_eq!(adjust_controls(0, msr), Ok(0x16));
    }

    #[test]
    fn adjust_controls_reports_refused_bits() {
        let msr = (0x0000_00FFu64 << 32) | 0x16;
        assert_eq!(adjust_controls(0x8000_0101, msr), Err(0x8000_0100));
    }

    #[test]
    fn adjust_controls_all_allowed() {
        let msr = 0xFFFF_FFFF_0000_0000u64;
        assert_eq!(adjust_controls(0xDEAD_BEEF, msr), Ok(0xDEAD_BEEF));
    }
}
