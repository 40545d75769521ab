//! Signals as the tracer reads them from guest kernel memory: the siginfo
//! of a delivery, and the siginfo of a signal that kills its thread group
//! by its default action.
//!
//! A signal delivered to a handler is seen at `signal_setup_done`, with
//! its `ksignal`. A signal whose default action terminates is never
//! delivered that way, and where its siginfo is depends on how the kernel
//! took it (`kernel/signal.c`):
//!
//! * a terminating signal without core dump to an unptraced group is
//!   short-circuited by `complete_signal`: the group is marked exiting and
//!   every thread gets a bare SIGKILL; the signal's own `sigqueue` stays in
//!   the thread's or the group's pending queue until the group is released,
//!   so it is still there when the first thread reaches `do_exit`;
//! * a core-dumping signal (or any signal to a ptraced thread, such as one
//!   run under the guest's own strace) is dequeued by `get_signal` into
//!   the `ksignal` of its caller's frame, and `do_exit` runs below that
//!   frame: the tracer notes the `ksignal` pointer and stack pointer at
//!   `get_signal`'s entry and reads it back there.
//!
//! SIGKILL carries no siginfo (the kernel skips the allocation), and
//! strace prints no `--- SIGKILL ---` line either: it is reported only as
//! the exit it causes.

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;

use crate::context::SignalDetails;
use crate::event::EventMask;
use crate::hv::layout::{SiginfoLayout, TraceLayout};

/// SIGKILL's number on x86-64.
pub const SIGKILL: i32 = 9;

/// Longest signal queue walked: real-time signals may queue many entries,
/// a corrupt list is cut off here.
const QUEUE_MAX: usize = 4096;

/// Whether the default action of `signo` dumps core
/// (`SIG_KERNEL_COREDUMP_MASK` in `include/linux/signal.h`: SIGQUIT,
/// SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGXCPU, SIGXFSZ,
/// SIGSYS on x86-64).
pub fn dumps_core(signo: i32) -> bool {
    matches!(signo, 3 | 4 | 5 | 6 | 7 | 8 | 11 | 24 | 25 | 31)
}

/// SIGSTOP's number on x86-64.
pub const SIGSTOP: i32 = 19;

/// `JOBCTL_STOP_DEQUEUED` (bit 16 of `task_struct.jobctl`,
/// `include/linux/sched/jobctl.h`): a stop signal was dequeued. A
/// preprocessor constant, not in BTF; unchanged since 3.1.
pub const JOBCTL_STOP_DEQUEUED: u64 = 1 << 16;

/// `SIG_DFL`, the default action's "handler".
pub const SIG_DFL: u64 = 0;
/// `SIG_IGN`.
pub const SIG_IGN: u64 = 1;

/// Whether the default action of `signo` is to do nothing
/// (`SIG_KERNEL_IGNORE_MASK`: SIGCONT, SIGCHLD, SIGWINCH, SIGURG).
pub fn ignored_by_default(signo: i32) -> bool {
    matches!(signo, 17 | 18 | 23 | 28)
}

/// Whether the default action of `signo` is a job-control stop
/// (`SIG_KERNEL_STOP_MASK`: SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU).
pub fn stops_by_default(signo: i32) -> bool {
    (19..=22).contains(&signo)
}

/// The utrace disposition bit of signal `signo` taken with handler
/// `handler` (get_signal's order: SIG_IGN, a handler, then the default
/// action's kind).
pub fn disposition(signo: i32, handler: u64) -> EventMask {
    match handler {
        SIG_IGN => EventMask::SIGNAL_IGN,
        SIG_DFL if ignored_by_default(signo) => EventMask::SIGNAL_IGN,
        SIG_DFL if stops_by_default(signo) => EventMask::SIGNAL_STOP,
        SIG_DFL => fatal_kind(signo),
        _ => EventMask::SIGNAL,
    }
}

/// The utrace disposition bit of a signal taking its default action that
/// kills: SIGNAL_CORE or SIGNAL_TERM.
pub fn fatal_kind(signo: i32) -> EventMask {
    if dumps_core(signo) {
        EventMask::SIGNAL_CORE
    } else {
        EventMask::SIGNAL_TERM
    }
}

/// The signal number encoded in exit code `code` (`do_exit`'s argument):
/// its low 7 bits, 0 for a normal exit.
pub fn killed_by(code: i64) -> i32 {
    (code & 0x7f) as i32
}

/// Reads the `kernel_siginfo` at kernel address `info` (`handler` left at
/// `SIG_DFL`).
pub fn read_siginfo<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    l: &SiginfoLayout,
    info: u64,
) -> Result<SignalDetails> {
    let int = |off: u64, what: &str| -> Result<i32> { Ok(k.read_u32(info + off, what)? as i32) };
    Ok(SignalDetails {
        signo: int(l.signo, "si_signo")?,
        code: int(l.code, "si_code")?,
        pid: int(l.pid, "si_pid")?,
        uid: int(l.uid, "si_uid")? as u32,
        status: int(l.status, "si_status")?,
        handler: 0,
    })
}

/// Whether `task` has SIGKILL in its own pending set (the kernel's
/// `__fatal_signal_pending`).
pub fn sigkill_pending<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    l: &TraceLayout,
    task: u64,
) -> Result<bool> {
    let pending = k.read_u64(
        task.wrapping_add(l.task_pending + l.sigpending_signal),
        "sigpending.signal",
    )?;
    Ok(pending & (1 << (SIGKILL - 1)) != 0)
}

/// Whether `task` is being killed by SIGKILL: SIGKILL pending (the
/// kernel's `__fatal_signal_pending`) and its group exiting with SIGKILL's
/// code. Such a thread never returns to user mode, and a ptracer never
/// sees the exit of the call it is in (strace prints `= ?`). A SIGKILL the
/// kernel queued to short-circuit another fatal signal does not count: the
/// group's exit code names that signal, and under ptrace it would have
/// been delivered after the call returned.
pub fn dying_of_sigkill<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    l: &TraceLayout,
    task: u64,
) -> Result<bool> {
    if !sigkill_pending(k, l, task)? {
        return Ok(false);
    }
    let signal = l.tasks.task.signal.read(k, task, "task_struct.signal")?;
    let code = k.read_u32(
        signal + l.signal_group_exit_code,
        "signal_struct.group_exit_code",
    )?;
    Ok(killed_by(i64::from(code)) == SIGKILL)
}

/// The siginfo of the first `signo` still queued for `task`: its own
/// pending queue, then its thread group's. `None` if neither holds one; an
/// error if a queue is unreadable or longer than [`QUEUE_MAX`] (a cycle).
pub fn queued_siginfo<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    l: &TraceLayout,
    task: u64,
    signo: i32,
) -> Result<Option<SignalDetails>> {
    let signal = l.tasks.task.signal.read(k, task, "task_struct.signal")?;
    for pending in [task + l.task_pending, signal + l.signal_shared_pending] {
        let head = pending + l.sigpending_list;
        let mut next = k.read_u64(head, "sigpending.list")?;
        let mut walked = 0;
        while next != head {
            walked += 1;
            if walked > QUEUE_MAX {
                return Err(IntrospectError::Corrupt(format!(
                    "signal queue at {head:#x} longer than {QUEUE_MAX} entries (a cycle?)"
                )));
            }
            let queued = next.wrapping_sub(l.sigqueue_list);
            let info = queued + l.sigqueue_info;
            if k.read_u32(info + l.siginfo.signo, "sigqueue.info.si_signo")? as i32 == signo {
                return read_siginfo(k, &l.siginfo, info).map(Some);
            }
            next = k.read_u64(next, "sigqueue.list.next")?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumping_signals_are_the_kernels_set() {
        let core: Vec<i32> = (1..=64).filter(|&s| dumps_core(s)).collect();
        assert_eq!(core, [3, 4, 5, 6, 7, 8, 11, 24, 25, 31]);
        assert_eq!(fatal_kind(11), EventMask::SIGNAL_CORE);
        assert_eq!(fatal_kind(15), EventMask::SIGNAL_TERM);
    }

    #[test]
    fn exit_codes_name_the_killing_signal() {
        assert_eq!(killed_by(3 << 8), 0, "exit(3)");
        assert_eq!(killed_by(15), 15, "SIGTERM");
        assert_eq!(killed_by(11 | 0x80), 11, "SIGSEGV, core dumped");
    }
}
