//! The doorbell: how the tracer wakes a guest task from outside.
//!
//! Only kernel code can wake a sleeping task, and only from a context
//! where that is allowed. The tracer gets such a context on demand: it
//! pulses the interrupt line of the control UART (ttyS1, which the guest's
//! init keeps open), and the guest's 8250 driver runs its interrupt handler
//! `serial8250_interrupt`, where the tracer has a trap (the DOORBELL site).
//! There, in hard-interrupt context, exactly where a timer's wake-up runs,
//! the tracer makes the vCPU call `wake_up_state(task, state)` once per
//! queued wake ([`crate::hv::kcall`]) and then lets the handler run on. The
//! handler finds nothing pending in the UART (or whatever really is) and
//! returns as after any spurious interrupt.
//!
//! Safety of the task pointer: a wake is queued only for a task the tracer
//! knows is alive (parked in its sleep, or traced and not yet reaped), and
//! checked again under the table's lock when the doorbell trap fires. From
//! that check to the end of the `wake_up_state` call the vCPU is inside an
//! interrupt handler with interrupts off, so no RCU grace period can end on
//! it, and a task is freed only a grace period after `release_task` (whose
//! REAP trap removes it from the tracer's table). A task that woke by
//! itself meanwhile gets a harmless wake-up of a running task.
//!
//! A guest without the handler (ttyS1 closed, a driver built without
//! interrupts) never rings: parked threads then wake at their one-second
//! backstop ([`crate::hv::park`]), and INTERRUPT waits for the thread's
//! next return to user mode.

use std::sync::atomic::Ordering;

use guest_introspect::paging::AddressSpace;
use vmm::trap::GuestRegs;

use crate::event::Tid;
use crate::hv::dispatch::Dispatcher;
use crate::hv::kcall::{KernelCall, Purpose};
use crate::hv::park::TASK_UNINTERRUPTIBLE;
use crate::hv::threads::Threads;

/// A wake-up to send: `wake_up_state(task, state)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wake {
    /// The thread.
    pub tid: Tid,
    /// Its `task_struct`.
    pub task: u64,
    /// The sleep states it is woken from: `TASK_UNINTERRUPTIBLE` for a
    /// parked thread, `TASK_INTERRUPTIBLE` for INTERRUPT.
    pub state: u64,
}

impl Wake {
    /// Whether the task is still known alive and in the state the wake was
    /// queued for.
    fn still_due(&self, threads: &Threads) -> bool {
        if self.state == TASK_UNINTERRUPTIBLE {
            threads.parked.get(&self.tid) == Some(&self.task)
        } else {
            threads
                .traced
                .get(&self.tid)
                .is_some_and(|t| t.task == self.task)
        }
    }
}

impl Dispatcher {
    /// Pulses the doorbell's interrupt line, if the VM has one.
    pub(crate) fn ring_doorbell(&self) {
        if let Some(line) = &self.doorbell {
            if let Err(e) = line.pulse() {
                log::warn!("tracer: cannot ring the doorbell: {e}");
            }
            self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The DOORBELL trap at `site` (registers `saved` at the trap): starts
    /// the next due wake-up as a call, if any. Returns whether it did (else
    /// `regs` is `saved` and the handler runs on).
    pub(crate) fn on_doorbell(
        &self,
        site: u64,
        saved: GuestRegs,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> bool {
        *regs = saved;
        let Some(f) = self.kfuncs else {
            return false;
        };
        let mut threads = self.lock();
        while let Some(w) = threads.wakes.pop_front() {
            if !w.still_due(&threads) {
                continue;
            }
            let call = KernelCall {
                saved,
                frame: saved.rsp,
                site,
                purpose: Purpose::Wake,
            };
            match self.call_kernel(regs, space, call, f.wake_up_state, &[w.task, w.state]) {
                Ok(()) => {
                    self.stats.wakes.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    log::warn!("tracer: cannot wake thread {}: {e}", w.tid);
                    *regs = saved;
                }
            }
        }
        false
    }
}
