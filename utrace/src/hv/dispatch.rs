//! From a trap to the engines: the handler `vmm` calls when a vCPU hits
//! one of the tracer's traps.
//!
//! [`Dispatcher::on_trap`] finds the trap's plan (one lookup), reads who
//! is running on the vCPU (the current task from the per-CPU area, its
//! pid and tgid), and hands a [`Trap`] to the module of the site's event
//! family under `hv/events/`. Those handlers read what their event needs,
//! update the thread table under its lock, and call
//! [`Dispatcher::report`], which runs the engines with no tracer lock held
//! and then applies their outcome. Last, an `int3` trap's displaced
//! instruction is executed in the VMM, and `vmm` writes the registers back
//! if they changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use guest_introspect::error::IntrospectError;
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::{KernelPlacement, RunningKernel};
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate, AddressSpace};
use guest_introspect::pt_regs::{PtRegsLayout, UserRegs, UserRegsFinder};
use vmm::trap::{GuestRegs, TrapContext, TrapHandler, TrapHit};
use vmm::vstate::memory::GuestRam;

use crate::context::ThreadContext;
use crate::event::{Event, Tid};
use crate::hv::displaced::gpr_mut;
use crate::hv::kcall::{Calls, Purpose};
use crate::hv::layout::TraceLayout;
use crate::hv::placement::{Displaced, PlannedTrap, TrapKind};
use crate::hv::threads::Threads;
use crate::hv::trap_space::{Derived, TrapFrame, TrapSpaces};
use crate::sites::Site;
use crate::syscalls::SyscallTable;
use crate::thread::ThreadUtrace;
use crate::ResumeAction;

/// Counters, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct TracerStats {
    /// Traps handled.
    pub traps: AtomicU64,
    /// Traps by threads that were not traced (and were steered off).
    pub untraced: AtomicU64,
    /// Handler errors (each also logged).
    pub errors: AtomicU64,
    /// Host time spent in the trap handler, in nanoseconds (engines
    /// included; the VM exit and the register transfer not).
    pub handler_ns: AtomicU64,
    /// Times a thread was put to sleep because an engine held it stopped
    /// (a held thread sleeps again after each one-second backstop).
    pub parks: AtomicU64,
    /// Doorbell rings.
    pub doorbells: AtomicU64,
    /// Wake-ups sent from the doorbell's handler.
    pub wakes: AtomicU64,
}

/// Runtime addresses of the guest kernel functions the tracer calls
/// ([`crate::hv::kcall`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelFunctions {
    /// `signed long schedule_timeout(signed long timeout)`.
    pub schedule_timeout: u64,
    /// `int wake_up_state(struct task_struct *p, unsigned int state)`.
    pub wake_up_state: u64,
    /// `int access_process_vm(struct task_struct *tsk, unsigned long addr,
    /// void *buf, int len, unsigned int gup_flags)`, if present.
    pub access_process_vm: Option<u64>,
    /// `int send_sig(int sig, struct task_struct *p, int priv)`, if present.
    pub send_sig: Option<u64>,
}

/// The tracer's state the trap handlers share; `vmm` holds it as the
/// handler of every trap the tracer set.
pub(crate) struct Dispatcher {
    pub ram: GuestRam,
    pub info: Arc<KernelInfo>,
    pub placement: KernelPlacement,
    pub layout: TraceLayout,
    /// Every trap set, by address (QUIESCE's are added when first needed).
    pub plans: RwLock<HashMap<u64, Arc<PlannedTrap>>>,
    pub syscalls: Arc<SyscallTable>,
    /// Finds a task's saved user registers.
    pub user_regs: UserRegsFinder,
    /// Their layout, for callbacks that change them.
    pub pt_regs: Arc<PtRegsLayout>,
    /// Runtime address of `sys_tracepoint_refcount`, if the kernel has it.
    pub tracepoint_refcount: Option<u64>,
    /// The kernel's own page tables (`init_top_pgt`), for work outside a
    /// trap: every process's tables map the kernel the same way, but a
    /// process's may be freed with it.
    pub kernel_space: AddressSpace,
    /// Each vCPU's per-CPU area, learned, and whether a trap's space may
    /// come from guest memory instead of `KVM_GET_SREGS`.
    pub trap_spaces: TrapSpaces,
    pub threads: Mutex<Threads>,
    pub stats: TracerStats,
    /// Kernel functions called from traps; None if the kernel lacks one
    /// (then nothing is ever parked or woken).
    pub kfuncs: Option<KernelFunctions>,
    /// A parked thread's backstop timeout: one second in the kernel's
    /// jiffies.
    pub park_jiffies: u64,
    /// The doorbell's interrupt line ([`crate::hv::doorbell`]).
    pub doorbell: Option<vmm::devices::serial::IrqLine>,
    /// Kernel calls in flight ([`crate::hv::kcall`]).
    pub calls: Mutex<Calls>,
    /// Where `get_signal` has taken a signal, once its traps are set
    /// (then signals are reported there, with a vote, instead of at
    /// `signal_setup_done`).
    pub signal_taken: std::sync::OnceLock<crate::hv::placement::SignalTaken>,
}

/// Who hit a trap.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who {
    /// The current task's `task_struct`.
    pub current: u64,
    /// Its thread id.
    pub tid: Tid,
    /// A signal to send it before it goes on.
    pub signal: Option<i32>,
    /// A general-purpose register to set before it goes on (report_exit's
    /// code as `do_exit`'s argument, a signal report's choice of signal).
    pub reg: Option<(iced_x86::Register, u64)>,
    /// Return from the trapped function at once, at its entry (the STEP
    /// trap's `send_sigtrap` for a thread the tracer steps).
    pub skip_call: bool,
}

/// A trap as its event handler sees it: who hit it and where.
pub(crate) struct Trap<'a> {
    /// The guest kernel, through the trapping vCPU's page tables.
    pub k: RunningKernel<'a, GuestRam>,
    /// The vCPU's registers at the trap (the trapped function's arguments
    /// are in rdi, rsi, ...).
    pub regs: &'a GuestRegs,
    /// The current task's `task_struct`.
    pub current: u64,
    /// Its thread id.
    pub tid: Tid,
    /// Its thread-group id.
    pub tgid: Tid,
    /// A signal to send the thread after the report (an engine's
    /// `ThreadContext::send_signal`).
    pub send_signal: std::cell::Cell<Option<i32>>,
    /// A new value for a general-purpose register, set by a handler
    /// (report_exit's changed code in rdi, `do_exit`'s argument).
    pub new_reg: std::cell::Cell<Option<(iced_x86::Register, u64)>>,
    /// Set by a handler at a function's entry: the function returns at
    /// once instead of running.
    pub skip_call: std::cell::Cell<bool>,
    /// The trap's plan.
    pub plan: &'a PlannedTrap,
}

impl Trap<'_> {
    /// The address space of the trap.
    pub fn space(&self) -> AddressSpace {
        self.k.space()
    }
}

impl TrapHandler for Dispatcher {
    fn on_trap(&self, ctx: &mut TrapContext<'_>, va: u64, hit: TrapHit) {
        let started = Instant::now();
        self.stats.traps.fetch_add(1, Ordering::Relaxed);
        let plan = self.plan_at(va);
        let Some(p) = plan else {
            log::error!("tracer: a trap at {va:#x} has no plan");
            return;
        };
        let frame = match self.trap_spaces.frame(ctx, |gs| self.derive_space(gs)) {
            Ok(frame) => frame,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::error!("tracer: a trap at {va:#x} cannot be read: {e}");
                return;
            }
        };
        let space = frame.space;
        // Whether the vCPU now runs a kernel function the tracer called
        // (the trap goes on when it returns here). Registers are changed
        // on a copy, written back only if they differ.
        let mut regs = *ctx.regs();
        let calling = if let Some(call) = self.returning_call(va, regs.rsp) {
            match call.purpose {
                Purpose::Park { .. } | Purpose::Access { .. } => {
                    self.on_park_return(call, &mut regs, space)
                }
                Purpose::Wake => self.on_doorbell(va, call.saved, &mut regs, space),
                Purpose::Plain { tid, task } => {
                    regs = call.saved;
                    let who = Who {
                        current: task,
                        tid,
                        signal: None,
                        reg: None,
                        skip_call: false,
                    };
                    self.park_if_stopped(p.site, va, &who, &mut regs, space)
                }
            }
        } else if p.site == Site::Doorbell {
            let saved = regs;
            self.on_doorbell(va, saved, &mut regs, space)
        } else {
            match self.handle(&p, ctx, frame) {
                Ok(who) => {
                    regs = *ctx.regs();
                    if let Some((reg, value)) = who.reg {
                        if let Some(r) = gpr_mut(&mut regs, reg) {
                            *r = value;
                        }
                    }
                    if who.skip_call {
                        if let Err(e) = self.return_at_entry(&mut regs, space) {
                            log::error!("tracer: cannot return from {}: {e}", p.symbol);
                        }
                    }
                    self.send_signal_from(va, &who, &mut regs, space)
                        || self.park_if_stopped(p.site, va, &who, &mut regs, space)
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!("tracer: {} at {}+{:#x}: {e}", p.site, p.symbol, p.offset);
                    false
                }
            }
        };
        if regs != *ctx.regs() {
            *ctx.regs_mut() = regs;
        }
        if calling || regs.rip != va {
            // The displaced instruction runs when the call returns here;
            // or the handler moved the thread elsewhere (a skipped call).
        } else if let TrapHit::Int3 { .. } = hit {
            if let Err(e) = self.execute_displaced(&p, ctx.regs_mut(), space) {
                log::error!("tracer: cannot continue past {va:#x}: {e}");
            }
        }
        let spent = started.elapsed().as_nanos();
        self.stats
            .handler_ns
            .fetch_add(u64::try_from(spent).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl Dispatcher {
    /// The thread table, locked. Never held across a callback.
    pub fn lock(&self) -> MutexGuard<'_, Threads> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The trap planned at `va`.
    pub fn plan_at(&self, va: u64) -> Option<Arc<PlannedTrap>> {
        let plans = self.plans.read().unwrap_or_else(|e| e.into_inner());
        plans.get(&va).cloned()
    }

    /// The kernel seen through `space`.
    pub fn kernel(&self, space: AddressSpace) -> RunningKernel<'_, GuestRam> {
        RunningKernel::assume(
            &self.ram,
            space,
            &self.info.symbols,
            &self.info.types,
            self.placement,
        )
    }

    /// What guest memory says of the thread trapped on the CPU whose
    /// per-CPU area is at `gs_base`: the space of its `mm`, or the
    /// kernel's own tables when it has none ([`crate::hv::trap_space`]).
    fn derive_space(&self, gs_base: u64) -> Result<Derived, IntrospectError> {
        let k = self.kernel(self.kernel_space);
        let current = k.read_u64(
            gs_base.wrapping_add(self.layout.current_task),
            "current task",
        )?;
        let mm = self
            .layout
            .tasks
            .task
            .mm
            .read(&k, current, "task_struct.mm")?;
        if mm == 0 {
            return Ok(Derived::NoMm(self.kernel_space));
        }
        Ok(Derived::Mm(self.mm_space(&k, mm)?))
    }

    /// Reads who hit the trap and hands it to its event's handler.
    fn handle(
        &self,
        plan: &PlannedTrap,
        ctx: &TrapContext<'_>,
        frame: TrapFrame,
    ) -> Result<Who, IntrospectError> {
        let k = self.kernel(frame.space);
        let l = &self.layout;
        let current_at = frame.gs_base.wrapping_add(l.current_task);
        let current = k.read_u64(current_at, "current task")?;
        let t = Trap {
            regs: ctx.regs(),
            current,
            tid: l.tasks.task.pid.read(&k, current, "task_struct.pid")? as u32 as Tid,
            tgid: l.tasks.task.tgid.read(&k, current, "task_struct.tgid")? as u32 as Tid,
            k,
            send_signal: std::cell::Cell::new(None),
            new_reg: std::cell::Cell::new(None),
            skip_call: std::cell::Cell::new(false),
            plan,
        };
        match plan.site {
            Site::SyscallEntry => self.on_syscall_entry(&t),
            Site::SyscallExit => self.on_syscall_exit(&t),
            Site::Exec => self.on_exec(&t),
            Site::Clone => self.on_clone(&t),
            Site::Exit => self.on_exit(&t),
            Site::Death => self.on_death(&t),
            Site::Reap => self.on_reap(&t),
            Site::SignalDelivered => self.on_signal_delivered(&t),
            Site::SignalDequeued => self.on_signal_dequeued(&t),
            Site::Quiesce => self.on_quiesce(&t),
            Site::SignalTaken => self.on_signal_taken(&t),
            Site::JobControl => self.on_job_stop(&t),
            Site::JobContinue => self.on_job_continue(&t),
            Site::Step => self.on_step_trap(&t),
            // Handled before the current task is read (see on_trap).
            Site::Doorbell => Ok(()),
        }?;
        Ok(Who {
            current: t.current,
            tid: t.tid,
            signal: t.send_signal.get(),
            reg: t.new_reg.get(),
            skip_call: t.skip_call.get(),
        })
    }

    /// Makes thread `who` call `send_sig(sig, current, 1)` from the trap
    /// at `site` if an engine asked for a signal (as ptrace's restart with
    /// a signal does); the trap goes on when it returns. Whether it did.
    fn send_signal_from(
        &self,
        site: u64,
        who: &Who,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> bool {
        let (Some(sig), Some(send_sig)) = (who.signal, self.kfuncs.and_then(|f| f.send_sig)) else {
            return false;
        };
        let call = crate::hv::kcall::KernelCall {
            saved: *regs,
            frame: regs.rsp,
            site,
            purpose: Purpose::Plain {
                tid: who.tid,
                task: who.current,
            },
        };
        let args = [sig as u64, who.current, 1];
        match self.call_kernel(regs, space, call, send_sig, &args) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "tracer: cannot send signal {sig} to thread {}: {e}",
                    who.tid
                );
                false
            }
        }
    }

    /// Counts a trap taken by a thread nobody traces.
    pub fn count_untraced(&self) {
        self.stats.untraced.fetch_add(1, Ordering::Relaxed);
    }

    /// The user registers saved at the top of `task`'s kernel stack.
    pub fn user_regs(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        task: u64,
    ) -> Result<UserRegs, IntrospectError> {
        let stack = self
            .layout
            .tasks
            .task
            .stack
            .read(k, task, "task_struct.stack")?;
        self.user_regs.read(k, stack)
    }

    /// A context for callbacks about `t`'s thread.
    pub fn thread_context(&self, t: &Trap<'_>) -> ThreadContext {
        ThreadContext::new(t.tid, t.tgid, self.ram.clone(), t.space()).with_files(
            crate::context::OpenFiles {
                info: self.info.clone(),
                placement: self.placement,
                task: t.current,
            },
        )
    }

    /// Reports `event` to `tid`'s engines, with no tracer lock held while
    /// they run, then applies the outcome: a thread left with no engine
    /// stops being traced; a REPORT vote makes it report_quiesce on its
    /// way back to user mode.
    pub fn report(&self, tid: Tid, event: &Event, thread: &ThreadContext, space: AddressSpace) {
        let Some(utrace) = self.lock().utrace(tid) else {
            return;
        };
        let action = utrace.report(event, thread);
        self.apply_outcome(tid, &utrace, event, action, space);
        // Death and reap are reported from the dead thread's last steps or
        // from the reaper: nothing of the thread runs in user mode again.
        if !matches!(event, Event::Death { .. } | Event::Reap) {
            self.sync_trap_flag(tid, space);
        }
    }

    /// Returns from the function whose entry the vCPU is at: pops the
    /// return address the call pushed (`ret`; the functions trapped so
    /// return nothing).
    fn return_at_entry(&self, regs: &mut GuestRegs, space: AddressSpace) -> Result<(), String> {
        let mut slot = [0u8; 8];
        // rsp is 8-byte aligned at a function's entry: one page holds it.
        let pa = translate(&self.ram, space, VirtAddr(regs.rsp)).map_err(|e| e.to_string())?;
        self.ram.read(pa.0, &mut slot).map_err(|e| e.to_string())?;
        regs.rip = u64::from_le_bytes(slot);
        regs.rsp = regs.rsp.wrapping_add(8);
        Ok(())
    }

    fn apply_outcome(
        &self,
        tid: Tid,
        utrace: &Arc<ThreadUtrace>,
        event: &Event,
        action: ResumeAction,
        space: AddressSpace,
    ) {
        let mut threads = self.lock();
        // Detached (and perhaps traced anew) while the engines ran: the
        // outcome belongs to a table entry that is gone.
        let Some(t) = threads
            .traced
            .get_mut(&tid)
            .filter(|t| Arc::ptr_eq(&t.utrace, utrace))
        else {
            return;
        };
        if utrace.has_no_engines() && !matches!(event, Event::Reap) {
            let task = t.task;
            threads.traced.remove(&tid);
            drop(threads);
            let _ = self.steer(space, task, false);
            return;
        }
        // A REPORT vote asks for a report_quiesce on the way back to user
        // mode; the quiesce report itself is that report (a REPORT from
        // it would only loop).
        let report_due = action == ResumeAction::Report
            && !matches!(
                event,
                Event::Quiesce | Event::Step | Event::Death { .. } | Event::Reap
            )
            && !t.report_pending
            && t.wants_quiesce()
            && self.has_quiesce_site();
        // A STOP voted where the thread cannot sleep (a signal's report,
        // made under the signal lock) takes effect at the next place it
        // can: a handler's delivery, the exit, or else the return-to-user
        // work, which TIF_NOTIFY_RESUME brings it to. Without it a signal
        // that is ignored or restarts a call would let it run on in user
        // mode.
        let stop_due = action == ResumeAction::Stop
            && matches!(event, Event::Signal { .. })
            && self.has_quiesce_site();
        if report_due {
            t.report_pending = true;
        }
        if report_due || stop_due {
            let task = t.task;
            drop(threads);
            if let Err(e) = self.notify_resume(space, task) {
                log::warn!("tracer: {action:?} for thread {tid}: {e}");
            }
        }
    }

    /// Whether the QUIESCE traps are set.
    pub fn has_quiesce_site(&self) -> bool {
        self.has_site(Site::Quiesce)
    }

    /// Whether a trap of `site` is set.
    pub fn has_site(&self, site: Site) -> bool {
        let plans = self.plans.read().unwrap_or_else(|e| e.into_inner());
        plans.values().any(|p| p.site == site)
    }

    /// Does what the instruction under the `int3` would have done.
    fn execute_displaced(
        &self,
        p: &PlannedTrap,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> Result<(), String> {
        let va = p.va;
        match p.kind {
            TrapKind::Int3(Displaced::Call { len, target }) => {
                let sp = regs.rsp.wrapping_sub(8);
                let pa = translate(&self.ram, space, VirtAddr(sp)).map_err(|e| e.to_string())?;
                let ret = va + u64::from(len);
                // The stack slot lies in one page: rsp is 8-byte aligned here
                // (function entry, after the caller's call).
                self.ram
                    .write(pa.0, &ret.to_le_bytes())
                    .map_err(|e| e.to_string())?;
                regs.rsp = sp;
                regs.rip = target;
            }
            TrapKind::Int3(d) => {
                d.execute_on_registers(va, regs);
            }
            TrapKind::DebugRegister => {}
        }
        Ok(())
    }
}
