//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC id and topology.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM paravirt features that work through `vmcall` hypercalls (PV_UNHALT
/// kicks, PV_TLB_FLUSH, PV_SEND_IPI, PV_SCHED_YIELD). On PVM KVM a guest
/// kernel's `vmcall` does not complete: a 2-vCPU guest hung with CPU 1 at
/// the `vmcall` of its first PV IPI. Hidden there, the guest uses the APIC.
pub const KVM_HYPERCALL_FEATURES: u32 = KVM_FEATURE_PV_UNHALT | (1 << 9) | (1 << 11) | (1 << 13);

/// KVM's paravirt spinlock wait/kick: a waiting vCPU halts with interrupts
/// off and the unlocking one wakes it with a `KVM_HC_KICK_CPU` hypercall.
pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: initial APIC id,
/// logical processor count, hypervisor bit, x2APIC ids in the topology
/// leaves; the KVM paravirt feature bits in `hidden_kvm_features` cleared.
pub fn vcpu_cpuid(mut cpuid: CpuId, id: u8, count: u8, hidden_kvm_features: u32) -> CpuId {
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_KVM_FEATURES => e.eax &= !hidden_kvm_features,
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_and_count() {
        let c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                eax: 0x01ff_ffff,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = vcpu_cpuid(c, 3, 4, KVM_FEATURE_PV_UNHALT);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 0x01ff_ff7f, "only PV_UNHALT (bit 7) cleared");
    }
}
