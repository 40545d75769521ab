//! The trap path without /dev/kvm: a guest memory image built by hand
//! (page tables, a per-CPU area, a `task_struct`, a kernel stack with the
//! user `pt_regs` on top), a [`Dispatcher`] over it with a layout chosen
//! here, and traps delivered through `vmm`'s [`TrapContext`] exactly as
//! the vCPU loop delivers them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use guest_introspect::btf::KernelTypes;
use guest_introspect::image::{KernelInfo, SymbolSource};
use guest_introspect::kernel::{KernelPlacement, VcpuView};
use guest_introspect::pt_regs::{PtRegsLayout, Reg, UserRegsFinder, REG_COUNT};
use guest_introspect::symbols::SymbolMap;
use guest_introspect::task_layout::{CredFields, Field, MmFields, TaskFields, TaskLayout};
use vmm::trap::{GuestRegs, GuestSregs, TrapContext, TrapHandler, TrapHit};
use vmm::vstate::memory::GuestRam;

use crate::context::ThreadContext;
use crate::engine::{Engine, EngineOps};
use crate::event::{EventMask, Tid};
use crate::hv::dispatch::{Dispatcher, KernelFunctions, TracerStats};
use crate::hv::kcall::Calls;
use crate::hv::layout::{SiginfoLayout, TraceLayout};
use crate::hv::placement::{Displaced, PlannedTrap, TrapKind};
use crate::hv::threads::{EngineSpec, Threads, Traced};
use crate::sites::Site;
use crate::syscalls::SyscallTable;
use crate::ResumeAction;

/// The direct map: kernel virtual address of physical address 0.
const KERNEL_BASE: u64 = 0xffff_8880_0000_0000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// The per-CPU area (`gs_base` in kernel mode).
const PERCPU: u64 = 0x10000;
const TASK: u64 = 0x20000;
const STACK: u64 = 0x40000;
/// `sys_tracepoint_refcount`: the guest's own syscall tracepoint users.
const TRACEPOINT_REFCOUNT: u64 = 0x30000;
/// Where the user `pt_regs` lies: the top of a 16 KiB stack.
const PT_REGS: u64 = STACK + 0x4000 - 8 * REG_COUNT as u64;
/// Addresses of the planted traps.
const ENTRY_VA: u64 = 0xffff_ffff_8100_1000;
const EXIT_VA: u64 = 0xffff_ffff_8100_2000;
const QUIESCE_VA: u64 = 0xffff_ffff_8100_3000;
const DOORBELL_VA: u64 = 0xffff_ffff_8100_4000;
const DO_EXIT_VA: u64 = 0xffff_ffff_8100_7000;
/// The thread's `signal_struct`.
const SIGNAL: u64 = 0x50000;
/// The kernel functions the tracer calls.
const SCHEDULE_TIMEOUT_VA: u64 = 0xffff_ffff_8100_5000;
const WAKE_UP_STATE_VA: u64 = 0xffff_ffff_8100_6000;
const STEER_BIT: u64 = 1 << 3;
const TID: Tid = 77;
const GETPID: u64 = 39;

fn kva(pa: u64) -> u64 {
    KERNEL_BASE + pa
}

/// A test layout: each field at its own offset in a 0x400-byte task.
fn layout() -> TraceLayout {
    let word = |offset| Field::at(offset, 8);
    let int = |offset| Field::at(offset, 4);
    let task = TaskFields {
        pid: int(0x10),
        tgid: int(0x14),
        stack: word(0x18),
        syscall_work: Some(word(0x28)),
        ti_flags: word(0x30),
        mm: word(0x38),
        signal: word(0x40),
        real_parent: word(0x48),
        vfork_done: word(0x50),
        comm: 0x58,
        state: int(0x68),
        exit_state: int(0x6c),
        flags: int(0x70),
        group_leader: word(0x78),
        real_cred: word(0x80),
        worker_private: None,
    };
    let cred = CredFields {
        uid: int(4),
        gid: int(8),
        euid: int(0x14),
    };
    let mm = MmFields {
        pgd: word(0),
        arg_start: word(0x10),
        arg_end: word(0x18),
        exe_file: word(0x20),
    };
    let pt_regs = PtRegsLayout::new(std::array::from_fn(|i| 8 * i as u64), 168).unwrap();
    TraceLayout {
        current_task: 0x20,
        bprm_p: 0,
        bprm_argc: 8,
        bprm_envc: 0x10,
        bprm_filename: 0x18,
        bprm_mm: 0x20,
        ksig_sig: 0,
        ksig_info: 8,
        ksig_handler: 0x40,
        siginfo: SiginfoLayout {
            signo: 0,
            code: 8,
            pid: 0x10,
            uid: 0x14,
            status: 0x18,
        },
        task_pending: 0x100,
        task_sighand: 0x88,
        task_jobctl: 0x90,
        task_on_cpu: None,
        sighand_action: 0x8,
        k_sigaction_size: 0x20,
        k_sigaction_handler: 0,
        siginfo_size: 0x30,
        signal_shared_pending: 0x20,
        sigpending_list: 0,
        sigpending_signal: 0x10,
        signal_live: 0x8,
        signal_group_exit_code: 0x30,
        sigqueue_list: 0,
        sigqueue_info: 0x18,
        syscall_work: word(0x28),
        tasks: TaskLayout::new(task, cred, mm, pt_regs).unwrap(),
        steer_bit: STEER_BIT,
        exit_work_mask: STEER_BIT,
        virt_offset: 0,
        thread_fsbase: None,
        thread_gsbase: None,
        fpstate: None,
    }
}

/// An empty but valid BTF blob: a header and an empty string table.
pub(crate) fn empty_types() -> KernelTypes {
    let mut b = Vec::new();
    b.extend_from_slice(&0xeb9fu16.to_le_bytes());
    b.extend_from_slice(&[1, 0]);
    for w in [24u32, 0, 0, 0, 1] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.push(0);
    KernelTypes::from_btf_bytes(&b).expect("an empty BTF")
}

/// Guest memory holding one user thread (TID) in a system call, with
/// `syscall_work` steered on.
fn guest() -> GuestRam {
    let ram = GuestRam::new(4 << 20).unwrap();
    let put = |pa: u64, v: u64| ram.write(pa, &v.to_le_bytes()).unwrap();
    // One 2 MiB page: the direct map of physical 0..2 MiB.
    put(PML4 + 8 * ((KERNEL_BASE >> 39) & 511), PDPT | 3);
    put(PDPT, PD | 3);
    put(PD, 3 | 0x80);
    let l = layout();
    put(PERCPU + l.current_task, kva(TASK));
    let t = &l.tasks.task;
    ram.write(TASK + t.pid.offset(), &(TID as u32).to_le_bytes())
        .unwrap();
    ram.write(TASK + t.tgid.offset(), &(TID as u32).to_le_bytes())
        .unwrap();
    put(TASK + t.stack.offset(), kva(STACK));
    put(TASK + t.signal.offset(), kva(SIGNAL));
    put(TASK + l.syscall_work.offset(), STEER_BIT);
    let reg = |r: Reg, v: u64| put(PT_REGS + l.tasks.pt_regs.offset(r), v);
    reg(Reg::Cs, 0x33);
    reg(Reg::Ss, 0x2b);
    reg(Reg::OrigAx, GETPID);
    reg(Reg::Di, 0x1111);
    reg(Reg::R9, 0x9999);
    reg(Reg::Ax, TID as u64);
    ram
}

fn plan(site: Site, va: u64, kind: TrapKind) -> (u64, Arc<PlannedTrap>) {
    let p = PlannedTrap {
        site,
        symbol: format!("{site}_function"),
        offset: 0,
        va,
        kind,
        instruction: "nop".into(),
    };
    (va, Arc::new(p))
}

fn dispatcher(ram: GuestRam) -> Arc<Dispatcher> {
    let layout = layout();
    let plans = HashMap::from([
        plan(Site::SyscallEntry, ENTRY_VA, TrapKind::DebugRegister),
        // The minimal kernel's exit site: `mov %rdi,%rbp` under the int3.
        plan(
            Site::SyscallExit,
            EXIT_VA,
            TrapKind::Int3(Displaced::MovReg {
                len: 3,
                dst: iced_x86::Register::RBP,
                src: iced_x86::Register::RDI,
            }),
        ),
        plan(Site::Quiesce, QUIESCE_VA, TrapKind::DebugRegister),
        plan(
            Site::Exit,
            DO_EXIT_VA,
            TrapKind::Int3(Displaced::Skip { len: 5 }),
        ),
        plan(
            Site::Doorbell,
            DOORBELL_VA,
            TrapKind::Int3(Displaced::Skip { len: 4 }),
        ),
    ]);
    let mut names = vec![None; 64];
    names[GETPID as usize] = Some("getpid".to_string());
    Arc::new(Dispatcher {
        ram,
        info: Arc::new(KernelInfo {
            symbols: SymbolMap::from_symbols(Vec::new()),
            symbol_source: SymbolSource::SystemMap,
            types: empty_types(),
            banner: None,
            symbols_shift: 0,
        }),
        placement: KernelPlacement {
            virt_offset: 0,
            text: 0xffff_ffff_8100_0000,
            text_phys: 0x100_0000,
        },
        user_regs: UserRegsFinder::new(layout.tasks.pt_regs.clone()),
        pt_regs: Arc::new(layout.tasks.pt_regs.clone()),
        layout,
        plans: RwLock::new(plans),
        syscalls: Arc::new(SyscallTable::from_names(names)),
        tracepoint_refcount: Some(kva(TRACEPOINT_REFCOUNT)),
        kernel_space: guest_introspect::paging::AddressSpace {
            cr3: PML4,
            levels: guest_introspect::paging::PagingLevels::Four,
        },
        trap_spaces: Default::default(),
        threads: Mutex::new(Threads::default()),
        stats: TracerStats::default(),
        kfuncs: Some(KernelFunctions {
            schedule_timeout: SCHEDULE_TIMEOUT_VA,
            wake_up_state: WAKE_UP_STATE_VA,
            access_process_vm: None,
            send_sig: None,
        }),
        park_jiffies: 100,
        doorbell: None,
        calls: Mutex::new(Calls::default()),
        signal_taken: std::sync::OnceLock::new(),
    })
}

/// Delivers the trap at `va` to `d` as the vCPU loop does; returns the
/// registers as they would be written back.
fn hit(d: &Dispatcher, va: u64, how: TrapHit) -> Option<GuestRegs> {
    hit_with(
        d,
        GuestRegs {
            rip: va,
            rsp: kva(STACK + 0x3000),
            ..Default::default()
        },
        how,
    )
}

/// [`hit`] with the vCPU's registers `regs` (RIP at the trap).
fn hit_with(d: &Dispatcher, regs: GuestRegs, how: TrapHit) -> Option<GuestRegs> {
    let va = regs.rip;
    let sregs = GuestSregs {
        view: VcpuView {
            cr3: PML4,
            cr4: 0,
            idt_base: 0,
            idt_limit: 0,
        },
        gs_base: kva(PERCPU),
        cs: 0x10,
    };
    let mut ctx = TrapContext::new(0, regs, sregs, &d.ram);
    d.on_trap(&mut ctx, va, how);
    ctx.changed_regs().copied()
}

fn word(d: &Dispatcher, pa: u64) -> u64 {
    let mut b = [0u8; 8];
    d.ram.read(pa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// An engine that records what it saw and, at a system-call exit, votes
/// `exit_vote` after calling `control_at_exit` on its own thread through
/// the dispatcher (which the old design, calling engines under the
/// tracer's lock, deadlocked on).
#[derive(Default)]
struct Probe {
    seen: Mutex<Vec<String>>,
    exit_vote: Option<ResumeAction>,
    control_at_exit: Option<ResumeAction>,
    abort_at_entry: Option<i64>,
    /// report_exit changes the code to this.
    exit_code_to: Option<i64>,
    /// report_quiesce's vote (RESUME if None).
    quiesce_vote: Option<ResumeAction>,
    dispatcher: OnceLock<Weak<Dispatcher>>,
}

impl Probe {
    fn note(&self, s: String) {
        self.seen.lock().unwrap().push(s);
    }
}

impl EngineOps for Probe {
    fn report_exit(
        &self,
        _: ResumeAction,
        _: &Engine,
        _: &ThreadContext,
        orig: i64,
        code: &mut i64,
    ) -> ResumeAction {
        self.note(format!("exit_code:{orig:#x}"));
        if let Some(c) = self.exit_code_to {
            *code = c;
        }
        ResumeAction::Resume
    }
    fn report_quiesce(
        &self,
        _: ResumeAction,
        _: &Engine,
        thread: &ThreadContext,
        event: EventMask,
    ) -> ResumeAction {
        if event == EventMask::NONE {
            self.note(format!("quiesce:{}", thread.tid));
        }
        self.quiesce_vote.unwrap_or(ResumeAction::Resume)
    }

    fn report_syscall_entry(
        &self,
        _: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        nr: u64,
        args: &[u64; 6],
    ) -> ResumeAction {
        let regs_nr = thread.regs().map(|r| r.syscall_nr());
        self.note(format!(
            "entry:{}:{}:{nr}:{:#x}:{:#x}:{regs_nr:?}",
            engine.tid(),
            thread.tid,
            args[0],
            args[5]
        ));
        if let Some(ret) = self.abort_at_entry {
            let refused = thread.set_reg(Reg::Cs, 0x10);
            let r = thread.abort_syscall(ret);
            self.note(format!("abort:{r:?}:cs:{refused:?}"));
        }
        ResumeAction::Resume
    }

    fn report_syscall_exit(
        &self,
        _: ResumeAction,
        engine: &Engine,
        thread: &ThreadContext,
        nr: u64,
        ret: i64,
    ) -> ResumeAction {
        self.note(format!("exit:{}:{nr}:{ret}", thread.tid));
        if self.abort_at_entry.is_some() {
            let r = thread.abort_syscall(0);
            self.note(format!("abort-at-exit:{r:?}"));
        }
        if let Some(action) = self.control_at_exit {
            let d = self.dispatcher.get().and_then(Weak::upgrade).unwrap();
            let r = d.control(thread.tid, engine, action);
            self.note(format!("control:{}", r.is_ok()));
        }
        self.exit_vote.unwrap_or(ResumeAction::Resume)
    }
}

fn trace(d: &Arc<Dispatcher>, probe: Probe, events: EventMask) -> Arc<Probe> {
    let probe = Arc::new(probe);
    probe.dispatcher.set(Arc::downgrade(d)).unwrap();
    let spec = EngineSpec {
        ops: probe.clone(),
        events,
        follow: false,
        data: None,
    };
    let traced = Traced::new(TID, kva(TASK), &[spec]).unwrap();
    d.lock().traced.insert(TID, traced);
    probe
}

const SYSCALLS: EventMask = EventMask(EventMask::SYSCALL_ENTRY.0 | EventMask::SYSCALL_EXIT.0);

#[test]
fn a_system_call_is_reported_from_the_saved_registers_with_its_context() {
    let d = dispatcher(guest());
    let probe = trace(&d, Probe::default(), SYSCALLS);
    assert_eq!(hit(&d, ENTRY_VA, TrapHit::DebugRegister), None);
    let after = hit(&d, EXIT_VA, TrapHit::Int3 { original: 0xf3 }).expect("rip moved");
    assert_eq!(after.rip, EXIT_VA + 3, "the displaced `mov` ran");
    assert_eq!(
        *probe.seen.lock().unwrap(),
        [
            format!("entry:{TID}:{TID}:{GETPID}:0x1111:0x9999:Some({GETPID})"),
            format!("exit:{TID}:{GETPID}:{TID}"),
        ]
    );
    assert_eq!(d.stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        d.stats
            .handler_ns
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn an_untraced_thread_is_steered_off_unless_the_guest_traces_system_calls_itself() {
    let d = dispatcher(guest());
    hit(&d, ENTRY_VA, TrapHit::DebugRegister);
    let l = layout();
    assert_eq!(word(&d, TASK + l.syscall_work.offset()) & STEER_BIT, 0);
    assert_eq!(
        d.stats.untraced.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // With a syscall tracepoint enabled in the guest, the bit is its own.
    let d = dispatcher(guest());
    d.ram
        .write(TRACEPOINT_REFCOUNT, &1u32.to_le_bytes())
        .unwrap();
    hit(&d, ENTRY_VA, TrapHit::DebugRegister);
    assert_eq!(
        word(&d, TASK + l.syscall_work.offset()) & STEER_BIT,
        STEER_BIT
    );
}

#[test]
fn a_callback_may_detach_itself_through_the_tracer_and_the_thread_is_let_go() {
    let d = dispatcher(guest());
    let probe = trace(
        &d,
        Probe {
            control_at_exit: Some(ResumeAction::Detach),
            ..Default::default()
        },
        SYSCALLS,
    );
    hit(&d, EXIT_VA, TrapHit::Int3 { original: 0xf3 });
    assert_eq!(
        *probe.seen.lock().unwrap(),
        [format!("exit:{TID}:{GETPID}:{TID}"), "control:true".into()]
    );
    assert!(!d.lock().is_traced(TID), "no engine left");
    let l = layout();
    assert_eq!(word(&d, TASK + l.syscall_work.offset()) & STEER_BIT, 0);
    // The next call is not reported.
    hit(&d, ENTRY_VA, TrapHit::DebugRegister);
    assert_eq!(probe.seen.lock().unwrap().len(), 2);
}

#[test]
fn a_report_vote_sets_notify_resume_and_the_quiesce_site_reports_once() {
    let d = dispatcher(guest());
    let probe = trace(
        &d,
        Probe {
            exit_vote: Some(ResumeAction::Report),
            ..Default::default()
        },
        SYSCALLS | EventMask::QUIESCE,
    );
    hit(&d, EXIT_VA, TrapHit::Int3 { original: 0xf3 });
    let l = layout();
    assert_eq!(
        word(&d, TASK + l.tasks.task.ti_flags.offset()),
        1 << 1,
        "TIF_NOTIFY_RESUME"
    );
    hit(&d, QUIESCE_VA, TrapHit::DebugRegister);
    hit(&d, QUIESCE_VA, TrapHit::DebugRegister);
    let seen = probe.seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|s| s.starts_with("quiesce")).count(),
        1,
        "{seen:?}"
    );
}

#[test]
fn a_hostile_current_pointer_is_an_error_not_a_crash() {
    let d = dispatcher(guest());
    trace(&d, Probe::default(), SYSCALLS);
    d.ram
        .write(PERCPU + layout().current_task, &u64::MAX.to_le_bytes())
        .unwrap();
    hit(&d, ENTRY_VA, TrapHit::DebugRegister);
    assert_eq!(d.stats.errors.load(std::sync::atomic::Ordering::Relaxed), 1);
    // And a trap with no plan leaves the registers alone.
    assert_eq!(hit(&d, 0xdead_beef, TrapHit::Int3 { original: 0x90 }), None);
}

#[test]
fn an_engine_aborts_a_call_at_its_entry_and_the_exit_reports_its_value() {
    let d = dispatcher(guest());
    let probe = trace(
        &d,
        Probe {
            abort_at_entry: Some(-13),
            ..Default::default()
        },
        SYSCALLS,
    );
    hit(&d, ENTRY_VA, TrapHit::DebugRegister);
    // What the kernel reads on: no call to run, -EACCES in ax.
    let l = layout();
    assert_eq!(
        word(&d, PT_REGS + l.tasks.pt_regs.offset(Reg::OrigAx)),
        u64::MAX
    );
    assert_eq!(
        word(&d, PT_REGS + l.tasks.pt_regs.offset(Reg::Ax)) as i64,
        -13
    );
    hit(&d, EXIT_VA, TrapHit::Int3 { original: 0xf3 });
    let seen = probe.seen.lock().unwrap();
    assert_eq!(
        seen[1..],
        [
            "abort:Ok(()):cs:Err(Invalid)".to_string(),
            format!("exit:{TID}:{GETPID}:-13"),
            "abort-at-exit:Err(Invalid)".to_string(),
        ]
    );
}

/// The registers the thread of [`hit`] has at a trap: distinctive values
/// in every caller-saved register, to see them restored.
fn thread_regs(rip: u64) -> GuestRegs {
    GuestRegs {
        rip,
        rsp: kva(STACK + 0x3000),
        rax: 0xa0,
        rcx: 0xc0,
        rdx: 0xd0,
        rsi: 0x51,
        rdi: 0xd1,
        r8: 0x8,
        r11: 0x11,
        rflags: 0x246,
        ..Default::default()
    }
}

#[test]
fn a_stop_vote_parks_the_thread_in_the_kernel_until_released_through_the_doorbell() {
    let d = dispatcher(guest());
    trace(
        &d,
        Probe {
            exit_vote: Some(ResumeAction::Stop),
            ..Default::default()
        },
        SYSCALLS,
    );
    let at = thread_regs(EXIT_VA);
    let int3 = TrapHit::Int3 { original: 0xf3 };
    // The STOP vote at the exit report: the thread calls
    // schedule_timeout(1 s) from the trap, in a killable, no-load sleep.
    let call = hit_with(&d, at, int3).expect("a call");
    assert_eq!(
        (call.rip, call.rsp, call.rdi),
        (SCHEDULE_TIMEOUT_VA, at.rsp - 8, 100)
    );
    assert_eq!(word(&d, STACK + 0x3000 - 8), EXIT_VA, "returns to the trap");
    let l = layout();
    assert_eq!(
        word(&d, TASK + l.tasks.task.state.offset()) & 0xffff_ffff,
        0x502
    );
    assert_eq!(d.parked(), [TID]);
    // Woken while still held (its backstop timeout): parked again.
    let mut back = call;
    back.rip = EXIT_VA;
    back.rsp = at.rsp;
    back.rax = 0;
    let again = hit_with(&d, back, int3).expect("parked again");
    assert_eq!(again.rip, SCHEDULE_TIMEOUT_VA);
    // Examined while parked: the state holds while it stays parked.
    let engine = d.lock().traced[&TID].utrace.engines()[0].clone();
    let tracer = crate::hv::Tracer::from_dispatcher(d.clone());
    let token = tracer.prepare_examine(TID, &engine).unwrap();
    assert!(tracer.finish_examine(token).is_ok());
    // RESUME from the engine queues a wake; the doorbell's handler sends it.
    d.control(TID, &engine, ResumeAction::Resume).unwrap();
    let irq = GuestRegs {
        rip: DOORBELL_VA,
        rsp: kva(STACK + 0x2000),
        rdi: 4,
        ..Default::default()
    };
    let wake = hit_with(&d, irq, int3).expect("a wake-up call");
    assert_eq!(
        (wake.rip, wake.rdi, wake.rsi),
        (WAKE_UP_STATE_VA, kva(TASK), 2)
    );
    // wake_up_state returns: the interrupt handler runs on, untouched.
    let mut done = wake;
    done.rip = DOORBELL_VA;
    done.rsp = irq.rsp;
    let handler = hit_with(&d, done, int3).unwrap();
    assert_eq!(
        handler,
        GuestRegs {
            rip: DOORBELL_VA + 4,
            ..irq
        }
    );
    // The parked thread's schedule_timeout returns: every register is as
    // at the trap, and the displaced instruction runs.
    let mut woke = again;
    woke.rip = EXIT_VA;
    woke.rsp = at.rsp;
    woke.rax = 42;
    let after = hit_with(&d, woke, int3).unwrap();
    assert_eq!(
        after,
        GuestRegs {
            rip: EXIT_VA + 3,
            rbp: at.rdi,
            ..at
        }
    );
    assert!(d.parked().is_empty());
    assert!(d.calls_in_flight().is_empty());
}

#[test]
fn sigkill_breaks_a_stop_and_an_untraced_or_killed_thread_is_never_parked() {
    let d = dispatcher(guest());
    trace(
        &d,
        Probe {
            exit_vote: Some(ResumeAction::Stop),
            ..Default::default()
        },
        SYSCALLS,
    );
    let at = thread_regs(EXIT_VA);
    let int3 = TrapHit::Int3 { original: 0xf3 };
    let call = hit_with(&d, at, int3).expect("parked");
    // SIGKILL arrives (bit 8 of the thread's pending set) and wakes it.
    let l = layout();
    d.ram
        .write(
            TASK + l.task_pending + l.sigpending_signal,
            &(1u64 << 8).to_le_bytes(),
        )
        .unwrap();
    let mut back = call;
    back.rip = EXIT_VA;
    back.rsp = at.rsp;
    let after = hit_with(&d, back, int3).unwrap();
    assert_eq!(
        after,
        GuestRegs {
            rip: EXIT_VA + 3,
            rbp: at.rdi,
            ..at
        }
    );
    assert!(d.parked().is_empty());
    assert!(
        !d.lock().traced[&TID].utrace.is_stopped(),
        "SIGKILL clears STOP"
    );
    // Still voting STOP, but dying: not parked again.
    let after = hit_with(&d, at, int3).unwrap();
    assert_eq!((after.rip, after.rbp), (EXIT_VA + 3, at.rdi));
    // A doorbell with nothing queued changes nothing but runs the handler.
    let irq = GuestRegs {
        rip: DOORBELL_VA,
        rsp: kva(STACK + 0x2000),
        ..Default::default()
    };
    assert_eq!(hit_with(&d, irq, int3).unwrap().rip, DOORBELL_VA + 4);
}

#[test]
fn report_exit_changes_the_exit_code_of_the_thread_and_of_its_exiting_group() {
    for (group_code, group_after) in [(0x300, 0x500), (0, 0)] {
        let d = dispatcher(guest());
        let probe = trace(
            &d,
            Probe {
                exit_code_to: Some(0x500),
                ..Default::default()
            },
            EventMask::EXIT,
        );
        let l = layout();
        d.ram
            .write(
                SIGNAL + l.signal_group_exit_code,
                &(group_code as u32).to_le_bytes(),
            )
            .unwrap();
        // do_exit(3 << 8), as exit_group(3) calls it (or exit(3), with no
        // group exit under way).
        let at = GuestRegs {
            rip: DO_EXIT_VA,
            rsp: kva(STACK + 0x3000),
            rdi: 0x300,
            ..Default::default()
        };
        let after = hit_with(&d, at, TrapHit::Int3 { original: 0x0f }).unwrap();
        assert_eq!(
            after,
            GuestRegs {
                rip: DO_EXIT_VA + 5,
                rdi: 0x500,
                ..at
            }
        );
        assert_eq!(*probe.seen.lock().unwrap(), ["exit_code:0x300"]);
        assert_eq!(
            word(&d, SIGNAL + l.signal_group_exit_code) & 0xffff_ffff,
            group_after
        );
    }
}

#[test]
fn control_stop_reports_quiesce_then_parks_at_the_quiesce_site() {
    let d = dispatcher(guest());
    // The engine keeps its STOP from report_quiesce (a RESUME vote there
    // would withdraw it, as in utrace).
    let probe = trace(
        &d,
        Probe {
            quiesce_vote: Some(ResumeAction::Stop),
            ..Default::default()
        },
        EventMask::QUIESCE,
    );
    let engine = d.lock().traced[&TID].utrace.engines()[0].clone();
    let err = d.control(TID, &engine, ResumeAction::Stop).unwrap_err();
    assert!(
        matches!(
            err,
            crate::hv::TracerError::Utrace(_, crate::UtraceError::InProgress)
        ),
        "{err:?}"
    );
    let l = layout();
    assert_eq!(
        word(&d, TASK + l.tasks.task.ti_flags.offset()) & (1 << 1),
        1 << 1,
        "TIF_NOTIFY_RESUME"
    );
    let call = hit_with(&d, thread_regs(QUIESCE_VA), TrapHit::DebugRegister).expect("parked");
    assert_eq!(call.rip, SCHEDULE_TIMEOUT_VA);
    assert_eq!(d.parked(), [TID]);
    let seen = probe.seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|s| s.starts_with("quiesce")).count(),
        1,
        "{seen:?}"
    );
    drop(seen);
    // Already stopped: STOP again is Ok at once.
    assert!(d.control(TID, &engine, ResumeAction::Stop).is_ok());
}

/// A trap delivered as the vCPU loop delivers it: the special registers
/// (CR3 = `cr3`) read only if the handler asks; returns whether it did.
fn hit_lazily(d: &Dispatcher, va: u64, cr3: u64) -> bool {
    let regs = GuestRegs {
        rip: va,
        rsp: kva(STACK + 0x3000),
        ..Default::default()
    };
    let mut read = || {
        Ok(GuestSregs {
            view: VcpuView {
                cr3,
                cr4: 0,
                idt_base: 0,
                idt_limit: 0,
            },
            gs_base: kva(PERCPU),
            cs: 0x10,
        })
    };
    let mut ctx = TrapContext::with_lazy_sregs(0, regs, &d.ram, &mut read);
    d.on_trap(&mut ctx, va, TrapHit::DebugRegister);
    ctx.sregs_read()
}

/// The thread's `mm_struct`.
const MM: u64 = 0x60000;

/// Gives the thread an `mm` whose `pgd` is the page tables at `pgd_pa`.
fn give_mm(d: &Dispatcher, pgd_pa: u64) {
    let l = layout();
    d.ram
        .write(TASK + l.tasks.task.mm.offset(), &kva(MM).to_le_bytes())
        .unwrap();
    d.ram.write(MM, &kva(pgd_pa).to_le_bytes()).unwrap();
}

#[test]
fn once_learned_a_trap_reads_its_space_from_guest_memory_not_the_registers() {
    let d = dispatcher(guest());
    give_mm(&d, PML4);
    let probe = trace(&d, Probe::default(), SYSCALLS);
    let rounds = crate::hv::trap_space::CHECKS as usize;
    for _ in 0..rounds {
        assert!(hit_lazily(&d, ENTRY_VA, PML4), "learning: registers read");
    }
    assert!(!hit_lazily(&d, ENTRY_VA, PML4), "learned: no register read");
    assert_eq!(probe.seen.lock().unwrap().len(), rounds + 1);
    assert!(probe
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s == &format!("entry:{TID}:{TID}:{GETPID}:0x1111:0x9999:Some({GETPID})")));
    assert!(!d.trap_spaces.disagreed());
}

#[test]
fn a_cr3_that_is_not_the_threads_mm_keeps_the_registers_in_charge() {
    let d = dispatcher(guest());
    // mm->pgd names other page tables (a copy of the kernel's) than CR3.
    let other = 0x70000;
    let mut pml4 = vec![0u8; 4096];
    d.ram.read(PML4, &mut pml4).unwrap();
    d.ram.write(other, &pml4).unwrap();
    give_mm(&d, other);
    let probe = trace(&d, Probe::default(), SYSCALLS);
    for _ in 0..3 * crate::hv::trap_space::CHECKS {
        assert!(hit_lazily(&d, ENTRY_VA, PML4));
    }
    assert!(d.trap_spaces.disagreed());
    assert_eq!(
        probe.seen.lock().unwrap().len(),
        3 * crate::hv::trap_space::CHECKS as usize
    );
}
