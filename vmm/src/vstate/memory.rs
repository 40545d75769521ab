//! Guest RAM: allocation, physical reads and writes, and virtual reads
//! through the guest's own page tables.

use std::sync::Arc;

use guest_introspect::memory::{PhysAddr, PhysMemory, PhysReadError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
