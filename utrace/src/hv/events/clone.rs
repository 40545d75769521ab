//! A new task about to run for the first time (`wake_up_new_task`, with
//! the child in rdi): reported to the parent's engines with the clone
//! flags, after the engines that follow children attached to the child.

use guest_introspect::error::IntrospectError;
use guest_introspect::kernel::RunningKernel;
use guest_introspect::pt_regs::Reg;
use vmm::vstate::memory::GuestRam;

use crate::context::ThreadContext;
use crate::event::{Event, Tid};
use crate::hv::dispatch::{Dispatcher, Trap};
use crate::hv::threads::Traced;
use crate::syscalls::UserMemory;

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x10000;
const SIGCHLD: u64 = 17;

impl Dispatcher {
    /// The clone site.
    pub(crate) fn on_clone(&self, t: &Trap<'_>) -> Result<(), IntrospectError> {
        if !self.lock().is_traced(t.tid) {
            return Ok(());
        }
        let k = &t.k;
        let child = t.regs.rdi;
        let pid = self.layout.tasks.task.pid;
        let child_tid = pid.read(k, child, "task_struct.pid")? as u32 as Tid;
        let flags = self.clone_flags(k, t.current, child)?;
        // Followers attach to the child before it first runs.
        let mut threads = self.lock();
        let specs = threads
            .traced
            .get(&t.tid)
            .map(Traced::followers)
            .unwrap_or_default();
        let mut wants_syscalls = false;
        if !specs.is_empty() {
            if let Ok(traced) = Traced::new(child_tid, child, &specs) {
                wants_syscalls = traced.wants_syscalls();
                threads.traced.insert(child_tid, traced);
            }
        }
        drop(threads);
        // The child inherited the parent's syscall_work.
        if wants_syscalls {
            self.steer(t.space(), child, true)?;
        } else {
            self.steer_off_untraced(k, child)?;
        }
        let event = Event::Clone {
            child: child_tid,
            flags,
        };
        self.report(t.tid, &event, &self.thread_context(t), t.space());
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
        if let Ok(u) = self.user_regs(k, parent) {
            let di = u.get(Reg::Di);
            match self.syscalls.name(u.syscall_nr()) {
                Some("clone") => return Ok(di),
                Some("fork") => return Ok(SIGCHLD),
                Some("vfork") => return Ok(CLONE_VM | CLONE_VFORK | SIGCHLD),
                Some("clone3") => {
                    let mem = ThreadContext::new(0, 0, self.ram.clone(), k.space());
                    let mut b = [0u8; 8];
                    if mem.read(di, &mut b) {
                        return Ok(u64::from_le_bytes(b));
                    }
                }
                _ => {}
            }
        }
        let l = &self.layout.tasks.task;
        let tgid = |task: u64| l.tgid.read(k, task, "task_struct.tgid");
        let mm = |task: u64| l.mm.read(k, task, "task_struct.mm");
        let mut flags = 0;
        if tgid(parent)? == tgid(child)? {
            flags |= CLONE_THREAD;
        }
        if mm(parent)? == mm(child)? {
            flags |= CLONE_VM;
        }
        if l.vfork_done.read(k, child, "task_struct.vfork_done")? != 0 {
            flags |= CLONE_VFORK;
        }
        Ok(flags)
    }
}
