//! The output window: the fast path for the guest command's stdout and
//! stderr.
//!
//! Through ttyS2/ttyS3 every byte the command writes is one emulated UART
//! exit, after the guest kernel's tty layer and an interrupt per 16 bytes,
//! all of it emulated ring-0 code on PVM KVM: about 500 bytes/s. Here the
//! guest image's relay (`images/programs/hv-output.c`) reads the command's
//! output from pipes straight into a window of guest memory and rings a
//! doorbell once per batch of up to 64 KiB; the VMM copies
//! the batch to the same host sinks as ttyS2/ttyS3 during that one exit.
//!
//! The device is found by the relay through `/dev/mem`, and described by
//! itself, so nothing else (command line, ACPI) has to announce it:
//!
//! | doorbell offset | access | meaning |
//! | --- | --- | --- |
//! | 0x0 | read | [`MAGIC`] |
//! | 0x4 | read | the window's guest-physical address |
//! | 0x8 | read | the window's size in bytes |
//! | 0xc | write | push: bits 0-23 a length, bits 24-31 a channel (1 stdout, 2 stderr) |
//!
//! A push copies the window's first `length` bytes out before the guest's
//! write instruction completes, so the relay may refill the window as soon
//! as its write returns. The window lies in the legacy hole below 1 MiB
//! (guest RAM that e820 does not list, so the kernel never allocates it,
//! and that `/dev/mem` lets root map even under `STRICT_DEVMEM`); the
//! doorbell in the 32-bit MMIO hole, where no memory slot is, so every
//! access exits to the VMM. Under QEMU or another VMM the magic is absent
//! and the relay leaves the UARTs in charge.
//!
//! The guest is untrusted: a push with a bad channel, a length past the
//! window or a write of the wrong width is counted as refused and ignored.

use crate::arch::x86_64::layout::{
    OUTPUT_DOORBELL_START as DOORBELL_GPA, OUTPUT_WINDOW_SIZE as WINDOW_SIZE,
    OUTPUT_WINDOW_START as WINDOW_GPA,
};
// The window stays in the legacy hole that e820 does not list.
const _: () = assert!(
    WINDOW_GPA >= crate::arch::x86_64::layout::EBDA_END
        && WINDOW_GPA + WINDOW_SIZE <= crate::arch::x86_64::layout::HIMEM_START
);

/// Size of the doorbell page.
pub const DOORBELL_SIZE: u64 = 0x1000;
/// What offset 0 reads: "HVO1", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"HVO1");

/// Register offsets within the doorbell page.
pub mod reg {
    /// Read: [`super::MAGIC`].
    pub const MAGIC: u64 = 0x0;
    /// Read: the window's guest-physical address.
    pub const WINDOW: u64 = 0x4;
    /// Read: the window's size.
    pub const SIZE: u64 = 0x8;
    /// Write: a push (length and channel).
    pub const PUSH: u64 = 0xc;
}

/// Where a push goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The command's stdout (ttyS2's sink).
    Stdout,
    /// The command's stderr (ttyS3's sink).
    Stderr,
}

/// A push the guest asked for: the window's first `len` bytes to `channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Push {
    /// Destination.
    pub channel: Channel,
    /// Bytes from the window's start.
    pub len: usize,
}

/// Whether `gpa` falls in the doorbell page.
pub fn claims(gpa: u64) -> bool {
    (DOORBELL_GPA..DOORBELL_GPA + DOORBELL_SIZE).contains(&gpa)
}

/// Fills `data` for a guest read at `gpa` (in the doorbell page): the
/// registers as little-endian 32-bit values, zero elsewhere.
pub fn read(gpa: u64, data: &mut [u8]) {
    data.fill(0);
    let value = match gpa - DOORBELL_GPA {
        reg::MAGIC => MAGIC,
        reg::WINDOW => WINDOW_GPA as u32,
        reg::SIZE => WINDOW_SIZE as u32,
        _ => return,
    };
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

/// The push a guest write of `data` at `gpa` (in the doorbell page) asks
/// for, or None for anything else: another offset, a width other than 4
/// bytes, an unknown channel, a length past the window.
pub fn decode_write(gpa: u64, data: &[u8]) -> Option<Push> {
    if gpa - DOORBELL_GPA != reg::PUSH {
        return None;
    }
    let value = u32::from_le_bytes(data.try_into().ok()?);
    let len = (value & 0x00ff_ffff) as usize;
    let channel = match value >> 24 {
        1 => Channel::Stdout,
        2 => Channel::Stderr,
        _ => return None,
    };
    (len as u64 <= WINDOW_SIZE).then_some(Push { channel, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(value: u32) -> Option<Push> {
        decode_write(DOORBELL_GPA + reg::PUSH, &value.to_le_bytes())
    }

    #[test]
    fn registers_describe_the_window() {
        let mut d = [0xaa; 4];
        read(DOORBELL_GPA, &mut d);
        assert_eq!(&d, b"HVO1");
        read(DOORBELL_GPA + reg::WINDOW, &mut d);
        assert_eq!(u32::from_le_bytes(d) as u64, WINDOW_GPA);
        read(DOORBELL_GPA + reg::SIZE, &mut d);
        assert_eq!(u32::from_le_bytes(d) as u64, WINDOW_SIZE);
        let mut wide = [0xaa; 8];
        read(DOORBELL_GPA + 0x40, &mut wide);
        assert_eq!(wide, [0; 8], "unknown offsets read as zero");
    }

    #[test]
    fn pushes_are_checked_like_any_guest_input() {
        assert_eq!(
            push(0x0100_0010),
            Some(Push {
                channel: Channel::Stdout,
                len: 16
            })
        );
        assert_eq!(
            push(0x0201_0000),
            Some(Push {
                channel: Channel::Stderr,
                len: WINDOW_SIZE as usize
            })
        );
        assert_eq!(push(0x0101_0001), None, "one byte past the window");
        assert_eq!(push(0x0300_0001), None, "no channel 3");
        assert_eq!(push(0x0000_0001), None, "no channel 0");
        assert_eq!(
            decode_write(DOORBELL_GPA + reg::PUSH, &[1, 0, 0, 1, 0, 0, 0, 0]),
            None,
            "8-byte write"
        );
        assert_eq!(
            decode_write(DOORBELL_GPA + reg::MAGIC, &0x0100_0001u32.to_le_bytes()),
            None,
            "read-only register"
        );
        assert!(claims(DOORBELL_GPA + 0xfff) && !claims(DOORBELL_GPA + 0x1000));
    }
}
