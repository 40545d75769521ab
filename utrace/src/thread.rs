//! One traced thread: its engines, and the rules by which their callbacks
//! run and their votes combine. Pure logic: the hypervisor side (traps,
//! pausing, editing guest task state) calls [`ThreadUtrace::report`] when
//! the guest thread reaches an event and applies the action it returns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::action::ResumeAction;
use crate::context::ThreadContext;
use crate::engine::{AttachFlags, Engine, EngineData, EngineOps, UtraceError};
use crate::event::{Event, EventMask, Tid};

/// Where a thread is in its life, as utrace sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Running or stopped.
    Alive,
    /// report_death has begun.
    Dying,
    /// Reaped: no engines remain.
    Reaped,
}

/// The utrace state of one guest thread.
///
/// Internally locked, and never across a callback: [`ThreadUtrace::report`]
/// takes a snapshot of the engines, calls each with no lock held and
/// applies its vote under a short lock, so a callback may call
/// [`ThreadUtrace::control`], attach or set events on this very thread.
pub struct ThreadUtrace {
    tid: Tid,
    kernel_thread: bool,
    state: Mutex<State>,
}

struct State {
    engines: Vec<Arc<Engine>>,
    life: Lifecycle,
    /// Engines whose last vote was STOP: the thread stays stopped while any
    /// remain.
    stop_votes: HashSet<u64>,
    /// Engines whose last vote was SINGLESTEP or BLOCKSTEP, and which one:
    /// the thread steps while any remain (see [`ThreadUtrace::stepping`]).
    step_votes: HashMap<u64, ResumeAction>,
}

impl State {
    fn detach(&mut self, engine: &Engine) {
        *engine.detached.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop_votes.remove(&engine.id());
        self.step_votes.remove(&engine.id());
        self.engines.retain(|e| e.id() != engine.id());
    }

    fn check_live(&self, engine: &Engine) -> Result<(), UtraceError> {
        if self.life == Lifecycle::Reaped || engine.is_detached() {
            return Err(UtraceError::NoSuchThread);
        }
        if !self.engines.iter().any(|e| e.id() == engine.id()) {
            return Err(UtraceError::NoSuchThread);
        }
        Ok(())
    }

    /// Records one engine's vote and returns the new prevailing action.
    fn apply_vote(
        &mut self,
        engine: &Engine,
        vote: ResumeAction,
        prevailing: ResumeAction,
    ) -> ResumeAction {
        match vote {
            ResumeAction::Detach => self.detach(engine),
            ResumeAction::Stop => {
                self.stop_votes.insert(engine.id());
                self.step_votes.remove(&engine.id());
            }
            ResumeAction::SingleStep | ResumeAction::BlockStep => {
                self.stop_votes.remove(&engine.id());
                self.step_votes.insert(engine.id(), vote);
            }
            _ => {
                self.stop_votes.remove(&engine.id());
                self.step_votes.remove(&engine.id());
            }
        }
        prevailing.prevail(vote.for_thread())
    }
}

impl ThreadUtrace {
    /// A thread with no engines; kernel threads refuse attachment.
    pub fn new(tid: Tid, kernel_thread: bool) -> Self {
        Self {
            tid,
            kernel_thread,
            state: Mutex::new(State {
                engines: Vec::new(),
                life: Lifecycle::Alive,
                stop_votes: HashSet::new(),
                step_votes: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The thread id.
    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// Engines attached, in attach order.
    pub fn engines(&self) -> Vec<Arc<Engine>> {
        self.state().engines.clone()
    }

    /// Whether no engine is attached.
    pub fn has_no_engines(&self) -> bool {
        self.state().engines.is_empty()
    }

    /// Whether an engine holds the thread stopped.
    pub fn is_stopped(&self) -> bool {
        !self.state().stop_votes.is_empty()
    }

    /// How the thread steps when it runs: SINGLESTEP if an engine's last
    /// vote (or control) was SINGLESTEP, else BLOCKSTEP if one's was
    /// BLOCKSTEP (the smallest prevails), else None.
    ///
    /// A step vote lasts until the engine votes anything else at a report
    /// it is called for (or detaches): an engine that steps is asked again
    /// at each step's report, and one report it is not called for (a
    /// system-call report of another engine) does not cancel its stepping.
    pub fn stepping(&self) -> Option<ResumeAction> {
        self.state().step_votes.values().copied().min()
    }

    /// Where the thread is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        self.state().life
    }

    /// `utrace_attach_task`: look up an engine matching `flags`, or create
    /// one (`flags.create`). A new engine starts with no events.
    pub fn attach(
        &self,
        flags: AttachFlags,
        ops: Arc<dyn EngineOps>,
        data: Option<EngineData>,
    ) -> Result<Arc<Engine>, UtraceError> {
        let mut st = self.state();
        if st.life == Lifecycle::Reaped {
            return Err(UtraceError::NoSuchThread);
        }
        let found = st
            .engines
            .iter()
            .find(|e| e.matches(flags, &ops, data.as_ref()))
            .cloned();
        if !flags.create {
            return found.ok_or(UtraceError::NoEntry);
        }
        if flags.exclusive && found.is_some() {
            return Err(UtraceError::Exists);
        }
        if self.kernel_thread {
            return Err(UtraceError::Permission);
        }
        if st.life == Lifecycle::Dying {
            return Err(UtraceError::Already);
        }
        let engine = Arc::new(Engine::new(self.tid, ops, data));
        st.engines.push(engine.clone());
        Ok(engine)
    }

    /// `utrace_set_events`: takes effect at the next event.
    pub fn set_events(&self, engine: &Engine, mask: EventMask) -> Result<(), UtraceError> {
        let st = self.state();
        st.check_live(engine)?;
        if st.life == Lifecycle::Dying {
            return Err(UtraceError::Already);
        }
        *engine.events.lock().unwrap_or_else(|e| e.into_inner()) = mask;
        Ok(())
    }

    /// `utrace_control`: asynchronous requests. STOP returns Ok only if
    /// the thread is already stopped (else EINPROGRESS: it stops at its next
    /// report); REPORT, INTERRUPT, SINGLESTEP and BLOCKSTEP need QUIESCE in
    /// the mask (a step is reported through report_quiesce); SINGLESTEP and
    /// BLOCKSTEP withdraw this engine's STOP and make it step; RESUME
    /// withdraws its STOP and its stepping; DETACH detaches.
    pub fn control(&self, engine: &Engine, action: ResumeAction) -> Result<(), UtraceError> {
        let mut st = self.state();
        st.check_live(engine)?;
        if st.life == Lifecycle::Dying && action != ResumeAction::Detach {
            return Err(UtraceError::NoSuchThread);
        }
        match action {
            ResumeAction::Detach => {
                st.detach(engine);
                Ok(())
            }
            ResumeAction::Stop => {
                let already = !st.stop_votes.is_empty();
                st.stop_votes.insert(engine.id());
                if already {
                    Ok(())
                } else {
                    Err(UtraceError::InProgress)
                }
            }
            ResumeAction::Report
            | ResumeAction::Interrupt
            | ResumeAction::SingleStep
            | ResumeAction::BlockStep
                if !engine.events().contains(EventMask::QUIESCE) =>
            {
                Err(UtraceError::Invalid)
            }
            ResumeAction::SingleStep | ResumeAction::BlockStep => {
                st.stop_votes.remove(&engine.id());
                st.step_votes.insert(engine.id(), action);
                Ok(())
            }
            ResumeAction::Resume => {
                st.stop_votes.remove(&engine.id());
                st.step_votes.remove(&engine.id());
                Ok(())
            }
            _ => {
                st.stop_votes.remove(&engine.id());
                Ok(())
            }
        }
    }

    /// Applies `vote` of `engine` under the lock; the new prevailing action.
    fn vote(&self, engine: &Engine, vote: ResumeAction, prevailing: ResumeAction) -> ResumeAction {
        self.state().apply_vote(engine, vote, prevailing)
    }

    /// One engine's part of [`ThreadUtrace::report`]: report_quiesce and
    /// the event's callback as its mask asks, each vote applied. Returns
    /// the action prevailing after it.
    fn report_to(
        &self,
        engine: &Arc<Engine>,
        event: &Event,
        thread: &ThreadContext,
        mut prevailing: ResumeAction,
        exit_code: &mut i64,
    ) -> ResumeAction {
        let bit = event.mask();
        let ops = &engine.ops;
        let mask = engine.events();
        let _running = engine.enter_callback();
        let wants_event = bit != EventMask::NONE && mask.contains(bit);
        let wants_quiesce = mask.contains(EventMask::QUIESCE);
        if matches!(event, Event::Reap) {
            if wants_event {
                ops.report_reap(engine, thread);
            }
            return prevailing;
        }
        // Each vote is applied as it is cast (utrace's finish_callback),
        // so the event callback already sees the engine's quiesce vote.
        if wants_quiesce && (wants_event || bit == EventMask::NONE) {
            let vote = ops.report_quiesce(prevailing, engine, thread, bit);
            prevailing = self.vote(engine, vote, prevailing);
            if vote == ResumeAction::Detach {
                return prevailing;
            }
        }
        if !wants_event {
            return prevailing;
        }
        let p = prevailing;
        let vote = match event {
            Event::Quiesce | Event::Step | Event::Reap => return prevailing,
            Event::Death { group_dead, signal } => {
                ops.report_death(engine, thread, *group_dead, *signal);
                return prevailing;
            }
            Event::Clone { child, flags } => ops.report_clone(p, engine, thread, *flags, *child),
            Event::Exec { filename } => ops.report_exec(p, engine, thread, filename),
            Event::SyscallEntry { nr, args } => {
                ops.report_syscall_entry(p, engine, thread, *nr, args)
            }
            Event::SyscallExit { nr, ret } => ops.report_syscall_exit(p, engine, thread, *nr, *ret),
            Event::Exit { code } => ops.report_exit(p, engine, thread, *code, exit_code),
            Event::Signal { signo, .. } => ops.report_signal(p, engine, thread, *signo),
            Event::Jctl { kind, signo } => ops.report_jctl(p, engine, thread, *kind, *signo),
        };
        self.vote(engine, vote, prevailing)
    }

    /// SIGKILL: always breaks STOP (and ends stepping: the thread never
    /// runs another user instruction).
    pub fn kill(&self) {
        let mut st = self.state();
        st.stop_votes.clear();
        st.step_votes.clear();
    }

    /// Reports `event` about `thread` to the engines that asked for it and
    /// returns the action that prevails for the thread.
    ///
    /// Engines run in attach order (system-call entry: reverse order), each
    /// from a snapshot of the list taken now, so an engine attached during
    /// the report misses this event. For each engine: report_quiesce first
    /// if it wants QUIESCE (with the event's bit; 0 for a plain quiescence),
    /// then the event's callback if it wants the event. Every callback is
    /// passed the action prevailing so far and returns its vote; the
    /// smallest prevails (DETACH counts as RESUME and detaches that engine
    /// after its callback). Death is reported without votes, then reap, and
    /// after reap no engine remains. No lock is held while a callback runs.
    pub fn report(&self, event: &Event, thread: &ThreadContext) -> ResumeAction {
        let mut order = {
            let mut st = self.state();
            if st.life == Lifecycle::Reaped {
                return ResumeAction::Resume;
            }
            if let Event::Death { .. } = event {
                st.life = Lifecycle::Dying;
            }
            st.engines.clone()
        };
        if matches!(event, Event::SyscallEntry { .. }) {
            order.reverse();
        }
        let mut prevailing = ResumeAction::Resume;
        // report_exit's code, as each engine leaves it for the next.
        let mut exit_code = match event {
            Event::Exit { code } => *code,
            _ => 0,
        };
        for engine in order {
            if engine.is_detached() {
                continue;
            }
            // A panicking callback is contained: its engine is detached
            // with a message, the thread and the other engines go on (a
            // bug in one engine must not kill a vCPU thread).
            let reported = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.report_to(&engine, event, thread, prevailing, &mut exit_code)
            }));
            prevailing = match reported {
                Ok(p) => p,
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    log::error!(
                        "engine {} of thread {} panicked at {event:?}: {why}; detaching it",
                        engine.id(),
                        engine.tid()
                    );
                    self.vote(&engine, ResumeAction::Detach, prevailing)
                }
            };
        }
        if let Event::Exit { code } = event {
            if exit_code != *code {
                thread.set_exit_code(exit_code);
            }
        }
        let mut st = self.state();
        if matches!(event, Event::Reap) {
            for e in std::mem::take(&mut st.engines) {
                *e.detached.lock().unwrap_or_else(|x| x.into_inner()) = true;
            }
            st.stop_votes.clear();
            st.step_votes.clear();
            st.life = Lifecycle::Reaped;
        }
        if !st.stop_votes.is_empty() {
            ResumeAction::Stop
        } else {
            let stepping = st.step_votes.values().copied().min();
            stepping.map_or(prevailing, |s| prevailing.prevail(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ResumeAction::*;

    /// An engine that logs every callback (`name:callback:prevailing`) and
    /// votes a fixed action per callback kind.
    struct Rec {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        quiesce: ResumeAction,
        event: ResumeAction,
    }

    impl Rec {
        fn push(&self, what: &str, prevailing: ResumeAction) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{what}:{}", self.name, prevailing.name()));
        }
    }

    impl EngineOps for Rec {
        fn report_quiesce(
            &self,
            a: ResumeAction,
            _: &Engine,
            _: &ThreadContext,
            ev: EventMask,
        ) -> ResumeAction {
            self.push(&format!("quiesce({ev})"), a);
            self.quiesce
        }
        fn report_syscall_entry(
            &self,
            a: ResumeAction,
            _: &Engine,
            _: &ThreadContext,
            nr: u64,
            _: &[u64; 6],
        ) -> ResumeAction {
            self.push(&format!("entry({nr})"), a);
            self.event
        }
        fn report_exec(
            &self,
            a: ResumeAction,
            _: &Engine,
            _: &ThreadContext,
            f: &str,
        ) -> ResumeAction {
            self.push(&format!("exec({f})"), a);
            self.event
        }
        fn report_death(&self, _: &Engine, _: &ThreadContext, _: bool, _: i32) {
            self.push("death", Resume);
        }
        fn report_reap(&self, _: &Engine, _: &ThreadContext) {
            self.push("reap", Resume);
        }
    }

    type Log = Arc<Mutex<Vec<String>>>;
    /// (name, events, quiesce vote, event vote) per engine.
    type Spec = (&'static str, EventMask, ResumeAction, ResumeAction);

    fn setup(specs: &[Spec]) -> (ThreadUtrace, Vec<Arc<Engine>>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = ThreadUtrace::new(42, false);
        let create = AttachFlags {
            create: true,
            ..Default::default()
        };
        let engines = specs
            .iter()
            .map(|&(name, mask, quiesce, event)| {
                let ops = Arc::new(Rec {
                    name,
                    log: log.clone(),
                    quiesce,
                    event,
                });
                let e = t.attach(create, ops, None).unwrap();
                t.set_events(&e, mask).unwrap();
                e
            })
            .collect();
        (t, engines, log)
    }

    fn ctx() -> ThreadContext {
        ThreadContext::without_memory(42, 42)
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    const Q: EventMask = EventMask::QUIESCE;
    const EXEC: EventMask = EventMask::EXEC;

    #[test]
    fn quiesce_comes_first_with_the_event_bit_and_each_callback_sees_the_prevailing_action() {
        let (t, _, log) = setup(&[
            ("a", Q | EXEC, Resume, Report),
            ("b", EXEC, Resume, Interrupt),
            ("c", Q, Stop, Stop), // wants QUIESCE only: not called for EXEC
        ]);
        let action = t.report(
            &Event::Exec {
                filename: "/bin/true".into(),
            },
            &ctx(),
        );
        assert_eq!(
            take(&log),
            [
                "a:quiesce(EXEC):UTRACE_RESUME",
                "a:exec(/bin/true):UTRACE_RESUME",
                "b:exec(/bin/true):UTRACE_REPORT",
            ]
        );
        assert_eq!(action, Report, "REPORT < INTERRUPT: the smallest prevails");
        // A plain REPORT quiescence: report_quiesce with event 0, for every
        // engine that wants QUIESCE.
        let action = t.report(&Event::Quiesce, &ctx());
        assert_eq!(
            take(&log),
            ["a:quiesce(0):UTRACE_RESUME", "c:quiesce(0):UTRACE_RESUME"]
        );
        assert_eq!(action, Stop);
        assert!(t.is_stopped(), "STOP persists");
    }

    #[test]
    fn syscall_entry_runs_engines_in_reverse_order() {
        let e = EventMask::SYSCALL_ENTRY;
        let (t, _, log) = setup(&[("a", e, Resume, Resume), ("b", e, Resume, Resume)]);
        t.report(
            &Event::SyscallEntry {
                nr: 0,
                args: [0; 6],
            },
            &ctx(),
        );
        assert_eq!(
            take(&log),
            ["b:entry(0):UTRACE_RESUME", "a:entry(0):UTRACE_RESUME"]
        );
    }

    /// Panics in report_exec; STOP otherwise.
    struct Panicky;

    impl EngineOps for Panicky {
        fn report_exec(
            &self,
            _action: ResumeAction,
            _engine: &Engine,
            _thread: &ThreadContext,
            _filename: &str,
        ) -> ResumeAction {
            panic!("engine bug");
        }
    }

    #[test]
    fn a_panicking_engine_is_detached_and_the_others_still_get_the_event() {
        let (t, engines, log) = setup(&[("a", EXEC, Resume, Resume)]);
        let create = AttachFlags {
            create: true,
            ..Default::default()
        };
        // Between a and b in attach order.
        let bad = t.attach(create, Arc::new(Panicky), None).unwrap();
        t.set_events(&bad, EXEC).unwrap();
        let rec_b = Rec {
            name: "b",
            log: log.clone(),
            quiesce: Resume,
            event: Report,
        };
        let b = t.attach(create, Arc::new(rec_b), None).unwrap();
        t.set_events(&b, EXEC).unwrap();
        let first = engines[0].clone();
        let ev = Event::Exec {
            filename: "/x".into(),
        };
        let action = t.report(&ev, &ctx());
        assert_eq!(
            take(&log),
            ["a:exec(/x):UTRACE_RESUME", "b:exec(/x):UTRACE_RESUME"],
            "the engine after the panicking one still ran"
        );
        assert_eq!(
            action, Report,
            "b's vote prevails; the panicking engine's none"
        );
        assert!(bad.is_detached(), "the panicking engine is detached");
        assert!(!first.is_detached() && !b.is_detached());
        // The next event reaches the others only.
        t.report(&ev, &ctx());
        assert_eq!(take(&log).len(), 2);
    }

    #[test]
    fn detach_implies_resume_and_leaves_the_other_engine_working() {
        let (t, engines, log) = setup(&[("a", EXEC, Resume, Detach), ("b", EXEC, Resume, Resume)]);
        let ev = Event::Exec {
            filename: "x".into(),
        };
        assert_eq!(t.report(&ev, &ctx()), Resume);
        assert!(engines[0].is_detached());
        assert_eq!(t.engines().len(), 1);
        take(&log);
        t.report(&ev, &ctx());
        assert_eq!(take(&log), ["b:exec(x):UTRACE_RESUME"]);
        assert_eq!(
            t.set_events(&engines[0], EXEC),
            Err(UtraceError::NoSuchThread)
        );
    }

    #[test]
    fn stop_holds_until_every_engine_lets_go_or_sigkill() {
        let (t, engines, _) =
            setup(&[("a", Q | EXEC, Resume, Stop), ("b", Q | EXEC, Resume, Stop)]);
        let ev = Event::Exec {
            filename: "x".into(),
        };
        assert_eq!(t.report(&ev, &ctx()), Stop);
        t.control(&engines[0], Resume).unwrap();
        assert!(t.is_stopped(), "b still wants it stopped");
        t.control(&engines[1], Resume).unwrap();
        assert!(!t.is_stopped());
        assert_eq!(t.control(&engines[0], Stop), Err(UtraceError::InProgress));
        assert_eq!(t.control(&engines[1], Stop), Ok(()), "already stopped");
        t.kill();
        assert!(!t.is_stopped(), "SIGKILL always breaks STOP");
    }

    #[test]
    fn attach_flags_and_errors() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let ops: Arc<dyn EngineOps> = Arc::new(Rec {
            name: "a",
            log,
            quiesce: Resume,
            event: Resume,
        });
        let data: EngineData = Arc::new(7u32);
        let t = ThreadUtrace::new(1, false);
        let lookup = AttachFlags {
            match_ops: true,
            ..Default::default()
        };
        assert_eq!(
            t.attach(lookup, ops.clone(), None).unwrap_err(),
            UtraceError::NoEntry
        );
        let create = AttachFlags {
            create: true,
            exclusive: true,
            match_ops: true,
            match_data: false,
        };
        let e = t.attach(create, ops.clone(), Some(data.clone())).unwrap();
        assert_eq!(
            t.attach(create, ops.clone(), None).unwrap_err(),
            UtraceError::Exists
        );
        let found = t.attach(lookup, ops.clone(), None).unwrap();
        assert_eq!(found.id(), e.id());
        let by_data = AttachFlags {
            match_data: true,
            ..Default::default()
        };
        assert_eq!(
            t.attach(by_data, ops.clone(), Some(data)).unwrap().id(),
            e.id()
        );
        assert_eq!(
            t.attach(by_data, ops.clone(), Some(Arc::new(7u32)))
                .unwrap_err(),
            UtraceError::NoEntry,
            "data matches by identity"
        );
        assert_eq!(
            t.control(&e, Report),
            Err(UtraceError::Invalid),
            "REPORT needs QUIESCE"
        );
        let kt = ThreadUtrace::new(2, true);
        let any = AttachFlags {
            create: true,
            ..Default::default()
        };
        assert_eq!(
            kt.attach(any, ops, None).unwrap_err(),
            UtraceError::Permission
        );
        assert_eq!(UtraceError::Exists.errno(), 17);
    }

    #[test]
    fn death_before_reap_and_nothing_after() {
        let d = EventMask::DEATH | EventMask::REAP;
        let (t, engines, log) = setup(&[("a", d, Resume, Resume)]);
        t.report(
            &Event::Death {
                group_dead: true,
                signal: 17,
            },
            &ctx(),
        );
        assert_eq!(t.set_events(&engines[0], d), Err(UtraceError::Already));
        t.report(&Event::Reap, &ctx());
        assert_eq!(
            take(&log),
            ["a:death:UTRACE_RESUME", "a:reap:UTRACE_RESUME"]
        );
        assert!(t.engines().is_empty());
        assert_eq!(t.lifecycle(), Lifecycle::Reaped);
        assert_eq!(
            t.control(&engines[0], Resume),
            Err(UtraceError::NoSuchThread)
        );
    }

    /// An engine whose report_quiesce blocks until told to go on.
    struct Slow {
        entered: std::sync::mpsc::Sender<()>,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl EngineOps for Slow {
        fn report_quiesce(
            &self,
            _: ResumeAction,
            engine: &Engine,
            _: &ThreadContext,
            _: EventMask,
        ) -> ResumeAction {
            assert_eq!(engine.barrier(), Err(UtraceError::Deadlock), "own callback");
            self.entered.send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
            Resume
        }
    }

    #[test]
    fn barrier_waits_for_a_running_callback_and_refuses_its_own() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let t = Arc::new(ThreadUtrace::new(7, false));
        let create = AttachFlags {
            create: true,
            ..Default::default()
        };
        let ops = Arc::new(Slow {
            entered: entered_tx,
            go: Mutex::new(go_rx),
        });
        let e = t.attach(create, ops, None).unwrap();
        t.set_events(&e, EventMask::QUIESCE).unwrap();
        assert_eq!(e.barrier(), Ok(()), "no callback running");
        let reporter = {
            let t = t.clone();
            std::thread::spawn(move || {
                t.report(&Event::Quiesce, &ThreadContext::without_memory(7, 7));
            })
        };
        entered.recv().unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (e, done) = (e.clone(), done.clone());
            std::thread::spawn(move || {
                e.barrier().unwrap();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "barrier returned mid-callback"
        );
        go.send(()).unwrap();
        waiter.join().unwrap();
        reporter.join().unwrap();
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
