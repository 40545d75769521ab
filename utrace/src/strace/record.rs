//! The strace engine's output, one typed record per event: what `--json`
//! prints (one object per line, the form the control socket streams to
//! `hvtrace attach`), and what [`super::text::TextRenderer`] turns into
//! strace's text. Both directions of the JSON form live here, so the
//! renderer reads fields by type, never by string key.

use serde_json::{json, Value};

use crate::event::Tid;

/// One event as the strace engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A call's entry: the start of its line, with the arguments known at
    /// entry (`read(3, `).
    Entry {
        /// Thread id.
        pid: Tid,
        /// Call name.
        syscall: String,
        /// The line so far.
        line: String,
    },
    /// A call's end: the whole line, and what followed the entry's text.
    Call(CallEnd),
    /// A signal delivered to a handler or killing by its default action.
    Signal {
        /// Thread id.
        pid: Tid,
        /// Signal name (`SIGUSR1`).
        signal: String,
        /// `--- SIGUSR1 {si_signo=SIGUSR1, ...} ---`.
        line: String,
        /// `si_code`, when the siginfo was read.
        si_code: Option<i32>,
        /// `si_pid`, when the siginfo was read.
        si_pid: Option<i32>,
        /// The handler's address (0: default action), when known.
        handler: Option<u64>,
    },
    /// The thread exited with `code`.
    Exited {
        /// Thread id.
        pid: Tid,
        /// Exit status (0-255).
        code: i32,
    },
    /// The thread was killed by a signal.
    Killed {
        /// Thread id.
        pid: Tid,
        /// Signal name.
        signal: String,
        /// Whether it dumped core.
        core: bool,
    },
}

/// The end of a call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEnd {
    /// Thread id.
    pub pid: Tid,
    /// Call name.
    pub syscall: String,
    /// Call number, when the call was seen whole.
    pub nr: Option<u64>,
    /// The whole line (`read(3, "x", 9) = 1`, or `<... read resumed>) = 0`
    /// for a call whose entry was not seen).
    pub line: String,
    /// Return value; None for a call that never returned (its thread
    /// exited in it: `= ?`).
    pub ret: Option<i64>,
    /// The error number of a failed call.
    pub errno: Option<i64>,
    /// Its name (`ENOENT`), when known.
    pub error: Option<String>,
    /// Time spent in the call, when its entry was seen.
    pub seconds: Option<f64>,
    /// What follows the entry record's line, for a renderer that printed
    /// that entry (absent unless entry records are produced).
    pub rest: Option<String>,
    /// The call was tampered with (`-e inject=`): not run, its result
    /// chosen by the tracer.
    pub injected: bool,
    /// The thread a clone, fork or vfork created, when the trace follows
    /// it (`-f`): a text renderer counts it from here (`[pid N]`), as
    /// strace does.
    pub child: Option<Tid>,
}

impl Record {
    /// The thread it is about.
    pub fn pid(&self) -> Tid {
        match self {
            Record::Entry { pid, .. }
            | Record::Signal { pid, .. }
            | Record::Exited { pid, .. }
            | Record::Killed { pid, .. } => *pid,
            Record::Call(c) => c.pid,
        }
    }

    /// Whether it ends its thread (`+++ exited` / `+++ killed`).
    pub fn ends_thread(&self) -> bool {
        matches!(self, Record::Exited { .. } | Record::Killed { .. })
    }

    /// Its JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Record::Entry { pid, syscall, line } => {
                json!({"pid": pid, "syscall": syscall, "phase": "entry", "line": line})
            }
            Record::Call(c) => {
                let mut v = json!({
                    "pid": c.pid, "syscall": c.syscall, "line": c.line, "ret": c.ret,
                    "errno": c.errno, "error": c.error,
                });
                if let Some(nr) = c.nr {
                    v["nr"] = nr.into();
                }
                if let Some(s) = c.seconds {
                    v["seconds"] = s.into();
                }
                if let Some(rest) = &c.rest {
                    v["rest"] = rest.as_str().into();
                }
                if c.injected {
                    v["injected"] = true.into();
                }
                if let Some(child) = c.child {
                    v["child"] = child.into();
                }
                v
            }
            Record::Signal {
                pid,
                signal,
                line,
                si_code,
                si_pid,
                handler,
            } => json!({
                "pid": pid, "event": "signal", "signal": signal, "line": line,
                "si_code": si_code, "si_pid": si_pid,
                "handler": handler.map(|h| format!("{h:#x}")),
            }),
            Record::Exited { pid, code } => json!({"pid": pid, "event": "exit", "code": code}),
            Record::Killed { pid, signal, core } => {
                json!({"pid": pid, "event": "killed", "signal": signal, "core": core})
            }
        }
    }

    /// The record whose JSON form is `v` (as received from the control
    /// socket: untrusted, so None for anything malformed).
    pub fn from_json(v: &Value) -> Option<Record> {
        let pid = Tid::try_from(v["pid"].as_i64()?).ok().filter(|p| *p > 0)?;
        let text = |k: &str| v[k].as_str().map(str::to_string);
        let int = |k: &str| v[k].as_i64().and_then(|n| i32::try_from(n).ok());
        if let Some(kind) = v["event"].as_str() {
            return match kind {
                "signal" => Some(Record::Signal {
                    pid,
                    signal: text("signal")?,
                    line: text("line")?,
                    si_code: int("si_code"),
                    si_pid: int("si_pid"),
                    handler: v["handler"]
                        .as_str()
                        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok()),
                }),
                "exit" => Some(Record::Exited {
                    pid,
                    code: int("code")?,
                }),
                "killed" => Some(Record::Killed {
                    pid,
                    signal: text("signal")?,
                    core: v["core"].as_bool().unwrap_or(false),
                }),
                _ => None,
            };
        }
        let syscall = text("syscall")?;
        let line = text("line")?;
        if v["phase"].as_str() == Some("entry") {
            return Some(Record::Entry { pid, syscall, line });
        }
        Some(Record::Call(CallEnd {
            pid,
            syscall,
            nr: v["nr"].as_u64(),
            line,
            ret: v["ret"].as_i64(),
            errno: v["errno"].as_i64(),
            error: text("error"),
            seconds: v["seconds"].as_f64(),
            rest: text("rest"),
            injected: v["injected"].as_bool().unwrap_or(false),
            child: int("child").filter(|c| *c > 0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_survives_its_json_form() {
        let records = [
            Record::Entry {
                pid: 5,
                syscall: "read".into(),
                line: "read(3, ".into(),
            },
            Record::Call(CallEnd {
                pid: 5,
                syscall: "openat".into(),
                nr: Some(257),
                line: "openat(AT_FDCWD, \"/x\", O_RDONLY) = -1 ENOENT (No such file or directory)"
                    .into(),
                ret: Some(-2),
                errno: Some(2),
                error: Some("ENOENT".into()),
                seconds: Some(0.25),
                rest: Some("\"/x\", O_RDONLY) = -1 ENOENT (No such file or directory)".into()),
                injected: true,
                child: None,
            }),
            Record::Call(CallEnd {
                pid: 6,
                syscall: "pause".into(),
                nr: None,
                line: "pause() = ?".into(),
                ret: None,
                errno: None,
                error: None,
                seconds: None,
                rest: None,
                injected: false,
                child: None,
            }),
            Record::Signal {
                pid: 7,
                signal: "SIGUSR1".into(),
                line: "--- SIGUSR1 {si_signo=SIGUSR1, si_code=SI_USER, si_pid=1, si_uid=0} ---"
                    .into(),
                si_code: Some(0),
                si_pid: Some(1),
                handler: Some(0x401000),
            },
            Record::Exited { pid: 8, code: 3 },
            Record::Killed {
                pid: 9,
                signal: "SIGSEGV".into(),
                core: true,
            },
        ];
        for r in records {
            assert_eq!(Record::from_json(&r.to_json()), Some(r.clone()), "{r:?}");
        }
    }

    #[test]
    fn malformed_records_are_refused() {
        for bad in [
            json!({}),
            json!({"pid": "5", "syscall": "read", "line": "x"}),
            json!({"pid": -1, "syscall": "read", "line": "x"}),
            json!({"pid": 5, "event": "exit"}),
            json!({"pid": 5, "event": "exit", "code": 1u64 << 40}),
            json!({"pid": 5, "event": "teleported"}),
            json!({"pid": 5, "line": "no call name"}),
        ] {
            assert_eq!(Record::from_json(&bad), None, "{bad}");
        }
    }
}
