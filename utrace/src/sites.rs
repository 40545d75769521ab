//! Where in the guest kernel each utrace event is observed.
//!
//! Inlining differs between kernels and configs (`syscall_trace_enter` is
//! `syscall_trace_enter.constprop.0` in 6.1 and plain in 6.12;
//! `exit_to_user_mode_loop` exists only as its own function in 6.12;
//! `exec_binprm`, `exit_notify` and `syscall_exit_work` are inlined in all
//! three kernels we test), so every event has a ranked list of candidate
//! functions. Resolution takes the first candidate present in the running
//! kernel's symbols as a text symbol (or, for an event observed in code
//! the compiler copied into several functions, every one present: see
//! [`Reach`]), accepting compiler suffixes
//! (`.isra.N`, `.constprop.N`, `.part.N`) but never a `.cold` fragment,
//! which is not an entry point. `hvtrace sites` prints the choice and why.

use guest_introspect::symbols::SymbolMap;

use crate::event::EventMask;

/// A place the tracer traps in the guest kernel, named by what a thread
/// passing it is doing. Most sites observe one utrace event; a signal is
/// observed at two (its delivery to a handler, and its dequeue, kept for a
/// thread that then dies of it: see [`crate::hv::signals`]), and QUIESCE's
/// site is where REPORT takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// Entry to a system call of a steered thread.
    SyscallEntry,
    /// Exit from a system call of a steered thread.
    SyscallExit,
    /// A new task about to run for the first time.
    Clone,
    /// A successful exec.
    Exec,
    /// A thread starting to exit.
    Exit,
    /// A thread dead to the world (its parent notified).
    Death,
    /// A task unhashed and freed.
    Reap,
    /// A signal delivered to a user handler.
    SignalDelivered,
    /// A signal dequeued on the return-to-user path: a traced thread that
    /// then exits by its default action reports it (SIGNAL_TERM,
    /// SIGNAL_CORE) with its siginfo.
    SignalDequeued,
    /// A signal taken by `get_signal`, before the kernel acts on it: where
    /// engines vote on it (deliver, ignore, change, stop).
    SignalTaken,
    /// A job-control stop.
    JobControl,
    /// The thread that notices a job-control continue notifies the parent.
    JobContinue,
    /// The return-to-user work, just after TIF_NOTIFY_RESUME was consumed.
    Quiesce,
    /// The guest's `#DB` handler sending the SIGTRAP of a user-mode
    /// single-step: where SINGLESTEP and BLOCKSTEP are reported (set only
    /// while a thread steps: see [`crate::hv::events::step`]).
    Step,
    /// Not an event: the control UART's interrupt handler, where the
    /// tracer wakes tasks (see [`crate::hv::doorbell`]).
    Doorbell,
}

impl Site {
    /// Every site the tracer sets at install; QUIESCE's is set when an
    /// engine first asks for QUIESCE.
    pub const TRACED: [Site; 9] = [
        Site::SyscallEntry,
        Site::SyscallExit,
        Site::Clone,
        Site::Exec,
        Site::Exit,
        Site::Death,
        Site::Reap,
        Site::SignalDelivered,
        Site::SignalDequeued,
    ];

    /// Sites set at install where the kernel allows them: without
    /// SIGNAL_TAKEN signals are reported at their delivery to a handler
    /// (no vote); without the job-control sites JCTL is not reported.
    pub const OPTIONAL: [Site; 3] = [Site::SignalTaken, Site::JobControl, Site::JobContinue];

    /// The name `hvtrace sites` shows (the utrace event's, where there is
    /// one).
    pub fn name(self) -> &'static str {
        match self {
            Site::SyscallEntry => "SYSCALL_ENTRY",
            Site::SyscallExit => "SYSCALL_EXIT",
            Site::Clone => "CLONE",
            Site::Exec => "EXEC",
            Site::Exit => "EXIT",
            Site::Death => "DEATH",
            Site::Reap => "REAP",
            Site::SignalDelivered => "SIGNAL",
            Site::SignalDequeued => "SIGNAL_FATAL",
            Site::SignalTaken => "SIGNAL_TAKEN",
            Site::JobControl => "JCTL",
            Site::JobContinue => "JCTL_CONTINUE",
            Site::Quiesce => "QUIESCE",
            Site::Step => "STEP",
            Site::Doorbell => "DOORBELL",
        }
    }

    /// The utrace events reported from this site.
    pub fn events(self) -> EventMask {
        match self {
            Site::SyscallEntry => EventMask::SYSCALL_ENTRY,
            Site::SyscallExit => EventMask::SYSCALL_EXIT,
            Site::Clone => EventMask::CLONE,
            Site::Exec => EventMask::EXEC,
            Site::Exit => EventMask::EXIT,
            Site::Death => EventMask::DEATH,
            Site::Reap => EventMask::REAP,
            Site::SignalDelivered => EventMask::SIGNAL,
            Site::SignalDequeued => EventMask::SIGNAL_TERM | EventMask::SIGNAL_CORE,
            Site::SignalTaken => EventMask(
                EventMask::SIGNAL.0
                    | EventMask::SIGNAL_IGN.0
                    | EventMask::SIGNAL_STOP.0
                    | EventMask::SIGNAL_TERM.0
                    | EventMask::SIGNAL_CORE.0,
            ),
            Site::JobControl | Site::JobContinue => EventMask::JCTL,
            Site::Quiesce | Site::Step => EventMask::QUIESCE,
            Site::Doorbell => EventMask::NONE,
        }
    }
}

impl serde::Serialize for Site {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in a candidate function the trap goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum At {
    /// The function's first instruction.
    Entry,
    /// The start of the inlined `syscall_exit_work`: the branch taken when
    /// the thread's `syscall_work` has a `SYSCALL_WORK_EXIT` bit, found by
    /// disassembling the function (see [`crate::hv::placement`]).
    ExitWorkBranch,
    /// Just after the inlined `clear_thread_flag(TIF_NOTIFY_RESUME)` of the
    /// return-to-user work loop (a locked `and` clearing that bit of the
    /// thread flags), found by disassembly: reached only by a thread that
    /// had TIF_NOTIFY_RESUME set, after the kernel consumed it.
    NotifyResumeCleared,
    /// Every branch into the point where `get_signal`'s dequeue paths join
    /// with a signal taken (see [`crate::hv::placement::signal_taken`]).
    SignalTaken,
}

/// One candidate function for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Function name without compiler suffix.
    pub function: &'static str,
    /// Where in it.
    pub at: At,
    /// Why it observes the event (shown by `hvtrace sites`).
    pub why: &'static str,
}

/// Which of an event's candidates get a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Reach {
    /// The best one the kernel has: every thread passes through it.
    First,
    /// Every one the kernel has: each holds its own inlined copy of the
    /// code that observes the event, and a thread passes through only one
    /// of them (6.12 inlines the return-to-user loop into both the syscall
    /// and the interrupt exit, and keeps an out-of-line copy besides).
    Every,
}

/// The ranked candidates of one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteSpec {
    /// The site.
    pub site: Site,
    /// Whether the best candidate or every one is trapped.
    pub reach: Reach,
    /// Candidates, best first.
    pub candidates: &'static [Candidate],
}

const fn c(function: &'static str, why: &'static str) -> Candidate {
    Candidate {
        function,
        at: At::Entry,
        why,
    }
}

const fn notify_resume(function: &'static str, why: &'static str) -> Candidate {
    Candidate {
        function,
        at: At::NotifyResumeCleared,
        why,
    }
}

const fn branch(function: &'static str, why: &'static str) -> Candidate {
    Candidate {
        function,
        at: At::ExitWorkBranch,
        why,
    }
}

/// Every event and its candidates, best first.
pub const SITES: &[SiteSpec] = &[
    SiteSpec {
        site: Site::SyscallEntry,
        reach: Reach::First,
        candidates: &[
            c("syscall_trace_enter", "runs only when the thread's syscall_work has an entry bit: traced threads are steered onto it, others never reach it"),
            c("syscall_enter_from_user_mode_work", "entry work slow path (syscall_trace_enter inlined)"),
            c("syscall_enter_from_user_mode", "every syscall entry (filter by thread: untraced threads pay a trap)"),
        ],
    },
    SiteSpec {
        site: Site::SyscallExit,
        reach: Reach::First,
        candidates: &[
            c("syscall_exit_work", "runs only with syscall_work exit bits set"),
            branch("syscall_exit_to_user_mode_prepare", "syscall_exit_work inlined: the branch taken only with syscall_work exit bits set, found by disassembly"),
            branch("syscall_exit_to_user_mode", "syscall_exit_work inlined one level further: the same branch"),
        ],
    },
    SiteSpec {
        site: Site::Clone,
        reach: Reach::First,
        candidates: &[
            c("wake_up_new_task", "the child is complete and about to run for the first time; called by kernel_clone"),
            c("kernel_clone", "fork/vfork/clone entry; the child id is its return value"),
            c("_do_fork", "kernel_clone's name before 5.10"),
        ],
    },
    SiteSpec {
        site: Site::Exec,
        reach: Reach::First,
        candidates: &[
            c("exec_binprm", "after a binary handler succeeded, where ptrace reports PTRACE_EVENT_EXEC"),
            c("begin_new_exec", "the point of no return of a successful exec; bprm->filename names the file"),
            c("bprm_execve", "every exec attempt (success is its return value 0)"),
        ],
    },
    SiteSpec {
        site: Site::Exit,
        reach: Reach::First,
        candidates: &[c("do_exit", "every thread exit, with the exit code argument")],
    },
    SiteSpec {
        site: Site::Death,
        reach: Reach::First,
        candidates: &[
            c("exit_notify", "the parent is notified; the thread is dead to the world"),
            c("do_task_dead", "the dying thread's last schedule (exit_notify inlined)"),
        ],
    },
    SiteSpec {
        site: Site::Reap,
        reach: Reach::First,
        candidates: &[c("release_task", "the task is unhashed and freed: always the last report")],
    },
    SiteSpec {
        site: Site::SignalDelivered,
        reach: Reach::First,
        candidates: &[
            c("signal_setup_done", "a signal was delivered to a user handler (its frame is set up); the ksignal has the number, siginfo and action"),
            c("get_signal", "signal dequeue on the return-to-user path, before delivery: a signal can be injected, changed or suppressed"),
        ],
    },
    SiteSpec {
        site: Site::SignalDequeued,
        reach: Reach::First,
        candidates: &[
            c("get_signal", "every signal dequeue on the return-to-user path: the tracer keeps the ksignal of a traced thread, so a signal that kills by its default action (SIGNAL_TERM, SIGNAL_CORE) is reported with its siginfo when the thread reaches do_exit"),
        ],
    },
    SiteSpec {
        site: Site::JobControl,
        reach: Reach::First,
        candidates: &[
            c("do_signal_stop", "a thread joins its group's job-control stop (its argument is the stop signal)"),
        ],
    },
    SiteSpec {
        site: Site::JobContinue,
        reach: Reach::First,
        candidates: &[
            c("do_notify_parent_cldstop", "the first thread of a stopped group to run after SIGCONT tells its parent (why = CLD_CONTINUED); also called with CLD_STOPPED, which is not reported here"),
        ],
    },
    SiteSpec {
        site: Site::SignalTaken,
        reach: Reach::First,
        candidates: &[
            Candidate {
                function: "get_signal",
                at: At::SignalTaken,
                why: "the signal get_signal dequeued (from dequeue_signal or the inlined dequeue_synchronous_signal), before it is ignored, delivered, stops or kills: the traps go on every branch into that point, and the tracer reads the number from the register holding it; engines vote there",
            },
        ],
    },
    SiteSpec {
        site: Site::Quiesce,
        reach: Reach::Every,
        candidates: &[
            notify_resume("exit_to_user_mode_prepare", "the return-to-user work (6.1: the loop is inlined here and every return to user mode calls it), just after it clears TIF_NOTIFY_RESUME: REPORT without interrupting a syscall, found by disassembly"),
            notify_resume("syscall_exit_to_user_mode", "the return from a system call (6.12 inlines the loop here), just after it clears TIF_NOTIFY_RESUME"),
            notify_resume("irqentry_exit_to_user_mode", "the return from an interrupt or exception (6.12 inlines the loop here), just after it clears TIF_NOTIFY_RESUME"),
            notify_resume("exit_to_user_mode_loop", "the loop's out-of-line copy (6.12, for callers outside kernel/entry), just after it clears TIF_NOTIFY_RESUME"),
        ],
    },
    SiteSpec {
        site: Site::Step,
        reach: Reach::First,
        candidates: &[
            c("send_sigtrap", "the #DB handler's SIGTRAP for a user-mode single-step (exc_debug_user): a thread the tracer steps returns from it at once, with no signal queued, and reports the step; every other caller passes"),
        ],
    },
    SiteSpec {
        site: Site::Doorbell,
        reach: Reach::First,
        candidates: &[
            c("serial8250_interrupt", "the 8250 driver's interrupt handler: a pulse on the control UART's line brings a vCPU here, in hard-interrupt context, where the tracer wakes the tasks it parked or interrupts"),
        ],
    },
];

/// An event's site in one kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedSite {
    /// Event name.
    pub event: &'static str,
    /// The symbol chosen, with any compiler suffix (`do_execveat_common.isra.0`).
    pub symbol: String,
    /// Its link-time address.
    pub addr: u64,
    /// 0 for the preferred candidate.
    pub rank: usize,
    /// Where in the function the trap goes.
    pub at: At,
    /// Why this function observes the event.
    pub why: &'static str,
    /// Better-ranked candidates this kernel does not have as functions.
    pub missing: Vec<&'static str>,
}

/// Why an event has no site in a kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no site for {event}: none of {tried:?} is a function in this kernel")]
pub struct SiteError {
    /// Event name.
    pub event: &'static str,
    /// The candidates tried.
    pub tried: Vec<&'static str>,
}

/// Whether `symbol` names `function`, allowing compiler suffixes other
/// than `.cold`.
pub fn names_function(symbol: &str, function: &str) -> bool {
    match symbol.strip_prefix(function) {
        Some("") => true,
        Some(rest) => {
            rest.starts_with('.')
                && !rest.contains(".cold")
                && rest[1..].split('.').all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
        }
        None => false,
    }
}

/// Resolves one event's candidates against `symbols` (text symbols only;
/// an exact name wins over a suffixed one).
pub fn resolve(spec: &SiteSpec, symbols: &SymbolMap) -> Result<ResolvedSite, SiteError> {
    let mut missing = Vec::new();
    for (rank, cand) in spec.candidates.iter().enumerate() {
        let mut found: Option<(u64, String)> = None;
        for s in symbols.iter() {
            if !matches!(s.kind, 'T' | 't') || !names_function(&s.name, cand.function) {
                continue;
            }
            let exact = s.name == cand.function;
            if found.is_none() || exact {
                found = Some((s.addr, s.name.clone()));
            }
            if exact {
                break;
            }
        }
        match found {
            Some((addr, symbol)) => {
                return Ok(ResolvedSite {
                    event: spec.site.name(),
                    symbol,
                    addr,
                    rank,
                    at: cand.at,
                    why: cand.why,
                    missing,
                })
            }
            None => missing.push(cand.function),
        }
    }
    Err(SiteError {
        event: spec.site.name(),
        tried: missing,
    })
}

/// Resolves one event's candidates as its [`Reach`] says: the best one,
/// or every one present (each with its rank; `missing` lists the absent
/// ones ranked above it).
pub fn resolve_each(spec: &SiteSpec, symbols: &SymbolMap) -> Result<Vec<ResolvedSite>, SiteError> {
    if spec.reach == Reach::First {
        return resolve(spec, symbols).map(|s| vec![s]);
    }
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (rank, cand) in spec.candidates.iter().enumerate() {
        let one = SiteSpec {
            candidates: std::slice::from_ref(cand),
            ..*spec
        };
        match resolve(&one, symbols) {
            Ok(site) => found.push(ResolvedSite {
                rank,
                missing: missing.clone(),
                ..site
            }),
            Err(_) => missing.push(cand.function),
        }
    }
    if found.is_empty() {
        return Err(SiteError {
            event: spec.site.name(),
            tried: missing,
        });
    }
    Ok(found)
}

/// Resolves every event: one entry per site (several for an event that
/// reaches every candidate), or the event's error.
pub fn resolve_all(symbols: &SymbolMap) -> Vec<Result<ResolvedSite, SiteError>> {
    let mut all = Vec::new();
    for spec in SITES {
        match resolve_each(spec, symbols) {
            Ok(sites) => all.extend(sites.into_iter().map(Ok)),
            Err(e) => all.push(Err(e)),
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_introspect::symbols::Symbol;

    fn map(entries: &[(u64, char, &str)]) -> SymbolMap {
        SymbolMap::from_symbols(
            entries
                .iter()
                .map(|&(addr, kind, name)| Symbol {
                    addr,
                    kind,
                    name: name.into(),
                })
                .collect(),
        )
    }

    #[test]
    fn compiler_suffixes_match_but_cold_fragments_and_prefixes_do_not() {
        assert!(names_function("syscall_trace_enter", "syscall_trace_enter"));
        assert!(names_function(
            "syscall_trace_enter.constprop.0",
            "syscall_trace_enter"
        ));
        assert!(names_function("ptrace_stop.part.0", "ptrace_stop"));
        assert!(names_function(
            "do_execveat_common.isra.0",
            "do_execveat_common"
        ));
        assert!(!names_function("do_exit.cold", "do_exit"));
        assert!(!names_function("do_exit_group", "do_exit"));
        assert!(!names_function("do_exit.", "do_exit"));
    }

    #[test]
    fn the_best_present_candidate_wins_and_misses_are_reported() {
        let m = map(&[
            (0x1000, 't', "syscall_trace_enter.constprop.0"),
            (0x2000, 'T', "syscall_enter_from_user_mode"),
            (0x3000, 'T', "begin_new_exec"),
            (0x4000, 'D', "exec_binprm"), // data, not a function
            (0x5000, 't', "do_exit.cold"),
        ]);
        let entry = resolve(&SITES[0], &m).unwrap();
        assert_eq!(
            (entry.symbol.as_str(), entry.rank),
            ("syscall_trace_enter.constprop.0", 0)
        );
        let exec = SITES.iter().find(|s| s.site.name() == "EXEC").unwrap();
        let r = resolve(exec, &m).unwrap();
        assert_eq!(
            (r.symbol.as_str(), r.rank, r.missing.clone()),
            ("begin_new_exec", 1, vec!["exec_binprm"])
        );
        let exit = SITES.iter().find(|s| s.site.name() == "EXIT").unwrap();
        assert_eq!(
            resolve(exit, &m).unwrap_err().to_string(),
            "no site for EXIT: none of [\"do_exit\"] is a function in this kernel"
        );
    }

    #[test]
    fn an_event_copied_into_several_functions_reaches_every_one_present() {
        let quiesce = SITES.iter().find(|s| s.site.name() == "QUIESCE").unwrap();
        assert_eq!(quiesce.reach, Reach::Every);
        // 6.12's layout: no exit_to_user_mode_prepare, the other three.
        let m = map(&[
            (0x1000, 'T', "exit_to_user_mode_loop"),
            (0x2000, 'T', "syscall_exit_to_user_mode"),
            (0x3000, 'T', "irqentry_exit_to_user_mode"),
        ]);
        let sites = resolve_each(quiesce, &m).unwrap();
        let got: Vec<_> = sites.iter().map(|s| (s.symbol.as_str(), s.rank)).collect();
        assert_eq!(
            got,
            [
                ("syscall_exit_to_user_mode", 1),
                ("irqentry_exit_to_user_mode", 2),
                ("exit_to_user_mode_loop", 3)
            ]
        );
        assert_eq!(sites[0].missing, ["exit_to_user_mode_prepare"]);
        let all = resolve_all(&m);
        assert_eq!(
            all.iter()
                .filter(|r| matches!(r, Ok(s) if s.event == "QUIESCE"))
                .count(),
            3
        );
        assert!(resolve_each(quiesce, &map(&[(0x1000, 'T', "do_exit")])).is_err());
    }
}
