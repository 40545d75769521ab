//! The hardware-reduced ACPI sleep registers: how an ACPI kernel powers
//! the machine off.
//!
//! The FADT ([`crate::arch::x86_64::acpi`]) points the kernel at a sleep
//! control register and a sleep status register, both one-byte I/O ports
//! here. `poweroff` writes `SLP_TYPx << 2 | SLP_EN` to the control register,
//! with `SLP_TYPx` the value of the DSDT's `_S5_` package; that write ends
//! the VM. The status register reads as zero (no wake event pending).

/// The sleep control register's I/O port (the base of QEMU's ICH9 PM block,
/// free on this machine).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register's I/O port.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The S5 (soft-off) sleep type this machine announces in `_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;

/// `SLP_EN` in the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// `SLP_TYPx`'s place in the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
/// `SLP_TYPx`'s bits.
const SLEEP_TYPE_MASK: u8 = 0b111 << SLEEP_TYPE_SHIFT;

/// Does this byte, written to the sleep control register, power off?
pub fn is_power_off(value: u8) -> bool {
    value & SLEEP_ENABLE != 0 && (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT == S5_SLEEP_TYPE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_sleep_enable_powers_off() {
        // What Linux's acpi_hw_extended_sleep() writes for S5: 5 << 2 | 1 << 5.
        assert!(is_power_off(0x34));
        assert!(!is_power_off(0x14), "S5 without SLP_EN");
        assert!(!is_power_off(0x24), "S1 with SLP_EN");
        assert!(!is_power_off(0x00));
    }
}
