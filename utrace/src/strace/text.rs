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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::record::{CallEnd, Record};
use crate::event::Tid;

/// strace's `-t`, `-tt`, `-ttt` and `-r`: the time that starts each line
/// (after its `[pid N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// `-t`: local time of day, `12:34:56 `.
    Time,
    /// `-tt`: with microseconds, `12:34:56.123456 `.
    Micros,
    /// `-ttt`: seconds since the epoch, `1764800000.123456 `.
    Epoch,
    /// `-r`: seconds since the previous line started, `     0.000123 `.
    Relative,
}

/// Renders event records as strace's text.
#[derive(Debug, Default)]
pub struct TextRenderer {
    /// The time stamp each line starts with, and the local time's offset
    /// from UTC in seconds (for `-t` and `-tt`).
    stamp: Option<(Stamp, i64)>,
    /// When the previous line started (for `-r`).
    last_line: Option<SystemTime>,
    /// Threads seen and not yet exited: `[pid N]` once there are two.
    live: BTreeSet<Tid>,
    /// The thread and call whose entry ends the output so far.
    open: Option<(Tid, String)>,
    /// Calls left `<unfinished ...>`, by thread.
    unfinished: HashMap<Tid, String>,
    /// `-qq`: no `+++ exited with N +++` lines.
    quiet_exits: bool,
    /// The output holds one thread's lines (`-ff`): never a thread id.
    one_thread: bool,
}

impl TextRenderer {
    /// A renderer starting each line with `stamp` if given, with the local
    /// time's offset from UTC in seconds.
    pub fn new(stamp: Option<(Stamp, i64)>) -> Self {
        Self {
            stamp,
            ..Self::default()
        }
    }

    /// The text for record `r` (complete lines end with `\n`; a call's
    /// entry does not), stamped with the time now.
    pub fn render(&mut self, r: &Record) -> String {
        self.render_at(r, SystemTime::now())
    }

    /// The same renderer without `+++ exited with N +++` lines (strace's
    /// `-qq`; `+++ killed by ... +++` stays, as there).
    pub fn with_quiet_exits(mut self, quiet: bool) -> Self {
        self.quiet_exits = quiet;
        self
    }

    /// The same renderer for an output that holds one thread's lines
    /// (`-ff -o PREFIX`): no thread ids, whatever else is traced.
    pub fn with_one_thread(mut self, one: bool) -> Self {
        self.one_thread = one;
        self
    }

    /// Counts `tids` among the threads traced before any of them prints a
    /// line (the threads of a process attached to), so lines carry
    /// `[pid N]` from the start when there are several, as strace's do.
    pub fn note_threads(&mut self, tids: impl IntoIterator<Item = Tid>) {
        self.live.extend(tids);
    }

    /// [`TextRenderer::render`] as of time `now`.
    pub fn render_at(&mut self, r: &Record, now: SystemTime) -> String {
        let pid = r.pid();
        if self.quiet_exits && matches!(r, Record::Exited { .. }) {
            self.live.remove(&pid);
            self.unfinished.remove(&pid);
            return String::new();
        }
        self.live.insert(pid);
        // Whether `r` is the end of the call whose entry ends the output.
        let this_open = matches!(r, Record::Call(c)
            if self.open.as_ref().is_some_and(|(p, n)| *p == pid && *n == c.syscall));
        // Only a record that starts a line takes a time stamp: a call's
        // end completing its own open entry line does not.
        let completes_open = this_open && matches!(r, Record::Call(c) if c.rest.is_some());
        let stamp = if completes_open {
            String::new()
        } else {
            self.stamp(now)
        };
        let tag = if self.one_thread {
            stamp
        } else if self.live.len() > 1 {
            format!("[pid {pid:>5}] {stamp}")
        } else {
            stamp
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
        // A followed clone's new thread counts from its parent's clone
        // (strace's `[pid N]` starts there, before the child prints).
        if let Record::Call(CallEnd {
            child: Some(child), ..
        }) = r
        {
            self.live.insert(*child);
        }
        out
    }

    /// The time stamp of a line starting at `now` (empty without one).
    fn stamp(&mut self, now: SystemTime) -> String {
        let Some((kind, offset)) = self.stamp else {
            return String::new();
        };
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, micros) = (since_epoch.as_secs() as i64, since_epoch.subsec_micros());
        let day = (secs + offset).rem_euclid(86_400);
        let hms = format!("{:02}:{:02}:{:02}", day / 3600, day / 60 % 60, day % 60);
        match kind {
            Stamp::Time => format!("{hms} "),
            Stamp::Micros => format!("{hms}.{micros:06} "),
            Stamp::Epoch => format!("{secs}.{micros:06} "),
            Stamp::Relative => {
                let since = self.last_line.replace(now).map_or(Duration::ZERO, |l| {
                    now.duration_since(l).unwrap_or_default()
                });
                format!("{:6}.{:06} ", since.as_secs(), since.subsec_micros())
            }
        }
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
            child: None,
        })
    }

    #[test]
    fn qq_drops_exit_lines_and_keeps_the_prefixes_right() {
        let sig = |pid| Record::Signal {
            pid,
            signal: "SIGCHLD".into(),
            line: "--- SIGCHLD ---".into(),
            si_code: None,
            si_pid: None,
            handler: None,
        };
        let mut r = TextRenderer::new(None).with_quiet_exits(true);
        let text: String = [sig(5), sig(6), Record::Exited { pid: 6, code: 0 }, sig(5)]
            .iter()
            .map(|rec| r.render_at(rec, UNIX_EPOCH))
            .collect();
        assert_eq!(
            text, "--- SIGCHLD ---\n[pid     6] --- SIGCHLD ---\n--- SIGCHLD ---\n",
            "no exit line, and one thread left: no prefix"
        );
        let killed = Record::Killed {
            pid: 5,
            signal: "SIGKILL".into(),
            core: false,
        };
        assert_eq!(
            r.render_at(&killed, UNIX_EPOCH),
            "+++ killed by SIGKILL +++\n"
        );
    }

    #[test]
    fn time_stamps_start_each_line_after_the_pid() {
        let at = |s: u64, us: u64| UNIX_EPOCH + Duration::from_micros(s * 1_000_000 + us);
        // 1764806400 is 2025-12-04 00:00:00 UTC.
        let t0 = 1_764_806_400 + 3600 * 13 + 60 * 5 + 7;
        let mut r = TextRenderer::new(Some((Stamp::Micros, 3600)));
        let mut text = r.render_at(&entry(5, "read", "read(3, "), at(t0, 42));
        text += &r.render_at(
            &end(5, "read", "read(3, \"\", 1) = 0", Some("\"\", 1) = 0")),
            at(t0, 99),
        );
        text += &r.render_at(&Record::Exited { pid: 6, code: 0 }, at(t0 + 1, 7));
        assert_eq!(
            text,
            "14:05:07.000042 read(3, \"\", 1) = 0\n[pid     6] 14:05:08.000007 +++ exited with 0 +++\n"
        );
        let mut r = TextRenderer::new(Some((Stamp::Time, 0)));
        assert_eq!(
            r.render_at(&Record::Exited { pid: 5, code: 0 }, at(t0, 500_000)),
            "13:05:07 +++ exited with 0 +++\n"
        );
        let mut r = TextRenderer::new(Some((Stamp::Epoch, 3600)));
        assert!(r
            .render_at(&Record::Exited { pid: 5, code: 0 }, at(t0, 5))
            .starts_with(&format!("{t0}.000005 +++")));
        let mut r = TextRenderer::new(Some((Stamp::Relative, 0)));
        let a = r.render_at(&Record::Exited { pid: 5, code: 0 }, at(t0, 0));
        let b = r.render_at(&Record::Exited { pid: 5, code: 0 }, at(t0 + 2, 250));
        assert_eq!(
            (a.as_str(), b.as_str()),
            (
                "     0.000000 +++ exited with 0 +++\n",
                "     2.000250 +++ exited with 0 +++\n"
            )
        );
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

    /// A followed clone-family call's end: `ret`, naming `child` if any.
    fn returning(
        pid: Tid,
        syscall: &str,
        line: &str,
        rest: &str,
        ret: i64,
        child: Option<Tid>,
    ) -> Record {
        let Record::Call(c) = end(pid, syscall, line, Some(rest)) else {
            unreachable!()
        };
        Record::Call(CallEnd {
            ret: Some(ret),
            child,
            ..c
        })
    }

    /// The clone of a `sh -c '/bin/true; echo hi'` under the guest's
    /// `strace -f` (written to stderr): the clone's own line is unprefixed,
    /// every line after it has `[pid N]`, the parent's next call included,
    /// even before the child has printed anything.
    #[test]
    fn a_followed_clone_starts_the_prefixes() {
        let records = [
            entry(41, "clone", "clone(child_stack=NULL, "),
            returning(
                41,
                "clone",
                "clone(child_stack=NULL, ...) = 42",
                "...) = 42",
                42,
                Some(42),
            ),
            entry(41, "wait4", "wait4(-1, "),
            end(
                42,
                "set_robust_list",
                "set_robust_list(0x1, 24) = 0",
                Some("0x1, 24) = 0"),
            ),
        ];
        let mut r = TextRenderer::default();
        let text: String = records.iter().map(|e| r.render(e)).collect();
        assert_eq!(
            text,
            "clone(child_stack=NULL, ...) = 42\n\
             [pid    41] wait4(-1,  <unfinished ...>\n\
             [pid    42] set_robust_list(0x1, 24) = 0\n"
        );
        // Without -f the child is not traced (the record names none): no
        // prefix for the parent.
        let mut r = TextRenderer::default();
        let unfollowed = returning(41, "clone", "clone(...) = 42", "...) = 42", 42, None);
        let text: String = [unfollowed, entry(41, "wait4", "wait4(-1, ")]
            .iter()
            .map(|e| r.render(e))
            .collect();
        assert_eq!(text, "clone(...) = 42\nwait4(-1, ");
        // One thread's own file (-ff): never a thread id.
        let mut r = TextRenderer::default().with_one_thread(true);
        let text: String = records.iter().map(|e| r.render(e)).collect();
        assert!(!text.contains("[pid"), "{text}");
    }
}
