//! utrace served from the hypervisor: traps on the running guest kernel's
//! tracehook sites, the traced-thread table, steering through task state,
//! and the dispatch of events to engines. In the order a trap passes them:
//!
//! * [`placement`]: each site's trap address and kind (int3 or debug
//!   register), found once at install from symbols and disassembly.
//! * [`displaced`]: the instructions the VMM executes in place of the one
//!   under an `int3`.
//! * [`tracer`]: installing the traps; the client's operations (trace the
//!   next exec, attach, control, detach); removing it all.
//! * [`trap_space`]: the trapped thread's address space and per-CPU area,
//!   from guest memory once checked against the special registers.
//! * [`dispatch`]: the trap handler: which site, which thread, which event
//!   module; engines called with no lock held; the displaced instruction.
//! * [`events`]: one module per event family (system calls, exec, clone,
//!   exit/death/reap, signals, quiesce).
//! * [`threads`]: the traced-thread table and what it keeps per thread.
//! * [`task_bits`]: steering a thread through its own task flags.
//! * [`layout`]: the offsets and flag bits the handlers use, from BTF.
//! * [`signals`]: siginfo of deliveries and of signals that kill by their
//!   default action.
//!
//! Control (a thread held stopped, woken, interrupted):
//!
//! * [`kcall`]: making a trapped thread call a guest kernel function and
//!   picking the trap up again when it returns.
//! * [`park`]: STOP: a held thread sleeps in its own kernel until released.
//! * [`doorbell`]: waking a task from outside, through the control UART's
//!   interrupt handler.
//! * [`memory`]: a stopped thread's registers and memory, read and written.

pub mod dispatch;
pub mod displaced;
pub mod doorbell;
pub mod events;
pub mod kcall;
pub mod layout;
pub mod memory;
pub mod park;
pub mod placement;
pub mod signals;
pub mod task_bits;
pub mod threads;
pub mod tracer;
pub mod trap_space;

#[cfg(test)]
pub(crate) mod tests;

pub use dispatch::TracerStats;
pub use memory::StoppedRegs;
pub use park::StopHolder;
pub use threads::EngineSpec;
pub use tracer::{Examine, Held, Target, Tracer, TracerError};
