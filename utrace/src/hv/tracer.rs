//! The tracer: its traps in the running guest kernel, the table of traced
//! threads, and the dispatch of each trap to the engines of the thread it
//! reports about.
//!
//! Every trap handler runs on the vCPU thread that hit the trap, with that
//! vCPU stopped; it reads what it needs (the current task from the per-CPU
//! area, the saved user registers from the top of its kernel stack), calls
//! the engines through [`crate::thread::ThreadUtrace`], and lets the vCPU go
//! on. Other vCPUs keep running; all tracer state is behind one lock.
//!
//! REPORT (utrace_control, or a callback's vote) sets the thread's
//! TIF_NOTIFY_RESUME: the thread reaches the QUIESCE site on its next way
//! back to user mode (after its current system call, or at the next
//! interrupt if it runs in user mode), with no signal pending and no
//! system call interrupted, and report_quiesce(0) runs there. The QUIESCE
//! trap is set the first time an engine with QUIESCE in its mask is
//! attached: until then no thread pays for it.
//!
//! Only traced threads pay for system-call tracing: the system-call sites
//! run only for threads whose `syscall_work` has
//! [`TraceLayout::steer_bit`], which hvtrace sets on the threads it traces
//! and clears when it stops. Exec, clone, exit and signal-delivery sites
//! (`get_signal`, `signal_setup_done`) trap for every thread (they are
//! rare: a process creation, an exit, a signal); the handler returns at
//! once for untraced threads. A traced thread's syscall exit reads one
//! more word (its pending set, for a SIGKILL that cuts the call short).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use guest_introspect::error::IntrospectError;
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::{KernelPlacement, RunningKernel};
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate, AddressSpace};
use vmm::machine::{MachineError, RunningVm};
use vmm::trap::{GuestRegs, GuestSregs, TrapContext, TrapError, TrapHandler, TrapHit, TrapOwner};
use vmm::vstate::memory::GuestRam;

use crate::engine::{AttachFlags, Engine, EngineData, EngineOps};
use crate::event::{Event, EventMask, Tid};
use crate::hv::context::{self, ExecDetails, SignalDetails, ThreadContext};
use crate::hv::layout::TraceLayout;
use crate::hv::placement::{plan, Displaced, PlannedTrap, TrapKind};
use crate::hv::signals;
use crate::sites::FATAL_SIGNAL;
use crate::syscalls::{SyscallTable, UserMemory};
use crate::thread::ThreadUtrace;
use crate::ResumeAction;

/// Events whose sites the tracer places.
pub const TRACED_EVENTS: EventMask = EventMask(
    EventMask::SYSCALL_ENTRY.0
        | EventMask::SYSCALL_EXIT.0
        | EventMask::CLONE.0
        | EventMask::EXEC.0
        | EventMask::EXIT.0
        | EventMask::DEATH.0
        | EventMask::REAP.0
        | EventMask::SIGNAL.0
        | FATAL_SIGNAL.0,
);

/// The system-call events (steering is needed for them).
const SYSCALL_EVENTS: EventMask = EventMask(EventMask::SYSCALL_ENTRY.0 | EventMask::SYSCALL_EXIT.0);

/// Longest argv read at an exec, in bytes.
const ARGV_MAX_BYTES: usize = 64 << 10;
/// Most argv entries read at an exec.
const ARGV_MAX_ITEMS: usize = 4096;

/// Errors setting up or driving the tracer.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// Reading the guest kernel failed.
    #[error(transparent)]
    Introspect(#[from] IntrospectError),
    /// Pausing or reaching a vCPU failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A trap could not be set.
    #[error(transparent)]
    Trap(#[from] TrapError),
    /// Some event has no usable site in this kernel.
    #[error("cannot place the tracer's traps: {0}")]
    Sites(String),
    /// No process with that id.
    #[error("no process {0} in the guest")]
    NoProcess(Tid),
    /// utrace refused the attach.
    #[error("cannot attach to thread {0}: {1}")]
    Utrace(Tid, crate::UtraceError),
}

/// How a new engine is made: its callbacks, the events it wants and
/// whether it follows the thread's children (an engine of `hvtrace trace
/// -f` attaching itself to every new child, as a utrace engine would from
/// its report_clone).
#[derive(Clone)]
pub struct EngineSpec {
    /// Callbacks.
    pub ops: Arc<dyn EngineOps>,
    /// Event mask.
    pub events: EventMask,
    /// Attach the same spec to new children and threads.
    pub follow: bool,
    /// Engine data.
    pub data: Option<EngineData>,
}

/// Counters, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct TracerStats {
    /// Traps handled.
    pub traps: AtomicU64,
    /// Traps by threads that were not traced (and were steered off).
    pub untraced: AtomicU64,
    /// Handler errors (each also logged).
    pub errors: AtomicU64,
}

/// One traced thread.
struct Traced {
    utrace: ThreadUtrace,
    /// The call it is in, from its entry report (`rt_sigreturn` sets the
    /// saved `orig_ax` to -1 before its exit is seen).
    syscall: Option<u64>,
    /// Whether each engine follows children, by engine id.
    follow: HashMap<u64, bool>,
    task: u64,
    /// A REPORT is due: report_quiesce(0) at its next return to user mode.
    report_pending: bool,
    /// The `ksignal` pointer and stack pointer of its latest `get_signal`
    /// entry: where a signal it dequeued and dies of is (see
    /// [`signals`]).
    get_signal: Option<(u64, u64)>,
}

impl Traced {
    fn new(utrace: ThreadUtrace, follow: HashMap<u64, bool>, task: u64) -> Self {
        Self {
            utrace,
            syscall: None,
            follow,
            task,
            report_pending: false,
            get_signal: None,
        }
    }

    /// Whether some engine gets report_quiesce.
    fn wants_quiesce(&self) -> bool {
        self.utrace
            .engines()
            .iter()
            .any(|e| e.events().contains(EventMask::QUIESCE))
    }
}

/// A pending "trace the next exec of this argv".
struct Armed {
    argv: Vec<String>,
    specs: Vec<EngineSpec>,
}

#[derive(Default)]
struct State {
    threads: HashMap<Tid, Traced>,
    armed: Option<Armed>,
    /// Thread groups whose killing signal was reported (by the first of
    /// their threads to exit), until the group leader is reaped.
    fatal_reported: HashSet<Tid>,
}

/// The tracer installed in one VM.
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    ram: GuestRam,
    info: Arc<KernelInfo>,
    placement: KernelPlacement,
    layout: TraceLayout,
    plans: Vec<PlannedTrap>,
    /// The QUIESCE traps (one per copy of the return-to-user loop), set
    /// when first needed.
    quiesce: Mutex<Vec<PlannedTrap>>,
    syscalls: Arc<SyscallTable>,
    /// `task->stack` to its user `pt_regs`, found on the first user task.
    pt_regs_delta: OnceLock<u64>,
    /// Runtime address of `sys_tracepoint_refcount`, if the kernel has it.
    tracepoint_refcount: Option<u64>,
    /// The kernel's own page tables (`init_top_pgt`), for work outside a
    /// trap: every process's tables map the kernel the same way, but a
    /// process's may be freed with it.
    kernel_space: AddressSpace,
    state: Mutex<State>,
    stats: TracerStats,
}

impl Tracer {
    /// Locates the kernel, plans every site of [`TRACED_EVENTS`], and sets
    /// the traps, with all vCPUs paused for the duration.
    pub fn install(vm: &RunningVm, info: Arc<KernelInfo>) -> Result<Self, TracerError> {
        vm.pause_all()?;
        let result = Self::install_paused(vm, info);
        vm.resume_all()?;
        result
    }

    fn install_paused(vm: &RunningVm, info: Arc<KernelInfo>) -> Result<Self, TracerError> {
        let v = vm.vcpu_sregs(0)?.view;
        let ram = vm.ram().clone();
        let k =
            RunningKernel::attach(&ram, &v, &info.symbols, &info.types, info.banner.as_deref())?;
        let layout = TraceLayout::resolve(&k)?;
        let (plans, errors) = plan(&k, &info.symbols, &layout, TRACED_EVENTS);
        if !errors.is_empty() {
            return Err(TracerError::Sites(errors.join("; ")));
        }
        let syscalls = Arc::new(SyscallTable::read(&k)?);
        let tracepoint_refcount = k.symbol("sys_tracepoint_refcount").ok();
        let placement = k.placement();
        let space = k.space();
        let kernel_space = match k.symbol("init_top_pgt") {
            Ok(pgt) => match translate(&ram, space, VirtAddr(pgt)) {
                Ok(pa) => AddressSpace {
                    cr3: pa.0,
                    levels: space.levels,
                },
                Err(_) => space,
            },
            Err(_) => space,
        };
        let inner = Arc::new(Inner {
            ram: ram.clone(),
            info: info.clone(),
            placement,
            layout,
            plans,
            quiesce: Mutex::new(Vec::new()),
            syscalls,
            pt_regs_delta: OnceLock::new(),
            tracepoint_refcount,
            kernel_space,
            state: Mutex::new(State::default()),
            stats: TracerStats::default(),
        });
        let mut set = Vec::new();
        let outcome = (|| -> Result<(), TracerError> {
            for p in &inner.plans {
                set_trap(vm, &inner, space, p)?;
                set.push(p.clone());
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            for p in set {
                remove_trap(vm, &p);
            }
            return Err(e);
        }
        Ok(Self { inner })
    }

    /// Plans and sets the QUIESCE traps if they are not set yet, with the
    /// vCPUs paused. Called from outside the vCPU threads (attach, control).
    fn ensure_quiesce_site(&self, vm: &RunningVm) -> Result<(), TracerError> {
        let inner = &self.inner;
        if !inner.quiesce_lock().is_empty() {
            return Ok(());
        }
        vm.pause_all()?;
        let result = (|| -> Result<(), TracerError> {
            let space = vm.vcpu_sregs(0)?.view.kernel_space();
            let k = inner.kernel(space);
            let (plans, errors) = plan(&k, &inner.info.symbols, &inner.layout, EventMask::QUIESCE);
            if plans.is_empty() {
                return Err(TracerError::Sites(errors.join("; ")));
            }
            let mut set = Vec::new();
            for p in &plans {
                if let Err(e) = set_trap(vm, inner, space, p) {
                    for done in &set {
                        remove_trap(vm, done);
                    }
                    return Err(e);
                }
                set.push(p.clone());
            }
            *inner.quiesce_lock() = plans;
            Ok(())
        })();
        vm.resume_all()?;
        result
    }

    /// The traps the tracer set (the QUIESCE ones once set).
    pub fn traps(&self) -> Vec<PlannedTrap> {
        let mut v = self.inner.plans.clone();
        v.extend(self.inner.quiesce_lock().iter().cloned());
        v
    }

    /// The engines attached to traced thread `tid`, in attach order.
    pub fn engines(&self, tid: Tid) -> Vec<Arc<Engine>> {
        self.inner
            .lock()
            .threads
            .get(&tid)
            .map(|t| t.utrace.engines().to_vec())
            .unwrap_or_default()
    }

    /// `utrace_control` from outside the guest thread: RESUME withdraws
    /// nothing yet pending, DETACH detaches the engine (and stops tracing
    /// the thread if it was the last), REPORT makes the thread call
    /// report_quiesce(0) at its next return to user mode without
    /// interrupting a system call it sleeps in (needs QUIESCE in the
    /// engine's mask: EINVAL otherwise). STOP, INTERRUPT, SINGLESTEP and
    /// BLOCKSTEP are refused with EOPNOTSUPP: the hypervisor side does not
    /// act on them yet.
    pub fn control(
        &self,
        vm: &RunningVm,
        tid: Tid,
        engine: &Engine,
        action: ResumeAction,
    ) -> Result<(), TracerError> {
        let inner = &self.inner;
        let err = |e| TracerError::Utrace(tid, e);
        match action {
            ResumeAction::Stop
            | ResumeAction::Interrupt
            | ResumeAction::SingleStep
            | ResumeAction::BlockStep => return Err(err(crate::UtraceError::NotSupported)),
            ResumeAction::Report => self.ensure_quiesce_site(vm)?,
            ResumeAction::Resume | ResumeAction::Detach => {}
        }
        let mut state = inner.lock();
        let t = state
            .threads
            .get_mut(&tid)
            .ok_or(err(crate::UtraceError::NoSuchThread))?;
        t.utrace.control(engine, action).map_err(err)?;
        let task = t.task;
        match action {
            ResumeAction::Report if !t.report_pending => {
                t.report_pending = true;
                drop(state);
                inner.notify_resume(inner.kernel_space, task)?;
            }
            ResumeAction::Detach if t.utrace.engines().is_empty() => {
                state.threads.remove(&tid);
                drop(state);
                // The task may be gone already; nothing to steer then.
                let _ = inner.steer(inner.kernel_space, task, false);
            }
            _ => {}
        }
        Ok(())
    }

    /// The running kernel's system-call names.
    pub fn syscalls(&self) -> Arc<SyscallTable> {
        self.inner.syscalls.clone()
    }

    /// Counters.
    pub fn stats(&self) -> &TracerStats {
        &self.inner.stats
    }

    /// Traces the first thread that execs `argv` from now on (the exec's
    /// system-call arguments must equal it), with an engine made from
    /// `spec`. Its first report is that execve's entry.
    pub fn trace_next_exec(
        &self,
        vm: &RunningVm,
        argv: Vec<String>,
        spec: EngineSpec,
    ) -> Result<(), TracerError> {
        self.trace_next_exec_with(vm, argv, vec![spec])
    }

    /// [`Tracer::trace_next_exec`] with several engines, attached in this
    /// order.
    pub fn trace_next_exec_with(
        &self,
        vm: &RunningVm,
        argv: Vec<String>,
        specs: Vec<EngineSpec>,
    ) -> Result<(), TracerError> {
        if specs.iter().any(|s| s.events.contains(EventMask::QUIESCE)) {
            self.ensure_quiesce_site(vm)?;
        }
        self.inner.lock().armed = Some(Armed { argv, specs });
        Ok(())
    }

    /// Thread ids currently traced.
    pub fn traced(&self) -> Vec<Tid> {
        let mut v: Vec<Tid> = self.inner.lock().threads.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Attaches an engine made from `spec` to every thread of process
    /// `pid` (a running guest process), with the vCPUs paused while its
    /// threads are found and steered. Returns the thread ids.
    pub fn attach_process(
        &self,
        vm: &RunningVm,
        pid: Tid,
        spec: &EngineSpec,
    ) -> Result<Vec<Tid>, TracerError> {
        if spec.events.contains(EventMask::QUIESCE) {
            self.ensure_quiesce_site(vm)?;
        }
        vm.pause_all()?;
        let result = self.attach_paused(pid, spec);
        vm.resume_all()?;
        result
    }

    fn attach_paused(&self, pid: Tid, spec: &EngineSpec) -> Result<Vec<Tid>, TracerError> {
        let inner = &self.inner;
        let k = inner.kernel(inner.kernel_space);
        let reader = guest_introspect::tasks::TaskReader::new(&k)?;
        let tasks = reader.all_tasks(guest_introspect::tasks::WalkLimits::default())?;
        let threads: Vec<_> = tasks.iter().filter(|t| t.pid == pid).collect();
        if threads.is_empty() {
            return Err(TracerError::NoProcess(pid));
        }
        if threads.iter().any(|t| t.is_kernel_thread()) {
            return Err(TracerError::Utrace(pid, crate::UtraceError::Permission));
        }
        let mut tids = Vec::new();
        let mut state = inner.lock();
        for t in &threads {
            let entry = state.threads.entry(t.tid).or_insert_with(|| {
                Traced::new(ThreadUtrace::new(t.tid, false), HashMap::new(), t.addr)
            });
            let e = attach(&mut entry.utrace, spec).map_err(|e| TracerError::Utrace(t.tid, e))?;
            entry.follow.insert(e.id(), spec.follow);
            tids.push(t.tid);
        }
        drop(state);
        if spec.events.intersects(SYSCALL_EVENTS) {
            for t in &threads {
                inner.steer(inner.kernel_space, t.addr, true)?;
            }
        }
        Ok(tids)
    }

    /// Detaches every engine whose data is `data` (by identity); threads
    /// left without engines stop being traced. Returns how many engines.
    pub fn detach_data(&self, data: &EngineData) -> usize {
        let inner = &self.inner;
        let mut state = inner.lock();
        let mut count = 0;
        let mut untraced = Vec::new();
        for (tid, t) in state.threads.iter_mut() {
            for e in t.utrace.engines().to_vec() {
                if e.data().is_some_and(|d| Arc::ptr_eq(d, data)) {
                    let _ = t.utrace.control(&e, ResumeAction::Detach);
                    count += 1;
                }
            }
            if t.utrace.engines().is_empty() {
                untraced.push((*tid, t.task));
            }
        }
        for (tid, _) in &untraced {
            state.threads.remove(tid);
        }
        if state.armed.as_ref().is_some_and(|a| {
            a.specs
                .iter()
                .any(|s| s.data.as_ref().is_some_and(|d| Arc::ptr_eq(d, data)))
        }) {
            state.armed = None;
        }
        drop(state);
        for (_, task) in untraced {
            // The task may be gone already; nothing to steer then.
            let _ = inner.steer(inner.kernel_space, task, false);
        }
        count
    }

    /// Whether any thread is traced or an exec is awaited.
    pub fn is_idle(&self) -> bool {
        let st = self.inner.lock();
        st.threads.is_empty() && st.armed.is_none()
    }

    /// Detaches every engine, steers every traced thread back onto the fast
    /// paths and removes every trap, with the vCPUs paused: afterwards the
    /// guest kernel text is byte for byte what it was before
    /// [`Tracer::install`].
    pub fn remove(self, vm: &RunningVm) -> Result<(), TracerError> {
        vm.pause_all()?;
        {
            let space = self.inner.kernel_space;
            let mut state = self.inner.lock();
            state.armed = None;
            for (_, mut t) in state.threads.drain() {
                for e in t.utrace.engines().to_vec() {
                    let _ = t.utrace.control(&e, ResumeAction::Detach);
                }
                // A thread that exited meanwhile has nothing to steer.
                let _ = self.inner.steer(space, t.task, false);
            }
        }
        for p in self.traps() {
            remove_trap(vm, &p);
        }
        vm.resume_all()?;
        Ok(())
    }
}

/// Sets the trap `p` for `inner`'s handler.
fn set_trap(
    vm: &RunningVm,
    inner: &Arc<Inner>,
    space: AddressSpace,
    p: &PlannedTrap,
) -> Result<(), TracerError> {
    let handler: Arc<dyn TrapHandler> = inner.clone();
    match p.kind {
        TrapKind::Int3(_) => {
            let pa = translate(&inner.ram, space, VirtAddr(p.va)).map_err(|e| {
                IntrospectError::Read {
                    what: format!("the page of {}+{:#x}", p.symbol, p.offset),
                    va: p.va,
                    source: e.into(),
                }
            })?;
            vm.traps()
                .plant(&inner.ram, p.va, pa.0, TrapOwner::Tracer(handler))?;
        }
        TrapKind::DebugRegister => {
            vm.traps().set_hw_breakpoint(p.va, handler)?;
        }
    }
    Ok(())
}

fn remove_trap(vm: &RunningVm, p: &PlannedTrap) {
    match p.kind {
        TrapKind::Int3(_) => {
            let _ = vm.traps().remove(vm.ram(), p.va);
        }
        TrapKind::DebugRegister => {
            vm.traps().clear_hw_breakpoint(p.va);
        }
    }
}

impl TrapHandler for Inner {
    fn on_trap(&self, ctx: &mut TrapContext<'_>, va: u64, hit: TrapHit) {
        self.stats.traps.fetch_add(1, Ordering::Relaxed);
        let space = ctx.sregs.view.kernel_space();
        let Some(p) = self.plan_at(va) else {
            log::error!("tracer: a trap at {va:#x} has no plan");
            return;
        };
        if let Err(e) = self.handle(&p, ctx.regs(), &ctx.sregs, space) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "tracer: {} at {}+{:#x}: {e}",
                p.event_name,
                p.symbol,
                p.offset
            );
        }
        if let TrapHit::Int3 { .. } = hit {
            if let Err(e) = self.execute_displaced(&p, ctx.regs_mut(), space) {
                log::error!("tracer: cannot continue past {va:#x}: {e}");
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn quiesce_lock(&self) -> std::sync::MutexGuard<'_, Vec<PlannedTrap>> {
        self.quiesce.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The trap planned at `va`.
    fn plan_at(&self, va: u64) -> Option<PlannedTrap> {
        self.plans
            .iter()
            .find(|p| p.va == va)
            .cloned()
            .or_else(|| self.quiesce_lock().iter().find(|p| p.va == va).cloned())
    }

    fn kernel<'a>(&'a self, space: AddressSpace) -> RunningKernel<'a, GuestRam> {
        RunningKernel::assume(
            &self.ram,
            space,
            &self.info.symbols,
            &self.info.types,
            self.placement,
        )
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
            TrapKind::Int3(Displaced::Skip { len }) => regs.rip = va + u64::from(len),
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
            TrapKind::DebugRegister => {}
        }
        Ok(())
    }

    fn handle(
        &self,
        p: &PlannedTrap,
        regs: &GuestRegs,
        sregs: &GuestSregs,
        space: AddressSpace,
    ) -> Result<(), IntrospectError> {
        let k = self.kernel(space);
        let l = &self.layout;
        let current = k.read_u64(sregs.gs_base.wrapping_add(l.current_task), "current task")?;
        let tid = k.read_u32(current + l.task_pid, "task_struct.pid")? as Tid;
        let tgid = k.read_u32(current + l.task_tgid, "task_struct.tgid")? as Tid;
        let ev = p.event;
        if ev == EventMask::SYSCALL_ENTRY || ev == EventMask::SYSCALL_EXIT {
            if !self.lock().threads.contains_key(&tid) {
                self.stats.untraced.fetch_add(1, Ordering::Relaxed);
                if !self.guest_uses_syscall_tracepoints(&k) {
                    self.steer(space, current, false)?;
                }
                return Ok(());
            }
            let u = self.user_regs(&k, current)?;
            let mut nr = u[self.reg("orig_ax")];
            {
                let mut st = self.lock();
                if let Some(t) = st.threads.get_mut(&tid) {
                    if ev == EventMask::SYSCALL_ENTRY {
                        t.syscall = Some(nr);
                    } else if let Some(entered) = t.syscall.take() {
                        if nr as i64 == -1 {
                            nr = entered;
                        }
                    }
                }
            }
            // A call a SIGKILL cut short never returns to user mode: like
            // a ptracer, engines see no exit (strace prints `= ?`).
            if ev == EventMask::SYSCALL_EXIT && signals::dying_of_sigkill(&k, l, current)? {
                return Ok(());
            }
            let event = if ev == EventMask::SYSCALL_ENTRY {
                let a = |n: &str| u[self.reg(n)];
                Event::SyscallEntry {
                    nr,
                    args: [a("di"), a("si"), a("dx"), a("r10"), a("r8"), a("r9")],
                }
            } else {
                Event::SyscallExit {
                    nr,
                    ret: u[self.reg("ax")] as i64,
                }
            };
            let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
            self.report(tid, &event, ctx);
        } else if ev == EventMask::EXEC {
            self.on_exec(&k, space, current, regs.rdi, tid, tgid)?;
        } else if ev == EventMask::CLONE {
            self.on_clone(&k, space, current, regs.rdi, tid, tgid)?;
        } else if ev == EventMask::EXIT {
            if self.lock().threads.contains_key(&tid) {
                let code = regs.rdi as i64;
                if let Some(details) = self.fatal_signal(&k, current, tid, tgid, code, regs.rsp) {
                    let mut ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
                    ctx.signal = Some(details);
                    let event = Event::Signal {
                        signo: details.signo,
                        kind: signals::fatal_kind(details.signo),
                    };
                    self.report(tid, &event, ctx);
                }
                let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
                self.report(tid, &Event::Exit { code }, ctx);
            }
        } else if ev == FATAL_SIGNAL {
            // get_signal(ksig): note where a signal this thread dequeues
            // will be, should it die of it.
            match self.lock().threads.get_mut(&tid) {
                Some(t) => t.get_signal = Some((regs.rdi, regs.rsp)),
                None => {
                    self.stats.untraced.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if ev == EventMask::DEATH {
            if self.lock().threads.contains_key(&tid) {
                let group_dead = self.group_dead(&k, current).unwrap_or(tid == tgid);
                let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
                self.report(
                    tid,
                    &Event::Death {
                        group_dead,
                        signal: -1,
                    },
                    ctx,
                );
            }
        } else if ev == EventMask::SIGNAL {
            // signal_setup_done(failed, ksig, stepping): delivered to a
            // handler unless the frame could not be written.
            if regs.rdi as i32 == 0 && self.lock().threads.contains_key(&tid) {
                let ksig = regs.rsi;
                let details = SignalDetails {
                    signo: k.read_u32(ksig + l.ksig_sig, "ksignal.sig")? as i32,
                    handler: k.read_u64(ksig + l.ksig_handler, "ksignal.ka.sa.sa_handler")?,
                    ..signals::read_siginfo(&k, &l.siginfo, ksig + l.ksig_info)?
                };
                let mut ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
                ctx.signal = Some(details);
                self.report(
                    tid,
                    &Event::Signal {
                        signo: details.signo,
                        kind: EventMask::SIGNAL,
                    },
                    ctx,
                );
            }
        } else if ev == EventMask::QUIESCE {
            let due = {
                let mut st = self.lock();
                match st.threads.get_mut(&tid) {
                    Some(t) if t.report_pending => {
                        t.report_pending = false;
                        true
                    }
                    _ => false,
                }
            };
            if due {
                let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
                self.report(tid, &Event::Quiesce, ctx);
            } else {
                self.stats.untraced.fetch_add(1, Ordering::Relaxed);
            }
        } else if ev == EventMask::REAP {
            let task = regs.rdi;
            let rtid = k.read_u32(task + l.task_pid, "task_struct.pid")? as Tid;
            let rtgid = k.read_u32(task + l.task_tgid, "task_struct.tgid")? as Tid;
            if rtid == rtgid {
                self.lock().fatal_reported.remove(&rtgid);
            }
            if self.lock().threads.contains_key(&rtid) {
                let ctx = ThreadContext::new(rtid, rtgid, self.ram.clone(), space);
                self.report(rtid, &Event::Reap, ctx);
                self.lock().threads.remove(&rtid);
            }
        }
        Ok(())
    }

    fn reg(&self, name: &str) -> usize {
        guest_introspect::tasks::UserRegs::NAMES
            .iter()
            .position(|n| *n == name)
            .expect("pt_regs register")
    }

    /// Reports `event` to `tid`'s engines with `ctx` current, then applies
    /// the outcome: a thread left with no engine stops being traced.
    fn report(&self, tid: Tid, event: &Event, ctx: ThreadContext) {
        let space = ctx.space();
        let _entered = context::enter(ctx);
        let mut state = self.lock();
        let Some(t) = state.threads.get_mut(&tid) else {
            return;
        };
        let action = t.utrace.report(event);
        if t.utrace.engines().is_empty() && !matches!(event, Event::Reap) {
            let task = t.task;
            state.threads.remove(&tid);
            drop(state);
            let _ = self.steer(space, task, false);
            return;
        }
        // A REPORT vote asks for a report_quiesce on the way back to user
        // mode; the quiesce report itself is that report (a REPORT from
        // it would only loop).
        let report_due = action == ResumeAction::Report
            && !matches!(event, Event::Quiesce | Event::Death { .. } | Event::Reap)
            && !t.report_pending
            && t.wants_quiesce()
            && !self.quiesce_lock().is_empty();
        if report_due {
            t.report_pending = true;
            let task = t.task;
            drop(state);
            if let Err(e) = self.notify_resume(space, task) {
                log::warn!("tracer: REPORT for thread {tid}: {e}");
            }
        }
    }

    /// Sets TIF_NOTIFY_RESUME in `task`'s thread flags (a locked host
    /// operation, as the guest's own `set_tsk_thread_flag`): the thread
    /// runs the return-to-user work, and so reaches the QUIESCE site, on
    /// its next way back to user mode. A thread running in user mode gets
    /// there at its next interrupt (the timer tick at the latest); a
    /// sleeping one is not woken.
    fn notify_resume(&self, space: AddressSpace, task: u64) -> Result<(), IntrospectError> {
        let bit = 1 << crate::hv::placement::TIF_NOTIFY_RESUME;
        let flags = (self.layout.task_ti_flags, "task_struct.thread_info.flags");
        self.update_task_bits(space, task, flags, bit, true)
    }

    /// Sets (`on`) or clears `bits` in the task word at `task + word.0`
    /// (named `word.1`) with a locked host operation: the guest updates
    /// these words with locked bit operations too.
    fn update_task_bits(
        &self,
        space: AddressSpace,
        task: u64,
        word: (u64, &str),
        bits: u64,
        on: bool,
    ) -> Result<(), IntrospectError> {
        let (offset, what) = word;
        let va = task + offset;
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

    /// Whether the guest itself has syscall tracepoints enabled (then the
    /// steering bit is its own as well and must stay).
    fn guest_uses_syscall_tracepoints(&self, k: &RunningKernel<'_, GuestRam>) -> bool {
        match self.tracepoint_refcount {
            Some(va) => k
                .read_u32(va, "sys_tracepoint_refcount")
                .map_or(true, |n| n != 0),
            None => true,
        }
    }

    /// Sets or clears the steering bit in `task`'s `syscall_work`, with a
    /// locked host operation (the guest updates the same word with locked
    /// bit operations).
    fn steer(&self, space: AddressSpace, task: u64, on: bool) -> Result<(), IntrospectError> {
        let work = (
            self.layout.task_syscall_work,
            "task_struct.thread_info.syscall_work",
        );
        self.update_task_bits(space, task, work, self.layout.steer_bit, on)
    }

    /// The user registers saved at the top of `task`'s kernel stack.
    fn user_regs(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        task: u64,
    ) -> Result<[u64; 21], IntrospectError> {
        let l = &self.layout;
        let stack = k.read_u64(task + l.task_stack, "task_struct.stack")?;
        let read_at = |base: u64| -> Result<[u64; 21], IntrospectError> {
            let mut raw = vec![0u8; l.pt_regs.size as usize];
            k.read(base, &mut raw, "pt_regs")?;
            let mut out = [0u64; 21];
            for (o, off) in out.iter_mut().zip(l.pt_regs.offsets) {
                let at = off as usize;
                *o = raw
                    .get(at..at + 8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            }
            Ok(out)
        };
        if let Some(delta) = self.pt_regs_delta.get() {
            return read_at(stack.wrapping_add(*delta));
        }
        let cs_i = self.reg("cs");
        let ss_i = self.reg("ss");
        for thread_size in [16u64 << 10, 32 << 10] {
            for pad in [0u64, 16] {
                let delta = thread_size - pad - l.pt_regs.size;
                let Ok(r) = read_at(stack.wrapping_add(delta)) else {
                    continue;
                };
                if matches!(r[cs_i] & 0xffff, 0x33 | 0x23) && r[ss_i] & 0xffff == 0x2b {
                    let _ = self.pt_regs_delta.set(delta);
                    return Ok(r);
                }
            }
        }
        Err(IntrospectError::Corrupt(format!(
            "no user-mode pt_regs at the top of the kernel stack {stack:#x}"
        )))
    }

    /// The siginfo of the signal that kills `task` (thread `tid` of group
    /// `tgid`) with exit code `code`, if it is the first of its group to
    /// exit by it and the signal is one strace reports (not SIGKILL).
    /// `rsp` is the stack pointer at `do_exit`.
    fn fatal_signal(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        task: u64,
        tid: Tid,
        tgid: Tid,
        code: i64,
        rsp: u64,
    ) -> Option<SignalDetails> {
        let signo = signals::killed_by(code);
        if signo == 0 || signo == signals::SIGKILL {
            return None;
        }
        let dequeued = {
            let mut st = self.lock();
            if !st.fatal_reported.insert(tgid) {
                return None;
            }
            st.threads.get_mut(&tid).and_then(|t| t.get_signal.take())
        };
        let l = &self.layout;
        // Dequeued by get_signal, whose frame do_exit runs below.
        if let Some((ksig, frame)) = dequeued {
            if rsp < frame {
                match signals::read_siginfo(k, &l.siginfo, ksig + l.ksig_info) {
                    Ok(d) if d.signo == signo => return Some(d),
                    _ => {}
                }
            }
        }
        // Short-circuited by complete_signal: still queued.
        match signals::queued_siginfo(k, l, task, signo) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("tracer: the signal that killed thread {tid}: {e}");
                None
            }
        }
    }

    fn group_dead(&self, k: &RunningKernel<'_, GuestRam>, task: u64) -> Option<bool> {
        let signal = k.field(task, "task_struct", "signal").ok()?;
        let live = k.field(signal, "signal_struct", "live").ok()?;
        Some(live == 0)
    }

    /// The argv array at user address `argv` in `mem`.
    fn read_argv(mem: &dyn UserMemory, argv: u64) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut total = 0usize;
        for i in 0..ARGV_MAX_ITEMS as u64 {
            let mut p = [0u8; 8];
            if !mem.read(argv.checked_add(8 * i)?, &mut p) {
                return None;
            }
            let p = u64::from_le_bytes(p);
            if p == 0 {
                return Some(out);
            }
            let s = read_c_string(mem, p, ARGV_MAX_BYTES - total)?;
            total += s.len() + 1;
            out.push(s);
        }
        None
    }

    fn on_exec(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        space: AddressSpace,
        current: u64,
        bprm: u64,
        tid: Tid,
        tgid: Tid,
    ) -> Result<(), IntrospectError> {
        let l = &self.layout;
        let traced = self.lock().threads.contains_key(&tid);
        let armed = self.lock().armed.is_some();
        if !traced && !armed {
            return Ok(());
        }
        // The execve's own arguments, still in the old image's memory and
        // in the saved registers.
        let u = self.user_regs(k, current)?;
        let nr = u[self.reg("orig_ax")];
        let args = {
            let a = |n: &str| u[self.reg(n)];
            [a("di"), a("si"), a("dx"), a("r10"), a("r8"), a("r9")]
        };
        let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
        let argv_ptr = match self.syscalls.name(nr) {
            Some("execve") => Some(args[1]),
            Some("execveat") => Some(args[2]),
            _ => None,
        };
        let syscall_argv = argv_ptr.and_then(|p| Self::read_argv(&ctx, p));
        let mut started = false;
        if !traced {
            let mut state = self.lock();
            let matches = state
                .armed
                .as_ref()
                .is_some_and(|a| syscall_argv.as_ref() == Some(&a.argv));
            if !matches {
                return Ok(());
            }
            let armed = state.armed.take().expect("checked");
            let mut utrace = ThreadUtrace::new(tid, false);
            let mut follow = HashMap::new();
            for spec in &armed.specs {
                let engine = attach(&mut utrace, spec)
                    .map_err(|e| IntrospectError::Corrupt(format!("attach to {tid}: {e}")))?;
                follow.insert(engine.id(), spec.follow);
            }
            state
                .threads
                .insert(tid, Traced::new(utrace, follow, current));
            drop(state);
            if armed
                .specs
                .iter()
                .any(|s| s.events.intersects(SYSCALL_EVENTS))
            {
                self.steer(space, current, true)?;
            }
            started = true;
        }
        // The new program's name and argv, from the bprm.
        let filename_ptr = k.read_u64(bprm + l.bprm_filename, "linux_binprm.filename")?;
        let filename = k.read_cstr(filename_ptr, 4096, "linux_binprm.filename")?;
        let envc = u64::from(k.read_u32(bprm + l.bprm_envc, "linux_binprm.envc")?);
        // The new image's copy, when the old one's pages are not mapped
        // (a fresh fork's data the kernel has not touched).
        let argv = syscall_argv
            .or_else(|| self.bprm_argv(k, bprm).ok())
            .unwrap_or_default();
        if started {
            // The engine's first report is the execve it attached in.
            self.report(tid, &Event::SyscallEntry { nr, args }, ctx.clone());
        }
        let mut ctx = ctx;
        ctx.exec = Some(ExecDetails {
            filename: filename.clone(),
            argv,
            envc,
        });
        self.report(tid, &Event::Exec { filename }, ctx);
        Ok(())
    }

    /// The argv strings the kernel copied to the top of the new image's
    /// stack (`bprm->p` in `bprm->mm`).
    fn bprm_argv(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        bprm: u64,
    ) -> Result<Vec<String>, IntrospectError> {
        let l = &self.layout;
        let mm = k.read_u64(bprm + l.bprm_mm, "linux_binprm.mm")?;
        let pgd = k.read_u64(mm + l.mm_pgd, "mm_struct.pgd")?;
        let pa =
            translate(&self.ram, k.space(), VirtAddr(pgd)).map_err(|e| IntrospectError::Read {
                what: "the new image's page tables".into(),
                va: pgd,
                source: e.into(),
            })?;
        let space = AddressSpace {
            cr3: pa.0,
            levels: k.space().levels,
        };
        let argc = k.read_u32(bprm + l.bprm_argc, "linux_binprm.argc")? as usize;
        if argc > ARGV_MAX_ITEMS {
            return Err(IntrospectError::Corrupt(format!(
                "exec with {argc} arguments"
            )));
        }
        let mem = ThreadContext::new(0, 0, self.ram.clone(), space);
        let mut at = k.read_u64(bprm + l.bprm_p, "linux_binprm.p")?;
        let mut out = Vec::with_capacity(argc);
        let mut total = 0;
        for _ in 0..argc {
            let s = read_c_string(&mem, at, ARGV_MAX_BYTES - total).ok_or_else(|| {
                IntrospectError::Corrupt(format!("unreadable exec argument at {at:#x}"))
            })?;
            at += s.len() as u64 + 1;
            total += s.len() + 1;
            out.push(s);
        }
        Ok(out)
    }

    fn on_clone(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        space: AddressSpace,
        parent: u64,
        child: u64,
        tid: Tid,
        tgid: Tid,
    ) -> Result<(), IntrospectError> {
        let l = &self.layout;
        if !self.lock().threads.contains_key(&tid) {
            return Ok(());
        }
        let child_tid = k.read_u32(child + l.task_pid, "task_struct.pid")? as Tid;
        let flags = self.clone_flags(k, parent, child)?;
        // Followers attach to the child before it first runs.
        let mut state = self.lock();
        let specs: Vec<EngineSpec> = state
            .threads
            .get(&tid)
            .map(|t| {
                t.utrace
                    .engines()
                    .iter()
                    .filter(|e| t.follow.get(&e.id()).copied().unwrap_or(false))
                    .map(|e| EngineSpec {
                        ops: e.ops.clone(),
                        events: e.events(),
                        follow: true,
                        data: e.data().cloned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut wants_syscalls = false;
        if !specs.is_empty() {
            let mut utrace = ThreadUtrace::new(child_tid, false);
            let mut follow = HashMap::new();
            for spec in &specs {
                if let Ok(e) = attach(&mut utrace, spec) {
                    follow.insert(e.id(), true);
                    wants_syscalls |= spec.events.intersects(SYSCALL_EVENTS);
                }
            }
            state
                .threads
                .insert(child_tid, Traced::new(utrace, follow, child));
        }
        drop(state);
        // The child inherited the parent's syscall_work.
        if wants_syscalls {
            self.steer(space, child, true)?;
        } else if !self.guest_uses_syscall_tracepoints(k) {
            self.steer(space, child, false)?;
        }
        let ctx = ThreadContext::new(tid, tgid, self.ram.clone(), space);
        self.report(
            tid,
            &Event::Clone {
                child: child_tid,
                flags,
            },
            ctx,
        );
        Ok(())
    }

    /// The clone flags: from the parent's system call (clone, clone3,
    /// fork, vfork), else inferred from the child.
    fn clone_flags(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        parent: u64,
        child: u64,
    ) -> Result<u64, IntrospectError> {
        const CLONE_VM: u64 = 0x100;
        const CLONE_VFORK: u64 = 0x4000;
        const CLONE_THREAD: u64 = 0x10000;
        const SIGCHLD: u64 = 17;
        if let Ok(u) = self.user_regs(k, parent) {
            let di = u[self.reg("di")];
            match self.syscalls.name(u[self.reg("orig_ax")]) {
                Some("clone") => return Ok(di),
                Some("fork") => return Ok(SIGCHLD),
                Some("vfork") => return Ok(CLONE_VM | CLONE_VFORK | SIGCHLD),
                Some("clone3") => {
                    let ctx = ThreadContext::new(0, 0, self.ram.clone(), k.space());
                    let mut b = [0u8; 8];
                    if ctx.read(di, &mut b) {
                        return Ok(u64::from_le_bytes(b));
                    }
                }
                _ => {}
            }
        }
        let l = &self.layout;
        let mut flags = 0;
        let (ptgid, ctgid) = (
            k.read_u32(parent + l.task_tgid, "tgid")?,
            k.read_u32(child + l.task_tgid, "tgid")?,
        );
        if ptgid == ctgid {
            flags |= CLONE_THREAD;
        }
        if k.read_u64(parent + l.task_mm, "mm")? == k.read_u64(child + l.task_mm, "mm")? {
            flags |= CLONE_VM;
        }
        if k.read_u64(child + l.task_vfork_done, "vfork_done")? != 0 {
            flags |= CLONE_VFORK;
        }
        Ok(flags)
    }
}

/// Attaches a new engine made from `spec` and sets its events.
fn attach(utrace: &mut ThreadUtrace, spec: &EngineSpec) -> Result<Arc<Engine>, crate::UtraceError> {
    let flags = AttachFlags {
        create: true,
        ..Default::default()
    };
    let e = utrace.attach(flags, spec.ops.clone(), spec.data.clone())?;
    utrace.set_events(&e, spec.events)?;
    Ok(e)
}

/// A NUL-terminated string of at most `max` bytes at user address `addr`.
fn read_c_string(mem: &dyn UserMemory, addr: u64, max: usize) -> Option<String> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let room = (4096 - (at & 4095)) as usize;
        let mut chunk = vec![0u8; room.min(max - out.len())];
        if !mem.read(at, &mut chunk) {
            return None;
        }
        if let Some(nul) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&chunk);
        at += chunk.len() as u64;
    }
    None
}
