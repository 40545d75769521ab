//! The QUIESCE site: the return-to-user work just after it consumed
//! TIF_NOTIFY_RESUME. A thread with a REPORT due (set by a REPORT vote or
//! `control(REPORT)`, which also set the flag) reports report_quiesce(0)
//! here, with no system call interrupted; a thread with an INTERRUPT due
//! that did not report it at `get_signal` reports it here; any other
//! thread passing is counted and let go (or parked, if held stopped: see
//! [`crate::hv::park`]).

use guest_introspect::error::IntrospectError;

use crate::event::Event;
use crate::hv::dispatch::{Dispatcher, Trap};

impl Dispatcher {
    /// INTERRUPT's report: report_signal with no signal (utrace's
    /// UTRACE_SIGNAL_REPORT).
    pub(crate) fn report_interrupt(&self, t: &Trap<'_>) {
        let ctx = self.thread_context(t).allowing_signal_send();
        self.report(t.tid, &Event::interrupt(), &ctx, t.space());
        // A signal an engine injects: the thread takes it next.
        t.send_signal.set(ctx.signal_to_send());
    }

    /// The QUIESCE site.
    pub(crate) fn on_quiesce(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let (due, interrupted) = match self.lock().traced.get_mut(&t.tid) {
            Some(traced) => (
                std::mem::take(&mut traced.report_pending),
                std::mem::take(&mut traced.interrupt_pending),
            ),
            None => (false, false),
        };
        if interrupted {
            // An INTERRUPT whose TIF_SIGPENDING the kernel cleared before
            // get_signal (no signal was pending): reported here instead.
            self.report_interrupt(t);
        } else if due {
            self.report(t.tid, &Event::Quiesce, &self.thread_context(t), t.space());
        } else {
            self.count_untraced();
        }
        Ok(())
    }
}
