//! The machine's UARTs (the 16550A model of `uart16550.rs`) with their
//! interrupt wired through an irqfd, and the host-side sinks and sources
//! behind them.
//!
//! The guest uses four ports (see `images/README.md`): ttyS0 the kernel
//! console, ttyS1 the control channel, ttyS2 and ttyS3 the command's stdout
//! and stderr.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::uart16550::{Losses, Registers, Uart16550, FIFO_SIZE};

/// Raises a UART's interrupt line by writing its irqfd.
#[derive(Debug)]
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A handle on a UART's interrupt line that only pulses it.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Raises one edge on the line.
    pub fn pulse(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where a UART's output goes.
pub type Sink = Box<dyn Write + Send>;

/// One UART and the host input waiting for room in its 64-byte FIFO (the
/// host never overruns the guest: input enters the FIFO as the guest
/// drains it, as if the line had hardware flow control).
pub struct Uart {
    device: Uart16550<IrqFdTrigger, Sink>,
    pending_input: VecDeque<u8>,
    /// The interrupt line, for a pulse that is not the device's own (see
    /// [`Uart::irq_line`]).
    irq: Option<EventFd>,
}

impl Uart {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: Sink) -> Self {
        Self {
            irq: irq.try_clone().ok(),
            device: Uart16550::new(IrqFdTrigger(irq), sink),
            pending_input: VecDeque::new(),
        }
    }

    /// A second handle on the UART's interrupt line (its irqfd): a pulse
    /// runs the guest driver's interrupt handler, which finds nothing to do
    /// unless the device itself has something pending. The tracer uses it
    /// as a doorbell (`utrace::hv::doorbell`).
    pub fn irq_line(&self) -> Option<IrqLine> {
        self.irq
            .as_ref()
            .and_then(|e| e.try_clone().ok())
            .map(IrqLine)
    }

    /// Queues bytes for the guest to read; they enter the FIFO as it drains.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.refill();
        // New input for a guest whose line is already high (it may have
        // stopped polling a busy port) gets an interrupt of its own.
        self.device.repulse_if_asserted();
    }

    /// Moves queued input into the FIFO while it has room.
    fn refill(&mut self) {
        let n = self.device.fifo_room().min(self.pending_input.len());
        if n > 0 {
            let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
            self.device.receive(&chunk);
        }
    }

    /// Handles a guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.device.read(offset);
        self.refill();
        v
    }

    /// Handles a guest write of register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        self.device.write(offset, value);
    }

    /// Writes `bytes` to the port's host side as if transmitted, without
    /// touching the chip (the output window's path to the same sink).
    pub fn emit(&mut self, bytes: &[u8]) {
        self.device.emit(bytes);
    }

    /// Bytes and interrupts the host side failed to deliver so far.
    pub fn losses(&self) -> Losses {
        self.device.losses()
    }
}

/// A UART's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// The chip's registers.
    pub registers: Registers,
    /// Bytes in the receive FIFO.
    pub fifo: Vec<u8>,
    /// Host input not yet in the FIFO.
    pub pending_input: Vec<u8>,
}

impl Uart {
    /// The UART's state, for a snapshot.
    pub fn state(&self) -> UartState {
        UartState {
            registers: self.device.registers(),
            fifo: self.device.fifo(),
            pending_input: self.pending_input.iter().copied().collect(),
        }
    }

    /// A UART restored from `state`, raising `irq` and writing to `sink`.
    /// A FIFO longer than the hardware's is refused.
    pub fn from_state(state: &UartState, irq: EventFd, sink: Sink) -> Result<Self, String> {
        if state.fifo.len() > FIFO_SIZE {
            return Err(format!(
                "receive FIFO of {} bytes (a 16550 holds {FIFO_SIZE})",
                state.fifo.len()
            ));
        }
        Ok(Self {
            irq: irq.try_clone().ok(),
            device: Uart16550::from_parts(state.registers, &state.fifo, IrqFdTrigger(irq), sink),
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

    /// Every input length from 1 to 2,000 bytes reaches a driver that reads
    /// as Linux's does, on the control port's shared IRQ line, with the
    /// line's other UART transmitting at the same time.
    #[test]
    fn every_input_length_reaches_a_linux_8250_driver() {
        for len in 1..=2000usize {
            let mut line = linux8250::Line::new(2);
            line.open_for_input(0);
            let input: Vec<u8> = (0..len).map(|i| b'A' + (i % 26) as u8).collect();
            line.ports[0].uart.queue_input(&input);
            line.deliver_interrupts();
            assert_eq!(line.ports[0].received.len(), len, "input of {len} bytes");
            assert_eq!(line.ports[0].received, input, "input of {len} bytes");
        }
    }

    /// The same with the input arriving in pieces, some while the guest is
    /// still draining the earlier ones.
    #[test]
    fn input_in_pieces_reaches_a_linux_8250_driver() {
        for len in [1usize, 63, 64, 65, 256, 257, 300, 320, 321, 1000, 5000] {
            let mut line = linux8250::Line::new(1);
            line.open_for_input(0);
            let input: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for piece in input.chunks(97) {
                line.ports[0].uart.queue_input(piece);
                line.deliver_one_interrupt();
            }
            line.deliver_interrupts();
            assert_eq!(line.ports[0].received, input, "input of {len} bytes");
        }
    }

    /// Output of every length from 1 to 2,000 bytes leaves through
    /// THR-empty interrupts alone (no polling), one large write or many
    /// small ones, while the other UART of the line receives.
    #[test]
    fn every_output_length_leaves_through_thr_interrupts() {
        for len in 1..=2000usize {
            let msg: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut line = linux8250::Line::new(2);
            line.open_for_input(1);
            line.ports[1].uart.queue_input(b"control request\n");
            line.write(0, &msg);
            line.deliver_interrupts();
            assert_eq!(line.ports[0].sent(), msg, "one write of {len} bytes");
            assert_eq!(line.ports[1].received, b"control request\n");

            let mut line = linux8250::Line::new(1);
            for piece in msg.chunks(7) {
                line.write(0, piece);
                line.deliver_interrupts();
            }
            assert_eq!(line.ports[0].sent(), msg, "writes of 7 bytes, {len} in all");
        }
    }

    /// Linux 6.1's 8250 interrupt path (drivers/tty/serial/8250/8250_core.c
    /// and 8250_port.c), reduced to what a UART's register behaviour
    /// decides: the same register accesses in the same order.
    mod linux8250 {
        use super::*;

        /// serial8250_interrupt's PASS_LIMIT.
        const PASS_LIMIT: usize = 512;
        /// serial8250_rx_chars' max_count.
        const RX_PER_PASS: usize = 256;
        /// A 16550A's tx_loadsz.
        const TX_LOADSZ: usize = 16;

        /// A sink the test can read back.
        #[derive(Clone, Default)]
        pub struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, d: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(d);
                Ok(d.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        /// One port as the driver sees it.
        pub struct Port {
            pub uart: Uart,
            irq: EventFd,
            ier: u8,
            tx_buf: VecDeque<u8>,
            pub received: Vec<u8>,
            out: Shared,
        }

        impl Port {
            /// What reached the host.
            pub fn sent(&self) -> Vec<u8> {
                self.out.0.lock().unwrap().clone()
            }
        }

        /// UARTs sharing one edge-triggered IRQ line.
        pub struct Line {
            pub ports: Vec<Port>,
        }

        impl Line {
            /// `n` UARTs, each set up as serial8250_do_startup leaves it
            /// (8N1, FIFOs on, no interrupt enabled yet).
            pub fn new(n: usize) -> Self {
                let ports = (0..n)
                    .map(|_| {
                        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                        let out = Shared::default();
                        let mut uart = Uart::new(irq.try_clone().unwrap(), Box::new(out.clone()));
                        uart.write(3, 0x03);
                        uart.write(2, 0x07); // FCR: enable, clear both FIFOs
                        uart.write(4, 0x0b); // MCR: DTR, RTS, OUT2
                        Port {
                            uart,
                            irq,
                            ier: 0,
                            tx_buf: VecDeque::new(),
                            received: Vec::new(),
                            out,
                        }
                    })
                    .collect();
                Self { ports }
            }

            /// The tty opened: receive interrupts on (IER = RDI | RLSI).
            pub fn open_for_input(&mut self, i: usize) {
                let p = &mut self.ports[i];
                p.ier |= 0x05;
                p.uart.write(1, p.ier);
            }

            /// uart_write + __start_tx: queue, then enable THRI.
            pub fn write(&mut self, i: usize, data: &[u8]) {
                let p = &mut self.ports[i];
                p.tx_buf.extend(data);
                if p.ier & 0x02 == 0 {
                    p.ier |= 0x02;
                    p.uart.write(1, p.ier);
                }
            }

            /// Takes the latched edge, if any: true when one was pending.
            fn take_edge(&mut self) -> bool {
                let mut any = false;
                for p in &self.ports {
                    any |= p.irq.read().is_ok();
                }
                any
            }

            /// Runs the handler once if an edge is latched.
            pub fn deliver_one_interrupt(&mut self) -> bool {
                if !self.take_edge() {
                    return false;
                }
                self.serial8250_interrupt();
                true
            }

            /// Delivers interrupts until none is latched (edges that arrive
            /// while the handler runs are latched and delivered after it).
            pub fn deliver_interrupts(&mut self) {
                let mut rounds = 0;
                while self.deliver_one_interrupt() {
                    rounds += 1;
                    assert!(rounds < 100_000, "interrupt storm");
                }
            }

            fn serial8250_interrupt(&mut self) {
                for _ in 0..PASS_LIMIT {
                    let mut handled = false;
                    for p in &mut self.ports {
                        handled |= serial8250_handle_irq(p);
                    }
                    if !handled {
                        return;
                    }
                }
            }
        }

        fn serial8250_handle_irq(p: &mut Port) -> bool {
            let iir = p.uart.read(2);
            if iir & 0x01 != 0 {
                return false;
            }
            let mut lsr = p.uart.read(5);
            if lsr & 0x01 != 0 {
                // serial8250_rx_chars
                let mut count = RX_PER_PASS;
                loop {
                    p.received.push(p.uart.read(0));
                    count -= 1;
                    if count == 0 {
                        break;
                    }
                    lsr = p.uart.read(5);
                    if lsr & 0x01 == 0 {
                        break;
                    }
                }
            }
            if lsr & 0x20 != 0 && p.ier & 0x02 != 0 {
                // serial8250_tx_chars
                for _ in 0..TX_LOADSZ {
                    let Some(b) = p.tx_buf.pop_front() else { break };
                    p.uart.write(0, b);
                }
                if p.tx_buf.is_empty() {
                    // __stop_tx
                    p.ier &= !0x02;
                    p.uart.write(1, p.ier);
                }
            }
            true
        }
    }
}
