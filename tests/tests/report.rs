//! UTRACE_REPORT served from the hypervisor on a real guest thread: the
//! request reaches report_quiesce(0) through the return-to-user path, after
//! a system call the thread sleeps in has run to its end (no signal, no
//! interruption, no restart), and at the next interrupt for a thread
//! running in user mode. Plus the control errors utrace defines.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvtrace_tests::*;
use utrace::context::ThreadContext;
use utrace::engine::Engine;
use utrace::hv::{EngineSpec, Tracer, TracerError};
use utrace::{EngineOps, EventMask, ResumeAction, UtraceError};

/// One callback as seen: when, and `callback:details`.
type Log = Arc<Mutex<Vec<(Instant, String)>>>;

/// Logs every callback and tells the test its thread id at exec.
struct Recorder {
    log: Log,
    exec: Mutex<Option<Sender<i32>>>,
}

impl Recorder {
    fn new(log: Log, exec: Sender<i32>) -> Arc<Self> {
        Arc::new(Self {
            log,
            exec: Mutex::new(Some(exec)),
        })
    }
    fn push(&self, what: String) {
        self.log.lock().unwrap().push((Instant::now(), what));
    }
}

impl EngineOps for Recorder {
    fn report_quiesce(
        &self,
        _: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        event: EventMask,
    ) -> ResumeAction {
        self.push(format!("quiesce:{}", event.0));
        ResumeAction::Resume
    }
    fn report_syscall_entry(
        &self,
        _: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        nr: u64,
        _: &[u64; 6],
    ) -> ResumeAction {
        self.push(format!("entry:{nr}"));
        ResumeAction::Resume
    }
    fn report_syscall_exit(
        &self,
        _: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        nr: u64,
        ret: i64,
    ) -> ResumeAction {
        self.push(format!("exit:{nr}:{ret}"));
        ResumeAction::Resume
    }
    fn report_exec(
        &self,
        _: ResumeAction,
        e: &Engine,
        _thread: &ThreadContext,
        _: &str,
    ) -> ResumeAction {
        self.push("exec".into());
        if let Some(tx) = self.exec.lock().unwrap().take() {
            let _ = tx.send(e.tid());
        }
        ResumeAction::Resume
    }
    fn report_exit(
        &self,
        _: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        code: i64,
        _: &mut i64,
    ) -> ResumeAction {
        self.push(format!("exit_code:{code}"));
        ResumeAction::Resume
    }
}

/// An engine that only counts: no QUIESCE in its mask.
struct Quiet;
impl EngineOps for Quiet {}

fn spec(ops: Arc<dyn EngineOps>, events: u32) -> EngineSpec {
    EngineSpec {
        ops,
        events: EventMask(events),
        follow: false,
        data: None,
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn lines(log: &Log) -> Vec<(Instant, String)> {
    log.lock().unwrap().clone()
}

fn text(log: &[(Instant, String)]) -> String {
    log.iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn report_while_sleeping_in_a_syscall_does_not_interrupt_it() {
    report_while_sleeping(InProcessGuest::restore_default());
}

#[test]
fn report_reaches_a_thread_running_in_user_mode() {
    report_while_spinning(InProcessGuest::restore_default());
}

/// Both on Debian's 6.1 cloud kernel (KASLR on, one CPU: its `lock`
/// prefixes are patched to `ds`). Its first boot takes about half an hour
/// emulated on PVM KVM; the hardware-KVM lane of scripts/test.sh runs this.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_report_while_sleeping_and_while_spinning() {
    report_while_sleeping(InProcessGuest::restore("debian-6.1"));
    report_while_spinning(InProcessGuest::restore("debian-6.1"));
}

/// Both on Debian's 6.12 cloud kernel, whose return-to-user loop is
/// inlined into the system-call exit and the interrupt exit and also kept
/// out of line: a sleeper returns through the first, a spinner through the
/// second.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_report_while_sleeping_and_while_spinning() {
    report_while_sleeping(InProcessGuest::restore("debian-6.12"));
    report_while_spinning(InProcessGuest::restore("debian-6.12"));
}

/// Waits for the guest command, checks it exited with 0 printing
/// `expect`, removes the tracer and ends the VM; the callback log and its
/// text.
fn finish(
    mut g: InProcessGuest,
    tracer: Tracer,
    log: &Log,
    expect: &str,
) -> (Vec<(Instant, String)>, String) {
    let code = g.wait_exit();
    let out = g.stdout();
    tracer.remove(g.session.vm()).unwrap();
    g.session.shutdown();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(expect), "{out}");
    let log = lines(log);
    let all = text(&log);
    (log, all)
}

fn report_while_sleeping(mut g: InProcessGuest) {
    let tracer = Tracer::install(g.session.vm(), g.info.clone()).unwrap();
    let nanosleep = tracer.syscalls().number("nanosleep").unwrap();
    let restart = tracer.syscalls().number("restart_syscall").unwrap();
    let log: Log = Arc::default();
    let (tx, rx) = channel();
    let q = EventMask::QUIESCE.0;
    let sys = EventMask::SYSCALL_ENTRY.0 | EventMask::SYSCALL_EXIT.0;
    let events = q | sys | EventMask::EXEC.0 | EventMask::EXIT.0;
    let cmd = argv(&["hv-sleeper", "3"]);
    tracer
        .trace_next_exec_with(
            g.session.vm(),
            cmd.clone(),
            vec![
                spec(Recorder::new(log.clone(), tx), events),
                spec(Arc::new(Quiet), sys),
            ],
        )
        .unwrap();
    g.session.start_exec(&cmd).unwrap();
    let tid = rx.recv_timeout(Duration::from_secs(120)).expect("exec");
    // Wait until the thread sleeps in nanosleep, then ask for a report.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines(&log)
        .iter()
        .any(|(_, l)| *l == format!("entry:{nanosleep}"))
    {
        assert!(
            Instant::now() < deadline,
            "no nanosleep: {}",
            text(&lines(&log))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let engines = tracer.engines(tid);
    assert_eq!(engines.len(), 2);
    let requested = Instant::now();
    tracer
        .control(g.session.vm(), tid, &engines[0], ResumeAction::Report)
        .unwrap();
    // What utrace refuses: REPORT without QUIESCE in the mask (EINVAL);
    // STOP of a thread asleep in a call completes later (EINPROGRESS: it
    // would stop when the call returns; RESUME withdraws it here);
    // SINGLESTEP without QUIESCE (EINVAL).
    let err = |r: Result<(), TracerError>| match r {
        Err(TracerError::Utrace(_, e)) => e,
        other => panic!("expected a utrace error, got {other:?}"),
    };
    assert_eq!(
        err(tracer.control(g.session.vm(), tid, &engines[1], ResumeAction::Report)),
        UtraceError::Invalid
    );
    assert_eq!(
        err(tracer.control(g.session.vm(), tid, &engines[0], ResumeAction::Stop)),
        UtraceError::InProgress
    );
    tracer
        .control(g.session.vm(), tid, &engines[0], ResumeAction::Resume)
        .unwrap();
    assert_eq!(
        err(tracer.control(g.session.vm(), tid, &engines[1], ResumeAction::SingleStep)),
        UtraceError::Invalid,
        "SINGLESTEP needs QUIESCE in the mask"
    );
    let (log, all) = finish(g, tracer, &log, "woke");
    // The sleep ran to its end: one nanosleep, returning 0 (a signal-style
    // interruption shows -EINTR or -ERESTART_RESTARTBLOCK and a restart).
    let sleeps: Vec<&String> = log
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.starts_with(&format!("exit:{nanosleep}:")))
        .collect();
    assert_eq!(sleeps, [&format!("exit:{nanosleep}:0")], "{all}");
    assert!(
        !log.iter().any(|(_, l)| *l == format!("entry:{restart}")),
        "{all}"
    );
    // One plain report_quiesce (event 0), right after that exit.
    let plain: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, (_, l))| l == "quiesce:0")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(plain.len(), 1, "{all}");
    let at = plain[0];
    assert_eq!(log[at - 1].1, format!("exit:{nanosleep}:0"), "{all}");
    // It waited for the sleep: 3 s from ~0.3 s in, so well over a second.
    let waited = log[at].0 - requested;
    assert!(waited > Duration::from_secs(1), "reported after {waited:?}");
    // report_quiesce before each event's own callback, with the event bit.
    for (i, (_, l)) in log.iter().enumerate() {
        let bit = if l.starts_with("entry:") {
            EventMask::SYSCALL_ENTRY.0
        } else if l.starts_with("exit:") {
            EventMask::SYSCALL_EXIT.0
        } else {
            continue;
        };
        assert_eq!(log[i - 1].1, format!("quiesce:{bit}"), "line {i}: {all}");
    }
}

fn report_while_spinning(mut g: InProcessGuest) {
    let tracer = Tracer::install(g.session.vm(), g.info.clone()).unwrap();
    let log: Log = Arc::default();
    let (tx, rx) = channel();
    // No system-call events: the thread is not steered; only REPORT brings
    // it to the tracer.
    let events = EventMask::QUIESCE.0 | EventMask::EXEC.0 | EventMask::EXIT.0;
    let cmd = argv(&["hv-spin", "4"]);
    tracer
        .trace_next_exec(
            g.session.vm(),
            cmd.clone(),
            spec(Recorder::new(log.clone(), tx), events),
        )
        .unwrap();
    g.session.start_exec(&cmd).unwrap();
    let tid = rx.recv_timeout(Duration::from_secs(120)).expect("exec");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !g.stdout().contains("spinning") {
        assert!(Instant::now() < deadline, "hv-spin did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let engine = tracer.engines(tid).remove(0);
    let requested = Instant::now();
    tracer
        .control(g.session.vm(), tid, &engine, ResumeAction::Report)
        .unwrap();
    let (log, all) = finish(g, tracer, &log, "spin done");
    // Exactly one plain report, while it still spun (before its exit), and
    // soon: at the next interrupt, not at the end of the spin.
    let plain: Vec<&(Instant, String)> = log.iter().filter(|(_, l)| l == "quiesce:0").collect();
    assert_eq!(plain.len(), 1, "{all}");
    let exit = log
        .iter()
        .find(|(_, l)| l.starts_with("exit_code:"))
        .expect("exit report");
    assert_eq!(exit.1, "exit_code:0", "{all}");
    assert!(plain[0].0 < exit.0, "{all}");
    let after = plain[0].0 - requested;
    assert!(
        after < Duration::from_millis(1500),
        "report_quiesce came {after:?} after the request"
    );
}
