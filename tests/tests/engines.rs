//! The utrace engine model served from the hypervisor, in process: two
//! engines with different event masks on one real guest thread, the order
//! of their callbacks, the prevailing action each sees, and one engine
//! detaching while the other goes on.

use std::sync::{Arc, Mutex};

use hvtrace_tests::*;
use utrace::context::ThreadContext;
use utrace::engine::Engine;
use utrace::hv::{EngineSpec, Tracer};
use utrace::{EngineOps, EventMask, ResumeAction};

/// Records `name:callback:nr:prevailing` and votes per a script.
struct Rec {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    exits: Mutex<u32>,
    /// Its vote at its Nth system-call exit report.
    votes: Vec<(u32, ResumeAction)>,
}

impl Rec {
    fn push(&self, what: String) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{what}", self.name));
    }
}

impl EngineOps for Rec {
    fn report_syscall_entry(
        &self,
        a: ResumeAction,
        e: &Engine,
        thread: &ThreadContext,
        nr: u64,
        args: &[u64; 6],
    ) -> ResumeAction {
        // The context is the reporting thread's, with the registers the
        // call was entered with.
        let regs = thread.regs().map(|r| (r.syscall_nr(), r.syscall_args()));
        if thread.tid != e.tid() || regs != Some((nr, *args)) {
            self.push(format!("BAD-CONTEXT:{}:{regs:?}", thread.tid));
        }
        self.push(format!("entry:{nr}:{}", a.name()));
        ResumeAction::Resume
    }
    fn report_syscall_exit(
        &self,
        a: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        nr: u64,
        ret: i64,
    ) -> ResumeAction {
        let mut n = self.exits.lock().unwrap();
        *n += 1;
        self.push(format!("exit:{nr}:{ret}:{}", a.name()));
        self.votes
            .iter()
            .find(|(at, _)| *at == *n)
            .map_or(ResumeAction::Resume, |(_, v)| *v)
    }
    fn report_exec(
        &self,
        a: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        filename: &str,
    ) -> ResumeAction {
        self.push(format!("exec:{filename}:{}", a.name()));
        ResumeAction::Resume
    }
    fn report_exit(
        &self,
        a: ResumeAction,
        _: &Engine,
        _thread: &ThreadContext,
        code: i64,
        _: &mut i64,
    ) -> ResumeAction {
        self.push(format!("exit_code:{code}:{}", a.name()));
        ResumeAction::Resume
    }
}

#[test]
fn two_engines_with_different_masks_on_one_guest_thread() {
    two_engines_on_one_thread(InProcessGuest::restore_default());
}

/// The same on both Debian kernels (KASLR on).
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_two_engines_with_different_masks_on_one_guest_thread() {
    two_engines_on_one_thread(InProcessGuest::restore("debian-6.1"));
    two_engines_on_one_thread(InProcessGuest::restore("debian-6.12"));
}

fn two_engines_on_one_thread(mut g: InProcessGuest) {
    let session = &mut g.session;
    let tracer = Tracer::install(session.vm(), g.info.clone()).unwrap();
    let getpid = tracer
        .syscalls()
        .number("getpid")
        .expect("the guest has getpid");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sys = EventMask(EventMask::SYSCALL_ENTRY.0 | EventMask::SYSCALL_EXIT.0);
    // A: system calls only; votes REPORT at its 3rd exit, DETACH at its 6th.
    let a = Arc::new(Rec {
        name: "A",
        log: log.clone(),
        exits: Mutex::new(0),
        votes: vec![(3, ResumeAction::Report), (6, ResumeAction::Detach)],
    });
    // B: system calls, exec and exit; always RESUME.
    let b = Arc::new(Rec {
        name: "B",
        log: log.clone(),
        exits: Mutex::new(0),
        votes: vec![],
    });
    let spec = |ops: Arc<Rec>, events| EngineSpec {
        ops,
        events,
        follow: false,
        data: None,
    };
    let argv: Vec<String> = ["hv-getpid-loop", "20"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tracer
        .trace_next_exec_with(
            session.vm(),
            argv.clone(),
            vec![
                spec(a, sys),
                spec(b, EventMask(sys.0 | EventMask::EXEC.0 | EventMask::EXIT.0)),
            ],
        )
        .unwrap();
    session.start_exec(&argv).unwrap();
    let code = g.wait_exit();
    tracer.remove(g.session.vm()).unwrap();
    let out = g.stdout();
    g.session.shutdown();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("getpid x 20 done"), "{out}");
    let pid: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("the program prints its pid");
    let log = log.lock().unwrap().clone();
    let text = log.join("\n");

    // Masks: exec and exit reach B only.
    assert!(log.iter().any(|l| l.starts_with("B:exec:")), "{text}");
    assert!(
        !log.iter()
            .any(|l| l.starts_with("A:exec") || l.starts_with("A:exit_code")),
        "{text}"
    );
    assert!(log.last().unwrap().starts_with("B:exit_code:0:"), "{text}");
    // Order: entries in reverse attach order (B, A), exits in attach order
    // (A, B), while both are attached.
    let first_entry = log.iter().position(|l| l.contains(":entry:")).unwrap();
    assert!(
        log[first_entry].starts_with("B:entry:") && log[first_entry + 1].starts_with("A:entry:"),
        "{text}"
    );
    let exits: Vec<&String> = log.iter().filter(|l| l.contains(":exit:")).collect();
    assert!(
        exits[0].starts_with("A:exit:") && exits[1].starts_with("B:exit:"),
        "{text}"
    );
    // Prevailing action: B's 3rd exit callback sees A's REPORT (smaller
    // than RESUME); its 6th sees RESUME (DETACH counts as RESUME).
    let b_exits: Vec<&&String> = exits.iter().filter(|l| l.starts_with("B:")).collect();
    assert!(b_exits[2].ends_with(":UTRACE_REPORT"), "{text}");
    assert!(b_exits[5].ends_with(":UTRACE_RESUME"), "{text}");
    // A detached at its 6th exit: nothing more for A, B goes on.
    assert_eq!(
        log.iter().filter(|l| l.starts_with("A:exit:")).count(),
        6,
        "{text}"
    );
    let after = log.iter().rposition(|l| l.starts_with("A:")).unwrap();
    assert!(
        log[after + 1..].iter().any(|l| l.starts_with("B:exit:")),
        "{text}"
    );
    // B saw every getpid the program made (one for the expected value, then
    // 20 in the loop), each returning the pid it printed.
    let getpids: Vec<&String> = b_exits
        .iter()
        .map(|l| **l)
        .filter(|l| l.starts_with(&format!("B:exit:{getpid}:")))
        .collect();
    assert_eq!(getpids.len(), 21, "{text}");
    assert!(
        getpids
            .iter()
            .all(|l| l.starts_with(&format!("B:exit:{getpid}:{pid}:"))),
        "{text}"
    );
}
