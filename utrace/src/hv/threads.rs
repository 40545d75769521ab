//! The tracer's table of traced threads: each thread's utrace state (its
//! engines, shared with the callbacks that run outside this table's
//! lock), the facts the trap handlers keep between two traps of one
//! thread, and the pending "trace the next exec of this argv".

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::engine::{AttachFlags, Engine, EngineData, EngineOps};
use crate::event::{EventMask, Tid};
use crate::hv::doorbell::Wake;
use crate::hv::memory::AccessJob;
use crate::thread::ThreadUtrace;

/// The system-call events (a thread is steered onto the system-call sites
/// for them).
pub const SYSCALL_EVENTS: EventMask =
    EventMask(EventMask::SYSCALL_ENTRY.0 | EventMask::SYSCALL_EXIT.0);

/// How a new engine is made: its callbacks, the events it wants and
/// whether it follows the thread's children (an engine of `hvtrace trace
/// -f` attaching itself to every new child, as a utrace engine would from
/// its report_clone).
#[derive(Clone)]
pub struct EngineSpec {
    /// Callbacks.
    pub ops: Arc<dyn EngineOps>,
    /// Event mask.
    pub events: EventMask,
    /// Attach the same spec to new children and threads.
    pub follow: bool,
    /// Engine data.
    pub data: Option<EngineData>,
}

impl EngineSpec {
    /// The spec a follower hands on to a new child: `engine`'s own
    /// callbacks, events and data.
    pub(crate) fn following(engine: &Engine) -> Self {
        Self {
            ops: engine.ops.clone(),
            events: engine.events(),
            follow: true,
            data: engine.data().cloned(),
        }
    }

    /// Whether `self.data` is `data` (by identity).
    pub(crate) fn has_data(&self, data: &EngineData) -> bool {
        self.data.as_ref().is_some_and(|d| Arc::ptr_eq(d, data))
    }
}

/// One traced thread.
pub(crate) struct Traced {
    /// Its engines; callbacks run on a clone of this handle, with the
    /// table unlocked.
    pub utrace: Arc<ThreadUtrace>,
    /// The call it is in, from its entry report (`rt_sigreturn` sets the
    /// saved `orig_ax` to -1 before its exit is seen).
    pub syscall: Option<u64>,
    /// Whether each engine follows children, by engine id.
    pub follow: HashMap<u64, bool>,
    /// Its `task_struct`.
    pub task: u64,
    /// A REPORT is due: report_quiesce(0) at its next return to user mode.
    pub report_pending: bool,
    /// The `ksignal` pointer and stack pointer of its latest `get_signal`
    /// entry: where a signal it dequeued and dies of is (see
    /// [`crate::hv::signals`]).
    pub get_signal: Option<(u64, u64)>,
    /// An INTERRUPT is due: report_signal with no signal (utrace's
    /// UTRACE_SIGNAL_REPORT) at its next `get_signal` or return to user
    /// mode.
    pub interrupt_pending: bool,
}

impl Traced {
    /// Thread `tid` (task struct at `task`) with engines made from `specs`.
    /// Specs utrace refuses are skipped; the error of the first is
    /// returned when none could be attached.
    pub fn new(tid: Tid, task: u64, specs: &[EngineSpec]) -> Result<Self, crate::UtraceError> {
        let mut t = Self {
            utrace: Arc::new(ThreadUtrace::new(tid, false)),
            syscall: None,
            follow: HashMap::new(),
            task,
            report_pending: false,
            get_signal: None,
            interrupt_pending: false,
        };
        let mut first_error = None;
        for spec in specs {
            if let Err(e) = t.attach(spec) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) if t.utrace.has_no_engines() => Err(e),
            _ => Ok(t),
        }
    }

    /// Attaches a new engine made from `spec` and sets its events.
    pub fn attach(&mut self, spec: &EngineSpec) -> Result<Arc<Engine>, crate::UtraceError> {
        let flags = AttachFlags {
            create: true,
            ..Default::default()
        };
        let e = self
            .utrace
            .attach(flags, spec.ops.clone(), spec.data.clone())?;
        self.utrace.set_events(&e, spec.events)?;
        self.follow.insert(e.id(), spec.follow);
        Ok(e)
    }

    /// Specs for a new child: one per engine that follows children.
    pub fn followers(&self) -> Vec<EngineSpec> {
        self.utrace
            .engines()
            .iter()
            .filter(|e| self.follow.get(&e.id()).copied().unwrap_or(false))
            .map(|e| EngineSpec::following(e))
            .collect()
    }

    /// Whether some engine gets report_quiesce.
    pub fn wants_quiesce(&self) -> bool {
        self.utrace
            .engines()
            .iter()
            .any(|e| e.events().contains(EventMask::QUIESCE))
    }

    /// Whether some engine wants system-call events.
    pub fn wants_syscalls(&self) -> bool {
        self.utrace
            .engines()
            .iter()
            .any(|e| e.events().intersects(SYSCALL_EVENTS))
    }
}

/// A pending "trace the next exec of this argv".
pub(crate) struct Armed {
    /// The argv the exec must have.
    pub argv: Vec<String>,
    /// The engines to attach, in this order.
    pub specs: Vec<EngineSpec>,
}

/// Everything behind the tracer's lock.
#[derive(Default)]
pub(crate) struct Threads {
    /// Traced threads by id.
    pub traced: HashMap<Tid, Traced>,
    /// The exec awaited, if any.
    pub armed: Option<Armed>,
    /// Thread groups whose killing signal was reported (by the first of
    /// their threads to exit), until the group leader is reaped.
    pub fatal_reported: HashSet<Tid>,
    /// Threads parked because an engine holds them stopped, with their
    /// `task_struct` ([`crate::hv::park`]); kept apart from `traced`, since
    /// a parked thread whose engines all detached is still asleep.
    pub parked: HashMap<Tid, u64>,
    /// Wake-ups for the doorbell to send ([`crate::hv::doorbell`]).
    pub wakes: VecDeque<Wake>,
    /// Memory accesses clients queued for parked threads
    /// ([`crate::hv::memory`]).
    pub accesses: HashMap<Tid, VecDeque<AccessJob>>,
    /// The access each thread is running now.
    pub access_running: HashMap<Tid, AccessJob>,
    /// How many times each thread left a park (for `finish_examine`).
    pub unparked: HashMap<Tid, u64>,
    /// Threads whose saved user flags carry a TF the tracer set
    /// ([`crate::hv::events::step`]); kept apart from `traced`, since a
    /// thread whose engines all detached may still carry one.
    pub trap_flag: HashMap<Tid, crate::hv::events::step::OwnedTrapFlag>,
}

impl Threads {
    /// The engines of traced thread `tid`, to report to outside the lock.
    pub fn utrace(&self, tid: Tid) -> Option<Arc<ThreadUtrace>> {
        self.traced.get(&tid).map(|t| t.utrace.clone())
    }

    /// Whether `tid` is traced.
    pub fn is_traced(&self, tid: Tid) -> bool {
        self.traced.contains_key(&tid)
    }
}
