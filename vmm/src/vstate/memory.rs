//! Guest RAM: allocation, physical reads and writes, and virtual reads
//! through the guest's own page tables.

use std::sync::Arc;

use guest_introspect::memory::{PhysAddr, PhysMemory, PhysReadError};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory,
};

use crate::arch::x86_64::bootparams::ram_ranges;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map guest RAM.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A write hit an address that is not guest RAM.
    #[error("guest physical range {addr:#x}+{len:#x} is not RAM")]
    OutOfRange {
        /// First byte.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// An atomic access to a word that is not naturally aligned.
    #[error("guest physical address {0:#x} is not 8-byte aligned for an atomic access")]
    Misaligned(u64),
}

/// The guest's RAM, shared by the vCPU threads, devices and the tracer.
#[derive(Clone, Debug)]
pub struct GuestRam {
    mem: Arc<GuestMemoryMmap>,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of anonymous memory as guest RAM (with the 32-bit
    /// MMIO hole left out above 3 GiB).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
                mib: size >> 20,
                source,
            })?;
        Ok(Self {
            mem: Arc::new(mem),
            size,
        })
    }

    /// Bytes of RAM the guest has.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The underlying vm-memory object.
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Regions as (guest address, host pointer, length), for KVM memory slots
    /// and snapshots.
    pub fn regions(&self) -> Vec<(u64, *mut u8, usize)> {
        GuestMemoryBackend::iter(&*self.mem)
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("region start is mapped");
                (r.start_addr().0, host, r.len() as usize)
            })
            .collect()
    }

    /// Writes `data` at guest-physical `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: data.len(),
            })
    }

    /// Atomically ORs `bits` into the aligned 64-bit word at guest-physical
    /// `addr` and returns its old value. A locked host instruction on the
    /// same physical memory is atomic with respect to the guest's own
    /// `lock or`/`lock and` on the word (e.g. the kernel's `set_bit`).
    pub fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemoryError> {
        self.atomic_u64(addr, |w| w.fetch_or(bits, Ordering::SeqCst))
    }

    /// Atomically ANDs `mask` into the aligned 64-bit word at `addr` and
    /// returns its old value (see [`GuestRam::fetch_or_u64`]).
    pub fn fetch_and_u64(&self, addr: u64, mask: u64) -> Result<u64, MemoryError> {
        self.atomic_u64(addr, |w| w.fetch_and(mask, Ordering::SeqCst))
    }

    /// Atomically replaces the aligned 64-bit word at `addr` with `new` if
    /// it still holds `current`; returns the value found (see
    /// [`GuestRam::fetch_or_u64`]). What a processor does to set a
    /// page-table entry's accessed and dirty bits.
    pub fn compare_exchange_u64(
        &self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        self.atomic_u64(addr, |w| {
            w.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
        })
    }

    fn atomic_u64<R>(&self, addr: u64, f: impl FnOnce(&AtomicU64) -> R) -> Result<R, MemoryError> {
        if !addr.is_multiple_of(8) {
            return Err(MemoryError::Misaligned(addr));
        }
        let slice = self
            .mem
            .get_slice(GuestAddress(addr), 8)
            .map_err(|_| MemoryError::OutOfRange { addr, len: 8 })?;
        let word = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| MemoryError::Misaligned(addr))?;
        Ok(f(word))
    }

    /// Reads `buf.len()` bytes from guest-physical `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
            })
    }
}

impl PhysMemory for GuestRam {
    fn read_phys(&self, addr: PhysAddr, buf: &mut [u8]) -> Result<(), PhysReadError> {
        self.read(addr.0, buf).map_err(|_| PhysReadError {
            addr: addr.0,
            len: buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_bit_updates_on_guest_words() {
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.write(0x1000, &0x10u64.to_le_bytes()).unwrap();
        assert_eq!(ram.fetch_or_u64(0x1000, 0x2).unwrap(), 0x10);
        assert_eq!(ram.fetch_and_u64(0x1000, !0x10).unwrap(), 0x12);
        let mut b = [0u8; 8];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x2);
        assert!(matches!(
            ram.fetch_or_u64(0x1004, 1),
            Err(MemoryError::Misaligned(0x1004))
        ));
        assert!(matches!(
            ram.fetch_or_u64(1 << 40, 1),
            Err(MemoryError::OutOfRange { .. })
        ));
    }
}
