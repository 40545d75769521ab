//! Where a trace is written: a thread of its own behind a bounded queue.
//!
//! Engines write on the traced thread's vCPU thread. Written there directly,
//! a slow reader (a terminal, a pipe nobody drains for a while) would stall
//! the guest on every line. Through [`queued`], a record costs the vCPU a
//! copy into the queue; the writer thread does the system calls. The queue
//! holds up to [`QUEUE_RECORDS`] records: beyond that the vCPU waits for the
//! reader, as a traced process waits for strace, so nothing is lost.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Records (flushes) the queue holds before a writer waits.
pub const QUEUE_RECORDS: usize = 1 << 16;

/// One message to the writer thread.
enum Msg {
    Data(Vec<u8>),
    /// Everything before has been written: say so and stop.
    Finish,
}

/// The writing end the engines get: buffers until `flush`, then queues.
pub struct QueuedWriter {
    tx: SyncSender<Msg>,
    buf: Vec<u8>,
}

impl Write for QueuedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.tx
            .send(Msg::Data(data))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "trace writer has stopped"))
    }
}

impl Drop for QueuedWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The writer thread's handle.
pub struct WriterThread {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl WriterThread {
    /// Waits until everything queued before this call has been written
    /// (or the output failed), then ends the thread.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.tx.send(Msg::Finish);
            let _ = t.join();
        }
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A writer whose data `out` receives on a thread of its own. Write errors
/// (a closed pipe) drop the rest quietly, as the engines' own writes do:
/// a reader that went away must not disturb the guest.
pub fn queued(out: Box<dyn Write + Send>) -> io::Result<(QueuedWriter, WriterThread)> {
    let (tx, rx) = sync_channel(QUEUE_RECORDS);
    let thread = std::thread::Builder::new()
        .name("trace-writer".into())
        .spawn(move || write_all(out, rx))?;
    Ok((
        QueuedWriter {
            tx: tx.clone(),
            buf: Vec::new(),
        },
        WriterThread {
            tx,
            thread: Some(thread),
        },
    ))
}

/// How often the writer looks at its queue while a trace is busy.
const POLL: Duration = Duration::from_millis(2);
/// Empty looks (50 ms of quiet) before the writer sleeps until woken.
const POLLS_BEFORE_BLOCKING: u32 = 25;

/// The writer thread: writes each record, flushing whenever the queue runs
/// empty (so a burst costs one flush, and a quiet trace shows every line at
/// once). While records keep coming it polls the queue every [`POLL`]
/// instead of blocking on it: a blocked receiver makes every send a futex
/// wake-up of this thread on the vCPU thread that traced the call
/// (measured with perf: 7 % of a traced getpid loop's host time was that
/// wake-up). A line reaches its reader at most 2 ms later for it.
fn write_all(mut out: Box<dyn Write + Send>, rx: Receiver<Msg>) {
    let mut ok = true;
    let mut unflushed = false;
    loop {
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if ok && unflushed {
                    ok = out.flush().is_ok();
                }
                unflushed = false;
                match next_after_quiet(&rx) {
                    Some(msg) => msg,
                    None => break,
                }
            }
        };
        match msg {
            Msg::Data(d) if ok => {
                ok = out.write_all(&d).is_ok();
                unflushed = true;
            }
            Msg::Data(_) => {}
            Msg::Finish => break,
        }
    }
    let _ = out.flush();
}

/// The next message of an empty queue: polled for a while, then waited
/// for. None once every sender is gone.
fn next_after_quiet(rx: &Receiver<Msg>) -> Option<Msg> {
    for _ in 0..POLLS_BEFORE_BLOCKING {
        std::thread::sleep(POLL);
        match rx.try_recv() {
            Ok(msg) => return Some(msg),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return None,
        }
    }
    rx.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A writer that blocks until released, then records what it gets.
    struct Gate {
        open: Arc<Mutex<bool>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            while !*self.open.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.got.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_does_not_stall_the_writer_and_nothing_is_lost() {
        let open = Arc::new(Mutex::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            open: open.clone(),
            got: got.clone(),
        };
        let (mut w, thread) = queued(Box::new(gate)).unwrap();
        // Written directly, the first line would block this loop forever.
        for i in 0..10_000 {
            writeln!(w, "line {i}").unwrap();
            w.flush().unwrap();
        }
        assert!(
            got.lock().unwrap().is_empty(),
            "the reader is still stalled"
        );
        *open.lock().unwrap() = true;
        drop(w);
        thread.finish();
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert_eq!(lines[9_999], "line 9999");
    }

    #[test]
    fn a_closed_output_is_not_an_error_for_the_engines() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut w, thread) = queued(Box::new(Closed)).unwrap();
        for _ in 0..100 {
            writeln!(w, "x").unwrap();
            w.flush().unwrap();
        }
        thread.finish();
    }
}
