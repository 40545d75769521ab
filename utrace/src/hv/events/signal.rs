//! Signals: `signal_setup_done` (a delivery to a user handler, reported
//! as SIGNAL with its siginfo) and `get_signal` (a dequeue: its `ksignal`
//! is kept, so that a thread that then dies of the signal's default action
//! reports it, with its siginfo, at `do_exit`; see [`crate::hv::signals`]).

use guest_introspect::error::IntrospectError;

use crate::context::SignalDetails;
use crate::event::{Event, EventMask};
use crate::hv::dispatch::{Dispatcher, Trap};
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

    /// `signal_setup_done(failed, ksig, stepping)`: delivered to a handler
    /// unless the frame could not be written.
    pub(crate) fn on_signal_delivered(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
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
