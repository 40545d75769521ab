//! The instruction tracer behind `hvtrace trace --steps` and `hvtrace
//! attach --steps`: an engine that single-steps (or block-steps) every
//! thread it is attached to and prints one line per user instruction run
//! (or per block), each with its address, `<symbol+offset>` from the
//! program's own ELF, and its disassembly (AT&T as objdump prints it, or
//! Intel); with a summary, a per-function histogram at the end.
//!
//! Lines come from step reports ([`crate::step`]): a single step's report
//! names the instruction that ran (`from`); a `syscall` instruction is
//! printed at the call's entry report (before the strace engine's line of
//! the call, as engines at a system-call entry run last-attached first);
//! a block step's report names the block's first instruction (the taken
//! branch's target, the instruction after a system call, a handler's
//! first instruction).

pub mod summary;
pub mod symbols;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, IntelFormatter};

use crate::action::ResumeAction;
use crate::context::ThreadContext;
use crate::engine::{Engine, EngineOps};
use crate::event::{EventMask, Tid};
use crate::step::{ends_block, StepCause};
use crate::syscalls::UserMemory;
use summary::Summary;
use symbols::{ProgramSymbols, SymbolSource};

/// The events the steps engine asks for: QUIESCE (step reports), the
/// system-call entry (a `syscall` instruction's line), EXEC (the new
/// program's symbols) and CLONE (children step too, with `-f`).
pub const STEPS_EVENTS: EventMask = EventMask(
    EventMask::QUIESCE.0 | EventMask::SYSCALL_ENTRY.0 | EventMask::EXEC.0 | EventMask::CLONE.0,
);

/// Assembler syntax of the disassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Syntax {
    /// AT&T, as objdump and gdb print by default.
    #[default]
    Att,
    /// Intel.
    Intel,
}

/// What the steps engine prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepsOptions {
    /// One line per block (BLOCKSTEP) instead of per instruction.
    pub blocks: bool,
    /// Keep a per-function histogram ([`Steps::finish`] prints it).
    pub summary: bool,
    /// Disassembly syntax.
    pub syntax: Syntax,
    /// Print no instruction lines (a summary only).
    pub quiet: bool,
    /// One JSON object per line instead of text:
    /// `{"pid":TID,"event":"step","line":"ADDR <sym+off>:\tinsn"}` (the
    /// control socket's form; the client adds `[pid N]`).
    pub json: bool,
}

/// Per-thread state.
#[derive(Default)]
struct ThreadState {
    /// A step of this thread has been reported since its last exec: its
    /// system calls are stepped `syscall` instructions.
    stepping: bool,
}

/// The instruction-tracing engine.
pub struct Steps {
    opts: StepsOptions,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    symbols: Arc<dyn SymbolSource>,
    /// Each process's program symbols (None: unknown).
    programs: Mutex<HashMap<Tid, Option<Arc<ProgramSymbols>>>>,
    threads: Mutex<HashMap<Tid, ThreadState>>,
    summary: Mutex<Summary>,
}

impl Steps {
    /// An engine printing to `out` (shared with other engines' output, so
    /// lines interleave in order), naming functions from `symbols`.
    pub fn new(
        opts: StepsOptions,
        out: Arc<Mutex<Box<dyn Write + Send>>>,
        symbols: Arc<dyn SymbolSource>,
    ) -> Self {
        Self {
            opts,
            out,
            symbols,
            programs: Mutex::new(HashMap::new()),
            threads: Mutex::new(HashMap::new()),
            summary: Mutex::new(Summary::default()),
        }
    }

    /// The resume action this engine votes: how it steps.
    pub fn mode(&self) -> ResumeAction {
        if self.opts.blocks {
            ResumeAction::BlockStep
        } else {
            ResumeAction::SingleStep
        }
    }

    /// Tells the engine which program process `tgid` runs (for one it did
    /// not see exec: `attach --steps`).
    pub fn set_program(&self, tgid: Tid, path: &str) {
        let found = self.symbols.symbols(path);
        lock(&self.programs).insert(tgid, found);
    }

    /// The summary's text (empty without `summary`): the totals and the
    /// per-function histogram, most instructions first.
    pub fn finish(&self) -> String {
        if !self.opts.summary {
            return String::new();
        }
        lock(&self.summary).render(self.opts.blocks)
    }

    /// The totals so far: (instructions, blocks, system calls).
    pub fn totals(&self) -> (u64, u64, u64) {
        lock(&self.summary).totals()
    }

    fn program(&self, tgid: Tid) -> Option<Arc<ProgramSymbols>> {
        lock(&self.programs).get(&tgid).cloned().flatten()
    }

    /// Reads and decodes the user instruction at `ip`: from the thread's
    /// memory, or, where the guest has not paged it in yet, from the
    /// program's file.
    fn decode(&self, thread: &ThreadContext, ip: u64) -> Option<Instruction> {
        let mut bytes = [0u8; 15];
        // The instruction may end before an unmapped page.
        let in_page = ((0x1000 - (ip & 0xfff)) as usize).min(15);
        let n = if thread.read(ip, &mut bytes) {
            15
        } else if thread.read(ip, &mut bytes[..in_page]) {
            in_page
        } else {
            let program = self.program(thread.tgid)?;
            let from_file = program.bytes_at(ip, 15)?;
            bytes[..from_file.len()].copy_from_slice(from_file);
            from_file.len()
        };
        let insn = Decoder::with_ip(64, &bytes[..n], ip, DecoderOptions::NONE).decode();
        (!insn.is_invalid()).then_some(insn)
    }

    /// One instruction line: `ADDR <sym+off>: disassembly`.
    fn line(&self, tgid: Tid, ip: u64, insn: Option<&Instruction>) -> String {
        let mut s = format!("{ip:x}");
        if let Some((name, off)) = self.program(tgid).as_deref().and_then(|p| p.lookup(ip)) {
            s.push_str(&symbolized(name, off));
        }
        s.push_str(":\t");
        match insn {
            Some(i) => {
                let mut text = String::new();
                let mut f: Box<dyn Formatter> = match self.opts.syntax {
                    Syntax::Att => Box::new(GasFormatter::new()),
                    Syntax::Intel => Box::new(IntelFormatter::new()),
                };
                // As objdump prints them: lower-case hex, no leading zeros.
                f.options_mut().set_uppercase_hex(false);
                f.options_mut().set_branch_leading_zeros(false);
                f.format(i, &mut text);
                s.push_str(&text);
                let target = i.near_branch_target();
                if target != 0 {
                    if let Some((name, off)) =
                        self.program(tgid).as_deref().and_then(|p| p.lookup(target))
                    {
                        s.push_str(&symbolized(name, off));
                    }
                }
            }
            None => s.push_str("(unreadable)"),
        }
        s
    }

    /// Prints thread `tid`'s line (`[pid N]` first in text while more
    /// than one thread steps, as strace does).
    fn print(&self, tgid: Tid, tid: Tid, line: &str) {
        if self.opts.quiet {
            return;
        }
        let text = if self.opts.json {
            serde_json::json!({"pid": tid, "event": "step", "line": line}).to_string()
        } else if tid != tgid || lock(&self.threads).len() > 1 {
            format!("[pid {tid}] {line}")
        } else {
            line.to_string()
        };
        let mut out = lock(&self.out);
        let _ = writeln!(out, "{text}");
    }

    /// Counts (and prints) the instruction at `ip`, now run, the thread
    /// being at `next` afterwards (None: not known yet, a `syscall`).
    fn ran(&self, thread: &ThreadContext, ip: u64, next: Option<u64>) {
        let insn = self.decode(thread, ip);
        let function = self.function_of(thread.tgid, ip);
        let ends = match (&insn, next) {
            (Some(i), Some(n)) => ends_block(i, n),
            // A system call ends a block (ptrace reports at its return).
            (Some(_), None) => true,
            (None, _) => false,
        };
        lock(&self.summary).instruction(&function, ends);
        if !self.opts.blocks {
            let line = self.line(thread.tgid, ip, insn.as_ref());
            self.print(thread.tgid, thread.tid, &line);
        }
    }

    /// A block starts at `ip`.
    fn block(&self, thread: &ThreadContext, ip: u64, instructions: u64) {
        let function = self.function_of(thread.tgid, ip);
        lock(&self.summary).block(&function, instructions);
        let insn = self.decode(thread, ip);
        let line = self.line(thread.tgid, ip, insn.as_ref());
        self.print(thread.tgid, thread.tid, &line);
    }

    fn function_of(&self, tgid: Tid, ip: u64) -> String {
        self.program(tgid)
            .as_deref()
            .and_then(|p| p.lookup(ip))
            .map_or_else(|| "??".to_string(), |(name, _)| name.to_string())
    }
}

impl EngineOps for Steps {
    fn report_quiesce(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        _event: EventMask,
    ) -> ResumeAction {
        if let Some(step) = thread.step {
            let first = !std::mem::replace(
                &mut lock(&self.threads).entry(thread.tid).or_default().stepping,
                true,
            );
            if self.opts.blocks {
                // The thread's first report starts its first block too;
                // what ran before it (the execve) is not the program's.
                let ran = if first { 0 } else { step.instructions };
                self.block(thread, step.ip, ran);
            } else if let (StepCause::Instruction, Some(from)) = (step.cause, step.from) {
                self.ran(thread, from, Some(step.ip));
            }
        }
        self.mode()
    }

    fn report_syscall_entry(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        _nr: u64,
        _args: &[u64; 6],
    ) -> ResumeAction {
        let stepping = lock(&self.threads)
            .get(&thread.tid)
            .is_some_and(|t| t.stepping);
        if stepping {
            lock(&self.summary).syscall();
            if self.opts.blocks {
                // The block so far, its `syscall` included.
                if let (Some(n), Some(regs)) = (thread.stepped_instructions, thread.regs()) {
                    let ip = regs.get(guest_introspect::pt_regs::Reg::Ip).wrapping_sub(2);
                    let function = self.function_of(thread.tgid, ip);
                    lock(&self.summary).instructions(&function, n);
                }
            } else {
                // The `syscall` (2 bytes) just before the saved ip.
                if let Some(regs) = thread.regs() {
                    let ip = regs.get(guest_introspect::pt_regs::Reg::Ip).wrapping_sub(2);
                    self.ran(thread, ip, None);
                }
            }
        }
        self.mode()
    }

    fn report_exec(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        filename: &str,
    ) -> ResumeAction {
        self.set_program(thread.tgid, filename);
        // The old program's instructions are over; the new one's start at
        // the execve's return.
        lock(&self.threads).entry(thread.tid).or_default().stepping = false;
        self.mode()
    }

    fn report_clone(
        &self,
        _action: ResumeAction,
        _engine: &Engine,
        thread: &ThreadContext,
        clone_flags: u64,
        child: Tid,
    ) -> ResumeAction {
        const CLONE_THREAD: u64 = 0x10000;
        let program = lock(&self.programs).get(&thread.tgid).cloned();
        if let Some(p) = program {
            let tgid = if clone_flags & CLONE_THREAD != 0 {
                thread.tgid
            } else {
                child
            };
            lock(&self.programs).entry(tgid).or_insert(p);
        }
        self.mode()
    }
}

/// One output shared by several engines (`trace --steps` prints the
/// strace engine's lines and the steps engine's into one stream, in the
/// order they happen): each write goes through the lock.
#[derive(Clone)]
pub struct SharedOut(pub Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedOut {
    /// Shares `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(out)))
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        lock(&self.0).write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// ` <name>` or ` <name+0xoff>`, as objdump names an address.
fn symbolized(name: &str, off: u64) -> String {
    if off == 0 {
        format!(" <{name}>")
    } else {
        format!(" <{name}+{off:#x}>")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
