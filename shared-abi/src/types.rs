//! Typed ids and addresses used in hypercall arguments and shared pages.
//!
//! Every pointer a guest passes is a [`GuestVa`] in its own address space,
//! never a hypervisor pointer; frames are named by [`Mfn`] (machine frame) or
//! [`Gfn`] (the guest's own frame numbering, "pseudo-physical").

use crate::Errno;

/// Conversion between a typed argument and its register value.
pub trait HypercallArg: Sized + Copy {
    fn to_raw(self) -> u64;
    /// Rejects register values that do not fit the type.
    fn from_raw(raw: u64) -> Result<Self, Errno>;
}

impl HypercallArg for u64 {
    fn to_raw(self) -> u64 {
        self
    }
    fn from_raw(raw: u64) -> Result<Self, Errno> {
        Ok(raw)
    }
}

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub $inner);

        impl HypercallArg for $name {
            fn to_raw(self) -> u64 {
                self.0 as u64
            }
            fn from_raw(raw: u64) -> Result<Self, Errno> {
                <$inner>::try_from(raw).map($name).map_err(|_| Errno::EINVAL)
            }
        }
    };
}

newtype!(
    /// A domain id. Dom0 is 0.
    DomId(u16)
);
newtype!(
    /// A machine frame number: physical address / 4096.
    Mfn(u64)
);
newtype!(
    /// A guest frame number: an index into the guest's own frame list (P2M).
    Gfn(u64)
);
newtype!(
    /// A virtual address in the calling guest's address space.
    GuestVa(u64)
);

impl DomId {
    pub const DOM0: DomId = DomId(0);
    /// "No domain" / "any domain" marker in shared structures.
    pub const INVALID: DomId = DomId(0x7ff4);
}

impl Mfn {
    pub const fn addr(self) -> u64 {
        self.0 << 12
    }
}

impl GuestVa {
    pub const NULL: GuestVa = GuestVa(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_types_reject_wide_values() {
        assert_eq!(DomId::from_raw(7), Ok(DomId(7)));
        assert_eq!(DomId::from_raw(0x1_0000), Err(Errno::EINVAL));
        assert_eq!(Mfn::from_raw(u64::MAX), Ok(Mfn(u64::MAX)));
        assert_eq!(GuestVa(0x1234).to_raw(), 0x1234);
    }
}
