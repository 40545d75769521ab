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

use serde_json::Value;

/// Renders event records as strace's text.
#[derive(Debug, Default)]
pub struct TextRenderer {
    /// Threads seen and not yet exited: `[pid N]` once there are two.
    live: BTreeSet<i64>,
    /// The thread and call whose entry ends the output so far.
    open: Option<(i64, String)>,
    /// Calls left `<unfinished ...>`, by thread.
    unfinished: HashMap<i64, String>,
}

impl TextRenderer {
    /// The text for record `e` (complete lines end with `\n`; a call's
    /// entry does not).
    pub fn render(&mut self, e: &Value) -> String {
        let pid = e["pid"].as_i64().unwrap_or(0);
        self.live.insert(pid);
        let tag = if self.live.len() > 1 {
            format!("[pid {pid:>5}] ")
        } else {
            String::new()
        };
        let line = e["line"].as_str().unwrap_or_default();
        let syscall = e["syscall"].as_str();
        let mut out = String::new();
        match (e["phase"].as_str(), syscall) {
            (Some("entry"), Some(name)) => {
                out += &self.interrupt_open();
                out += &format!("{tag}{line}");
                self.open = Some((pid, name.to_string()));
            }
            (_, Some(name)) => {
                let rest = e["rest"].as_str();
                let this_open = self.open.as_ref() == Some(&(pid, name.to_string()));
                match rest {
                    Some(rest) if this_open => {
                        self.open = None;
                        out += &format!("{rest}\n");
                    }
                    _ => {
                        out += &self.interrupt_open();
                        match rest {
                            Some(rest)
                                if self.unfinished.get(&pid).map(String::as_str) == Some(name) =>
                            {
                                self.unfinished.remove(&pid);
                                out += &format!("{tag}<... {name} resumed>{rest}\n");
                            }
                            _ => out += &format!("{tag}{line}\n"),
                        }
                    }
                }
            }
            _ => {
                out += &self.interrupt_open();
                let text = match e["event"].as_str() {
                    Some("exit") => format!("+++ exited with {} +++", e["code"]),
                    Some("killed") => format!(
                        "+++ killed by {}{} +++",
                        e["signal"].as_str().unwrap_or("?"),
                        if e["core"] == true {
                            " (core dumped)"
                        } else {
                            ""
                        }
                    ),
                    _ => line.to_string(),
                };
                out += &format!("{tag}{text}\n");
            }
        }
        if matches!(e["event"].as_str(), Some("exit" | "killed")) {
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
    use serde_json::json;

    fn render(records: &[Value]) -> String {
        let mut r = TextRenderer::default();
        records.iter().map(|e| r.render(e)).collect()
    }

    #[test]
    fn a_call_alone_is_one_line() {
        let text = render(&[
            json!({"pid": 5, "syscall": "read", "phase": "entry", "line": "read(3, "}),
            json!({"pid": 5, "syscall": "read", "line": "read(3, \"x\", 9) = 1", "rest": "\"x\", 9) = 1"}),
            json!({"pid": 5, "event": "exit", "code": 0}),
        ]);
        assert_eq!(text, "read(3, \"x\", 9) = 1\n+++ exited with 0 +++\n");
    }

    #[test]
    fn an_interrupted_call_is_unfinished_then_resumed() {
        let text = render(&[
            json!({"pid": 5, "syscall": "getpid", "line": "getpid() = 5", "rest": ") = 5"}),
            json!({"pid": 6, "syscall": "getpid", "line": "getpid() = 6", "rest": ") = 6"}),
            json!({"pid": 5, "syscall": "wait4", "phase": "entry", "line": "wait4(-1, "}),
            json!({"pid": 6, "event": "exit", "code": 3}),
            json!({"pid": 5, "syscall": "wait4", "line": "wait4(-1, [...], 0, NULL) = 6", "rest": "[...], 0, NULL) = 6"}),
            json!({"pid": 5, "event": "killed", "signal": "SIGTERM"}),
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
            json!({"pid": 7, "syscall": "pause", "phase": "entry", "line": "pause("}),
            json!({"pid": 7, "line": "--- SIGUSR1 {si_signo=SIGUSR1} ---"}),
            json!({"pid": 7, "syscall": "pause", "line": "pause() = ? ERESTARTNOHAND", "rest": ") = ? ERESTARTNOHAND"}),
            json!({"pid": 7, "syscall": "read", "line": "<... read resumed>) = 0"}),
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
