//! The traced thread as engine callbacks see it.
//!
//! In the kernel, utrace callbacks run in the traced thread itself, so
//! `current` is the thread and its user memory can be read directly. Here
//! they run on the VMM's vCPU thread while that vCPU is stopped at the
//! trap, and every callback receives a [`ThreadContext`]: the thread's ids,
//! its saved user registers where the event has them, its user memory, and
//! the event's details (an exec's argv, a signal's siginfo). It is an
//! argument, not a thread-local: a callback may hand it on, and the tracer
//! calls engines with no lock of its own held.

use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, AddressSpace};
use guest_introspect::pt_regs::UserRegs;
use vmm::vstate::memory::GuestRam;

use crate::event::Tid;
use crate::syscalls::UserMemory;

/// What an exec report knows beyond the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecDetails {
    /// `bprm->filename`.
    pub filename: String,
    /// The new program's arguments.
    pub argv: Vec<String>,
    /// How many environment strings it got.
    pub envc: u64,
}

/// What a signal report knows: the siginfo as the handler receives it,
/// and the disposition it was taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalDetails {
    /// Signal number.
    pub signo: i32,
    /// `si_code`.
    pub code: i32,
    /// `si_pid` (sender, for SI_USER/SI_TKILL/SIGCHLD).
    pub pid: i32,
    /// `si_uid`.
    pub uid: u32,
    /// `si_status` (SIGCHLD).
    pub status: i32,
    /// The action's `sa_handler`: the handler's user address for a
    /// delivery, 0 (`SIG_DFL`) for a signal taking its default action.
    pub handler: u64,
}

/// The thread a callback reports about.
#[derive(Debug, Clone)]
pub struct ThreadContext {
    /// Thread id.
    pub tid: Tid,
    /// Thread-group (process) id.
    pub tgid: Tid,
    /// At an exec report, the exec's details.
    pub exec: Option<ExecDetails>,
    /// At a signal report, the siginfo.
    pub signal: Option<SignalDetails>,
    /// The user registers the kernel saved at its entry (`pt_regs`), where
    /// the report read them (system-call and exec reports).
    pub regs: Option<UserRegs>,
    memory: Option<(GuestRam, AddressSpace)>,
}

impl ThreadContext {
    /// A context whose user memory is `space` of `ram`.
    pub fn new(tid: Tid, tgid: Tid, ram: GuestRam, space: AddressSpace) -> Self {
        Self {
            memory: Some((ram, space)),
            ..Self::without_memory(tid, tgid)
        }
    }

    /// A context with no user memory (every read fails): a thread whose
    /// memory is gone, or a test of engine logic.
    pub fn without_memory(tid: Tid, tgid: Tid) -> Self {
        Self {
            tid,
            tgid,
            exec: None,
            signal: None,
            regs: None,
            memory: None,
        }
    }

    /// The address space its user memory is read in.
    pub fn space(&self) -> Option<AddressSpace> {
        self.memory.as_ref().map(|(_, space)| *space)
    }
}

impl UserMemory for ThreadContext {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        // User addresses only: a hostile pointer into the kernel half is
        // not the thread's memory.
        if addr
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > 0x0000_8000_0000_0000)
        {
            return false;
        }
        let Some((ram, space)) = &self.memory else {
            return false;
        };
        read_virt(ram, *space, VirtAddr(addr), buf).is_ok()
    }
}
