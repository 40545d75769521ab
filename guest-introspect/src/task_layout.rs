//! Where the fields of a `task_struct` (and of the structs it points to
//! that `ps` shows) lie, resolved from BTF once per kernel and shared by
//! the task decoder and the tracer: no member is looked up by name per
//! task, and a task is read in one piece.

use crate::btf::KernelTypes;
use crate::error::{IntrospectError, Result};
use crate::kernel::RunningKernel;
use crate::memory::PhysMemory;
use crate::pt_regs::PtRegsLayout;

/// One member: where it lies in its struct and how to read it (an
/// unsigned integer of up to 8 bytes, or a bitfield).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    offset: u64,
    size: u64,
    /// For a bitfield: its first bit in the bytes at `offset`, and width.
    bits: Option<(u32, u32)>,
}

impl Field {
    /// An ordinary member of `size` bytes (1 to 8) at `offset`.
    pub const fn at(offset: u64, size: u64) -> Field {
        Field {
            offset,
            size,
            bits: None,
        }
    }

    /// Member `path` of `struct_name`.
    pub fn of(types: &KernelTypes, struct_name: &str, path: &str) -> Result<Field> {
        let m = types.member(struct_name, path)?;
        let bits = (m.bit_size != 0).then(|| ((m.bit_offset - m.offset * 8) as u32, m.bit_size));
        Ok(Field {
            offset: m.offset,
            size: m.size.clamp(1, 8),
            bits,
        })
    }

    /// Its byte offset in the struct.
    pub fn offset(self) -> u64 {
        self.offset
    }

    /// Its size in bytes (1 to 8).
    pub fn size(self) -> u64 {
        self.size
    }

    /// Its value in `raw`, the struct's bytes from offset `start`; None if
    /// `raw` does not hold it.
    pub fn decode(self, raw: &[u8], start: u64) -> Option<u64> {
        let at = usize::try_from(self.offset.checked_sub(start)?).ok()?;
        let bytes = raw.get(at..at.checked_add(self.size as usize)?)?;
        let mut b = [0u8; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        let raw = u64::from_le_bytes(b);
        Some(match self.bits {
            None => raw,
            Some((shift, width)) => (raw >> shift) & (u64::MAX >> (64 - width)),
        })
    }

    /// Reads it from the struct at `base`.
    pub fn read<M: PhysMemory + ?Sized>(
        self,
        k: &RunningKernel<'_, M>,
        base: u64,
        what: &str,
    ) -> Result<u64> {
        let mut raw = [0u8; 8];
        let n = self.size as usize;
        k.read(base.wrapping_add(self.offset), &mut raw[..n], what)?;
        Ok(self.decode(&raw[..n], self.offset).unwrap_or(0))
    }

    fn end(self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

/// The task fields hvtrace reads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each is the task_struct member of its name
pub struct TaskFields {
    pub pid: Field,
    pub tgid: Field,
    /// `__state` (5.14+) or `state`.
    pub state: Field,
    pub exit_state: Field,
    pub flags: Field,
    pub real_parent: Field,
    pub group_leader: Field,
    pub real_cred: Field,
    pub mm: Field,
    pub stack: Field,
    pub signal: Field,
    pub vfork_done: Field,
    /// `thread_info.flags`.
    pub ti_flags: Field,
    /// `thread_info.syscall_work` (5.11+).
    pub syscall_work: Option<Field>,
    /// `worker_private` (the kthread of a kernel thread), when present.
    pub worker_private: Option<Field>,
    /// `comm`: its offset (a 16-byte array).
    pub comm: u64,
}

/// `cred` members `ps` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each is the cred member of its name
pub struct CredFields {
    pub uid: Field,
    pub gid: Field,
    pub euid: Field,
}

/// `mm_struct` members.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each is the mm_struct member of its name
pub struct MmFields {
    pub pgd: Field,
    pub arg_start: Field,
    pub arg_end: Field,
    pub exe_file: Field,
}

/// `TASK_COMM_LEN`.
pub const COMM_LEN: u64 = 16;

/// Everything the task decoder and the tracer read of a task, resolved
/// from one kernel's BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct`.
    pub task: TaskFields,
    /// `cred`.
    pub cred: CredFields,
    /// `mm_struct`.
    pub mm: MmFields,
    /// The saved user registers.
    pub pt_regs: PtRegsLayout,
    /// The bytes of `task_struct` that hold every field of `task` (start,
    /// length): one read per task.
    span: (u64, u64),
}

/// The most of a `task_struct` read in one piece: the fields above lie in
/// its first few KiB in every config; a layout wider than this (hostile
/// types) is refused rather than read.
const MAX_SPAN: u64 = 64 << 10;

impl TaskLayout {
    /// The layout of the kernel whose types are `types`.
    pub fn resolve(types: &KernelTypes) -> Result<Self> {
        let t = |path: &str| Field::of(types, "task_struct", path);
        let state = if types.has_member("task_struct", "__state") {
            t("__state")?
        } else {
            t("state")?
        };
        let task = TaskFields {
            pid: t("pid")?,
            tgid: t("tgid")?,
            state,
            exit_state: t("exit_state")?,
            flags: t("flags")?,
            real_parent: t("real_parent")?,
            group_leader: t("group_leader")?,
            real_cred: t("real_cred")?,
            mm: t("mm")?,
            stack: t("stack")?,
            signal: t("signal")?,
            vfork_done: t("vfork_done")?,
            ti_flags: t("thread_info.flags")?,
            syscall_work: types
                .has_member("thread_info", "syscall_work")
                .then(|| t("thread_info.syscall_work"))
                .transpose()?,
            worker_private: types
                .has_member("task_struct", "worker_private")
                .then(|| t("worker_private"))
                .transpose()?,
            comm: types.member("task_struct", "comm")?.offset,
        };
        let c = |path: &str| Field::of(types, "cred", path);
        let m = |path: &str| Field::of(types, "mm_struct", path);
        let cred = CredFields {
            uid: c("uid")?,
            gid: c("gid")?,
            euid: c("euid")?,
        };
        let mm = MmFields {
            pgd: m("pgd")?,
            arg_start: m("arg_start")?,
            arg_end: m("arg_end")?,
            exe_file: m("exe_file")?,
        };
        Self::new(task, cred, mm, PtRegsLayout::resolve(types)?)
    }

    /// A layout from its parts, refused if the task fields spread wider
    /// than one read should cover.
    pub fn new(
        task: TaskFields,
        cred: CredFields,
        mm: MmFields,
        pt_regs: PtRegsLayout,
    ) -> Result<Self> {
        let fields = [
            task.pid,
            task.tgid,
            task.state,
            task.exit_state,
            task.flags,
            task.real_parent,
            task.real_cred,
            task.ti_flags,
        ]
        .into_iter()
        .chain(task.syscall_work);
        let (mut start, mut end) = (task.comm, task.comm.saturating_add(COMM_LEN));
        for f in fields {
            start = start.min(f.offset);
            end = end.max(f.end());
        }
        if end - start > MAX_SPAN {
            return Err(IntrospectError::Corrupt(format!(
                "task_struct fields spread over {} bytes",
                end - start
            )));
        }
        Ok(Self {
            task,
            cred,
            mm,
            pt_regs,
            span: (start, end - start),
        })
    }

    /// The bytes of the `task_struct` at `addr` that hold the fields
    /// [`TaskLayout::task`] names, and the offset they start at.
    pub fn read_task<M: PhysMemory + ?Sized>(
        &self,
        k: &RunningKernel<'_, M>,
        addr: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let (start, len) = self.span;
        let mut raw = vec![0u8; len as usize];
        k.read(addr.wrapping_add(start), &mut raw, "task_struct")?;
        Ok((raw, start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode_from_a_span_and_bitfields_are_masked() {
        let f = Field {
            offset: 8,
            size: 4,
            bits: None,
        };
        let raw: Vec<u8> = (0u8..32).collect();
        assert_eq!(f.decode(&raw, 0), Some(0x0b0a_0908));
        assert_eq!(f.decode(&raw[4..], 4), Some(0x0b0a_0908));
        assert_eq!(f.decode(&raw[..10], 0), None, "cut short");
        assert_eq!(f.decode(&raw, 12), None, "before the span");
        let bits = Field {
            offset: 0,
            size: 1,
            bits: Some((2, 3)),
        };
        assert_eq!(bits.decode(&[0b1110_1100], 0), Some(0b011));
    }
}
