//! Which call entries the sink publishes: only those strace's text shows
//! as `<unfinished ...>`.
//!
//! The engine emits a record at every call's entry (the start of its line,
//! shown at once) and another at its end (the whole line). A consumer that
//! renders text needs the entry only when some other line came in between;
//! otherwise the end's whole line prints the same text. So an entry is
//! held back until the next record: dropped if that record is its own
//! call's end (and a renderer given only that end prints the same bytes),
//! published before it otherwise. This halves the messages of a trace
//! without changing a byte of what `hvtrace events` prints, which the
//! tests check against the renderer itself.

use std::collections::HashMap;

use utrace::event::Tid;
use utrace::strace::record::Record;
use utrace::strace::Emitted;

/// Elides entry records; `T` is what travels with each (its time).
#[derive(Debug)]
pub struct Elider<T> {
    /// The last record, an entry, not published yet.
    held: Option<(Emitted, T)>,
    /// What a renderer of the published records has open: the entry that
    /// ends its output (mirrors `TextRenderer`).
    open: Option<(Tid, String)>,
    /// Calls such a renderer left `<unfinished ...>`, by thread.
    unfinished: HashMap<Tid, String>,
}

impl<T> Default for Elider<T> {
    fn default() -> Self {
        Self {
            held: None,
            open: None,
            unfinished: HashMap::new(),
        }
    }
}

impl<T> Elider<T> {
    /// Takes the next record; returns those to publish now, in order.
    pub fn push(&mut self, e: Emitted, extra: T) -> Vec<(Emitted, T)> {
        let mut out = Vec::with_capacity(2);
        if let Some((h, t)) = self.held.take() {
            if !self.elides(&h.record, &e.record) {
                self.publish(h, t, &mut out);
            }
        }
        if matches!(e.record, Record::Entry { .. }) {
            self.held = Some((e, extra));
        } else {
            self.publish(e, extra, &mut out);
        }
        out
    }

    /// The held entry, if any (at the end of a trace).
    pub fn flush(&mut self) -> Option<(Emitted, T)> {
        let (e, t) = self.held.take()?;
        self.track(&e.record);
        Some((e, t))
    }

    /// Whether `next`, right after entry `held`, makes it redundant.
    fn elides(&self, held: &Record, next: &Record) -> bool {
        let (Record::Entry { pid, syscall, .. }, Record::Call(c)) = (held, next) else {
            return false;
        };
        c.pid == *pid
            && c.syscall == *syscall
            && c.rest.is_some()
            && self.open.as_ref() != Some(&(*pid, syscall.clone()))
            && self.unfinished.get(pid) != Some(syscall)
    }

    fn publish(&mut self, e: Emitted, t: T, out: &mut Vec<(Emitted, T)>) {
        self.track(&e.record);
        out.push((e, t));
    }

    /// A renderer's state after rendering `r` (see `TextRenderer::render`).
    fn track(&mut self, r: &Record) {
        match r {
            Record::Entry { pid, syscall, .. } => {
                self.interrupt_open();
                self.open = Some((*pid, syscall.clone()));
            }
            Record::Call(c) => {
                let this_open = self
                    .open
                    .as_ref()
                    .is_some_and(|(p, n)| *p == c.pid && *n == c.syscall);
                if c.rest.is_some() && this_open {
                    self.open = None;
                } else {
                    self.interrupt_open();
                    if c.rest.is_some() && self.unfinished.get(&c.pid) == Some(&c.syscall) {
                        self.unfinished.remove(&c.pid);
                    }
                }
            }
            Record::Signal { .. } | Record::Exited { .. } | Record::Killed { .. } => {
                self.interrupt_open()
            }
        }
        if r.ends_thread() {
            self.unfinished.remove(&r.pid());
        }
    }

    fn interrupt_open(&mut self) {
        if let Some((pid, name)) = self.open.take() {
            self.unfinished.insert(pid, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use utrace::strace::record::CallEnd;
    use utrace::strace::text::TextRenderer;

    fn render(records: &[Record]) -> String {
        let mut r = TextRenderer::default();
        records.iter().map(|e| r.render(e)).collect()
    }

    fn elided(records: &[Record]) -> Vec<Record> {
        let mut el = Elider::default();
        let mut out = Vec::new();
        for r in records {
            let e = Emitted {
                record: r.clone(),
                tgid: r.pid(),
                args: None,
            };
            out.extend(el.push(e, ()).into_iter().map(|(e, _)| e.record));
        }
        out.extend(el.flush().map(|(e, _)| e.record));
        out
    }

    /// A small deterministic generator (no dependency for tests).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Random traces of three threads whose calls block, interleave, get
    /// signals, exit mid-call, and end with lines that do not start with
    /// their entry (`rest` None, as a rewritten execve): the elided
    /// stream renders byte for byte as the whole one.
    #[test]
    fn elided_streams_render_the_same_text() {
        let mut rng = Lcg(17);
        let names = ["read", "wait4", "execve"];
        let mut total = (0, 0);
        for _ in 0..2000 {
            let mut recs = Vec::new();
            let mut open: HashMap<Tid, &str> = HashMap::new();
            for _ in 0..rng.next(30) {
                let pid = 1 + rng.next(3) as Tid;
                match (open.get(&pid).copied(), rng.next(10)) {
                    (None, 0..=5) => {
                        let name = names[rng.next(3) as usize];
                        open.insert(pid, name);
                        recs.push(Record::Entry {
                            pid,
                            syscall: name.into(),
                            line: format!("{name}(3, "),
                        });
                    }
                    (Some(name), 0..=6) => {
                        open.remove(&pid);
                        let whole = rng.next(5) != 0;
                        recs.push(Record::Call(CallEnd {
                            pid,
                            syscall: name.into(),
                            nr: None,
                            line: format!("{name}(3, x) = 0"),
                            ret: Some(0),
                            errno: None,
                            error: None,
                            seconds: None,
                            rest: whole.then(|| "x) = 0".to_string()),
                            injected: false,
                            child: None,
                        }));
                    }
                    (_, 7 | 8) => recs.push(Record::Signal {
                        pid,
                        signal: "SIGUSR1".into(),
                        line: "--- SIGUSR1 ---".into(),
                        si_code: None,
                        si_pid: None,
                        handler: None,
                    }),
                    _ => {
                        open.remove(&pid);
                        recs.push(Record::Exited { pid, code: 0 });
                    }
                }
            }
            let short = elided(&recs);
            assert_eq!(
                render(&short),
                render(&recs),
                "{recs:#?}\nelided:\n{short:#?}"
            );
            total.0 += recs.len();
            total.1 += short.len();
        }
        // Many entries went: the test would pass vacuously if none did.
        assert!(total.0 - total.1 > 1000, "{total:?}");
    }

    #[test]
    fn a_lone_call_loses_its_entry_and_an_interrupted_one_keeps_it() {
        let entry = |pid| Record::Entry {
            pid,
            syscall: "read".into(),
            line: "read(0, ".into(),
        };
        let end = |pid| {
            Record::Call(CallEnd {
                pid,
                syscall: "read".into(),
                nr: Some(0),
                line: "read(0, \"\", 1) = 0".into(),
                ret: Some(0),
                errno: None,
                error: None,
                seconds: None,
                rest: Some("\"\", 1) = 0".into()),
                injected: false,
                child: None,
            })
        };
        assert_eq!(elided(&[entry(1), end(1)]), [end(1)]);
        let exit = Record::Exited { pid: 2, code: 0 };
        assert_eq!(
            elided(&[entry(1), exit.clone(), end(1)]),
            [entry(1), exit, end(1)]
        );
        // The entry still held at the end is published.
        assert_eq!(elided(&[entry(1)]), [entry(1)]);
    }
}
