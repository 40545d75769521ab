//! The few legacy devices a traced guest needs: four 16550 UARTs and the
//! i8042 reset line, behind one port-I/O dispatcher.

pub mod bus;
pub mod serial;
pub mod uart16550;
