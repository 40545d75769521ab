//! What a step's report tells engines, and the block-step rule: which
//! executed instruction ends a block.
//!
//! A thread steps while an engine's last vote was SINGLESTEP or BLOCKSTEP
//! ([`crate::thread::ThreadUtrace::stepping`]). Each completed step is
//! reported as report_quiesce with event 0 (the quiescent point after the
//! step), with a [`StepReport`] in the callback's
//! [`crate::context::ThreadContext::step`]. utrace's own users saw a step
//! as the SIGTRAP the architecture raised, in report_signal, and had to
//! swallow it; here no SIGTRAP exists (the guest never sees one), so the
//! quiescence is the whole report.

use iced_x86::{FlowControl, Instruction};

use crate::action::ResumeAction;

/// Why a step report comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCause {
    /// One user instruction ran (for BLOCKSTEP: a taken branch ran, and
    /// `ip` is its target).
    Instruction,
    /// The step ran a `syscall` instruction: the call has returned (its
    /// entry and exit were reported in between) and the thread is back at
    /// the next instruction, as ptrace's syscall-exit step trap.
    SyscallReturn,
    /// The thread is about to run a signal handler's first instruction.
    /// No instruction ran since the previous report: the kernel moved the
    /// thread there (ptrace reports this stop too).
    SignalHandler,
}

/// A completed step, as its report sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepReport {
    /// SINGLESTEP or BLOCKSTEP: how the thread was stepping.
    pub mode: ResumeAction,
    /// Why the report comes.
    pub cause: StepCause,
    /// The user instruction the thread runs next.
    pub ip: u64,
    /// The instruction that ran, for [`StepCause::Instruction`] (with
    /// BLOCKSTEP, the taken branch).
    pub from: Option<u64>,
    /// How many user instructions ran since the thread's previous report
    /// or system-call entry (1 for a single step; a block's length for a
    /// block step; 0 for [`StepCause::SignalHandler`] and
    /// [`StepCause::SyscallReturn`], whose `syscall` was counted at the
    /// entry: [`crate::context::ThreadContext::stepped_instructions`]).
    pub instructions: u64,
}

/// Whether `insn` (executed) ended a block, the thread now being at `ip`:
/// a taken branch, as the x86 BTF flag counts them (jumps, calls and
/// returns always; a conditional branch when it went to its target, which
/// is told from the fall-through by `ip`, or, for a branch to the very
/// next instruction, by both being the same place anyway).
pub fn ends_block(insn: &Instruction, ip: u64) -> bool {
    match insn.flow_control() {
        FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::Call
        | FlowControl::IndirectCall
        | FlowControl::Return => true,
        FlowControl::ConditionalBranch => {
            ip != insn.next_ip() || insn.near_branch_target() == insn.next_ip()
        }
        FlowControl::Interrupt => ip != insn.next_ip(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8], ip: u64) -> Instruction {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
    }

    #[test]
    fn taken_branches_end_a_block_others_do_not() {
        // jnz -5 at 0x1000 (2 bytes): taken to 0xffd, not taken to 0x1002.
        let jnz = decode(&[0x75, 0xfb], 0x1000);
        assert!(ends_block(&jnz, 0xffd));
        assert!(!ends_block(&jnz, 0x1002));
        // call rel32, ret, jmp: always.
        let call = decode(&[0xe8, 0, 0, 0, 0], 0x1000);
        assert!(ends_block(&call, 0x1005), "a call to the next instruction");
        assert!(ends_block(&decode(&[0xc3], 0x1000), 0x2000));
        assert!(ends_block(&decode(&[0xeb, 0x00], 0x1000), 0x1002));
        // add, mov: never.
        assert!(!ends_block(&decode(&[0x48, 0x01, 0xc8], 0x1000), 0x1003));
        // jz to the next instruction: the same place either way.
        assert!(ends_block(&decode(&[0x74, 0x00], 0x1000), 0x1002));
    }
}
