//! The end of a thread: `do_exit` (EXIT, with the exit code in rdi, and a
//! killing signal reported first; report_exit may change the code), `exit_notify` (DEATH) and
//! `release_task` (REAP, with the task in rdi: the last report, after
//! which the thread leaves the table).

use guest_introspect::error::IntrospectError;

use crate::event::{Event, Tid};
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::hv::signals;

impl Dispatcher {
    /// `do_exit(code)`.
    pub(crate) fn on_exit(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.lock().is_traced(t.tid) {
            return Ok(());
        }
        let code = t.regs.rdi as i64;
        if let Some(details) = self.fatal_signal(t, code) {
            let kind = signals::fatal_kind(details.signo);
            let mut ctx = self.thread_context(t);
            ctx.signal = Some(details);
            ctx.signal_disposition = Some(kind);
            let event = Event::Signal {
                signo: details.signo,
                kind,
            };
            self.report(t.tid, &event, &ctx, t.space());
        }
        let ctx = self.thread_context(t);
        self.report(t.tid, &Event::Exit { code }, &ctx, t.space());
        if let Some(new) = ctx.new_exit_code() {
            self.change_exit_code(t, code, new)?;
        }
        Ok(())
    }

    /// report_exit changed the code: `do_exit` gets `new` as its argument,
    /// and if the whole group is exiting with the old code (`exit_group`,
    /// whose `signal->group_exit_code` is what the parent's `wait` sees),
    /// the group's code changes too.
    fn change_exit_code(&self, t: &Trap<'_>, old: i64, new: i64) -> Result<(), IntrospectError> {
        t.new_reg.set(Some((iced_x86::Register::RDI, new as u64)));
        let l = &self.layout;
        let signal = l
            .tasks
            .task
            .signal
            .read(&t.k, t.current, "task_struct.signal")?;
        let at = signal.wrapping_add(l.signal_group_exit_code);
        let group = t.k.read_u32(at, "signal_struct.group_exit_code")?;
        if i64::from(group as i32) == old && old != 0 {
            self.write_kernel(t.space(), at, &(new as i32).to_le_bytes())?;
        }
        Ok(())
    }

    /// `exit_notify`: dead to the world.
    pub(crate) fn on_death(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.lock().is_traced(t.tid) {
            return Ok(());
        }
        let group_dead = self.group_dead(t).unwrap_or(t.tid == t.tgid);
        let event = Event::Death {
            group_dead,
            signal: -1,
        };
        self.report(t.tid, &event, &self.thread_context(t), t.space());
        Ok(())
    }

    /// `release_task(task)`: reaped, by whichever thread runs it.
    pub(crate) fn on_reap(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let k = &t.k;
        let l = &self.layout;
        let task = t.regs.rdi;
        let tid = l.tasks.task.pid.read(k, task, "task_struct.pid")? as u32 as Tid;
        let tgid = l.tasks.task.tgid.read(k, task, "task_struct.tgid")? as u32 as Tid;
        let traced = {
            let mut threads = self.lock();
            if tid == tgid {
                threads.fatal_reported.remove(&tgid);
            }
            threads.is_traced(tid)
        };
        if traced {
            let ctx = crate::context::ThreadContext::new(tid, tgid, self.ram.clone(), t.space());
            self.report(tid, &Event::Reap, &ctx, t.space());
            self.lock().traced.remove(&tid);
        }
        self.lock().trap_flag.remove(&tid);
        Ok(())
    }

    /// Whether the exiting thread is the last of its group
    /// (`signal->live` has reached 0).
    fn group_dead(&self, t: &Trap<'_>) -> Option<bool> {
        let l = &self.layout;
        let signal = l
            .tasks
            .task
            .signal
            .read(&t.k, t.current, "task_struct.signal")
            .ok()?;
        let live =
            t.k.read_u32(signal.wrapping_add(l.signal_live), "signal_struct.live")
                .ok()?;
        Some(live == 0)
    }
}
