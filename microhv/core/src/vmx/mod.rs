//! Intel VT-x (VMX) support for HVM guests: the hardware-independent half.
//!
//! What lives here:
//! - [`vmcs`]: typed accessors for VMCS fields over the [`VmcsAccess`] trait
//!   (the kernel implements it with `VMREAD`/`VMWRITE`; tests use a map), the
//!   [`VmxError`] type and [`adjust_controls`] for the VMX capability MSRs.
//! - [`exit`]: decoding of the VM-exit information fields into [`VmExit`].
//! - [`cpuid`]: the CPUID policy HVM guests see ([`cpuid::filter`]).
//!
//! Nothing here touches hardware: the kernel owns VMXON, the VMCS regions,
//! VMLAUNCH/VMRESUME and the exit stub, and feeds values in through the traits
//! and plain functions of this module. An AMD SVM backend can later implement
//! the same split (a VMCB accessor and an exit decoder producing [`VmExit`]),
//! so the exit handlers above it need not know which vendor they run on.
//!
//! Facts (field encodings, exit reasons, qualification layouts) follow the
//! Intel SDM, volume 3, chapters 24–27 and appendices B and C.

pub mod cpuid;
pub mod exit;
pub mod vmcs;

pub use exit::{decode, CrAccessKind, VmExit};
pub use vmcs::{adjust_controls, FieldInfo, VmcsAccess, VmxError, Width};
