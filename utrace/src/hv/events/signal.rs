//! Signals: `get_signal`'s entry (its `ksignal` is kept, and an
//! INTERRUPT's report is made there), SIGNAL_TAKEN (the signal it has just
//! dequeued, reported with its disposition; the engines' vote is applied
//! there), and `signal_setup_done` (a delivery to a user handler, reported
//! there only in a kernel where SIGNAL_TAKEN could not be placed). A
//! thread that dies of a signal the kernel never dequeued reports it at
//! `do_exit` (see [`crate::hv::signals`]).
//!
//! How a vote is applied at SIGNAL_TAKEN, without changing the kernel's
//! code: the register holding `signr` and the `ksignal`'s siginfo are
//! rewritten before `get_signal` reads them. A replacement signal is
//! written as is; the kernel then looks up its disposition and acts on it.
//! Ignoring is a replacement by a signal whose disposition is to do
//! nothing (one the thread ignores, or one whose default is to do
//! nothing and which it does not catch): `get_signal` drops it and looks
//! for the next pending signal, exactly as for a signal the thread
//! ignores. Stopping is a replacement by SIGSTOP. A replacement by a stop
//! signal also gets the mark `dequeue_signal` gives one it dequeues
//! (`JOBCTL_STOP_DEQUEUED` in the task's `jobctl`, written while the
//! thread holds the signal lock that guards it), without which
//! `do_signal_stop` would not stop.

use guest_introspect::error::IntrospectError;

use crate::context::{SignalAction, SignalDetails};
use crate::event::{Event, EventMask, CLD_CONTINUED, CLD_STOPPED};
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::hv::displaced::gpr;
use crate::hv::placement::TrapKind;
use crate::hv::signals;

impl Dispatcher {
    /// `get_signal(ksig)`: note where a signal this thread dequeues will
    /// be, should it die of it.
    pub(crate) fn on_signal_dequeued(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let interrupted = match self.lock().traced.get_mut(&t.tid) {
            Some(traced) => {
                traced.get_signal = Some((t.regs.rdi, t.regs.rsp));
                std::mem::take(&mut traced.interrupt_pending)
            }
            None => {
                self.count_untraced();
                false
            }
        };
        if interrupted {
            // The INTERRUPT's report, before any real signal is dequeued.
            self.report_interrupt(t);
        }
        Ok(())
    }

    /// SIGNAL_TAKEN: a branch into the point where `get_signal` has taken
    /// a signal. Reports it to the thread's engines with its siginfo and
    /// disposition, then applies their choice.
    pub(crate) fn on_signal_taken(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let Some(at) = self.signal_taken.get() else {
            return Ok(());
        };
        let TrapKind::Int3(branch) = t.plan.kind else {
            return Ok(());
        };
        if branch.next_rip(t.plan.va, t.regs.rflags) != at.merge {
            // No signal on this path.
            return Ok(());
        }
        let signo = gpr(t.regs, at.reg).unwrap_or(0) as u32 as i32;
        let ksig = match self.lock().traced.get(&t.tid) {
            Some(traced) => traced.get_signal,
            None => {
                self.count_untraced();
                return Ok(());
            }
        };
        // The ksignal of this get_signal: noted at its entry, on this
        // stack, above the trap.
        let Some((ksig, _)) = ksig.filter(|&(_, frame)| t.regs.rsp < frame) else {
            return Ok(());
        };
        if !(1..=64).contains(&signo) {
            return Ok(());
        }
        let k = &t.k;
        let l = &self.layout;
        let info = ksig.wrapping_add(l.ksig_info);
        let details = SignalDetails {
            signo,
            handler: self.signal_handler(t, signo)?,
            ..signals::read_siginfo(k, &l.siginfo, info)?
        };
        let kind = signals::disposition(signo, details.handler);
        let mut ctx = self.thread_context(t).voting_on_signal();
        // The user registers too: a call the signal interrupted is seen
        // with its error (ax), before the kernel decides on its restart.
        if let Ok(u) = self.user_regs(k, t.current) {
            ctx = ctx.with_regs(u, self.pt_regs.clone(), false);
        }
        ctx.signal = Some(details);
        ctx.signal_disposition = Some(kind);
        self.report(t.tid, &Event::Signal { signo, kind }, &ctx, t.space());
        let action = ctx.signal_action();
        let fatal = EventMask(EventMask::SIGNAL_TERM.0 | EventMask::SIGNAL_CORE.0);
        if action == SignalAction::Deliver && fatal.contains(kind) {
            // Reported here: not again when the thread exits of it.
            self.lock().fatal_reported.insert(t.tgid);
        }
        let replacement = match action {
            SignalAction::Deliver => return Ok(()),
            SignalAction::Replace(d) => d,
            SignalAction::Stop => SignalDetails {
                signo: signals::SIGSTOP,
                ..details
            },
            SignalAction::Ignore => match self.ignorable_signal(t)? {
                Some(signo) => SignalDetails {
                    signo,
                    code: 0x80, // SI_KERNEL
                    pid: 0,
                    uid: 0,
                    status: 0,
                    handler: 0,
                },
                None => {
                    log::warn!(
                        "tracer: cannot ignore signal {signo} of thread {}: it catches every signal that could stand in for it",
                        t.tid
                    );
                    return Ok(());
                }
            },
        };
        self.write_siginfo(t, info, &replacement)?;
        if signals::stops_by_default(replacement.signo) {
            // What dequeue_signal does for a stop signal it dequeues:
            // do_signal_stop stops only a thread marked so.
            let jobctl = t.current.wrapping_add(self.layout.task_jobctl);
            let old = t.k.read_u64(jobctl, "task_struct.jobctl")?;
            self.write_kernel(
                t.space(),
                jobctl,
                &(old | signals::JOBCTL_STOP_DEQUEUED).to_le_bytes(),
            )?;
        }
        t.new_reg
            .set(Some((at.reg, replacement.signo as u32 as u64)));
        Ok(())
    }

    /// The `sa_handler` of signal `signo` in the current task's
    /// `sighand->action`.
    fn signal_handler(&self, t: &Trap<'_>, signo: i32) -> Result<u64, IntrospectError> {
        let l = &self.layout;
        let sighand = t.k.read_u64(
            t.current.wrapping_add(l.task_sighand),
            "task_struct.sighand",
        )?;
        let action = sighand
            .wrapping_add(l.sighand_action)
            .wrapping_add(l.k_sigaction_size.wrapping_mul(signo as u64 - 1))
            .wrapping_add(l.k_sigaction_handler);
        t.k.read_u64(action, "k_sigaction.sa.sa_handler")
    }

    /// A signal whose taking does nothing for the current task: one it
    /// ignores, else one whose default is to do nothing and which it does
    /// not catch. None if it catches all of those and ignores nothing.
    fn ignorable_signal(&self, t: &Trap<'_>) -> Result<Option<i32>, IntrospectError> {
        for signo in [23, 28, 18, 17] {
            if self.signal_handler(t, signo)? <= signals::SIG_IGN {
                return Ok(Some(signo));
            }
        }
        for signo in 1..=64 {
            if signo != signals::SIGKILL
                && signo != signals::SIGSTOP
                && self.signal_handler(t, signo)? == signals::SIG_IGN
            {
                return Ok(Some(signo));
            }
        }
        Ok(None)
    }

    /// Writes `d` as the kernel siginfo at `info`: zeroed, then its number,
    /// code, sender and status.
    fn write_siginfo(
        &self,
        t: &Trap<'_>,
        info: u64,
        d: &SignalDetails,
    ) -> Result<(), IntrospectError> {
        let l = &self.layout;
        let mut bytes = vec![0u8; l.siginfo_size as usize];
        let mut put = |off: u64, v: u32| {
            let at = off as usize;
            if let Some(slot) = bytes.get_mut(at..at + 4) {
                slot.copy_from_slice(&v.to_le_bytes());
            }
        };
        put(l.siginfo.signo, d.signo as u32);
        put(l.siginfo.code, d.code as u32);
        put(l.siginfo.pid, d.pid as u32);
        put(l.siginfo.uid, d.uid);
        if d.signo == 17 {
            put(l.siginfo.status, d.status as u32);
        }
        self.write_kernel(t.space(), info, &bytes)
    }

    /// `do_signal_stop(signr)`: the thread is about to join its group's
    /// job-control stop (JCTL, CLD_STOPPED).
    pub(crate) fn on_job_stop(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.lock().is_traced(t.tid) {
            self.count_untraced();
            return Ok(());
        }
        let event = Event::Jctl {
            kind: CLD_STOPPED,
            signo: t.regs.rdi as i32,
        };
        self.report(t.tid, &event, &self.thread_context(t), t.space());
        Ok(())
    }

    /// `do_notify_parent_cldstop(tsk, for_ptracer, why)`: with `why` =
    /// CLD_CONTINUED and not for a ptracer, the current thread runs again
    /// after a job-control stop (JCTL, CLD_CONTINUED).
    pub(crate) fn on_job_continue(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if t.regs.rdx as i32 != CLD_CONTINUED || t.regs.rsi as u8 != 0 {
            return Ok(());
        }
        if !self.lock().is_traced(t.tid) {
            self.count_untraced();
            return Ok(());
        }
        let event = Event::Jctl {
            kind: CLD_CONTINUED,
            signo: 0,
        };
        self.report(t.tid, &event, &self.thread_context(t), t.space());
        Ok(())
    }

    /// `signal_setup_done(failed, ksig, stepping)`: delivered to a handler
    /// unless the frame could not be written. Reported here only where
    /// SIGNAL_TAKEN is not set (it reported the signal already).
    pub(crate) fn on_signal_delivered(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        self.report_delivery(t)?;
        if t.regs.rdi as i32 == 0 {
            // A stepped thread's step ends at the handler.
            self.step_into_handler(t)?;
        }
        Ok(())
    }

    /// The signal report at `signal_setup_done`, where SIGNAL_TAKEN is not
    /// set.
    fn report_delivery(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if self.signal_taken.get().is_some() {
            return Ok(());
        }
        if t.regs.rdi as i32 != 0 || !self.lock().is_traced(t.tid) {
            return Ok(());
        }
        let k = &t.k;
        let l = &self.layout;
        let ksig = t.regs.rsi;
        let details = SignalDetails {
            signo: k.read_u32(ksig.wrapping_add(l.ksig_sig), "ksignal.sig")? as i32,
            handler: k.read_u64(
                ksig.wrapping_add(l.ksig_handler),
                "ksignal.ka.sa.sa_handler",
            )?,
            ..signals::read_siginfo(k, &l.siginfo, ksig.wrapping_add(l.ksig_info))?
        };
        let mut ctx = self.thread_context(t);
        ctx.signal = Some(details);
        ctx.signal_disposition = Some(EventMask::SIGNAL);
        let event = Event::Signal {
            signo: details.signo,
            kind: EventMask::SIGNAL,
        };
        self.report(t.tid, &event, &ctx, t.space());
        Ok(())
    }

    /// The siginfo of the signal that kills `t`'s thread with exit code
    /// `code`, if it is the first of its group to exit by it and the
    /// signal is one strace reports (not SIGKILL).
    pub(crate) fn fatal_signal(&self, t: &Trap<'_>, code: i64) -> Option<SignalDetails> {
        let signo = signals::killed_by(code);
        if signo == 0 || signo == signals::SIGKILL {
            return None;
        }
        let dequeued = {
            let mut threads = self.lock();
            if !threads.fatal_reported.insert(t.tgid) {
                return None;
            }
            threads
                .traced
                .get_mut(&t.tid)
                .and_then(|traced| traced.get_signal.take())
        };
        let l = &self.layout;
        // Dequeued by get_signal, whose frame do_exit runs below.
        if let Some((ksig, frame)) = dequeued {
            if t.regs.rsp < frame {
                let info = ksig.wrapping_add(l.ksig_info);
                match signals::read_siginfo(&t.k, &l.siginfo, info) {
                    Ok(d) if d.signo == signo => return Some(d),
                    _ => {}
                }
            }
        }
        // Short-circuited by complete_signal: still queued.
        match signals::queued_siginfo(&t.k, l, t.current, signo) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("tracer: the signal that killed thread {}: {e}", t.tid);
                None
            }
        }
    }
}
