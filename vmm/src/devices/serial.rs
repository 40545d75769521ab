//! 16550 UARTs (vm-superio) with their interrupt wired through an irqfd, and
//! the host-side sinks and sources behind them.
//!
//! The guest uses four ports (see `images/README.md`): ttyS0 the kernel
//! console, ttyS1 the control channel, ttyS2 and ttyS3 the command's stdout
//! and stderr.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises a UART's interrupt line by writing its irqfd.
#[derive(Debug)]
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where a UART's output goes.
pub type Sink = Box<dyn Write + Send>;

/// One UART with a queue of host input waiting for room in its 64-byte FIFO.
pub struct Uart {
    /// The emulated 16550.
    pub serial: Serial<IrqFdTrigger, NoEvents, Sink>,
    pending_input: VecDeque<u8>,
}

impl Uart {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: Sink) -> Self {
        Self {
            serial: Serial::new(IrqFdTrigger(irq), sink),
            pending_input: VecDeque::new(),
        }
    }

    /// Queues bytes for the guest to read; they enter the FIFO as it drains.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.refill();
    }

    /// Moves queued input into the FIFO while it has room.
    pub fn refill(&mut self) {
        while !self.pending_input.is_empty() && self.serial.fifo_capacity() > 0 {
            let n = self.serial.fifo_capacity().min(self.pending_input.len());
            let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
            // The FIFO had room for `n` bytes; a failed interrupt write is
            // the irqfd's problem and shows up as a stuck guest read.
            let _ = self.serial.enqueue_raw_bytes(&chunk);
        }
    }

    /// Handles a guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.serial.read(offset);
        self.refill();
        v
    }

    /// Handles a guest write of register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        // Errors here are failed interrupt injections or sink writes; the
        // guest cannot act on them, so they are dropped like a lost byte.
        let _ = self.serial.write(offset, value);
    }
}

/// A UART's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes in the receive FIFO.
    pub fifo: Vec<u8>,
    /// Host input not yet in the FIFO.
    pub pending_input: Vec<u8>,
}

impl Uart {
    /// The UART's state, for a snapshot.
    pub fn state(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            pending_input: self.pending_input.iter().copied().collect(),
        }
    }

    /// A UART restored from `state`, raising `irq` and writing to `sink`.
    /// A FIFO longer than the hardware's is refused.
    pub fn from_state(state: &UartState, irq: EventFd, sink: Sink) -> Result<Self, String> {
        let r = state.registers;
        let s = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.fifo.clone(),
        };
        let serial = Serial::from_state(&s, IrqFdTrigger(irq), NoEvents, sink)
            .map_err(|e| format!("{e:?}"))?;
        Ok(Self {
            serial,
            pending_input: state.pending_input.iter().copied().collect(),
        })
    }
}

/// A sink that splits output into lines and hands each to a callback.
pub struct LineSink<F: FnMut(&str) + Send> {
    buf: Vec<u8>,
    on_line: F,
}

impl<F: FnMut(&str) + Send> LineSink<F> {
    /// A sink calling `on_line` for every complete line (without the newline).
    pub fn new(on_line: F) -> Self {
        Self {
            buf: Vec::new(),
            on_line,
        }
    }
}

impl<F: FnMut(&str) + Send> Write for LineSink<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.buf)
                    .trim_end_matches('\r')
                    .to_string();
                (self.on_line)(&line);
                self.buf.clear();
            } else if self.buf.len() < 64 * 1024 {
                self.buf.push(b);
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The last bytes the guest wrote to its console, kept for error reports.
#[derive(Clone, Default)]
pub struct ConsoleLog(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleLog {
    const KEEP: usize = 64 * 1024;

    /// Appends console output, keeping the last 64 KiB.
    pub fn push(&self, data: &[u8]) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.extend(data);
        let excess = q.len().saturating_sub(Self::KEEP);
        q.drain(..excess);
    }

    /// The kept console text.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&q.iter().copied().collect::<Vec<u8>>()).into_owned()
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_sink_splits_lines_and_strips_cr() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let mut s = LineSink::new(move |l: &str| g.lock().unwrap().push(l.to_string()));
        s.write_all(b"HVTRACE-READY\r\nHVTRACE-EX").unwrap();
        s.write_all(b"IT 3\npartial").unwrap();
        assert_eq!(
            *got.lock().unwrap(),
            vec!["HVTRACE-READY", "HVTRACE-EXIT 3"]
        );
    }

    #[test]
    fn console_log_keeps_the_tail() {
        let c = ConsoleLog::default();
        c.push(b"a\nb\nc\n");
        assert_eq!(c.tail(2), "b\nc");
        c.push(&vec![b'x'; 70_000]);
        assert_eq!(c.text().len(), 64 * 1024);
    }

    #[test]
    fn uart_state_round_trips() {
        let mut u = Uart::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        u.write(3, 0x03); // LCR: 8N1
        u.write(1, 0x01); // IER: RX interrupt
        u.queue_input(&[b'x'; 100]);
        let st = u.state();
        assert_eq!(st.fifo.len(), 64);
        assert_eq!(st.pending_input.len(), 36);
        let v = Uart::from_state(&st, EventFd::new(0).unwrap(), Box::new(io::sink())).unwrap();
        assert_eq!(v.state(), st);
        let mut bad = st.clone();
        bad.fifo = vec![0; 65];
        assert!(Uart::from_state(&bad, EventFd::new(0).unwrap(), Box::new(io::sink())).is_err());
    }

    #[test]
    fn uart_input_larger_than_fifo_drains_in_order() {
        let evt = EventFd::new(0).unwrap();
        let mut u = Uart::new(evt, Box::new(io::sink()));
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        u.queue_input(&input);
        let mut out = Vec::new();
        // LSR bit 0 = data ready; RBR at offset 0.
        while u.read(5) & 1 == 1 {
            out.push(u.read(0));
        }
        assert_eq!(out, input);
    }
}
