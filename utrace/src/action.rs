//! Resume actions and how several engines' votes combine.

/// What an engine wants the traced thread to do after a callback. The
/// order is the seed mail's (REPORT before INTERRUPT; the later utrace code
/// swapped them): when engines disagree, the smallest action prevails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResumeAction {
    /// Stay stopped until no engine wants it (the only persistent state).
    Stop,
    /// Call report_quiesce soon, on the return-to-user path, without
    /// interrupting a system call.
    Report,
    /// Like REPORT, but break out of a blocking system call as a signal would.
    Interrupt,
    /// Resume for one user-mode instruction, then report.
    SingleStep,
    /// Resume to the next branch, then report (single-steps where the
    /// hardware cannot block-step).
    BlockStep,
    /// Resume normally.
    Resume,
    /// Detach this engine (implies RESUME for the thread).
    Detach,
}

impl ResumeAction {
    /// Every action, smallest first.
    pub const ALL: [ResumeAction; 7] = [
        Self::Stop,
        Self::Report,
        Self::Interrupt,
        Self::SingleStep,
        Self::BlockStep,
        Self::Resume,
        Self::Detach,
    ];

    /// The action that prevails between `self` and `other`: the smaller.
    pub fn prevail(self, other: ResumeAction) -> ResumeAction {
        self.min(other)
    }

    /// What the thread does for an engine voting `self`: DETACH resumes.
    pub fn for_thread(self) -> ResumeAction {
        if self == Self::Detach {
            Self::Resume
        } else {
            self
        }
    }

    /// The utrace name (`UTRACE_STOP`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "UTRACE_STOP",
            Self::Report => "UTRACE_REPORT",
            Self::Interrupt => "UTRACE_INTERRUPT",
            Self::SingleStep => "UTRACE_SINGLESTEP",
            Self::BlockStep => "UTRACE_BLOCKSTEP",
            Self::Resume => "UTRACE_RESUME",
            Self::Detach => "UTRACE_DETACH",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_order_and_the_smallest_prevails() {
        use ResumeAction::*;
        assert!(ResumeAction::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            Report.prevail(Interrupt),
            Report,
            "seed order: REPORT < INTERRUPT"
        );
        assert_eq!(
            BlockStep.prevail(SingleStep),
            SingleStep,
            "BLOCKSTEP+SINGLESTEP = single"
        );
        assert_eq!(Detach.prevail(Resume), Resume);
        assert_eq!(Stop.prevail(Detach), Stop);
        assert_eq!(Detach.for_thread(), Resume, "DETACH implies resume");
    }
}
