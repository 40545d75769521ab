//! The messages waiting to be published, oldest first: those sent but
//! not acknowledged when the connection failed (to resend), then the
//! spill file, then the newest in memory. Memory holds up to `queue`
//! messages; past that the oldest in memory move to the spill file, so
//! the order is kept. When the spill file is full too, new events are
//! refused (the caller counts them as dropped).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use super::spill::Spill;

/// One message: its sequence number, subject and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Per-VM sequence number (from 1).
    pub seq: u64,
    /// Subject it is published on.
    pub subject: String,
    /// JSON body.
    pub body: Vec<u8>,
}

/// The publish queue.
#[derive(Debug)]
pub struct Queue {
    resend: VecDeque<Msg>,
    spill: Spill,
    mem: VecDeque<Msg>,
    mem_cap: usize,
    spill_max: u64,
    next_seq: u64,
    /// Messages written to the spill file, ever.
    pub spilled: u64,
    /// Set once no more messages come.
    pub closed: bool,
    /// When it was closed.
    pub closed_at: Option<std::time::Instant>,
}

impl Queue {
    /// A queue holding `mem_cap` messages in memory and `spill_max` bytes
    /// in a spill file at `spill_path`.
    pub fn new(mem_cap: usize, spill_max: u64, spill_path: PathBuf) -> Self {
        Self {
            resend: VecDeque::new(),
            spill: Spill::new(spill_path),
            mem: VecDeque::new(),
            mem_cap: mem_cap.max(1),
            spill_max,
            next_seq: 1,
            spilled: 0,
            closed: false,
            closed_at: None,
        }
    }

    /// Queues the message `make` builds for the next sequence number, if
    /// there is room (or `force`); whether it was queued.
    pub fn offer(&mut self, force: bool, make: impl FnOnce(u64) -> (String, Vec<u8>)) -> bool {
        let room = self.mem.len() < self.mem_cap || self.spill.bytes() < self.spill_max;
        if !room && !force {
            return false;
        }
        let seq = self.next_seq;
        let (subject, body) = make(seq);
        self.next_seq += 1;
        self.mem.push_back(Msg { seq, subject, body });
        if self.mem.len() > self.mem_cap {
            let oldest = self.mem.pop_front().expect("longer than its cap");
            if let Err(e) = self.spill.push(&oldest) {
                // A spill file that cannot be written: keep it in memory.
                log::warn!("sink: cannot write {}: {e}", self.spill.path().display());
                self.mem.push_front(oldest);
            } else {
                self.spilled += 1;
            }
        }
        true
    }

    /// Takes the oldest message.
    pub fn pop(&mut self) -> Option<Msg> {
        if let Some(m) = self.resend.pop_front() {
            return Some(m);
        }
        if !self.spill.is_empty() {
            match self.spill.pop() {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => log::warn!("sink: {}: {e}", self.spill.path().display()),
            }
        }
        self.mem.pop_front()
    }

    /// Puts `msgs` (taken in this order, older than all still queued)
    /// back at the front.
    pub fn requeue(&mut self, msgs: impl DoubleEndedIterator<Item = Msg>) {
        for m in msgs.rev() {
            self.resend.push_front(m);
        }
    }

    /// Marks that no more messages come.
    pub fn close(&mut self) {
        self.closed = true;
        self.closed_at.get_or_insert_with(std::time::Instant::now);
    }

    /// Messages waiting.
    pub fn len(&self) -> u64 {
        self.resend.len() as u64 + self.spill.len() + self.mem.len() as u64
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes every waiting message to the spill file (in order) and
    /// returns its path and their count; removes the file when none
    /// waits.
    pub fn persist(&mut self) -> io::Result<Option<(PathBuf, u64)>> {
        let n = self.len();
        if n == 0 {
            self.spill.remove();
            return Ok(None);
        }
        let path = self.spill.path().to_path_buf();
        let mut all = Vec::with_capacity(n as usize);
        while let Some(m) = self.pop() {
            all.push(m);
        }
        self.spill.remove();
        let mut fresh = Spill::new(path.clone());
        for m in &all {
            fresh.push(m)?;
        }
        Ok(Some((path, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(mem: usize, spill_max: u64, name: &str) -> Queue {
        let path = std::env::temp_dir().join(format!(
            "hvtrace-queue-test-{}-{name}.spill",
            std::process::id()
        ));
        Queue::new(mem, spill_max, path)
    }

    fn offer(q: &mut Queue, force: bool) -> bool {
        q.offer(force, |seq| {
            (
                "s.vm.syscall".into(),
                format!("{{\"seq\":{seq}}}").into_bytes(),
            )
        })
    }

    fn seqs(q: &mut Queue) -> Vec<u64> {
        std::iter::from_fn(|| q.pop()).map(|m| m.seq).collect()
    }

    #[test]
    fn overflow_spills_and_order_is_kept() {
        let mut q = queue(3, 1 << 20, "order");
        for _ in 0..10 {
            assert!(offer(&mut q, false));
        }
        assert_eq!((q.len(), q.spilled), (10, 7));
        let first: Vec<u64> = (0..4).filter_map(|_| q.pop()).map(|m| m.seq).collect();
        assert_eq!(first, [1, 2, 3, 4]);
        // Sent but not acknowledged: back to the front.
        let again = [3, 4].map(|seq| Msg {
            seq,
            subject: "s.vm.syscall".into(),
            body: format!("{{\"seq\":{seq}}}").into_bytes(),
        });
        q.requeue(again.into_iter());
        assert!(offer(&mut q, false));
        assert_eq!(seqs(&mut q), [3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_spill_refuses_events_without_using_sequence_numbers() {
        let line = "1 s.vm.syscall {\"seq\":1}\n".len() as u64;
        let mut q = queue(2, 3 * line, "full");
        let taken = (0..10).filter(|_| offer(&mut q, false)).count();
        assert_eq!(taken, 5, "2 in memory and 3 spilled");
        // A drop report goes in regardless, with the next number.
        assert!(offer(&mut q, true));
        assert_eq!(seqs(&mut q), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn persisting_keeps_everything_waiting_in_order() {
        let mut q = queue(2, 1 << 20, "persist");
        for _ in 0..5 {
            offer(&mut q, false);
        }
        let m = q.pop().unwrap();
        q.requeue(std::iter::once(m));
        let (path, n) = q.persist().unwrap().unwrap();
        assert_eq!(n, 5);
        let text = std::fs::read(&path).unwrap();
        let back: Vec<u64> = text
            .split_inclusive(|&b| b == b'\n')
            .map(|l| super::super::spill::parse_line(l).unwrap().seq)
            .collect();
        assert_eq!(back, [1, 2, 3, 4, 5]);
        std::fs::remove_file(&path).unwrap();
    }
}
