//! Steering a guest thread by the bits of its own `task_struct`: the
//! `syscall_work` bit that sends it through the system-call sites, and
//! TIF_NOTIFY_RESUME, which brings it to the QUIESCE site. Each is a
//! locked host operation on the word, as the guest's own
//! `set_tsk_thread_flag` and `set_task_syscall_work` are.

use guest_introspect::error::IntrospectError;
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate, AddressSpace};
use vmm::vstate::memory::GuestRam;

use crate::hv::dispatch::Dispatcher;
use crate::hv::placement::TIF_NOTIFY_RESUME;

/// `TIF_SIGPENDING`: bit 2 of the x86 thread flags
/// (`arch/x86/include/asm/thread_info.h`, unchanged since 2.6).
const TIF_SIGPENDING: u32 = 2;

impl Dispatcher {
    /// Sets TIF_NOTIFY_RESUME in `task`'s thread flags: the thread runs the
    /// return-to-user work, and so reaches the QUIESCE site, on its next
    /// way back to user mode. A thread running in user mode gets there at
    /// its next interrupt (the timer tick at the latest); a sleeping one is
    /// not woken.
    pub(crate) fn notify_resume(
        &self,
        space: AddressSpace,
        task: u64,
    ) -> Result<(), IntrospectError> {
        self.set_thread_flag(space, task, TIF_NOTIFY_RESUME)
    }

    /// Sets TIF_SIGPENDING in `task`'s thread flags (INTERRUPT): its next
    /// way back to user mode goes through `get_signal`, and a system call
    /// it sleeps in interruptibly ends, to be restarted by the kernel's
    /// rules for a call interrupted with no signal to deliver.
    pub(crate) fn set_sigpending(
        &self,
        space: AddressSpace,
        task: u64,
    ) -> Result<(), IntrospectError> {
        self.set_thread_flag(space, task, TIF_SIGPENDING)
    }

    /// Clears flag `bit` in `task`'s thread flags, as the guest's own
    /// `clear_tsk_thread_flag` does (a locked `and`).
    pub(crate) fn clear_thread_flag(
        &self,
        space: AddressSpace,
        task: u64,
        bit: u32,
    ) -> Result<(), IntrospectError> {
        self.update_thread_flag(space, task, bit, false)
    }

    /// Sets flag `bit` in `task`'s thread flags, as the guest's own
    /// `set_tsk_thread_flag` does (a locked `or`).
    pub(crate) fn set_thread_flag(
        &self,
        space: AddressSpace,
        task: u64,
        bit: u32,
    ) -> Result<(), IntrospectError> {
        self.update_thread_flag(space, task, bit, true)
    }

    /// Sets (`on`) or clears flag `bit` in `task`'s thread flags.
    fn update_thread_flag(
        &self,
        space: AddressSpace,
        task: u64,
        bit: u32,
        on: bool,
    ) -> Result<(), IntrospectError> {
        let flags = (
            self.layout.tasks.task.ti_flags.offset(),
            "task_struct.thread_info.flags",
        );
        self.update_task_bits(space, task, flags, 1 << bit, on)
    }

    /// Sets or clears the steering bit in `task`'s `syscall_work`.
    pub(crate) fn steer(
        &self,
        space: AddressSpace,
        task: u64,
        on: bool,
    ) -> Result<(), IntrospectError> {
        let work = (
            self.layout.syscall_work.offset(),
            "task_struct.thread_info.syscall_work",
        );
        self.update_task_bits(space, task, work, self.layout.steer_bit, on)
    }

    /// Clears the steering bit of an untraced `task`, unless the guest
    /// itself has syscall tracepoints enabled (then the bit is its own as
    /// well and must stay).
    pub(crate) fn steer_off_untraced(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        task: u64,
    ) -> Result<(), IntrospectError> {
        if self.guest_uses_syscall_tracepoints(k) {
            return Ok(());
        }
        self.steer(k.space(), task, false)
    }

    /// Whether the guest itself has syscall tracepoints enabled.
    fn guest_uses_syscall_tracepoints(&self, k: &RunningKernel<'_, GuestRam>) -> bool {
        match self.tracepoint_refcount {
            Some(va) => k
                .read_u32(va, "sys_tracepoint_refcount")
                .map_or(true, |n| n != 0),
            None => true,
        }
    }

    /// Sets (`on`) or clears `bits` in the task word at `task + word.0`
    /// (named `word.1`).
    fn update_task_bits(
        &self,
        space: AddressSpace,
        task: u64,
        word: (u64, &str),
        bits: u64,
        on: bool,
    ) -> Result<(), IntrospectError> {
        let (offset, what) = word;
        let va = task.wrapping_add(offset);
        let pa = translate(&self.ram, space, VirtAddr(va)).map_err(|e| IntrospectError::Read {
            what: what.into(),
            va,
            source: e.into(),
        })?;
        let r = if on {
            self.ram.fetch_or_u64(pa.0, bits)
        } else {
            self.ram.fetch_and_u64(pa.0, !bits)
        };
        r.map(|_| ())
            .map_err(|e| IntrospectError::Corrupt(format!("{what} at {va:#x}: {e}")))
    }
}
