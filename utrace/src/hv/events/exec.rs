//! A successful exec (`exec_binprm`/`begin_new_exec`): reported to a
//! traced thread's engines with the new program's name and argv, and the
//! moment an awaited command starts being traced (`hvtrace trace -- CMD`:
//! the first exec whose argv is the command's).

use guest_introspect::error::IntrospectError;
use guest_introspect::kernel::RunningKernel;
use vmm::vstate::memory::GuestRam;

use crate::context::{ExecDetails, ThreadContext};
use crate::event::Event;
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::hv::threads::Traced;
use crate::syscalls::UserMemory;

/// Longest argv read at an exec, in bytes.
const ARGV_MAX_BYTES: usize = 64 << 10;
/// Most argv entries read at an exec.
const ARGV_MAX_ITEMS: usize = 4096;

impl Dispatcher {
    /// The exec site, with `bprm` in rdi.
    pub(crate) fn on_exec(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        let (traced, armed) = {
            let threads = self.lock();
            (threads.is_traced(t.tid), threads.armed.is_some())
        };
        if !traced && !armed {
            return Ok(());
        }
        let k = &t.k;
        let l = &self.layout;
        let bprm = t.regs.rdi;
        // The execve's own arguments, still in the old image's memory and
        // in the saved registers.
        let u = self.user_regs(k, t.current)?;
        let (nr, args) = (u.syscall_nr(), u.syscall_args());
        let mut ctx = self
            .thread_context(t)
            .with_regs(u, self.pt_regs.clone(), false);
        let argv_ptr = match self.syscalls.name(nr) {
            Some("execve") => Some(args[1]),
            Some("execveat") => Some(args[2]),
            _ => None,
        };
        let syscall_argv = argv_ptr.and_then(|p| read_argv(&ctx, p));
        let started = !traced && self.start_if_awaited(t, syscall_argv.as_ref())?;
        if !traced && !started {
            return Ok(());
        }
        // The new program's name and argv, from the bprm.
        let filename_ptr =
            k.read_u64(bprm.wrapping_add(l.bprm_filename), "linux_binprm.filename")?;
        let filename = k.read_cstr(filename_ptr, 4096, "linux_binprm.filename")?;
        let envc = u64::from(k.read_u32(bprm.wrapping_add(l.bprm_envc), "linux_binprm.envc")?);
        // The new image's copy, when the old one's pages are not mapped
        // (a fresh fork's data the kernel has not touched).
        let argv = syscall_argv
            .or_else(|| self.bprm_argv(k, bprm).ok())
            .unwrap_or_default();
        if started {
            // The engine's first report is the execve it attached in.
            self.report(t.tid, &Event::SyscallEntry { nr, args }, &ctx, t.space());
        }
        ctx.exec = Some(ExecDetails {
            filename: filename.clone(),
            argv,
            envc,
        });
        self.report(t.tid, &Event::Exec { filename }, &ctx, t.space());
        Ok(())
    }

    /// Starts tracing `t`'s thread if its exec's argv is the one awaited.
    fn start_if_awaited(
        &self,
        t: &Trap<'_>,
        argv: Option<&Vec<String>>,
    ) -> Result<bool, IntrospectError> {
        let mut threads = self.lock();
        let matches = threads
            .armed
            .as_ref()
            .is_some_and(|a| argv == Some(&a.argv));
        if !matches {
            return Ok(false);
        }
        let armed = threads.armed.take().expect("checked");
        let traced = Traced::new(t.tid, t.current, &armed.specs)
            .map_err(|e| IntrospectError::Corrupt(format!("attach to {}: {e}", t.tid)))?;
        let wants_syscalls = traced.wants_syscalls();
        threads.traced.insert(t.tid, traced);
        drop(threads);
        if wants_syscalls {
            self.steer(t.space(), t.current, true)?;
        }
        Ok(true)
    }

    /// The argv strings the kernel copied to the top of the new image's
    /// stack (`bprm->p` in `bprm->mm`).
    fn bprm_argv(
        &self,
        k: &RunningKernel<'_, GuestRam>,
        bprm: u64,
    ) -> Result<Vec<String>, IntrospectError> {
        let l = &self.layout;
        let mm = k.read_u64(bprm.wrapping_add(l.bprm_mm), "linux_binprm.mm")?;
        let space = self.mm_space(k, mm)?;
        let argc = k.read_u32(bprm.wrapping_add(l.bprm_argc), "linux_binprm.argc")? as usize;
        if argc > ARGV_MAX_ITEMS {
            return Err(IntrospectError::Corrupt(format!(
                "exec with {argc} arguments"
            )));
        }
        let mem = ThreadContext::new(0, 0, self.ram.clone(), space);
        let mut at = k.read_u64(bprm.wrapping_add(l.bprm_p), "linux_binprm.p")?;
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
