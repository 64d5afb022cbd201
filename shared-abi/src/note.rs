//! The ELF note that marks an image as a microhv PV guest.
//!
//! A PV kernel carries, in a `PT_NOTE` segment, a note with name `"microhv"`
//! and type [`NOTE_TYPE_PV`] whose 4-byte descriptor is the ABI major version
//! it was built for. An image without it is not a PV guest (it will be started
//! as HVM once that exists).

pub const NOTE_NAME: &[u8] = b"microhv\0";
pub const NOTE_TYPE_PV: u32 = 0x4d48_5631; // "MHV1"

/// The note's bytes as they appear in the ELF file: namesz, descsz, type,
/// name (padded to 4), descriptor.
#[repr(C, align(4))]
pub struct PvNote {
    pub namesz: u32,
    pub descsz: u32,
    pub ntype: u32,
    pub name: [u8; 8],
    pub abi_major: u32,
}

impl PvNote {
    pub const fn new() -> Self {
        PvNote {
            namesz: NOTE_NAME.len() as u32,
            descsz: 4,
            ntype: NOTE_TYPE_PV,
            name: *b"microhv\0",
            abi_major: crate::ABI_VERSION.0 as u32,
        }
    }
}

impl Default for PvNote {
    fn default() -> Self {
        Self::new()
    }
}

const _: () = assert!(core::mem::size_of::<PvNote>() == 24);

/// Guest kernels put this in their image: `microhv_guest::pv_note!()` does it.
#[macro_export]
macro_rules! declare_pv_note {
    () => {
        #[used]
        #[link_section = ".note.microhv"]
        static MICROHV_PV_NOTE: $crate::note::PvNote = $crate::note::PvNote::new();
    };
}
