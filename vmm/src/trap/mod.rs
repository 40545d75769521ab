//! Breakpoints in guest kernel text: planting, restoring, and telling the
//! VMM's own traps from the guest's.
//!
//! This is the one place that classifies a breakpoint exit. On PVM KVM a
//! ring-0 `int3` arrives as an emulation failure; on hardware KVM (with
//! `KVM_GUESTDBG_USE_SW_BP`) as `KVM_EXIT_DEBUG` with exception 3. Either way
//! the exit is looked up here: an address in the [`TrapTable`] is ours, an
//! `int3` byte we did not plant is the guest's and goes back to the guest as
//! a #BP.

pub mod pvm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::{GuestRam, MemoryError};

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;

/// What a planted trap is for.
#[derive(Clone)]
pub enum TrapOwner {
    /// The PVM syscall fix-up on the page-fault entry; the displaced
    /// instruction is `cld`.
    PvmPageFaultEntry,
    /// A tracer site, handled by the registered handler.
    Tracer(Arc<dyn TrapHandler>),
}

impl std::fmt::Debug for TrapOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PvmPageFaultEntry => f.write_str("PvmPageFaultEntry"),
            Self::Tracer(_) => f.write_str("Tracer"),
        }
    }
}

/// A breakpoint the VMM planted in guest kernel text.
#[derive(Debug, Clone)]
pub struct Trap {
    /// Guest-virtual address of the patched byte.
    pub va: u64,
    /// Guest-physical address of the patched byte.
    pub pa: u64,
    /// The byte the `int3` replaced.
    pub original: u8,
    /// Who handles it.
    pub owner: TrapOwner,
}

/// What a trap handler asks the vCPU loop to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapResume {
    /// Registers were updated by the handler; run on.
    Continue,
}

/// A tracer's handler for its own traps; called on the vCPU thread with the
/// vCPU stopped at the trap.
pub trait TrapHandler: Send + Sync {
    /// Handles the trap at `trap.va`; must leave the vCPU past the displaced
    /// instruction (or wherever it wants it to continue).
    fn on_trap(&self, vcpu: &kvm_ioctls::VcpuFd, ram: &GuestRam, trap: &Trap) -> TrapResume;
}

/// Errors planting or removing traps.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    /// The address already has a trap.
    #[error("a trap is already planted at {0:#x}")]
    AlreadyPlanted(u64),
    /// The byte to patch is not in guest RAM.
    #[error("cannot patch guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// All breakpoints the VMM and tracer planted, by guest-virtual address.
#[derive(Debug, Default)]
pub struct TrapTable {
    traps: Mutex<HashMap<u64, Trap>>,
}

/// How a breakpoint exit is to be handled.
#[derive(Debug)]
pub enum Breakpoint {
    /// One of ours.
    Ours(Trap),
    /// An `int3` the guest itself placed: re-inject #BP.
    GuestOwned,
}

impl TrapTable {
    /// Plants `int3` at `va` (physical `pa`), remembering the displaced byte.
    /// A single-byte write is atomic with respect to the other vCPUs: they
    /// see either the old instruction or the trap, never half of either.
    pub fn plant(
        &self,
        ram: &GuestRam,
        va: u64,
        pa: u64,
        owner: TrapOwner,
    ) -> Result<(), TrapError> {
        let mut traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        if traps.contains_key(&va) {
            return Err(TrapError::AlreadyPlanted(va));
        }
        let mut original = [0u8];
        ram.read(pa, &mut original)?;
        ram.write(pa, &[INT3])?;
        traps.insert(
            va,
            Trap {
                va,
                pa,
                original: original[0],
                owner,
            },
        );
        Ok(())
    }

    /// Removes the trap at `va`, restoring the original byte.
    pub fn remove(&self, ram: &GuestRam, va: u64) -> Result<Option<Trap>, TrapError> {
        let mut traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = traps.remove(&va) else {
            return Ok(None);
        };
        ram.write(t.pa, &[t.original])?;
        Ok(Some(t))
    }

    /// Restores every patched byte (on detach or VMM exit, and before a
    /// snapshot is written, so a snapshot never contains our `int3`s).
    pub fn remove_all(&self, ram: &GuestRam) -> Vec<Trap> {
        let mut traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<Trap> = traps.drain().map(|(_, t)| t).collect();
        for t in &all {
            // The address was RAM when planted and RAM does not shrink.
            let _ = ram.write(t.pa, &[t.original]);
        }
        all
    }

    /// Puts back traps returned by [`TrapTable::remove_all`].
    pub fn replant(&self, ram: &GuestRam, traps: Vec<Trap>) -> Result<(), TrapError> {
        for t in traps {
            self.plant(ram, t.va, t.pa, t.owner)?;
        }
        Ok(())
    }

    /// Classifies a breakpoint at `rip`: ours if planted there, else the
    /// guest's.
    pub fn classify(&self, rip: u64) -> Breakpoint {
        let traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        match traps.get(&rip) {
            Some(t) => Breakpoint::Ours(t.clone()),
            None => Breakpoint::GuestOwned,
        }
    }

    /// Number of planted traps.
    pub fn len(&self) -> usize {
        self.traps.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no trap is planted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `pa` holds one of our traps (used to show guest memory with
    /// the original bytes).
    pub fn original_at(&self, pa: u64) -> Option<u8> {
        let traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        traps.values().find(|t| t.pa == pa).map(|t| t.original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plant_classify_and_restore() {
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.write(0x5000, &[0xfc]).unwrap();
        let t = TrapTable::default();
        t.plant(
            &ram,
            0xffff_ffff_8100_5000,
            0x5000,
            TrapOwner::PvmPageFaultEntry,
        )
        .unwrap();
        let mut b = [0u8];
        ram.read(0x5000, &mut b).unwrap();
        assert_eq!(b[0], INT3);
        assert!(matches!(
            t.classify(0xffff_ffff_8100_5000),
            Breakpoint::Ours(_)
        ));
        assert!(matches!(
            t.classify(0xffff_ffff_8100_5001),
            Breakpoint::GuestOwned
        ));
        assert!(matches!(
            t.plant(
                &ram,
                0xffff_ffff_8100_5000,
                0x5000,
                TrapOwner::PvmPageFaultEntry
            ),
            Err(TrapError::AlreadyPlanted(_))
        ));
        let removed = t.remove_all(&ram);
        ram.read(0x5000, &mut b).unwrap();
        assert_eq!(b[0], 0xfc);
        assert!(t.is_empty());
        t.replant(&ram, removed).unwrap();
        ram.read(0x5000, &mut b).unwrap();
        assert_eq!(b[0], INT3);
    }

    #[test]
    fn planting_outside_ram_is_an_error() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let t = TrapTable::default();
        assert!(t
            .plant(&ram, 1, 0x10_0000_0000, TrapOwner::PvmPageFaultEntry)
            .is_err());
        assert!(t.is_empty());
    }
}
