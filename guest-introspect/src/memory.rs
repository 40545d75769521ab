//! Typed guest addresses and the one trait every memory source implements.

use std::fmt;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysAddr(pub u64);

/// A guest-virtual address (in some address space, named by a CR3 value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtAddr(pub u64);

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "phys {:#x}", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Reading a guest-physical range failed: it is not backed by guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest physical range {addr:#x}+{len:#x} is not RAM")]
pub struct PhysReadError {
    /// First byte asked for.
    pub addr: u64,
    /// Length asked for.
    pub len: usize,
}

/// Guest-physical memory, as a live VM or a snapshot file provides it.
pub trait PhysMemory {
    /// Fills `buf` from guest-physical `addr`; the whole range must be RAM.
    fn read_phys(&self, addr: PhysAddr, buf: &mut [u8]) -> Result<(), PhysReadError>;

    /// Reads one little-endian u64.
    fn read_phys_u64(&self, addr: PhysAddr) -> Result<u64, PhysReadError> {
        let mut b = [0u8; 8];
        self.read_phys(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl PhysMemory for [u8] {
    fn read_phys(&self, addr: PhysAddr, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let err = PhysReadError {
            addr: addr.0,
            len: buf.len(),
        };
        let start = usize::try_from(addr.0).map_err(|_| err)?;
        let end = start.checked_add(buf.len()).ok_or(err)?;
        buf.copy_from_slice(self.get(start..end).ok_or(err)?);
        Ok(())
    }
}
