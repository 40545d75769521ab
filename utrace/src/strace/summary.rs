//! strace's `-c`: a count of calls, errors and time per system call,
//! printed as strace prints it when the trace ends.
//!
//! The time of a call is the wall-clock time between its entry and exit
//! reports as the host saw them (strace's `-w`), not the system time the
//! guest kernel charged: the tracer does not read the guest's CPU
//! accounting. Calls whose entry was not seen (attached mid-call) count
//! with no time; calls that never returned (`exit_group`) do not count.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::record::Record;
use super::{Emitted, RecordObserver};

/// `-S`: the order of the table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    /// Most time first (strace's default).
    #[default]
    Time,
    /// Most calls first.
    Calls,
    /// Most errors first.
    Errors,
    /// By name.
    Name,
    /// In the order first seen.
    Nothing,
}

impl std::str::FromStr for SortBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "time" | "time_total" | "total_time" => SortBy::Time,
            "calls" | "count" => SortBy::Calls,
            "errors" | "error" => SortBy::Errors,
            "name" | "syscall" | "syscall_name" => SortBy::Name,
            "nothing" | "none" => SortBy::Nothing,
            _ => {
                return Err(format!(
                    "-S {s}: sort by time, calls, errors, name or nothing"
                ))
            }
        })
    }
}

#[derive(Debug, Default, Clone)]
struct Row {
    calls: u64,
    errors: u64,
    seconds: f64,
    first_seen: usize,
}

/// Collects the counts; a [`RecordObserver`] of the strace engine.
#[derive(Debug, Default)]
pub struct Summary {
    rows: Mutex<HashMap<String, Row>>,
}

impl RecordObserver for Summary {
    fn observe(&self, emitted: Emitted) {
        // A call that never returned (`exit_group`, a thread killed in
        // it) is not counted, as strace counts calls at their exit.
        let Record::Call(c) = emitted.record else {
            return;
        };
        if c.ret.is_none() {
            return;
        }
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let n = rows.len();
        let row = rows.entry(c.syscall).or_insert_with(|| Row {
            first_seen: n,
            ..Row::default()
        });
        row.calls += 1;
        if c.errno.is_some() {
            row.errors += 1;
        }
        row.seconds += c.seconds.unwrap_or(0.0);
    }
}

impl Summary {
    /// The table, as `strace -c` prints it.
    pub fn render(&self, sort: SortBy) -> String {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(&String, &Row)> = rows.iter().collect();
        match sort {
            SortBy::Time => {
                rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(b.0)))
            }
            SortBy::Calls => rows.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then(a.0.cmp(b.0))),
            SortBy::Errors => rows.sort_by(|a, b| b.1.errors.cmp(&a.1.errors).then(a.0.cmp(b.0))),
            SortBy::Name => rows.sort_by(|a, b| a.0.cmp(b.0)),
            SortBy::Nothing => rows.sort_by_key(|r| r.1.first_seen),
        }
        let total_s: f64 = rows.iter().map(|r| r.1.seconds).sum();
        let total_calls: u64 = rows.iter().map(|r| r.1.calls).sum();
        let total_errors: u64 = rows.iter().map(|r| r.1.errors).sum();
        let rule = "------ ----------- ----------- --------- --------- ----------------\n";
        let mut out = String::from("% time     seconds  usecs/call     calls    errors syscall\n");
        out += rule;
        let line = |out: &mut String, pct: f64, s: f64, calls: u64, errors: u64, name: &str| {
            let per_call = if calls > 0 {
                (s * 1e6 / calls as f64) as u64
            } else {
                0
            };
            let errors = if errors > 0 {
                errors.to_string()
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{pct:6.2} {s:11.6} {per_call:11} {calls:9} {errors:>9} {name}"
            );
        };
        for (name, r) in &rows {
            let pct = if total_s > 0.0 {
                100.0 * r.seconds / total_s
            } else {
                0.0
            };
            line(&mut out, pct, r.seconds, r.calls, r.errors, name);
        }
        out += rule;
        line(&mut out, 100.0, total_s, total_calls, total_errors, "total");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strace::record::CallEnd;

    fn call(name: &str, errno: Option<i64>, seconds: f64) -> Emitted {
        Emitted {
            record: Record::Call(CallEnd {
                pid: 7,
                syscall: name.into(),
                nr: None,
                line: String::new(),
                ret: Some(0),
                errno,
                error: None,
                seconds: Some(seconds),
                rest: None,
                injected: false,
                child: None,
            }),
            tgid: 7,
            args: None,
        }
    }

    #[test]
    fn the_table_is_straces() {
        let s = Summary::default();
        s.observe(call("read", None, 0.000_010));
        s.observe(call("openat", Some(2), 0.000_030));
        s.observe(call("read", None, 0.000_010));
        assert_eq!(
            s.render(SortBy::Time),
            "% time     seconds  usecs/call     calls    errors syscall\n\
             ------ ----------- ----------- --------- --------- ----------------\n \
             60.00    0.000030          30         1         1 openat\n \
             40.00    0.000020          10         2           read\n\
             ------ ----------- ----------- --------- --------- ----------------\n\
             100.00    0.000050          16         3         1 total\n"
        );
        let by_calls = s.render(SortBy::Calls);
        let names: Vec<&str> = by_calls
            .lines()
            .skip(2)
            .take(2)
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(names, ["read", "openat"]);
        assert_eq!("calls".parse::<SortBy>(), Ok(SortBy::Calls));
        assert!("bogus".parse::<SortBy>().is_err());
    }
}
