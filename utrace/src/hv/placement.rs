//! Where each trap goes in the running kernel, and what kind it is.
//!
//! A site is a candidate function of [`crate::sites`] resolved to a runtime
//! address. The trap there is an `int3` when the VMM can execute the
//! displaced instruction itself, exactly and without touching guest text
//! again: a NOP of any length (the ftrace `__fentry__` slot once patched),
//! `endbr64`, or a `call rel32` (the `__fentry__` call of a kernel whose
//! ftrace slots are still calls). Anything else gets a debug-register
//! breakpoint, which leaves the text alone and lets the CPU run the
//! instruction (see [`vmm::trap`]).
//!
//! `syscall_exit_work` is inlined in every kernel we test, so the exit
//! site is found in the function it was inlined into: its first test of
//! `syscall_work` against the `SYSCALL_WORK_EXIT` bits (computed from BTF)
//! followed by a conditional jump; the trap goes on the first instruction
//! of the taken-when-set side. Traced threads have such a bit; untraced
//! ones never reach that instruction.
//!
//! The QUIESCE site (REPORT's report_quiesce) is found the same way: in the
//! return-to-user work loop, the inlined `clear_thread_flag(TIF_NOTIFY_RESUME)`
//! is a locked `and` of the thread flags with everything but that bit; the
//! trap goes on the next instruction. A thread reaches it only when its
//! TIF_NOTIFY_RESUME was set, and only after the kernel consumed the bit,
//! so a bit set again after that sends the thread round the loop once more
//! instead of being lost.

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;
use guest_introspect::symbols::SymbolMap;
use iced_x86::{
    Code, Decoder, DecoderOptions, Instruction, MemorySize, Mnemonic, OpKind, Register,
};

pub use crate::hv::displaced::{displaced, Cond, Displaced};
use crate::hv::layout::TraceLayout;
use crate::sites::Site;
use crate::sites::{resolve, At, Reach, SITES};

/// How far into a function the exit-work branch is looked for.
const SCAN_BYTES: usize = 512;
/// How far into `get_signal` its dequeue paths are looked for (it is
/// 1.5 KiB in the minimal kernel).
const FUNCTION_SCAN_BYTES: usize = 8192;
/// How far into the return-to-user work the flag clear is looked for (it
/// lies at +0x1bb in Debian's 6.1).
const LOOP_SCAN_BYTES: usize = 1024;

/// `TIF_NOTIFY_RESUME`: bit 1 of the x86 thread flags. A preprocessor
/// constant (not in BTF), fixed in `arch/x86/include/asm/thread_info.h`
/// since the flag exists; a kernel that moved it would have no locked
/// `and` clearing bit 1 in its loop, and the site would not be placed.
pub const TIF_NOTIFY_RESUME: u32 = 1;

/// The kind of trap a site gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TrapKind {
    /// `int3` over an instruction the VMM executes itself.
    Int3(Displaced),
    /// A debug-register instruction breakpoint (guest text untouched).
    DebugRegister,
}

/// One trap to set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedTrap {
    /// The site it observes (serialized as its name, the field `hvtrace
    /// sites --json` has always called `event_name`).
    #[serde(rename = "event_name")]
    pub site: Site,
    /// The function it lies in.
    pub symbol: String,
    /// Offset from the function's start.
    pub offset: u64,
    /// Runtime address.
    pub va: u64,
    /// int3 or debug register.
    pub kind: TrapKind,
    /// The displaced instruction, as disassembled.
    pub instruction: String,
}

/// Decodes the instruction at runtime address `va`.
fn instruction_at<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    va: u64,
) -> Result<Instruction> {
    let mut code = [0u8; 16];
    k.read(va, &mut code, "kernel text")?;
    let insn = Decoder::with_ip(64, &code, va, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        return Err(IntrospectError::Corrupt(format!(
            "no valid instruction at {va:#x} ({code:02x?})"
        )));
    }
    Ok(insn)
}

/// Finds the inlined exit work in the function at `start`: the address of
/// the first instruction run when `syscall_work & exit_mask` is non-zero.
pub fn exit_work_branch(code: &[u8], start: u64, exit_mask: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let mut prev: Option<Instruction> = None;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        if let Some(test) = prev {
            let tests_mask = test.mnemonic() == Mnemonic::Test
                && test.op_count() == 2
                && test.op0_kind() == OpKind::Register
                && matches!(
                    test.op1_kind(),
                    OpKind::Immediate8
                        | OpKind::Immediate32
                        | OpKind::Immediate8to32
                        | OpKind::Immediate32to64
                )
                && test.immediate(1) == exit_mask;
            if tests_mask {
                match insn.mnemonic() {
                    Mnemonic::Jne => return Some(insn.near_branch_target()),
                    Mnemonic::Je => return Some(insn.next_ip()),
                    _ => {}
                }
            }
        }
        prev = Some(insn);
    }
    None
}

/// Where `get_signal` has taken a signal, before it acts on it: the
/// point its dequeue paths join, with the signal's number in `reg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalTaken {
    /// The first instruction of the common path (`signr` is non-zero).
    pub merge: u64,
    /// The register holding `signr` there (a 32-bit one: `signr` is an
    /// `int`).
    pub reg: Register,
    /// Every branch that leads into `merge` (the test of
    /// `dequeue_signal`'s result, and the jumps of the inlined
    /// `dequeue_synchronous_signal`): the traps go on them, executed by
    /// the VMM, so the signal is seen on every path without a debug
    /// register.
    pub branches: Vec<u64>,
    /// Whether the instruction before `merge` may fall through into it
    /// (a path no branch trap sees).
    pub fall_through: bool,
}

/// Finds [`SignalTaken`] in `get_signal`'s code (`code` at `start`): the
/// call of `dequeue_signal` (at runtime address `dequeue_signal`), its
/// result tested (optionally moved to another register first) and a
/// `je`/`jne` to the no-signal exit; the other side is the merge point.
pub fn signal_taken(code: &[u8], start: u64, dequeue_signal: u64) -> Option<SignalTaken> {
    let mut insns = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            // Padding or data after the function's last instruction.
            break;
        }
        insns.push(insn);
    }
    let call = insns.iter().position(|i| {
        i.code() == Code::Call_rel32_64 && i.near_branch_target() == dequeue_signal
    })?;
    let mut reg = Register::EAX;
    let mut test_seen = false;
    let mut jcc = None;
    for i in insns.iter().skip(call + 1).take(4) {
        let regs2 = i.op_count() == 2
            && i.op0_kind() == OpKind::Register
            && i.op1_kind() == OpKind::Register;
        match i.mnemonic() {
            Mnemonic::Mov if regs2 && i.op1_register() == Register::EAX && !test_seen => {
                reg = i.op0_register();
            }
            Mnemonic::Test
                if regs2
                    && i.op0_register() == i.op1_register()
                    && (i.op0_register() == Register::EAX || i.op0_register() == reg) =>
            {
                test_seen = true;
            }
            Mnemonic::Je | Mnemonic::Jne if test_seen => {
                jcc = Some(*i);
                break;
            }
            _ => return None,
        }
    }
    let jcc = jcc?;
    if !reg.is_gpr32() {
        return None;
    }
    let merge = if jcc.mnemonic() == Mnemonic::Je {
        jcc.next_ip()
    } else {
        jcc.near_branch_target()
    };
    let mut branches = vec![jcc.ip()];
    for i in &insns {
        let into_merge = i.ip() != jcc.ip()
            && displaced(i)
                .is_some_and(|d| matches!(d, Displaced::Jcc { .. } | Displaced::Jmp { .. }))
            && i.near_branch_target() == merge;
        if into_merge {
            branches.push(i.ip());
        }
    }
    let fall_through = match insns.iter().find(|i| i.next_ip() == merge) {
        Some(before) => {
            before.ip() != jcc.ip()
                && !matches!(
                    before.mnemonic(),
                    Mnemonic::Jmp | Mnemonic::Ret | Mnemonic::Ud2 | Mnemonic::Int3
                )
        }
        None => false,
    };
    Some(SignalTaken {
        merge,
        reg,
        branches,
        fall_through,
    })
}

/// Finds the inlined `clear_thread_flag(TIF_NOTIFY_RESUME)` in the function
/// at `start`: the address of the instruction after the first locked (or,
/// on a one-CPU guest, `ds`-prefixed) `and` of a memory operand with an
/// immediate that clears exactly that bit.
pub fn notify_resume_cleared(code: &[u8], start: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        // A kernel running on one CPU has its `lock` prefixes patched to
        // `ds` (alternatives_smp_unlock): accept either.
        let locked = insn.has_lock_prefix() || insn.segment_prefix() == Register::DS;
        if locked
            && insn.mnemonic() == Mnemonic::And
            && insn.op_count() == 2
            && insn.op0_kind() == OpKind::Memory
        {
            let all = match insn.memory_size() {
                MemorySize::UInt8 => 0xff,
                MemorySize::UInt16 => 0xffff,
                MemorySize::UInt32 => 0xffff_ffff,
                _ => u64::MAX,
            };
            let imm = insn.immediate(1) & all;
            if imm == all & !(1u64 << TIF_NOTIFY_RESUME) {
                return Some(insn.next_ip());
            }
        }
    }
    None
}

/// Plans the traps of `sites` on the running kernel `k`: per site the
/// best candidate that can be placed, or every one for a site of
/// [`Reach::Every`]. Returns the plans and, per site that cannot be placed
/// anywhere, why.
pub fn plan<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    symbols: &SymbolMap,
    layout: &TraceLayout,
    sites: &[Site],
) -> (Vec<PlannedTrap>, Vec<String>) {
    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for spec in SITES {
        if !sites.contains(&spec.site) {
            continue;
        }
        // A later candidate may work where a better one cannot (no branch
        // found): try them in order.
        let mut misses = Vec::new();
        let mut placed = false;
        for cand in spec.candidates {
            let one = crate::sites::SiteSpec {
                candidates: std::slice::from_ref(cand),
                ..*spec
            };
            let site = match resolve(&one, symbols) {
                Ok(s) => s,
                Err(e) => {
                    misses.push(e.to_string());
                    continue;
                }
            };
            let start = k.runtime(site.addr);
            let end = symbols.next_above(site.addr).map(|a| k.runtime(a));
            match place(k, layout, &site.symbol, start, end, site.at) {
                Ok(points) => {
                    for (va, insn) in points {
                        let kind = match displaced(&insn) {
                            Some(d) => TrapKind::Int3(d),
                            None => TrapKind::DebugRegister,
                        };
                        plans.push(PlannedTrap {
                            site: spec.site,
                            symbol: site.symbol.clone(),
                            offset: va - start,
                            va,
                            kind,
                            instruction: format!("{insn}"),
                        });
                    }
                    placed = true;
                    if spec.reach == Reach::First {
                        break;
                    }
                }
                Err(e) => misses.push(format!("{}: {e}", site.symbol)),
            }
        }
        if !placed {
            errors.push(format!("{}: {}", spec.site, misses.join("; ")));
        }
    }
    (plans, errors)
}

/// The trap addresses and displaced instructions for a resolved site (one,
/// but for SIGNAL_TAKEN: every branch into `get_signal`'s merge point).
fn place<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    layout: &TraceLayout,
    symbol: &str,
    start: u64,
    end: Option<u64>,
    at: At,
) -> Result<Vec<(u64, Instruction)>> {
    // Scans stop at the next symbol: a pattern in the function after this
    // one is not this function's.
    let within = |limit: usize| match end {
        Some(e) if e > start => limit.min((e - start) as usize),
        _ => limit,
    };
    let va = match at {
        At::SignalTaken => {
            let found = find_signal_taken(k, symbol, start, end)?;
            return found
                .branches
                .iter()
                .map(|&va| Ok((va, instruction_at(k, va)?)))
                .collect();
        }
        At::Entry => start,
        At::NotifyResumeCleared => {
            let mut code = vec![0u8; within(LOOP_SCAN_BYTES)];
            k.read(start, &mut code, "kernel text")?;
            notify_resume_cleared(&code, start).ok_or_else(|| {
                IntrospectError::Corrupt(format!(
                    "no locked clear of TIF_NOTIFY_RESUME in the first {} bytes of {symbol}",
                    code.len()
                ))
            })?
        }
        At::ExitWorkBranch => {
            let mut code = vec![0u8; within(SCAN_BYTES)];
            k.read(start, &mut code, "kernel text")?;
            exit_work_branch(&code, start, layout.exit_work_mask).ok_or_else(|| {
                IntrospectError::Corrupt(format!(
                    "no test of syscall_work against {:#x} followed by a branch in the first {} bytes of {symbol}",
                    layout.exit_work_mask,
                    code.len()
                ))
            })?
        }
    };
    Ok(vec![(va, instruction_at(k, va)?)])
}

/// Finds [`SignalTaken`] in the running kernel's `get_signal` at `start`
/// (up to `end`, the next symbol).
pub fn find_signal_taken<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    symbol: &str,
    start: u64,
    end: Option<u64>,
) -> Result<SignalTaken> {
    let len = match end {
        Some(e) if e > start => FUNCTION_SCAN_BYTES.min((e - start) as usize),
        _ => FUNCTION_SCAN_BYTES,
    };
    let mut code = vec![0u8; len];
    k.read(start, &mut code, "kernel text")?;
    let dequeue = k.symbol("dequeue_signal")?;
    let found = signal_taken(&code, start, dequeue).ok_or_else(|| {
        IntrospectError::Corrupt(format!(
            "no test of dequeue_signal's result followed by je/jne in {symbol}"
        ))
    })?;
    if found.fall_through {
        return Err(IntrospectError::Corrupt(format!(
            "{symbol}: the code before the signal path's merge point at {:#x} falls into it (a path no branch trap would see)",
            found.merge
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit path of the minimal 6.1 kernel (`test $0x76,%bl; je out`)
    /// and of Debian's (`test $0x76,%bl; jne slow`), as objdump shows them.
    #[test]
    fn the_exit_work_branch_in_both_shapes() {
        let minimal = [
            0x48, 0x8b, 0x58, 0x08, // mov 0x8(%rax),%rbx
            0xf6, 0xc3, 0x76, // test $0x76,%bl
            0x0f, 0x84, 0x81, 0x00, 0x00, 0x00, // je +0x81
            0x48, 0x89, 0xfd, // mov %rdi,%rbp   <- slow path
            0xc3,
        ];
        assert_eq!(exit_work_branch(&minimal, 0x1000, 0x76), Some(0x100d));
        let debian = [
            0x40, 0xf6, 0xc5, 0x76, // test $0x76,%bpl
            0x75, 0x13, // jne +0x13
            0x5b, 0xc3,
        ];
        assert_eq!(exit_work_branch(&debian, 0x2000, 0x76), Some(0x2006 + 0x13));
        assert_eq!(exit_work_branch(&debian, 0x2000, 0x36), None, "other mask");
        assert_eq!(exit_work_branch(&[0xff; 16], 0x2000, 0x76), None);
    }

    /// `lock andb $0xfd,(%r12)` (minimal 6.1) and `lock andb $0xfd,0x0(%rbp)`
    /// (Debian 6.1 and 6.12), as objdump shows them; other locked ands and
    /// unlocked ones are not it.
    #[test]
    fn the_notify_resume_clear_in_each_kernel() {
        let minimal = [
            0x80, 0xe3, 0x02, // and $0x2,%bl
            0x74, 0x18, // je
            0xf0, 0x41, 0x80, 0x24, 0x24, 0xfd, // lock andb $0xfd,(%r12)
            0x49, 0x8b, 0x84, 0x24, 0x30, 0x06, 0x00, 0x00, // mov 0x630(%r12),%rax
        ];
        assert_eq!(notify_resume_cleared(&minimal, 0x1000), Some(0x100b));
        // The same on one CPU: the lock prefix patched to ds.
        let mut unlocked = minimal;
        unlocked[5] = 0x3e;
        assert_eq!(notify_resume_cleared(&unlocked, 0x1000), Some(0x100b));
        let debian = [
            0xf0, 0x80, 0x65, 0x00, 0xfd, // lock andb $0xfd,0x0(%rbp)
            0x48, 0x8b, 0x85, 0x58, 0x0c, 0x00, 0x00, // mov 0xc58(%rbp),%rax
        ];
        assert_eq!(notify_resume_cleared(&debian, 0x2000), Some(0x2005));
        // lock andl $0xfffffffd,(%rax): the same clear, 32 bits wide.
        assert_eq!(
            notify_resume_cleared(&[0xf0, 0x83, 0x20, 0xfd, 0x90], 0x3000),
            Some(0x3004)
        );
        // lock andb $0xfb,(%rax) clears TIF_SIGPENDING; andb without prefix.
        assert_eq!(notify_resume_cleared(&[0xf0, 0x80, 0x20, 0xfb], 0), None);
        assert_eq!(notify_resume_cleared(&[0x80, 0x20, 0xfd], 0), None);
        assert_eq!(notify_resume_cleared(&[0xff; 16], 0), None);
    }

    /// The minimal 6.1 kernel's `get_signal`, cut to its dequeue paths
    /// (objdump's bytes, addresses kept): `call dequeue_signal; mov
    /// %eax,%r15d; test %eax,%eax; je out`, the merge point, and the end
    /// of the inlined `dequeue_synchronous_signal`: `mov 0x20(%rbx),%r15d;
    /// test %r15d,%r15d; jne merge; jmp back`.
    #[test]
    fn the_signal_taken_point_and_every_branch_into_it() {
        let base = 0xffff_ffff_8104_43a1u64;
        let mut code = vec![
            0xe8, 0xd9, 0xdb, 0xff, 0xff, // call dequeue_signal
            0x41, 0x89, 0xc7, // mov %eax,%r15d
            0x85, 0xc0, // test %eax,%eax
            0x0f, 0x84, 0x1b, 0x04, 0x00, 0x00, // je out
            0xc3, // (merge, at +0x10) ret
        ];
        // Padding up to the synchronous path's tail at 0x...45d2.
        code.resize((0xffff_ffff_8104_45d2u64 - base) as usize, 0xcc);
        code.extend_from_slice(&[
            0x44, 0x8b, 0x7b, 0x20, // mov 0x20(%rbx),%r15d
            0x45, 0x85, 0xff, // test %r15d,%r15d
            0x0f, 0x85, 0xd2, 0xfd, 0xff, 0xff, // jne merge
            0xe9, 0xa4, 0xfd, 0xff, 0xff, // jmp back
        ]);
        let found = signal_taken(&code, base, 0xffff_ffff_8104_1f7f).expect("found");
        assert_eq!(found.merge, 0xffff_ffff_8104_43b1);
        assert_eq!(found.reg, Register::R15D);
        assert_eq!(
            found.branches,
            vec![0xffff_ffff_8104_43ab, 0xffff_ffff_8104_45d9]
        );
        assert!(!found.fall_through);
        // Another callee: not found.
        assert_eq!(signal_taken(&code, base, 0x1234), None);
        // A jne form (merge at the target), with no move.
        let jne = [
            0xe8, 0x00, 0x00, 0x00, 0x00, // call +0 (dequeue at 0x1005)
            0x85, 0xc0, // test %eax,%eax
            0x75, 0x01, // jne +1
            0xc3, // ret (no signal)
            0x90, // merge
        ];
        let found = signal_taken(&jne, 0x1000, 0x1005).expect("found");
        assert_eq!((found.merge, found.reg), (0x100a, Register::EAX));
        // The ret before the merge cannot fall into it.
        assert!(!found.fall_through);
        // A nop there could.
        let mut falls = jne;
        falls[9] = 0x90;
        assert!(signal_taken(&falls, 0x1000, 0x1005).unwrap().fall_through);
    }
}
