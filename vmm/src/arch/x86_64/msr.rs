//! MSR values at boot.

use kvm_bindings::kvm_msr_entry;

/// MSRs a vCPU starts with: SYSENTER/SYSCALL MSRs cleared, TSC 0, fast
/// strings on, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(0x174, 0),             // IA32_SYSENTER_CS
        e(0x175, 0),             // IA32_SYSENTER_ESP
        e(0x176, 0),             // IA32_SYSENTER_EIP
        e(0xc000_0081, 0),       // STAR
        e(0xc000_0083, 0),       // CSTAR
        e(0xc000_0102, 0),       // KERNEL_GS_BASE
        e(0xc000_0084, 0),       // SYSCALL_MASK
        e(0xc000_0082, 0),       // LSTAR
        e(0x10, 0),              // IA32_TSC
        e(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
}
