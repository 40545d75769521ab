//! Device dispatch: which device answers which port, and the one MMIO
//! device (the output window's doorbell).

use vm_superio::I8042Device;

use super::acpi_pm;
use super::output_window::{self, Channel};
use super::serial::Uart;
use crate::arch::x86_64::layout::OUTPUT_WINDOW_START;
use crate::vstate::memory::GuestRam;

/// Base ports of ttyS0..ttyS3 (COM1..COM4).
pub const COM_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];
/// Legacy IRQ of each of COM1..COM4.
pub const COM_IRQS: [u32; 4] = [4, 3, 4, 3];
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port (0xfe written here pulses the CPU reset line).
pub const I8042_CMD: u16 = 0x64;

/// Index of the UART used as the guest control channel (ttyS1).
pub const CONTROL_UART: usize = 1;

/// What the guest asked of the machine through a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformEvent {
    /// A reset through the i8042's reset line.
    Reset,
    /// Power-off through the ACPI sleep control register (S5).
    PowerOff,
}

/// Signals the VMM that the guest asked for a reset through the i8042.
#[derive(Debug)]
pub struct ResetTrigger(pub std::sync::mpsc::Sender<PlatformEvent>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::sync::mpsc::SendError<PlatformEvent>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(PlatformEvent::Reset)
    }
}

/// All devices of the machine.
pub struct PortIoBus {
    /// ttyS0..ttyS3.
    pub uarts: Vec<Uart>,
    /// Keyboard controller (reset only).
    pub i8042: I8042Device<ResetTrigger>,
    /// Where a power-off through the ACPI sleep registers goes.
    platform: std::sync::mpsc::Sender<PlatformEvent>,
    /// Output-window pushes refused (bad channel, length or width).
    pub refused_pushes: u64,
    /// The last push's bytes (kept to spare an allocation per push).
    window: Vec<u8>,
}

impl PortIoBus {
    /// The bus for these UARTs (ttyS0..ttyS3), an i8042 and the ACPI sleep
    /// registers; resets and power-offs go to `platform`.
    pub fn new(uarts: Vec<Uart>, platform: std::sync::mpsc::Sender<PlatformEvent>) -> Self {
        Self {
            uarts,
            i8042: I8042Device::new(ResetTrigger(platform.clone())),
            platform,
            refused_pushes: 0,
            window: Vec::new(),
        }
    }

    /// The UART whose 8 registers include `port`, with the register offset.
    fn uart_at(&mut self, port: u16) -> Option<(&mut Uart, u8)> {
        let i = COM_PORTS
            .iter()
            .position(|b| (*b..*b + 8).contains(&port))?;
        let offset = (port - COM_PORTS[i]) as u8;
        self.uarts.get_mut(i).map(|u| (u, offset))
    }

    /// Answers a guest `in`. Absent devices read as all ones on the PCI
    /// configuration ports (no PCI bus) and zero elsewhere (so polling loops
    /// such as the CMOS update-in-progress wait end at once).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if let Some((uart, off)) = self.uart_at(port) {
            data.fill(0);
            data[0] = uart.read(off);
            return;
        }
        match port {
            I8042_DATA | I8042_CMD => {
                data.fill(0);
                data[0] = self.i8042.read((port - I8042_DATA) as u8);
            }
            0xcf8..=0xcff => data.fill(0xff),
            _ => data.fill(0),
        }
    }

    /// Handles a guest `out`.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if let Some((uart, off)) = self.uart_at(port) {
            uart.write(off, value);
            return;
        }
        // A failed send means the VMM is already shutting down.
        if port == I8042_DATA || port == I8042_CMD {
            let _ = self.i8042.write((port - I8042_DATA) as u8, value);
        } else if port == acpi_pm::SLEEP_CONTROL_PORT && acpi_pm::is_power_off(value) {
            let _ = self.platform.send(PlatformEvent::PowerOff);
        }
    }

    /// Answers a guest MMIO read outside guest RAM: the output window's
    /// registers, all ones elsewhere (no device there).
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if output_window::claims(gpa) {
            output_window::read(gpa, data);
        } else {
            data.fill(0xff);
        }
    }

    /// Handles a guest MMIO write outside guest RAM. An output-window push
    /// copies the window's first bytes from `ram` to the host side of
    /// ttyS2 (stdout) or ttyS3 (stderr); a malformed one is counted in
    /// `refused_pushes` and dropped. Writes elsewhere are ignored.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8], ram: &GuestRam) {
        if !output_window::claims(gpa) {
            return;
        }
        let Some(push) = output_window::decode_write(gpa, data) else {
            self.refused_pushes += 1;
            return;
        };
        self.window.resize(push.len, 0);
        if ram.read(OUTPUT_WINDOW_START, &mut self.window).is_err() {
            self.refused_pushes += 1;
            return;
        }
        let port = match push.channel {
            Channel::Stdout => 2,
            Channel::Stderr => 3,
        };
        if let Some(uart) = self.uarts.get_mut(port) {
            uart.emit(&self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::OUTPUT_DOORBELL_START;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Collect {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_push_copies_the_window_to_its_channel_and_a_bad_one_nothing() {
        let sinks: Vec<Collect> = (0..4).map(|_| Collect::default()).collect();
        let uarts = sinks
            .iter()
            .map(|s| Uart::new(EventFd::new(0).unwrap(), Box::new(s.clone())))
            .collect();
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut bus = PortIoBus::new(uarts, tx);
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.write(OUTPUT_WINDOW_START, b"hello, stderr").unwrap();
        let push = OUTPUT_DOORBELL_START + output_window::reg::PUSH;
        bus.mmio_write(push, &0x0200_0005u32.to_le_bytes(), &ram);
        bus.mmio_write(push, &0x0100_0003u32.to_le_bytes(), &ram);
        assert_eq!(*sinks[3].0.lock().unwrap(), b"hello");
        assert_eq!(*sinks[2].0.lock().unwrap(), b"hel");
        // Past the window, an unknown channel, a wrong width: nothing.
        bus.mmio_write(push, &0x0101_0001u32.to_le_bytes(), &ram);
        bus.mmio_write(push, &0x0700_0001u32.to_le_bytes(), &ram);
        bus.mmio_write(push, &[1, 0], &ram);
        assert_eq!(bus.refused_pushes, 3);
        assert_eq!(sinks[2].0.lock().unwrap().len(), 3);
        let mut magic = [0u8; 4];
        bus.mmio_read(OUTPUT_DOORBELL_START, &mut magic);
        assert_eq!(&magic, b"HVO1");
        bus.mmio_read(0xfed0_0000, &mut magic);
        assert_eq!(magic, [0xff; 4], "no device elsewhere");
    }

    #[test]
    fn s5_in_the_sleep_control_register_powers_off_and_the_i8042_resets() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut bus = PortIoBus::new(Vec::new(), tx);
        bus.write(acpi_pm::SLEEP_CONTROL_PORT, &[0x14]);
        bus.write(acpi_pm::SLEEP_STATUS_PORT, &[0x34]);
        assert!(
            rx.try_recv().is_err(),
            "no SLP_EN, or not the control register"
        );
        bus.write(acpi_pm::SLEEP_CONTROL_PORT, &[0x34]);
        assert_eq!(rx.try_recv(), Ok(PlatformEvent::PowerOff));
        bus.write(I8042_CMD, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(PlatformEvent::Reset));
    }
}
