//! Event bits (what an engine asks to hear about) and the events reported.

use std::fmt;

/// A set of utrace events, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventMask(pub u32);

impl EventMask {
    /// No events.
    pub const NONE: Self = Self(0);
    /// report_quiesce: before every other report, and for REPORT/STOP.
    pub const QUIESCE: Self = Self(1 << 0);
    /// The thread was reaped; always the last report.
    pub const REAP: Self = Self(1 << 1);
    /// The thread created a child.
    pub const CLONE: Self = Self(1 << 2);
    /// The thread exec'd.
    pub const EXEC: Self = Self(1 << 3);
    /// The thread is exiting (code may still be changed).
    pub const EXIT: Self = Self(1 << 4);
    /// The thread is dead.
    pub const DEATH: Self = Self(1 << 5);
    /// System call entry.
    pub const SYSCALL_ENTRY: Self = Self(1 << 6);
    /// System call exit.
    pub const SYSCALL_EXIT: Self = Self(1 << 7);
    /// A signal with a handler (or injected).
    pub const SIGNAL: Self = Self(1 << 8);
    /// A signal whose disposition is ignore.
    pub const SIGNAL_IGN: Self = Self(1 << 9);
    /// A stop signal.
    pub const SIGNAL_STOP: Self = Self(1 << 10);
    /// A terminating signal.
    pub const SIGNAL_TERM: Self = Self(1 << 11);
    /// A core-dumping signal.
    pub const SIGNAL_CORE: Self = Self(1 << 12);
    /// Job control stop or continue.
    pub const JCTL: Self = Self(1 << 13);
    /// Every signal event.
    pub const SIGNAL_ALL: Self = Self(0x1f << 8);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: EventMask) -> bool {
        other.0 != 0 && self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set.
    pub fn intersects(self, other: EventMask) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::ops::BitOr for EventMask {
    type Output = EventMask;
    fn bitor(self, rhs: EventMask) -> EventMask {
        EventMask(self.0 | rhs.0)
    }
}

impl fmt::Display for EventMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 14] = [
            "QUIESCE",
            "REAP",
            "CLONE",
            "EXEC",
            "EXIT",
            "DEATH",
            "SYSCALL_ENTRY",
            "SYSCALL_EXIT",
            "SIGNAL",
            "SIGNAL_IGN",
            "SIGNAL_STOP",
            "SIGNAL_TERM",
            "SIGNAL_CORE",
            "JCTL",
        ];
        let names: Vec<&str> = NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() {
            f.write_str("0")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// A guest thread id (the guest kernel's `pid` of the task).
pub type Tid = i32;

/// An event reported to engines, with its details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A plain REPORT/STOP quiescence (report_quiesce gets event 0).
    Quiesce,
    /// A SINGLESTEP or BLOCKSTEP completed: report_quiesce with event 0,
    /// the details in [`crate::context::ThreadContext::step`].
    Step,
    /// `clone` created `child` with `flags` (CLONE_VFORK, CLONE_THREAD, ...).
    Clone {
        /// The new thread.
        child: Tid,
        /// clone flags.
        flags: u64,
    },
    /// `execve` of `filename` succeeded.
    Exec {
        /// The path exec'd.
        filename: String,
    },
    /// The thread is exiting with `code`.
    Exit {
        /// The exit code (wait status form).
        code: i64,
    },
    /// The thread is dead.
    Death {
        /// Whether the whole thread group died.
        group_dead: bool,
        /// Signal sent to the parent, or -1.
        signal: i32,
    },
    /// The thread was reaped.
    Reap,
    /// System call `nr` entered with `args`.
    SyscallEntry {
        /// Number.
        nr: u64,
        /// The six arguments.
        args: [u64; 6],
    },
    /// System call `nr` returned `ret`.
    SyscallExit {
        /// Number.
        nr: u64,
        /// Return value.
        ret: i64,
    },
    /// Signal `signo` is about to be delivered.
    Signal {
        /// Signal number.
        signo: i32,
        /// Which SIGNAL_* bit its disposition selects.
        kind: EventMask,
    },
    /// A job-control stop or continue of the thread's group.
    Jctl {
        /// [`CLD_STOPPED`] (the thread is about to stop) or
        /// [`CLD_CONTINUED`] (it runs again after a stop).
        kind: i32,
        /// The stop signal (0 for a continue).
        signo: i32,
    },
}

/// `report_jctl`'s kind of a job-control stop (`CLD_STOPPED`).
pub const CLD_STOPPED: i32 = 5;
/// `report_jctl`'s kind of a continue after one (`CLD_CONTINUED`).
pub const CLD_CONTINUED: i32 = 6;

impl Event {
    /// The report of an INTERRUPT: report_signal with no signal (signo 0,
    /// utrace's UTRACE_SIGNAL_REPORT).
    pub fn interrupt() -> Self {
        Event::Signal {
            signo: 0,
            kind: EventMask::SIGNAL,
        }
    }

    /// The event bit this event reports under (0 for a plain quiesce).
    pub fn mask(&self) -> EventMask {
        match self {
            Event::Quiesce | Event::Step => EventMask::NONE,
            Event::Clone { .. } => EventMask::CLONE,
            Event::Exec { .. } => EventMask::EXEC,
            Event::Exit { .. } => EventMask::EXIT,
            Event::Death { .. } => EventMask::DEATH,
            Event::Reap => EventMask::REAP,
            Event::SyscallEntry { .. } => EventMask::SYSCALL_ENTRY,
            Event::SyscallExit { .. } => EventMask::SYSCALL_EXIT,
            Event::Signal { kind, .. } => *kind,
            Event::Jctl { .. } => EventMask::JCTL,
        }
    }
}
