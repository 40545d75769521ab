//! Kernel stacks of guest tasks and vCPUs, as the guest's own
//! `echo t > /proc/sysrq-trigger` would print them.
//!
//! The unwinder is a scan, the kernel's own fallback (`show_trace_log_lvl`
//! prints every word of the stack that is a kernel text address): each
//! 8-byte word between the stack pointer and the stack's top that points
//! into kernel text *just after a call instruction* is taken as a return
//! address. The call check drops most stale values (a data pointer into
//! text is rarely preceded by a call), so the trace reads like the
//! kernel's reliable one; a stale return address left by an earlier, deeper
//! call can still appear, as it does in the kernel's `?` lines. ORC tables
//! would make it exact on kernels that carry them; the scan works on every
//! kernel, with or without frame pointers or ORC.
//!
//! A sleeping task's stack starts at its saved `thread.sp`, where
//! `__switch_to_asm` left an `inactive_task_frame` whose `ret_addr` is the
//! first frame (inside `__schedule`). Everything read is guest data: the
//! stack pointer must lie inside the task's stack, and the walk reads at
//! most one stack's size.

use crate::error::{IntrospectError, Result};
use crate::kernel::RunningKernel;
use crate::memory::PhysMemory;
use crate::tasks::Task;

/// Size of an x86-64 kernel stack without KASAN (`THREAD_SIZE`).
pub const THREAD_SIZE: u64 = 16 << 10;
/// Most frames reported for one stack.
pub const MAX_FRAMES: usize = 64;

/// One frame of a kernel stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// The return (or current instruction) address, runtime.
    pub addr: u64,
    /// `function+0xoff`, when the address is in a known function.
    pub symbol: Option<String>,
}

/// Reads kernel stacks of one running kernel.
pub struct StackReader<'k, 'a, M: PhysMemory + ?Sized> {
    k: &'k RunningKernel<'a, M>,
    text: (u64, u64),
}

impl<'k, 'a, M: PhysMemory + ?Sized> StackReader<'k, 'a, M> {
    /// A reader for `k` (needs `_stext`/`_etext`, or `_text`).
    pub fn new(k: &'k RunningKernel<'a, M>) -> Result<Self> {
        let start = k.symbol("_stext").or_else(|_| k.symbol("_text"))?;
        let end = k.symbol("_etext")?;
        if end <= start {
            return Err(IntrospectError::Corrupt(format!(
                "kernel text {start:#x}..{end:#x} is empty"
            )));
        }
        Ok(Self {
            k,
            text: (start, end),
        })
    }

    /// `function+0xoff` of runtime address `addr`.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let link = addr.wrapping_sub(self.k.placement().virt_offset as u64);
        self.k.symbols().symbolize(link)
    }

    fn in_text(&self, addr: u64) -> bool {
        (self.text.0..self.text.1).contains(&addr)
    }

    /// Whether the bytes before `addr` end with a call instruction
    /// (`call rel32`, or an indirect `call` through a register or memory).
    fn follows_call(&self, addr: u64) -> bool {
        let mut b = [0u8; 7];
        if self
            .k
            .read(addr - 7, &mut b, "code before a return address")
            .is_err()
        {
            return false;
        }
        // call rel32: e8 xx xx xx xx
        if b[2] == 0xe8 {
            return true;
        }
        // call *r/m64: ff /2, with a ModRM of 2 (register), 3 (disp8 or
        // SIB), 6 (disp32 or rip-relative) or 7 (SIB + disp32) bytes.
        let modrm_call = |op: u8, modrm: u8| op == 0xff && (modrm >> 3) & 7 == 2;
        // Two bytes: a register, or memory through a register (mod 0, no
        // SIB and no displacement).
        let two_byte = b[6] >> 6 == 3 || (b[6] >> 6 == 0 && !matches!(b[6] & 7, 4 | 5));
        modrm_call(b[5], b[6]) && two_byte
            || modrm_call(b[4], b[5])
            || modrm_call(b[1], b[2])
            || modrm_call(b[0], b[1])
    }

    /// Return addresses on the stack from `sp` (inclusive) up to `top`
    /// (exclusive), at most [`MAX_FRAMES`], checked as described above.
    pub fn scan(&self, sp: u64, top: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        let sp = sp & !7;
        if top <= sp || top - sp > THREAD_SIZE {
            return frames;
        }
        let mut words = vec![0u8; (top - sp) as usize];
        // A stack is contiguous in kernel virtual memory but may straddle
        // pages that do not translate (a guard page); read page by page.
        let mut off = 0usize;
        while off < words.len() {
            let va = sp + off as u64;
            let n = ((0x1000 - (va & 0xfff)) as usize).min(words.len() - off);
            if self
                .k
                .read(va, &mut words[off..off + n], "kernel stack")
                .is_err()
            {
                words.truncate(off);
                break;
            }
            off += n;
        }
        for w in words.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if self.in_text(v) && self.follows_call(v) {
                frames.push(Frame {
                    addr: v,
                    symbol: self.symbolize(v),
                });
                if frames.len() == MAX_FRAMES {
                    break;
                }
            }
        }
        frames
    }

    /// The stack area (`task->stack`) of `task`: its lowest and one past
    /// its highest address.
    pub fn stack_area(&self, task: &Task) -> Result<(u64, u64)> {
        let base = self.k.field(task.addr, "task_struct", "stack")?;
        if base == 0 || base & 0xfff != 0 {
            return Err(IntrospectError::Corrupt(format!(
                "pid {}'s kernel stack is at {base:#x}",
                task.tid
            )));
        }
        Ok((base, base.wrapping_add(THREAD_SIZE)))
    }

    /// The kernel stack of a task that is not running on a CPU: from its
    /// saved `thread.sp`, with `__switch_to_asm`'s return address first.
    pub fn sleeping_task(&self, task: &Task) -> Result<Vec<Frame>> {
        let (lo, hi) = self.stack_area(task)?;
        let sp = self.k.field(task.addr, "task_struct", "thread.sp")?;
        if !(lo..hi).contains(&sp) {
            return Err(IntrospectError::Corrupt(format!(
                "pid {}'s saved stack pointer {sp:#x} is outside its stack {lo:#x}..{hi:#x}",
                task.tid
            )));
        }
        // inactive_task_frame: callee-saved registers, then ret_addr.
        let frame_size = self
            .k
            .types()
            .struct_size("inactive_task_frame")
            .unwrap_or(7 * 8);
        let ret_off = self
            .k
            .types()
            .member("inactive_task_frame", "ret_addr")
            .map(|m| m.offset)
            .unwrap_or(frame_size - 8);
        let mut frames = Vec::new();
        if let Ok(ret) = self
            .k
            .read_u64(sp + ret_off, "inactive_task_frame.ret_addr")
        {
            if self.in_text(ret) {
                frames.push(Frame {
                    addr: ret,
                    symbol: self.symbolize(ret),
                });
            }
        }
        frames.extend(self.scan(sp + frame_size, hi));
        frames.truncate(MAX_FRAMES);
        Ok(frames)
    }

    /// The kernel stack of a vCPU stopped at `rip`/`rsp` in kernel mode:
    /// the current instruction, then the scan of the 16 KiB-aligned stack
    /// `rsp` is on (the task's, or an interrupt stack).
    pub fn running(&self, rip: u64, rsp: u64) -> Vec<Frame> {
        let mut frames = vec![Frame {
            addr: rip,
            symbol: self.symbolize(rip),
        }];
        let top = (rsp & !(THREAD_SIZE - 1)).wrapping_add(THREAD_SIZE);
        frames.extend(self.scan(rsp, top));
        frames.truncate(MAX_FRAMES);
        frames
    }
}
