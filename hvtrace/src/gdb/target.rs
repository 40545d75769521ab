//! The debugged process as gdbstub sees it: threads, registers, memory,
//! software breakpoints and resumption, each served by the VM's control
//! socket (`stop`, `regs`, `mem`, `step`, `cont`) while the `debug` op's
//! engine reports the process's stops.
//!
//! All-stop: when one thread stops (a signal, a breakpoint), every thread
//! of the process is held (`stop` with `interrupt`) before gdb hears of
//! it. A single step moves one thread while the others stay held (gdb's
//! `scheduler-locking step`).

use std::collections::{BTreeMap, HashMap, VecDeque};

use anyhow::{anyhow, Context, Result};
use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use serde_json::{json, Value};

use super::arch::{self, Amd64Linux, Amd64LinuxRegs};
use super::remote::Remote;
use super::signals;
use crate::api::Op;
use crate::guestfiles::GuestFiles;

/// A stop gdb is told about.
pub type StopReason = MultiThreadStopReason<u64>;

/// The `int3` byte a software breakpoint writes.
const INT3: u8 = 0xcc;
/// Linux's SIGTRAP.
const SIGTRAP: i32 = 5;
/// Linux's SIGKILL.
const SIGKILL: i32 = 9;

/// What gdb asked one thread to do at the next resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue(Option<i32>),
    Step,
}

/// The process being debugged.
pub struct Inferior {
    pub(super) remote: Remote,
    /// Its pid.
    pub pid: i32,
    /// Its threads, as the last hold found them.
    threads: Vec<i32>,
    regs: HashMap<i32, Amd64LinuxRegs>,
    /// The breakpoints gdb has inserted: address to the byte an `int3`
    /// there replaces.
    breakpoints: BTreeMap<u64, u8>,
    /// The `int3`s in the process's memory now, with the bytes they
    /// replaced. gdb removes every breakpoint at each stop and inserts
    /// them again at each resume; memory follows `breakpoints` only when
    /// the process is about to run, so a `stepi` costs no writes.
    planted: BTreeMap<u64, u8>,
    actions: HashMap<i32, Action>,
    /// Only the threads in `actions` resume (gdb's scheduler locking);
    /// otherwise every other thread continues.
    locked: bool,
    /// Stops that happened while another was being reported, reported at
    /// the next resume instead of running.
    pending: VecDeque<Value>,
    /// Each thread's last signal stop (its `debug` event).
    signal_stops: HashMap<i32, Value>,
    /// A stop decided while resuming (a single step), for the event loop.
    pub(super) stop_now: Option<StopReason>,
    /// The executable's path in the guest.
    pub(super) exe: Option<String>,
    /// The auxiliary vector the kernel gave the program (`qXfer:auxv`).
    pub(super) auxv: Vec<u8>,
    /// The guest image's files, for gdb's `vFile:` requests.
    pub(super) files: GuestFiles,
    /// Files gdb opened, by descriptor.
    pub(super) open_files: HashMap<u32, String>,
    /// Whether the process has ended.
    pub exited: bool,
}

/// gdb's thread id for a guest thread id.
pub fn gdb_tid(tid: i32) -> Tid {
    Tid::new(tid.max(1) as usize).expect("at least 1")
}

fn guest_tid(tid: Tid) -> i32 {
    tid.get() as i32
}

/// A control-socket failure as gdbstub's non-fatal error.
fn failed<T>(what: &str, e: anyhow::Error) -> TargetResult<T, Inferior> {
    // gdb probes unmapped memory as a matter of course: not worth a warning.
    log::debug!("gdbserver: {what}: {e:#}");
    Err(TargetError::Errno(14)) // EFAULT, as gdbserver answers a failed access
}

impl Inferior {
    /// The process `pid` of the VM behind `remote`, with a `debug` engine
    /// already attached to it; `files` serves gdb's file reads.
    pub fn new(remote: Remote, pid: i32, files: GuestFiles) -> Self {
        Self {
            remote,
            pid,
            threads: vec![pid],
            regs: HashMap::new(),
            breakpoints: BTreeMap::new(),
            planted: BTreeMap::new(),
            actions: HashMap::new(),
            locked: false,
            pending: VecDeque::new(),
            stop_now: None,
            signal_stops: HashMap::new(),
            exe: None,
            auxv: Vec::new(),
            files,
            open_files: HashMap::new(),
            exited: false,
        }
    }

    /// Holds every thread of the process (all-stop); `interrupt` wakes
    /// threads asleep in interruptible calls so they stop at once.
    pub fn hold_all(&mut self, interrupt: bool) -> Result<()> {
        let reply = self.remote.call(Op::Stop {
            pid: Some(self.pid),
            tid: None,
            wait_ms: Some(3000),
            until_close: true,
            interrupt,
        })?;
        let mut tids: Vec<i32> = reply["tids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_i64())
                    .map(|t| t as i32)
                    .collect()
            })
            .unwrap_or_default();
        tids.sort_unstable();
        if !tids.is_empty() {
            self.threads = tids;
        }
        self.regs.clear();
        Ok(())
    }

    /// Reads the executable's path and auxiliary vector (the `inspect` op).
    pub fn learn_exe(&mut self) {
        match self.remote.call(Op::Inspect {
            pid: self.pid,
            kernel: None,
            system_map: None,
        }) {
            Ok(v) => {
                self.exe = v["exe"].as_str().map(str::to_owned);
                self.auxv = v["auxv"]
                    .as_str()
                    .and_then(|h| crate::api::handler::parse_hex(h).ok())
                    .unwrap_or_default();
            }
            Err(e) => log::info!("gdbserver: the executable's path is unknown: {e:#}"),
        }
    }

    fn thread_regs(&mut self, tid: i32) -> Result<Amd64LinuxRegs> {
        if let Some(r) = self.regs.get(&tid) {
            return Ok(r.clone());
        }
        let reply = self.remote.call(Op::Regs { tid, set: None })?;
        let regs = arch::from_reply(&reply)
            .ok_or_else(|| anyhow!("thread {tid}: a register is missing from the reply"))?;
        self.regs.insert(tid, regs.clone());
        Ok(regs)
    }

    fn set_regs(&mut self, tid: i32, set: BTreeMap<String, Value>) -> Result<()> {
        self.regs.remove(&tid);
        self.remote.call(Op::Regs {
            tid,
            set: Some(set),
        })?;
        Ok(())
    }

    fn read_memory(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let reply = self.remote.call(Op::Mem {
            pid: self.pid,
            addr: json!(format!("{addr:#x}")),
            len: Some(len),
            write: None,
        })?;
        let data = crate::api::handler::parse_hex(reply["data"].as_str().unwrap_or(""))
            .map_err(|e| anyhow!(e))?;
        Ok(data)
    }

    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.remote.call(Op::Mem {
            pid: self.pid,
            addr: json!(format!("{addr:#x}")),
            len: None,
            write: Some(hex),
        })?;
        Ok(())
    }

    /// Takes every breakpoint out of the process's memory (at detach, or
    /// when gdb went away).
    pub fn remove_all_breakpoints(&mut self) {
        self.breakpoints.clear();
        self.sync_breakpoints();
    }

    /// Makes the process's memory hold an `int3` at each of gdb's
    /// breakpoints and nowhere else (written as ptrace writes: a page is
    /// copied for this process). A breakpoint that cannot be written is
    /// dropped, with a message.
    fn sync_breakpoints(&mut self) {
        let stale: Vec<(u64, u8)> = self
            .planted
            .iter()
            .filter(|(a, _)| !self.breakpoints.contains_key(a))
            .map(|(a, o)| (*a, *o))
            .collect();
        for (addr, orig) in stale {
            if let Err(e) = self.write_memory(addr, &[orig]) {
                eprintln!("hvtrace gdbserver: cannot restore the byte at {addr:#x}: {e:#}");
            }
            self.planted.remove(&addr);
        }
        let new: Vec<(u64, u8)> = self
            .breakpoints
            .iter()
            .filter(|(a, _)| !self.planted.contains_key(a))
            .map(|(a, o)| (*a, *o))
            .collect();
        for (addr, orig) in new {
            match self.write_memory(addr, &[INT3]) {
                Ok(()) => {
                    self.planted.insert(addr, orig);
                }
                Err(e) => {
                    eprintln!("hvtrace gdbserver: cannot set a breakpoint at {addr:#x}: {e:#}");
                    self.breakpoints.remove(&addr);
                }
            }
        }
    }

    /// Releases every thread of the process.
    pub fn release_all(&mut self) -> Result<()> {
        self.regs.clear();
        match self.remote.call(Op::Cont {
            pid: Some(self.pid),
            tid: None,
            signal: None,
        }) {
            Ok(_) => Ok(()),
            // Nothing held (every thread was released one by one).
            Err(e) if e.to_string().contains("is held stopped") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Kills the process (SIGKILL to a held thread as it goes on).
    pub fn kill(&mut self) -> Result<()> {
        let tid = self.threads.first().copied().unwrap_or(self.pid);
        self.remote.call(Op::Cont {
            pid: None,
            tid: Some(tid),
            signal: Some(SIGKILL),
        })?;
        self.release_all()
    }

    /// A `debug` event as gdb's stop reason, holding the whole process
    /// for a stop; None for an event that stops nothing.
    pub fn on_event(&mut self, event: Value) -> Result<Option<StopReason>> {
        log::debug!("gdbserver: event {event}");
        match event["debug"].as_str() {
            Some("signal") => {
                self.hold_all(true)?;
                let reason = self.signal_stop(&event)?;
                self.cancel_other_stops()?;
                Ok(reason)
            }
            Some("exit") => {
                self.exited = true;
                let status = event["status"].as_i64().unwrap_or(0) as i32;
                Ok(Some(if status & 0x7f == 0 {
                    MultiThreadStopReason::Exited(((status >> 8) & 0xff) as u8)
                } else {
                    MultiThreadStopReason::Terminated(signals::to_gdb(status & 0x7f))
                }))
            }
            _ => Ok(None),
        }
    }

    /// The stop of a signal event's thread (the process held): a
    /// breakpoint of ours (the thread's pc moved back onto it), or the
    /// signal.
    fn signal_stop(&mut self, event: &Value) -> Result<Option<StopReason>> {
        let tid = event["tid"].as_i64().context("signal event without tid")? as i32;
        let signo = event["signal"].as_i64().unwrap_or(0) as i32;
        self.signal_stops.insert(tid, event.clone());
        if signo == SIGTRAP && self.back_up_over_breakpoint(tid)? {
            return Ok(Some(MultiThreadStopReason::SwBreak(gdb_tid(tid))));
        }
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: gdb_tid(tid),
            signal: signals::to_gdb(signo),
        }))
    }

    /// If thread `tid` has just run one of our `int3`s, moves its pc back
    /// onto the breakpoint's address (the instruction there is still to
    /// run); whether it had.
    fn back_up_over_breakpoint(&mut self, tid: i32) -> Result<bool> {
        let rip = self.thread_regs(tid)?.core.rip;
        let at = rip.wrapping_sub(1);
        if !self.planted.contains_key(&at) {
            return Ok(false);
        }
        self.set_regs(
            tid,
            BTreeMap::from([("ip".to_string(), json!(format!("{at:#x}")))]),
        )?;
        Ok(true)
    }

    /// Other threads' stops that raced the one reported: a breakpoint hit
    /// is undone (the thread runs into it again after the resume, as
    /// gdbserver cancels such hits); any other signal waits its turn.
    fn cancel_other_stops(&mut self) -> Result<()> {
        // Give reports already on their way a moment to arrive.
        std::thread::sleep(std::time::Duration::from_millis(20));
        while let Ok(e) = self.remote.events.try_recv() {
            if e["debug"] == "signal" && e["signal"] == SIGTRAP {
                let tid = e["tid"].as_i64().unwrap_or(0) as i32;
                if self.back_up_over_breakpoint(tid)? {
                    continue;
                }
            }
            if matches!(e["debug"].as_str(), Some("signal") | Some("exit")) {
                self.pending.push_back(e);
            }
        }
        Ok(())
    }

    /// Resumes as gdb asked: a stop already pending is reported without
    /// running; a step moves its thread one instruction; otherwise the
    /// threads continue, those with a signal taking it.
    fn do_resume(&mut self) -> Result<()> {
        let mut actions = std::mem::take(&mut self.actions);
        let locked = std::mem::take(&mut self.locked);
        self.regs.clear();
        self.sync_breakpoints();
        // A thread gdb does not know from us (a hostile or stale packet) is
        // not resumed; asked only for such, the process stays stopped and
        // gdb hears of a stop at once.
        actions.retain(|tid, _| self.threads.contains(tid));
        if actions.is_empty() && locked {
            self.stop_now = Some(self.stopped_here());
            return Ok(());
        }
        if let Some(e) = self.pending.pop_front() {
            let reason = match e["debug"].as_str() {
                Some("signal") => self.signal_stop(&e)?,
                _ => self.on_event(e)?,
            };
            self.stop_now = reason;
            return Ok(());
        }
        if let Some((&tid, _)) = actions.iter().find(|(_, a)| **a == Action::Step) {
            return self.step(tid);
        }
        for (&tid, a) in &actions {
            let signal = match a {
                Action::Continue(s) => *s,
                Action::Step => None,
            };
            if let Some(sig) = signal {
                self.interrupt_call_for_handler(tid, sig)?;
            }
            if signal.is_some() || locked {
                self.remote.call(Op::Cont {
                    pid: None,
                    tid: Some(tid),
                    signal,
                })?;
            }
        }
        self.signal_stops.clear();
        if locked {
            return Ok(());
        }
        self.release_all()
    }

    /// Before thread `tid` is given back signal `sig`, the signal it
    /// stopped with: if that signal interrupted a system call that a
    /// handler's signal makes fail with EINTR (ERESTARTNOHAND,
    /// ERESTART_RESTARTBLOCK), the call is made to return -EINTR, as the
    /// kernel would have done had the signal been delivered at once (the
    /// stop withheld it, and the kernel then set the call up to restart).
    fn interrupt_call_for_handler(&mut self, tid: i32, sig: i32) -> Result<()> {
        const ERESTARTNOHAND: i64 = -514;
        const ERESTART_RESTARTBLOCK: i64 = -516;
        const EINTR: i64 = -4;
        let Some(stop) = self.signal_stops.remove(&tid) else {
            return Ok(());
        };
        let ret = stop["syscall"]["ret"].as_i64();
        if stop["signal"] != sig
            || stop["handler"] != true
            || !matches!(ret, Some(ERESTARTNOHAND | ERESTART_RESTARTBLOCK))
        {
            return Ok(());
        }
        let ip = self.thread_regs(tid)?.core.rip;
        // The kernel moved the pc back onto the `syscall` to restart it.
        if self.read_memory(ip, 2)? != [0x0f, 0x05] {
            return Ok(());
        }
        let hex = |v: u64| json!(format!("{v:#x}"));
        self.set_regs(
            tid,
            BTreeMap::from([
                ("ax".to_string(), hex(EINTR as u64)),
                ("ip".to_string(), hex(ip + 2)),
            ]),
        )
    }

    /// A stop report for a process that did not run.
    fn stopped_here(&self) -> StopReason {
        MultiThreadStopReason::SignalWithThread {
            tid: gdb_tid(self.threads.first().copied().unwrap_or(self.pid)),
            signal: Signal::SIGTRAP,
        }
    }

    fn step(&mut self, tid: i32) -> Result<()> {
        match self.remote.call(Op::Step {
            tid,
            count: Some(1),
            blocks: false,
        }) {
            Ok(_) => {
                self.stop_now = Some(MultiThreadStopReason::DoneStep);
                Ok(())
            }
            Err(e) => {
                // The step ended the thread (exit_group): its exit event
                // says how.
                if let Ok(ev) = self
                    .remote
                    .events
                    .recv_timeout(std::time::Duration::from_secs(2))
                {
                    if let Some(r) = self.on_event(ev)? {
                        self.stop_now = Some(r);
                        return Ok(());
                    }
                }
                Err(e)
            }
        }
    }
}

impl Target for Inferior {
    type Arch = Amd64Linux;
    type Error = String;

    fn base_ops(&mut self) -> gdbstub::target::ext::base::BaseOps<'_, Self::Arch, Self::Error> {
        gdbstub::target::ext::base::BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_exec_file(
        &mut self,
    ) -> Option<gdbstub::target::ext::exec_file::ExecFileOps<'_, Self>> {
        Some(self)
    }

    fn support_auxv(&mut self) -> Option<gdbstub::target::ext::auxv::AuxvOps<'_, Self>> {
        Some(self)
    }

    fn support_host_io(&mut self) -> Option<gdbstub::target::ext::host_io::HostIoOps<'_, Self>> {
        Some(self)
    }

    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl MultiThreadBase for Inferior {
    fn read_registers(&mut self, regs: &mut Amd64LinuxRegs, tid: Tid) -> TargetResult<(), Self> {
        match self.thread_regs(guest_tid(tid)) {
            Ok(r) => {
                *regs = r;
                Ok(())
            }
            Err(e) => failed("reading registers", e),
        }
    }

    fn write_registers(&mut self, regs: &Amd64LinuxRegs, tid: Tid) -> TargetResult<(), Self> {
        let tid = guest_tid(tid);
        let old = match self.thread_regs(tid) {
            Ok(r) => r,
            Err(e) => return failed("reading registers", e),
        };
        if regs.core.st != old.core.st
            || regs.core.fpu != old.core.fpu
            || regs.core.xmm != old.core.xmm
            || regs.core.mxcsr != old.core.mxcsr
        {
            log::warn!("gdbserver: x87/SSE registers are read-only here");
            return Err(TargetError::Errno(1)); // EPERM
        }
        let mut set = BTreeMap::new();
        let hex = |v: u64| json!(format!("{v:#x}"));
        for (i, name) in arch::GPR_NAMES.iter().enumerate() {
            if regs.core.regs[i] != old.core.regs[i] {
                set.insert(name.to_string(), hex(regs.core.regs[i]));
            }
        }
        if regs.core.rip != old.core.rip {
            set.insert("ip".into(), hex(regs.core.rip));
        }
        if regs.core.eflags != old.core.eflags {
            set.insert("flags".into(), hex(regs.core.eflags as u64));
        }
        if regs.orig_rax != old.orig_rax {
            set.insert("orig_ax".into(), hex(regs.orig_rax));
        }
        if regs.fs_base != old.fs_base {
            set.insert("fs_base".into(), hex(regs.fs_base));
        }
        if regs.gs_base != old.gs_base {
            set.insert("gs_base".into(), hex(regs.gs_base));
        }
        if set.is_empty() {
            return Ok(());
        }
        match self.set_regs(tid, set) {
            Ok(()) => Ok(()),
            Err(e) => failed("writing registers", e),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], _tid: Tid) -> TargetResult<usize, Self> {
        if data.is_empty() {
            return Ok(0);
        }
        match self.read_memory(start, data.len()) {
            Ok(bytes) => {
                let n = bytes.len().min(data.len());
                data[..n].copy_from_slice(&bytes[..n]);
                // gdb sees the program's bytes, not our int3s.
                let end = start.saturating_add(n as u64);
                for (&addr, &orig) in self.planted.range(start..end) {
                    data[(addr - start) as usize] = orig;
                }
                Ok(n)
            }
            Err(e) => failed("reading memory", e),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], _tid: Tid) -> TargetResult<(), Self> {
        if data.is_empty() {
            return Ok(());
        }
        match self.write_memory(start, data) {
            Ok(()) => Ok(()),
            Err(e) => failed("writing memory", e),
        }
    }

    fn list_active_threads(&mut self, register: &mut dyn FnMut(Tid)) -> Result<(), String> {
        for &t in &self.threads {
            register(gdb_tid(t));
        }
        Ok(())
    }

    fn is_thread_alive(&mut self, tid: Tid) -> Result<bool, String> {
        Ok(self.threads.contains(&guest_tid(tid)))
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for Inferior {
    fn resume(&mut self) -> Result<(), String> {
        // gdbstub ends the session on a resume error: a failure here is
        // reported as a stop instead, and said on stderr.
        if let Err(e) = self.do_resume() {
            eprintln!("hvtrace gdbserver: resuming failed: {e:#}");
            let _ = self.hold_all(true);
            self.stop_now = Some(self.stopped_here());
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), String> {
        self.actions.clear();
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), String> {
        let sig = match signal {
            None => None,
            Some(s) => Some(
                signals::from_gdb(s)
                    .ok_or_else(|| format!("gdb signal {} has no Linux number", s.0))?,
            ),
        };
        self.actions.insert(guest_tid(tid), Action::Continue(sig));
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for Inferior {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), String> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for Inferior {
    fn set_resume_action_step(&mut self, tid: Tid, signal: Option<Signal>) -> Result<(), String> {
        if signal.is_some() {
            return Err("stepping with a signal is not supported".into());
        }
        self.actions.insert(guest_tid(tid), Action::Step);
        Ok(())
    }
}

impl Breakpoints for Inferior {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Inferior {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        let orig = match self.planted.get(&addr) {
            Some(&orig) => orig,
            None => match self.read_memory(addr, 1) {
                Ok(b) if b.len() == 1 => b[0],
                Ok(_) => return Ok(false),
                Err(e) => return failed("reading a breakpoint's byte", e),
            },
        };
        // Written when the process next runs (sync_breakpoints).
        self.breakpoints.insert(addr, orig);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.breakpoints.remove(&addr).is_some())
    }
}
