//! Which kind of KVM this host offers, and what each kind needs.
//!
//! Hardware KVM (VMX/SVM) runs guest kernel code natively and reports guest
//! breakpoints as `KVM_EXIT_DEBUG`. PVM KVM (`kvm_pvm`, see
//! docs/kvm-kinds.md) emulates guest ring-0 code, reports `int3` in ring 0
//! as an emulation failure, and cannot complete a guest user-mode `syscall`
//! without the VMM's help.

use std::path::Path;

/// The flavour of /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KvmKind {
    /// VMX or SVM hardware virtualization.
    Hardware,
    /// The pagetable-based virtual machine flavour (`kvm_pvm` module).
    Pvm,
}

/// The features every PVM guest kernel goes without (see [`PVM_GUEST_CMDLINE`]);
/// with `erms,fsrm` at most 127 bytes after `clearcpuid=` (Linux 6.1
/// parses it in a 128-byte buffer and silently drops the rest).
macro_rules! pvm_cleared_features {
    () => {
        "clearcpuid=cx16,smap,popcnt,rdrand,rdseed,fsgsbase,pcid,invpcid,ssse3,pclmulqdq,aes,xsaveopt,xsavec,xsaves,xgetbv1,pku,avx2,600"
    };
}

/// Kernel command-line options a non-PVM guest kernel needs on PVM: they
/// hide features the KVM instruction emulator cannot emulate in ring 0.
/// Appended after the user's command line. `ssse3` (and with it SSE4.x),
/// `pclmulqdq` and `aes` keep a distribution kernel's built-in SIMD code
/// (Debian 6.1 runs `blake2s_compress_ssse3` for its random pool while
/// unpacking the initramfs) on the generic C paths: the emulator has no
/// SSE arithmetic; `avx2` likewise. User space runs natively and still
/// sees every feature in CPUID, so the kernel must keep XSAVE to save the
/// AVX registers of its tasks: `xsaveopt`, `xsavec`, `xsaves` and
/// `xgetbv1` are hidden so that it uses only the standard `xsave64` and
/// `xrstor64`, which the VMM performs (`trap/pvm_xsave.rs`); `pku` so that
/// it never runs `wrpkru` in ring 0. On PVM, user mode runs with the
/// host's XCR0, not the one the guest kernel set (a guest program's
/// `xgetbv` reads the host's), so the guest kernel must save every state
/// component the host enables: AVX-512 stays (its 2.7 KiB area fits
/// `KVM_GET_XSAVE`); bit 600 is AMX-TILE (named by number: the kernel
/// reads at most 127 bytes of `clearcpuid=`), whose 8 KiB of tile data
/// would not fit, and which Linux hands a process only on request.
///
/// ERMS and FSRM stay. Hiding them (`erms,fsrm`) made the kernel's copies
/// use `rep movsq` instead of `rep movsb`, which the emulator runs one
/// iteration per pass: on one host that halved the time of bulk output
/// (`benches/output-figures.sh`, 2 MiB from /dev/zero 1.27 s instead of
/// 2.40 s), but on a Xeon with AVX-512 (family 6 model 167) a restored
/// guest's `hv-forkexec-loop 3` had not finished after 5 min with them
/// hidden, and took 0.42 s per fork+exec with them kept. Robustness
/// across hosts wins; `HVTRACE_BENCH_PVM_NO_ERMS=1` hides them again for
/// a comparison. The user copies themselves are done by the VMM since
/// (`crate::trap::pvm_copy`), which needs the `rep movsb` form.
pub const PVM_GUEST_CMDLINE: &str = pvm_cleared_features!();

/// [`PVM_GUEST_CMDLINE`] hiding ERMS and FSRM as well, for comparisons:
/// chosen by `HVTRACE_BENCH_PVM_NO_ERMS=1`.
pub const PVM_GUEST_CMDLINE_WITHOUT_ERMS: &str = concat!(pvm_cleared_features!(), ",erms,fsrm");

/// Defaults that save emulated time on PVM, where every ring-0 instruction
/// is emulated: `mitigations=off` drops the speculation mitigations' MSR
/// writes on every kernel entry and the return thunk on every `ret`, and
/// `cryptomgr.notests` skips the crypto self-tests a distribution kernel
/// runs at boot. Put before the user's command line, so a user's
/// `mitigations=auto` (the kernel takes the last value) wins.
pub const PVM_GUEST_CMDLINE_DEFAULTS: &str = "mitigations=off cryptomgr.notests";

impl KvmKind {
    /// Detects the kind from the loaded modules and CPU flags.
    pub fn detect() -> Self {
        Self::detect_from(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    /// Detection against explicit paths (for tests).
    pub fn detect_from(sys_module: &Path, cpuinfo: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            return Self::Pvm;
        }
        let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw {
            Self::Hardware
        } else {
            // No VMX/SVM yet a working /dev/kvm: only PVM does that.
            Self::Pvm
        }
    }

    /// KVM paravirt CPUID feature bits (leaf 0x4000_0001) the guest is not
    /// offered on this kind. PVM: every hypercall-based one (its `vmcall`
    /// does not complete). Hardware KVM: PV_UNHALT, the paravirt spinlock
    /// wait/kick. Measured in the hardware-KVM lane (nested SVM under QEMU
    /// TCG), Debian 6.12 with two vCPUs hung for good with one vCPU in
    /// `__pv_queued_spin_lock_slowpath` (a lost kick), and ran with
    /// `nopvspin`, which hiding the bit is the same as. A tracer's guest has
    /// one or two vCPUs on host threads of their own, the case where plain
    /// queued spinlocks cost nothing measurable, and its spinlocks then
    /// behave alike on both kinds.
    pub fn hidden_kvm_features(self) -> u32 {
        match self {
            Self::Pvm => crate::arch::x86_64::cpuid::KVM_HYPERCALL_FEATURES,
            Self::Hardware => crate::arch::x86_64::cpuid::KVM_FEATURE_PV_UNHALT,
        }
    }

    /// Command-line options this kind adds after every guest's own.
    pub fn guest_cmdline(self) -> &'static str {
        match self {
            Self::Hardware => "",
            Self::Pvm if std::env::var_os("HVTRACE_BENCH_PVM_NO_ERMS").is_some() => {
                PVM_GUEST_CMDLINE_WITHOUT_ERMS
            }
            Self::Pvm => PVM_GUEST_CMDLINE,
        }
    }

    /// Command-line defaults this kind puts before every guest's own.
    pub fn guest_cmdline_defaults(self) -> &'static str {
        match self {
            Self::Hardware => "",
            Self::Pvm => PVM_GUEST_CMDLINE_DEFAULTS,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware KVM",
            Self::Pvm => "PVM KVM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux copies `clearcpuid=`'s value into a 128-byte buffer: a longer
    /// list loses its last features without an error (seen: `amx_tile`
    /// cut to `amx_ti`, and `erms,fsrm` dropped).
    #[test]
    fn the_cleared_features_fit_the_kernels_buffer() {
        for cmdline in [PVM_GUEST_CMDLINE, PVM_GUEST_CMDLINE_WITHOUT_ERMS] {
            let value = cmdline.strip_prefix("clearcpuid=").unwrap();
            assert!(value.len() <= 127, "{} bytes: {value}", value.len());
            assert!(!value.contains(' '), "{value}");
        }
    }

    #[test]
    fn detects_pvm_module_and_hardware_flags() {
        let d = std::env::temp_dir().join(format!("hvtrace-kind-{}", std::process::id()));
        let m = d.join("module");
        std::fs::create_dir_all(&m).unwrap();
        let cpu = d.join("cpuinfo");
        std::fs::write(&cpu, "flags\t: fpu vme vmx sse\n").unwrap();
        assert_eq!(KvmKind::detect_from(&m, &cpu), KvmKind::Hardware);
        std::fs::write(&cpu, "flags\t: fpu vme sse\n").unwrap();
        assert_eq!(KvmKind::detect_from(&m, &cpu), KvmKind::Pvm);
        std::fs::create_dir_all(m.join("kvm_pvm")).unwrap();
        std::fs::write(&cpu, "flags\t: fpu svm\n").unwrap();
        assert_eq!(KvmKind::detect_from(&m, &cpu), KvmKind::Pvm);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
