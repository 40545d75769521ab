//! One thread per vCPU, run as an explicit state machine.
//!
//! A vCPU is *Running* (inside `KVM_RUN` or handling an exit), *Paused*
//! (parked on its command channel, registers and memory safe to touch) or
//! *Finished*. Another thread pauses it by queueing [`VcpuCommand::Pause`]
//! and kicking it with a signal: the signal handler sets `immediate_exit` in
//! the vCPU's `kvm_run`, so `KVM_RUN` returns at the next instruction
//! boundary even if the signal lands just before the ioctl.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::kvm_run;
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::devices::bus::PortIoBus;
use crate::kvm_kind::KvmKind;
use crate::trap::pvm::{self, EntrySearch, PageFaultOutcome, SyscallMsrs};
use crate::trap::pvm_copy::{self, CopyOutcome};
use crate::trap::pvm_xsave::{self, XsaveOutcome};
use crate::trap::{
    Breakpoint, GuestSregs, TrapContext, TrapHandler, TrapHit, TrapOwner, TrapTable, INT3,
};
use crate::vstate::memory::GuestRam;

/// Work another thread asks a vCPU thread to do.
pub enum VcpuCommand {
    /// Stop at the next instruction boundary and acknowledge on the pause channel.
    Pause,
    /// Leave the paused state.
    Resume,
    /// Run a closure on the (paused) vCPU; used for register access.
    Exec(Box<dyn FnOnce(&mut VcpuFd) + Send>),
    /// End the thread.
    Finish,
}

/// What a vCPU thread reports to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest requested a reset (triple fault or KVM system event).
    Reset(u8),
    /// The guest asked to power off.
    PowerOff(u8),
    /// The vCPU stopped on an error the VMM cannot handle.
    Failed(u8, String),
    /// The thread ended.
    Finished(u8),
}

/// Counters a vCPU keeps about its exits (for benchmarks and reports).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Syscalls completed by the PVM fix-up.
    pub syscall_fixups: std::sync::atomic::AtomicU64,
    /// Genuine page faults passed through the trap.
    pub page_faults: std::sync::atomic::AtomicU64,
    /// Guest-owned int3 re-injected.
    pub guest_breakpoints: std::sync::atomic::AtomicU64,
    /// Port I/O exits.
    pub pio_exits: std::sync::atomic::AtomicU64,
    /// MMIO exits (the output window's doorbell, and stray accesses).
    pub mmio_exits: std::sync::atomic::AtomicU64,
    /// Instructions the VMM skipped or performed for the emulator (`fwait`, `ldmxcsr`, `stmxcsr`).
    pub skipped_instructions: std::sync::atomic::AtomicU64,
    /// `xsave`/`xrstor` performed (or faulted) for the PVM emulator.
    pub xsave_emulations: std::sync::atomic::AtomicU64,
    /// Nanoseconds from the VM's start to vCPU 0's first KVM_RUN.
    pub first_run_at_ns: std::sync::atomic::AtomicU64,
    /// Every exit from KVM_RUN to this VMM (kicks included).
    pub exits: std::sync::atomic::AtomicU64,
    /// `KVM_GET_SREGS` a tracer trap's handler asked for (each one a
    /// `vcpu_load` on PVM KVM).
    pub tracer_sregs_reads: std::sync::atomic::AtomicU64,
    /// The kernel's user copies the VMM performed (PVM), exits counted.
    pub kernel_copies: std::sync::atomic::AtomicU64,
    /// Bytes of them.
    pub kernel_copy_bytes: std::sync::atomic::AtomicU64,
    /// Page faults they raised in the guest.
    pub kernel_copy_faults: std::sync::atomic::AtomicU64,
    /// Exits spent on tracer traps: the trap itself, and for a
    /// debug-register trap the single-step over its instruction.
    pub tracer_trap_exits: std::sync::atomic::AtomicU64,
    /// Host time inside KVM_RUN, in nanoseconds.
    pub in_guest_ns: std::sync::atomic::AtomicU64,
    /// Host time between KVM_RUN calls (handling exits), in nanoseconds.
    pub in_vmm_ns: std::sync::atomic::AtomicU64,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set
            // before the first KVM_RUN and cleared before the mapping goes
            // away; a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static DONE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    DONE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Everything a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Guest RAM.
    pub ram: GuestRam,
    /// Port-I/O devices.
    pub bus: Arc<std::sync::Mutex<PortIoBus>>,
    /// Planted breakpoints.
    pub traps: Arc<TrapTable>,
    /// Kind of KVM.
    pub kind: KvmKind,
    /// Set once the PVM page-fault trap is planted.
    pub pvm_trap_ready: Arc<AtomicBool>,
    /// Exit counters, per vCPU.
    pub stats: Arc<Vec<VcpuStats>>,
    /// When the VM was started (for first-instruction timing).
    pub started: Instant,
    /// Whether KVM copies the general registers into `kvm_run` at every
    /// exit (`KVM_CAP_SYNC_REGS` with `KVM_SYNC_X86_REGS`), so that an
    /// exit's handler reads them without an ioctl. Special registers are
    /// always read by ioctl (docs/limitations.md: a `kvm_run` copy of them,
    /// written back by the PVM syscall fix-up, is the suspect of a guest
    /// double fault).
    pub sync_gprs: bool,
}

/// A device exit: counts it in the `counter` of vCPU `id` and hands the
/// locked bus to `access`; the vCPU runs on.
fn to_bus(
    shared: &VcpuShared,
    id: u8,
    counter: impl FnOnce(&VcpuStats) -> &std::sync::atomic::AtomicU64,
    access: impl FnOnce(&mut PortIoBus),
) -> Next {
    counter(&shared.stats[id as usize]).fetch_add(1, Ordering::Relaxed);
    access(&mut shared.bus.lock().unwrap_or_else(|e| e.into_inner()));
    Next::Run
}

/// The state a vCPU thread owns.
pub struct VcpuThread {
    id: u8,
    fd: VcpuFd,
    shared: VcpuShared,
    commands: Receiver<VcpuCommand>,
    events: Sender<VcpuEvent>,
    paused_acks: Sender<u8>,
    msrs: Option<SyscallMsrs>,
    last_entry_check: Option<Instant>,
    entry_unrecognised_reported: bool,
    /// The debug-register generation this vCPU runs with.
    applied_hw_generation: u64,
    /// Single-stepping the instruction under a debug-register trap (with
    /// that breakpoint off on this vCPU only).
    stepping_over: bool,
    /// Whether `kvm_run`'s copy of the general registers is this exit's
    /// and unread (see [`VcpuThread::exit_regs`]).
    exit_regs_fresh: bool,
    /// PVM, vCPU 0: whether the kernel's user-copy `rep movsb` has been
    /// looked for ([`crate::trap::pvm_copy`]).
    copy_site_searched: bool,
    /// When the last KVM_RUN returned (for the time split in VcpuStats).
    left_guest_at: Option<std::time::Instant>,
    /// Whether KVM accepts `KVM_GUESTDBG_BLOCKIRQ` (no interrupt is
    /// injected during that step); learnt on first use.
    block_irq: Option<bool>,
}

/// How the run loop continues after an exit.
enum Next {
    Run,
    Stop,
}

impl VcpuThread {
    /// A vCPU thread body for `fd`.
    pub fn new(
        id: u8,
        fd: VcpuFd,
        shared: VcpuShared,
        commands: Receiver<VcpuCommand>,
        events: Sender<VcpuEvent>,
        paused_acks: Sender<u8>,
    ) -> Self {
        Self {
            id,
            fd,
            shared,
            commands,
            events,
            paused_acks,
            msrs: None,
            last_entry_check: None,
            entry_unrecognised_reported: false,
            applied_hw_generation: 0,
            stepping_over: false,
            exit_regs_fresh: false,
            copy_site_searched: false,
            left_guest_at: None,
            block_irq: None,
        }
    }

    /// Runs the vCPU until it finishes; returns the vCPU fd for teardown.
    pub fn run(mut self) -> VcpuFd {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        if self.shared.sync_gprs {
            self.fd.set_sync_valid_reg(SyncReg::Register);
        }
        let mut first = true;
        loop {
            if first && self.id == 0 {
                let ns = self.shared.started.elapsed().as_nanos() as u64;
                self.shared.stats[0]
                    .first_run_at_ns
                    .store(ns, Ordering::Relaxed);
                first = false;
            }
            // A kick that arrived before this thread first published its
            // kvm_run (or between two runs) set no immediate_exit: look at
            // the queue itself before entering the guest.
            if !self.commands.is_empty() {
                if let Next::Stop = self.on_kick() {
                    break;
                }
            }
            if !self.stepping_over
                && self.shared.traps.hw_generation() != self.applied_hw_generation
            {
                if let Err(e) = self.apply_debug_registers(None) {
                    if let Next::Stop = self.fail(format!("cannot set debug registers: {e}")) {
                        break;
                    }
                }
            }
            let entered = std::time::Instant::now();
            if let Some(left) = self.left_guest_at.take() {
                let ns = entered.duration_since(left).as_nanos() as u64;
                self.shared.stats[self.id as usize]
                    .in_vmm_ns
                    .fetch_add(ns, Ordering::Relaxed);
            }
            let ran = self.fd.run();
            let left = std::time::Instant::now();
            // KVM applied (and cleared) a dirty copy of the registers
            // first thing, and stored this exit's over it.
            self.exit_regs_fresh = self.shared.sync_gprs;
            self.left_guest_at = Some(left);
            let stats = &self.shared.stats[self.id as usize];
            stats.exits.fetch_add(1, Ordering::Relaxed);
            stats.in_guest_ns.fetch_add(
                left.duration_since(entered).as_nanos() as u64,
                Ordering::Relaxed,
            );
            let next = match ran {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => to_bus(
                        &self.shared,
                        self.id,
                        |s| &s.pio_exits,
                        |b| b.write(port, data),
                    ),
                    VcpuExit::IoIn(port, data) => to_bus(
                        &self.shared,
                        self.id,
                        |s| &s.pio_exits,
                        |b| b.read(port, data),
                    ),
                    VcpuExit::MmioRead(gpa, data) => to_bus(
                        &self.shared,
                        self.id,
                        |s| &s.mmio_exits,
                        |b| b.mmio_read(gpa, data),
                    ),
                    VcpuExit::MmioWrite(gpa, data) => {
                        let ram = &self.shared.ram;
                        to_bus(
                            &self.shared,
                            self.id,
                            |s| &s.mmio_exits,
                            |b| b.mmio_write(gpa, data, ram),
                        )
                    }
                    VcpuExit::Hlt | VcpuExit::IrqWindowOpen => Next::Run,
                    VcpuExit::Shutdown => {
                        let _ = self.events.send(VcpuEvent::Reset(self.id));
                        Next::Stop
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        let ev = if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                            VcpuEvent::PowerOff(self.id)
                        } else {
                            VcpuEvent::Reset(self.id)
                        };
                        let _ = self.events.send(ev);
                        Next::Stop
                    }
                    VcpuExit::InternalError => self.on_internal_error(),
                    VcpuExit::Debug(arch) => {
                        let (exception, pc) = (arch.exception, arch.pc);
                        self.on_debug_exit(exception, pc)
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        let what = format!("KVM_RUN failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})");
                        self.fail(what)
                    }
                    other => {
                        let what = format!("unexpected KVM exit {other:?}");
                        self.fail(what)
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.on_kick()
                }
                Err(e) => self.fail(format!("KVM_RUN: {e}")),
            };
            if let Next::Stop = next {
                break;
            }
            if self.id == 0 && self.shared.kind == KvmKind::Pvm {
                if !self.shared.pvm_trap_ready.load(Ordering::Relaxed) {
                    self.try_plant_page_fault_trap();
                } else if !self.copy_site_searched && self.user_space_reached() {
                    self.copy_site_searched = true;
                    self.try_plant_copy_trap();
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        let _ = self.events.send(VcpuEvent::Finished(self.id));
        self.fd
    }

    fn fail(&mut self, msg: String) -> Next {
        let _ = self.events.send(VcpuEvent::Failed(self.id, msg));
        // Stay alive and paused so the VMM can still read state and shut down cleanly.
        self.paused_loop()
    }

    /// Drains commands after a kick.
    fn on_kick(&mut self) -> Next {
        // A command reads and writes registers by ioctl: it must see the
        // registers the last exit's handler wrote.
        if let Err(e) = self.flush_pending_regs() {
            return self.fail(format!("cannot write the vCPU registers: {e}"));
        }
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                VcpuCommand::Pause => {
                    if let Next::Stop = self.paused_loop() {
                        return Next::Stop;
                    }
                }
                VcpuCommand::Resume => {}
                VcpuCommand::Exec(f) => {
                    self.exit_regs_fresh = false;
                    f(&mut self.fd)
                }
                VcpuCommand::Finish => return Next::Stop,
            }
        }
        Next::Run
    }

    /// Parks the vCPU until resumed or finished, serving `Exec` requests.
    fn paused_loop(&mut self) -> Next {
        // Tell the guest's kvmclock the vCPU was stopped by the host, so its
        // soft-lockup watchdog does not fire; not every KVM kind supports it.
        let _ = self.fd.kvmclock_ctrl();
        let _ = self.paused_acks.send(self.id);
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Resume) => return Next::Run,
                Ok(VcpuCommand::Pause) => {
                    let _ = self.paused_acks.send(self.id);
                }
                Ok(VcpuCommand::Exec(f)) => {
                    // It may set registers: kvm_run's copy is no longer theirs.
                    self.exit_regs_fresh = false;
                    if let Err(e) = self.flush_pending_regs() {
                        log::error!("vCPU {}: cannot write its registers: {e}", self.id);
                    }
                    f(&mut self.fd)
                }
                Ok(VcpuCommand::Finish) | Err(_) => return Next::Stop,
            }
        }
    }

    /// PVM: an emulation failure is either a breakpoint (ours or the
    /// guest's), an instruction we can skip, or a fatal error.
    fn on_internal_error(&mut self) -> Next {
        // Registers are read once here and handed to whatever handles the
        // exit (this path carries every failed syscall on PVM KVM).
        let Ok(regs) = self.exit_regs() else {
            return self.fail("KVM internal error and the vCPU registers cannot be read".into());
        };
        let rip = regs.rip;
        // One of our int3s, found by its address and checked at its
        // physical byte: no page walk, so no special registers needed.
        if self.planted_int3_at(rip) {
            return self.on_breakpoint(rip, Some(regs));
        }
        let at = match self.read_sregs() {
            Ok(sregs) => pvm::Stopped { regs, sregs },
            Err(e) => {
                return self.fail(format!(
                    "KVM internal error at {rip:#x} and KVM_GET_SREGS failed: {e}"
                ))
            }
        };
        let bytes = pvm::instruction_bytes(&self.shared.ram, &at);
        if bytes.first() == Some(&INT3) {
            return self.on_breakpoint(rip, Some(regs));
        }
        if let Some(len) = pvm::skippable_instruction(&bytes) {
            self.shared.stats[self.id as usize]
                .skipped_instructions
                .fetch_add(1, Ordering::Relaxed);
            return self.advance_rip(len);
        }
        match pvm::emulate_mxcsr_access(&self.fd, &self.shared.ram, &bytes, &at) {
            Ok(true) => {
                self.shared.stats[self.id as usize]
                    .skipped_instructions
                    .fetch_add(1, Ordering::Relaxed);
                return Next::Run;
            }
            Ok(false) => {}
            Err(e) => {
                return self.fail(format!(
                    "cannot perform {} for the guest at {rip:#x}: {e}",
                    pvm::describe_instruction(rip, &bytes)
                ))
            }
        }
        match pvm_xsave::emulate(&self.fd, &self.shared.ram, &bytes, &at) {
            Ok(XsaveOutcome::NotXsave) => {}
            Ok(XsaveOutcome::Done | XsaveOutcome::Faulted) => {
                self.shared.stats[self.id as usize]
                    .xsave_emulations
                    .fetch_add(1, Ordering::Relaxed);
                return Next::Run;
            }
            Err(e) => {
                return self.fail(format!(
                    "cannot perform {} for the guest at {rip:#x}: {e}",
                    pvm::describe_instruction(rip, &bytes)
                ))
            }
        }
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the one KVM filled.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let insn = pvm::describe_instruction(rip, &bytes);
        self.fail(format!(
            "guest instruction cannot be emulated by {}: rip={rip:#x} bytes={} ({insn}), KVM internal error suberror {suberror}",
            self.shared.kind.name(),
            hex(&bytes)
        ))
    }

    /// Loads the trap table's debug-register breakpoints into this vCPU
    /// (`KVM_SET_GUEST_DEBUG`), keeping software breakpoints on hardware KVM.
    /// With `step_over`, that breakpoint is left out and the vCPU
    /// single-steps one instruction instead (with interrupts held off where
    /// KVM can do that), so the instruction under it runs exactly once.
    fn apply_debug_registers(&mut self, step_over: Option<u64>) -> Result<(), kvm_ioctls::Error> {
        // KVM_SET_GUEST_DEBUG takes the single-step's RIP and sets TF in
        // the RFLAGS it finds now: registers a trap handler left in
        // kvm_run (a thread sent into a kernel function) must be in place
        // first, or the step is armed at the old RIP and never taken (the
        // breakpoint then stays off on this vCPU).
        self.flush_pending_regs()?;
        let generation = self.shared.traps.hw_generation();
        let mut dbg = kvm_bindings::kvm_guest_debug::default();
        let mut control = 0;
        if self.shared.kind == KvmKind::Hardware {
            control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP;
        }
        if step_over.is_some() {
            control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        }
        let mut dr7 = 0u64;
        for (i, va) in self.shared.traps.hw_breakpoints().iter().enumerate() {
            if let Some(va) = va.filter(|va| Some(*va) != step_over) {
                dbg.arch.debugreg[i] = va;
                // Ln (local enable); R/W and LEN 00: instruction execution.
                dr7 |= 1 << (2 * i);
            }
        }
        if dr7 != 0 {
            control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = dr7;
        }
        dbg.control = control;
        if step_over.is_some() && self.block_irq != Some(false) {
            let mut blocked = dbg;
            blocked.control |= kvm_bindings::KVM_GUESTDBG_BLOCKIRQ;
            match self.fd.set_guest_debug(&blocked) {
                Ok(()) => {
                    self.block_irq = Some(true);
                    self.applied_hw_generation = generation;
                    return Ok(());
                }
                Err(e) if e.errno() == libc::EINVAL && self.block_irq.is_none() => {
                    log::debug!("KVM_GUESTDBG_BLOCKIRQ not supported; stepping with interrupts");
                    self.block_irq = Some(false);
                }
                Err(e) => return Err(e),
            }
        }
        self.fd.set_guest_debug(&dbg)?;
        self.applied_hw_generation = generation;
        Ok(())
    }

    /// `KVM_EXIT_DEBUG`: `#BP` (3) is a software breakpoint (hardware KVM);
    /// `#DB` (1) at one of our debug-register addresses is a tracer trap;
    /// anything else is unexpected.
    fn on_debug_exit(&mut self, exception: u32, pc: u64) -> Next {
        if exception == 3 {
            return self.on_breakpoint(pc, None);
        }
        if exception == 1 && self.stepping_over {
            // The instruction under the breakpoint has run: re-arm.
            self.count_tracer_trap_exit();
            self.stepping_over = false;
            return match self.apply_debug_registers(None) {
                Ok(()) => Next::Run,
                Err(e) => self.fail(format!("cannot re-arm debug registers: {e}")),
            };
        }
        if exception == 1 {
            if let Some(handler) = self.shared.traps.hw_handler(pc) {
                if let Err(e) =
                    self.call_trap_handler(handler.as_ref(), pc, TrapHit::DebugRegister, None)
                {
                    return self.fail(format!("tracer trap at {pc:#x}: {e}"));
                }
                // Step over the instruction with this vCPU's breakpoint off
                // (RFLAGS.RF is not honoured for emulated ring-0 code on PVM
                // KVM); the other vCPUs keep theirs, so none can miss it.
                self.stepping_over = true;
                return match self.apply_debug_registers(Some(pc)) {
                    Ok(()) => Next::Run,
                    Err(e) => self.fail(format!("cannot step over a debug-register trap: {e}")),
                };
            }
        }
        self.fail(format!(
            "unexpected debug exit: exception {exception} at {pc:#x}"
        ))
    }

    /// Whether `rip` holds an `int3` this VMM planted: an address in the
    /// trap table whose byte, read at the trap's physical address, is still
    /// `int3` (kernel text is mapped alike in every address space).
    fn planted_int3_at(&self, rip: u64) -> bool {
        let Breakpoint::Ours(trap) = self.shared.traps.classify(rip) else {
            return false;
        };
        let mut byte = [0u8];
        self.shared.ram.read(trap.pa, &mut byte).is_ok() && byte[0] == INT3
    }

    /// An `int3` at `rip`, with the general registers if the exit already
    /// read them.
    fn on_breakpoint(&mut self, rip: u64, regs: Option<kvm_bindings::kvm_regs>) -> Next {
        match self.shared.traps.classify(rip) {
            Breakpoint::Ours(trap) => match trap.owner {
                TrapOwner::PvmPageFaultEntry => {
                    let at = match regs.map_or_else(|| self.exit_regs(), Ok).and_then(|regs| {
                        Ok(pvm::Stopped {
                            regs,
                            sregs: self.read_sregs()?,
                        })
                    }) {
                        Ok(at) => at,
                        Err(e) => {
                            return self.fail(format!("PVM page-fault trap at {rip:#x}: {e}"))
                        }
                    };
                    match pvm::handle_page_fault_entry(
                        &self.fd,
                        &self.shared.ram,
                        &mut self.msrs,
                        &at,
                    ) {
                        Ok(PageFaultOutcome::SyscallCompleted) => {
                            self.shared.stats[self.id as usize]
                                .syscall_fixups
                                .fetch_add(1, Ordering::Relaxed);
                            Next::Run
                        }
                        Ok(PageFaultOutcome::GenuineFault) => {
                            self.shared.stats[self.id as usize]
                                .page_faults
                                .fetch_add(1, Ordering::Relaxed);
                            Next::Run
                        }
                        Err(e) => self.fail(format!("PVM page-fault trap at {rip:#x}: {e}")),
                    }
                }
                TrapOwner::PvmStringCopy => self.on_string_copy(trap.va, regs),
                TrapOwner::Tracer(ref handler) => {
                    let hit = TrapHit::Int3 {
                        original: trap.original,
                    };
                    match self.call_trap_handler(handler.as_ref(), trap.va, hit, regs) {
                        Ok(()) => Next::Run,
                        Err(e) => self.fail(format!("tracer trap at {:#x}: {e}", trap.va)),
                    }
                }
            },
            Breakpoint::GuestOwned => {
                log::debug!(
                    "vCPU {}: the guest's own int3 at {rip:#x}, re-injected",
                    self.id
                );
                self.shared.stats[self.id as usize]
                    .guest_breakpoints
                    .fetch_add(1, Ordering::Relaxed);
                self.reinject_breakpoint()
            }
        }
    }

    fn count_tracer_trap_exit(&self) {
        self.shared.stats[self.id as usize]
            .tracer_trap_exits
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The general registers of the exit this vCPU just took: from
    /// `kvm_run`'s copy when it is this exit's and unread (no ioctl: each
    /// register ioctl is a `vcpu_load`, several MSR reads on PVM KVM),
    /// else by `KVM_GET_REGS`. The copy is taken once: after it the VMM may
    /// have set registers.
    fn exit_regs(&mut self) -> Result<kvm_bindings::kvm_regs, kvm_ioctls::Error> {
        if std::mem::take(&mut self.exit_regs_fresh) || self.dirty_regs_unapplied() {
            // This exit's registers, or the ones written for the next run.
            return Ok(self.fd.sync_regs().regs);
        }
        self.fd.get_regs()
    }

    /// Writes the general registers for the next `KVM_RUN`: into
    /// `kvm_run`'s copy, marked dirty, where KVM has one (KVM applies it
    /// with the vCPU already loaded: no `vcpu_load`, whose MSR reads are
    /// most of a register ioctl on PVM KVM), else by `KVM_SET_REGS`.
    /// Anything else that touches registers before that run goes through
    /// [`VcpuThread::flush_pending_regs`] first.
    fn write_regs(&mut self, regs: &kvm_bindings::kvm_regs) -> Result<(), kvm_ioctls::Error> {
        if !self.shared.sync_gprs {
            return self.fd.set_regs(regs);
        }
        self.fd.sync_regs_mut().regs = *regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.exit_regs_fresh = false;
        Ok(())
    }

    /// Applies registers [`VcpuThread::write_regs`] left in `kvm_run` now,
    /// by `KVM_SET_REGS`, so that an ioctl reads them and the next
    /// `KVM_RUN` does not apply them over a later write.
    fn flush_pending_regs(&mut self) -> Result<(), kvm_ioctls::Error> {
        if !self.dirty_regs_unapplied() {
            return Ok(());
        }
        let regs = self.fd.sync_regs().regs;
        self.fd.clear_sync_dirty_reg(SyncReg::Register);
        self.fd.set_regs(&regs)
    }

    /// Sets all general registers now, by `KVM_SET_REGS`, for an exception
    /// about to be injected: KVM_SET_REGS drops a pending exception, so a
    /// copy left in `kvm_run` must not be applied after the event. `regs`
    /// replaces that copy (callers take it from [`VcpuThread::exit_regs`],
    /// which returns it), so it is discarded rather than applied first.
    fn set_regs_before_event(
        &mut self,
        regs: &kvm_bindings::kvm_regs,
    ) -> Result<(), kvm_ioctls::Error> {
        self.fd.clear_sync_dirty_reg(SyncReg::Register);
        self.fd.set_regs(regs)
    }

    /// Whether `kvm_run` carries general registers for KVM to apply.
    fn dirty_regs_unapplied(&mut self) -> bool {
        let run: &kvm_run = self.fd.get_kvm_run();
        run.kvm_dirty_regs & SyncReg::Register as u64 != 0
    }

    /// The special registers, by `KVM_GET_SREGS` (never from `kvm_run`'s
    /// copy: see docs/limitations.md, "A race not understood").
    fn read_sregs(&self) -> Result<kvm_bindings::kvm_sregs, kvm_ioctls::Error> {
        self.fd.get_sregs()
    }

    /// Calls a tracer's handler with this vCPU's general registers read
    /// once (the special ones only if the handler asks), and writes the
    /// registers back only if the handler changed them.
    fn call_trap_handler(
        &mut self,
        handler: &dyn TrapHandler,
        va: u64,
        hit: TrapHit,
        regs: Option<kvm_bindings::kvm_regs>,
    ) -> Result<(), kvm_ioctls::Error> {
        self.count_tracer_trap_exit();
        let regs = match regs {
            Some(regs) => regs,
            None => self.exit_regs()?,
        };
        let this = &*self;
        let mut read = || {
            this.shared.stats[this.id as usize]
                .tracer_sregs_reads
                .fetch_add(1, Ordering::Relaxed);
            this.read_sregs()
                .map(|s| GuestSregs::from(&s))
                .map_err(|e| format!("KVM_GET_SREGS: {e}"))
        };
        let mut ctx =
            TrapContext::with_lazy_sregs(this.id, (&regs).into(), &this.shared.ram, &mut read);
        handler.on_trap(&mut ctx, va, hit);
        let changed = ctx.changed_regs().copied();
        match changed {
            Some(changed) => self.write_regs(&(&changed).into()),
            None => Ok(()),
        }
    }

    /// Delivers a guest-owned `int3` to the guest as the CPU would: #BP
    /// through the guest's IDT with the return address past the `int3`.
    ///
    /// Hardware KVM takes a #BP queued from user space as a *soft*
    /// exception with RIP still at the `int3` (KVM_EXIT_DEBUG leaves it
    /// there) and moves past the instruction itself: VMX from the exit's
    /// instruction length, SVM by decoding it when the CPU has no NRIP save.
    /// Moving RIP here too made the guest's handler see a return address
    /// one byte late (found by the nested-SVM lane: the kernel's own int3
    /// self-test failed). PVM's emulation-failure exit injects it as a
    /// plain exception, so RIP is moved past the `int3` first.
    fn reinject_breakpoint(&mut self) -> Next {
        let advance_rip = self.shared.kind != KvmKind::Hardware;
        let result = (|| -> Result<(), kvm_ioctls::Error> {
            if advance_rip {
                let mut regs = self.exit_regs()?;
                regs.rip += 1;
                self.set_regs_before_event(&regs)?;
            }
            let mut events = self.fd.get_vcpu_events()?;
            events.exception.injected = 1;
            events.exception.nr = 3;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            self.fd.set_vcpu_events(&events)
        })();
        match result {
            Ok(()) => Next::Run,
            Err(e) => self.fail(format!("cannot re-inject the guest's breakpoint: {e}")),
        }
    }

    fn advance_rip(&mut self, len: u64) -> Next {
        let result = self.exit_regs().and_then(|mut r| {
            r.rip += len;
            self.write_regs(&r)
        });
        match result {
            Ok(()) => Next::Run,
            Err(e) => self.fail(format!("cannot advance RIP: {e}")),
        }
    }

    /// Whether a system call has come from the guest's user space: the
    /// kernel has then freed its init code (it does so before it runs
    /// init) and applied its alternatives, so its text is final.
    fn user_space_reached(&self) -> bool {
        self.shared
            .stats
            .iter()
            .any(|s| s.syscall_fixups.load(Ordering::Relaxed) > 0)
    }

    /// PVM: plants traps on the `rep movsb` of the kernel's user copies,
    /// unless `HVTRACE_PVM_GUEST_COPIES=1` leaves the copies to the guest.
    fn try_plant_copy_trap(&mut self) {
        if std::env::var_os("HVTRACE_PVM_GUEST_COPIES").is_some_and(|v| v == "1") {
            return;
        }
        let Ok(sregs) = self.fd.get_sregs() else {
            return;
        };
        let started = Instant::now();
        match pvm_copy::find_copy_sites(&self.shared.ram, pvm::address_space(&sregs)) {
            Ok(sites) => {
                for (va, pa) in sites {
                    let owner = TrapOwner::PvmStringCopy;
                    match self.shared.traps.plant(&self.shared.ram, va, pa, owner) {
                        Ok(()) => log::debug!(
                            "PVM user-copy trap planted at {va:#x} (search: {:?})",
                            started.elapsed()
                        ),
                        Err(e) => log::warn!("cannot plant a PVM user-copy trap: {e}"),
                    }
                }
            }
            Err(why) => log::info!("PVM user copies left to the guest: {why}"),
        }
    }

    /// PVM: performs the kernel's user-copy `rep movsb` at `va`
    /// ([`crate::trap::pvm_copy`]).
    fn on_string_copy(&mut self, va: u64, regs: Option<kvm_bindings::kvm_regs>) -> Next {
        let result = (|| -> Result<Option<&'static str>, kvm_ioctls::Error> {
            let mut regs = match regs {
                Some(regs) => regs,
                None => self.exit_regs()?,
            };
            let sregs = self.read_sregs()?;
            let before = regs.rcx;
            let outcome =
                pvm_copy::perform(&self.shared.ram, pvm::address_space(&sregs), &mut regs);
            let stats = &self.shared.stats[self.id as usize];
            stats.kernel_copies.fetch_add(1, Ordering::Relaxed);
            stats
                .kernel_copy_bytes
                .fetch_add(before - regs.rcx, Ordering::Relaxed);
            if let CopyOutcome::Fault(_) = outcome {
                stats.kernel_copy_faults.fetch_add(1, Ordering::Relaxed);
            }
            match outcome {
                CopyOutcome::Done | CopyOutcome::More => {
                    self.write_regs(&regs)?;
                    Ok(None)
                }
                CopyOutcome::Fault(f) => {
                    self.set_regs_before_event(&regs)?;
                    pvm::inject(&self.fd, pvm::PAGE_FAULT, f.error_code, Some(f.address))?;
                    Ok(None)
                }
                CopyOutcome::Unsupported(why) => {
                    self.write_regs(&regs)?;
                    Ok(Some(why))
                }
            }
        })();
        match result {
            Ok(None) => Next::Run,
            Ok(Some(why)) => {
                log::warn!("PVM user copies left to the guest from now on: {why}");
                match self.shared.traps.remove(&self.shared.ram, va) {
                    Ok(_) => Next::Run,
                    Err(e) => self.fail(format!("cannot remove the user-copy trap: {e}")),
                }
            }
            Err(e) => self.fail(format!("PVM user copy at {va:#x}: {e}")),
        }
    }

    /// PVM: plants the syscall fix-up trap as soon as the kernel's own IDT
    /// page-fault entry is in place (checked at most every 20 ms).
    fn try_plant_page_fault_trap(&mut self) {
        if self
            .last_entry_check
            .is_some_and(|t| t.elapsed() < Duration::from_millis(20))
        {
            return;
        }
        self.last_entry_check = Some(Instant::now());
        let Ok(sregs) = self.fd.get_sregs() else {
            return;
        };
        match pvm::find_page_fault_entry(&self.shared.ram, &sregs) {
            EntrySearch::Found(entry) => {
                match self.shared.traps.plant(
                    &self.shared.ram,
                    entry.va,
                    entry.pa,
                    TrapOwner::PvmPageFaultEntry,
                ) {
                    Ok(()) => {
                        log::debug!("PVM syscall fix-up trap planted at {:#x}", entry.va);
                        self.shared.pvm_trap_ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => log::warn!("cannot plant the PVM page-fault trap: {e}"),
                }
            }
            EntrySearch::NotYet => {}
            EntrySearch::Unrecognised(what) => {
                if !self.entry_unrecognised_reported {
                    log::warn!("PVM syscall fix-up not planted: {what}");
                    self.entry_unrecognised_reported = true;
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
