//! Breakpoints in guest kernel text: planting, restoring, and telling the
//! VMM's own traps from the guest's.
//!
//! This is the one place that classifies a breakpoint exit. On PVM KVM a
//! ring-0 `int3` arrives as an emulation failure; on hardware KVM (with
//! `KVM_GUESTDBG_USE_SW_BP`) as `KVM_EXIT_DEBUG` with exception 3. Either way
//! the exit is looked up here: an address in the [`TrapTable`] is ours, an
//! `int3` byte we did not plant is the guest's and goes back to the guest as
//! a #BP.
//!
//! Two kinds of trap exist. An `int3` patched over a displaced instruction
//! that the handler can execute exactly in the VMM (a NOP, `endbr64`): no
//! window in which another vCPU could run the original instruction or half
//! of a patch. And, for sites whose first instruction the VMM cannot
//! execute itself, an instruction breakpoint in a debug register
//! ([`TrapTable::set_hw_breakpoint`], at most four, the same on every
//! vCPU): guest text stays untouched; after the handler, the vCPU loop
//! single-steps that one vCPU over the instruction with its breakpoints
//! off and then re-arms them (RFLAGS.RF is not honoured for emulated ring-0
//! code on PVM KVM), while the other vCPUs keep theirs. Both fire on PVM
//! KVM in ring 0 (measured, `docs/tracing.md`) and on hardware KVM.
//!
//! Handlers see the stopped vCPU through a [`TrapContext`]
//! (`context.rs`): registers read once and written back only if changed,
//! the special-register facts introspection needs, and guest memory.

pub mod context;
pub mod pvm;
pub mod pvm_copy;
pub mod pvm_xsave;

pub use context::{vcpu_view, GuestRegs, GuestSregs, SregsReader, TrapContext};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// PVM: the `rep movsb` of the kernel's user copies, performed by the
    /// VMM ([`pvm_copy`]).
    PvmStringCopy,
    /// A tracer site, handled by the registered handler.
    Tracer(Arc<dyn TrapHandler>),
}

impl std::fmt::Debug for TrapOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PvmPageFaultEntry => f.write_str("PvmPageFaultEntry"),
            Self::PvmStringCopy => f.write_str("PvmStringCopy"),
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

/// How the vCPU reached a tracer trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapHit {
    /// An `int3` we planted over `original`: the handler must leave the vCPU
    /// past the displaced instruction (having executed it) or elsewhere.
    Int3 {
        /// The displaced byte.
        original: u8,
    },
    /// A debug-register breakpoint: the instruction at RIP has not run; the
    /// vCPU loop steps over it after the handler, so that it runs once.
    DebugRegister,
}

/// A tracer's handler for its own traps; called on the vCPU thread with the
/// vCPU stopped at the trap. Registers the handler changes in `ctx` are
/// written back before the vCPU runs on; after an `Int3` hit the handler
/// must have moved RIP past the displaced instruction (having executed it)
/// or elsewhere.
pub trait TrapHandler: Send + Sync {
    /// Handles the trap at `va`.
    fn on_trap(&self, ctx: &mut TrapContext<'_>, va: u64, hit: TrapHit);
}

/// Number of x86 debug address registers (DR0-DR3).
pub const HW_BREAKPOINT_SLOTS: usize = 4;

/// The debug-register breakpoints every vCPU should have; each vCPU thread
/// applies a new generation before its next `KVM_RUN`.
#[derive(Default)]
struct HwBreakpoints {
    slots: [Option<(u64, Arc<dyn TrapHandler>)>; HW_BREAKPOINT_SLOTS],
}

/// Errors planting or removing traps.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    /// The address already has a trap.
    #[error("a trap is already planted at {0:#x}")]
    AlreadyPlanted(u64),
    /// All four debug registers are in use.
    #[error(
        "no free debug register for a breakpoint at {0:#x} (all {HW_BREAKPOINT_SLOTS} in use)"
    )]
    NoDebugRegister(u64),
    /// The byte to patch is not in guest RAM.
    #[error("cannot patch guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// All breakpoints the VMM and tracer planted, by guest-virtual address.
#[derive(Default)]
pub struct TrapTable {
    traps: Mutex<HashMap<u64, Trap>>,
    hw: Mutex<HwBreakpoints>,
    /// Bumped on every debug-register change; vCPUs compare it with the
    /// generation they applied.
    hw_generation: AtomicU64,
}

impl std::fmt::Debug for TrapTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrapTable")
            .field("int3", &self.len())
            .field("debug_registers", &self.hw_breakpoints())
            .finish()
    }
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

    /// Sets a debug-register instruction breakpoint at `va` on every vCPU
    /// (applied by each vCPU before it next enters the guest: pause and
    /// resume the vCPUs to be sure all have it).
    pub fn set_hw_breakpoint(
        &self,
        va: u64,
        handler: Arc<dyn TrapHandler>,
    ) -> Result<(), TrapError> {
        let mut hw = self.hw.lock().unwrap_or_else(|e| e.into_inner());
        if hw.slots.iter().flatten().any(|(a, _)| *a == va) {
            return Err(TrapError::AlreadyPlanted(va));
        }
        let slot = hw
            .slots
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(TrapError::NoDebugRegister(va))?;
        *slot = Some((va, handler));
        self.hw_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Clears the debug-register breakpoint at `va`; true if there was one.
    pub fn clear_hw_breakpoint(&self, va: u64) -> bool {
        let mut hw = self.hw.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = false;
        for s in hw.slots.iter_mut() {
            if s.as_ref().is_some_and(|(a, _)| *a == va) {
                *s = None;
                found = true;
            }
        }
        if found {
            self.hw_generation.fetch_add(1, Ordering::AcqRel);
        }
        found
    }

    /// Addresses in DR0..DR3 (`None` for a free register).
    pub fn hw_breakpoints(&self) -> [Option<u64>; HW_BREAKPOINT_SLOTS] {
        let hw = self.hw.lock().unwrap_or_else(|e| e.into_inner());
        hw.slots.each_ref().map(|s| s.as_ref().map(|(a, _)| *a))
    }

    /// The debug-register generation (see [`TrapTable::set_hw_breakpoint`]).
    pub fn hw_generation(&self) -> u64 {
        self.hw_generation.load(Ordering::Acquire)
    }

    /// The handler of the debug-register breakpoint at `va`, if any.
    pub fn hw_handler(&self, va: u64) -> Option<Arc<dyn TrapHandler>> {
        let hw = self.hw.lock().unwrap_or_else(|e| e.into_inner());
        hw.slots
            .iter()
            .flatten()
            .find(|(a, _)| *a == va)
            .map(|(_, h)| h.clone())
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

    struct Nothing;
    impl TrapHandler for Nothing {
        fn on_trap(&self, _: &mut TrapContext<'_>, _: u64, _: TrapHit) {}
    }

    #[test]
    fn four_debug_registers_and_generations() {
        let t = TrapTable::default();
        let g0 = t.hw_generation();
        for i in 0..4u64 {
            t.set_hw_breakpoint(0x1000 + i, Arc::new(Nothing)).unwrap();
        }
        assert!(matches!(
            t.set_hw_breakpoint(0x2000, Arc::new(Nothing)),
            Err(TrapError::NoDebugRegister(0x2000))
        ));
        assert!(t.hw_generation() > g0);
        assert!(t.clear_hw_breakpoint(0x1001));
        assert!(!t.clear_hw_breakpoint(0x1001));
        assert_eq!(
            t.hw_breakpoints(),
            [Some(0x1000), None, Some(0x1002), Some(0x1003)]
        );
        t.set_hw_breakpoint(0x2000, Arc::new(Nothing)).unwrap();
        assert_eq!(t.hw_breakpoints()[1], Some(0x2000));
        assert!(t.hw_handler(0x2000).is_some() && t.hw_handler(0x1001).is_none());
        assert!(matches!(
            t.set_hw_breakpoint(0x2000, Arc::new(Nothing)),
            Err(TrapError::AlreadyPlanted(_))
        ));
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
