//! Engines: a tracer's attachment to one thread, with its callbacks.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::action::ResumeAction;
use crate::context::ThreadContext;
use crate::event::{EventMask, Tid};

/// The callbacks of an engine. Every method has a default that votes
/// RESUME (or does nothing), so an engine implements only what it asks
/// for. Each callback but death/reap receives the action prevailing so far
/// among the engines already called for this event, and returns its vote.
/// Every callback receives the thread it reports about ([`ThreadContext`]);
/// no tracer lock is held while it runs, so it may call back into the
/// tracer (control, attach to another thread).
pub trait EngineOps: Send + Sync {
    /// Before each event's own callback (with that event's bit), and for a
    /// plain REPORT/STOP quiescence (with 0).
    fn report_quiesce(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _event: EventMask,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// The thread created `child` with `clone_flags`.
    fn report_clone(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _clone_flags: u64,
        _child: Tid,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// The thread exec'd `filename`.
    fn report_exec(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _filename: &str,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// System call entry.
    fn report_syscall_entry(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _nr: u64,
        _args: &[u64; 6],
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// System call exit.
    fn report_syscall_exit(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _nr: u64,
        _ret: i64,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// The thread is exiting; `code` may be changed.
    fn report_exit(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _orig_code: i64,
        _code: &mut i64,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// A signal is about to be delivered (`signo` 0: an INTERRUPT's
    /// report, utrace's UTRACE_SIGNAL_REPORT). Where the kernel has just
    /// taken a real signal, `thread.signal` has its siginfo and handler,
    /// and [`ThreadContext::set_signal_action`] decides what the kernel
    /// does with it.
    fn report_signal(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _signo: i32,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// A job-control stop (`kind` [`crate::event::CLD_STOPPED`], by stop
    /// signal `signo`) or continue ([`crate::event::CLD_CONTINUED`]).
    fn report_jctl(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        _thread: &ThreadContext,
        _kind: i32,
        _signo: i32,
    ) -> ResumeAction {
        ResumeAction::Resume
    }
    /// The thread is dead (no vote: it cannot resume).
    fn report_death(
        &self,
        _engine: &Engine,
        _thread: &ThreadContext,
        _group_dead: bool,
        _signal: i32,
    ) {
    }
    /// The thread was reaped; the engine is gone after this.
    fn report_reap(&self, _engine: &Engine, _thread: &ThreadContext) {}
}

/// Attach flags (`UTRACE_ATTACH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttachFlags {
    /// Create a new engine if no existing one matches.
    pub create: bool,
    /// With `create`: fail with EEXIST if a matching engine exists.
    pub exclusive: bool,
    /// Match existing engines by their ops (the same `Arc`).
    pub match_ops: bool,
    /// Match existing engines by their data (the same `Arc`).
    pub match_data: bool,
}

/// Errors, with the errno utrace gives for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UtraceError {
    /// No matching engine (ENOENT).
    #[error("no matching engine (ENOENT)")]
    NoEntry,
    /// EXCLUSIVE and a matching engine exists (EEXIST).
    #[error("a matching engine is already attached (EEXIST)")]
    Exists,
    /// Kernel threads cannot be traced (EPERM).
    #[error("kernel threads cannot be traced (EPERM)")]
    Permission,
    /// The request completes later (EINPROGRESS).
    #[error("in progress (EINPROGRESS)")]
    InProgress,
    /// Too late: report_death has begun (EALREADY).
    #[error("the thread is already dying (EALREADY)")]
    Already,
    /// The thread is reaped or the engine detached (ESRCH).
    #[error("no such thread or engine (ESRCH)")]
    NoSuchThread,
    /// The request is invalid here (EINVAL).
    #[error("invalid request (EINVAL)")]
    Invalid,
    /// Guest memory could not be read or written (EFAULT).
    #[error("bad address (EFAULT)")]
    Fault,
    /// `barrier` from the engine's own callback (EDEADLK).
    #[error("the engine's own callback would wait for itself (EDEADLK)")]
    Deadlock,
    /// The thread ran since `prepare_examine`: what was read is stale
    /// (EAGAIN).
    #[error("the thread ran in between (EAGAIN)")]
    Again,
    /// The thread is not stopped (EBUSY): its registers and memory are
    /// examined and changed only while it is held stopped.
    #[error("the thread is not stopped (EBUSY)")]
    NotStopped,
    /// The hypervisor side does not act on this resume action yet
    /// (EOPNOTSUPP): thread stop, interrupt and stepping.
    #[error("not supported by the hypervisor side yet (EOPNOTSUPP)")]
    NotSupported,
}

impl UtraceError {
    /// The positive errno value.
    pub fn errno(self) -> i32 {
        match self {
            Self::NoEntry => 2,
            Self::Exists => 17,
            Self::Permission => 1,
            Self::InProgress => 115,
            Self::Already => 114,
            Self::NoSuchThread => 3,
            Self::Invalid => 22,
            Self::Fault => 14,
            Self::NotSupported => 95,
            Self::NotStopped => 16,
            Self::Deadlock => 35,
            Self::Again => 11,
        }
    }
}

/// Opaque engine data, compared by identity for MATCH_DATA.
pub type EngineData = Arc<dyn Any + Send + Sync>;

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// One engine attached to one thread.
pub struct Engine {
    id: u64,
    tid: Tid,
    pub(crate) ops: Arc<dyn EngineOps>,
    data: Option<EngineData>,
    pub(crate) events: Mutex<EventMask>,
    pub(crate) detached: Mutex<bool>,
    /// Callbacks of this engine running now (for [`Engine::barrier`]).
    in_callback: std::sync::atomic::AtomicU32,
}

thread_local! {
    /// The engines whose callback runs on this OS thread now.
    static IN_CALLBACK: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks a callback of an engine as running until dropped.
pub(crate) struct CallbackGuard<'a>(&'a Engine);

impl Drop for CallbackGuard<'_> {
    fn drop(&mut self) {
        IN_CALLBACK.with(|v| {
            let mut v = v.borrow_mut();
            if let Some(i) = v.iter().rposition(|id| *id == self.0.id) {
                v.remove(i);
            }
        });
        self.0.in_callback.fetch_sub(1, Ordering::Release);
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("id", &self.id)
            .field("tid", &self.tid)
            .field("events", &self.events())
            .finish()
    }
}

impl Engine {
    pub(crate) fn new(tid: Tid, ops: Arc<dyn EngineOps>, data: Option<EngineData>) -> Self {
        Self {
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            tid,
            ops,
            data,
            events: Mutex::new(EventMask::NONE),
            detached: Mutex::new(false),
            in_callback: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Marks one of its callbacks as running (until the guard drops).
    pub(crate) fn enter_callback(&self) -> CallbackGuard<'_> {
        self.in_callback.fetch_add(1, Ordering::Acquire);
        IN_CALLBACK.with(|v| v.borrow_mut().push(self.id));
        CallbackGuard(self)
    }

    /// `utrace_barrier`: returns once no callback of this engine is
    /// running (on any thread), so that after a DETACH or a `set_events`
    /// the caller knows no old callback is still in progress. EDEADLK from
    /// the engine's own callback, which would wait for itself.
    pub fn barrier(&self) -> Result<(), UtraceError> {
        if IN_CALLBACK.with(|v| v.borrow().contains(&self.id)) {
            return Err(UtraceError::Deadlock);
        }
        while self.in_callback.load(Ordering::Acquire) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        Ok(())
    }

    /// A process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The thread it is attached to.
    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// Its data, as given at attach.
    pub fn data(&self) -> Option<&EngineData> {
        self.data.as_ref()
    }

    /// Its event mask.
    pub fn events(&self) -> EventMask {
        *self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it has been detached.
    pub fn is_detached(&self) -> bool {
        *self.detached.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn matches(
        &self,
        flags: AttachFlags,
        ops: &Arc<dyn EngineOps>,
        data: Option<&EngineData>,
    ) -> bool {
        let ops_ok = !flags.match_ops || Arc::ptr_eq(&self.ops, ops);
        let data_ok = !flags.match_data
            || match (&self.data, data) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
        ops_ok && data_ok
    }
}
