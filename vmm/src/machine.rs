//! A built VM and, once started, the handle the VMM and the tracer drive it
//! through: pause and resume vCPUs, run code on a paused vCPU, read and
//! write guest memory, stop.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver as StdReceiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::builder::KernelPlacement;
use crate::devices::bus::{PlatformEvent, PortIoBus, CONTROL_UART};
use crate::kvm_kind::KvmKind;
use crate::trap::TrapTable;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{
    install_kick_handler, kick_signal, VcpuCommand, VcpuEvent, VcpuShared, VcpuStats, VcpuThread,
};

/// A paused vCPU's registers and run state.
#[derive(Debug, Clone, Copy)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: crate::trap::GuestRegs,
    /// Special-register facts.
    pub sregs: crate::trap::GuestSregs,
    /// Halted, waiting for an interrupt.
    pub halted: bool,
}

/// Errors driving a running VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A vCPU did not reach the paused state in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    /// The vCPU thread is gone.
    #[error("vCPU {0} is no longer running")]
    VcpuGone(u8),
    /// No such vCPU.
    #[error("no vCPU {0}")]
    NoSuchVcpu(u8),
    /// Host thread or signal set-up failed.
    #[error("cannot start vCPU threads: {0}")]
    Thread(std::io::Error),
    /// A KVM call on a paused vCPU failed.
    #[error("vCPU {0}: {1}")]
    Kvm(u8, kvm_ioctls::Error),
}

/// A VM that is built but not yet running.
pub struct Machine {
    kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    kind: KvmKind,
    vcpus: Vec<VcpuFd>,
    bus: Arc<Mutex<PortIoBus>>,
    platform_rx: StdReceiver<PlatformEvent>,
    placement: KernelPlacement,
    cmdline: String,
}

/// Whether KVM keeps the general registers in `kvm_run` at every exit
/// (`KVM_CAP_SYNC_REGS` reports the register sets it can keep).
fn sync_gprs_supported(vm: &VmFd) -> bool {
    let sets = vm.check_extension_int(kvm_ioctls::Cap::SyncRegs);
    sets > 0 && sets & kvm_bindings::KVM_SYNC_X86_REGS as i32 != 0
}

impl Machine {
    /// Wraps the parts the builder (or snapshot restore) made.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kvm: Kvm,
        vm: VmFd,
        ram: GuestRam,
        kind: KvmKind,
        vcpus: Vec<VcpuFd>,
        bus: Arc<Mutex<PortIoBus>>,
        platform_rx: StdReceiver<PlatformEvent>,
        placement: KernelPlacement,
        cmdline: String,
    ) -> Self {
        Self {
            kvm,
            vm,
            ram,
            kind,
            vcpus,
            bus,
            platform_rx,
            placement,
            cmdline,
        }
    }

    /// Guest RAM (to inspect or patch before start).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, MachineError> {
        self.start_with(Arc::new(TrapTable::default()), false)
    }

    /// Starts with an existing trap table; `pvm_trap_ready` says whether
    /// the PVM page-fault trap is already in guest memory (restore).
    pub fn start_with(
        self,
        traps: Arc<TrapTable>,
        pvm_trap_ready: bool,
    ) -> Result<RunningVm, MachineError> {
        install_kick_handler().map_err(MachineError::Thread)?;
        let started = Instant::now();
        let count = self.vcpus.len();
        let stats = Arc::new((0..count).map(|_| VcpuStats::default()).collect::<Vec<_>>());
        let ready = Arc::new(AtomicBool::new(pvm_trap_ready || self.kind != KvmKind::Pvm));
        let shared = VcpuShared {
            ram: self.ram.clone(),
            bus: self.bus.clone(),
            traps: traps.clone(),
            kind: self.kind,
            pvm_trap_ready: ready.clone(),
            stats: stats.clone(),
            started,
            sync_gprs: sync_gprs_supported(&self.vm),
        };
        let (event_tx, event_rx) = unbounded();
        let (ack_tx, ack_rx) = unbounded();
        let mut vcpus = Vec::new();
        for (id, fd) in self.vcpus.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = unbounded();
            let t = VcpuThread::new(
                id as u8,
                fd,
                shared.clone(),
                cmd_rx,
                event_tx.clone(),
                ack_tx.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || t.run())
                .map_err(MachineError::Thread)?;
            vcpus.push(VcpuHandle {
                commands: cmd_tx,
                thread: Some(handle),
            });
        }
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = if ready.load(Ordering::Relaxed) {
            None
        } else {
            // PVM: vCPU 0 looks for the kernel's page-fault entry after each
            // exit; kick it regularly so it looks even while the guest makes
            // no exits of its own.
            let pthread = vcpus[0].thread.as_ref().map(|h| h.as_pthread_t());
            let stop = ticker_stop.clone();
            let ready = ready.clone();
            std::thread::Builder::new()
                .name("pvm-ticker".into())
                .spawn(move || {
                    while !ready.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(25));
                        if let Some(t) = pthread {
                            // SAFETY: pthread_kill with a valid signal on a
                            // thread id the JoinHandle keeps valid until
                            // join, which happens after this thread stops.
                            unsafe { libc::pthread_kill(t, kick_signal()) };
                        }
                    }
                })
                .ok()
        };
        Ok(RunningVm {
            _kvm: self.kvm,
            vm: self.vm,
            ram: self.ram,
            kind: self.kind,
            bus: self.bus,
            traps,
            vcpus,
            events: event_rx,
            acks: ack_rx,
            platform_rx: self.platform_rx,
            stats,
            started,
            placement: self.placement,
            cmdline: self.cmdline,
            ticker,
            ticker_stop,
            pvm_trap_ready: ready,
        })
    }
}

struct VcpuHandle {
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<VcpuFd>>,
}

/// What happened to a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// A vCPU event (reset, power-off, failure, end).
    Vcpu(VcpuEvent),
    /// The guest pulsed the reset line through the i8042.
    I8042Reset,
    /// The guest powered off through the ACPI sleep control register.
    AcpiPowerOff,
}

/// A running VM.
pub struct RunningVm {
    _kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    kind: KvmKind,
    bus: Arc<Mutex<PortIoBus>>,
    traps: Arc<TrapTable>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    acks: Receiver<u8>,
    platform_rx: StdReceiver<PlatformEvent>,
    stats: Arc<Vec<VcpuStats>>,
    started: Instant,
    placement: KernelPlacement,
    cmdline: String,
    ticker: Option<JoinHandle<()>>,
    ticker_stop: Arc<AtomicBool>,
    pvm_trap_ready: Arc<AtomicBool>,
}

/// How long a vCPU may take to reach an instruction boundary.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl RunningVm {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Kind of KVM the VM runs on.
    pub fn kind(&self) -> KvmKind {
        self.kind
    }

    /// Planted breakpoints.
    pub fn traps(&self) -> &Arc<TrapTable> {
        &self.traps
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// Per-vCPU exit counters.
    pub fn stats(&self) -> &[VcpuStats] {
        &self.stats
    }

    /// When the vCPU threads were started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where the kernel was loaded.
    pub fn placement(&self) -> KernelPlacement {
        self.placement
    }

    /// The command line the guest was booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Whether the PVM page-fault trap is in place (always true on hardware KVM).
    pub fn pvm_trap_ready(&self) -> bool {
        self.pvm_trap_ready.load(Ordering::Relaxed)
    }

    /// The port-I/O devices.
    pub fn bus(&self) -> &Arc<Mutex<PortIoBus>> {
        &self.bus
    }

    fn kick(&self, id: u8) {
        if let Some(t) = self.vcpus.get(id as usize).and_then(|v| v.thread.as_ref()) {
            // SAFETY: the pthread id belongs to a thread we have not joined,
            // and the kick signal has a handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Pauses vCPU `id` at an instruction boundary.
    pub fn pause(&self, id: u8) -> Result<(), MachineError> {
        self.pause_set(&[id])
    }

    /// Pauses every vCPU.
    pub fn pause_all(&self) -> Result<(), MachineError> {
        let ids: Vec<u8> = (0..self.vcpu_count()).collect();
        self.pause_set(&ids)
    }

    /// Queues `cmd` for vCPU `id`'s thread.
    fn send(&self, id: u8, cmd: VcpuCommand) -> Result<(), MachineError> {
        let v = self
            .vcpus
            .get(id as usize)
            .ok_or(MachineError::NoSuchVcpu(id))?;
        v.commands.send(cmd).map_err(|_| MachineError::VcpuGone(id))
    }

    fn pause_set(&self, ids: &[u8]) -> Result<(), MachineError> {
        for &id in ids {
            self.send(id, VcpuCommand::Pause)?;
            self.kick(id);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut waiting: Vec<u8> = ids.to_vec();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(id) => waiting.retain(|w| *w != id),
                Err(_) => return Err(MachineError::PauseTimeout(waiting[0], PAUSE_TIMEOUT)),
            }
        }
        Ok(())
    }

    /// Resumes vCPU `id`.
    pub fn resume(&self, id: u8) -> Result<(), MachineError> {
        self.send(id, VcpuCommand::Resume)
    }

    /// Resumes every vCPU.
    pub fn resume_all(&self) -> Result<(), MachineError> {
        (0..self.vcpu_count()).try_for_each(|id| self.resume(id))
    }

    /// What paused vCPU `id` is doing: its registers and whether it is
    /// halted (waiting for an interrupt).
    pub fn vcpu_state(&self, id: u8) -> Result<VcpuState, MachineError> {
        let (regs, sregs, mp) =
            self.with_vcpu(id, |fd| (fd.get_regs(), fd.get_sregs(), fd.get_mp_state()))?;
        let regs = regs.map_err(|e| MachineError::Kvm(id, e))?;
        let sregs = sregs.map_err(|e| MachineError::Kvm(id, e))?;
        Ok(VcpuState {
            regs: (&regs).into(),
            sregs: (&sregs).into(),
            halted: mp.is_ok_and(|m| m.mp_state == kvm_bindings::KVM_MP_STATE_HALTED),
        })
    }

    /// The special-register facts (page tables, IDT, GS base) of paused
    /// vCPU `id`.
    pub fn vcpu_sregs(&self, id: u8) -> Result<crate::trap::GuestSregs, MachineError> {
        let sregs = self
            .with_vcpu(id, |fd| fd.get_sregs())?
            .map_err(|e| MachineError::Kvm(id, e))?;
        Ok((&sregs).into())
    }

    /// Runs `f` on paused vCPU `id`'s thread and returns its result.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        id: u8,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R, MachineError> {
        let (tx, rx) = bounded(1);
        let job: Box<dyn FnOnce(&mut VcpuFd) + Send> = Box::new(move |fd| {
            let _ = tx.send(f(fd));
        });
        self.send(id, VcpuCommand::Exec(job))?;
        rx.recv().map_err(|_| MachineError::VcpuGone(id))
    }

    /// The control UART's (ttyS1's) interrupt line: pulsing it makes the
    /// guest run its 8250 interrupt handler (the tracer's doorbell).
    pub fn control_irq(&self) -> Option<crate::devices::serial::IrqLine> {
        let bus = self.bus.lock().unwrap_or_else(|e| e.into_inner());
        bus.uarts[CONTROL_UART].irq_line()
    }

    /// Queues bytes for the guest to read on the control UART (ttyS1).
    pub fn send_control(&self, bytes: &[u8]) {
        let mut bus = self.bus.lock().unwrap_or_else(|e| e.into_inner());
        bus.uarts[CONTROL_UART].queue_input(bytes);
    }

    /// Waits up to `timeout` for the next VM event.
    pub fn next_event(&self, timeout: Duration) -> Option<VmEvent> {
        if let Some(e) = self.platform_event() {
            return Some(e);
        }
        let step = Duration::from_millis(50).min(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            match self.events.recv_timeout(step) {
                Ok(e) => return Some(VmEvent::Vcpu(e)),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some(e) = self.platform_event() {
                return Some(e);
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// A reset or power-off the devices have seen, if any.
    fn platform_event(&self) -> Option<VmEvent> {
        match self.platform_rx.try_recv().ok()? {
            PlatformEvent::Reset => Some(VmEvent::I8042Reset),
            PlatformEvent::PowerOff => Some(VmEvent::AcpiPowerOff),
        }
    }

    /// Stops every vCPU thread, restoring all patched guest bytes first.
    /// Returns the vCPU fds (for a snapshot taken at the very end).
    pub fn shutdown(mut self) -> Vec<VcpuFd> {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        self.traps.remove_all(&self.ram);
        for id in 0..self.vcpu_count() {
            let _ = self.vcpus[id as usize].commands.send(VcpuCommand::Finish);
            self.kick(id);
        }
        let mut fds = Vec::new();
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                if let Ok(fd) = t.join() {
                    fds.push(fd);
                }
            }
        }
        fds
    }
}
