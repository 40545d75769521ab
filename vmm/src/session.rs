//! A guest session: boot (or restore) a VM whose init speaks the control
//! protocol, wait until it is ready, run commands, and turn everything that
//! can go wrong (panic, reset, stall, emulation failure) into one clear error.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::builder::{build, BuildError, Sinks, VmConfig};
use crate::control::{run_request, sh_request, ControlMessage, Start};
use crate::crash::CrashKind;
use crate::devices::serial::{ConsoleLog, LineSink, Sink};
use crate::machine::{MachineError, RunningVm, VmEvent};
use crate::vstate::vcpu::VcpuEvent;

/// How long a guest may go without console or control output before the
/// session reports it as stalled, by KVM kind. On PVM KVM guest kernel code
/// is emulated: a Debian kernel's boot has silent stretches of over ten
/// minutes (ftrace's boot-time check of every call site), so the bound
/// there is generous; on hardware KVM a minute of silence is already odd.
pub fn default_stall_timeout(kind: crate::kvm_kind::KvmKind) -> Duration {
    match kind {
        crate::kvm_kind::KvmKind::Pvm => Duration::from_secs(2400),
        crate::kvm_kind::KvmKind::Hardware => Duration::from_secs(120),
    }
}

/// How long a guest may be silent before the session describes what it is
/// doing (once per silence), by KVM kind: long enough that a busy boot on
/// PVM KVM (a minute of ftrace checks without a line) rarely triggers it.
pub fn default_stall_report_after(kind: crate::kvm_kind::KvmKind) -> Duration {
    match kind {
        crate::kvm_kind::KvmKind::Pvm => Duration::from_secs(180),
        crate::kvm_kind::KvmKind::Hardware => Duration::from_secs(20),
    }
}

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The VM could not be driven.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The guest kernel panicked.
    #[error("guest kernel panicked: {0}")]
    Panic(String),
    /// The guest kernel printed a crash report (oops, BUG, lockup, hung
    /// task, RCU stall) and the run was ended.
    #[error("guest kernel {kind}: {line}\nlast console lines:\n{tail}")]
    Crashed {
        /// What happened ("oopsed", ...).
        kind: &'static str,
        /// The report's first line.
        line: String,
        /// Console tail, the report included.
        tail: String,
    },
    /// The guest reset or powered off before finishing.
    #[error("guest {what} while {during}; last console lines:\n{tail}")]
    Ended {
        /// "reset itself" or "powered off".
        what: &'static str,
        /// What the session was waiting for.
        during: &'static str,
        /// Console tail.
        tail: String,
    },
    /// A vCPU stopped on an error the VMM cannot handle.
    #[error("vCPU {vcpu} stopped: {message}; last console lines:\n{tail}")]
    VcpuFailed {
        /// Which vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
        /// Console tail.
        tail: String,
    },
    /// Nothing happened for too long.
    #[error("guest made no progress for {0:?} while {1} (no console or control output; see --stall-timeout); last console lines:\n{2}")]
    Stalled(Duration, &'static str, String),
    /// Saving or restoring a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::persist::SnapshotError),
    /// The guest's init reported an error.
    #[error("guest init: {0}")]
    Init(String),
}

/// Where a session's guest output goes.
pub struct Outputs {
    /// The command's stdout.
    pub stdout: Sink,
    /// The command's stderr.
    pub stderr: Sink,
    /// Echo the kernel console here as it arrives (e.g. host stderr), if set.
    pub console_echo: Option<Sink>,
}

/// Moments of a session, for benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// When the session began.
    pub start: Option<Instant>,
    /// First byte of command output (stdout or stderr).
    pub first_output: Option<Instant>,
}

/// A running guest whose init speaks the control protocol.
pub struct Session {
    vm: RunningVm,
    control: Receiver<ControlMessage>,
    console: ConsoleLog,
    crash: CrashSeen,
    /// The guest's init has been ready at least once.
    booted: bool,
    stall_report: Option<StallReport>,
    last_progress: Arc<Mutex<Instant>>,
    stall_timeout: Duration,
    timings: Arc<Mutex<Timings>>,
    ready: bool,
    unexpected_errors: Vec<String>,
    /// The command sent and not yet ended, to send again as `RUN` if the
    /// guest's init predates `SH`.
    in_flight: Option<(Vec<String>, Start)>,
    /// The guest's init answered `SH` as an unknown request.
    legacy_init: bool,
    rip_sampling: Option<(Duration, Instant)>,
    symbols: Option<guest_introspect::symbols::SymbolMap>,
}

/// Describes a stalled guest (see [`Session::report_stalls_after`]).
pub type StallDescriber = Box<dyn FnMut(&RunningVm) -> String + Send>;

struct StallReport {
    after: Duration,
    describe: StallDescriber,
    reported: bool,
}

/// How long a crash report may take to finish printing before the session
/// ends with what it has.
const CRASH_REPORT_GRACE: Duration = Duration::from_secs(20);
/// Console silence that marks a crash report as complete.
const CRASH_REPORT_QUIET: Duration = Duration::from_secs(2);

/// A sink that records the time of its first byte and forwards.
struct TimedSink {
    inner: Sink,
    timings: Arc<Mutex<Timings>>,
    progress: Arc<Mutex<Instant>>,
}

impl Write for TimedSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = now;
        let mut t = self.timings.lock().unwrap_or_else(|e| e.into_inner());
        t.first_output.get_or_insert(now);
        drop(t);
        self.inner.write_all(data)?;
        self.inner.flush()?;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The first crash report line seen on the console, and when.
type CrashSeen = Arc<Mutex<Option<(CrashKind, String, Instant)>>>;

struct ConsoleSink {
    log: ConsoleLog,
    echo: Option<Sink>,
    progress: Arc<Mutex<Instant>>,
    line: Vec<u8>,
    crash: CrashSeen,
}

impl ConsoleSink {
    /// Watches whole lines for a crash report.
    fn watch(&mut self, data: &[u8]) {
        for &b in data {
            if b != b'\n' {
                if self.line.len() < 4096 {
                    self.line.push(b);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
            self.line.clear();
            if let Some(kind) = crate::crash::classify(&text) {
                let mut c = self.crash.lock().unwrap_or_else(|e| e.into_inner());
                c.get_or_insert((kind, text, Instant::now()));
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.log.push(data);
        self.watch(data);
        if let Some(e) = &mut self.echo {
            let _ = e.write_all(data);
            let _ = e.flush();
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The parts of a session that exist before its VM: the receiving end of
/// the control lines, the console log, and the progress and timing clocks
/// the UART sinks update.
struct Wiring {
    control: Receiver<ControlMessage>,
    console: ConsoleLog,
    crash: CrashSeen,
    progress: Arc<Mutex<Instant>>,
    timings: Arc<Mutex<Timings>>,
}

/// Wires `outputs` to the four UARTs: returns the sinks (for the builder or
/// restore) and the session's ends of them.
fn wire(outputs: Outputs) -> (Sinks, Wiring) {
    let progress = Arc::new(Mutex::new(Instant::now()));
    let timings = Arc::new(Mutex::new(Timings {
        start: Some(Instant::now()),
        first_output: None,
    }));
    let console = ConsoleLog::default();
    let crash = CrashSeen::default();
    let (tx, rx): (Sender<ControlMessage>, Receiver<ControlMessage>) = unbounded();
    let p = progress.clone();
    let control = LineSink::new(move |line: &str| {
        *p.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let _ = tx.send(ControlMessage::parse(line));
    });
    let timed = |inner: Sink| -> Sink {
        Box::new(TimedSink {
            inner,
            timings: timings.clone(),
            progress: progress.clone(),
        })
    };
    let sinks = Sinks {
        console: Box::new(ConsoleSink {
            log: console.clone(),
            echo: outputs.console_echo,
            progress: progress.clone(),
            line: Vec::new(),
            crash: crash.clone(),
        }),
        control: Box::new(control),
        stdout: timed(outputs.stdout),
        stderr: timed(outputs.stderr),
    };
    (
        sinks,
        Wiring {
            control: rx,
            console,
            crash,
            progress,
            timings,
        },
    )
}

impl Wiring {
    /// Completes the session around a started VM.
    fn attach(self, vm: RunningVm, stall_timeout: Duration) -> Session {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Session {
            vm,
            control: self.control,
            console: self.console,
            crash: self.crash,
            booted: false,
            stall_report: None,
            last_progress: self.progress,
            stall_timeout,
            timings: self.timings,
            ready: false,
            unexpected_errors: Vec::new(),
            in_flight: None,
            legacy_init: false,
            rip_sampling: None,
            symbols: None,
        }
    }
}

/// Longest wait for a VM event in one look at the guest's messages.
const POLL_WAIT: Duration = Duration::from_millis(20);

impl Session {
    /// Restores a snapshot (saved while init waited for a request) and
    /// starts it; `expected_label` guards against a snapshot of another guest.
    pub fn restore(
        path: &std::path::Path,
        expected_label: Option<&str>,
        outputs: Outputs,
        stall_timeout: Duration,
    ) -> Result<Self, SessionError> {
        let (sinks, rest) = wire(outputs);
        let restored = crate::persist::restore(path, sinks, expected_label)?;
        let vm = restored.machine.start_with(restored.traps, true)?;
        let mut session = rest.attach(vm, stall_timeout);
        session.assume_ready();
        Ok(session)
    }

    /// Saves the VM to `path` under `label` (it keeps running afterwards).
    pub fn snapshot(&self, path: &std::path::Path, label: &str) -> Result<u64, SessionError> {
        Ok(crate::persist::save(&self.vm, path, label)?)
    }

    /// Builds and starts a VM for `config`.
    pub fn boot(
        config: &VmConfig,
        outputs: Outputs,
        stall_timeout: Duration,
    ) -> Result<Self, SessionError> {
        let (sinks, rest) = wire(outputs);
        let machine = build(config, sinks)?;
        let vm = machine.start()?;
        let p = vm.placement();
        // A System.map beside the kernel (as kernel-config/build.sh leaves
        // it) lets error reports name the kernel function.
        let map = config.kernel.with_file_name("System.map");
        let symbols = std::fs::read_to_string(&map)
            .ok()
            .and_then(|t| guest_introspect::symbols::SymbolMap::parse_system_map(&t).ok());
        log::info!(
            "kernel at physical {:#x}, virtual KASLR offset {:#x}, entry {:#x}; cmdline: {}",
            p.phys_start,
            p.virt_offset,
            p.entry,
            vm.cmdline()
        );
        let mut session = rest.attach(vm, stall_timeout);
        session.symbols = symbols;
        Ok(session)
    }

    /// The running VM.
    pub fn vm(&self) -> &RunningVm {
        &self.vm
    }

    /// The console kept so far.
    pub fn console(&self) -> &ConsoleLog {
        &self.console
    }

    /// Session timings.
    pub fn timings(&self) -> Timings {
        self.timings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `HVTRACE-ERROR` lines init printed that no request caused.
    pub fn init_errors(&self) -> &[String] {
        &self.unexpected_errors
    }

    /// Debugging aid: while the session waits, print every vCPU's RIP and
    /// CR3 on stderr every `period` (pausing each vCPU briefly to read them).
    pub fn sample_rip_every(&mut self, period: Duration) {
        self.rip_sampling = Some((period, Instant::now()));
    }

    fn maybe_sample_rip(&mut self) {
        let Some((period, last)) = self.rip_sampling else {
            return;
        };
        if last.elapsed() < period {
            return;
        }
        self.rip_sampling = Some((period, Instant::now()));
        for id in 0..self.vm.vcpu_count() {
            if self.vm.pause(id).is_err() {
                continue;
            }
            let regs = self
                .vm
                .with_vcpu(id, |fd| (fd.get_regs().ok(), fd.get_sregs().ok()));
            let _ = self.vm.resume(id);
            if let Ok((Some(r), Some(s))) = regs {
                eprintln!(
                    "[rip-sample] vcpu={id} rip={:#x} rsp={:#x} cr3={:#x} cs={:#x}",
                    r.rip, r.rsp, s.cr3, s.cs.selector
                );
            }
        }
    }

    /// Marks the guest ready without waiting (a restored snapshot was taken
    /// while init waited for a request).
    pub fn assume_ready(&mut self) {
        self.mark_ready();
    }

    fn mark_ready(&mut self) {
        self.ready = true;
        self.booted = true;
    }

    fn vm_ended(&self, event: VmEvent, during: &'static str) -> SessionError {
        let tail = self.console.tail(30);
        if let Some(line) = self
            .console
            .text()
            .lines()
            .find(|l| l.contains("Kernel panic - not syncing"))
        {
            return SessionError::Panic(format!("{}\nlast console lines:\n{tail}", line.trim()));
        }
        match event {
            VmEvent::Vcpu(VcpuEvent::Failed(vcpu, message)) => {
                let message = match self.symbolize_rip(&message) {
                    Some(sym) => format!("{message} in {sym}"),
                    None => message,
                };
                SessionError::VcpuFailed {
                    vcpu,
                    message,
                    tail,
                }
            }
            VmEvent::Vcpu(VcpuEvent::PowerOff(_)) | VmEvent::AcpiPowerOff => SessionError::Ended {
                what: "powered off",
                during,
                tail,
            },
            _ => SessionError::Ended {
                what: "reset itself",
                during,
                tail,
            },
        }
    }

    /// Names the kernel function of the first `rip=0x...` in `message`.
    fn symbolize_rip(&self, message: &str) -> Option<String> {
        let map = self.symbols.as_ref()?;
        let hex = message
            .split("rip=0x")
            .nth(1)?
            .split(|c: char| !c.is_ascii_hexdigit())
            .next()?;
        let rip = u64::from_str_radix(hex, 16).ok()?;
        map.symbolize(rip.wrapping_sub(self.vm.placement().virt_offset))
    }

    /// Waits for the next control message, watching for VM failure and stalls.
    fn next_message(&mut self, during: &'static str) -> Result<ControlMessage, SessionError> {
        loop {
            if let Some(m) = self.poll_once(during, POLL_WAIT)? {
                return Ok(m);
            }
            let idle = self
                .last_progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if idle > self.stall_timeout {
                return Err(SessionError::Stalled(
                    self.stall_timeout,
                    during,
                    self.console.tail(30),
                ));
            }
        }
    }

    /// One step of waiting: a control message if one is queued; otherwise
    /// up to 20 ms for a VM event (an ended VM is an error) and a RIP
    /// sample if one is due.
    fn poll_once(
        &mut self,
        during: &'static str,
        wait: Duration,
    ) -> Result<Option<ControlMessage>, SessionError> {
        if self.check_crash()? {
            // A crash report is printing: no message is handed out (the
            // command's exit may follow the oops that killed it); the VM's
            // end or the report's completion ends the wait.
            if let Some(ev) = self.vm.next_event(Duration::from_millis(20)) {
                if !matches!(ev, VmEvent::Vcpu(VcpuEvent::Finished(_))) {
                    std::thread::sleep(Duration::from_millis(50));
                    return Err(self.vm_ended(ev, during));
                }
            }
            return Ok(None);
        }
        if let Ok(m) = self.control.try_recv() {
            return Ok(Some(m));
        }
        if let Some(ev) = self.vm.next_event(wait) {
            if !matches!(ev, VmEvent::Vcpu(VcpuEvent::Finished(_))) {
                // Let the console drain what the guest printed last.
                std::thread::sleep(Duration::from_millis(50));
                return Err(self.vm_ended(ev, during));
            }
        }
        self.maybe_sample_rip();
        let idle = self
            .last_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        self.maybe_report_stall(idle, during);
        Ok(None)
    }

    /// Has the kernel printed a crash report? Once its printing has gone
    /// quiet (or after a grace period), the session ends with it; until
    /// then this returns true. A panic is left to the VM's end (it resets
    /// at once with `panic=-1`), which reports it with the whole console.
    fn check_crash(&mut self) -> Result<bool, SessionError> {
        let seen = self.crash.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((kind, line, at)) = seen else {
            return Ok(false);
        };
        // Lockup and hung-task reports during a boot are left to the
        // stall timeout: see CrashKind::may_be_slowness.
        if kind.may_be_slowness() && !self.booted {
            log::warn!("guest kernel {} while booting: {line}", kind.describe());
            *self.crash.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(false);
        }
        if kind == CrashKind::Panic && at.elapsed() < CRASH_REPORT_GRACE {
            return Ok(true);
        }
        let quiet = self
            .last_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if quiet < CRASH_REPORT_QUIET && at.elapsed() < CRASH_REPORT_GRACE {
            return Ok(true);
        }
        Err(SessionError::Crashed {
            kind: kind.describe(),
            line: line.trim().to_string(),
            tail: self.console.tail(40),
        })
    }

    /// Once the guest has made no progress (no console, command or control
    /// output) for `after`, print on stderr, once per stall, what
    /// `describe` says it is doing (hvtrace passes a reader of every
    /// vCPU's and task's kernel stack).
    pub fn report_stalls_after(&mut self, after: Duration, describe: StallDescriber) {
        self.stall_report = Some(StallReport {
            after,
            describe,
            reported: false,
        });
    }

    fn maybe_report_stall(&mut self, idle: Duration, during: &'static str) {
        let Some(r) = &mut self.stall_report else {
            return;
        };
        if idle < r.after {
            r.reported = false;
            return;
        }
        if r.reported {
            return;
        }
        r.reported = true;
        let text = (r.describe)(&self.vm);
        eprintln!(
            "hvtrace: the guest has been silent for {} s while {during} (no console, command or control output); what it is doing:\n{text}",
            idle.as_secs()
        );
    }

    /// Returns an error if the VM has ended (reset, power-off, vCPU failure);
    /// otherwise drains control messages. For long-running VMs.
    pub fn check_running(&mut self) -> Result<(), SessionError> {
        self.check_crash()?;
        while let Ok(m) = self.control.try_recv() {
            match m {
                ControlMessage::Ready => self.mark_ready(),
                ControlMessage::Error(e) => self.unexpected_errors.push(e),
                _ => {}
            }
        }
        match self.vm.next_event(Duration::from_millis(1)) {
            Some(VmEvent::Vcpu(VcpuEvent::Finished(_))) | None => Ok(()),
            Some(ev) => Err(self.vm_ended(ev, "serving requests")),
        }
    }

    /// Waits until init asks for a request.
    pub fn wait_ready(&mut self) -> Result<(), SessionError> {
        while !self.ready {
            match self.next_message("waiting for the guest's init to start")? {
                ControlMessage::Ready => self.mark_ready(),
                ControlMessage::Error(e) => self.unexpected_errors.push(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs `argv` in the guest; returns its exit status.
    pub fn run(&mut self, argv: &[String]) -> Result<i32, SessionError> {
        self.start(argv)?;
        loop {
            match self.next_message("waiting for the guest command to finish")? {
                ControlMessage::Exit(code) => {
                    self.in_flight = None;
                    return Ok(code);
                }
                ControlMessage::Error(e) if self.resent_as_run(&e) => {}
                ControlMessage::Error(e) => return Err(SessionError::Init(e)),
                _ => {}
            }
        }
    }

    /// Sends `argv` to the guest's init: as `SH`, or as `RUN` to an init
    /// that predates it.
    fn send_command(&mut self, argv: &[String], start: Start) -> Result<(), SessionError> {
        self.wait_ready()?;
        self.ready = false;
        let request = if self.legacy_init {
            run_request(argv, start)
        } else {
            sh_request(argv, start)
        };
        self.in_flight = Some((argv.to_vec(), start));
        self.vm.send_control(request.as_bytes());
        Ok(())
    }

    /// An init that predates `SH` (a snapshot taken by an older hvtrace)
    /// answers it as an unknown request: the command goes again as `RUN`,
    /// and so do all later ones. Whether it did.
    fn resent_as_run(&mut self, error: &str) -> bool {
        if self.legacy_init || error != "unknown request" {
            return false;
        }
        let Some((argv, start)) = self.in_flight.clone() else {
            return false;
        };
        self.legacy_init = true;
        // Init answers READY after the error and then reads the next line.
        self.vm.send_control(run_request(&argv, start).as_bytes());
        true
    }

    /// Starts `argv` in the guest without waiting for it; poll with
    /// [`Session::poll_exit`].
    pub fn start(&mut self, argv: &[String]) -> Result<(), SessionError> {
        self.send_command(argv, Start::Plain)
    }

    /// Like [`Session::start`], but the command replaces the shell init
    /// starts for it (see [`crate::control::exec_request`]).
    pub fn start_exec(&mut self, argv: &[String]) -> Result<(), SessionError> {
        self.send_command(argv, Start::Exec)
    }

    /// Waits up to `timeout` for the command started with
    /// [`Session::start`]: its exit status once it has ended, None while it
    /// runs. VM failures and stalls are errors, as in [`Session::run`].
    pub fn poll_exit(&mut self, timeout: Duration) -> Result<Option<i32>, SessionError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(code) = self.exit_from(POLL_WAIT)? {
                return Ok(Some(code));
            }
        }
        Ok(None)
    }

    /// [`Session::poll_exit`] without waiting: the command's exit status if
    /// the guest has reported it, for a loop that also waits on something
    /// else (a control socket's requests).
    pub fn poll_exit_now(&mut self) -> Result<Option<i32>, SessionError> {
        self.exit_from(Duration::ZERO)
    }

    /// One look for the command's exit, waiting up to `wait` for a VM
    /// event.
    fn exit_from(&mut self, wait: Duration) -> Result<Option<i32>, SessionError> {
        match self.poll_once("waiting for the guest command to finish", wait)? {
            Some(ControlMessage::Exit(code)) => {
                self.in_flight = None;
                Ok(Some(code))
            }
            Some(ControlMessage::Error(e)) if self.resent_as_run(&e) => Ok(None),
            Some(ControlMessage::Error(e)) => Err(SessionError::Init(e)),
            _ => Ok(None),
        }
    }

    /// Figures about this session for `--report`: setup time before the
    /// first guest instruction, time to the command's first output, exit
    /// counters, and the VMM's memory beyond guest RAM.
    pub fn report(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let t = self.timings();
        let start = t.start.unwrap_or_else(Instant::now);
        let stats = self.vm.stats();
        let sum =
            |f: &dyn Fn(&crate::vstate::vcpu::VcpuStats) -> u64| stats.iter().map(f).sum::<u64>();
        let (rss_kib, guest_kib) = memory_use(&self.vm);
        serde_json::json!({
            "kind": self.vm.kind().name(),
            "vmm_setup_ms": (self.vm.started() - start).as_secs_f64() * 1e3
                + stats[0].first_run_at_ns.load(Relaxed) as f64 / 1e6,
            "first_output_ms": t.first_output.map(|f| (f - start).as_secs_f64() * 1e3),
            "elapsed_ms": start.elapsed().as_secs_f64() * 1e3,
            "syscall_fixups": sum(&|s| s.syscall_fixups.load(Relaxed)),
            "page_faults_trapped": sum(&|s| s.page_faults.load(Relaxed)),
            "guest_breakpoints_reinjected": sum(&|s| s.guest_breakpoints.load(Relaxed)),
            "pio_exits": sum(&|s| s.pio_exits.load(Relaxed)),
            "mmio_exits": sum(&|s| s.mmio_exits.load(Relaxed)),
            "xsave_emulations": sum(&|s| s.xsave_emulations.load(Relaxed)),
            "vm_exits": sum(&|s| s.exits.load(Relaxed)),
            "tracer_trap_exits": sum(&|s| s.tracer_trap_exits.load(Relaxed)),
            "tracer_sregs_reads": sum(&|s| s.tracer_sregs_reads.load(Relaxed)),
            "kernel_copies": sum(&|s| s.kernel_copies.load(Relaxed)),
            "kernel_copy_bytes": sum(&|s| s.kernel_copy_bytes.load(Relaxed)),
            "kernel_copy_faults": sum(&|s| s.kernel_copy_faults.load(Relaxed)),
            "in_guest_ms": sum(&|s| s.in_guest_ns.load(Relaxed)) as f64 / 1e6,
            "in_vmm_ms": sum(&|s| s.in_vmm_ns.load(Relaxed)) as f64 / 1e6,
            "vmm_rss_kib": rss_kib,
            "guest_ram_resident_kib": guest_kib,
            "vmm_rss_beyond_guest_ram_kib": rss_kib.saturating_sub(guest_kib),
        })
    }

    /// Stops the VM (restoring every byte the VMM patched).
    pub fn shutdown(self) {
        self.vm.shutdown();
    }
}

/// (process RSS, resident guest RAM) in KiB, from /proc/self/smaps: the
/// guest's share is the Rss of the mappings that back its RAM regions.
fn memory_use(vm: &RunningVm) -> (u64, u64) {
    let starts: Vec<u64> = vm
        .ram()
        .regions()
        .iter()
        .map(|(_, host, _)| *host as u64)
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    in_guest = starts.contains(&start);
                }
            }
        }
    }
    (total, guest)
}
