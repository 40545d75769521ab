//! Calling a guest kernel function from a trap, as the guest thread
//! itself would have called it at that point.
//!
//! At a trap the vCPU is stopped at the start of an instruction of a
//! function the tracer knows is a safe place to sleep or to wake a task
//! (see [`crate::hv::park`] and [`crate::hv::doorbell`]). To make the
//! thread call `f(a, b)` there, the tracer keeps every register in the host,
//! pushes the trap's own address as the return address, loads the
//! arguments (System V: rdi, rsi, rdx) and points RIP at `f`. When `f`
//! returns, the thread is back at the trap with the stack pointer it had,
//! which is how the return is recognised: same site, same stack pointer
//! (a kernel stack belongs to one task). Then every register is restored
//! from the host copy and the trap goes on as if nothing had happened: the
//! displaced instruction runs and the function continues.
//!
//! Why this is sound: the kernel is built with `-mno-red-zone`, so nothing
//! lives below the stack pointer and the pushed return address overwrites
//! nothing; the stack layout during the call is exactly that of a call made
//! by the function containing the site, at its current stack depth, so the
//! kernel's ORC unwinder (a stack dump, a WARN) walks through it as through
//! a real call; callee-saved registers are preserved by `f` and
//! caller-saved ones are restored by the tracer; RFLAGS (the interrupt
//! flag included) is restored too. The only trace left in the guest is the
//! return address in the dead part of the stack, as any call leaves. No
//! kernel text changes beyond the trap already there.

use std::collections::HashMap;

use guest_introspect::error::IntrospectError;
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate, AddressSpace};
use vmm::trap::GuestRegs;

use crate::event::Tid;
use crate::hv::dispatch::Dispatcher;

/// Why the tracer made a thread call a kernel function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Thread `tid` sleeps in `schedule_timeout` while an engine holds it
    /// stopped.
    Park {
        /// The parked thread.
        tid: Tid,
        /// Its `task_struct`.
        task: u64,
    },
    /// The doorbell's interrupt handler wakes a task (`wake_up_state`).
    Wake,
    /// Thread `tid` runs a kernel function for an engine at a report
    /// (`send_sig` for a signal it asked for); then the trap goes on.
    Plain {
        /// The thread.
        tid: Tid,
        /// Its `task_struct`.
        task: u64,
    },
    /// Parked thread `tid` reads or writes its own memory
    /// (`access_process_vm`, as ptrace does) for a client; the data lies
    /// in `buf`, below the call's frame on its kernel stack.
    Access {
        /// The thread.
        tid: Tid,
        /// Its `task_struct`.
        task: u64,
        /// The kernel-stack buffer.
        buf: u64,
        /// Its length.
        len: usize,
    },
}

/// A call in flight: what to restore when it returns.
#[derive(Debug, Clone)]
pub(crate) struct KernelCall {
    /// Every register as it was at the trap.
    pub saved: GuestRegs,
    /// The trap's address (the return address pushed).
    pub site: u64,
    /// The stack pointer the call returns with: `saved.rsp`, or lower
    /// when the call has a buffer on the stack.
    pub frame: u64,
    /// Why.
    pub purpose: Purpose,
}

/// The calls in flight, by the stack pointer at their trap.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    by_rsp: HashMap<u64, KernelCall>,
}

impl Calls {
    /// The trap addresses of the calls in flight.
    pub fn sites(&self) -> Vec<u64> {
        self.by_rsp.values().map(|c| c.site).collect()
    }
}

impl Dispatcher {
    /// Makes the stopped vCPU (registers `regs`, at the trap `call.site`)
    /// call `function` with `args` (up to six) from the stack pointer
    /// `call.frame`; `call.saved` is what to restore when it returns (the
    /// trap's registers). Fails, leaving `regs` unchanged, if the stack
    /// slot cannot be written.
    pub(crate) fn call_kernel(
        &self,
        regs: &mut GuestRegs,
        space: AddressSpace,
        call: KernelCall,
        function: u64,
        args: &[u64],
    ) -> Result<(), IntrospectError> {
        let sp = call.frame.wrapping_sub(8);
        self.write_kernel(space, sp, &call.site.to_le_bytes())?;
        *regs = call.saved;
        regs.rsp = sp;
        regs.rip = function;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.rcx,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, value) in slots.into_iter().zip(args) {
            *slot = *value;
        }
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.by_rsp.insert(call.frame, call);
        Ok(())
    }

    /// Writes `data` at kernel virtual address `va` through `space`, each
    /// page translated on its own (a kernel stack is virtually mapped).
    pub(crate) fn write_kernel(
        &self,
        space: AddressSpace,
        va: u64,
        data: &[u8],
    ) -> Result<(), IntrospectError> {
        let mut done = 0;
        while done < data.len() {
            let at = va.wrapping_add(done as u64);
            let in_page = (0x1000 - (at & 0xfff)) as usize;
            let n = in_page.min(data.len() - done);
            let pa =
                translate(&self.ram, space, VirtAddr(at)).map_err(|e| IntrospectError::Read {
                    what: "kernel memory to write".into(),
                    va: at,
                    source: e.into(),
                })?;
            self.ram
                .write(pa.0, &data[done..done + n])
                .map_err(|e| IntrospectError::Corrupt(format!("kernel memory at {at:#x}: {e}")))?;
            done += n;
        }
        Ok(())
    }

    /// The call returning at trap `site` with stack pointer `rsp`, if any
    /// (removed from the calls in flight).
    pub(crate) fn returning_call(&self, site: u64, rsp: u64) -> Option<KernelCall> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        match calls.by_rsp.get(&rsp) {
            Some(c) if c.site == site => calls.by_rsp.remove(&rsp),
            _ => None,
        }
    }

    /// The traps of the calls in flight (one entry per call).
    pub(crate) fn calls_in_flight(&self) -> Vec<u64> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.sites()
    }
}
