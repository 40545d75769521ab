//! A 16550A UART register model whose interrupt output behaves like the
//! chip's: a level that stays asserted while an enabled condition holds.
//!
//! vm-superio's `Serial` (used before) raised its interrupt once per
//! "new data" event and dropped the receive condition on the first read of
//! the data register, even with bytes still waiting. Linux's 8250 driver
//! reads at most 256 characters per pass and then asks the interrupt
//! identification register whether more work is pending; a real 16550 says
//! yes while its FIFO holds data, vm-superio said no, and the rest of the
//! input sat in the FIFO with no interrupt to fetch it (every control
//! request of 257 to 320 bytes hung the guest's `/init`).
//!
//! Here the interrupt identification register is derived from the state on
//! every read, as the chip's priority encoder does:
//!
//! | condition (when enabled in IER) | IIR | cleared by |
//! | --- | --- | --- |
//! | receive FIFO not empty | `0x04` received data available | reading the FIFO empty |
//! | transmit holding register empty | `0x02` THR empty | reading IIR while it is the reported source, or writing THR |
//!
//! The transmitter sends every byte at once, so the holding register is
//! empty again right after each write, and enabling the THR-empty interrupt
//! while it is empty raises it (Linux's start-up probes for exactly this
//! and would otherwise fall back to workarounds). There are no line errors
//! and no modem-status changes, so those two sources never fire.
//!
//! The output line reaches the guest's interrupt controller through an
//! edge-signalling [`Trigger`] (a KVM irqfd): the model pulses it whenever
//! its output rises, which is the edge an ISA interrupt controller sees on
//! the chip's level output. A UART sharing its IRQ line with another pulses
//! on its own rise even when the other already holds the line high; the
//! extra edge costs the guest one handler pass (Linux's 8250 handler polls
//! every port on a shared line until none has work), and it is what keeps
//! such a line from losing an interrupt.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::Trigger;

/// Receive FIFO depth of a 16550A.
pub const FIFO_SIZE: usize = 64;

/// Register offsets from the UART's base port.
mod reg {
    /// Receive buffer (read) / transmit holding (write); divisor low with DLAB.
    pub const DATA: u8 = 0;
    /// Interrupt enable; divisor high with DLAB.
    pub const IER: u8 = 1;
    /// Interrupt identification (read) / FIFO control (write).
    pub const IIR_FCR: u8 = 2;
    /// Line control.
    pub const LCR: u8 = 3;
    /// Modem control.
    pub const MCR: u8 = 4;
    /// Line status.
    pub const LSR: u8 = 5;
    /// Modem status.
    pub const MSR: u8 = 6;
    /// Scratch.
    pub const SCR: u8 = 7;
}

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
/// The four interrupt-enable bits a 16550A implements.
const IER_VALID: u8 = 0x0f;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
/// IIR bits 6-7: FIFOs enabled (what makes Linux detect a 16550A).
const IIR_FIFO: u8 = 0xc0;
const FCR_CLEAR_RX: u8 = 0x02;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
/// Transmit holding register empty and transmitter empty: always, since
/// every byte leaves at once.
const LSR_TX_IDLE: u8 = 0x60;
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The registers a snapshot needs to recreate the chip (the FIFO apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// Interrupt enable.
    pub ier: u8,
    /// Line control.
    pub lcr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Scratch.
    pub scr: u8,
    /// A THR-empty interrupt is pending (not yet acknowledged).
    pub thre_pending: bool,
}

impl Default for Registers {
    /// The chip after reset, as firmware would leave it: 9600 baud, 8N1,
    /// OUT2 set, no interrupts enabled.
    fn default() -> Self {
        Self {
            dll: 0x0c,
            dlm: 0,
            ier: 0,
            lcr: 0x03,
            mcr: MCR_OUT2,
            scr: 0,
            thre_pending: false,
        }
    }
}

/// Counters of what the model could not do (host side failures).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Losses {
    /// Bytes the guest transmitted that the sink refused.
    pub tx_bytes: u64,
    /// Interrupt pulses that could not be delivered.
    pub irq_pulses: u64,
}

/// One 16550A: registers, a 64-byte receive FIFO, an interrupt output
/// pulsed through `T` on each rise, transmitted bytes written to `W`.
pub struct Uart16550<T: Trigger, W: Write> {
    regs: Registers,
    rx: VecDeque<u8>,
    irq_asserted: bool,
    trigger: T,
    out: W,
    losses: Losses,
}

impl<T: Trigger, W: Write> Uart16550<T, W> {
    /// A UART just out of reset.
    pub fn new(trigger: T, out: W) -> Self {
        Self::from_parts(Registers::default(), &[], trigger, out)
    }

    /// A UART with the given registers and receive FIFO contents (at most
    /// [`FIFO_SIZE`] bytes; the rest is dropped, as an overrun would). The
    /// interrupt output starts at its level for that state without a pulse:
    /// the interrupt controller's own saved state already holds any edge
    /// the guest has not yet taken.
    pub fn from_parts(regs: Registers, fifo: &[u8], trigger: T, out: W) -> Self {
        let mut u = Self {
            regs: Registers {
                ier: regs.ier & IER_VALID,
                ..regs
            },
            rx: fifo.iter().copied().take(FIFO_SIZE).collect(),
            irq_asserted: false,
            trigger,
            out,
            losses: Losses::default(),
        };
        u.irq_asserted = u.interrupt_source().is_some();
        u
    }

    /// The registers, for a snapshot.
    pub fn registers(&self) -> Registers {
        self.regs
    }

    /// The receive FIFO's contents, oldest first.
    pub fn fifo(&self) -> Vec<u8> {
        self.rx.iter().copied().collect()
    }

    /// Room left in the receive FIFO.
    pub fn fifo_room(&self) -> usize {
        FIFO_SIZE - self.rx.len()
    }

    /// What could not be delivered so far.
    pub fn losses(&self) -> Losses {
        self.losses
    }

    /// Whether the interrupt output is asserted now.
    pub fn irq_asserted(&self) -> bool {
        self.irq_asserted
    }

    /// Puts bytes from the line into the receive FIFO, as many as fit;
    /// returns how many did.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.fifo_room());
        self.rx.extend(&bytes[..n]);
        self.update_irq();
        n
    }

    /// Pulses the interrupt again if it is asserted. Useful when the host
    /// adds input while the line is already high: a guest handler that gave
    /// up on a busy line (Linux's 8250 stops after 512 passes) gets another
    /// interrupt instead of waiting for an edge that would never come.
    pub fn repulse_if_asserted(&mut self) {
        if self.irq_asserted {
            self.pulse();
        }
    }

    /// A guest read of the register at `offset` (0-7).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        let value = match offset {
            reg::DATA if dlab => self.regs.dll,
            reg::DATA => self.rx.pop_front().unwrap_or(0),
            reg::IER if dlab => self.regs.dlm,
            reg::IER => self.regs.ier,
            reg::IIR_FCR => {
                let source = self.interrupt_source();
                // Reading IIR acknowledges a THR-empty interrupt it reports.
                if source == Some(IIR_THRE) {
                    self.regs.thre_pending = false;
                }
                IIR_FIFO | source.unwrap_or(IIR_NONE)
            }
            reg::LCR => self.regs.lcr,
            reg::MCR => self.regs.mcr,
            reg::LSR => LSR_TX_IDLE | if self.rx.is_empty() { 0 } else { LSR_DR },
            reg::MSR => self.modem_status(),
            reg::SCR => self.regs.scr,
            _ => 0,
        };
        self.update_irq();
        value
    }

    /// A guest write of `value` to the register at `offset` (0-7).
    pub fn write(&mut self, offset: u8, value: u8) {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        match offset {
            reg::DATA if dlab => self.regs.dll = value,
            reg::DATA => self.transmit(value),
            reg::IER if dlab => self.regs.dlm = value,
            reg::IER => {
                let was = self.regs.ier;
                self.regs.ier = value & IER_VALID;
                // Enabling the THR-empty interrupt while the holding
                // register is empty (it always is) raises it.
                if was & IER_THRI == 0 && value & IER_THRI != 0 {
                    self.regs.thre_pending = true;
                }
            }
            reg::IIR_FCR if value & FCR_CLEAR_RX != 0 => self.rx.clear(),
            reg::LCR => self.regs.lcr = value,
            reg::MCR => self.regs.mcr = value,
            reg::SCR => self.regs.scr = value,
            _ => {}
        }
        self.update_irq();
    }

    /// Writes `bytes` to the output as if transmitted, without touching
    /// the registers (a sink that refuses them counts them as lost).
    pub fn emit(&mut self, bytes: &[u8]) {
        if self
            .out
            .write_all(bytes)
            .and_then(|_| self.out.flush())
            .is_err()
        {
            self.losses.tx_bytes += bytes.len() as u64;
        }
    }

    fn transmit(&mut self, value: u8) {
        if self.regs.mcr & MCR_LOOP != 0 {
            // Loopback: the byte comes back on the receive side.
            if self.rx.len() < FIFO_SIZE {
                self.rx.push_back(value);
            }
        } else {
            self.emit(&[value]);
        }
        // The byte left at once: the holding register is empty again.
        self.regs.thre_pending = true;
    }

    /// MSR: CTS, DSR and DCD asserted (a host always ready); in loopback
    /// the modem inputs follow the modem control outputs, as on the chip.
    fn modem_status(&self) -> u8 {
        let mcr = self.regs.mcr;
        if mcr & MCR_LOOP == 0 {
            return MSR_CTS | MSR_DSR | MSR_DCD;
        }
        let mut msr = 0;
        for (out_bit, in_bit) in [
            (MCR_RTS, MSR_CTS),
            (MCR_DTR, MSR_DSR),
            (MCR_OUT1, MSR_RI),
            (MCR_OUT2, MSR_DCD),
        ] {
            if mcr & out_bit != 0 {
                msr |= in_bit;
            }
        }
        msr
    }

    /// The highest-priority enabled interrupt condition, as IIR bits 1-3.
    fn interrupt_source(&self) -> Option<u8> {
        let ier = self.regs.ier;
        if ier & IER_RDI != 0 && !self.rx.is_empty() {
            Some(IIR_RDA)
        } else if ier & IER_THRI != 0 && self.regs.thre_pending {
            Some(IIR_THRE)
        } else {
            None
        }
    }

    /// Recomputes the output level and pulses the trigger on a rise.
    fn update_irq(&mut self) {
        let level = self.interrupt_source().is_some();
        if level && !self.irq_asserted {
            self.pulse();
        }
        self.irq_asserted = level;
    }

    fn pulse(&mut self) {
        if self.trigger.trigger().is_err() {
            self.losses.irq_pulses += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// Counts pulses.
    #[derive(Clone, Default)]
    struct Pulses(Rc<Cell<u32>>);
    impl Trigger for Pulses {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    fn uart() -> (Uart16550<Pulses, Vec<u8>>, Pulses) {
        let p = Pulses::default();
        (Uart16550::new(p.clone(), Vec::new()), p)
    }

    #[test]
    fn receive_interrupt_stays_asserted_while_data_waits() {
        let (mut u, p) = uart();
        u.write(reg::IER, IER_RDI);
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_NONE);
        u.receive(b"abc");
        assert_eq!(p.0.get(), 1);
        assert_eq!(u.read(reg::DATA), b'a');
        // Two bytes left: the chip still reports received data.
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_RDA);
        assert_eq!(u.read(reg::DATA), b'b');
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_RDA);
        assert_eq!(u.read(reg::DATA), b'c');
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_NONE);
        assert_eq!(u.read(reg::LSR) & LSR_DR, 0);
        assert_eq!(p.0.get(), 1, "no pulse while the line stayed high");
    }

    #[test]
    fn enabling_the_thr_interrupt_raises_it_and_reading_iir_acknowledges_it() {
        let (mut u, p) = uart();
        u.write(reg::IER, IER_THRI);
        assert_eq!(p.0.get(), 1);
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_THRE);
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_NONE);
        // Linux's UART_BUG_THRE probe: disable, enable, and it is back.
        u.write(reg::IER, 0);
        u.write(reg::IER, IER_THRI);
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_THRE);
        u.write(reg::DATA, b'x');
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_THRE);
        assert_eq!(u.out, b"x");
        assert_eq!(p.0.get(), 3);
    }

    #[test]
    fn received_data_outranks_thr_empty() {
        let (mut u, _) = uart();
        u.write(reg::IER, IER_RDI | IER_THRI);
        u.receive(b"z");
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_RDA);
        assert_eq!(u.read(reg::DATA), b'z');
        assert_eq!(u.read(reg::IIR_FCR), IIR_FIFO | IIR_THRE);
    }

    #[test]
    fn divisor_latch_and_loopback() {
        let (mut u, _) = uart();
        u.write(reg::LCR, LCR_DLAB | 0x03);
        u.write(reg::DATA, 0x01);
        u.write(reg::IER, 0x00);
        assert_eq!((u.read(reg::DATA), u.read(reg::IER)), (0x01, 0x00));
        u.write(reg::LCR, 0x03);
        u.write(reg::MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        assert_eq!(u.read(reg::MSR) & 0xf0, MSR_DCD | MSR_CTS);
        u.write(reg::DATA, b'q');
        assert!(u.out.is_empty());
        assert_eq!(u.read(reg::DATA), b'q');
    }

    #[test]
    fn restored_state_keeps_its_level_without_a_pulse() {
        let (mut u, _) = uart();
        u.write(reg::IER, IER_RDI);
        u.receive(b"hi");
        let p = Pulses::default();
        let v = Uart16550::from_parts(u.registers(), &u.fifo(), p.clone(), Vec::new());
        assert!(v.irq_asserted());
        assert_eq!(v.fifo(), b"hi");
        assert_eq!(p.0.get(), 0);
    }
}
