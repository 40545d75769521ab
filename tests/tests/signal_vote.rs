//! report_signal's vote on real signals, and JCTL, served from the
//! hypervisor on a live guest, checked by what the guest's own programs do:
//! the busybox shell's traps (its signal handlers) print which signal they
//! got, a signal the engine ignores leaves the shell alive, a stop instead
//! of a handler stops the shell until a SIGCONT from its own child, and the
//! guest's own strace, a ptracer, sees the siginfo the engine wrote.

use std::sync::{Arc, Mutex};

use hvtrace_tests::*;
use utrace::context::{SignalAction, SignalDetails, ThreadContext};
use utrace::engine::Engine;
use utrace::event::{CLD_CONTINUED, CLD_STOPPED};
use utrace::hv::{EngineSpec, Tracer};
use utrace::{EngineOps, EventMask, ResumeAction};

const SIGHUP: i32 = 1;
const SIGUSR1: i32 = 10;
const SIGSEGV: i32 = 11;
const SIGUSR2: i32 = 12;
const SIGSTOP: i32 = 19;
/// `SI_TKILL`, the si_code the replacement carries.
const SI_TKILL: i32 = -6;

/// Votes on each signal per its number and records every report.
struct Voter {
    log: Arc<Mutex<Vec<String>>>,
}

impl EngineOps for Voter {
    fn report_signal(
        &self,
        _: ResumeAction,
        _: &Engine,
        thread: &ThreadContext,
        signo: i32,
    ) -> ResumeAction {
        let kind = thread
            .signal_disposition
            .map_or("?".to_string(), |k| k.to_string());
        self.log
            .lock()
            .unwrap()
            .push(format!("signal:{signo}:{kind}"));
        let action = match signo {
            SIGUSR1 => SignalAction::Replace(SignalDetails {
                signo: SIGUSR2,
                code: SI_TKILL,
                pid: 4242,
                uid: 0,
                status: 0,
                handler: 0,
            }),
            SIGSEGV => SignalAction::Ignore,
            SIGHUP => SignalAction::Stop,
            _ => SignalAction::Deliver,
        };
        thread
            .set_signal_action(action)
            .expect("a signal just taken can be voted on");
        ResumeAction::Resume
    }

    fn report_jctl(
        &self,
        _: ResumeAction,
        _: &Engine,
        _: &ThreadContext,
        kind: i32,
        signo: i32,
    ) -> ResumeAction {
        self.log
            .lock()
            .unwrap()
            .push(format!("jctl:{kind}:{signo}"));
        ResumeAction::Resume
    }
}

/// Runs `argv` in a restored guest with a [`Voter`] on it (and, with
/// `follow`, its children); its output, exit status and the vote log.
fn run_voted(kernel: &str, argv: &[&str], follow: bool) -> (String, i32, Vec<String>) {
    let mut g = InProcessGuest::restore(kernel);
    let tracer = Tracer::install(g.session.vm(), g.info.clone()).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let events = EventMask(
        EventMask::SIGNAL.0
            | EventMask::SIGNAL_IGN.0
            | EventMask::SIGNAL_STOP.0
            | EventMask::SIGNAL_TERM.0
            | EventMask::SIGNAL_CORE.0
            | EventMask::JCTL.0,
    );
    tracer
        .trace_next_exec(
            g.session.vm(),
            argv.clone(),
            EngineSpec {
                ops: Arc::new(Voter { log: log.clone() }),
                events,
                follow,
                data: None,
            },
        )
        .unwrap();
    g.session.start_exec(&argv).unwrap();
    let code = g.wait_exit();
    tracer.remove(g.session.vm()).unwrap();
    let out = g.stdout();
    g.session.shutdown();
    let log = log.lock().unwrap().clone();
    (out, code, log)
}

#[test]
fn an_engine_changes_ignores_and_stops_signals_and_sees_job_control() {
    changes_ignores_and_stops("minimal");
}

#[test]
fn the_guests_own_strace_sees_the_siginfo_the_engine_wrote() {
    strace_sees_the_new_siginfo("minimal");
}

/// Both on Debian's kernels (KASLR on), whose `get_signal` keeps the
/// signal in another register.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_signal_votes() {
    changes_ignores_and_stops("debian-6.1");
    strace_sees_the_new_siginfo("debian-6.1");
}

/// The same on Debian's 6.12.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_signal_votes() {
    changes_ignores_and_stops("debian-6.12");
    strace_sees_the_new_siginfo("debian-6.12");
}

fn changes_ignores_and_stops(kernel: &str) {
    require_kvm();
    let script = "trap 'echo got USR1' USR1; trap 'echo got USR2' USR2; trap 'echo got HUP' HUP; \
                  kill -USR1 $$; echo after-usr1; \
                  kill -SEGV $$; echo after-segv; \
                  ( sleep 1; echo cont-sent; kill -CONT $$ ) & \
                  kill -HUP $$; echo after-hup; wait; echo end";
    let (out, code, log) = run_voted(kernel, &["/bin/sh", "-c", script], false);
    let text = format!("output:\n{out}\nreports:\n{}", log.join("\n"));
    // The shell's USR1 trap never ran: its USR2 trap did, in its place.
    assert!(out.contains("got USR2"), "{text}");
    assert!(!out.contains("got USR1"), "{text}");
    // SIGSEGV (default: dump core) was dropped: the shell lived on.
    assert!(out.contains("after-segv"), "{text}");
    // SIGHUP became a job-control stop: no HUP trap; the shell went on
    // only after its child's SIGCONT.
    assert!(!out.contains("got HUP"), "{text}");
    let at = |l: &str| out.lines().position(|x| x == l);
    assert!(
        at("cont-sent").is_some() && at("cont-sent") < at("after-hup"),
        "the shell went on before its child sent SIGCONT: {text}"
    );
    assert!(out.contains("end"), "{text}");
    assert_eq!(code, 0, "{text}");
    // What the engine was told: each signal with the disposition the
    // kernel would have taken it with.
    let has = |l: &str| log.iter().any(|x| x == l);
    assert!(has(&format!("signal:{SIGUSR1}:SIGNAL")), "{text}");
    assert!(has(&format!("signal:{SIGSEGV}:SIGNAL_CORE")), "{text}");
    assert!(has(&format!("signal:{SIGHUP}:SIGNAL")), "{text}");
    // The replacement is not reported again as a signal of its own.
    assert!(!has(&format!("signal:{SIGUSR2}:SIGNAL")), "{text}");
    // The stop and the continue, in that order.
    let stopped = log
        .iter()
        .position(|l| *l == format!("jctl:{CLD_STOPPED}:{SIGSTOP}"))
        .unwrap_or_else(|| panic!("no job-control stop reported; {text}"));
    let continued = log
        .iter()
        .position(|l| *l == format!("jctl:{CLD_CONTINUED}:0"))
        .unwrap_or_else(|| panic!("no continue reported; {text}"));
    assert!(stopped < continued, "{text}");
}

fn strace_sees_the_new_siginfo(kernel: &str) {
    require_kvm();
    // strace is the guest's ptracer of the shell; the engine (on both)
    // changes the shell's SIGUSR1 before ptrace's signal-delivery stop.
    let script = "trap 'echo got USR2' USR2; kill -USR1 \\$\\$; echo done";
    let traced =
        format!("strace -f -e trace=kill -e signal=USR1,USR2 /bin/sh -c \"{script}\" 2>&1");
    let (out, code, log) = run_voted(kernel, &["/bin/sh", "-c", &traced], true);
    let text = format!("output:\n{out}\nreports:\n{}", log.join("\n"));
    assert_eq!(code, 0, "{text}");
    assert!(out.contains("got USR2") && out.contains("done"), "{text}");
    let line = out
        .lines()
        .find(|l| l.contains("--- SIGUSR2"))
        .unwrap_or_else(|| panic!("strace showed no SIGUSR2; {text}"));
    assert!(
        line.contains("si_code=SI_TKILL") && line.contains("si_pid=4242"),
        "strace's view of the replaced signal: {line}\n{text}"
    );
    assert!(!out.contains("--- SIGUSR1"), "{text}");
}
