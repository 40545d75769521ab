//! The `debug` op's engine: what a debugger (the gdb stub, `hvtrace
//! gdbserver`) needs from the threads of one process, and nothing else.
//!
//! It holds a thread stopped where a debugger under ptrace would get a
//! stop: at the exec it was armed for (the program's first instruction is
//! still to run), and at every signal the thread takes. A signal it stops
//! for is taken away from the thread (utrace's UTRACE_SIGNAL_IGN): the
//! debugger decides later whether the program gets it, as gdb does with
//! `signal SIG` or `handle SIG pass` (the control socket's `cont` with a
//! `signal`). Each stop, new thread and the process's end is an event on
//! the debugger's connection:
//!
//! * `{"debug":"exec","pid":P,"tid":T}` (held at the new program's first
//!   instruction)
//! * `{"debug":"signal","pid":P,"tid":T,"signal":S,"code":C,"handler":H,"syscall":{"nr":N,"ret":E}}`
//!   (`handler`: the program catches S)
//!   (`syscall` null unless the signal interrupted a system call: its
//!   number and error, e.g. -514 for ERESTARTNOHAND)
//! * `{"debug":"thread","pid":P,"tid":NEW}`
//! * `{"debug":"exit","pid":P,"status":W}` (`W` as `wait` gives it: the exit
//!   code times 256, or the killing signal).
//!
//! The stop a report votes lasts until the debugger holds the thread with
//! `stop` (which lifts it: see `Handler::stop`) or detaches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::Sender;
use guest_introspect::pt_regs::Reg;
use serde_json::{json, Value};
use utrace::context::{SignalAction, ThreadContext};
use utrace::engine::{Engine, EngineOps};
use utrace::event::EventMask;
use utrace::ResumeAction;

use super::PROTOCOL_VERSION;

/// Events the debugger engine asks for.
pub const DEBUGGER_EVENTS: EventMask = EventMask(
    EventMask::QUIESCE.0
        | EventMask::CLONE.0
        | EventMask::EXEC.0
        | EventMask::EXIT.0
        | EventMask::DEATH.0
        | EventMask::SIGNAL_ALL.0,
);

/// `CLONE_THREAD` (`include/uapi/linux/sched.h`).
const CLONE_THREAD: u64 = 0x0001_0000;

/// A debugger's engine on every thread of one process.
pub struct Debugger {
    /// The process debugged; 0 until the armed exec happens.
    pid: AtomicI32,
    /// The wait status of the last thread exit reported (the group's).
    status: AtomicI64,
    /// The debugger's connection.
    events: Sender<String>,
    /// The thread of the armed exec, until it is back in user mode (the
    /// exec's report comes before the new program's registers are set).
    exec_thread: AtomicI32,
    /// Per thread, a signal the debugger gives back to it: taken without a
    /// stop (as ptrace's PTRACE_CONT with a signal).
    passing: Mutex<HashMap<i32, i32>>,
}

impl Debugger {
    /// An engine for process `pid` (0: the process that makes the exec
    /// this engine is armed for) sending its events to `events`.
    pub fn new(pid: i32, events: Sender<String>) -> Self {
        Self {
            pid: AtomicI32::new(pid),
            status: AtomicI64::new(0),
            events,
            exec_thread: AtomicI32::new(0),
            passing: Mutex::new(HashMap::new()),
        }
    }

    /// Thread `tid`'s next report of signal `signo` passes it on to the
    /// thread without a stop.
    pub fn pass_signal(&self, tid: i32, signo: i32) {
        self.lock_passing().insert(tid, signo);
    }

    fn lock_passing(&self) -> std::sync::MutexGuard<'_, HashMap<i32, i32>> {
        self.passing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, event: Value) {
        let line = json!({ "v": PROTOCOL_VERSION, "event": event });
        if self.events.try_send(line.to_string()).is_err() {
            log::warn!("api: debugger event lost (its client is not reading): {event}");
        }
    }

    /// Whether `thread` belongs to the process debugged (a forked child
    /// the engine followed does not: it detaches there).
    fn mine(&self, thread: &ThreadContext) -> bool {
        thread.tgid == self.pid.load(Ordering::Relaxed)
    }
}

impl EngineOps for Debugger {
    fn report_quiesce(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        event: EventMask,
    ) -> ResumeAction {
        // The armed exec's thread on its way to the new program's first
        // instruction: held there.
        if event.0 == 0
            && self
                .exec_thread
                .compare_exchange(thread.tid, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.send(json!({"debug": "exec", "pid": thread.tgid, "tid": thread.tid}));
            return ResumeAction::Stop;
        }
        ResumeAction::Resume
    }

    fn report_clone(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        clone_flags: u64,
        child: i32,
    ) -> ResumeAction {
        if self.mine(thread) && clone_flags & CLONE_THREAD != 0 {
            self.send(json!({"debug": "thread", "pid": thread.tgid, "tid": child}));
        }
        ResumeAction::Resume
    }

    fn report_exec(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        filename: &str,
    ) -> ResumeAction {
        // The armed exec: this thread's process is the one debugged, held
        // before its first instruction (REPORT: at its return to user mode,
        // once the new program's registers are set).
        if self
            .pid
            .compare_exchange(0, thread.tgid, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            log::info!("api: debugging {filename} (pid {})", thread.tgid);
            self.exec_thread.store(thread.tid, Ordering::Relaxed);
            return ResumeAction::Report;
        }
        if self.mine(thread) {
            ResumeAction::Resume
        } else {
            ResumeAction::Detach
        }
    }

    fn report_signal(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        signo: i32,
    ) -> ResumeAction {
        if !self.mine(thread) {
            return ResumeAction::Detach;
        }
        if signo == 0 {
            return ResumeAction::Resume;
        }
        {
            let mut passing = self.lock_passing();
            if passing.get(&thread.tid) == Some(&signo) {
                passing.remove(&thread.tid);
                return ResumeAction::Resume;
            }
        }
        if let Err(e) = thread.set_signal_action(SignalAction::Ignore) {
            log::warn!(
                "api: debugger cannot hold back signal {signo} of {}: {e}",
                thread.tid
            );
        }
        let code = thread.signal.map(|s| s.code).unwrap_or(0);
        // SIG_DFL is 0 and SIG_IGN 1: anything else is a handler.
        let handler = thread.signal.is_some_and(|s| s.handler > 1);
        // A system call the signal interrupted, and its error (-ERESTART*):
        // what the debugger needs to make the call return -EINTR if it
        // later gives a handler the signal, as the kernel would have.
        let call = thread.regs().and_then(|r| {
            let nr = r.get(Reg::OrigAx) as i64;
            (nr >= 0).then(|| json!({"nr": nr, "ret": r.get(Reg::Ax) as i64}))
        });
        self.send(json!({"debug": "signal", "pid": thread.tgid, "tid": thread.tid, "signal": signo, "code": code, "handler": handler, "syscall": call}));
        ResumeAction::Stop
    }

    fn report_exit(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        orig_code: i64,
        _code: &mut i64,
    ) -> ResumeAction {
        if self.mine(thread) {
            self.status.store(orig_code, Ordering::Relaxed);
        }
        ResumeAction::Resume
    }

    fn report_death(
        &self,
        _engine: &Engine,
        thread: &ThreadContext,
        group_dead: bool,
        _signal: i32,
    ) {
        if group_dead && self.mine(thread) {
            let status = self.status.load(Ordering::Relaxed) as i32;
            self.send(json!({"debug": "exit", "pid": thread.tgid, "status": status}));
        }
    }
}
