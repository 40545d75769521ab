//! The few devices a traced guest needs: four 16550 UARTs, the i8042 reset
//! line, the ACPI sleep registers (power-off), and the output window (the
//! fast path for the command's output), behind one dispatcher.

pub mod acpi_pm;
pub mod bus;
pub mod output_window;
pub mod serial;
pub mod uart16550;
