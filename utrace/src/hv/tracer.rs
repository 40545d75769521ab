//! The tracer: installing its traps in the running guest kernel, the
//! operations a client asks for (trace the next exec, attach to a
//! process, control an engine, detach), and removing it all again.
//!
//! What happens at each trap is [`crate::hv::dispatch`]'s and the event
//! modules' under `hv/events/`. Every trap handler runs on the vCPU thread
//! that hit the trap, with that vCPU stopped; the other vCPUs keep
//! running. The thread table is behind one lock, which no engine callback
//! runs under.
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
//! and clears when it stops. Exec, clone, exit and signal sites (`get_signal`,
//! `signal_setup_done`) trap for every thread (they are rare: a process
//! creation, an exit, a signal); the handler returns at once for untraced
//! threads. A traced thread's syscall exit reads one more word (its
//! pending set, for a SIGKILL that cuts the call short).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use guest_introspect::error::IntrospectError;
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{translate, AddressSpace};
use guest_introspect::pt_regs::UserRegsFinder;
use guest_introspect::tasks::TaskReader;
use vmm::machine::{MachineError, RunningVm};
use vmm::trap::{TrapError, TrapHandler, TrapOwner};

use crate::engine::{Engine, EngineData};
use crate::event::{EventMask, Tid};
use crate::hv::dispatch::{Dispatcher, KernelFunctions, TracerStats};
use crate::hv::doorbell::Wake;
use crate::hv::kcall::Calls;
use crate::hv::layout::TraceLayout;
use crate::hv::memory::{AccessOp, StoppedRegs};
use crate::hv::park::{StopHolder, TASK_INTERRUPTIBLE};
use crate::hv::placement::{find_signal_taken, plan, PlannedTrap, SignalTaken, TrapKind};
use crate::hv::threads::{Armed, EngineSpec, Threads, Traced, SYSCALL_EVENTS};
use crate::hv::trap_space::TrapSpaces;
use crate::sites::Site;
use crate::syscalls::SyscallTable;
use crate::ResumeAction;
use guest_introspect::pt_regs::Reg;

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
    #[error("no process {0} in the guest (ESRCH)")]
    NoProcess(Tid),
    /// No thread with that id.
    #[error("no thread {0} in the guest (ESRCH)")]
    NoThread(Tid),
    /// utrace refused the attach.
    #[error("cannot attach to thread {0}: {1}")]
    Utrace(Tid, crate::UtraceError),
}

/// The threads [`Tracer::hold_stopped`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// (thread id, process id) of each.
    pub threads: Vec<(Tid, Tid)>,
    /// The ones parked already; the others stop at their next safe point
    /// (a thread blocked in a system call, when the call returns).
    pub stopped: Vec<Tid>,
}

/// A [`Tracer::prepare_examine`] token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Examine {
    tid: Tid,
    /// The thread's count of parks left, then.
    unparked: u64,
}

/// What an operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every thread of a process.
    Process(Tid),
    /// One thread.
    Thread(Tid),
}

/// The tracer installed in one VM. Clones share it (an engine may keep
/// one to call [`Tracer::control`] from its callbacks).
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Dispatcher>,
}

impl Tracer {
    /// A tracer over a dispatcher built by hand (the KVM-free tests).
    #[cfg(test)]
    pub(crate) fn from_dispatcher(inner: Arc<Dispatcher>) -> Self {
        Self { inner }
    }

    /// Locates the kernel, plans every site of [`Site::TRACED`], and sets
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
        let (plans, errors) = plan(&k, &info.symbols, &layout, &Site::TRACED);
        if !errors.is_empty() {
            return Err(TracerError::Sites(errors.join("; ")));
        }
        let optional = plan_optional(&k, &info.symbols, &layout);
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
        let kfuncs = match (k.symbol("schedule_timeout"), k.symbol("wake_up_state")) {
            (Ok(schedule_timeout), Ok(wake_up_state)) => Some(KernelFunctions {
                schedule_timeout,
                wake_up_state,
                access_process_vm: k.symbol("access_process_vm").ok(),
                send_sig: k.symbol("send_sig").ok(),
            }),
            _ => None,
        };
        let inner = Arc::new(Dispatcher {
            kfuncs,
            park_jiffies: jiffies_per_second(&k),
            doorbell: vm.control_irq(),
            calls: Mutex::new(Calls::default()),
            ram: ram.clone(),
            info: info.clone(),
            placement: k.placement(),
            user_regs: UserRegsFinder::new(layout.tasks.pt_regs.clone()),
            pt_regs: Arc::new(layout.tasks.pt_regs.clone()),
            layout,
            plans: RwLock::new(HashMap::new()),
            syscalls: Arc::new(SyscallTable::read(&k)?),
            tracepoint_refcount: k.symbol("sys_tracepoint_refcount").ok(),
            kernel_space,
            trap_spaces: TrapSpaces::default(),
            threads: Mutex::new(Threads::default()),
            stats: TracerStats::default(),
            signal_taken: std::sync::OnceLock::new(),
        });
        set_traps(vm, &inner, space, plans)?;
        set_optional_traps(vm, &inner, space, optional);
        Ok(Self { inner })
    }

    /// Plans and sets the QUIESCE traps and the DOORBELL trap if they are
    /// not set yet, with the vCPUs paused. Called from outside the vCPU
    /// threads (attach, control). A kernel without a usable doorbell site
    /// still gets QUIESCE (parked threads then wake at their backstop).
    fn ensure_quiesce_site(&self, vm: &RunningVm) -> Result<(), TracerError> {
        let inner = &self.inner;
        if inner.has_quiesce_site() {
            return Ok(());
        }
        vm.pause_all()?;
        let result = (|| -> Result<(), TracerError> {
            let space = vm.vcpu_sregs(0)?.view.kernel_space();
            let k = inner.kernel(space);
            set_traps(vm, inner, space, plan_required(&k, inner, Site::Quiesce)?)?;
            let (bell, errors) = plan(&k, &inner.info.symbols, &inner.layout, &[Site::Doorbell]);
            if bell.is_empty() || inner.doorbell.is_none() {
                log::warn!(
                    "tracer: no doorbell ({}): stopped threads resume within a second of release",
                    if errors.is_empty() {
                        "the VM has no control UART".to_string()
                    } else {
                        errors.join("; ")
                    }
                );
            } else if let Err(e) = set_traps(vm, inner, space, bell) {
                log::warn!(
                    "tracer: no doorbell ({e}): stopped threads resume within a second of release"
                );
            }
            Ok(())
        })();
        vm.resume_all()?;
        result
    }

    /// The traps the tracer set (the QUIESCE ones once set).
    pub fn traps(&self) -> Vec<PlannedTrap> {
        let plans = self.inner.plans.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<PlannedTrap> = plans.values().map(|p| (**p).clone()).collect();
        v.sort_by_key(|p| p.va);
        v
    }

    /// The engines attached to traced thread `tid`, in attach order.
    pub fn engines(&self, tid: Tid) -> Vec<Arc<Engine>> {
        self.inner
            .lock()
            .utrace(tid)
            .map(|u| u.engines())
            .unwrap_or_default()
    }

    /// The engine attached to thread `tid` with data `data` (the first, in
    /// attach order), as utrace's `UTRACE_ATTACH_MATCH_DATA` finds one.
    pub fn engine_with_data(&self, tid: Tid, data: &EngineData) -> Option<Arc<Engine>> {
        self.engines(tid)
            .into_iter()
            .find(|e| e.data().is_some_and(|d| Arc::ptr_eq(d, data)))
    }

    /// `utrace_control` from outside the guest thread or from a callback:
    /// RESUME withdraws this engine's STOP, DETACH detaches the engine
    /// (and stops tracing the thread if it was the last); a thread no
    /// engine holds any more runs on. STOP holds the thread: Ok if it is
    /// already parked, else EINPROGRESS and it parks at its next safe
    /// point ([`crate::hv::park`]). REPORT makes the thread call
    /// report_quiesce(0) at its next return to user mode without
    /// interrupting a system call it sleeps in (needs QUIESCE in the
    /// engine's mask: EINVAL otherwise). INTERRUPT also wakes it from an
    /// interruptible sleep, and it reports through report_signal with no
    /// signal (signo 0, utrace's UTRACE_SIGNAL_REPORT); the interrupted
    /// call is restarted by the kernel's own rules. SINGLESTEP and
    /// BLOCKSTEP (QUIESCE needed in the mask, EINVAL otherwise) make the
    /// thread step: a stopped thread resumes for one instruction (or one
    /// block) and reports it through report_quiesce with
    /// [`crate::context::ThreadContext::step`] set; a running thread first
    /// reports at its next return to user mode, as for REPORT, and steps
    /// from there. From a callback, REPORT, STOP and INTERRUPT work once
    /// the control sites are set (attaching an engine with QUIESCE, or any
    /// call of this from outside a callback, sets them), and SINGLESTEP,
    /// BLOCKSTEP (as a call or a vote) once [`Tracer::ensure_step_site`]
    /// has set the STEP trap: setting traps pauses every vCPU, which a
    /// vCPU thread cannot wait for.
    pub fn control(
        &self,
        vm: &RunningVm,
        tid: Tid,
        engine: &Engine,
        action: ResumeAction,
    ) -> Result<(), TracerError> {
        if matches!(
            action,
            ResumeAction::Report
                | ResumeAction::Stop
                | ResumeAction::Interrupt
                | ResumeAction::SingleStep
                | ResumeAction::BlockStep
        ) {
            self.ensure_quiesce_site(vm)?;
        }
        if matches!(action, ResumeAction::SingleStep | ResumeAction::BlockStep) {
            self.ensure_step_site(vm)?;
        }
        self.inner.control(tid, engine, action)
    }

    /// Sets the STEP trap (`send_sigtrap`'s entry) if it is not set, with
    /// the vCPUs paused: engines may then step threads, by a vote or by
    /// [`Tracer::control`]. Called from outside the vCPU threads.
    pub fn ensure_step_site(&self, vm: &RunningVm) -> Result<(), TracerError> {
        let inner = &self.inner;
        if inner.has_step_site() {
            return Ok(());
        }
        vm.pause_all()?;
        let result = (|| -> Result<(), TracerError> {
            let space = vm.vcpu_sregs(0)?.view.kernel_space();
            let k = inner.kernel(space);
            set_traps(vm, inner, space, plan_required(&k, inner, Site::Step)?)
        })();
        vm.resume_all()?;
        result
    }

    /// Removes the STEP trap once no thread steps or carries a trap flag
    /// the tracer set (a thread left with one traps once more, and is
    /// cleared then: call this again later). Whether it is gone.
    pub fn release_step_site(&self, vm: &RunningVm) -> Result<bool, TracerError> {
        let inner = &self.inner;
        if !inner.has_step_site() {
            return Ok(true);
        }
        let busy = |table: &crate::hv::threads::Threads| {
            !table.trap_flag.is_empty()
                || table.traced.values().any(|t| t.utrace.stepping().is_some())
        };
        if busy(&inner.lock()) {
            return Ok(false);
        }
        vm.pause_all()?;
        // Checked again with every vCPU paused: none can start a step now.
        // A thread parked at the STEP trap returns to it (its kernel call
        // in flight): the trap stays until it has.
        let in_flight = inner.calls_in_flight();
        let gone = !busy(&inner.lock());
        if gone {
            let mut plans = inner.plans.write().unwrap_or_else(|e| e.into_inner());
            let steps: Vec<Arc<PlannedTrap>> = plans
                .values()
                .filter(|p| p.site == Site::Step && !in_flight.contains(&p.va))
                .cloned()
                .collect();
            let all = steps.len() == plans.values().filter(|p| p.site == Site::Step).count();
            for p in steps {
                remove_trap(vm, &p);
                plans.remove(&p.va);
            }
            drop(plans);
            vm.resume_all()?;
            return Ok(all);
        }
        vm.resume_all()?;
        Ok(false)
    }

    /// Holds every thread of `target` stopped with a [`StopHolder`] engine
    /// whose data is `data` (detaching it, [`Tracer::detach_data`] or
    /// [`Tracer::release_thread`], releases them), and waits up to `wait`
    /// for them to be parked. With `interrupt`, a thread asleep in an
    /// interruptible call is woken to stop at once (as INTERRUPT does; the
    /// call restarts when it is released), where otherwise it stops when
    /// the call returns. Returns the (thread id, process id) pairs and
    /// which threads are parked.
    pub fn hold_stopped(
        &self,
        vm: &RunningVm,
        target: Target,
        data: &EngineData,
        wait: std::time::Duration,
        interrupt: bool,
    ) -> Result<Held, TracerError> {
        self.ensure_quiesce_site(vm)?;
        let spec = EngineSpec {
            ops: Arc::new(StopHolder),
            events: EventMask::NONE,
            follow: false,
            data: Some(data.clone()),
        };
        let pairs = self.attach_target_pids(vm, target, &spec)?;
        let tids: Vec<Tid> = pairs.iter().map(|p| p.0).collect();
        for &tid in &tids {
            let holder = self.engine_with_data(tid, data);
            if let Some(e) = holder {
                match self.inner.control(tid, &e, ResumeAction::Stop) {
                    Ok(()) | Err(TracerError::Utrace(_, crate::UtraceError::InProgress)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if interrupt {
            for &tid in &tids {
                self.inner.kick(tid)?;
            }
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let parked = self.inner.parked();
            let stopped: Vec<Tid> = tids
                .iter()
                .copied()
                .filter(|t| parked.contains(t))
                .collect();
            if stopped.len() == tids.len() || std::time::Instant::now() >= deadline {
                return Ok(Held {
                    threads: pairs,
                    stopped,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Detaches the engine with data `data` from thread `tid` (a
    /// [`Tracer::hold_stopped`] holder, say); the thread runs on if no
    /// other engine holds it. Whether there was one.
    pub fn release_thread(&self, tid: Tid, data: &EngineData) -> bool {
        let engine = self.engine_with_data(tid, data);
        match engine {
            Some(e) => self.inner.control(tid, &e, ResumeAction::Detach).is_ok(),
            None => false,
        }
    }

    /// A stopped thread's user registers and segment bases (EBUSY if it
    /// is not stopped).
    pub fn regs(&self, tid: Tid) -> Result<StoppedRegs, TracerError> {
        self.inner
            .stopped_regs(tid)
            .map_err(|e| TracerError::Utrace(tid, e))
    }

    /// Sets a stopped thread's user registers, all or none (EINVAL for the
    /// segment selectors); the registers afterwards.
    pub fn set_regs(&self, tid: Tid, changes: &[(Reg, u64)]) -> Result<StoppedRegs, TracerError> {
        self.inner
            .set_stopped_regs(tid, changes)
            .map_err(|e| TracerError::Utrace(tid, e))
    }

    /// Sets a stopped thread's FS and/or GS base (ptrace's
    /// `fs_base`/`gs_base`: the values it runs with once released), with
    /// every vCPU paused while they are written; the registers afterwards.
    pub fn set_segment_bases(
        &self,
        vm: &RunningVm,
        tid: Tid,
        fs: Option<u64>,
        gs: Option<u64>,
    ) -> Result<StoppedRegs, TracerError> {
        vm.pause_all()?;
        let result = self.inner.set_stopped_bases(tid, fs, gs);
        vm.resume_all()?;
        result.map_err(|e| TracerError::Utrace(tid, e))
    }

    /// Reads `len` bytes at user address `addr` of stopped thread `tid`'s
    /// process, up to the first unmapped byte (EFAULT if that is the first).
    pub fn read_memory(&self, tid: Tid, addr: u64, len: usize) -> Result<Vec<u8>, TracerError> {
        self.inner
            .access_memory(tid, addr, AccessOp::Read(len))
            .map_err(|e| TracerError::Utrace(tid, e))
    }

    /// Writes `data` at user address `addr` of stopped thread `tid`'s
    /// process, as ptrace would (copy-on-write); all or nothing (EFAULT).
    pub fn write_memory(&self, tid: Tid, addr: u64, data: &[u8]) -> Result<(), TracerError> {
        self.inner
            .access_memory(tid, addr, AccessOp::Write(data.to_vec()))
            .map(|_| ())
            .map_err(|e| TracerError::Utrace(tid, e))
    }

    /// `utrace_prepare_examine`: before reading a thread's state, check
    /// that it is stopped (EINVAL if not; ESRCH if the engine is detached
    /// or the thread gone). Hand the token to [`Tracer::finish_examine`]
    /// afterwards.
    pub fn prepare_examine(&self, tid: Tid, engine: &Engine) -> Result<Examine, TracerError> {
        let err = |e| TracerError::Utrace(tid, e);
        let threads = self.inner.lock();
        let t = threads
            .traced
            .get(&tid)
            .ok_or(err(crate::UtraceError::NoSuchThread))?;
        if engine.is_detached() || !t.utrace.engines().iter().any(|e| e.id() == engine.id()) {
            return Err(err(crate::UtraceError::NoSuchThread));
        }
        if !threads.parked.contains_key(&tid) {
            return Err(err(crate::UtraceError::Invalid));
        }
        Ok(Examine {
            tid,
            unparked: threads.unparked.get(&tid).copied().unwrap_or(0),
        })
    }

    /// `utrace_finish_examine`: Ok if the thread stayed stopped since
    /// [`Tracer::prepare_examine`] (what was read holds), EAGAIN if it ran
    /// in between, ESRCH if it is gone.
    pub fn finish_examine(&self, token: Examine) -> Result<(), TracerError> {
        let tid = token.tid;
        let err = |e| TracerError::Utrace(tid, e);
        let threads = self.inner.lock();
        if !threads.traced.contains_key(&tid) {
            return Err(err(crate::UtraceError::NoSuchThread));
        }
        let now = threads.unparked.get(&tid).copied().unwrap_or(0);
        if now != token.unparked || !threads.parked.contains_key(&tid) {
            return Err(err(crate::UtraceError::Again));
        }
        Ok(())
    }

    /// Threads parked now because an engine holds them stopped.
    pub fn stopped(&self) -> Vec<Tid> {
        self.inner.parked()
    }

    /// Whether a thread is parked or a kernel call is in flight (the VM's
    /// state then includes registers kept in the host: no snapshot).
    pub fn holds_guest_state(&self) -> bool {
        !self.inner.parked().is_empty() || !self.inner.calls_in_flight().is_empty()
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
        let mut v: Vec<Tid> = self.inner.lock().traced.keys().copied().collect();
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
        self.attach_target(vm, Target::Process(pid), spec)
    }

    /// [`Tracer::attach_process`] for a process or a single thread.
    pub fn attach_target(
        &self,
        vm: &RunningVm,
        target: Target,
        spec: &EngineSpec,
    ) -> Result<Vec<Tid>, TracerError> {
        let pairs = self.attach_target_pids(vm, target, spec)?;
        Ok(pairs.into_iter().map(|(tid, _)| tid).collect())
    }

    /// [`Tracer::attach_target`], returning (thread id, process id) pairs.
    fn attach_target_pids(
        &self,
        vm: &RunningVm,
        target: Target,
        spec: &EngineSpec,
    ) -> Result<Vec<(Tid, Tid)>, TracerError> {
        if spec.events.contains(EventMask::QUIESCE) {
            self.ensure_quiesce_site(vm)?;
        }
        vm.pause_all()?;
        let result = self.attach_paused(target, spec);
        vm.resume_all()?;
        result
    }

    /// Attaches `spec` to the threads of `target`; their (thread id,
    /// process id) pairs.
    fn attach_paused(
        &self,
        target: Target,
        spec: &EngineSpec,
    ) -> Result<Vec<(Tid, Tid)>, TracerError> {
        let inner = &self.inner;
        let k = inner.kernel(inner.kernel_space);
        let reader = TaskReader::with_layout(&k, inner.layout.tasks.clone())?;
        let tasks = reader.all_tasks(guest_introspect::tasks::WalkLimits::default())?;
        let threads: Vec<_> = tasks
            .iter()
            .filter(|t| match target {
                Target::Process(pid) => t.pid == pid,
                Target::Thread(tid) => t.tid == tid,
            })
            .collect();
        let id = match target {
            Target::Process(id) | Target::Thread(id) => id,
        };
        if threads.is_empty() {
            return Err(match target {
                Target::Process(pid) => TracerError::NoProcess(pid),
                Target::Thread(tid) => TracerError::NoThread(tid),
            });
        }
        if threads.iter().any(|t| t.is_kernel_thread()) {
            return Err(TracerError::Utrace(id, crate::UtraceError::Permission));
        }
        // A thread past its exit (a zombie, or dying) takes no new engine
        // (utrace's EALREADY); a process that is only that refuses.
        let threads: Vec<_> = threads.into_iter().filter(|t| t.exit_state == 0).collect();
        if threads.is_empty() {
            return Err(TracerError::Utrace(id, crate::UtraceError::Already));
        }
        let mut tids = Vec::new();
        let mut table = inner.lock();
        for t in &threads {
            let err = |e| TracerError::Utrace(t.tid, e);
            match table.traced.get_mut(&t.tid) {
                Some(traced) => {
                    traced.attach(spec).map_err(err)?;
                }
                None => {
                    let traced = Traced::new(t.tid, t.addr, std::slice::from_ref(spec));
                    table.traced.insert(t.tid, traced.map_err(err)?);
                }
            }
            tids.push((t.tid, t.pid));
        }
        drop(table);
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
        let mut table = inner.lock();
        let mut count = 0;
        let mut untraced = Vec::new();
        for (tid, t) in table.traced.iter() {
            for e in t.utrace.engines() {
                if e.data().is_some_and(|d| Arc::ptr_eq(d, data)) {
                    let _ = t.utrace.control(&e, ResumeAction::Detach);
                    count += 1;
                }
            }
            if t.utrace.has_no_engines() {
                untraced.push((*tid, t.task));
            }
        }
        for (tid, _) in &untraced {
            table.traced.remove(tid);
        }
        let parked: Vec<Tid> = table.parked.keys().copied().collect();
        let mut ring = false;
        for tid in parked {
            ring |= inner.release_if_free(&mut table, tid);
        }
        if table
            .armed
            .as_ref()
            .is_some_and(|a| a.specs.iter().any(|s| s.has_data(data)))
        {
            table.armed = None;
        }
        drop(table);
        if ring {
            inner.ring_doorbell();
        }
        for (_, task) in untraced {
            // The task may be gone already; nothing to steer then.
            let _ = inner.steer(inner.kernel_space, task, false);
        }
        count
    }

    /// Whether any thread is traced or an exec is awaited.
    pub fn is_idle(&self) -> bool {
        let table = self.inner.lock();
        table.traced.is_empty() && table.armed.is_none()
    }

    /// Detaches every engine, steers every traced thread back onto the fast
    /// paths and removes every trap, with the vCPUs paused: afterwards the
    /// guest kernel text is byte for byte what it was before
    /// [`Tracer::install`].
    pub fn remove(self, vm: &RunningVm) -> Result<(), TracerError> {
        // Parked threads and kernel calls in flight return to their trap,
        // which must still be there to restore their registers: release
        // them all first, with the vCPUs running. One whose call does not
        // return in time keeps its trap (and the handler) for good.
        {
            let mut table = self.inner.lock();
            table.armed = None;
            for t in table.traced.values() {
                for e in t.utrace.engines() {
                    let _ = t.utrace.control(&e, ResumeAction::Detach);
                }
            }
        }
        self.inner.release_all();
        self.inner
            .drain_trap_flags(std::time::Duration::from_secs(1));
        let stuck = self.inner.wait_drained(std::time::Duration::from_secs(5));
        if !stuck.is_empty() {
            log::error!(
                "tracer: kernel calls still in flight at {stuck:#x?}; their traps stay set"
            );
        }
        vm.pause_all()?;
        {
            let space = self.inner.kernel_space;
            let mut table = self.inner.lock();
            table.armed = None;
            for (_, t) in table.traced.drain() {
                for e in t.utrace.engines() {
                    let _ = t.utrace.control(&e, ResumeAction::Detach);
                }
                // A thread that exited meanwhile has nothing to steer.
                let _ = self.inner.steer(space, t.task, false);
            }
        }
        let stuck = self.inner.calls_in_flight();
        for p in self.traps() {
            if !stuck.contains(&p.va) {
                remove_trap(vm, &p);
            }
        }
        vm.resume_all()?;
        Ok(())
    }
}

/// One second in the guest kernel's jiffies: `NSEC_PER_SEC / tick_nsec`
/// (the kernel's `tick_nsec` is its tick length, `NSEC_PER_SEC / HZ` up to
/// NTP's adjustment); 250 (Debian's HZ) if it cannot be read.
fn jiffies_per_second(k: &RunningKernel<'_, vmm::vstate::memory::GuestRam>) -> u64 {
    let hz = k
        .symbol("tick_nsec")
        .and_then(|va| k.read_u64(va, "tick_nsec"))
        .ok()
        .filter(|ns| (100_000..=100_000_000).contains(ns))
        .map(|ns| (1_000_000_000 + ns / 2) / ns);
    hz.unwrap_or(250)
}

impl Dispatcher {
    /// Wakes traced thread `tid` from an interruptible sleep, with no
    /// report (TIF_SIGPENDING and a doorbell wake, as INTERRUPT): a call it
    /// sleeps in ends and is restarted by the kernel's rules; a thread not
    /// parked yet then reaches a park site at once.
    pub(crate) fn kick(&self, tid: Tid) -> Result<(), TracerError> {
        let task = {
            let mut table = self.lock();
            let Some(t) = table.traced.get(&tid) else {
                return Ok(());
            };
            let task = t.task;
            if table.parked.contains_key(&tid) {
                return Ok(());
            }
            table.wakes.push_back(Wake {
                tid,
                task,
                state: TASK_INTERRUPTIBLE,
            });
            task
        };
        self.set_sigpending(self.kernel_space, task)?;
        self.ring_doorbell();
        Ok(())
    }

    /// `utrace_control` on traced thread `tid`, with the control sites
    /// already set for REPORT, STOP and INTERRUPT (see
    /// [`Tracer::control`]). Takes the table's lock briefly, so a callback
    /// may call it.
    pub(crate) fn control(
        &self,
        tid: Tid,
        engine: &Engine,
        action: ResumeAction,
    ) -> Result<(), TracerError> {
        let err = |e| TracerError::Utrace(tid, e);
        match action {
            ResumeAction::SingleStep | ResumeAction::BlockStep if !self.has_step_site() => {
                return Err(err(crate::UtraceError::NotSupported))
            }
            ResumeAction::Report
            | ResumeAction::Stop
            | ResumeAction::Interrupt
            | ResumeAction::SingleStep
            | ResumeAction::BlockStep
                if !self.has_quiesce_site() =>
            {
                return Err(err(crate::UtraceError::NotSupported))
            }
            _ => {}
        }
        let mut table = self.lock();
        let task = table
            .traced
            .get(&tid)
            .map(|t| t.task)
            .ok_or(err(crate::UtraceError::NoSuchThread))?;
        let parked = table.parked.get(&tid) == Some(&task);
        let t = table
            .traced
            .get_mut(&tid)
            .ok_or(err(crate::UtraceError::NoSuchThread))?;
        let result = t.utrace.control(engine, action);
        if action == ResumeAction::Stop {
            match result {
                Ok(()) | Err(crate::UtraceError::InProgress) => {}
                Err(e) => return Err(err(e)),
            }
            if table.parked.get(&tid) == Some(&task) {
                return Ok(());
            }
            // An engine with QUIESCE in its mask hears of the stop: the
            // thread calls report_quiesce(0) at the QUIESCE site, then
            // parks there (utrace's stop is a quiescent point).
            if let Some(t) = table.traced.get_mut(&tid) {
                if t.wants_quiesce() {
                    t.report_pending = true;
                }
            }
            drop(table);
            // To the QUIESCE site at its next return to user mode.
            self.notify_resume(self.kernel_space, task)?;
            return Err(err(crate::UtraceError::InProgress));
        }
        result.map_err(err)?;
        let mut notify = false;
        let mut ring = false;
        match action {
            ResumeAction::SingleStep | ResumeAction::BlockStep if parked => {
                // Held in the kernel: its user registers are where the
                // kernel saved them; it steps from there once released.
                drop(table);
                let k = self.kernel(self.kernel_space);
                let u = self.user_regs(&k, task)?;
                self.set_trap_flag(tid, task, self.kernel_space, &u)?;
                table = self.lock();
            }
            ResumeAction::SingleStep | ResumeAction::BlockStep => {
                // Running: it reports at its next return to user mode and
                // steps from there (its report sets the trap flag).
                if let Some(t) = table.traced.get_mut(&tid) {
                    if !t.report_pending {
                        t.report_pending = true;
                        notify = true;
                    }
                }
            }
            ResumeAction::Report if !t.report_pending => {
                t.report_pending = true;
                notify = true;
            }
            ResumeAction::Interrupt => {
                t.interrupt_pending = true;
                notify = true;
                table.wakes.push_back(Wake {
                    tid,
                    task,
                    state: TASK_INTERRUPTIBLE,
                });
                ring = true;
            }
            ResumeAction::Detach if t.utrace.has_no_engines() => {
                table.traced.remove(&tid);
                // The task may be gone already; nothing to steer then.
                let _ = self.steer(self.kernel_space, task, false);
            }
            _ => {}
        }
        ring |= self.release_if_free(&mut table, tid);
        let stale_flag = parked
            && table.trap_flag.contains_key(&tid)
            && table
                .traced
                .get(&tid)
                .is_none_or(|t| t.utrace.stepping().is_none());
        drop(table);
        if stale_flag {
            // Nobody steps a thread held in the kernel any more: its TF
            // goes now (its user registers are the saved ones).
            self.clear_trap_flag_in_kernel(tid, task);
        }
        if action == ResumeAction::Interrupt {
            // As signal_wake_up: TIF_SIGPENDING, then the wake (the
            // doorbell's); a thread in user mode sees it at its next
            // interrupt.
            self.set_sigpending(self.kernel_space, task)?;
        }
        if notify {
            self.notify_resume(self.kernel_space, task)?;
        }
        if ring {
            self.ring_doorbell();
        }
        Ok(())
    }
}

/// The traps of `site`, planned; an error naming why if none can be.
fn plan_required(
    k: &RunningKernel<'_, vmm::vstate::memory::GuestRam>,
    inner: &Dispatcher,
    site: Site,
) -> Result<Vec<PlannedTrap>, TracerError> {
    let (plans, errors) = plan(k, &inner.info.symbols, &inner.layout, &[site]);
    if plans.is_empty() {
        return Err(TracerError::Sites(errors.join("; ")));
    }
    Ok(plans)
}

/// The traps of one of [`Site::OPTIONAL`], planned.
struct OptionalTraps {
    site: Site,
    plans: Vec<PlannedTrap>,
    signal_taken: Option<SignalTaken>,
}

/// Plans the traps of [`Site::OPTIONAL`] that the kernel allows, before
/// any trap is set (the code scans must see the kernel's own bytes, not
/// the `int3` of a trap at a function's entry); one that cannot be placed
/// is left out with a warning (the tracer then serves what it can without
/// it: see each site).
fn plan_optional(
    k: &RunningKernel<'_, vmm::vstate::memory::GuestRam>,
    symbols: &guest_introspect::symbols::SymbolMap,
    layout: &TraceLayout,
) -> Vec<OptionalTraps> {
    let mut out = Vec::new();
    for site in Site::OPTIONAL {
        let (plans, errors) = plan(k, symbols, layout, &[site]);
        let Some(first) = plans.first() else {
            log::warn!("tracer: no {site} trap: {}", errors.join("; "));
            continue;
        };
        let signal_taken = if site == Site::SignalTaken {
            let start = first.va - first.offset;
            let end = symbols
                .lookup(&first.symbol)
                .and_then(|link| symbols.next_above(link))
                .map(|a| k.runtime(a));
            match find_signal_taken(k, &first.symbol, start, end) {
                Ok(found) => Some(found),
                Err(e) => {
                    log::warn!("tracer: no {site} trap: {e}");
                    continue;
                }
            }
        } else {
            None
        };
        out.push(OptionalTraps {
            site,
            plans,
            signal_taken,
        });
    }
    out
}

/// Sets the optional traps planned; one that cannot be set is left out
/// with a warning.
fn set_optional_traps(
    vm: &RunningVm,
    inner: &Arc<Dispatcher>,
    space: AddressSpace,
    planned: Vec<OptionalTraps>,
) {
    for o in planned {
        match set_traps(vm, inner, space, o.plans) {
            Ok(()) => {
                if let Some(found) = o.signal_taken {
                    let _ = inner.signal_taken.set(found);
                }
            }
            Err(e) => log::warn!("tracer: no {} trap: {e}", o.site),
        }
    }
}

/// Sets the traps `plans` for `inner`'s handler and records them; on an
/// error, the ones already set are removed again.
fn set_traps(
    vm: &RunningVm,
    inner: &Arc<Dispatcher>,
    space: AddressSpace,
    plans: Vec<PlannedTrap>,
) -> Result<(), TracerError> {
    // Recorded first: a vCPU may hit a trap the moment it is set.
    {
        let mut table = inner.plans.write().unwrap_or_else(|e| e.into_inner());
        for p in &plans {
            table.insert(p.va, Arc::new(p.clone()));
        }
    }
    for (i, p) in plans.iter().enumerate() {
        if let Err(e) = set_trap(vm, inner, space, p) {
            for done in &plans[..i] {
                remove_trap(vm, done);
            }
            let mut table = inner.plans.write().unwrap_or_else(|e| e.into_inner());
            for p in &plans {
                table.remove(&p.va);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Sets the trap `p` for `inner`'s handler.
fn set_trap(
    vm: &RunningVm,
    inner: &Arc<Dispatcher>,
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
