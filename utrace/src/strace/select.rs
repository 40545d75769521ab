//! strace's set syntax for `-e trace=`, `-e signal=` and `-e status=`.
//!
//! A system-call set is comma-separated tokens: a call's name, its number,
//! a class (`%file`, [`super::classes`]), `/REGEX` (every call whose name
//! the extended regular expression matches anywhere), each of them
//! optionally prefixed by `?` (no error when it matches nothing); or the
//! whole set is `all` or `none`. Each leading `!` inverts the set. A signal
//! set is names (`SIGCHLD` or `CHLD`, any case) or numbers, `all` or `none`,
//! with the same `!`. As in strace, a later `-e trace=` replaces an earlier
//! one.
//!
//! Call sets are parsed before the guest boots (so a typo costs no boot)
//! and checked against the guest kernel's own table of calls once it is
//! known ([`CallSet::resolve`]).

use std::collections::HashSet;

use regex::Regex;

use super::classes::Class;
use crate::syscalls::format::signal_name;
use crate::syscalls::SyscallTable;

/// The most tokens a set may have (strace has no limit; this keeps a
/// hostile control request from costing much).
const MAX_TOKENS: usize = 1024;

/// The part of a set before its items: each leading `!` inverts the set,
/// and `none` and `all` are whole sets. The inversion, and the items
/// (None for `none` and `all`).
fn head(spec: &str) -> (bool, Option<&str>) {
    let rest = spec.trim_start_matches('!');
    let inverted = (spec.len() - rest.len()) % 2 == 1;
    match rest {
        "none" => (inverted, None),
        "all" => (!inverted, None),
        _ => (inverted, Some(rest)),
    }
}

/// A parsed system-call set, not yet checked against a kernel.
#[derive(Debug, Clone)]
pub struct CallSet {
    inverted: bool,
    tokens: Vec<Token>,
    /// The set as written, for messages.
    spec: String,
}

#[derive(Debug, Clone)]
struct Token {
    /// `?`: no error when it matches no call.
    optional: bool,
    what: What,
    /// The token as written, for messages.
    text: String,
}

#[derive(Debug, Clone)]
enum What {
    Name(String),
    Number(u64),
    Class(Class),
    Regex(Regex),
}

/// A system-call set resolved against a kernel: which call names it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFilter {
    names: HashSet<String>,
    inverted: bool,
}

impl CallFilter {
    /// Exactly these calls.
    pub fn only<I: IntoIterator<Item = String>>(names: I) -> Self {
        Self {
            names: names.into_iter().collect(),
            inverted: false,
        }
    }

    /// Whether the call named `name` (a table name, or `syscall_0x...` for
    /// a number the kernel has no name for) is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name) != self.inverted
    }
}

impl CallSet {
    /// Parses a set (the part after `trace=`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (inverted, items) = head(spec);
        let mut set = Self {
            inverted,
            tokens: Vec::new(),
            spec: spec.to_string(),
        };
        let Some(items) = items else {
            return Ok(set);
        };
        for text in items.split(',').filter(|t| !t.is_empty()) {
            if set.tokens.len() == MAX_TOKENS {
                return Err(format!("trace={spec}: more than {MAX_TOKENS} items"));
            }
            set.tokens.push(Token::parse(text)?);
        }
        if set.tokens.is_empty() {
            return Err(format!("invalid system call '{spec}'"));
        }
        Ok(set)
    }

    /// The calls of `table` in the set. A name, number or regular
    /// expression that matches no call of this kernel is an error, unless
    /// written with `?`.
    pub fn resolve(&self, table: &SyscallTable) -> Result<CallFilter, String> {
        let mut names = HashSet::new();
        let table_names = || (0..table.len() as u64).filter_map(|nr| table.name(nr));
        for t in &self.tokens {
            let before = names.len();
            let found = match &t.what {
                What::Name(n) => {
                    let known = table.number(n).is_some();
                    if known {
                        names.insert(n.clone());
                    }
                    known
                }
                What::Number(nr) => {
                    names.insert(
                        table
                            .name(*nr)
                            .map_or_else(|| format!("syscall_{nr:#x}"), str::to_string),
                    );
                    (*nr as usize) < table.len()
                }
                // A class is valid even where this kernel has none of it.
                What::Class(c) => {
                    names.extend(table_names().filter(|n| c.contains(n)).map(str::to_string));
                    true
                }
                What::Regex(re) => {
                    names.extend(table_names().filter(|n| re.is_match(n)).map(str::to_string));
                    names.len() > before
                }
            };
            if !found && !t.optional {
                return Err(format!(
                    "invalid system call '{}' (the guest kernel has no such call{})",
                    t.text,
                    if matches!(t.what, What::Regex(_)) {
                        " matching it"
                    } else {
                        ""
                    }
                ));
            }
        }
        Ok(CallFilter {
            names,
            inverted: self.inverted,
        })
    }

    /// The set as written.
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

impl Token {
    fn parse(text: &str) -> Result<Self, String> {
        let body = text.trim_start_matches('?');
        let optional = body.len() != text.len();
        let what = if let Some(re) = body.strip_prefix('/') {
            What::Regex(Regex::new(re).map_err(|e| format!("trace: /{re}: {e}"))?)
        } else if let Some(class) = Class::named(body) {
            What::Class(class)
        } else if body.starts_with(|c: char| c.is_ascii_digit()) {
            What::Number(
                body.parse()
                    .map_err(|_| format!("invalid system call '{text}'"))?,
            )
        } else if !body.is_empty() && body.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            What::Name(body.to_string())
        } else {
            return Err(format!(
                "invalid system call '{text}': not a system call name, number, %class or /regex"
            ));
        };
        Ok(Self {
            optional,
            what,
            text: text.to_string(),
        })
    }
}

/// How a call ended, for `-e status=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    /// It returned without an error.
    Successful,
    /// It returned an error.
    Failed,
    /// It never returned (`exit_group`, or its thread died in it): `= ?`.
    Unfinished,
    /// Its result could not be read. (Never, here: the return value is in
    /// a register the trap reads. Accepted for strace's sake.)
    Unavailable,
    /// The tracer detached during it. (hvtrace prints nothing for such a
    /// call. Accepted for strace's sake.)
    Detached,
}

/// Which call endings to show (`-e status=`, `-z`, `-Z`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet {
    statuses: HashSet<CallStatus>,
    inverted: bool,
}

impl StatusSet {
    /// Parses a set (the part after `status=`): `successful`, `failed`,
    /// `unfinished`, `unavailable`, `detached`, `all`, `none`, `!`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (inverted, items) = head(spec);
        let mut set = Self {
            statuses: HashSet::new(),
            inverted,
        };
        let Some(items) = items else {
            return Ok(set);
        };
        for token in items.split(',').filter(|t| !t.is_empty()) {
            set.statuses.insert(match token {
                "successful" => CallStatus::Successful,
                "failed" => CallStatus::Failed,
                "unfinished" => CallStatus::Unfinished,
                "unavailable" => CallStatus::Unavailable,
                "detached" => CallStatus::Detached,
                _ => return Err(format!(
                    "invalid status '{token}' (successful, failed, unfinished, unavailable, detached, all, none)"
                )),
            });
        }
        if set.statuses.is_empty() {
            return Err(format!("invalid status '{spec}'"));
        }
        Ok(set)
    }

    /// Exactly one status (`-z`: successful, `-Z`: failed).
    pub fn only(status: CallStatus) -> Self {
        Self {
            statuses: HashSet::from([status]),
            inverted: false,
        }
    }

    /// Whether calls that ended so are shown.
    pub fn contains(&self, status: CallStatus) -> bool {
        self.statuses.contains(&status) != self.inverted
    }
}

/// A set of signals (`-e signal=`): which `--- SIG... ---` lines to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSet {
    numbers: HashSet<i32>,
    inverted: bool,
    /// The set as written.
    spec: String,
}

/// The highest signal number (SIGRTMAX on Linux x86-64).
const MAX_SIGNAL: i32 = 64;

impl SignalSet {
    /// Parses a set (the part after `signal=`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (inverted, items) = head(spec);
        let mut set = Self {
            numbers: HashSet::new(),
            inverted,
            spec: spec.to_string(),
        };
        let Some(items) = items else {
            return Ok(set);
        };
        for token in items.split(',').filter(|t| !t.is_empty()) {
            set.numbers.insert(signal_number(token).ok_or_else(|| {
                format!(
                    "invalid signal '{token}' (a name such as SIGCHLD or CHLD, or 1..{MAX_SIGNAL})"
                )
            })?);
        }
        if set.numbers.is_empty() {
            return Err(format!("invalid signal '{spec}'"));
        }
        Ok(set)
    }

    /// The set as written.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Whether signal `signo` is in the set.
    pub fn contains(&self, signo: i32) -> bool {
        self.numbers.contains(&signo) != self.inverted
    }
}

/// A signal by number (1..=64) or name, with or without `SIG`, any case.
fn signal_number(token: &str) -> Option<i32> {
    if let Ok(n) = token.parse::<i32>() {
        return (1..=MAX_SIGNAL).contains(&n).then_some(n);
    }
    let upper = token.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    (1..=MAX_SIGNAL).find(|&n| signal_name(n) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SyscallTable {
        let names = [
            "read", "write", "open", "close", "stat", "fstat", "lstat", "poll", "lseek", "mmap",
        ];
        let mut v: Vec<Option<String>> = names.iter().map(|n| Some(n.to_string())).collect();
        v.push(None);
        v.push(Some("openat".into()));
        v.push(Some("getpid".into()));
        SyscallTable::from_names(v)
    }

    fn set(spec: &str) -> CallFilter {
        CallSet::parse(spec).unwrap().resolve(&table()).unwrap()
    }

    #[test]
    fn names_classes_regexes_and_numbers() {
        let s = set("read,%file");
        for n in ["read", "open", "stat", "lstat", "openat"] {
            assert!(s.contains(n), "{n}");
        }
        for n in ["write", "close", "fstat", "getpid"] {
            assert!(!s.contains(n), "{n}");
        }
        let r = set("/^(open|close)");
        assert!(r.contains("open") && r.contains("openat") && r.contains("close"));
        assert!(!r.contains("read"));
        let n = set("0,3,10");
        assert!(n.contains("read") && n.contains("close") && n.contains("syscall_0xa"));
    }

    #[test]
    fn negation_all_and_none() {
        let s = set("!%desc");
        assert!(s.contains("getpid") && s.contains("stat"));
        assert!(!s.contains("read") && !s.contains("openat"));
        assert!(set("all").contains("anything"));
        assert!(!set("none").contains("read"));
        assert!(!set("!all").contains("read"));
        assert!(set("!!read").contains("read"));
    }

    #[test]
    fn what_matches_nothing_is_an_error_unless_optional() {
        let t = table();
        let err = CallSet::parse("read,bogus")
            .unwrap()
            .resolve(&t)
            .unwrap_err();
        assert!(err.contains("'bogus'"), "{err}");
        assert!(CallSet::parse("/^zz").unwrap().resolve(&t).is_err());
        assert!(CallSet::parse("99").unwrap().resolve(&t).is_err());
        let s = CallSet::parse("read,?bogus,?/^zz")
            .unwrap()
            .resolve(&t)
            .unwrap();
        assert!(s.contains("read") && !s.contains("write"));
        // A class is fine even when this kernel has none of its calls.
        assert!(CallSet::parse("%ipc").unwrap().resolve(&t).is_ok());
    }

    #[test]
    fn malformed_sets_are_refused_before_any_kernel_is_known() {
        for bad in ["", "!", "/(", "re ad", "%bogus", "12x", "-1"] {
            assert!(CallSet::parse(bad).is_err(), "{bad:?}");
        }
        let many = vec!["read"; MAX_TOKENS + 1].join(",");
        assert!(CallSet::parse(&many).is_err());
    }

    #[test]
    fn status_sets() {
        let s = StatusSet::parse("failed,unfinished").unwrap();
        assert!(s.contains(CallStatus::Failed) && s.contains(CallStatus::Unfinished));
        assert!(!s.contains(CallStatus::Successful));
        let n = StatusSet::parse("!successful").unwrap();
        assert!(!n.contains(CallStatus::Successful) && n.contains(CallStatus::Failed));
        assert!(StatusSet::parse("all")
            .unwrap()
            .contains(CallStatus::Detached));
        assert!(!StatusSet::parse("none")
            .unwrap()
            .contains(CallStatus::Failed));
        for bad in ["", "ok", "failed,bogus", "!"] {
            assert!(StatusSet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signal_sets() {
        let s = SignalSet::parse("SIGCHLD,usr1,15").unwrap();
        assert!(s.contains(17) && s.contains(10) && s.contains(15));
        assert!(!s.contains(9));
        let n = SignalSet::parse("!chld").unwrap();
        assert!(!n.contains(17) && n.contains(2));
        assert!(!SignalSet::parse("none").unwrap().contains(17));
        assert!(SignalSet::parse("all").unwrap().contains(64));
        for bad in ["", "SIGBOGUS", "0", "65", "chld,"] {
            let r = SignalSet::parse(bad);
            if bad == "chld," {
                assert!(r.is_ok(), "a trailing comma is tolerated like strace's");
            } else {
                assert!(r.is_err(), "{bad:?}");
            }
        }
    }
}
