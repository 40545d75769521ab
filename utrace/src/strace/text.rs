//! strace's text from the engine's event records: one place for the
//! `[pid N]` prefixes, the `+++ exited with N +++` lines and the split of a
//! call whose line another line interrupts, used by `hvtrace trace` (the
//! engine writing text itself) and by `hvtrace attach` (records received
//! over the control socket).
//!
//! A call's entry record prints its name and the arguments known at entry
//! at once, without a newline (so a thread blocked in `read(0, ` shows it
//! while it waits); its exit record completes the line. If any other line
//! comes in between, the open line is ended with ` <unfinished ...>` and
//! the exit prints `<... read resumed>"...", 4096) = 14`, as strace does.

use std::collections::{BTreeSet, HashMap};

use super::record::Record;
use crate::event::Tid;

/// Renders event records as strace's text.
#[derive(Debug, Default)]
pub struct TextRenderer {
    /// Threads seen and not yet exited: `[pid N]` once there are two.
    live: BTreeSet<Tid>,
    /// The thread and call whose entry ends the output so far.
    open: Option<(Tid, String)>,
    /// Calls left `<unfinished ...>`, by thread.
    unfinished: HashMap<Tid, String>,
}

impl TextRenderer {
    /// The text for record `r` (complete lines end with `\n`; a call's
    /// entry does not).
    pub fn render(&mut self, r: &Record) -> String {
        let pid = r.pid();
        self.live.insert(pid);
        let tag = if self.live.len() > 1 {
            format!("[pid {pid:>5}] ")
        } else {
            String::new()
        };
        let mut out = String::new();
        match r {
            Record::Entry { syscall, line, .. } => {
                out += &self.interrupt_open();
                out += &format!("{tag}{line}");
                self.open = Some((pid, syscall.clone()));
            }
            Record::Call(c) => {
                let name = &c.syscall;
                let this_open = self
                    .open
                    .as_ref()
                    .is_some_and(|(p, n)| *p == pid && n == name);
                match &c.rest {
                    Some(rest) if this_open => {
                        self.open = None;
                        out += &format!("{rest}\n");
                    }
                    rest => {
                        out += &self.interrupt_open();
                        let resumed =
                            rest.is_some() && self.unfinished.get(&pid).is_some_and(|n| n == name);
                        match rest {
                            Some(rest) if resumed => {
                                self.unfinished.remove(&pid);
                                out += &format!("{tag}<... {name} resumed>{rest}\n");
                            }
                            _ => out += &format!("{tag}{}\n", c.line),
                        }
                    }
                }
            }
            Record::Signal { line, .. } => {
                out += &self.interrupt_open();
                out += &format!("{tag}{line}\n");
            }
            Record::Exited { code, .. } => {
                out += &self.interrupt_open();
                out += &format!("{tag}+++ exited with {code} +++\n");
            }
            Record::Killed { signal, core, .. } => {
                out += &self.interrupt_open();
                let dumped = if *core { " (core dumped)" } else { "" };
                out += &format!("{tag}+++ killed by {signal}{dumped} +++\n");
            }
        }
        if r.ends_thread() {
            self.live.remove(&pid);
            self.unfinished.remove(&pid);
        }
        out
    }

    /// Ends an open entry line with strace's marker.
    fn interrupt_open(&mut self) -> String {
        match self.open.take() {
            Some((pid, name)) => {
                self.unfinished.insert(pid, name);
                " <unfinished ...>\n".to_string()
            }
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strace::record::CallEnd;

    fn render(records: &[Record]) -> String {
        let mut r = TextRenderer::default();
        records.iter().map(|e| r.render(e)).collect()
    }

    fn entry(pid: Tid, syscall: &str, line: &str) -> Record {
        Record::Entry {
            pid,
            syscall: syscall.into(),
            line: line.into(),
        }
    }

    fn end(pid: Tid, syscall: &str, line: &str, rest: Option<&str>) -> Record {
        Record::Call(CallEnd {
            pid,
            syscall: syscall.into(),
            nr: None,
            line: line.into(),
            ret: Some(0),
            errno: None,
            error: None,
            seconds: None,
            rest: rest.map(str::to_string),
            injected: false,
        })
    }

    #[test]
    fn a_call_alone_is_one_line() {
        let text = render(&[
            entry(5, "read", "read(3, "),
            end(5, "read", "read(3, \"x\", 9) = 1", Some("\"x\", 9) = 1")),
            Record::Exited { pid: 5, code: 0 },
        ]);
        assert_eq!(text, "read(3, \"x\", 9) = 1\n+++ exited with 0 +++\n");
    }

    #[test]
    fn an_interrupted_call_is_unfinished_then_resumed() {
        let text = render(&[
            end(5, "getpid", "getpid() = 5", Some(") = 5")),
            end(6, "getpid", "getpid() = 6", Some(") = 6")),
            entry(5, "wait4", "wait4(-1, "),
            Record::Exited { pid: 6, code: 3 },
            end(
                5,
                "wait4",
                "wait4(-1, [...], 0, NULL) = 6",
                Some("[...], 0, NULL) = 6"),
            ),
            Record::Killed {
                pid: 5,
                signal: "SIGTERM".into(),
                core: false,
            },
        ]);
        assert_eq!(
            text,
            "getpid() = 5\n\
             [pid     6] getpid() = 6\n\
             [pid     5] wait4(-1,  <unfinished ...>\n\
             [pid     6] +++ exited with 3 +++\n\
             <... wait4 resumed>[...], 0, NULL) = 6\n\
             +++ killed by SIGTERM +++\n"
        );
    }

    #[test]
    fn a_signal_line_interrupts_and_an_unseen_entry_prints_whole() {
        let text = render(&[
            entry(7, "pause", "pause("),
            Record::Signal {
                pid: 7,
                signal: "SIGUSR1".into(),
                line: "--- SIGUSR1 {si_signo=SIGUSR1} ---".into(),
                si_code: None,
                si_pid: None,
                handler: None,
            },
            end(
                7,
                "pause",
                "pause() = ? ERESTARTNOHAND",
                Some(") = ? ERESTARTNOHAND"),
            ),
            end(7, "read", "<... read resumed>) = 0", None),
        ]);
        assert_eq!(
            text,
            "pause( <unfinished ...>\n\
             --- SIGUSR1 {si_signo=SIGUSR1} ---\n\
             <... pause resumed>) = ? ERESTARTNOHAND\n\
             <... read resumed>) = 0\n"
        );
    }
}
