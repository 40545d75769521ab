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

/// The guest kernel saves every state component its user programs run
/// with. On PVM user mode runs with the host's XCR0 whatever the guest
/// kernel set (a guest `xgetbv` reads the host's), so on a host with
/// AVX-512 a guest kernel that enabled only x87/SSE/AVX let the ZMM and
/// mask registers leak between tasks: programs died of SIGSEGV at their
/// start. Oracles: the CPU's own `xgetbv` in a guest program, and the
/// guest kernel's boot line naming the components it saves. AMX's tile
/// state (components 17 and 18) is the exception Linux itself makes: a
/// process gets it only on request (`arch_prctl`), which the guest kernel,
/// booted without AMX, refuses.
#[test]
fn the_guest_kernel_saves_every_component_its_programs_run_with() {
    require_kvm();
    let out = hvtrace(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "hv-xcr0; dmesg | grep 'Enabled xstate features'",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let hex_after = |key: &str| -> u64 {
        let word = text
            .split(key)
            .nth(1)
            .and_then(|r| {
                r.split(|c: char| c == ',' || c.is_whitespace())
                    .find(|w| !w.is_empty())
            })
            .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"));
        u64::from_str_radix(word.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("{word:?} after {key:?}:\n{text}"))
    };
    let user = hex_after("xcr0 ");
    let saved = hex_after("Enabled xstate features ");
    const AMX_TILE: u64 = (1 << 17) | (1 << 18);
    assert_eq!(
        user & !saved & !AMX_TILE,
        0,
        "user mode runs with XCR0 {user:#x}, the guest kernel saves {saved:#x}"
    );
    // x87, SSE (and AVX where the host has it) at least.
    assert_eq!(saved & 3, 3, "{text}");
}
