//! Port-I/O dispatch: which device answers which port.

use vm_superio::I8042Device;

use super::serial::Uart;

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

/// Signals the VMM that the guest asked for a reset through the i8042.
#[derive(Debug)]
pub struct ResetTrigger(pub std::sync::mpsc::Sender<()>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::sync::mpsc::SendError<()>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(())
    }
}

/// All port-I/O devices of the machine.
pub struct PortIoBus {
    /// ttyS0..ttyS3.
    pub uarts: Vec<Uart>,
    /// Keyboard controller (reset only).
    pub i8042: I8042Device<ResetTrigger>,
}

impl PortIoBus {
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
        if port == I8042_DATA || port == I8042_CMD {
            // A failed send means the VMM is already shutting down.
            let _ = self.i8042.write((port - I8042_DATA) as u8, value);
        }
    }
}
