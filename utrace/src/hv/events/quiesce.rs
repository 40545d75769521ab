//! The QUIESCE site: the return-to-user work just after it consumed
//! TIF_NOTIFY_RESUME. A thread with a REPORT due (set by a REPORT vote or
//! `control(REPORT)`, which also set the flag) reports report_quiesce(0)
//! here, with no system call interrupted; any other thread passing is
//! counted and let go.

use guest_introspect::error::IntrospectError;

use crate::event::Event;
use crate::hv::dispatch::{Dispatcher, Trap};

impl Dispatcher {
    /// The QUIESCE site.
    pub(crate) fn on_quiesce(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let due = match self.lock().traced.get_mut(&t.tid) {
            Some(traced) if traced.report_pending => {
                traced.report_pending = false;
                true
            }
            _ => false,
        };
        if due {
            self.report(t.tid, &Event::Quiesce, &self.thread_context(t), t.space());
        } else {
            self.count_untraced();
        }
        Ok(())
    }
}
