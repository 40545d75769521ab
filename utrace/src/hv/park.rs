//! STOP: a traced thread held stopped sleeps in its own kernel, parked by
//! the guest's scheduler, while the rest of the guest runs on.
//!
//! When an engine holds a thread stopped (a STOP vote at a report, or
//! `control(STOP)`, which also sets TIF_NOTIFY_RESUME so that a thread in
//! user mode comes to the QUIESCE site at its next interrupt), the thread
//! is parked at the first site it reaches where the kernel itself may
//! sleep: the system-call entry or exit work, exec, clone, exit, signal
//! delivery, or the return-to-user work (QUIESCE). Parking is a call the
//! thread makes there ([`crate::hv::kcall`]): the tracer sets the task's
//! `__state` to `TASK_UNINTERRUPTIBLE | TASK_WAKEKILL | TASK_NOLOAD` (a
//! killable sleep that does not count in the load average and that the
//! hung-task detector skips, as it skips every killable sleep) and calls
//! `schedule_timeout(1 s)`. Setting the state before the call, as the
//! kernel's own `set_current_state(); schedule()` does, means a wake-up
//! sent at any time after the park decision is not lost.
//!
//! The thread wakes for three reasons: the tracer's doorbell
//! ([`crate::hv::doorbell`]) once no engine holds it any more; a SIGKILL
//! (TASK_WAKEKILL); or the one-second timeout, a backstop in case the
//! doorbell cannot ring. Each time it returns to the site the tracer looks
//! again: still held and not killed, it parks again (the guest sees one
//! more context switch a second); otherwise every register is restored
//! and the thread carries on from the site as if nothing happened. A
//! SIGKILL releases every STOP (as in utrace): the thread goes on to die.
//!
//! What the guest can observe: the thread in state `D` in its own `ps`
//! (sleeping in `schedule_timeout`, killable), its voluntary context
//! switches counting up once a second, the time it was held. Nothing is
//! changed in kernel text or data beyond the thread's own state word and
//! the dead part of its kernel stack.

use std::time::{Duration, Instant};

use guest_introspect::error::IntrospectError;
use guest_introspect::paging::AddressSpace;
use vmm::trap::GuestRegs;

use crate::engine::EngineOps;
use crate::event::Tid;
use crate::hv::dispatch::{Dispatcher, Who};
use crate::hv::doorbell::Wake;
use crate::hv::kcall::{KernelCall, Purpose};
use crate::hv::signals;
use crate::hv::threads::Threads;
use crate::sites::Site;
use crate::thread::Lifecycle;

/// `TASK_INTERRUPTIBLE` (`include/linux/sched.h`; the same value in every
/// kernel since 2.6).
pub const TASK_INTERRUPTIBLE: u64 = 0x1;
/// `TASK_UNINTERRUPTIBLE`.
pub const TASK_UNINTERRUPTIBLE: u64 = 0x2;
/// `TASK_WAKEKILL` (0x100 since 4.14).
const TASK_WAKEKILL: u64 = 0x100;
/// `TASK_NOLOAD` (0x400 since 4.14).
const TASK_NOLOAD: u64 = 0x400;
/// The state a parked thread sleeps in.
const PARKED_STATE: u64 = TASK_UNINTERRUPTIBLE | TASK_WAKEKILL | TASK_NOLOAD;

/// An engine that only holds threads stopped: it wants no events, so no
/// callback can withdraw its STOP; detaching it releases them. `hvtrace
/// stop` attaches one per thread.
pub struct StopHolder;

impl EngineOps for StopHolder {}

impl Dispatcher {
    /// Whether a thread at `site` may sleep there: a place where the
    /// kernel itself sleeps for ptrace (system-call work, exec, clone,
    /// exit, signals) or the return-to-user work. Not the death and reap
    /// sites (the thread is gone, or the trap runs in the reaper) and not
    /// the doorbell (an interrupt handler).
    fn parkable(site: Site) -> bool {
        matches!(
            site,
            Site::SyscallEntry
                | Site::SyscallExit
                | Site::Clone
                | Site::Exec
                | Site::Exit
                | Site::SignalDelivered
                | Site::SignalDequeued
                | Site::Quiesce
                | Site::Step
        )
    }

    /// After a site's handling: parks the thread `who` at the trap `site`
    /// (registers `regs`) if an engine holds it stopped. Returns whether
    /// it was parked (the vCPU then runs the call).
    pub(crate) fn park_if_stopped(
        &self,
        site: Site,
        at: u64,
        who: &Who,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> bool {
        if !Self::parkable(site) || self.kfuncs.is_none() {
            return false;
        }
        let mut threads = self.lock();
        let held = threads.traced.get(&who.tid).is_some_and(|t| {
            t.task == who.current
                && t.utrace.is_stopped()
                && t.utrace.lifecycle() == Lifecycle::Alive
        });
        if !held || self.sigkill_pending(space, who.current) {
            return false;
        }
        let call = KernelCall {
            saved: *regs,
            frame: regs.rsp,
            site: at,
            purpose: Purpose::Park {
                tid: who.tid,
                task: who.current,
            },
        };
        match self.park(&mut threads, call, regs, space) {
            Ok(()) => {
                self.stats
                    .parks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(e) => {
                log::warn!("tracer: cannot stop thread {}: {e}", who.tid);
                false
            }
        }
    }

    /// Records `call`'s thread as parked, sets its sleeping state and
    /// starts the sleep; under the table's lock, so that a release decided
    /// meanwhile finds it parked and rings for it.
    fn park(
        &self,
        threads: &mut Threads,
        call: KernelCall,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> Result<(), IntrospectError> {
        let Purpose::Park { tid, task } = call.purpose else {
            return Err(IntrospectError::Corrupt("not a park".into()));
        };
        let f = self
            .kfuncs
            .ok_or_else(|| IntrospectError::Corrupt("no schedule_timeout".into()))?;
        self.write_task_state(space, task, PARKED_STATE)?;
        if let Err(e) =
            self.call_kernel(regs, space, call, f.schedule_timeout, &[self.park_jiffies])
        {
            // Not parked after all: running, as it was.
            let _ = self.write_task_state(space, task, 0);
            return Err(e);
        }
        threads.parked.insert(tid, task);
        Ok(())
    }

    /// A call of a parked thread returned to its site (its
    /// `schedule_timeout`, or a memory access it made for a client): runs
    /// the next access a client queued, or parks it again if it is still
    /// held and not killed; otherwise restores its registers (the trap
    /// then goes on). Returns whether it runs another call.
    pub(crate) fn on_park_return(
        &self,
        call: KernelCall,
        regs: &mut GuestRegs,
        space: AddressSpace,
    ) -> bool {
        let (tid, task) = match call.purpose {
            Purpose::Park { tid, task } | Purpose::Access { tid, task, .. } => (tid, task),
            Purpose::Wake | Purpose::Plain { .. } => {
                *regs = call.saved;
                return false;
            }
        };
        if let Purpose::Access { buf, len, .. } = call.purpose {
            self.finish_access(tid, buf, len, regs.rax, space);
        }
        let killed = self.sigkill_pending(space, task);
        let mut threads = self.lock();
        let held = !killed
            && threads.traced.get(&tid).is_some_and(|t| {
                t.task == task && t.utrace.is_stopped() && t.utrace.lifecycle() == Lifecycle::Alive
            });
        let saved = call.saved;
        *regs = saved;
        if held {
            while let Some(job) = threads.accesses.get_mut(&tid).and_then(|q| q.pop_front()) {
                match self.start_access(&mut threads, tid, task, &call, job, regs, space) {
                    Ok(()) => return true,
                    Err(()) => *regs = saved,
                }
            }
            let park = KernelCall {
                frame: saved.rsp,
                purpose: Purpose::Park { tid, task },
                ..call
            };
            match self.park(&mut threads, park, regs, space) {
                Ok(()) => return true,
                Err(e) => log::warn!("tracer: cannot keep thread {tid} stopped: {e}"),
            }
            *regs = saved;
        }
        threads.parked.remove(&tid);
        *threads.unparked.entry(tid).or_default() += 1;
        for job in threads.accesses.remove(&tid).into_iter().flatten() {
            let _ = job.reply.send(Err(crate::UtraceError::NotStopped));
        }
        if killed {
            // SIGKILL breaks every STOP, as in utrace.
            if let Some(t) = threads.traced.get(&tid) {
                t.utrace.kill();
            }
        }
        false
    }

    /// Queues the wake of `tid` if it is parked and no engine holds it any
    /// more. Returns whether the doorbell should ring.
    pub(crate) fn release_if_free(&self, threads: &mut Threads, tid: Tid) -> bool {
        let Some(&task) = threads.parked.get(&tid) else {
            return false;
        };
        let held = threads
            .traced
            .get(&tid)
            .is_some_and(|t| t.task == task && t.utrace.is_stopped());
        if held {
            return false;
        }
        threads.wakes.push_back(Wake {
            tid,
            task,
            state: TASK_UNINTERRUPTIBLE,
        });
        true
    }

    /// Wakes every parked thread (the tracer is going away).
    pub(crate) fn release_all(&self) {
        let ring = {
            let mut threads = self.lock();
            let parked: Vec<(Tid, u64)> = threads.parked.iter().map(|(a, b)| (*a, *b)).collect();
            for (tid, task) in &parked {
                threads.wakes.push_back(Wake {
                    tid: *tid,
                    task: *task,
                    state: TASK_UNINTERRUPTIBLE,
                });
            }
            !parked.is_empty()
        };
        if ring {
            self.ring_doorbell();
        }
    }

    /// Waits up to `limit` until no thread is parked and no call is in
    /// flight; returns the trap addresses of calls still in flight.
    pub(crate) fn wait_drained(&self, limit: Duration) -> Vec<u64> {
        let deadline = Instant::now() + limit;
        let mut rung = Instant::now();
        loop {
            let parked = !self.lock().parked.is_empty();
            let sites = self.calls_in_flight();
            if !parked && sites.is_empty() {
                return Vec::new();
            }
            if Instant::now() >= deadline {
                return sites;
            }
            if parked && rung.elapsed() > Duration::from_millis(200) {
                self.release_all();
                rung = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The threads parked now.
    pub(crate) fn parked(&self) -> Vec<Tid> {
        let mut v: Vec<Tid> = self.lock().parked.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Writes `task`'s scheduler state word.
    fn write_task_state(
        &self,
        space: AddressSpace,
        task: u64,
        state: u64,
    ) -> Result<(), IntrospectError> {
        let field = self.layout.tasks.task.state;
        let n = usize::try_from(field.size()).unwrap_or(8).min(8);
        self.write_kernel(
            space,
            task.wrapping_add(field.offset()),
            &state.to_le_bytes()[..n],
        )
    }

    /// Whether `task` has SIGKILL pending (the kernel's
    /// `__fatal_signal_pending`); an unreadable task counts as killed, so
    /// that it is never parked.
    pub(crate) fn sigkill_pending(&self, space: AddressSpace, task: u64) -> bool {
        signals::sigkill_pending(&self.kernel(space), &self.layout, task).unwrap_or(true)
    }
}
