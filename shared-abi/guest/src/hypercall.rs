//! Hypercall stubs, one per row of the shared-abi table (generated from it by
//! `shared_abi::for_each_hypercall!`), over one primitive: `int 0x82`, or
//! VMCALL with the `hvm` feature.
//!
//! The stubs are `unsafe`: pointer arguments must be valid for what the
//! hypercall reads or writes. microhv checks them anyway (a bad pointer gets
//! -EFAULT), but a wrong length could still overwrite the guest's own data.
#![allow(clippy::too_many_arguments)]

use shared_abi::types::*;
use shared_abi::Errno;

/// The instruction that enters microhv: `int 0x82` from a PV guest,
/// VMCALL from a hybrid one (feature `hvm`, where pointers are
/// guest-physical addresses).
#[cfg(not(feature = "hvm"))]
macro_rules! trap_instruction {
    () => {
        "int 0x82"
    };
}
#[cfg(feature = "hvm")]
macro_rules! trap_instruction {
    () => {
        "vmcall"
    };
}

/// Raw hypercall: number in RAX, arguments in RDI, RSI, RDX, R10, R8.
///
/// # Safety
/// The arguments must be valid for hypercall `nr` (see docs/abi.md).
#[inline(always)]
pub unsafe fn raw(nr: u64, a: [u64; 5]) -> i64 {
    let ret: i64;
    // SAFETY: the trap goes to microhv, which preserves every register
    // except RAX; memory effects are those of the hypercall (caller's contract).
    unsafe {
        core::arch::asm!(
            trap_instruction!(),
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4],
            options(nostack)
        );
    }
    ret
}

macro_rules! define_stubs {
    ($( $(#[doc = $doc:literal])* $num:literal $konst:ident $variant:ident $func:ident ( $($arg:ident : $ty:ty),* ) [$pv:tt $hvm:tt $who:tt] ; )*) => {
        $(
            $(#[doc = $doc])*
            ///
            /// # Safety
            /// Pointer arguments must be valid for what this hypercall accesses.
            #[allow(unused_mut, unused_assignments, unused_variables)]
            pub unsafe fn $func($($arg: $ty),*) -> Result<u64, Errno> {
                let mut regs = [0u64; 5];
                let mut i = 0;
                $( regs[i] = HypercallArg::to_raw($arg); i += 1; )*
                // SAFETY: forwarded from this function's contract.
                Errno::result(unsafe { raw($num, regs) })
            }
        )*
    };
}

shared_abi::for_each_hypercall!(define_stubs);
