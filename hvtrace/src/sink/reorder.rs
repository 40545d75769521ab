//! A consumer's side: one VM's messages back in sequence order.
//!
//! JetStream stores messages in the order they arrive. Around an outage a
//! VM's messages can arrive out of order: messages the client had queued
//! while the connection was down go out when it is back, before the
//! publisher has resent the older ones whose acknowledgment never came.
//! Every sequence number is there once (the message ids see to that), but
//! not necessarily in order; a consumer puts them back, holding early ones
//! until the missing ones come, and declares a gap only when one does not
//! come (too many held, too long a wait, or the end of what is read).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What comes out, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Out<T> {
    /// The next message.
    Item(u64, T),
    /// Messages `from..=to` never came.
    Gap(u64, u64),
    /// A message already given (a resend later than the duplicate window).
    Again(u64),
}

/// Holds one VM's early messages until their turn.
#[derive(Debug)]
pub struct Reorder<T> {
    /// The number due next (None until known: the first message is 1, or
    /// the smallest held once a gap is declared).
    next: Option<u64>,
    /// Messages held, with when they came.
    held: BTreeMap<u64, (T, Instant)>,
    /// Most messages held before the missing ones are given up.
    max: usize,
}

impl<T> Reorder<T> {
    /// Holding at most `max` messages.
    pub fn new(max: usize) -> Self {
        Self {
            next: None,
            held: BTreeMap::new(),
            max: max.max(1),
        }
    }

    /// Takes message `seq`; returns what can be given now.
    pub fn push(&mut self, seq: u64, item: T, now: Instant) -> Vec<Out<T>> {
        if self.next.is_some_and(|n| seq < n) || self.held.contains_key(&seq) {
            return vec![Out::Again(seq)];
        }
        if self.next.is_none() && seq == 1 {
            self.next = Some(1);
        }
        self.held.insert(seq, (item, now));
        let mut out = Vec::new();
        self.release(&mut out);
        while self.held.len() > self.max {
            self.skip(&mut out);
        }
        out
    }

    /// Gives up on missing messages when the oldest held one has waited
    /// `wait`.
    pub fn expire(&mut self, wait: Duration, now: Instant) -> Vec<Out<T>> {
        let mut out = Vec::new();
        while self
            .held
            .values()
            .map(|(_, t)| *t)
            .min()
            .is_some_and(|t| now.duration_since(t) >= wait)
        {
            self.skip(&mut out);
        }
        out
    }

    /// Everything held, in order, the missing declared.
    pub fn drain(&mut self) -> Vec<Out<T>> {
        let mut out = Vec::new();
        while !self.held.is_empty() {
            self.skip(&mut out);
        }
        out
    }

    /// Gives what is due.
    fn release(&mut self, out: &mut Vec<Out<T>>) {
        while let Some(n) = self.next {
            let Some((item, _)) = self.held.remove(&n) else {
                break;
            };
            out.push(Out::Item(n, item));
            self.next = Some(n + 1);
        }
    }

    /// Declares the numbers before the smallest held missing, and goes on
    /// from it.
    fn skip(&mut self, out: &mut Vec<Out<T>>) {
        let Some(&first) = self.held.keys().next() else {
            return;
        };
        if let Some(n) = self.next.filter(|n| *n < first) {
            out.push(Out::Gap(n, first - 1));
        }
        self.next = Some(first);
        self.release(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(out: &[Out<()>]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Out::Item(s, ()) => s.to_string(),
                Out::Gap(a, b) => format!("gap {a}-{b}"),
                Out::Again(s) => format!("again {s}"),
            })
            .collect()
    }

    #[test]
    fn late_messages_are_put_back_in_order() {
        let now = Instant::now();
        let mut r = Reorder::new(100);
        let mut out = Vec::new();
        // As around an outage: 1-3 stored, 7-9 flushed on reconnect, then
        // 4-9 resent (7-9 dropped by the server, or seen again here).
        for s in [1, 2, 3, 7, 8, 9, 4, 5, 6, 8] {
            out.extend(r.push(s, (), now));
        }
        out.extend(r.drain());
        assert_eq!(
            seqs(&out),
            ["1", "2", "3", "4", "5", "6", "7", "8", "9", "again 8"]
        );
    }

    #[test]
    fn a_message_that_never_comes_is_a_gap_once_given_up() {
        let t0 = Instant::now();
        let mut r = Reorder::new(3);
        let mut out = r.push(1, (), t0);
        out.extend(r.push(3, (), t0));
        assert_eq!(seqs(&out), ["1"], "3 waits for 2");
        out.extend(r.expire(Duration::from_secs(2), t0 + Duration::from_secs(1)));
        assert_eq!(seqs(&out), ["1"]);
        out.extend(r.expire(Duration::from_secs(2), t0 + Duration::from_secs(2)));
        assert_eq!(seqs(&out), ["1", "gap 2-2", "3"]);
        // Too many held: the gap is declared at once.
        for s in [6, 7, 8, 9] {
            out.extend(r.push(s, (), t0));
        }
        assert_eq!(seqs(&out)[3..], ["gap 4-5", "6", "7", "8", "9"]);
        // A stream whose start retention removed: from its first message.
        let mut r = Reorder::new(10);
        let mut out = r.push(41, (), t0);
        out.extend(r.push(40, (), t0));
        out.extend(r.drain());
        assert_eq!(seqs(&out), ["40", "41"]);
    }
}
