//! What a client may do to a stopped thread: read and write its user
//! registers and its memory.
//!
//! Registers: a parked thread's user registers are the `pt_regs` at the top
//! of its kernel stack, restored when it returns to user mode; they are
//! read and written there (as ptrace's `PTRACE_GETREGS`/`SETREGS`, with its
//! rules: segment selectors are not changed, only the user-changeable
//! RFLAGS bits). The FS and GS bases are read from the task's
//! `thread_struct`, and the FPU/SSE registers (read only) from the XSAVE
//! area the kernel saved them to when the parked thread was switched out.
//!
//! Memory: the parked thread itself calls the kernel's
//! `access_process_vm(task, addr, buf, len, FOLL_FORCE [| FOLL_WRITE])`,
//! ptrace's own primitive, on its own task (see [`crate::hv::kcall`]): the
//! thread is woken, runs the call at its park site with a buffer on its
//! kernel stack below the call's frame, and parks again. So a write lands
//! as the guest's ptrace would land it: a private read-only page (program
//! text, a shared library, a page shared with the parent after fork) is
//! copied for this process only, and the file and every other process
//! keep theirs. Writes are checked with a read of the same range first, so
//! that a range running off a mapping fails whole (EFAULT) with nothing
//! written.

use std::sync::mpsc;
use std::time::Duration;

use guest_introspect::error::IntrospectError;
use guest_introspect::kernel::RunningKernel;
use guest_introspect::memory::VirtAddr;
use guest_introspect::paging::{read_virt, translate, AddressSpace};
use guest_introspect::pt_regs::{Reg, UserRegs};
use vmm::trap::GuestRegs;
use vmm::vstate::memory::GuestRam;

use crate::context::ThreadContext;
use crate::engine::UtraceError;
use crate::event::Tid;
use crate::hv::dispatch::Dispatcher;
use crate::hv::doorbell::Wake;
use crate::hv::kcall::{KernelCall, Purpose};
use crate::hv::park::TASK_UNINTERRUPTIBLE;
use crate::hv::threads::Threads;

/// The most bytes one `access_process_vm` call moves (the buffer lies on
/// the thread's 16 KiB kernel stack).
pub const ACCESS_CHUNK: usize = 1024;
/// `FOLL_WRITE` and `FOLL_FORCE` (the same values in 6.1 and 6.12).
const FOLL_WRITE: u64 = 0x01;
const FOLL_FORCE: u64 = 0x10;
/// Lowest non-user address on x86-64 (4-level and 5-level paging alike,
/// for the user addresses a 4-level process can have).
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// A memory access a client queued for a parked thread.
pub(crate) struct AccessJob {
    /// User address.
    pub addr: u64,
    /// Bytes to read, or the bytes to write.
    pub op: AccessOp,
    /// Where the result goes: the bytes read (or written), possibly fewer
    /// than asked at the end of a mapping.
    pub reply: mpsc::Sender<Result<Vec<u8>, UtraceError>>,
}

/// Read or write.
pub enum AccessOp {
    /// Read this many bytes.
    Read(usize),
    /// Write these bytes.
    Write(Vec<u8>),
}

impl AccessOp {
    fn len(&self) -> usize {
        match self {
            AccessOp::Read(n) => *n,
            AccessOp::Write(d) => d.len(),
        }
    }
}

/// A thread's user registers and segment bases.
#[derive(Debug, Clone)]
pub struct StoppedRegs {
    /// The saved user registers.
    pub regs: UserRegs,
    /// `thread_struct.fsbase`, if the kernel has it.
    pub fs_base: Option<u64>,
    /// `thread_struct.gsbase`, if the kernel has it.
    pub gs_base: Option<u64>,
    /// The FXSAVE image of its FPU and SSE registers (read only): the
    /// first 512 bytes of the XSAVE area the kernel saved when the thread
    /// was switched out.
    pub fxsave: Option<Vec<u8>>,
}

impl Dispatcher {
    /// The `task_struct` of `tid` if it is parked.
    fn parked_task(&self, tid: Tid) -> Result<u64, UtraceError> {
        self.lock()
            .parked
            .get(&tid)
            .copied()
            .ok_or(UtraceError::NotStopped)
    }

    /// A context over parked thread `tid`'s saved user registers.
    fn stopped_context(&self, tid: Tid) -> Result<(ThreadContext, u64), UtraceError> {
        let task = self.parked_task(tid)?;
        let k = self.kernel(self.kernel_space);
        let regs = self.user_regs(&k, task).map_err(|_| UtraceError::Fault)?;
        let ctx = ThreadContext::new(tid, tid, self.ram.clone(), self.kernel_space).with_regs(
            regs,
            self.pt_regs.clone(),
            false,
        );
        Ok((ctx, task))
    }

    /// Parked thread `tid`'s user registers and segment bases.
    pub(crate) fn stopped_regs(&self, tid: Tid) -> Result<StoppedRegs, UtraceError> {
        let (ctx, task) = self.stopped_context(tid)?;
        let k = self.kernel(self.kernel_space);
        let base =
            |off: Option<u64>| off.and_then(|o| k.read_u64(task.wrapping_add(o), "fsbase").ok());
        let fxsave = self.layout.fpstate.and_then(|(ptr, regs)| {
            let fpstate = k
                .read_u64(task.wrapping_add(ptr), "thread.fpu.fpstate")
                .ok()?;
            let mut area = vec![0u8; 512];
            k.read(fpstate.wrapping_add(regs), &mut area, "fpstate.regs")
                .ok()?;
            Some(area)
        });
        Ok(StoppedRegs {
            regs: ctx.regs().ok_or(UtraceError::Fault)?,
            fs_base: base(self.layout.thread_fsbase),
            gs_base: base(self.layout.thread_gsbase),
            fxsave,
        })
    }

    /// Sets parked thread `tid`'s user registers (ptrace's rules: see
    /// [`ThreadContext::set_reg`]); all are checked before any is written.
    pub(crate) fn set_stopped_regs(
        &self,
        tid: Tid,
        changes: &[(Reg, u64)],
    ) -> Result<StoppedRegs, UtraceError> {
        if changes.iter().any(|(r, _)| matches!(r, Reg::Cs | Reg::Ss)) {
            return Err(UtraceError::Invalid);
        }
        let (ctx, _) = self.stopped_context(tid)?;
        for &(reg, value) in changes {
            ctx.set_reg(reg, value)?;
        }
        self.stopped_regs(tid)
    }

    /// Sets parked thread `tid`'s FS and/or GS base as ptrace does
    /// (`x86_fsbase_write_task`: the value its `thread_struct` holds while
    /// it is switched out, loaded when it next runs). EIO-like EINVAL for
    /// a value past the user half (ptrace: `value >= TASK_SIZE_MAX`),
    /// ENOTSUP where the kernel has no such field, EBUSY if the thread is
    /// on a CPU. The caller pauses every vCPU, so it cannot be switched in
    /// while the value is written.
    pub(crate) fn set_stopped_bases(
        &self,
        tid: Tid,
        fs: Option<u64>,
        gs: Option<u64>,
    ) -> Result<StoppedRegs, UtraceError> {
        let task = self.parked_task(tid)?;
        let k = self.kernel(self.kernel_space);
        let mut writes = Vec::new();
        for (value, field) in [
            (fs, self.layout.thread_fsbase),
            (gs, self.layout.thread_gsbase),
        ] {
            let Some(value) = value else { continue };
            let field = field.ok_or(UtraceError::NotSupported)?;
            if value >= USER_END - 0x1000 {
                return Err(UtraceError::Invalid);
            }
            writes.push((task.wrapping_add(field), value));
        }
        if let Some(on_cpu) = self.layout.task_on_cpu {
            let running = k
                .read_u32(task.wrapping_add(on_cpu), "task_struct.on_cpu")
                .map_err(|_| UtraceError::Fault)?;
            if running != 0 {
                return Err(UtraceError::NotStopped);
            }
        }
        for (at, value) in writes {
            self.write_kernel(self.kernel_space, at, &value.to_le_bytes())
                .map_err(|_| UtraceError::Fault)?;
        }
        self.stopped_regs(tid)
    }

    /// Reads (`op` Read) or writes parked thread `tid`'s memory at user
    /// address `addr`, in chunks the thread moves itself. A read returns
    /// the bytes up to the first unmapped one (EFAULT if none); a write is
    /// all or nothing.
    pub(crate) fn access_memory(
        &self,
        tid: Tid,
        addr: u64,
        op: AccessOp,
    ) -> Result<Vec<u8>, UtraceError> {
        let len = op.len();
        let end = addr.checked_add(len as u64).ok_or(UtraceError::Fault)?;
        if end > USER_END || len == 0 {
            return Err(UtraceError::Invalid);
        }
        if self.kfuncs.and_then(|f| f.access_process_vm).is_none() {
            return Err(UtraceError::NotSupported);
        }
        match op {
            AccessOp::Read(_) => {
                // Present pages are read straight from guest memory: the
                // process is held, so its mappings stand still. Anything
                // else (a page never touched, swapped, a hole) goes through
                // the thread's own access_process_vm, as ptrace's does.
                if let Some(bytes) = self.read_present(tid, addr, len) {
                    return Ok(bytes);
                }
                let mut out = Vec::with_capacity(len);
                while out.len() < len {
                    let n = (len - out.len()).min(ACCESS_CHUNK);
                    let at = addr + out.len() as u64;
                    let got = self.access_chunk(tid, at, AccessOp::Read(n))?;
                    let short = got.len() < n;
                    out.extend(got);
                    if short {
                        break;
                    }
                }
                if out.is_empty() {
                    return Err(UtraceError::Fault);
                }
                Ok(out)
            }
            AccessOp::Write(data) => {
                let readable = self.access_memory(tid, addr, AccessOp::Read(len))?;
                if readable.len() < len {
                    return Err(UtraceError::Fault);
                }
                for (i, chunk) in data.chunks(ACCESS_CHUNK).enumerate() {
                    let at = addr + (i * ACCESS_CHUNK) as u64;
                    let done = self.access_chunk(tid, at, AccessOp::Write(chunk.to_vec()))?;
                    if done.len() < chunk.len() {
                        return Err(UtraceError::Fault);
                    }
                }
                Ok(data)
            }
        }
    }

    /// `len` bytes at user address `addr` of parked thread `tid`'s
    /// process, read through its page tables (`mm->pgd`) from guest
    /// memory; None unless every page is present.
    fn read_present(&self, tid: Tid, addr: u64, len: usize) -> Option<Vec<u8>> {
        let task = self.parked_task(tid).ok()?;
        let k = self.kernel(self.kernel_space);
        let mm = self
            .layout
            .tasks
            .task
            .mm
            .read(&k, task, "task_struct.mm")
            .ok()?;
        if mm == 0 {
            return None;
        }
        let space = self.mm_space(&k, mm).ok()?;
        let mut buf = vec![0u8; len];
        read_virt(&self.ram, space, VirtAddr(addr), &mut buf).ok()?;
        Some(buf)
    }

    /// The user address space of `mm` (its `pgd`, translated to the
    /// physical address CR3 would hold).
    pub(crate) fn mm_space(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        mm: u64,
    ) -> Result<AddressSpace, IntrospectError> {
        let pgd = self.layout.tasks.mm.pgd.read(k, mm, "mm_struct.pgd")?;
        let pa =
            translate(&self.ram, k.space(), VirtAddr(pgd)).map_err(|e| IntrospectError::Read {
                what: "a process's page tables (mm->pgd)".into(),
                va: pgd,
                source: e.into(),
            })?;
        Ok(AddressSpace {
            cr3: pa.0,
            levels: k.space().levels,
        })
    }

    /// One chunk: queue it for the parked thread, wake the thread, wait.
    fn access_chunk(&self, tid: Tid, addr: u64, op: AccessOp) -> Result<Vec<u8>, UtraceError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut threads = self.lock();
            let task = *threads.parked.get(&tid).ok_or(UtraceError::NotStopped)?;
            threads
                .accesses
                .entry(tid)
                .or_default()
                .push_back(AccessJob {
                    addr,
                    op,
                    reply: tx,
                });
            threads.wakes.push_back(Wake {
                tid,
                task,
                state: TASK_UNINTERRUPTIBLE,
            });
        }
        self.ring_doorbell();
        // The thread's one-second backstop runs the job if the doorbell
        // cannot ring.
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| UtraceError::NotStopped)?
    }

    /// Starts `job` as a call of parked thread `tid` (the trap `call`),
    /// under the table's lock. On failure the job's client gets the error.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_access(
        &self,
        threads: &mut Threads,
        tid: Tid,
        task: u64,
        call: &KernelCall,
        job: AccessJob,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> Result<(), ()> {
        let Some(function) = self.kfuncs.and_then(|f| f.access_process_vm) else {
            let _ = job.reply.send(Err(UtraceError::NotSupported));
            return Err(());
        };
        let len = job.op.len();
        // The buffer lies below the trap's stack pointer (dead stack, the
        // kernel has no red zone), 16-byte aligned, with a gap; the call's
        // frame starts below it.
        let buf = (call.saved.rsp.wrapping_sub(64 + len as u64)) & !15;
        let flags = match &job.op {
            AccessOp::Read(_) => FOLL_FORCE,
            AccessOp::Write(data) => {
                if let Err(e) = self.write_kernel(space, buf, data) {
                    log::warn!("tracer: memory write for thread {tid}: {e}");
                    let _ = job.reply.send(Err(UtraceError::Fault));
                    return Err(());
                }
                FOLL_FORCE | FOLL_WRITE
            }
        };
        let c = KernelCall {
            saved: call.saved,
            frame: buf,
            site: call.site,
            purpose: Purpose::Access {
                tid,
                task,
                buf,
                len,
            },
        };
        let args = [task, job.addr, buf, len as u64, flags];
        match self.call_kernel(regs, space, c, function, &args) {
            Ok(()) => {
                threads.access_running.insert(tid, job);
                Ok(())
            }
            Err(e) => {
                log::warn!("tracer: memory access for thread {tid}: {e}");
                let _ = job.reply.send(Err(UtraceError::Fault));
                Err(())
            }
        }
    }

    /// A thread's `access_process_vm` returned `ret` (bytes moved): the
    /// client gets them.
    pub(crate) fn finish_access(
        &self,
        tid: Tid,
        buf: u64,
        len: usize,
        ret: u64,
        space: AddressSpace,
    ) {
        let Some(job) = self.lock().access_running.remove(&tid) else {
            return;
        };
        let n = usize::try_from(ret as i32).unwrap_or(0).min(len);
        let result = match job.op {
            AccessOp::Write(mut data) => {
                data.truncate(n);
                Ok(data)
            }
            AccessOp::Read(_) => {
                let mut out = vec![0u8; n];
                self.kernel(space)
                    .read(buf, &mut out, "a kernel stack buffer")
                    .map(|()| out)
                    .map_err(|_| UtraceError::Fault)
            }
        };
        let _ = job.reply.send(result);
    }
}
