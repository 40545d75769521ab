//! The traced thread as engine callbacks see it.
//!
//! In the kernel, utrace callbacks run in the traced thread itself, so
//! `current` is the thread and its user memory can be read directly. Here
//! they run on the VMM's vCPU thread while that vCPU is stopped at the
//! trap; [`current`] gives the callback the same view: the thread's ids
//! and its user memory (and, at an exec report, the new program's argv).
//! Outside a callback it is `None`.

use std::cell::RefCell;
use std::rc::Rc;

use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, AddressSpace};
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
    ram: GuestRam,
    space: AddressSpace,
}

impl ThreadContext {
    /// A context whose user memory is `space` of `ram`.
    pub fn new(tid: Tid, tgid: Tid, ram: GuestRam, space: AddressSpace) -> Self {
        Self {
            tid,
            tgid,
            exec: None,
            signal: None,
            ram,
            space,
        }
    }
}

impl ThreadContext {
    /// The address space its user memory is read in.
    pub fn space(&self) -> AddressSpace {
        self.space
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
        read_virt(&self.ram, self.space, VirtAddr(addr), buf).is_ok()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<ThreadContext>>> = const { RefCell::new(None) };
}

/// The thread the running callback reports about (None outside callbacks).
pub fn current() -> Option<Rc<ThreadContext>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Makes `ctx` current until the guard is dropped.
pub(crate) fn enter(ctx: ThreadContext) -> Entered {
    let previous = CURRENT.with(|c| c.borrow_mut().replace(Rc::new(ctx)));
    Entered { previous }
}

/// Restores the previous context when dropped.
pub(crate) struct Entered {
    previous: Option<Rc<ThreadContext>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}
