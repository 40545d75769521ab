//! SINGLESTEP and BLOCKSTEP of a user thread, through the guest's own
//! single-step machinery.
//!
//! While an engine steps a thread ([`crate::thread::ThreadUtrace::stepping`])
//! the tracer keeps the trap flag (TF) set in the thread's saved user
//! RFLAGS (its `pt_regs`, written at a report, while the thread is in the
//! kernel) and marks it `TIF_FORCED_TF`, as the kernel's own
//! `user_enable_single_step` does. So the processor raises `#DB` after the
//! thread's next user instruction, the guest kernel's `#DB` handler runs
//! on the thread's own stack (from user mode it switches off the IST
//! stack) and calls `send_sigtrap(regs, 0, TRAP_TRACE)`. The STEP trap sits
//! at `send_sigtrap`'s entry: for a thread the tracer steps, the trap
//! returns from `send_sigtrap` at once (the `ret` is done in the VMM), so
//! no SIGTRAP is ever queued, and reports the step. Every other caller
//! (the guest's own ptrace stepping, a program's own TF) passes untouched.
//!
//! The kernel's own paths cover the rest, as they do for ptrace:
//! - A `syscall` instruction does not trap (SYSCALL clears TF): its step
//!   completes at the system-call exit, reported there after the exit's
//!   own report. Linux returns with IRET when TF is set, so the next
//!   instruction traps again.
//! - Signal delivery clears TF for the handler (`handle_signal`) after
//!   saving the flags in the signal frame: at `signal_setup_done` the step
//!   is reported at the handler's first instruction, TF is set again, and
//!   the frame's saved TF is cleared so that `rt_sigreturn` does not bring
//!   back a TF nobody owns.
//! - A stepped thread is steered onto the system-call sites (as a thread
//!   whose engines want system calls is) for as long as it carries the TF.
//! - `fork`/`clone` clear TF in the child because of `TIF_FORCED_TF`
//!   (`copy_process` calls `user_disable_single_step`); `exec` clears it
//!   (`start_thread`), and the execve's exit report sets it again.
//! - The guest's `ptrace(PTRACE_GETREGS)` hides a forced TF, as it hides
//!   its own.
//!
//! BLOCKSTEP is emulated: DEBUGCTL.BTF is not available to a guest on
//! these hosts (PTRACE_SINGLEBLOCK steps single instructions on them), so
//! the thread single-steps and only a step that ran a taken branch
//! ([`crate::step::ends_block`]) is reported; the others return to the
//! thread at once.
//!
//! When the last engine stops stepping, the next report of the thread
//! clears TF; a thread that went back to user mode with TF meanwhile (its
//! engine detached from outside) traps once more and is cleared then,
//! silently. [`crate::hv::Tracer::release_step_site`] removes the STEP trap
//! once no thread carries a TF of the tracer's.

use guest_introspect::error::IntrospectError;
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, AddressSpace};
use guest_introspect::pt_regs::{Reg, UserRegs};
use iced_x86::{Decoder, DecoderOptions};

use crate::event::{Event, Tid};
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::sites::Site;
use crate::step::{ends_block, StepCause, StepReport};
use crate::thread::Lifecycle;
use crate::ResumeAction;

/// RFLAGS.TF.
const X86_EFLAGS_TF: u64 = 0x100;
/// `TIF_FORCED_TF`: bit 24 of the x86 thread flags ("TF in eflags set
/// artificially", `arch/x86/include/asm/thread_info.h`, the same from
/// 2.6.25 through 6.12).
const TIF_FORCED_TF: u32 = 24;
/// Where a 64-bit signal frame keeps the interrupted flags, from the user
/// stack pointer at the handler's entry: `rt_sigframe.uc.uc_mcontext.flags`
/// (pretcode 8, then `uc_flags` 8, `uc_link` 8, `uc_stack` 24, then 17
/// registers of `struct sigcontext`): user ABI, fixed.
const SIGFRAME_FLAGS: u64 = 8 + 8 + 8 + 24 + 17 * 8;

/// A thread whose saved user flags carry a TF the tracer set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnedTrapFlag {
    /// Its `task_struct`.
    pub task: u64,
    /// The user instruction it runs next, as of its last trap or report:
    /// the one a step report names as run.
    pub next_ip: u64,
    /// User instructions it ran since its last report.
    pub ran: u64,
}

impl Dispatcher {
    /// Whether the STEP trap is set.
    pub fn has_step_site(&self) -> bool {
        self.has_site(Site::Step)
    }

    /// Whether `t`'s thread carries a TF the tracer set.
    fn owns_trap_flag(&self, t: &Trap<'_>) -> bool {
        let threads = self.lock();
        threads
            .trap_flag
            .get(&t.tid)
            .is_some_and(|o| o.task == t.current)
    }

    /// How traced thread `tid` steps now (None if not, or if it is dying).
    fn stepping(&self, tid: Tid) -> Option<ResumeAction> {
        let utrace = self.lock().utrace(tid)?;
        if utrace.lifecycle() != Lifecycle::Alive {
            return None;
        }
        utrace.stepping()
    }

    /// The STEP site, `send_sigtrap(regs, error_code, si_code)`: a thread
    /// the tracer steps has run one user instruction.
    pub(crate) fn on_step_trap(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let owned = self.lock().trap_flag.get(&t.tid).copied();
        let Some(owned) = owned.filter(|o| o.task == t.current) else {
            // The guest's own SIGTRAP (its ptrace stepping, a program's TF).
            return Ok(());
        };
        let u = self.user_regs(&t.k, t.current)?;
        if t.regs.rdi != u.addr || u.get(Reg::Flags) & X86_EFLAGS_TF == 0 {
            // Not the #DB of the thread's user instruction.
            return Ok(());
        }
        // No SIGTRAP: the call returns at once.
        t.skip_call.set(true);
        let ip = u.get(Reg::Ip);
        let Some(mode) = self.stepping(t.tid) else {
            // Nobody steps it any more: the last step of a TF left behind.
            self.clear_trap_flag(t.tid, t.space(), &u)?;
            return Ok(());
        };
        if let Some(o) = self.lock().trap_flag.get_mut(&t.tid) {
            o.next_ip = ip;
            o.ran += 1;
        }
        if mode == ResumeAction::BlockStep && !self.ran_taken_branch(t.space(), owned.next_ip, ip) {
            return Ok(());
        }
        self.report_step(t, u, mode, StepCause::Instruction, Some(owned.next_ip));
        Ok(())
    }

    /// Whether the instruction at `from` (in `space`), now run, went to
    /// `ip` by a taken branch. An instruction that cannot be read counts as
    /// one (a block report too many rather than one lost).
    fn ran_taken_branch(&self, space: AddressSpace, from: u64, ip: u64) -> bool {
        let mut bytes = [0u8; 15];
        // The instruction may end before a page that is not mapped.
        let in_page = (0x1000 - (from & 0xfff)) as usize;
        let n = if read_virt(&self.ram, space, VirtAddr(from), &mut bytes).is_ok() {
            15
        } else if read_virt(
            &self.ram,
            space,
            VirtAddr(from),
            &mut bytes[..in_page.min(15)],
        )
        .is_ok()
        {
            in_page.min(15)
        } else {
            return true;
        };
        let insn = Decoder::with_ip(64, &bytes[..n], from, DecoderOptions::NONE).decode();
        insn.is_invalid() || ends_block(&insn, ip)
    }

    /// At a system call's entry: for a thread the tracer steps, the user
    /// instructions it ran since its last report, this `syscall` included.
    pub(crate) fn stepped_into_syscall(&self, t: &Trap<'_>) -> Option<u64> {
        let mut threads = self.lock();
        let o = threads
            .trap_flag
            .get_mut(&t.tid)
            .filter(|o| o.task == t.current)?;
        Some(std::mem::take(&mut o.ran) + 1)
    }

    /// At a system call's exit: a thread that stepped onto its `syscall`
    /// completes that step now (after the exit's own report).
    pub(crate) fn step_after_syscall(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.owns_trap_flag(t) {
            return Ok(());
        }
        let Some(mode) = self.stepping(t.tid) else {
            return Ok(());
        };
        let u = self.user_regs(&t.k, t.current)?;
        // The `syscall` itself was counted at its entry.
        self.report_step(t, u, mode, StepCause::SyscallReturn, None);
        Ok(())
    }

    /// At `signal_setup_done` with the frame written: a stepped thread is
    /// about to run the handler. Clears the TF the frame saved (ours), and
    /// reports the step at the handler's first instruction.
    pub(crate) fn step_into_handler(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.owns_trap_flag(t) {
            return Ok(());
        }
        let u = self.user_regs(&t.k, t.current)?;
        let saved = u.get(Reg::Sp).wrapping_add(SIGFRAME_FLAGS);
        let mut word = [0u8; 8];
        if read_virt(&self.ram, t.space(), VirtAddr(saved), &mut word).is_ok() {
            let flags = u64::from_le_bytes(word);
            if flags & X86_EFLAGS_TF != 0 {
                let cleared = flags & !X86_EFLAGS_TF;
                self.write_kernel(t.space(), saved, &cleared.to_le_bytes())?;
            }
        }
        match self.stepping(t.tid) {
            Some(mode) => self.report_step(t, u, mode, StepCause::SignalHandler, None),
            // Not stepping any more: handle_signal cleared TF already.
            None => {
                self.lock().trap_flag.remove(&t.tid);
            }
        }
        Ok(())
    }

    /// Reports a completed step of `t`'s thread (registers `u`; `from`,
    /// the instruction that ran, where known).
    fn report_step(
        &self,
        t: &Trap<'_>,
        u: UserRegs,
        mode: ResumeAction,
        cause: StepCause,
        from: Option<u64>,
    ) {
        let ip = u.get(Reg::Ip);
        let instructions = match self.lock().trap_flag.get_mut(&t.tid) {
            Some(o) => {
                o.next_ip = ip;
                std::mem::take(&mut o.ran)
            }
            None => 0,
        };
        let mut ctx = self
            .thread_context(t)
            .with_regs(u, self.pt_regs.clone(), false);
        ctx.step = Some(StepReport {
            mode,
            cause,
            ip,
            from,
            instructions,
        });
        self.report(t.tid, &Event::Step, &ctx, t.space());
    }

    /// After a report of thread `tid` made at its own trap (so its user
    /// registers lie saved on its kernel stack): sets TF in them if an
    /// engine steps it, or clears the TF the tracer set if none does.
    pub(crate) fn sync_trap_flag(&self, tid: Tid, space: AddressSpace) {
        let (task, owned) = {
            let threads = self.lock();
            let Some(t) = threads.traced.get(&tid) else {
                return;
            };
            (t.task, threads.trap_flag.contains_key(&tid))
        };
        let stepping = self.stepping(tid);
        if stepping.is_none() && !owned {
            return;
        }
        let k = self.kernel(space);
        let result = self.user_regs(&k, task).and_then(|u| match stepping {
            Some(_) if self.has_step_site() => self.set_trap_flag(tid, task, space, &u),
            Some(_) => {
                log::warn!(
                    "tracer: thread {tid} cannot step: the STEP trap is not set (Tracer::ensure_step_site)"
                );
                Ok(())
            }
            None => self.clear_trap_flag(tid, space, &u),
        });
        if let Err(e) = result {
            log::warn!("tracer: the trap flag of thread {tid}: {e}");
        }
    }

    /// With no engine stepping any more (the tracer is going away): waits
    /// up to `limit` for threads running in user mode with the tracer's TF
    /// to trap once more and be cleared, then clears the TF of the rest,
    /// which are in the kernel (asleep, or preempted: their user flags are
    /// the saved ones).
    pub(crate) fn drain_trap_flags(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.lock().trap_flag.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let left: Vec<(Tid, u64)> = self
            .lock()
            .trap_flag
            .iter()
            .map(|(tid, o)| (*tid, o.task))
            .collect();
        for (tid, task) in left {
            if !self.clear_trap_flag_in_kernel(tid, task) {
                self.lock().trap_flag.remove(&tid);
            }
        }
    }

    /// Clears the TF of thread `tid` (`task`), in the kernel (parked,
    /// asleep or preempted: its user flags are the saved ones), that no
    /// engine steps any more. Whether it could.
    pub(crate) fn clear_trap_flag_in_kernel(&self, tid: Tid, task: u64) -> bool {
        let k = self.kernel(self.kernel_space);
        let result = self
            .user_regs(&k, task)
            .and_then(|u| self.clear_trap_flag(tid, self.kernel_space, &u));
        if let Err(e) = &result {
            log::warn!("tracer: the trap flag of thread {tid}: {e}");
        }
        result.is_ok()
    }

    /// Sets TF in `u` (thread `tid`, `task`) and marks it forced.
    pub(crate) fn set_trap_flag(
        &self,
        tid: Tid,
        task: u64,
        space: AddressSpace,
        u: &UserRegs,
    ) -> Result<(), IntrospectError> {
        let flags = u.get(Reg::Flags);
        if flags & X86_EFLAGS_TF == 0 {
            let at = u.addr.wrapping_add(self.pt_regs.offset(Reg::Flags));
            self.write_kernel(space, at, &(flags | X86_EFLAGS_TF).to_le_bytes())?;
        }
        self.set_thread_flag(space, task, TIF_FORCED_TF)?;
        // Through the system-call sites, where a stepped `syscall`
        // completes and an exec's new registers get their TF again.
        self.steer(space, task, true)?;
        let mut threads = self.lock();
        let owned = threads.trap_flag.entry(tid).or_insert(OwnedTrapFlag {
            task,
            next_ip: 0,
            ran: 0,
        });
        owned.task = task;
        // Where its saved registers say it goes on (an exec, an engine's
        // register change or a signal frame may have moved it).
        owned.next_ip = u.get(Reg::Ip);
        Ok(())
    }

    /// Clears the TF the tracer set in `u` (thread `tid`) and its mark.
    fn clear_trap_flag(
        &self,
        tid: Tid,
        space: AddressSpace,
        u: &UserRegs,
    ) -> Result<(), IntrospectError> {
        let Some(owned) = self.lock().trap_flag.remove(&tid) else {
            return Ok(());
        };
        let flags = u.get(Reg::Flags);
        if flags & X86_EFLAGS_TF != 0 {
            let at = u.addr.wrapping_add(self.pt_regs.offset(Reg::Flags));
            self.write_kernel(space, at, &(flags & !X86_EFLAGS_TF).to_le_bytes())?;
        }
        self.clear_thread_flag(space, owned.task, TIF_FORCED_TF)?;
        let wants_syscalls = self
            .lock()
            .traced
            .get(&tid)
            .is_some_and(|t| t.task == owned.task && t.wants_syscalls());
        if wants_syscalls {
            return Ok(());
        }
        self.steer_off_untraced(&self.kernel(space), owned.task)
    }
}
