//! The CPUID policy HVM guests see.
//!
//! The kernel executes CPUID on the host for the guest's leaf/subleaf and
//! passes the result through [`filter`] before writing EAX..EDX back.

/// Leaf 1 ECX bit 5: VMX. Hidden: no nested virtualization.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX bit 31: "running under a hypervisor". Always set.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// First leaf of the hypervisor range.
pub const HV_LEAF_BASE: u32 = 0x4000_0000;
/// Leaf returning the microhv ABI version.
pub const HV_LEAF_VERSION: u32 = 0x4000_0001;
/// Last leaf of the range reserved for hypervisors.
pub const HV_LEAF_LAST: u32 = 0x4fff_ffff;

/// The vendor signature in leaf 0x4000_0000 (EBX, ECX, EDX).
pub const SIGNATURE: &[u8; 12] = b"microhvmicro";

fn sig_word(i: usize) -> u32 {
    u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]])
}

/// Returns what the guest sees for CPUID `leaf`/`subleaf`, given the host's
/// answer `[eax, ebx, ecx, edx]`.
///
/// - Leaf 1: VMX is hidden, the hypervisor bit is set (x2APIC and everything
///   else pass through).
/// - 0x4000_0000: max hypervisor leaf 0x4000_0001 and the signature
///   `"microhvmicro"` in EBX, ECX, EDX.
/// - 0x4000_0001: EAX = the ABI version as `major << 16 | minor`.
/// - 0x4000_0002..=0x4fff_ffff: zeros.
/// - Everything else passes through unchanged.
pub fn filter(leaf: u32, subleaf: u32, host: [u32; 4]) -> [u32; 4] {
    let _ = subleaf; // no filtered leaf has subleaves yet
    match leaf {
        1 => {
            let [a, b, c, d] = host;
            [a, b, (c & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR, d]
        }
        HV_LEAF_BASE => [HV_LEAF_VERSION, sig_word(0), sig_word(4), sig_word(8)],
        HV_LEAF_VERSION => [shared_abi::abi_version_packed() as u32, 0, 0, 0],
        l if (HV_LEAF_VERSION + 1..=HV_LEAF_LAST).contains(&l) => [0; 4],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf1_hides_vmx_and_sets_hypervisor() {
        let host = [0x000906ea, 0x0010_0800, 0xfffa_3223 | LEAF1_ECX_VMX, 0x0f8b_fbff];
        let out = filter(1, 0, host);
        assert_eq!(out[2] & LEAF1_ECX_VMX, 0);
        assert_ne!(out[2] & LEAF1_ECX_HYPERVISOR, 0);
        // Other ECX bits (x2APIC is bit 21) and the other registers are kept.
        assert_eq!(out[2] & (1 << 21), host[2] & (1 << 21));
        assert_eq!(out[2] & !(LEAF1_ECX_VMX | LEAF1_ECX_HYPERVISOR), host[2] & !(LEAF1_ECX_VMX | LEAF1_ECX_HYPERVISOR));
        assert_eq!((out[0], out[1], out[3]), (host[0], host[1], host[3]));
        // A host without VMX, hypervisor bit already clear.
        assert_eq!(filter(1, 0, [0, 0, 0, 0]), [0, 0, LEAF1_ECX_HYPERVISOR, 0]);
    }

    #[test]
    fn hypervisor_leaf_signature() {
        let out = filter(0x4000_0000, 0, [1, 2, 3, 4]);
        assert_eq!(out[0], 0x4000_0001);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&out[1].to_le_bytes());
        sig[4..8].copy_from_slice(&out[2].to_le_bytes());
        sig[8..12].copy_from_slice(&out[3].to_le_bytes());
        assert_eq!(&sig, b"microhvmicro");
        assert_eq!(out[1], u32::from_le_bytes(*b"micr"));
    }

    #[test]
    fn version_leaf() {
        let (major, minor) = shared_abi::ABI_VERSION;
        let out = filter(0x4000_0001, 0, [9, 9, 9, 9]);
        assert_eq!(out, [(major as u32) << 16 | minor as u32, 0, 0, 0]);
    }

    #[test]
    fn rest_of_hypervisor_range_is_zero() {
        for leaf in [0x4000_0002, 0x4000_0100, 0x4000_ffff, 0x4fff_ffff] {
            assert_eq!(filter(leaf, 0, [1, 2, 3, 4]), [0; 4], "leaf {leaf:#x}");
        }
    }

    #[test]
    fn other_leaves_pass_through() {
        for leaf in [0, 4, 7, 0xd, 0x3fff_ffff, 0x5000_0000, 0x8000_0000, 0x8000_0001] {
            assert_eq!(filter(leaf, 1, [1, 2, 3, 4]), [1, 2, 3, 4], "leaf {leaf:#x}");
        }
    }
}
