//! Runs a fuzz target on a worker thread while the calling thread waits with
//! a deadline, so an input that loops forever fails the run instead of
//! hanging it. A hung worker is left behind (Rust cannot kill a thread): it
//! is detached, and ends by itself if the target ever returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How one input ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target returned, after this long.
    Done(Duration),
    /// The target panicked with this message.
    Panicked(String),
    /// No answer before the deadline: the target is still running.
    Hung,
}

/// A worker thread that runs one target on the inputs it is given.
pub struct Worker {
    inputs: Sender<Arc<Vec<u8>>>,
    results: Receiver<Result<Duration, String>>,
    stuck: bool,
}

impl Worker {
    /// Starts a worker named `hvtrace-fuzz-<name>` running `target`.
    pub fn spawn(name: &str, target: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        let (inputs, todo) = channel::<Arc<Vec<u8>>>();
        let (done, results) = channel();
        thread::Builder::new()
            .name(format!("hvtrace-fuzz-{name}"))
            .spawn(move || {
                // Ends when the Worker (the sender) is dropped.
                while let Ok(input) = todo.recv() {
                    let t = Instant::now();
                    let r = catch_unwind(AssertUnwindSafe(|| target(&input)))
                        .map(|()| t.elapsed())
                        .map_err(|p| panic_message(p.as_ref()));
                    if done.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn fuzz worker thread");
        Self {
            inputs,
            results,
            stuck: false,
        }
    }

    /// Runs `input` and waits at most `deadline` for it. After
    /// [`Outcome::Hung`] the worker is unusable (every later call is Hung).
    pub fn run(&mut self, input: Arc<Vec<u8>>, deadline: Duration) -> Outcome {
        if self.stuck || self.inputs.send(input).is_err() {
            self.stuck = true;
            return Outcome::Hung;
        }
        match self.results.recv_timeout(deadline) {
            Ok(Ok(took)) => Outcome::Done(took),
            Ok(Err(msg)) => Outcome::Panicked(msg),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                self.stuck = true;
                Outcome::Hung
            }
        }
    }
}

/// The message of a panic payload (`panic!` with a string or a format).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_done_panicked_and_hung() {
        let mut w = Worker::spawn("unit", |d: &[u8]| match d.first() {
            Some(1) => panic!("one"),
            Some(2) => thread::sleep(Duration::from_millis(400)),
            _ => {}
        });
        let s = Duration::from_secs(5);
        assert!(matches!(w.run(Arc::new(vec![0]), s), Outcome::Done(_)));
        assert_eq!(w.run(Arc::new(vec![1]), s), Outcome::Panicked("one".into()));
        // The worker survives a panic.
        assert!(matches!(w.run(Arc::new(vec![0]), s), Outcome::Done(_)));
        let short = Duration::from_millis(50);
        assert_eq!(w.run(Arc::new(vec![2]), short), Outcome::Hung);
        assert_eq!(w.run(Arc::new(vec![0]), s), Outcome::Hung);
    }
}
