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

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;
use guest_introspect::symbols::SymbolMap;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use crate::event::EventMask;
use crate::hv::layout::TraceLayout;
use crate::sites::{resolve, At, SITES};

/// How far into a function the exit-work branch is looked for.
const SCAN_BYTES: usize = 512;

/// How the VMM continues past an `int3` it planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Displaced {
    /// A NOP or `endbr64` of `len` bytes: advance RIP.
    Skip {
        /// Instruction length.
        len: u8,
    },
    /// `call rel32` to `target`: push the return address, jump.
    Call {
        /// Instruction length (5).
        len: u8,
        /// Call target.
        target: u64,
    },
}

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
    /// The event it reports.
    #[serde(skip)]
    pub event: EventMask,
    /// Event name.
    pub event_name: &'static str,
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

/// What the VMM can do in place of `insn`, if anything.
pub fn displaced(insn: &Instruction) -> Option<Displaced> {
    let len = insn.len() as u8;
    match insn.mnemonic() {
        Mnemonic::Nop | Mnemonic::Endbr64 => Some(Displaced::Skip { len }),
        Mnemonic::Call if insn.code() == Code::Call_rel32_64 => Some(Displaced::Call {
            len,
            target: insn.near_branch_target(),
        }),
        _ => None,
    }
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

/// Plans the traps of the events in `events` on the running kernel `k`.
/// Returns the plans and, per event that cannot be placed, why.
pub fn plan<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    symbols: &SymbolMap,
    layout: &TraceLayout,
    events: EventMask,
) -> (Vec<PlannedTrap>, Vec<String>) {
    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for spec in SITES {
        if !events.intersects(spec.event) {
            continue;
        }
        // A later candidate may work where a better one cannot (no branch
        // found): try them in order.
        let mut last_error = String::new();
        let mut placed = false;
        for cand in spec.candidates {
            let one = crate::sites::SiteSpec {
                event: spec.event,
                name: spec.name,
                candidates: std::slice::from_ref(cand),
            };
            let site = match resolve(&one, symbols) {
                Ok(s) => s,
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            match place(k, layout, &site.symbol, k.runtime(site.addr), site.at) {
                Ok((va, insn)) => {
                    let kind = match displaced(&insn) {
                        Some(d) => TrapKind::Int3(d),
                        None => TrapKind::DebugRegister,
                    };
                    plans.push(PlannedTrap {
                        event: spec.event,
                        event_name: spec.name,
                        symbol: site.symbol.clone(),
                        offset: va - k.runtime(site.addr),
                        va,
                        kind,
                        instruction: format!("{insn}"),
                    });
                    placed = true;
                    break;
                }
                Err(e) => last_error = format!("{}: {e}", site.symbol),
            }
        }
        if !placed {
            errors.push(format!("{}: {last_error}", spec.name));
        }
    }
    (plans, errors)
}

/// The trap address and displaced instruction for a resolved site.
fn place<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    layout: &TraceLayout,
    symbol: &str,
    start: u64,
    at: At,
) -> Result<(u64, Instruction)> {
    let va = match at {
        At::Entry => start,
        At::ExitWorkBranch => {
            let mut code = vec![0u8; SCAN_BYTES];
            k.read(start, &mut code, "kernel text")?;
            exit_work_branch(&code, start, layout.exit_work_mask).ok_or_else(|| {
                IntrospectError::Corrupt(format!(
                    "no test of syscall_work against {:#x} followed by a branch in the first {SCAN_BYTES} bytes of {symbol}",
                    layout.exit_work_mask
                ))
            })?
        }
    };
    Ok((va, instruction_at(k, va)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn nops_endbr_and_calls_are_executed_by_the_vmm_others_are_not() {
        // nopl 0x0(%rax,%rax,1): the patched ftrace slot.
        assert_eq!(
            displaced(&decode(&[0x0f, 0x1f, 0x44, 0x00, 0x00])),
            Some(Displaced::Skip { len: 5 })
        );
        assert_eq!(
            displaced(&decode(&[0xf3, 0x0f, 0x1e, 0xfa])),
            Some(Displaced::Skip { len: 4 })
        );
        // call -0x55f85 (an unpatched __fentry__ call)
        assert_eq!(
            displaced(&decode(&[0xe8, 0x7b, 0x2a, 0xfa, 0xff])),
            Some(Displaced::Call {
                len: 5,
                target: 0x1005u64.wrapping_add(0xfffa_2a7b_u32 as i32 as i64 as u64)
            })
        );
        assert_eq!(
            displaced(&decode(&[0x48, 0x89, 0xfd])),
            None,
            "mov %rdi,%rbp"
        );
        assert_eq!(displaced(&decode(&[0x41, 0x54])), None, "push %r12");
    }

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
}
