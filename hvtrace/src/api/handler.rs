//! Answering control-socket requests against a running [`Session`]; shared
//! by `hvtrace boot` and `hvtrace run --api-sock`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use crossbeam_channel::Sender;
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::VcpuView;
use guest_introspect::pt_regs::Reg;
use serde_json::{json, Value};
use utrace::engine::EngineData;
use utrace::hv::{EngineSpec, Target, Tracer};
use utrace::strace::{RecordObserver, Strace, StraceOptions, STRACE_EVENTS};
use utrace::UtraceError;
use vmm::session::Session;
use vmm::vstate::memory::GuestRam;

use super::debugger::{Debugger, DEBUGGER_EVENTS};
use super::server::Conn;
use super::{Op, PROTOCOL_VERSION};
use crate::introspect::{self, InfoPreload, KernelSource};
use crate::stacks::CpuState;

/// State kept between requests.
pub struct Handler {
    default_source: KernelSource,
    /// Kernel information loaded so far, per source (loading a Debian
    /// kernel's takes a second; a VM's kernel does not change).
    infos: HashMap<KernelSource, Arc<KernelInfo>>,
    /// The default kernel file's information, loading since the handler
    /// was made: the first `ps` then does not wait for it.
    preload: Option<InfoPreload>,
    /// The tracer, while any client has engines attached.
    tracer: Option<Tracer>,
    /// Each attached connection's engine data (engines are found by it).
    attached: HashMap<u64, EngineData>,
    /// Threads held stopped by `stop`, by thread id.
    held: HashMap<i32, Hold>,
    /// Where every attached engine also hands its records (`--sink`).
    observer: Option<Arc<dyn RecordObserver>>,
    /// The debugger engines (`debug`), by connection (each also in
    /// `attached`).
    debuggers: HashMap<u64, (EngineData, Arc<Debugger>)>,
}

/// One thread held stopped by a `stop` request.
struct Hold {
    /// Its process.
    pid: i32,
    /// The holder engine's data.
    data: EngineData,
    /// The connection whose close ends it (`until_close`), if any.
    conn: Option<u64>,
}

/// An engine that waits for one INTERRUPT report and detaches.
struct Interrupter {
    reports: crossbeam_channel::Sender<(i32, std::time::Instant)>,
    /// A signal to send the thread at its report.
    signal: Option<i32>,
}

impl utrace::engine::EngineOps for Interrupter {
    fn report_signal(
        &self,
        _action: utrace::ResumeAction,
        engine: &utrace::engine::Engine,
        thread: &utrace::context::ThreadContext,
        signo: i32,
    ) -> utrace::ResumeAction {
        if signo != 0 {
            return utrace::ResumeAction::Resume;
        }
        if let Some(sig) = self.signal {
            if let Err(e) = thread.send_signal(sig) {
                log::warn!(
                    "api: cannot send signal {sig} to thread {}: {e}",
                    engine.tid()
                );
                return utrace::ResumeAction::Detach;
            }
        }
        let _ = self.reports.send((engine.tid(), std::time::Instant::now()));
        utrace::ResumeAction::Detach
    }
}

/// A `pid` or `tid` from a request.
fn target(pid: Option<i32>, tid: Option<i32>) -> Result<Target, String> {
    match (pid, tid) {
        (Some(p), None) if p > 0 => Ok(Target::Process(p)),
        (None, Some(t)) if t > 0 => Ok(Target::Thread(t)),
        (Some(_), Some(_)) => Err("give pid or tid, not both".into()),
        (None, None) => Err("give pid (a process) or tid (one thread)".into()),
        _ => Err("pid and tid are positive".into()),
    }
}

/// The fields of an attach request.
struct AttachRequest {
    pid: i32,
    follow: bool,
    trace: Option<Vec<String>>,
    signal: Option<String>,
    decode_fds: bool,
    status: Option<String>,
    string_limit: Option<usize>,
    entries: bool,
    steps: Option<String>,
    intel: bool,
}

/// The `step` op's engine: steps its thread until `left` step reports
/// have come, sending each one's next instruction, then votes STOP.
struct StepCounter {
    left: std::sync::atomic::AtomicU64,
    mode: utrace::ResumeAction,
    reports: Sender<u64>,
}

impl utrace::EngineOps for StepCounter {
    fn report_quiesce(
        &self,
        _action: utrace::ResumeAction,
        _engine: &utrace::Engine,
        thread: &utrace::context::ThreadContext,
        _event: utrace::EventMask,
    ) -> utrace::ResumeAction {
        use std::sync::atomic::Ordering;
        let Some(step) = thread.step else {
            return self.mode;
        };
        let _ = self.reports.send(step.ip);
        let before = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .unwrap_or(0);
        if before <= 1 {
            utrace::ResumeAction::Stop
        } else {
            self.mode
        }
    }
}

/// An engine's output: whole lines, wrapped for the protocol and queued
/// for the client's connection. A client that stops reading loses events
/// rather than stalling the guest; the connection's writer thread tells it
/// how many (`{"event":"lost","count":N}`, see [`Conn::lost`]) and they
/// count in `--report`'s `events_lost`.
struct ConnSink {
    buf: Vec<u8>,
    events: Sender<String>,
    lost: Arc<std::sync::atomic::AtomicU64>,
}

impl ConnSink {
    fn new(conn: &Conn) -> Self {
        Self {
            buf: Vec::new(),
            events: conn.events.clone(),
            lost: conn.lost.clone(),
        }
    }

    /// Queues one event, or counts it lost.
    fn offer(&mut self, event: Value) {
        let wrapped = json!({"v": PROTOCOL_VERSION, "event": event});
        if self.events.try_send(wrapped.to_string()).is_err() {
            use std::sync::atomic::Ordering::Relaxed;
            self.lost.fetch_add(1, Relaxed);
            super::EVENTS_LOST.fetch_add(1, Relaxed);
        }
    }
}

impl Write for ConnSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let event: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            self.offer(event);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Handler {
    /// A handler whose `ps`/`inspect` use `default_source` unless a request
    /// names a kernel file.
    pub fn new(default_source: KernelSource) -> Self {
        Self {
            preload: InfoPreload::start(&default_source),
            default_source,
            infos: HashMap::new(),
            tracer: None,
            attached: HashMap::new(),
            held: HashMap::new(),
            observer: None,
            debuggers: HashMap::new(),
        }
    }

    /// Every engine attached from now on also hands its records to
    /// `observer` (the VM's event sink).
    pub fn observe_with(&mut self, observer: Arc<dyn RecordObserver>) {
        self.observer = Some(observer);
    }

    /// The tracer, installed now if it was not.
    fn tracer(&mut self, session: &Session) -> Result<Tracer, String> {
        if self.tracer.is_none() {
            let source = self.default_source.clone();
            let info = self.info(session, &source)?;
            let tracer = Tracer::install(session.vm(), info)
                .map_err(|e| format!("installing the tracer: {e}"))?;
            self.tracer = Some(tracer);
        }
        Ok(self.tracer.clone().expect("installed above"))
    }

    fn stop(
        &mut self,
        session: &Session,
        conn: &Conn,
        target: Target,
        wait: std::time::Duration,
        until_close: bool,
        interrupt: bool,
    ) -> Result<Value, String> {
        let tracer = self.tracer(session)?;
        let data: EngineData = Arc::new("hvtrace stop");
        let asked = std::time::Instant::now();
        let result = tracer.hold_stopped(session.vm(), target, &data, wait, interrupt);
        let ms = asked.elapsed().as_secs_f64() * 1e3;
        let (pairs, stopped) = match result {
            Ok(h) => (h.threads, h.stopped),
            Err(e) => {
                self.remove_idle_tracer(session);
                return Err(e.to_string());
            }
        };
        for &(tid, pid) in &pairs {
            if let Some(old) = self.held.insert(
                tid,
                Hold {
                    pid,
                    data: data.clone(),
                    conn: until_close.then_some(conn.id),
                },
            ) {
                // Held twice: the newer request's holder stays.
                tracer.release_thread(tid, &old.data);
            }
        }
        let tids: Vec<i32> = pairs.iter().map(|p| p.0).collect();
        // The stop takes over any hold a debugger's report left.
        self.lift_debugger_stops(session, &tids);
        let pending: Vec<i32> = tids
            .iter()
            .copied()
            .filter(|t| !stopped.contains(t))
            .collect();
        Ok(json!({ "tids": tids, "stopped": stopped, "pending": pending, "ms": ms }))
    }

    fn cont(&mut self, session: &Session, target: Target) -> Result<Value, String> {
        let tids: Vec<i32> = self
            .held
            .iter()
            .filter(|(tid, h)| match target {
                Target::Process(pid) => h.pid == pid,
                Target::Thread(t) => **tid == t,
            })
            .map(|(tid, _)| *tid)
            .collect();
        if tids.is_empty() {
            return Err(match target {
                Target::Process(pid) => {
                    format!("no thread of process {pid} is held stopped by hvtrace stop")
                }
                Target::Thread(tid) => format!("thread {tid} is not held stopped by hvtrace stop"),
            });
        }
        let asked = std::time::Instant::now();
        self.release(session, &tids);
        // Until the released threads have left their sleep (a second at
        // most: their backstop).
        let running = loop {
            let stopped = self.stopped_threads();
            if !tids.iter().any(|t| stopped.contains(t)) {
                break true;
            }
            if asked.elapsed() > std::time::Duration::from_secs(3) {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        };
        let ms = asked.elapsed().as_secs_f64() * 1e3;
        let mut released = tids;
        released.sort_unstable();
        Ok(json!({ "released": released, "running": running, "ms": ms }))
    }

    /// `debug`: a [`Debugger`] engine on process `pid`'s threads, or armed
    /// for the next exec of `exec`.
    fn debug(
        &mut self,
        session: &Session,
        conn: &Conn,
        pid: Option<i32>,
        exec: Option<Vec<String>>,
    ) -> Result<Value, String> {
        match (&pid, &exec) {
            (Some(p), None) if *p > 0 => {}
            (None, Some(argv)) if !argv.is_empty() => {}
            _ => {
                return Err(
                    "give pid (a running process) or exec (a non-empty argv), not both".into(),
                )
            }
        }
        if self.attached.contains_key(&conn.id) {
            return Err("this connection is already attached; detach first".into());
        }
        let tracer = self.tracer(session)?;
        let debugger = Arc::new(Debugger::new(pid.unwrap_or(0), conn.events.clone()));
        let data: EngineData = Arc::new(conn.id);
        let spec = EngineSpec {
            ops: debugger.clone(),
            events: DEBUGGER_EVENTS,
            follow: true,
            data: Some(data.clone()),
        };
        let tids = match (pid, exec) {
            (Some(p), _) => tracer.attach_process(session.vm(), p, &spec),
            (None, Some(argv)) => tracer
                .trace_next_exec(session.vm(), argv, spec)
                .map(|()| Vec::new()),
            (None, None) => unreachable!("checked above"),
        };
        match tids {
            Ok(tids) => {
                self.attached.insert(conn.id, data.clone());
                self.debuggers.insert(conn.id, (data, debugger));
                Ok(json!({ "tids": tids }))
            }
            Err(e) => {
                self.remove_idle_tracer(session);
                Err(e.to_string())
            }
        }
    }

    /// Withdraws the STOP a debugger's report left on `tids` (a `stop`
    /// hold has taken it over).
    fn lift_debugger_stops(&self, session: &Session, tids: &[i32]) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        for &tid in tids {
            for e in tracer.engines(tid) {
                let debugger = e.data().is_some_and(|d| {
                    self.debuggers
                        .values()
                        .any(|(data, _)| Arc::ptr_eq(data, d))
                });
                if debugger {
                    let _ = tracer.control(session.vm(), tid, &e, utrace::ResumeAction::Resume);
                }
            }
        }
    }

    /// `cont` of held thread `tid` with `signal`: an INTERRUPT whose
    /// report sends the signal, then the release; the reply waits for the
    /// report. A debugger of the thread lets that signal through.
    fn cont_with_signal(
        &mut self,
        session: &Session,
        tid: i32,
        signal: i32,
    ) -> Result<Value, String> {
        if !(1..=64).contains(&signal) {
            return Err(format!(
                "signal {signal} is not a signal number (1-64) (EINVAL)"
            ));
        }
        if !self.held.contains_key(&tid) {
            return Err(format!("thread {tid} is not held stopped by hvtrace stop"));
        }
        let tracer = self.tracer(session)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let data: EngineData = Arc::new("hvtrace cont signal");
        let spec = EngineSpec {
            ops: Arc::new(Interrupter {
                reports: tx,
                signal: Some(signal),
            }),
            events: utrace::event::EventMask::QUIESCE | utrace::event::EventMask::SIGNAL,
            follow: false,
            data: Some(data.clone()),
        };
        tracer
            .attach_target(session.vm(), Target::Thread(tid), &spec)
            .map_err(|e| e.to_string())?;
        let armed = tracer
            .engine_with_data(tid, &data)
            .ok_or_else(|| format!("thread {tid} is gone"))
            .and_then(|e| {
                tracer
                    .control(session.vm(), tid, &e, utrace::ResumeAction::Interrupt)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = armed {
            tracer.detach_data(&data);
            return Err(e);
        }
        for (_, d) in self.debuggers.values() {
            d.pass_signal(tid, signal);
        }
        let reply = self.cont(session, Target::Thread(tid));
        let signalled = rx.recv_timeout(std::time::Duration::from_secs(3)).is_ok();
        if let Some(t) = &self.tracer {
            t.detach_data(&data);
        }
        self.remove_idle_tracer(session);
        let mut reply = reply?;
        reply["signalled"] = json!(signalled);
        Ok(reply)
    }

    /// Releases the holds of `tids`.
    fn release(&mut self, session: &Session, tids: &[i32]) {
        for tid in tids {
            if let (Some(h), Some(t)) = (self.held.remove(tid), &self.tracer) {
                t.release_thread(*tid, &h.data);
            }
        }
        self.remove_idle_tracer(session);
    }

    /// INTERRUPT of `target`'s threads, sending each `signal` at its
    /// report if given.
    fn interrupt(
        &mut self,
        session: &Session,
        target: Target,
        wait: std::time::Duration,
        signal: Option<i32>,
    ) -> Result<Value, String> {
        if signal.is_some_and(|s| !(1..=64).contains(&s)) {
            return Err(format!(
                "signal {} is not a signal number (1-64) (EINVAL)",
                signal.unwrap_or(0)
            ));
        }
        let tracer = self.tracer(session)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let data: EngineData = Arc::new("hvtrace interrupt");
        let spec = EngineSpec {
            ops: Arc::new(Interrupter {
                reports: tx,
                signal,
            }),
            events: utrace::event::EventMask::QUIESCE | utrace::event::EventMask::SIGNAL,
            follow: false,
            data: Some(data.clone()),
        };
        let tids = match tracer.attach_target(session.vm(), target, &spec) {
            Ok(t) => t,
            Err(e) => {
                self.remove_idle_tracer(session);
                return Err(e.to_string());
            }
        };
        let asked = std::time::Instant::now();
        let mut errors = Vec::new();
        for &tid in &tids {
            let engine = tracer.engine_with_data(tid, &data);
            if let Some(e) = engine {
                if let Err(err) =
                    tracer.control(session.vm(), tid, &e, utrace::ResumeAction::Interrupt)
                {
                    errors.push(err.to_string());
                }
            }
        }
        let deadline = asked + wait;
        let mut reported = Vec::new();
        while reported.len() < tids.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok((tid, at)) => {
                    reported.push(json!([tid, at.duration_since(asked).as_secs_f64() * 1e3]))
                }
                Err(_) => break,
            }
        }
        tracer.detach_data(&data);
        self.remove_idle_tracer(session);
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        Ok(json!({ "tids": tids, "reported": reported }))
    }

    /// Steps thread `tid`, held by `stop`, `count` times and holds it
    /// again: a stepping engine is attached, the hold released, and the
    /// engine votes STOP at the last step's report (the thread parks
    /// there); then the hold is taken again and the engine goes.
    fn step(
        &mut self,
        session: &Session,
        tid: i32,
        count: u64,
        blocks: bool,
    ) -> Result<Value, String> {
        if count == 0 || count > 1_000_000 {
            return Err(format!("count {count}: want 1 to 1000000 steps"));
        }
        let hold_data = match self.held.get(&tid) {
            Some(h) => h.data.clone(),
            None => {
                return Err(format!(
                    "thread {tid} is not held stopped (EBUSY): `hvtrace stop -t {tid}` first"
                ))
            }
        };
        let tracer = self.tracer(session)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let mode = if blocks {
            utrace::ResumeAction::BlockStep
        } else {
            utrace::ResumeAction::SingleStep
        };
        let data: EngineData = Arc::new("hvtrace step");
        let spec = EngineSpec {
            ops: Arc::new(StepCounter {
                left: std::sync::atomic::AtomicU64::new(count),
                mode,
                reports: tx,
            }),
            events: utrace::event::EventMask::QUIESCE,
            follow: false,
            data: Some(data.clone()),
        };
        tracer
            .attach_target(session.vm(), Target::Thread(tid), &spec)
            .map_err(|e| e.to_string())?;
        let engine = tracer.engine_with_data(tid, &data);
        let asked = std::time::Instant::now();
        let started = match engine {
            Some(e) => tracer
                .control(session.vm(), tid, &e, mode)
                .map_err(|e| e.to_string()),
            None => Err(format!("thread {tid} is gone")),
        };
        let mut ips = Vec::new();
        if started.is_ok() {
            tracer.release_thread(tid, &hold_data);
            // Each report is one step; the last parks the thread.
            let deadline = asked
                + std::time::Duration::from_secs(10)
                    .max(std::time::Duration::from_millis(count.saturating_mul(20)));
            while (ips.len() as u64) < count {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(ip) => ips.push(ip),
                    Err(_) => break,
                }
            }
        }
        // Held again by `stop`'s holder, then the stepping engine goes.
        let rehold = tracer.hold_stopped(
            session.vm(),
            Target::Thread(tid),
            &hold_data,
            std::time::Duration::from_secs(3),
            false,
        );
        tracer.detach_data(&data);
        let _ = tracer.release_step_site(session.vm());
        started?;
        let ms = asked.elapsed().as_secs_f64() * 1e3;
        match rehold {
            Ok(h) if h.stopped.contains(&tid) => {}
            _ => {
                self.held.remove(&tid);
                self.remove_idle_tracer(session);
                return Err(format!(
                    "thread {tid} did not stop again after {} of {count} steps (it exited?)",
                    ips.len()
                ));
            }
        }
        let mut reply = self.regs(session, tid, None)?;
        reply["steps"] = json!(ips.len());
        reply["ip"] = json!(format!("{:#x}", ips.last().copied().unwrap_or(0)));
        reply["ms"] = json!(ms);
        Ok(reply)
    }

    fn regs(
        &mut self,
        session: &Session,
        tid: i32,
        set: Option<std::collections::BTreeMap<String, Value>>,
    ) -> Result<Value, String> {
        let tracer = self.tracer.clone().ok_or_else(|| {
            format!("thread {tid} is not stopped (EBUSY): `hvtrace stop -t {tid}` first")
        })?;
        let mut changes = Vec::new();
        let (mut fs_base, mut gs_base) = (None, None);
        for (name, value) in set.unwrap_or_default() {
            let value =
                number(&value).ok_or_else(|| format!("`{value}` is not a number for {name}"))?;
            match name.as_str() {
                "fs_base" => fs_base = Some(value),
                "gs_base" => gs_base = Some(value),
                _ => {
                    let reg = Reg::from_name(&name).ok_or_else(|| {
                        format!(
                            "no register `{name}` (one of: {}, fs_base, gs_base)",
                            Reg::ALL
                                .iter()
                                .map(|r| r.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                    if matches!(reg, Reg::Cs | Reg::Ss) {
                        return Err(format!(
                            "{name} cannot be set (EINVAL: ptrace's rule for segment selectors)"
                        ));
                    }
                    changes.push((reg, value));
                }
            }
        }
        // Segment bases first: the one write that can still be refused
        // (the thread on a CPU), so nothing is half done.
        if fs_base.is_some() || gs_base.is_some() {
            tracer
                .set_segment_bases(session.vm(), tid, fs_base, gs_base)
                .map_err(|e| e.to_string())?;
        }
        let r = if changes.is_empty() {
            tracer.regs(tid)
        } else {
            tracer.set_regs(tid, &changes)
        }
        .map_err(|e| e.to_string())?;
        let mut regs = serde_json::Map::new();
        for reg in Reg::ALL {
            regs.insert(reg.name().into(), json!(format!("{:#x}", r.regs.get(reg))));
        }
        let hex = |v: Option<u64>| v.map(|v| format!("{v:#x}"));
        Ok(json!({
            "tid": tid,
            "regs": regs,
            "fs_base": hex(r.fs_base),
            "gs_base": hex(r.gs_base),
            "fpu": r.fxsave.as_deref().map(fpu_json),
            "fxsave": r.fxsave.as_deref().map(|a| a.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        }))
    }

    fn mem(
        &mut self,
        session: &Session,
        pid: i32,
        addr: &Value,
        len: Option<usize>,
        write: Option<String>,
    ) -> Result<Value, String> {
        let addr = number(addr).ok_or_else(|| format!("`{addr}` is not an address"))?;
        if addr >= utrace::hv::memory::USER_END {
            return Err(format!(
                "{addr:#x} is a kernel address: only user memory is served"
            ));
        }
        let data = match (&write, len) {
            (Some(h), None) => Some(parse_hex(h)?),
            (None, Some(n)) if (1..=1 << 20).contains(&n) => None,
            (None, Some(n)) => return Err(format!("len {n}: from 1 to 1048576 bytes")),
            _ => return Err("give len (to read) or write (hex bytes), not both".into()),
        };
        if data
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > 1 << 20)
        {
            return Err("write 1 to 1048576 bytes".into());
        }
        let tracer = self.tracer(session)?;
        // A thread of the process held by `stop`, or the process held for
        // this access only.
        let stopped = tracer.stopped();
        let held = self
            .held
            .iter()
            .find(|(tid, h)| h.pid == pid && stopped.contains(tid))
            .map(|(tid, _)| *tid);
        let mut temporary = None;
        let tid = match held {
            Some(t) => t,
            None => {
                let data: EngineData = Arc::new("hvtrace mem");
                let h = match tracer.hold_stopped(
                    session.vm(),
                    Target::Process(pid),
                    &data,
                    std::time::Duration::from_secs(2),
                    true,
                ) {
                    Ok(h) => h,
                    Err(e) => {
                        self.remove_idle_tracer(session);
                        return Err(e.to_string());
                    }
                };
                temporary = Some(data);
                match h.stopped.first() {
                    Some(t) => *t,
                    None => {
                        tracer.detach_data(temporary.as_ref().expect("set above"));
                        self.remove_idle_tracer(session);
                        return Err(format!(
                            "no thread of process {pid} stopped within 2 s (all in system calls?): `hvtrace stop -p {pid}` and retry"
                        ));
                    }
                }
            }
        };
        let result = match &data {
            Some(d) => tracer.write_memory(tid, addr, d).map(|()| d.clone()),
            None => tracer.read_memory(tid, addr, len.unwrap_or(0)),
        };
        if let Some(d) = temporary {
            tracer.detach_data(&d);
            self.remove_idle_tracer(session);
        }
        let bytes = result.map_err(|e| e.to_string())?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(
            json!({ "addr": format!("{addr:#x}"), "len": bytes.len(), "data": hex, "written": write.is_some() }),
        )
    }

    /// The threads held stopped now (parked in the guest), for `ps`.
    fn stopped_threads(&self) -> Vec<i32> {
        self.tracer
            .as_ref()
            .map(Tracer::stopped)
            .unwrap_or_default()
    }

    /// Removes the tracer (before the VM stops or is handed on).
    pub fn finish(&mut self, session: &Session) {
        if let Some(t) = self.tracer.take() {
            if let Err(e) = t.remove(session.vm()) {
                eprintln!("hvtrace: removing the tracer: {e}");
            }
        }
        self.attached.clear();
    }

    fn attach(
        &mut self,
        session: &Session,
        conn: &Conn,
        req: AttachRequest,
    ) -> Result<Value, String> {
        let AttachRequest {
            pid,
            follow,
            trace,
            signal,
            decode_fds,
            status,
            string_limit,
            entries,
            steps,
            intel,
        } = req;
        let blocks = match steps.as_deref() {
            None => None,
            Some("single") => Some(false),
            Some("block") => Some(true),
            Some(other) => return Err(format!("steps must be `single` or `block`, not `{other}`")),
        };
        if self.attached.contains_key(&conn.id) {
            return Err("this connection is already attached; detach first".into());
        }
        if let Some(n) = string_limit {
            utrace::syscalls::format::check_string_limit(n)?;
        }
        let calls = trace
            .map(|items| utrace::strace::select::CallSet::parse(&items.join(",")))
            .transpose()?;
        let signals = signal
            .map(|s| utrace::strace::select::SignalSet::parse(&s))
            .transpose()?;
        let status = status
            .map(|s| utrace::strace::select::StatusSet::parse(&s))
            .transpose()?;
        let tracer = self.tracer(session)?;
        let only = calls.map(|c| c.resolve(&tracer.syscalls())).transpose()?;
        let mut engine = Strace::new(
            StraceOptions {
                string_limit,
                only,
                signals,
                status,
                json: true,
                timing: false,
                // The client renders text (and drops exit lines for -qq).
                quiet_exits: false,
                decode_fds,
                entries,
                tamper: Vec::new(),
                stamp: None,
                // A clone's record names the child the connection follows.
                follow,
            },
            tracer.syscalls(),
            Box::new(ConnSink::new(conn)),
        );
        if let Some(o) = &self.observer {
            engine = engine.with_observer(o.clone());
        }
        let engine = Arc::new(engine);
        let data: EngineData = Arc::new(conn.id);
        let spec = EngineSpec {
            ops: engine,
            events: STRACE_EVENTS,
            follow,
            data: Some(data.clone()),
        };
        let tids = match tracer.attach_process(session.vm(), pid, &spec) {
            Ok(tids) => tids,
            Err(e) => {
                self.remove_idle_tracer(session);
                return Err(e.to_string());
            }
        };
        self.attached.insert(conn.id, data.clone());
        if let Some(blocks) = blocks {
            if let Err(e) = self.start_steps(session, conn, pid, &data, blocks, intel, follow) {
                self.detach(session, conn)?;
                return Err(e);
            }
        }
        Ok(json!({ "tids": tids }))
    }

    /// Attaches a steps engine (with `data`) to process `pid` beside the
    /// connection's strace engine and makes each of its threads step.
    #[allow(clippy::too_many_arguments)]
    fn start_steps(
        &mut self,
        session: &Session,
        conn: &Conn,
        pid: i32,
        data: &EngineData,
        blocks: bool,
        intel: bool,
        follow: bool,
    ) -> Result<(), String> {
        let source = self.default_source.clone();
        let exe = self
            .live(session, &source, |mem, vcpus, info| {
                introspect::inspect_json(mem, vcpus, info, pid)
            })
            .ok()
            .and_then(|v| v["exe"].as_str().map(str::to_string));
        let tracer = self.tracer(session)?;
        tracer
            .ensure_step_site(session.vm())
            .map_err(|e| e.to_string())?;
        let opts = utrace::steps::StepsOptions {
            blocks,
            summary: false,
            syntax: if intel {
                utrace::steps::Syntax::Intel
            } else {
                utrace::steps::Syntax::Att
            },
            quiet: false,
            json: true,
        };
        let out: Box<dyn Write + Send> = Box::new(ConnSink::new(conn));
        // The default image's files (a VM booted with its own --initrd
        // gets no symbols here).
        let images = crate::cmd::trace::image_files_of(&[]);
        let symbols = Arc::new(crate::guestfiles::ImageSymbols::open(&images));
        let steps = Arc::new(utrace::steps::Steps::new(
            opts,
            Arc::new(std::sync::Mutex::new(out)),
            symbols,
        ));
        if let Some(exe) = &exe {
            steps.set_program(pid, exe);
        }
        let spec = EngineSpec {
            ops: steps.clone(),
            events: utrace::steps::STEPS_EVENTS,
            follow,
            data: Some(data.clone()),
        };
        let tids = tracer
            .attach_process(session.vm(), pid, &spec)
            .map_err(|e| e.to_string())?;
        let mode = steps.mode();
        for tid in tids {
            // The connection's last engine on the thread: the steps one.
            let engine = tracer
                .engines(tid)
                .into_iter()
                .rfind(|e| e.data().is_some_and(|d| Arc::ptr_eq(d, data)));
            if let Some(engine) = engine {
                match tracer.control(session.vm(), tid, &engine, mode) {
                    // A thread gone meanwhile has nothing to step.
                    Ok(()) | Err(utrace::hv::TracerError::Utrace(_, UtraceError::NoSuchThread)) => {
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Ok(())
    }

    fn detach(&mut self, session: &Session, conn: &Conn) -> Result<Value, String> {
        self.debuggers.remove(&conn.id);
        let engines = match (self.attached.remove(&conn.id), &self.tracer) {
            (Some(data), Some(t)) => {
                let n = t.detach_data(&data);
                // No trap left on the #DB path once nobody steps (a
                // thread still carrying a TF keeps it until it traps once
                // more; the tracer's removal takes it anyway).
                let _ = t.release_step_site(session.vm());
                n
            }
            _ => 0,
        };
        self.remove_idle_tracer(session);
        Ok(json!({ "engines": engines }))
    }

    /// The connection closed: its engines detach and its stops end.
    fn disconnected(&mut self, session: &Session, conn: &Conn) -> Result<Value, String> {
        let mine: Vec<i32> = self
            .held
            .iter()
            .filter(|(_, h)| h.conn == Some(conn.id))
            .map(|(tid, _)| *tid)
            .collect();
        self.release(session, &mine);
        self.detach(session, conn)
    }

    /// Takes the tracer's traps out once nobody uses them.
    fn remove_idle_tracer(&mut self, session: &Session) {
        if self.attached.is_empty()
            && self.held.is_empty()
            && self.tracer.as_ref().is_some_and(Tracer::is_idle)
        {
            if let Some(t) = self.tracer.take() {
                if let Err(e) = t.remove(session.vm()) {
                    eprintln!("hvtrace: removing the tracer: {e}");
                }
            }
        }
    }

    /// Kernel information from `source` (loaded once).
    fn info(
        &mut self,
        session: &Session,
        source: &KernelSource,
    ) -> Result<Arc<KernelInfo>, String> {
        self.adopt_preload();
        if let Some(i) = self.infos.get(source) {
            return Ok(i.clone());
        }
        self.live(session, source, |_, _, _| Ok(Value::Null))?;
        self.infos
            .get(source)
            .cloned()
            .ok_or_else(|| "kernel information unavailable".to_string())
    }

    /// Keeps the preloaded kernel information (waiting for it if it is
    /// still loading). A failed load is forgotten: the request that needs
    /// it loads again and reports the error.
    fn adopt_preload(&mut self) {
        if let Some(loading) = self.preload.take() {
            let source = loading.source().clone();
            match loading.wait() {
                Ok(info) => {
                    self.infos.insert(source, Arc::new(info));
                }
                Err(e) => log::debug!("preloading the kernel information: {e:#}"),
            }
        }
    }

    fn text_hash(&mut self, session: &Session) -> Result<Value, String> {
        let traps = session.vm().traps().len();
        let source = self.default_source.clone();
        self.live(session, &source, introspect::text_hash_json)
            .map(|mut v| {
                v["traps"] = json!(traps);
                v
            })
    }

    /// Answers `op` from connection `conn` (everything but `shutdown`,
    /// which the owner handles).
    pub fn handle(&mut self, session: &Session, op: Op, conn: &Conn) -> Result<Value, String> {
        match op {
            Op::Attach {
                pid,
                follow,
                trace,
                signal,
                decode_fds,
                status,
                string_limit,
                entries,
                steps,
                intel,
            } => self.attach(
                session,
                conn,
                AttachRequest {
                    pid,
                    follow,
                    trace,
                    signal,
                    decode_fds,
                    status,
                    string_limit,
                    entries,
                    steps,
                    intel,
                },
            ),
            Op::Detach => self.detach(session, conn),
            Op::Disconnected => self.disconnected(session, conn),
            Op::Stop {
                pid,
                tid,
                wait_ms,
                until_close,
                interrupt,
            } => {
                let wait = std::time::Duration::from_millis(wait_ms.unwrap_or(2000).min(600_000));
                self.stop(session, conn, target(pid, tid)?, wait, until_close, interrupt)
            }
            Op::Cont {
                pid,
                tid: Some(tid),
                signal: Some(signal),
            } if pid.is_none() => self.cont_with_signal(session, tid, signal),
            Op::Cont { signal: Some(_), .. } => {
                Err("cont with a signal names one thread (tid), not a process".into())
            }
            Op::Cont { pid, tid, .. } => self.cont(session, target(pid, tid)?),
            Op::Debug { pid, exec } => self.debug(session, conn, pid, exec),
            Op::Regs { tid, set } => self.regs(session, tid, set),
            Op::Step { tid, count, blocks } => self.step(session, tid, count.unwrap_or(1), blocks),
            Op::Mem {
                pid,
                addr,
                len,
                write,
            } => self.mem(session, pid, &addr, len, write),
            Op::Interrupt { pid, tid, wait_ms } => {
                let wait = std::time::Duration::from_millis(wait_ms.unwrap_or(2000).min(600_000));
                self.interrupt(session, target(pid, tid)?, wait, None)
            }
            Op::Signal { pid, tid, signal } => {
                // A process's signal goes to its main thread (whose tid is
                // the pid): one thread takes it, as a kill() would.
                let thread = match target(pid, tid)? {
                    Target::Process(p) | Target::Thread(p) => Target::Thread(p),
                };
                let wait = std::time::Duration::from_secs(2);
                self.interrupt(session, thread, wait, Some(signal))
            }
            Op::TextHash => self.text_hash(session),
            Op::Ping => {
                let vm = session.vm();
                let p = vm.placement();
                Ok(json!({
                    "kind": vm.kind().name(),
                    "vcpus": vm.vcpu_count(),
                    // Where the VMM loaded the kernel (its own KASLR choice):
                    // ground truth for what introspection detects.
                    "placement": {
                        "virt_offset": format!("{:#x}", p.virt_offset),
                        "phys_start": format!("{:#x}", p.phys_start),
                    },
                }))
            }
            Op::Snapshot { .. } if self.tracer.as_ref().is_some_and(Tracer::holds_guest_state) => {
                Err("cannot snapshot while hvtrace holds guest threads stopped (their registers are kept in the host): `hvtrace cont` them first".into())
            }
            Op::Snapshot { path } => session
                .snapshot(std::path::Path::new(&path), "hvtrace boot")
                .map(|bytes| json!({ "bytes": bytes }))
                .map_err(|e| e.to_string()),
            Op::Ps { kernel, system_map } => {
                let source = self.requested_source(kernel, system_map);
                let stopped = self.stopped_threads();
                let mut v = self.live(session, &source, introspect::ps_json)?;
                mark_stopped(&mut v, &stopped);
                Ok(v)
            }
            Op::Sites => {
                let source = self.default_source.clone();
                self.live(session, &source, introspect::sites_json)
            }
            Op::Inspect {
                pid,
                kernel,
                system_map,
            } => {
                let source = self.requested_source(kernel, system_map);
                self.live(session, &source, |mem, vcpus, info| {
                    introspect::inspect_json(mem, vcpus, info, pid)
                })
            }
            Op::Stacks { all } => {
                let source = self.default_source.clone();
                self.live_cpus(session, &source, |mem, cpus, info| {
                    crate::stacks::stacks_json(mem, cpus, info, all)
                })
            }
            Op::Shutdown => Err("shutdown is handled by the VM owner".into()),
        }
    }

    fn requested_source(&self, kernel: Option<String>, system_map: Option<String>) -> KernelSource {
        match kernel {
            Some(k) => KernelSource::Files {
                kernel: k.into(),
                system_map: system_map.map(Into::into),
            },
            None => self.default_source.clone(),
        }
    }

    /// Runs `f` over the guest with every vCPU paused (and only for that
    /// long), loading the kernel information first if needed.
    fn live(
        &mut self,
        session: &Session,
        source: &KernelSource,
        f: impl FnOnce(&GuestRam, &[VcpuView], &KernelInfo) -> anyhow::Result<Value>,
    ) -> Result<Value, String> {
        self.live_with(
            session,
            source,
            |vm| {
                (0..vm.vcpu_count())
                    .map(|id| Ok(vm.vcpu_sregs(id)?.view))
                    .collect()
            },
            |v: &VcpuView| *v,
            f,
        )
    }

    /// [`Handler::live`] with each vCPU's whole state (registers and run
    /// state too), for `stacks`.
    fn live_cpus(
        &mut self,
        session: &Session,
        source: &KernelSource,
        f: impl FnOnce(&GuestRam, &[CpuState], &KernelInfo) -> anyhow::Result<Value>,
    ) -> Result<Value, String> {
        self.live_with(
            session,
            source,
            crate::stacks::cpu_states,
            |c: &CpuState| c.sregs.view,
            f,
        )
    }

    /// Pauses the VM, reads what `read` reads of each vCPU, loads the
    /// kernel information if needed (through the first vCPU's view), runs
    /// `f`, and resumes the VM.
    fn live_with<C>(
        &mut self,
        session: &Session,
        source: &KernelSource,
        read: impl FnOnce(&vmm::machine::RunningVm) -> anyhow::Result<Vec<C>>,
        view: impl Fn(&C) -> VcpuView,
        f: impl FnOnce(&GuestRam, &[C], &KernelInfo) -> anyhow::Result<Value>,
    ) -> Result<Value, String> {
        let vm = session.vm();
        self.adopt_preload();
        if let KernelSource::Files { kernel, system_map } = source {
            if !self.infos.contains_key(source) {
                let info = introspect::info_from_files(kernel, system_map.as_deref())
                    .map_err(|e| format!("{e:#}"))?;
                self.infos.insert(source.clone(), Arc::new(info));
            }
        }
        vm.pause_all().map_err(|e| e.to_string())?;
        let result = (|| -> anyhow::Result<Value> {
            let cpus = read(vm)?;
            let Some(first) = cpus.first() else {
                anyhow::bail!("the VM has no vCPU");
            };
            if !self.infos.contains_key(source) {
                let info = introspect::load_info(source, vm.ram(), &view(first))?;
                self.infos.insert(source.clone(), Arc::new(info));
            }
            f(vm.ram(), &cpus, &self.infos[source])
        })();
        let resumed = vm.resume_all();
        let value = result.map_err(|e| format!("{e:#}"))?;
        resumed.map_err(|e| e.to_string())?;
        Ok(value)
    }
}

/// Marks the tasks hvtrace holds stopped in a `ps` reply: state `T`, and
/// `"stopped_by":"hvtrace"` (the guest itself sees them asleep, `D`).
fn mark_stopped(ps: &mut Value, stopped: &[i32]) {
    if let Some(tasks) = ps["tasks"].as_array_mut() {
        for t in tasks {
            let tid = t["tid"].as_i64().and_then(|v| i32::try_from(v).ok());
            if tid.is_some_and(|tid| stopped.contains(&tid)) {
                t["guest_state"] = t["state"].clone();
                t["state"] = json!("T");
                t["stopped_by"] = json!("hvtrace");
            }
        }
    }
}

/// A number from JSON: an integer, or a string in decimal or `0x` hex.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
        Value::String(s) => match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => s
                .parse::<u64>()
                .ok()
                .or_else(|| s.parse::<i64>().ok().map(|i| i as u64)),
        },
        _ => None,
    }
}

/// Bytes from hex text (whitespace allowed between bytes).
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() & 1 == 1 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("`{text}` is not hex bytes"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// The FPU/SSE registers of an FXSAVE image: control and status words,
/// MXCSR, and xmm0-15 as 128-bit hex numbers.
fn fpu_json(area: &[u8]) -> Value {
    let u16_at = |o: usize| u16::from_le_bytes([area[o], area[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(area[o..o + 4].try_into().unwrap_or([0; 4]));
    let mut v = serde_json::Map::new();
    v.insert("fcw".into(), json!(format!("{:#x}", u16_at(0))));
    v.insert("fsw".into(), json!(format!("{:#x}", u16_at(2))));
    v.insert("mxcsr".into(), json!(format!("{:#x}", u32_at(24))));
    for i in 0..16 {
        let bytes = &area[160 + 16 * i..176 + 16 * i];
        let n = u128::from_le_bytes(bytes.try_into().unwrap_or([0; 16]));
        v.insert(format!("xmm{i}"), json!(format!("{n:#034x}")));
    }
    Value::Object(v)
}
