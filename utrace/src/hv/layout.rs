//! Everything the trap handlers read in guest kernel structures, resolved
//! once per kernel from its BTF and symbols: no offset is hard-coded, and
//! the hot path (a trap per traced system call) does no name lookups.

use guest_introspect::error::{IntrospectError, Result};
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::PhysMemory;
use guest_introspect::task_layout::{Field, TaskLayout};

/// `kernel_siginfo` member offsets: `si_signo`, `si_code`,
/// `_sifields._kill._pid`, `._kill._uid`, `._sigchld._status`.
#[derive(Debug, Clone, Copy)]
pub struct SiginfoLayout {
    /// `si_signo`.
    pub signo: u64,
    /// `si_code`.
    pub code: u64,
    /// `_sifields._kill._pid`.
    pub pid: u64,
    /// `_sifields._kill._uid`.
    pub uid: u64,
    /// `_sifields._sigchld._status`.
    pub status: u64,
}

/// Offsets and constants the tracer needs.
#[derive(Debug, Clone)]
pub struct TraceLayout {
    /// Per-CPU offset of the current task pointer (`current_task`, or
    /// `pcpu_hot.current_task` on 6.2+): `gs_base + this` holds `current`.
    pub current_task: u64,
    /// `linux_binprm.p`, `.argc`, `.envc`, `.filename`, `.mm`.
    pub bprm_p: u64,
    /// See `bprm_p`.
    pub bprm_argc: u64,
    /// See `bprm_p`.
    pub bprm_envc: u64,
    /// See `bprm_p`.
    pub bprm_filename: u64,
    /// See `bprm_p`.
    pub bprm_mm: u64,
    /// `ksignal.sig`.
    pub ksig_sig: u64,
    /// `ksignal.info`.
    pub ksig_info: u64,
    /// `ksignal.ka.sa.sa_handler`.
    pub ksig_handler: u64,
    /// The `kernel_siginfo` members hvtrace reports.
    pub siginfo: SiginfoLayout,
    /// `task_struct.pending` (the thread's own `sigpending`).
    pub task_pending: u64,
    /// `signal_struct.shared_pending` (the thread group's `sigpending`).
    pub signal_shared_pending: u64,
    /// `sigpending.list`: the queue of `sigqueue.list` entries.
    pub sigpending_list: u64,
    /// `task_struct.sighand`.
    pub task_sighand: u64,
    /// `task_struct.jobctl`.
    pub task_jobctl: u64,
    /// `task_struct.on_cpu` (SMP kernels): non-zero while the task runs
    /// or is being switched.
    pub task_on_cpu: Option<u64>,
    /// `sighand_struct.action`: the k_sigaction array, one per signal.
    pub sighand_action: u64,
    /// `sizeof(struct k_sigaction)`.
    pub k_sigaction_size: u64,
    /// `k_sigaction.sa.sa_handler`.
    pub k_sigaction_handler: u64,
    /// `sizeof(kernel_siginfo_t)`.
    pub siginfo_size: u64,
    /// `sigpending.signal`: the pending set (bit N-1 for signal N).
    pub sigpending_signal: u64,
    /// `signal_struct.live`: the group's threads not yet exited.
    pub signal_live: u64,
    /// `signal_struct.group_exit_code`.
    pub signal_group_exit_code: u64,
    /// `sigqueue.list`.
    pub sigqueue_list: u64,
    /// `sigqueue.info`.
    pub sigqueue_info: u64,
    /// The task fields (shared with the task decoder) and `pt_regs`.
    pub tasks: TaskLayout,
    /// `task_struct.thread_info.syscall_work`, which the tracer steers by.
    pub syscall_work: Field,
    /// The `syscall_work` bit hvtrace sets on traced threads
    /// (`SYSCALL_WORK_SYSCALL_TRACEPOINT`): it sends the thread through
    /// `syscall_trace_enter` and the exit work, and does nothing else while
    /// no syscall tracepoint is enabled in the guest.
    pub steer_bit: u64,
    /// `SYSCALL_WORK_EXIT`: the bits that send a syscall exit to the exit
    /// work (used to find the inlined `syscall_exit_work`).
    pub exit_work_mask: u64,
    /// Link-time to runtime address shift.
    pub virt_offset: i64,
    /// `task_struct.thread.fsbase` (the FS base of a task not running).
    pub thread_fsbase: Option<u64>,
    /// `task_struct.thread.gsbase`.
    pub thread_gsbase: Option<u64>,
    /// `task_struct.thread.fpu.fpstate` (a pointer) and `fpstate.regs`
    /// (the XSAVE area, whose first 512 bytes are the FXSAVE layout): where
    /// a task not running keeps its FPU and SSE registers (5.16+).
    pub fpstate: Option<(u64, u64)>,
}

/// The `syscall_work` bits whose test guards the inlined exit work
/// (`SYSCALL_WORK_EXIT` in `include/linux/entry-common.h`), by name.
const EXIT_WORK_BITS: [&str; 5] = [
    "SYSCALL_WORK_BIT_SYSCALL_TRACEPOINT",
    "SYSCALL_WORK_BIT_SYSCALL_TRACE",
    "SYSCALL_WORK_BIT_SYSCALL_AUDIT",
    "SYSCALL_WORK_BIT_SYSCALL_USER_DISPATCH",
    "SYSCALL_WORK_BIT_SYSCALL_EXIT_TRAP",
];

impl TraceLayout {
    /// Resolves the layout of the kernel `k`.
    pub fn resolve<M: PhysMemory + ?Sized>(k: &RunningKernel<'_, M>) -> Result<Self> {
        let t = k.types();
        let off = |s: &str, m: &str| -> Result<u64> { Ok(t.member(s, m)?.offset) };
        let current_task = if k.symbols().lookup("pcpu_hot").is_some() {
            k.symbol("pcpu_hot")? + off("pcpu_hot", "current_task")?
        } else {
            k.symbol("current_task")?
        };
        let bit = |name: &str| -> Result<u64> {
            let v = t.enumerator(name)?;
            if !(0..64).contains(&v) {
                return Err(IntrospectError::Corrupt(format!("{name} is {v}")));
            }
            Ok(1u64 << v)
        };
        let mut exit_work_mask = 0;
        for name in EXIT_WORK_BITS {
            exit_work_mask |= bit(name)?;
        }
        let si = |m: &str| off("kernel_siginfo", m);
        let tasks = TaskLayout::resolve(t)?;
        Ok(Self {
            ksig_sig: off("ksignal", "sig")?,
            ksig_info: off("ksignal", "info")?,
            ksig_handler: off("ksignal", "ka.sa.sa_handler")?,
            siginfo: SiginfoLayout {
                signo: si("si_signo")?,
                code: si("si_code")?,
                pid: si("_sifields._kill._pid")?,
                uid: si("_sifields._kill._uid")?,
                status: si("_sifields._sigchld._status")?,
            },
            task_pending: off("task_struct", "pending")?,
            task_sighand: off("task_struct", "sighand")?,
            task_jobctl: off("task_struct", "jobctl")?,
            task_on_cpu: off("task_struct", "on_cpu").ok(),
            sighand_action: off("sighand_struct", "action")?,
            k_sigaction_size: t.struct_size("k_sigaction")?,
            k_sigaction_handler: off("k_sigaction", "sa.sa_handler")?,
            siginfo_size: t.struct_size("kernel_siginfo")?,
            signal_shared_pending: off("signal_struct", "shared_pending")?,
            sigpending_list: off("sigpending", "list")?,
            sigpending_signal: off("sigpending", "signal")?,
            signal_group_exit_code: off("signal_struct", "group_exit_code")?,
            sigqueue_list: off("sigqueue", "list")?,
            sigqueue_info: off("sigqueue", "info")?,
            current_task,
            bprm_p: off("linux_binprm", "p")?,
            bprm_argc: off("linux_binprm", "argc")?,
            bprm_envc: off("linux_binprm", "envc")?,
            bprm_filename: off("linux_binprm", "filename")?,
            bprm_mm: off("linux_binprm", "mm")?,
            syscall_work: tasks.task.syscall_work.ok_or_else(|| {
                IntrospectError::Corrupt(
                    "task_struct has no thread_info.syscall_work (Linux 5.11+ is needed)".into(),
                )
            })?,
            tasks,
            signal_live: off("signal_struct", "live")?,
            steer_bit: bit("SYSCALL_WORK_BIT_SYSCALL_TRACEPOINT")?,
            exit_work_mask,
            virt_offset: k.placement().virt_offset,
            thread_fsbase: off("task_struct", "thread.fsbase").ok(),
            thread_gsbase: off("task_struct", "thread.gsbase").ok(),
            fpstate: off("task_struct", "thread.fpu.fpstate")
                .ok()
                .zip(off("fpstate", "regs").ok()),
        })
    }
}
