//! System-call entry and exit. Only steered threads reach these sites
//! (see [`crate::hv::task_bits`]); a thread that is not traced (any more)
//! is steered off and pays no further trap.

use guest_introspect::error::IntrospectError;
use guest_introspect::pt_regs::Reg;

use crate::event::Event;
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::hv::signals;

impl Dispatcher {
    /// `syscall_trace_enter`: the call's number and arguments from the
    /// saved user registers.
    pub(crate) fn on_syscall_entry(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.still_traced(t)? {
            return Ok(());
        }
        let u = self.user_regs(&t.k, t.current)?;
        let nr = u.syscall_nr();
        if let Some(traced) = self.lock().traced.get_mut(&t.tid) {
            traced.syscall = Some(nr);
        }
        let event = Event::SyscallEntry {
            nr,
            args: u.syscall_args(),
        };
        let mut ctx = self
            .thread_context(t)
            .with_regs(u, self.pt_regs.clone(), true);
        ctx.stepped_instructions = self.stepped_into_syscall(t);
        self.report(t.tid, &event, &ctx, t.space());
        t.send_signal.set(ctx.signal_to_send());
        Ok(())
    }

    /// The exit work: the return value from the saved `ax`.
    pub(crate) fn on_syscall_exit(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.still_traced(t)? {
            return Ok(());
        }
        let u = self.user_regs(&t.k, t.current)?;
        let mut nr = u.syscall_nr();
        if let Some(traced) = self.lock().traced.get_mut(&t.tid) {
            // rt_sigreturn restores orig_ax = -1 before its exit is seen.
            if let Some(entered) = traced.syscall.take() {
                if nr as i64 == -1 {
                    nr = entered;
                }
            }
        }
        // A call a SIGKILL cut short never returns to user mode: like a
        // ptracer, engines see no exit (strace prints `= ?`).
        if signals::dying_of_sigkill(&t.k, &self.layout, t.current)? {
            return Ok(());
        }
        let event = Event::SyscallExit {
            nr,
            ret: u.get(Reg::Ax) as i64,
        };
        let ctx = self
            .thread_context(t)
            .with_regs(u, self.pt_regs.clone(), false);
        self.report(t.tid, &event, &ctx, t.space());
        self.step_after_syscall(t)
    }

    /// Whether `t`'s thread is traced; if not, it is steered off the
    /// system-call sites.
    fn still_traced(&self, t: &Trap<'_>) -> Result<bool, IntrospectError> {
        if self.lock().is_traced(t.tid) {
            return Ok(true);
        }
        self.count_untraced();
        self.steer_off_untraced(&t.k, t.current)?;
        Ok(false)
    }
}
