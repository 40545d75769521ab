//! A task's saved user-mode registers: the `struct pt_regs` at the top of
//! its kernel stack, with one typed layout resolved from BTF once and one
//! finder shared by `ps`/`inspect` and the tracer's trap handlers.
//!
//! Registers are named by [`Reg`], an index, never by string on a hot
//! path. The layout comes from the kernel's types, which for a restored
//! snapshot were themselves recovered from guest memory: it is untrusted,
//! so [`PtRegsLayout::new`] checks that every register lies inside the
//! structure and that the structure fits a kernel stack.

use std::sync::OnceLock;

use crate::btf::KernelTypes;
use crate::error::{IntrospectError, Result};
use crate::kernel::RunningKernel;
use crate::memory::PhysMemory;

/// A `struct pt_regs` register, in the structure's own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // the pt_regs member names are their documentation
pub enum Reg {
    R15,
    R14,
    R13,
    R12,
    Bp,
    Bx,
    R11,
    R10,
    R9,
    R8,
    Ax,
    Cx,
    Dx,
    Si,
    Di,
    OrigAx,
    Ip,
    Cs,
    Flags,
    Sp,
    Ss,
}

/// How many registers `pt_regs` holds.
pub const REG_COUNT: usize = 21;

impl Reg {
    /// Every register, in [`Reg::NAMES`] order.
    pub const ALL: [Reg; REG_COUNT] = [
        Reg::R15,
        Reg::R14,
        Reg::R13,
        Reg::R12,
        Reg::Bp,
        Reg::Bx,
        Reg::R11,
        Reg::R10,
        Reg::R9,
        Reg::R8,
        Reg::Ax,
        Reg::Cx,
        Reg::Dx,
        Reg::Si,
        Reg::Di,
        Reg::OrigAx,
        Reg::Ip,
        Reg::Cs,
        Reg::Flags,
        Reg::Sp,
        Reg::Ss,
    ];

    /// Member names, as `struct pt_regs` spells them.
    pub const NAMES: [&'static str; REG_COUNT] = [
        "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si",
        "di", "orig_ax", "ip", "cs", "flags", "sp", "ss",
    ];

    /// The six system-call argument registers, in argument order.
    pub const SYSCALL_ARGS: [Reg; 6] = [Reg::Di, Reg::Si, Reg::Dx, Reg::R10, Reg::R8, Reg::R9];

    /// Its `pt_regs` member name.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The register whose member name is `name`.
    pub fn from_name(name: &str) -> Option<Reg> {
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| Self::ALL[i])
    }
}

/// Kernel stack sizes (`THREAD_SIZE`) x86-64 configs use: 16 KiB, and
/// 32 KiB with KASAN.
const THREAD_SIZES: [u64; 2] = [16 << 10, 32 << 10];
/// Room a config may leave above `pt_regs` (16 bytes with FRED).
const TOP_PADDINGS: [u64; 2] = [0, 16];

/// Where each register lies in `struct pt_regs`, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtRegsLayout {
    offsets: [u64; REG_COUNT],
    size: u64,
}

impl PtRegsLayout {
    /// A layout from member offsets (in [`Reg::ALL`] order) and the size,
    /// refused unless every 8-byte register lies inside the structure and
    /// the structure fits the smallest kernel stack.
    pub fn new(offsets: [u64; REG_COUNT], size: u64) -> Result<Self> {
        if size == 0 || size > THREAD_SIZES[0] - TOP_PADDINGS[1] {
            return Err(IntrospectError::Corrupt(format!(
                "struct pt_regs of {size} bytes does not fit a kernel stack"
            )));
        }
        for (r, off) in Reg::ALL.iter().zip(offsets) {
            if off.checked_add(8).is_none_or(|end| end > size) {
                return Err(IntrospectError::Corrupt(format!(
                    "pt_regs.{} at offset {off} lies outside its {size} bytes",
                    r.name()
                )));
            }
        }
        Ok(Self { offsets, size })
    }

    /// The layout of the kernel whose types are `types`.
    pub fn resolve(types: &KernelTypes) -> Result<Self> {
        let mut offsets = [0u64; REG_COUNT];
        for (o, n) in offsets.iter_mut().zip(Reg::NAMES) {
            *o = types.member("pt_regs", n)?.offset;
        }
        Self::new(offsets, types.struct_size("pt_regs")?)
    }

    /// `sizeof(struct pt_regs)`.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where `reg` lies in the structure.
    pub fn offset(&self, reg: Reg) -> u64 {
        self.offsets[reg as usize]
    }

    /// The registers in `raw`, a `pt_regs` read from `addr`.
    pub fn decode(&self, addr: u64, raw: &[u8]) -> UserRegs {
        let mut values = [0u64; REG_COUNT];
        for (v, off) in values.iter_mut().zip(self.offsets) {
            let at = off as usize;
            *v = raw
                .get(at..at + 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        }
        UserRegs { addr, values }
    }
}

/// Saved user-mode registers (`struct pt_regs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRegs {
    /// Where the `pt_regs` lies.
    pub addr: u64,
    /// Values in [`Reg::ALL`] order.
    pub values: [u64; REG_COUNT],
}

impl UserRegs {
    /// The value of `reg`.
    pub fn get(&self, reg: Reg) -> u64 {
        self.values[reg as usize]
    }

    /// The system-call number the entry saved (`orig_ax`: -1 outside a
    /// call).
    pub fn syscall_nr(&self) -> u64 {
        self.get(Reg::OrigAx)
    }

    /// The six system-call arguments (di, si, dx, r10, r8, r9).
    pub fn syscall_args(&self) -> [u64; 6] {
        Reg::SYSCALL_ARGS.map(|r| self.get(r))
    }

    /// The system call this task entered, if it is in one: number and the
    /// six arguments.
    pub fn syscall(&self) -> Option<(u64, [u64; 6])> {
        let nr = self.syscall_nr();
        (nr as i64 != -1).then(|| (nr, self.syscall_args()))
    }

    /// Whether the saved selectors are user mode's (`__USER_CS` or
    /// `__USER32_CS`, and `__USER_DS`, with RPL 3).
    pub fn is_user_mode(&self) -> bool {
        matches!(self.get(Reg::Cs) & 0xffff, 0x33 | 0x23) && self.get(Reg::Ss) & 0xffff == 0x2b
    }
}

/// Finds the user-mode `pt_regs` of tasks: the stack size and the padding
/// above `pt_regs` differ by config, so the first search tries each and
/// keeps the one holding user-mode selectors; later reads go straight to
/// it (one read per call, at the same distance from `task->stack`).
#[derive(Debug)]
pub struct UserRegsFinder {
    layout: PtRegsLayout,
    /// `task->stack` to its `pt_regs`, once found.
    delta: OnceLock<u64>,
}

impl UserRegsFinder {
    /// A finder for `layout`.
    pub fn new(layout: PtRegsLayout) -> Self {
        Self {
            layout,
            delta: OnceLock::new(),
        }
    }

    /// The layout it reads with.
    pub fn layout(&self) -> &PtRegsLayout {
        &self.layout
    }

    /// The user registers saved at the top of the kernel stack whose base
    /// is `stack` (`task_struct.stack`).
    pub fn read<M: PhysMemory + ?Sized>(
        &self,
        k: &RunningKernel<'_, M>,
        stack: u64,
    ) -> Result<UserRegs> {
        let size = self.layout.size;
        let read_at = |addr: u64| -> Result<UserRegs> {
            let mut raw = vec![0u8; size as usize];
            k.read(addr, &mut raw, "pt_regs")?;
            Ok(self.layout.decode(addr, &raw))
        };
        if let Some(delta) = self.delta.get() {
            return read_at(stack.wrapping_add(*delta));
        }
        for thread_size in THREAD_SIZES {
            for pad in TOP_PADDINGS {
                let delta = thread_size - pad - size;
                let Ok(r) = read_at(stack.wrapping_add(delta)) else {
                    continue;
                };
                if r.is_user_mode() {
                    let _ = self.delta.set(delta);
                    return Ok(r);
                }
            }
        }
        Err(IntrospectError::Corrupt(format!(
            "no user-mode pt_regs at the top of the kernel stack {stack:#x}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed() -> [u64; REG_COUNT] {
        std::array::from_fn(|i| 8 * i as u64)
    }

    #[test]
    fn names_and_indices_agree() {
        for (i, r) in Reg::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Reg::from_name(r.name()), Some(*r));
        }
        assert_eq!(Reg::from_name("eax"), None);
    }

    #[test]
    fn a_layout_that_does_not_fit_is_refused() {
        assert!(PtRegsLayout::new(packed(), 168).is_ok());
        assert!(PtRegsLayout::new(packed(), 160).is_err(), "ss past the end");
        assert!(PtRegsLayout::new(packed(), 0).is_err());
        assert!(
            PtRegsLayout::new(packed(), 1 << 20).is_err(),
            "larger than a stack"
        );
        let mut wild = packed();
        wild[3] = u64::MAX - 4;
        assert!(PtRegsLayout::new(wild, 168).is_err(), "offset overflows");
    }

    #[test]
    fn decode_reads_each_register_at_its_offset() {
        let l = PtRegsLayout::new(packed(), 168).unwrap();
        let raw: Vec<u8> = (0..21u64).flat_map(|i| (100 + i).to_le_bytes()).collect();
        let r = l.decode(0x1000, &raw);
        assert_eq!(r.get(Reg::R15), 100);
        assert_eq!(r.get(Reg::OrigAx), 115);
        assert_eq!(r.syscall_args(), [114, 113, 112, 107, 109, 108]);
        assert!(!r.is_user_mode());
    }
}
