//! The traced thread as engine callbacks see it.
//!
//! In the kernel, utrace callbacks run in the traced thread itself, so
//! `current` is the thread and its user memory can be read directly. Here
//! they run on the VMM's vCPU thread while that vCPU is stopped at the
//! trap, and every callback receives a [`ThreadContext`]: the thread's ids,
//! its saved user registers where the event has them, its user memory, and
//! the event's details (an exec's argv, a signal's siginfo). It is an
//! argument, not a thread-local: a callback may hand it on, and the tracer
//! calls engines with no lock of its own held.

use std::cell::RefCell;
use std::sync::Arc;

use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::{KernelPlacement, RunningKernel};
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, translate, AddressSpace};
use guest_introspect::pt_regs::{PtRegsLayout, Reg, UserRegs};
use vmm::vstate::memory::GuestRam;

use crate::engine::UtraceError;
use crate::event::Tid;
use crate::syscalls::UserMemory;

/// The RFLAGS bits a tracer may change in a user thread, as ptrace allows
/// (`FLAG_MASK` in `arch/x86/kernel/ptrace.c`: CF PF AF ZF SF TF DF OF RF
/// AC); the rest keep the thread's values.
const USER_FLAGS: u64 = 0x5_0dd5;

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

/// What the kernel does with a signal it has just taken, as the engines
/// of its report_signal decide (utrace's signal dispositions). The
/// default is [`SignalAction::Deliver`]; a later engine's choice replaces
/// an earlier one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignalAction {
    /// Take the signal as the kernel would (UTRACE_SIGNAL_DELIVER).
    #[default]
    Deliver,
    /// Drop it (UTRACE_SIGNAL_IGN): no handler, no default action.
    Ignore,
    /// Take this signal instead, with this siginfo (DELIVER with a changed
    /// siginfo): the kernel acts on it by its own disposition (its
    /// handler, or its default action), even if the thread blocks it.
    Replace(SignalDetails),
    /// Take a job-control stop instead (UTRACE_SIGNAL_STOP): the group
    /// stops as it would for SIGSTOP, and its parent's `wait` reports
    /// SIGSTOP.
    Stop,
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
    /// At a step's report (SINGLESTEP, BLOCKSTEP), what ran and where the
    /// thread is.
    pub step: Option<crate::step::StepReport>,
    /// At the system-call entry of a thread being stepped: the user
    /// instructions it ran since its last step report, its `syscall`
    /// included (a block step's last block ends here, and may never report
    /// again: `exit_group`).
    pub stepped_instructions: Option<u64>,
    /// At a signal report, what the kernel would do with the signal
    /// (utrace's disposition: `EventMask::SIGNAL` for a handler,
    /// `SIGNAL_IGN`, `SIGNAL_STOP`, `SIGNAL_TERM` or `SIGNAL_CORE`).
    pub signal_disposition: Option<crate::event::EventMask>,
    /// The user registers the kernel saved at its entry (`pt_regs`), where
    /// the report read them (system-call, exec and signal reports; at a
    /// signal's report a system call it interrupted shows its -ERESTART*
    /// error in `ax`, before the kernel's restart decision); changed by
    /// [`ThreadContext::set_reg`].
    regs: RefCell<Option<SavedRegs>>,
    memory: Option<(GuestRam, AddressSpace)>,
    /// At an exit report, the code the engines changed it to.
    exit_code: std::cell::Cell<Option<i64>>,
    /// A signal an engine asked to send the thread from this report.
    send_signal: std::cell::Cell<Option<i32>>,
    /// Whether this report may send a signal (system-call entry, an
    /// INTERRUPT's report).
    may_send_signal: bool,
    /// At the report of a signal the kernel has just taken: the engines'
    /// choice (None at any other report).
    signal_action: std::cell::Cell<Option<SignalAction>>,
    /// Where its open files are found (None: not known here).
    files: Option<OpenFiles>,
}

/// A thread's open files as the kernel holds them: its `task_struct`,
/// read on demand (`strace -y`) through the guest memory and address
/// space of the [`ThreadContext`] that carries it (the trap's space maps
/// the kernel as well as the thread's user half).
#[derive(Clone)]
pub struct OpenFiles {
    /// The kernel's symbols and types.
    pub info: Arc<KernelInfo>,
    /// Where the kernel lies.
    pub placement: KernelPlacement,
    /// The thread's `task_struct`.
    pub task: u64,
}

impl std::fmt::Debug for OpenFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFiles")
            .field("task", &format_args!("{:#x}", self.task))
            .finish_non_exhaustive()
    }
}

impl OpenFiles {
    /// The path of descriptor `fd` as /proc's fd links show it (None if
    /// it is not open, or the guest's structures cannot be followed: they
    /// are untrusted data, and a bad one only costs the annotation).
    pub fn path(&self, ram: &GuestRam, space: AddressSpace, fd: u64) -> Option<String> {
        let k = RunningKernel::assume(
            ram,
            space,
            &self.info.symbols,
            &self.info.types,
            self.placement,
        );
        guest_introspect::tasks::fd_path(&k, self.task, fd)
            .ok()
            .flatten()
    }
}

/// A thread's saved user registers and where they lie.
#[derive(Debug, Clone)]
struct SavedRegs {
    values: UserRegs,
    layout: Arc<PtRegsLayout>,
    /// Whether the report is a system-call entry (the call may be
    /// aborted).
    at_syscall_entry: bool,
}

impl ThreadContext {
    /// A context whose user memory is `space` of `ram`.
    pub fn new(tid: Tid, tgid: Tid, ram: GuestRam, space: AddressSpace) -> Self {
        Self {
            memory: Some((ram, space)),
            ..Self::without_memory(tid, tgid)
        }
    }

    /// A context with no user memory (every read fails): a thread whose
    /// memory is gone, or a test of engine logic.
    pub fn without_memory(tid: Tid, tgid: Tid) -> Self {
        Self {
            tid,
            tgid,
            exec: None,
            signal: None,
            step: None,
            stepped_instructions: None,
            signal_disposition: None,
            regs: RefCell::new(None),
            memory: None,
            exit_code: std::cell::Cell::new(None),
            send_signal: std::cell::Cell::new(None),
            may_send_signal: false,
            signal_action: std::cell::Cell::new(None),
            files: None,
        }
    }

    /// The same context, able to name its thread's open files.
    pub fn with_files(mut self, files: OpenFiles) -> Self {
        self.files = Some(files);
        self
    }

    /// The context of a report from which the thread may be sent a signal
    /// (an INTERRUPT's report, where the thread is about to look for one).
    pub(crate) fn allowing_signal_send(mut self) -> Self {
        self.may_send_signal = true;
        self
    }

    /// The context of the report of a signal the kernel has just taken:
    /// engines may choose what it does with it.
    pub(crate) fn voting_on_signal(self) -> Self {
        self.signal_action.set(Some(SignalAction::Deliver));
        self
    }

    /// At the report of a signal the kernel has just taken (report_signal
    /// with a non-zero signal): what the kernel does with it. A
    /// replacement must name a signal 1..=64; EINVAL for a bad number or
    /// at any other report.
    pub fn set_signal_action(&self, action: SignalAction) -> Result<(), UtraceError> {
        if self.signal_action.get().is_none() {
            return Err(UtraceError::Invalid);
        }
        if let SignalAction::Replace(d) = action {
            if !(1..=64).contains(&d.signo) {
                return Err(UtraceError::Invalid);
            }
        }
        self.signal_action.set(Some(action));
        Ok(())
    }

    /// The engines' choice for the signal reported (Deliver where nothing
    /// was chosen or there is nothing to choose).
    pub fn signal_action(&self) -> SignalAction {
        self.signal_action.get().unwrap_or_default()
    }

    /// The context with the thread's saved user registers `regs` (laid out
    /// as `layout` says); `at_syscall_entry` for a system-call entry
    /// report.
    pub(crate) fn with_regs(
        self,
        regs: UserRegs,
        layout: Arc<PtRegsLayout>,
        at_syscall_entry: bool,
    ) -> Self {
        *self.regs.borrow_mut() = Some(SavedRegs {
            values: regs,
            layout,
            at_syscall_entry,
        });
        self
    }

    /// The saved user registers, as changed so far in this report; None
    /// where the report has none.
    pub fn regs(&self) -> Option<UserRegs> {
        self.regs.borrow().as_ref().map(|r| r.values.clone())
    }

    /// After an exit report: the exit code the engines chose, if they
    /// changed it (report_exit's `code`).
    pub fn new_exit_code(&self) -> Option<i64> {
        self.exit_code.get()
    }

    pub(crate) fn set_exit_code(&self, code: i64) {
        self.exit_code.set(Some(code));
    }

    /// Sends the thread signal `sig` (1..=64) when the report ends, as the
    /// kernel's `send_sig(sig, task, 1)` (what a ptracer's restart with a
    /// signal does): it is delivered on the thread's way back to user
    /// mode. Served at system-call entry reports and at an INTERRUPT's
    /// report (then it is the signal the thread takes next, utrace's way of
    /// injecting one); EINVAL elsewhere or for a bad number.
    pub fn send_signal(&self, sig: i32) -> Result<(), UtraceError> {
        let at_entry = self
            .regs
            .borrow()
            .as_ref()
            .is_some_and(|r| r.at_syscall_entry);
        if !(1..=64).contains(&sig) || !(at_entry || self.may_send_signal) {
            return Err(UtraceError::Invalid);
        }
        self.send_signal.set(Some(sig));
        Ok(())
    }

    /// The signal an engine asked to send from this report.
    pub(crate) fn signal_to_send(&self) -> Option<i32> {
        self.send_signal.get()
    }

    /// Changes saved user register `reg`: what the thread has when it
    /// returns to user mode; at a system-call entry, `orig_ax` and the
    /// argument registers are the call the kernel then runs, at its exit
    /// `ax` is the value returned. As ptrace, the segment selectors cannot
    /// be changed (EINVAL) and only the user-changeable RFLAGS bits are
    /// taken. EINVAL where the report has no registers, EFAULT if they
    /// cannot be written.
    pub fn set_reg(&self, reg: Reg, value: u64) -> Result<(), UtraceError> {
        if matches!(reg, Reg::Cs | Reg::Ss) {
            return Err(UtraceError::Invalid);
        }
        let mut regs = self.regs.borrow_mut();
        let saved = regs.as_mut().ok_or(UtraceError::Invalid)?;
        let (ram, space) = self.memory.as_ref().ok_or(UtraceError::NoSuchThread)?;
        let value = match reg {
            Reg::Flags => (saved.values.get(reg) & !USER_FLAGS) | (value & USER_FLAGS),
            _ => value,
        };
        // pt_regs lies on the thread's kernel stack, mapped alike in every
        // address space; its 8-byte fields never cross a page.
        let va = saved.values.addr.wrapping_add(saved.layout.offset(reg));
        let pa = translate(ram, *space, VirtAddr(va)).map_err(|_| UtraceError::Fault)?;
        ram.write(pa.0, &value.to_le_bytes())
            .map_err(|_| UtraceError::Fault)?;
        saved.values.values[reg as usize] = value;
        Ok(())
    }

    /// At a system-call entry report: the kernel skips the call and the
    /// thread sees `ret` as its result (utrace's UTRACE_SYSCALL_ABORT, with
    /// the return value set as a ptracer would). The exit is still
    /// reported, with `ret`. EINVAL at any other report.
    pub fn abort_syscall(&self, ret: i64) -> Result<(), UtraceError> {
        let at_entry = self
            .regs
            .borrow()
            .as_ref()
            .is_some_and(|r| r.at_syscall_entry);
        if !at_entry {
            return Err(UtraceError::Invalid);
        }
        // syscall_trace_enter re-reads orig_ax after the tracehooks: -1
        // makes do_syscall_64 run nothing and leave ax as set here.
        self.set_reg(Reg::Ax, ret as u64)?;
        self.set_reg(Reg::OrigAx, u64::MAX)
    }

    /// The address space its user memory is read in.
    pub fn space(&self) -> Option<AddressSpace> {
        self.memory.as_ref().map(|(_, space)| *space)
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
        let Some((ram, space)) = &self.memory else {
            return false;
        };
        read_virt(ram, *space, VirtAddr(addr), buf).is_ok()
    }

    fn fd_path(&self, fd: u64) -> Option<String> {
        let (ram, space) = self.memory.as_ref()?;
        self.files.as_ref()?.path(ram, *space, fd)
    }

    fn user_sp(&self) -> Option<u64> {
        self.regs().map(|r| r.get(Reg::Sp))
    }
}
