//! strace's syscall tampering, `-e inject=SET:error=ERRNO|retval=N[:when=EXPR]`
//! and `-e fault=SET[:error=ERRNO][:when=EXPR]`, with strace's syntax and
//! meaning: the chosen invocations of the calls in SET are not run; the
//! thread sees the error (or the value) as their result, and the trace
//! line ends with ` (INJECTED)`. Invocations are counted per thread and
//! per call, as strace counts them.
//!
//! Carried out with utrace's system-call abort at the entry report
//! ([`crate::context::ThreadContext::abort_syscall`]).

use std::collections::HashSet;

use crate::syscalls::format::errno_name;

/// Which invocations are tampered with: strace's `first[..last][+[step]]`
/// (1-based; `+` alone means every one from `first`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct When {
    first: u64,
    last: Option<u64>,
    step: Option<u64>,
}

impl When {
    /// Every invocation (strace's default).
    pub const ALWAYS: When = When {
        first: 1,
        last: None,
        step: Some(1),
    };

    /// Whether the `n`th invocation (1-based) is tampered with.
    pub fn matches(self, n: u64) -> bool {
        if n < self.first || self.last.is_some_and(|l| n > l) {
            return false;
        }
        match self.step {
            None => n == self.first,
            Some(s) => (n - self.first).checked_rem(s) == Some(0),
        }
    }

    fn parse(s: &str) -> Result<When, String> {
        let bad = || format!("when={s}: expected first[..last][+[step]] with numbers from 1");
        let num = |t: &str| t.parse::<u64>().ok().filter(|n| *n >= 1);
        let (range, step) = match s.split_once('+') {
            Some((r, "")) => (r, Some(1)),
            Some((r, st)) => (r, Some(num(st).ok_or_else(bad)?)),
            None => (s, None),
        };
        let (first, last) = match range.split_once("..") {
            Some((f, l)) => (num(f).ok_or_else(bad)?, Some(num(l).ok_or_else(bad)?)),
            None => (num(range).ok_or_else(bad)?, None),
        };
        if last.is_some_and(|l| l < first) {
            return Err(bad());
        }
        // `first..last` without a step covers the whole range.
        let step = step.or(last.map(|_| 1));
        Ok(When { first, last, step })
    }
}

/// What a tampered invocation returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fails with this errno (1..=4095).
    Error(i64),
    /// Returns this value.
    Retval(i64),
}

impl Outcome {
    /// The value the thread sees in `rax`.
    pub fn ret(self) -> i64 {
        match self {
            Outcome::Error(e) => -e,
            Outcome::Retval(v) => v,
        }
    }
}

/// One `-e inject=` or `-e fault=` expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tamper {
    /// The calls it applies to, by name.
    pub calls: HashSet<String>,
    /// What they return; None: the call runs (`signal=` alone).
    pub outcome: Option<Outcome>,
    /// A signal sent to the thread at the call's entry (`signal=`), as
    /// strace sends it when it restarts the thread from its entry stop.
    pub signal: Option<i32>,
    /// Which invocations.
    pub when: When,
}

/// `ENOSYS`: what `fault=` injects unless told otherwise.
const ENOSYS: i64 = 38;
/// Highest errno strace accepts.
const MAX_ERRNO: i64 = 4095;

impl Tamper {
    /// Parses the part after `inject=` (`fault` false) or `fault=`.
    pub fn parse(spec: &str, fault: bool) -> Result<Tamper, String> {
        let what = if fault { "fault" } else { "inject" };
        let mut parts = spec.split(':');
        let set = parts.next().unwrap_or_default();
        let mut calls = HashSet::new();
        for name in set.split(',') {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "-e {what}={spec}: `{name}` is not a system call name (classes, negation and regular expressions are not supported)"
                ));
            }
            calls.insert(name.to_string());
        }
        let (mut error, mut retval, mut when) = (None, None, When::ALWAYS);
        let mut signal = None;
        for p in parts {
            let (key, value) = p
                .split_once('=')
                .ok_or_else(|| format!("-e {what}={spec}: `{p}` is not KEY=VALUE"))?;
            match key {
                "error" => error = Some(parse_errno(value)?),
                "retval" if !fault => {
                    retval =
                        Some(value.parse::<i64>().map_err(|_| {
                            format!("-e {what}={spec}: retval={value} is not a number")
                        })?)
                }
                "when" => when = When::parse(value)?,
                "signal" if !fault => {
                    signal = Some(crate::syscalls::format::signal_number(value).ok_or_else(
                        || format!("-e {what}={spec}: signal={value} is not a signal"),
                    )?)
                }
                "signal" | "syscall" | "delay_enter" | "delay_exit" | "poke_enter"
                | "poke_exit" => {
                    return Err(format!(
                        "-e {what}={spec}: {key}= is not supported (error=, retval=, signal= and when= are)"
                    ))
                }
                _ => return Err(format!("-e {what}={spec}: unknown option {key}=")),
            }
        }
        let outcome = match (error, retval) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "-e {what}={spec}: error= and retval= are mutually exclusive"
                ))
            }
            (Some(e), None) => Some(Outcome::Error(e)),
            (None, Some(v)) => Some(Outcome::Retval(v)),
            (None, None) if fault => Some(Outcome::Error(ENOSYS)),
            (None, None) if signal.is_some() => None,
            (None, None) => {
                return Err(format!(
                    "-e {what}={spec}: one of error=, retval= or signal= is needed"
                ))
            }
        };
        Ok(Tamper {
            calls,
            outcome,
            signal,
            when,
        })
    }
}

/// An errno by name (`ENOENT`) or number (1..=4095).
fn parse_errno(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        if (1..=MAX_ERRNO).contains(&n) {
            return Ok(n);
        }
        return Err(format!("error={s}: an errno is 1..{MAX_ERRNO}"));
    }
    (1..=MAX_ERRNO)
        .find(|&e| errno_name(e).is_some_and(|(name, _)| name == s))
        .ok_or_else(|| format!("error={s}: no such errno name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(w: &str) -> Vec<u64> {
        let w = When::parse(w).unwrap();
        (1..=12).filter(|n| w.matches(*n)).collect()
    }

    #[test]
    fn when_follows_strace() {
        assert_eq!(hits("3"), [3]);
        assert_eq!(hits("3+"), [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(hits("3+4"), [3, 7, 11]);
        assert_eq!(hits("2..4"), [2, 3, 4]);
        assert_eq!(hits("2..9+3"), [2, 5, 8]);
        for bad in ["0", "", "x", "3+0", "5..2", "1..", "+2"] {
            assert!(When::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inject_and_fault_expressions() {
        let t = Tamper::parse("openat,read:error=ENOENT:when=2+", false).unwrap();
        assert_eq!(t.outcome, Some(Outcome::Error(2)));
        assert_eq!(t.outcome.unwrap().ret(), -2);
        assert!(t.calls.contains("openat") && t.calls.contains("read"));
        assert!(t.when.matches(5) && !t.when.matches(1));
        assert_eq!(
            Tamper::parse("getpid:retval=42", false).unwrap().outcome,
            Some(Outcome::Retval(42))
        );
        assert_eq!(
            Tamper::parse("close", true).unwrap().outcome,
            Some(Outcome::Error(ENOSYS))
        );
        assert_eq!(
            Tamper::parse("close:error=13", true).unwrap().outcome,
            Some(Outcome::Error(13))
        );
        let s = Tamper::parse("getpid:signal=SIGUSR1:when=3", false).unwrap();
        assert_eq!((s.outcome, s.signal), (None, Some(10)));
        let s = Tamper::parse("getpid:signal=USR2:error=EPERM", false).unwrap();
        assert_eq!((s.outcome, s.signal), (Some(Outcome::Error(1)), Some(12)));
        for (bad, fault) in [
            ("openat", false),
            ("openat:error=ENOENT:retval=1", false),
            ("openat:retval=1", true),
            ("openat:error=EWHAT", false),
            ("openat:error=0", false),
            ("openat:signal=SIGNOPE", false),
            ("openat:signal=SIGUSR1", true),
            ("openat:signal=65", false),
            ("%file:error=ENOENT", false),
            ("!openat:error=ENOENT", false),
            ("openat:error=ENOENT:when=0", false),
            ("openat:bogus=1", false),
            ("openat:error", false),
        ] {
            assert!(Tamper::parse(bad, fault).is_err(), "{bad}");
        }
    }
}
