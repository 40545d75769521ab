//! The guest's user programs keep their CPU state. On PVM KVM user mode
//! runs natively with the host's AVX, while the guest kernel's own code is
//! emulated; a guest kernel booted without XSAVE (as hvtrace's were until
//! the attach/detach soak found it) let the upper halves of the YMM
//! registers leak from one task to the next at every context switch.
//! `docs/kvm-kinds.md` has the story; the VMM now performs the kernel's
//! `xsave`/`xrstor`.

use hvtrace_tests::*;

#[test]
fn vector_registers_survive_context_switches_and_signal_handlers() {
    require_kvm();
    // Four processes on one vCPU, each with its own pattern in every
    // vector register, yielding to each other and interrupted by a signal
    // handler that loads other values into every register. The program
    // compares the registers itself, inside one asm statement per round.
    let out = hvtrace(&["run", "--", "hv-vector-regs", "4", "100", "50"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "hv-vector-regs failed:\n{text}\n{}",
        stderr(&out)
    );
    // The host's CPU is the guest's user-mode CPU on both kinds of KVM:
    // with AVX the whole YMM registers must be checked, not only XMM.
    let width = if std::arch::is_x86_feature_detected!("avx") {
        "ymm0-15"
    } else {
        "xmm0-15"
    };
    assert!(
        text.contains(&format!("checking {width} in 4 processes")),
        "{text}"
    );
    assert!(
        text.contains("vector registers intact in all 4 processes"),
        "{text}"
    );
    // Every process was interrupted by its signal handler at least once,
    // so the signal frames' save and restore were exercised.
    let handled: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(" (").nth(1))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(handled.len(), 4, "{text}");
    assert!(handled.iter().all(|n| *n > 0), "{text}");
}
