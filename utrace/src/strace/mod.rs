//! The engine behind `hvtrace trace` and `hvtrace attach`: prints each
//! traced thread's system calls, exits and signals as strace does (or one
//! JSON object per event).
//!
//! Every output is first a typed event record ([`record::Record`]);
//! `--json` prints the records of completed events as JSON, text mode
//! renders every record as strace's text ([`text::TextRenderer`]): a
//! call's entry at once, its end at its exit, `<unfinished ...>`/`<...
//! resumed>` when another line comes in between, `[pid N]` while more than
//! one thread is alive.

pub mod classes;
pub mod record;
pub mod select;
pub mod summary;
pub mod tamper;
pub mod text;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::action::ResumeAction;
use crate::context::{SignalDetails, ThreadContext};
use crate::engine::{Engine, EngineOps};
use crate::event::{EventMask, Tid};
use crate::syscalls::format::{errno_name, errno_of, signal_name, Pending};
use crate::syscalls::{Formatter, SyscallTable};
use record::{CallEnd, Record};
use serde_json::Value;

/// What to print and how.
#[derive(Debug, Clone, Default)]
pub struct StraceOptions {
    /// `-s`: longest string shown.
    pub string_limit: Option<usize>,
    /// `-e trace=`: only these calls (None: all).
    pub only: Option<select::CallFilter>,
    /// `-e signal=`: only these signals' `--- SIG... ---` lines (None: all).
    pub signals: Option<select::SignalSet>,
    /// `-e status=` (`-z`, `-Z`): only calls that ended so (None: all).
    /// A call's line is then printed whole when it ends, as strace does.
    pub status: Option<select::StatusSet>,
    /// `--json`: one JSON object per line.
    pub json: bool,
    /// `-T`: time spent in each call.
    pub timing: bool,
    /// `-qq`: no `+++ exited with N +++` lines in text.
    pub quiet_exits: bool,
    /// `-y`: file descriptors shown with their files' paths, read from
    /// the guest kernel's file table of the thread.
    pub decode_fds: bool,
    /// With `json`: also a record at each call's entry
    /// (`{"pid":N,"syscall":"read","phase":"entry","line":"read(3, "}`),
    /// and `"rest"` in the exit record, for a client that renders text
    /// itself (`hvtrace attach`).
    pub entries: bool,
    /// `-e inject=` / `-e fault=`: calls to tamper with (a later
    /// expression naming a call overrides an earlier one, as in strace).
    pub tamper: Vec<tamper::Tamper>,
    /// `-t`/`-tt`/`-ttt`/`-r` in text mode, with the local time's offset
    /// from UTC in seconds.
    pub stamp: Option<(text::Stamp, i64)>,
    /// `-f`: the children and threads are traced, so a clone's record
    /// names its new thread ([`CallEnd::child`]).
    pub follow: bool,
}

/// The events this engine asks for.
pub const STRACE_EVENTS: EventMask = EventMask(
    EventMask::SYSCALL_ENTRY.0
        | EventMask::SYSCALL_EXIT.0
        | EventMask::EXEC.0
        | EventMask::CLONE.0
        | EventMask::EXIT.0
        | EventMask::REAP.0
        | EventMask::SIGNAL.0
        | EventMask::SIGNAL_IGN.0
        | EventMask::SIGNAL_STOP.0
        | EventMask::SIGNAL_TERM.0
        | EventMask::SIGNAL_CORE.0
        | EventMask::JCTL.0,
);

/// A call between its entry and its exit.
struct InFlight {
    call: Pending,
    started: Instant,
    /// The start of its line, as printed at entry.
    prefix: String,
    /// Whether it was tampered with (`-e inject=`).
    injected: bool,
}

#[derive(Default)]
struct State {
    /// Each thread's call in progress.
    pending: HashMap<Tid, InFlight>,
    /// Invocations of each tampered call, per thread (strace counts them
    /// per thread and call).
    invocations: HashMap<(Tid, String), u64>,
}

/// Where records go: JSON lines, or strace's text.
struct Output {
    out: Box<dyn Write + Send>,
    text: Option<text::TextRenderer>,
}

/// Opens the output of one thread's records (`-ff -o PREFIX`: the file
/// `PREFIX.TID`).
pub type ThreadOutputs = Box<dyn Fn(Tid) -> std::io::Result<Box<dyn Write + Send>> + Send + Sync>;

/// All records to one output, or each thread's to its own.
enum Outputs {
    One(Output),
    PerThread {
        open: ThreadOutputs,
        /// The outputs of live threads (closed at their thread's end).
        files: HashMap<Tid, Output>,
        /// Threads whose output could not be opened (said once each).
        failed: std::collections::HashSet<Tid>,
    },
}

/// One record as the engine emits it, with what a consumer outside the
/// engine needs besides it (see [`Strace::with_observer`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The record.
    pub record: Record,
    /// The process (thread group) of the record's thread.
    pub tgid: Tid,
    /// A completed call's arguments, one string each as its line shows
    /// them (None for other records).
    pub args: Option<Vec<String>>,
}

impl Emitted {
    /// Its JSON form: the record's, with `tgid` and (for a call) `args`.
    pub fn to_json(&self) -> Value {
        let mut v = self.record.to_json();
        v["tgid"] = self.tgid.into();
        if let Some(args) = &self.args {
            v["args"] = args.as_slice().into();
        }
        v
    }

    /// The emitted record whose JSON form is `v` (None if malformed; a
    /// missing `tgid`, from an engine that predates it, is taken as the
    /// thread id).
    pub fn from_json(v: &Value) -> Option<Emitted> {
        let record = Record::from_json(v)?;
        let tgid = match v.get("tgid") {
            None => record.pid(),
            Some(t) => Tid::try_from(t.as_i64()?).ok().filter(|t| *t > 0)?,
        };
        let args = match v.get("args") {
            None | Some(Value::Null) => None,
            Some(a) => Some(
                a.as_array()?
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()?,
            ),
        };
        Some(Emitted { record, tgid, args })
    }
}

/// Receives every record an engine emits (e.g. to publish it elsewhere),
/// in the order of the engine's output.
pub trait RecordObserver: Send + Sync {
    /// Called once per record on the traced thread's vCPU thread, with the
    /// engine's output lock held: it must not block (push into a bounded
    /// queue and return).
    fn observe(&self, emitted: Emitted);
}

/// The strace-like engine.
pub struct Strace {
    opts: StraceOptions,
    fmt: Formatter,
    syscalls: Arc<SyscallTable>,
    out: Mutex<Outputs>,
    state: Mutex<State>,
    observers: Vec<Arc<dyn RecordObserver>>,
}

/// The calls that create a thread or process and return its id.
const CLONES: [&str; 4] = ["clone", "clone3", "fork", "vfork"];

/// The text renderer `opts` ask for (None: JSON records); for one
/// thread's own output (`-ff`) when not `shared`: no thread ids there.
fn renderer(opts: &StraceOptions, shared: bool) -> Option<text::TextRenderer> {
    (!opts.json).then(|| {
        text::TextRenderer::new(opts.stamp)
            .with_quiet_exits(opts.quiet_exits)
            .with_one_thread(!shared)
    })
}

impl Strace {
    /// An engine printing to `out` with the guest kernel's call names.
    pub fn new(
        opts: StraceOptions,
        syscalls: Arc<SyscallTable>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        let fmt = Formatter {
            string_limit: opts.string_limit.unwrap_or(32),
            decode_fds: opts.decode_fds,
        };
        let text = renderer(&opts, true);
        Self {
            opts,
            fmt,
            syscalls,
            out: Mutex::new(Outputs::One(Output { out, text })),
            state: Mutex::new(State::default()),
            observers: Vec::new(),
        }
    }

    /// The same engine writing each thread's records to an output of its
    /// own, opened by `open` at the thread's first record and closed at
    /// its end (`strace -ff -o PREFIX`); no `[pid N]` prefixes then.
    pub fn with_thread_outputs(mut self, open: ThreadOutputs) -> Self {
        self.out = Mutex::new(Outputs::PerThread {
            open,
            files: HashMap::new(),
            failed: Default::default(),
        });
        self
    }

    /// The same engine, also handing every record to `observer` (after
    /// the observers given before).
    pub fn with_observer(mut self, observer: Arc<dyn RecordObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    fn name(&self, nr: u64) -> String {
        self.syscalls
            .name(nr)
            .map_or_else(|| format!("syscall_{nr:#x}"), str::to_string)
    }

    fn shown(&self, name: &str) -> bool {
        self.opts.only.as_ref().is_none_or(|s| s.contains(name))
    }

    /// Whether a call that ended with `ret` (None: never returned) is
    /// shown under `-e status=`.
    fn status_shown(&self, ret: Option<i64>) -> bool {
        let status = match ret {
            None => select::CallStatus::Unfinished,
            Some(r) if errno_of(r).is_some() => select::CallStatus::Failed,
            Some(_) => select::CallStatus::Successful,
        };
        self.opts.status.as_ref().is_none_or(|s| s.contains(status))
    }

    /// Writes one record of `thread` (a call's with its `args`): as JSON,
    /// or rendered as text; then hands it to the observer.
    fn emit(&self, thread: &ThreadContext, record: Record, args: Option<Vec<String>>) {
        let emitted = Emitted {
            record,
            tgid: thread.tgid,
            args,
        };
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *o {
            Outputs::One(output) => write_record(output, &emitted),
            Outputs::PerThread {
                open,
                files,
                failed,
            } => {
                let pid = emitted.record.pid();
                if !files.contains_key(&pid) && !failed.contains(&pid) {
                    match open(pid) {
                        Ok(out) => {
                            let text = renderer(&self.opts, false);
                            files.insert(pid, Output { out, text });
                        }
                        Err(e) => {
                            log::error!("strace: cannot open the output of thread {pid}: {e}");
                            failed.insert(pid);
                        }
                    }
                }
                if let Some(output) = files.get_mut(&pid) {
                    write_record(output, &emitted);
                }
                if emitted.record.ends_thread() {
                    files.remove(&pid);
                    failed.remove(&pid);
                }
            }
        }
        for observer in &self.observers {
            observer.observe(emitted.clone());
        }
    }

    /// What follows the entry record's `prefix` in a call's whole `line`,
    /// for a renderer that printed that entry (None without entry records).
    fn rest_after(&self, line: &str, prefix: &str) -> Option<String> {
        if !self.entries() {
            return None;
        }
        line.strip_prefix(prefix).map(str::to_string)
    }

    /// Whether entry records are produced (not under `-e status=`, which
    /// decides at a call's end whether its line is shown at all).
    fn entries(&self) -> bool {
        self.opts.status.is_none() && (!self.opts.json || self.opts.entries)
    }

    /// At a call's entry: counts the invocation if `-e inject=` names the
    /// call and, if this one is chosen, aborts it with the chosen result.
    /// Whether it did.
    fn tamper(&self, tid: Tid, name: &str, thread: &ThreadContext) -> bool {
        let Some(t) = self
            .opts
            .tamper
            .iter()
            .rev()
            .find(|t| t.calls.contains(name))
        else {
            return false;
        };
        let n = {
            let mut st = self.state();
            let n = st.invocations.entry((tid, name.to_string())).or_insert(0);
            *n += 1;
            *n
        };
        if !t.when.matches(n) {
            return false;
        }
        if let Some(sig) = t.signal {
            if let Err(e) = thread.send_signal(sig) {
                log::warn!("strace: cannot send signal {sig} to thread {tid}: {e}");
            }
        }
        let Some(outcome) = t.outcome else {
            return false;
        };
        match thread.abort_syscall(outcome.ret()) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("strace: cannot tamper with {name} of thread {tid}: {e}");
                false
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes one record to `output`: rendered as text, or as JSON.
fn write_record(output: &mut Output, emitted: &Emitted) {
    let Output { out, text } = output;
    let r = match text {
        Some(renderer) => write!(out, "{}", renderer.render(&emitted.record)),
        None => writeln!(out, "{}", emitted.to_json()),
    };
    // A closed output (the reader went away) must not disturb the guest.
    let _ = r.and_then(|_| out.flush());
}

impl EngineOps for Strace {
    fn report_syscall_entry(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        nr: u64,
        args: &[u64; 6],
    ) -> ResumeAction {
        let name = self.name(nr);
        let described = self.syscalls.described(nr);
        let p = self.fmt.enter_described(&name, *args, thread, described);
        let prefix = p.entry_prefix();
        let tid = engine.tid();
        let injected = self.tamper(tid, &name, thread);
        if self.entries() && self.shown(&name) {
            let entry = Record::Entry {
                pid: tid,
                syscall: name,
                line: prefix.clone(),
            };
            self.emit(thread, entry, None);
        }
        let in_flight = InFlight {
            call: p,
            started: Instant::now(),
            prefix,
            injected,
        };
        self.state().pending.insert(tid, in_flight);
        ResumeAction::Resume
    }

    fn report_syscall_exit(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        nr: u64,
        ret: i64,
    ) -> ResumeAction {
        let tid = engine.tid();
        let pending = self.state().pending.remove(&tid);
        let name = self.name(nr);
        let (errno, error) = match errno_of(ret).map(|e| (e, errno_name(e))) {
            Some((e, Some((n, _)))) => (Some(e), Some(n.to_string())),
            Some((e, None)) => (Some(e), None),
            None => (None, None),
        };
        let f = match pending {
            Some(f) if f.call.name == name => f,
            // A new child's or thread's first report is its return from
            // the clone in its parent; strace shows nothing for it.
            _ if ret == 0 && CLONES.contains(&name.as_str()) => return ResumeAction::Resume,
            // Attached in the middle of a call: its entry was not seen.
            _ => {
                if self.shown(&name) && self.status_shown(Some(ret)) {
                    let line = format!("<... {name} resumed>) = {}", self.fmt.ret(&name, ret));
                    let end = CallEnd {
                        pid: tid,
                        syscall: name,
                        nr: Some(nr),
                        line,
                        ret: Some(ret),
                        errno,
                        error,
                        seconds: None,
                        rest: None,
                        injected: false,
                        child: None,
                    };
                    self.emit(thread, Record::Call(end), None);
                }
                return ResumeAction::Resume;
            }
        };
        let InFlight {
            call: p,
            started,
            prefix,
            injected,
        } = f;
        if !self.shown(&p.name) || !self.status_shown(Some(ret)) {
            return ResumeAction::Resume;
        }
        let args = self.fmt.finish_args(&p, ret, thread);
        let mut line = self.fmt.exit_line(&p, &args, ret, thread);
        let spent = started.elapsed();
        if injected {
            line.push_str(" (INJECTED)");
        }
        if self.opts.timing {
            line.push_str(&format!(" <{:.6}>", spent.as_secs_f64()));
        }
        let rest = self.rest_after(&line, &prefix);
        // A parent's clone returning its new thread, which -f traces.
        let child = (self.opts.follow && CLONES.contains(&p.name.as_str()))
            .then(|| Tid::try_from(ret).ok().filter(|&t| t > 0))
            .flatten();
        let end = CallEnd {
            pid: tid,
            syscall: p.name.clone(),
            nr: Some(nr),
            line,
            ret: Some(ret),
            errno,
            error,
            seconds: Some(spent.as_secs_f64()),
            rest,
            injected,
            child,
        };
        self.emit(thread, Record::Call(end), Some(args));
        ResumeAction::Resume
    }

    fn report_exec(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        _filename: &str,
    ) -> ResumeAction {
        // The execve's strings may have been unreadable at its entry (see
        // Formatter::enter); the kernel's own copies are known now.
        let Some(exec) = &thread.exec else {
            return ResumeAction::Resume;
        };
        let mut st = self.state();
        if let Some(InFlight { call: p, .. }) = st.pending.get_mut(&engine.tid()) {
            if p.name == "execve" && p.shown.len() >= 2 {
                if p.shown[0].is_none() {
                    p.shown[0] = Some(self.fmt.quoted(&exec.filename));
                }
                if p.shown[1].is_none() && !exec.argv.is_empty() {
                    p.shown[1] = Some(self.fmt.string_array(&exec.argv));
                }
            }
        }
        ResumeAction::Resume
    }

    fn report_signal(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        signo: i32,
    ) -> ResumeAction {
        if signo == 0 {
            // Another engine's INTERRUPT (UTRACE_SIGNAL_REPORT): no signal,
            // and strace shows nothing for it.
            return ResumeAction::Resume;
        }
        if self
            .opts
            .signals
            .as_ref()
            .is_some_and(|s| !s.contains(signo))
        {
            return ResumeAction::Resume;
        }
        let d = thread.signal;
        let name = signal_name(signo);
        let line = match d {
            Some(d) => format!("--- {name} {} ---", siginfo(&d)),
            None => format!("--- {name} ---"),
        };
        let record = Record::Signal {
            pid: engine.tid(),
            signal: name,
            line,
            si_code: d.map(|d| d.code),
            si_pid: d.map(|d| d.pid),
            handler: d.map(|d| d.handler),
        };
        self.emit(thread, record, None);
        ResumeAction::Resume
    }

    fn report_jctl(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        kind: i32,
        signo: i32,
    ) -> ResumeAction {
        // strace prints a group stop (PTRACE_SEIZE's PTRACE_EVENT_STOP);
        // the continue it shows is the SIGCONT delivered to a ptraced
        // thread, which an unptraced one never dequeues.
        if kind == crate::event::CLD_STOPPED {
            let name = signal_name(signo);
            self.emit(
                thread,
                Record::Signal {
                    pid: engine.tid(),
                    line: format!("--- stopped by {name} ---"),
                    signal: name,
                    si_code: None,
                    si_pid: None,
                    handler: None,
                },
                None,
            );
        }
        ResumeAction::Resume
    }

    fn report_exit(
        &self,
        _action: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        orig_code: i64,
        _code: &mut i64,
    ) -> ResumeAction {
        let tid = engine.tid();
        let pending = self.state().pending.remove(&tid);
        if let Some(InFlight {
            call: p, prefix, ..
        }) = pending
        {
            if self.shown(&p.name) && self.status_shown(None) {
                let args = self.fmt.unreturned_args(&p);
                let line = self.fmt.unreturned_line(&p.name, &args);
                let rest = self.rest_after(&line, &prefix);
                let end = CallEnd {
                    pid: tid,
                    syscall: p.name.clone(),
                    nr: None,
                    line,
                    ret: None,
                    errno: None,
                    error: None,
                    seconds: None,
                    rest,
                    injected: false,
                    child: None,
                };
                self.emit(thread, Record::Call(end), Some(args));
            }
        }
        let status = orig_code as i32;
        let end = if status & 0x7f == 0 {
            Record::Exited {
                pid: tid,
                code: (status >> 8) & 0xff,
            }
        } else {
            Record::Killed {
                pid: tid,
                signal: signal_name(status & 0x7f),
                core: status & 0x80 != 0,
            }
        };
        self.emit(thread, end, None);
        ResumeAction::Resume
    }

    fn report_reap(&self, engine: &Engine, _thread: &ThreadContext) {
        let tid = engine.tid();
        let mut st = self.state();
        st.pending.remove(&tid);
        st.invocations.retain(|(t, _), _| *t != tid);
    }
}

/// `{si_signo=SIGUSR1, si_code=SI_USER, si_pid=39, si_uid=0}` as strace
/// prints a siginfo (the common fields; SIGCHLD adds its status).
fn siginfo(d: &SignalDetails) -> String {
    const SIGCHLD: i32 = 17;
    let code = match (d.signo, d.code) {
        (_, 0) => "SI_USER".to_string(),
        (_, 0x80) => "SI_KERNEL".to_string(),
        (_, -1) => "SI_QUEUE".to_string(),
        (_, -6) => "SI_TKILL".to_string(),
        (SIGCHLD, 1) => "CLD_EXITED".to_string(),
        (SIGCHLD, 2) => "CLD_KILLED".to_string(),
        (SIGCHLD, 3) => "CLD_DUMPED".to_string(),
        (SIGCHLD, 4) => "CLD_TRAPPED".to_string(),
        (SIGCHLD, 5) => "CLD_STOPPED".to_string(),
        (SIGCHLD, 6) => "CLD_CONTINUED".to_string(),
        (_, c) => c.to_string(),
    };
    let mut s = format!(
        "{{si_signo={}, si_code={code}, si_pid={}, si_uid={}",
        signal_name(d.signo),
        d.pid,
        d.uid
    );
    if d.signo == SIGCHLD {
        s.push_str(&format!(", si_status={}", d.status));
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emitted_record_survives_its_json_form() {
        let e = Emitted {
            record: Record::Call(CallEnd {
                pid: 6,
                syscall: "read".into(),
                nr: Some(0),
                line: "read(3, \"x\", 9) = 1".into(),
                ret: Some(1),
                errno: None,
                error: None,
                seconds: Some(0.5),
                rest: None,
                injected: false,
                child: None,
            }),
            tgid: 5,
            args: Some(vec!["3".into(), "\"x\"".into(), "9".into()]),
        };
        let v = e.to_json();
        assert_eq!(
            (v["tgid"].as_i64(), v["args"][1].as_str()),
            (Some(5), Some("\"x\""))
        );
        assert_eq!(Emitted::from_json(&v), Some(e));
        // Older engines sent no tgid: the thread is its own process then.
        let old = serde_json::json!({"pid": 7, "event": "exit", "code": 0});
        assert_eq!(Emitted::from_json(&old).map(|e| e.tgid), Some(7));
        let bad = serde_json::json!({"pid": 7, "event": "exit", "code": 0, "tgid": "x"});
        assert_eq!(Emitted::from_json(&bad), None);
    }
}
