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
/// Store leaf: EAX = the guest frame of the store ring page shared with
/// Dom0's store (0: none), EBX = the guest's event-channel port for it.
pub const HV_LEAF_STORE: u32 = 0x4000_0002;
/// Timing leaf (the VMware/KVM convention): EAX = TSC kHz, EBX = local APIC
/// timer input clock in kHz.
pub const HV_LEAF_TIMING: u32 = 0x4000_0010;
/// Leaf 1 ECX bits changed for the guest: x2APIC (21) is offered (the
/// platform's APIC is x2APIC only); MONITOR (3), TSC-deadline (24), XSAVE
/// (26) and OSXSAVE (27) are hidden (not emulated).
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
pub const LEAF1_ECX_HIDDEN: u32 = (1 << 3) | (1 << 24) | (1 << 26) | (1 << 27);

/// Per-guest inputs of the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    pub tsc_khz: u32,
    pub apic_timer_khz: u32,
    /// Vector on which event-channel upcalls are injected (hybrid guests).
    pub evtchn_vector: u8,
    /// Guest frame number of the domain's `shared_info` page.
    pub shared_info_gfn: u32,
    /// The domain's id.
    pub domid: u16,
    /// Guest frame of the store ring page (0: the guest has no store).
    pub store_gfn: u32,
    /// The guest's event-channel port to Dom0's store.
    pub store_port: u32,
}
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
/// - Leaf 1: VMX is hidden, the hypervisor bit is set, x2APIC offered,
///   MONITOR / TSC-deadline / XSAVE / OSXSAVE hidden, initial APIC ID 0
///   (EBX bits 31:24), everything else passes through.
/// - 0x4000_0000: max hypervisor leaf 0x4000_0010 and the signature
///   `"microhvmicro"` in EBX, ECX, EDX.
/// - 0x4000_0001: EAX = the ABI version as `major << 16 | minor`, EBX = the
///   event-channel upcall vector, ECX = the `shared_info` guest frame, EDX =
///   the domain id.
/// - 0x4000_0002: EAX = the store ring's guest frame (0: no store), EBX =
///   the store event-channel port (the HVM form of `start_info.store_*`).
/// - 0x4000_0010: EAX = TSC kHz, EBX = APIC timer kHz (from `policy`).
/// - the rest of 0x4000_0000..=0x4fff_ffff: zeros.
/// - Everything else passes through unchanged.
pub fn filter(leaf: u32, subleaf: u32, host: [u32; 4], policy: &CpuidPolicy) -> [u32; 4] {
    let _ = subleaf; // no filtered leaf has subleaves yet
    match leaf {
        1 => {
            let [a, b, c, d] = host;
            let c = (c & !LEAF1_ECX_VMX & !LEAF1_ECX_HIDDEN) | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC;
            [a, b & 0x00ff_ffff, c, d]
        }
        HV_LEAF_BASE => [HV_LEAF_TIMING, sig_word(0), sig_word(4), sig_word(8)],
        HV_LEAF_VERSION => [shared_abi::abi_version_packed() as u32, policy.evtchn_vector as u32, policy.shared_info_gfn, policy.domid as u32],
        HV_LEAF_STORE => [policy.store_gfn, policy.store_port, 0, 0],
        HV_LEAF_TIMING => [policy.tsc_khz, policy.apic_timer_khz, 0, 0],
        l if (HV_LEAF_BASE..=HV_LEAF_LAST).contains(&l) => [0; 4],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: CpuidPolicy = CpuidPolicy { tsc_khz: 2_000_000, apic_timer_khz: 100_000, evtchn_vector: 0xf3, shared_info_gfn: 0x7ff, domid: 7, store_gfn: 0x801, store_port: 2 };

    #[test]
    fn leaf1_hides_vmx_and_sets_hypervisor() {
        let host = [0x000906ea, 0x0510_0800, 0xfffa_3223 | LEAF1_ECX_VMX, 0x0f8b_fbff];
        let out = filter(1, 0, host, &P);
        assert_eq!(out[2] & LEAF1_ECX_VMX, 0);
        assert_ne!(out[2] & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(out[2] & LEAF1_ECX_X2APIC, 0, "the platform's APIC is x2APIC");
        assert_eq!(out[2] & LEAF1_ECX_HIDDEN, 0);
        // Other ECX bits and the other registers are kept; APIC ID 0.
        let changed = LEAF1_ECX_VMX | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC | LEAF1_ECX_HIDDEN;
        assert_eq!(out[2] & !changed, host[2] & !changed);
        assert_eq!((out[0], out[1], out[3]), (host[0], 0x0010_0800, host[3]));
        // A host without VMX, hypervisor bit already clear.
        assert_eq!(filter(1, 0, [0, 0, 0, 0], &P), [0, 0, LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC, 0]);
    }

    #[test]
    fn hypervisor_leaf_signature() {
        let out = filter(0x4000_0000, 0, [1, 2, 3, 4], &P);
        assert_eq!(out[0], HV_LEAF_TIMING);
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
        let out = filter(0x4000_0001, 0, [9, 9, 9, 9], &P);
        assert_eq!(out, [(major as u32) << 16 | minor as u32, 0xf3, 0x7ff, 7]);
    }

    #[test]
    fn store_leaf() {
        assert_eq!(filter(0x4000_0002, 0, [9, 9, 9, 9], &P), [0x801, 2, 0, 0]);
        let none = CpuidPolicy { store_gfn: 0, store_port: 0, ..P };
        assert_eq!(filter(0x4000_0002, 0, [9, 9, 9, 9], &none), [0; 4], "no store: zeros");
    }

    #[test]
    fn rest_of_hypervisor_range_is_zero() {
        for leaf in [0x4000_0003, 0x4000_0100, 0x4000_ffff, 0x4fff_ffff] {
            assert_eq!(filter(leaf, 0, [1, 2, 3, 4], &P), [0; 4], "leaf {leaf:#x}");
        }
    }

    #[test]
    fn other_leaves_pass_through() {
        for leaf in [0, 4, 7, 0xd, 0x3fff_ffff, 0x5000_0000, 0x8000_0000, 0x8000_0001] {
            assert_eq!(filter(leaf, 1, [1, 2, 3, 4], &P), [1, 2, 3, 4], "leaf {leaf:#x}");
        }
    }

    #[test]
    fn timing_leaf_reports_the_policy_rates() {
        assert_eq!(filter(HV_LEAF_TIMING, 0, [7; 4], &P), [2_000_000, 100_000, 0, 0]);
    }
}
