//! Every process and thread of a running kernel, decoded from its
//! `task_struct`s with offsets from BTF.
//!
//! Processes are the `init_task.tasks` ring; the threads of a process are
//! `signal->thread_head` (Linux 6.7 and later) or the leader's
//! `thread_group` ring (earlier). The guest writes these lists, so every walk
//! is bounded by [`WalkLimits`], remembers the tasks it has seen (a cycle
//! that skips the head is an error, not a hang) and checks every pointer.

use std::collections::{HashMap, HashSet};

use crate::error::{IntrospectError, Result};
use crate::kernel::{c_string, RunningKernel};
use crate::memory::{PhysMemory, VirtAddr};
use crate::paging::{read_virt, translate, AddressSpace};
pub use crate::pt_regs::UserRegs;
use crate::pt_regs::UserRegsFinder;
use crate::task_layout::{Field, TaskLayout, COMM_LEN};

/// `PF_KTHREAD`: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_WQ_WORKER`: the task is a workqueue worker.
pub const PF_WQ_WORKER: u32 = 0x0000_0020;
/// Longest name /proc shows (`proc_task_name`'s buffer, less the NUL).
const PROC_NAME_MAX: usize = 63;
/// `ps` state letters in `task_state_index` order.
const STATE_LETTERS: &[u8; 9] = b"RSDTtXZPI";
/// Highest pid Linux allows (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: i64 = 4 * 1024 * 1024;
/// Longest path rebuilt for `exe`, in components.
const PATH_MAX_COMPONENTS: usize = 256;
/// `NAME_MAX`.
const NAME_MAX: usize = 255;
/// Most bytes of a command line read (as `ps` shows, not the whole stack).
pub const CMDLINE_MAX: usize = 4096;

/// Bounds on one walk of guest lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Most tasks (processes plus threads) accepted.
    pub max_tasks: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        // The kernel cannot have more tasks than pids.
        Self {
            max_tasks: PID_MAX_LIMIT as usize,
        }
    }
}

/// One task (a process's leader or one of its threads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    /// Address of the `task_struct`.
    pub addr: u64,
    /// Thread id (the kernel's `pid`).
    pub tid: i32,
    /// Process id (the kernel's `tgid`).
    pub pid: i32,
    /// Parent's process id (`real_parent->tgid`); 0 for pid 1 and kthreadd.
    pub ppid: i32,
    /// Command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// The name /proc and `ps` show: `comm`, or for kernel threads their
    /// full name, and for workqueue workers `comm` plus `+`/`-` and the
    /// work description (as `proc_task_name` builds it).
    pub name: String,
    /// `ps` state letter (R, S, D, T, t, X, Z, P, I).
    pub state: char,
    /// Raw `__state` (`state` before 5.14).
    pub state_raw: u32,
    /// Raw `exit_state`.
    pub exit_state: u32,
    /// `flags` (PF_*).
    pub flags: u32,
    /// Real uid and gid, effective uid (from `real_cred`).
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Effective uid.
    pub euid: u32,
    /// `thread_info.flags` (TIF_*).
    pub ti_flags: u64,
    /// `thread_info.syscall_work` (SYSCALL_WORK_*), where the kernel has it.
    pub syscall_work: Option<u64>,
    /// The CPU this task is current on, if any.
    pub cpu: Option<u32>,
}

impl Task {
    /// Whether this is a kernel thread.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// The `ps` letter for a task's `__state` and `exit_state`, as the kernel's
/// `task_state_index` computes it.
pub fn state_letter(state: u32, exit_state: u32) -> char {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_IDLE: u32 = 0x402;
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    let mut s = (state | exit_state) & TASK_REPORT;
    if state == TASK_IDLE {
        s = TASK_REPORT + 1;
    } else if state == TASK_RTLOCK_WAIT {
        s = 2;
    }
    let index = (32 - s.leading_zeros()) as usize; // fls()
    char::from(STATE_LETTERS[index.min(STATE_LETTERS.len() - 1)])
}

/// Decodes tasks of one kernel; holds the offsets it needs.
pub struct TaskReader<'k, 'a, M: PhysMemory + ?Sized> {
    k: &'k RunningKernel<'a, M>,
    layout: TaskLayout,
    user_regs: UserRegsFinder,
    tasks_off: u64,
    /// `thread_node` + `signal_struct.thread_head`, or `thread_group`.
    threads: ThreadLinks,
    current: HashMap<u64, u32>,
}

enum ThreadLinks {
    /// 6.7+: `task.thread_node` in `task.signal->thread_head`.
    SignalList { node: u64, signal: u64, head: u64 },
    /// Before 6.7: the `task.thread_group` ring.
    GroupRing { ring: u64 },
}

impl<'k, 'a, M: PhysMemory + ?Sized> TaskReader<'k, 'a, M> {
    /// Prepares to read tasks of `k`: resolves the offsets and which task is
    /// current on each CPU.
    pub fn new(k: &'k RunningKernel<'a, M>) -> Result<Self> {
        Self::with_layout(k, TaskLayout::resolve(k.types())?)
    }

    /// [`TaskReader::new`] with a layout already resolved from `k`'s types.
    pub fn with_layout(k: &'k RunningKernel<'a, M>, layout: TaskLayout) -> Result<Self> {
        let t = k.types();
        let tasks_off = t.member("task_struct", "tasks")?.offset;
        let threads = if t.has_member("task_struct", "thread_node")
            && t.has_member("signal_struct", "thread_head")
        {
            ThreadLinks::SignalList {
                node: t.member("task_struct", "thread_node")?.offset,
                signal: t.member("task_struct", "signal")?.offset,
                head: t.member("signal_struct", "thread_head")?.offset,
            }
        } else {
            ThreadLinks::GroupRing {
                ring: t.member("task_struct", "thread_group")?.offset,
            }
        };
        let current = k
            .current_tasks()?
            .into_iter()
            .enumerate()
            .map(|(cpu, task)| (task, cpu as u32))
            .collect();
        Ok(Self {
            k,
            user_regs: UserRegsFinder::new(layout.pt_regs.clone()),
            layout,
            tasks_off,
            threads,
            current,
        })
    }

    /// Follows a `list_head` ring from `head` (itself not an entry), calling
    /// `f` with each entry's address; bounded by `seen` and `limits`.
    fn walk_ring(
        &self,
        head: u64,
        what: &str,
        limit: usize,
        mut f: impl FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        let mut cur = self.k.read_u64(head, what)?;
        while cur != head {
            if !seen.insert(cur) {
                return Err(IntrospectError::Corrupt(format!(
                    "{what} has a cycle that does not return to its head ({cur:#x} seen twice)"
                )));
            }
            if seen.len() > limit {
                return Err(IntrospectError::Corrupt(format!(
                    "{what} has more than {limit} entries"
                )));
            }
            f(cur)?;
            cur = self.k.read_u64(cur, what)?;
        }
        Ok(())
    }

    /// Every process leader except the idle task (pid 0), in list order.
    pub fn processes(&self, limits: WalkLimits) -> Result<Vec<u64>> {
        let init = self.k.symbol("init_task")?;
        let mut out = Vec::new();
        self.walk_ring(
            init + self.tasks_off,
            "the task list (init_task.tasks)",
            limits.max_tasks,
            |node| {
                out.push(node.wrapping_sub(self.tasks_off));
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// The threads of the process led by `leader`, leader first.
    pub fn threads(&self, leader: u64, limits: WalkLimits) -> Result<Vec<u64>> {
        let mut out = vec![leader];
        match self.threads {
            ThreadLinks::SignalList { node, signal, head } => {
                let sig = self.k.read_u64(leader + signal, "task_struct.signal")?;
                out.clear();
                self.walk_ring(
                    sig + head,
                    "a thread list (signal->thread_head)",
                    limits.max_tasks,
                    |n| {
                        out.push(n.wrapping_sub(node));
                        Ok(())
                    },
                )?;
                // Leader first, as ps lists it.
                if let Some(i) = out.iter().position(|&t| t == leader) {
                    out[..=i].rotate_right(1);
                }
            }
            ThreadLinks::GroupRing { ring } => {
                self.walk_ring(
                    leader + ring,
                    "a thread group (task_struct.thread_group)",
                    limits.max_tasks,
                    |n| {
                        out.push(n.wrapping_sub(ring));
                        Ok(())
                    },
                )?;
            }
        }
        Ok(out)
    }

    /// The layout it reads with.
    pub fn layout(&self) -> &TaskLayout {
        &self.layout
    }

    /// Decodes the `task_struct` at `addr` (one read of its fields' span).
    pub fn task(&self, addr: u64) -> Result<Task> {
        let k = self.k;
        let l = &self.layout.task;
        let (raw, start) = self.layout.read_task(k, addr)?;
        let f = |field: Field| field.decode(&raw, start).unwrap_or(0);
        let tid = f(l.pid) as u32 as i32;
        let pid = f(l.tgid) as u32 as i32;
        for (name, v) in [("pid", tid), ("tgid", pid)] {
            if !(0..=PID_MAX_LIMIT as i32).contains(&v) {
                return Err(IntrospectError::Corrupt(format!(
                    "task_struct at {addr:#x} has {name} {v}"
                )));
            }
        }
        let state_raw = f(l.state) as u32;
        let exit_state = f(l.exit_state) as u32;
        let parent = f(l.real_parent);
        let ppid = if parent == 0 {
            0
        } else {
            l.tgid.read(k, parent, "task_struct.tgid")? as u32 as i32
        };
        let comm_at = (l.comm - start) as usize;
        let comm = c_string(&raw[comm_at..comm_at + COMM_LEN as usize]);
        let cred = f(l.real_cred);
        let c = &self.layout.cred;
        let cred_field = |field: Field, what| field.read(k, cred, what).map(|v| v as u32);
        let flags = f(l.flags) as u32;
        Ok(Task {
            addr,
            tid,
            pid,
            ppid,
            name: self.proc_name(addr, flags, &comm),
            comm,
            state: state_letter(state_raw, exit_state),
            state_raw,
            exit_state,
            flags,
            uid: cred_field(c.uid, "cred.uid")?,
            gid: cred_field(c.gid, "cred.gid")?,
            euid: cred_field(c.euid, "cred.euid")?,
            ti_flags: f(l.ti_flags),
            syscall_work: l.syscall_work.map(f),
            cpu: self.current.get(&addr).copied(),
        })
    }

    /// The name /proc shows for a task (see [`Task::name`]). Kernel-thread
    /// extras are best effort: if the kernel's `struct kthread` or `struct
    /// worker` are not in its BTF, or their pointers do not read, `comm`.
    fn proc_name(&self, addr: u64, flags: u32, comm: &str) -> String {
        if flags & PF_KTHREAD == 0 {
            return comm.to_string();
        }
        let k = self.k;
        let extra = || -> Result<Option<String>> {
            let Some(worker_private) = self.layout.task.worker_private else {
                return Ok(None);
            };
            let kthread = worker_private.read(k, addr, "task_struct.worker_private")?;
            if kthread == 0 {
                return Ok(None);
            }
            if flags & PF_WQ_WORKER != 0 {
                let worker = k.field(kthread, "kthread", "data")?;
                // wq_worker_comm shows the description only while the
                // worker belongs to a pool (a rescuer has none between
                // rescues).
                if k.field(worker, "worker", "pool")? == 0 {
                    return Ok(None);
                }
                let desc_off = k.types().member("worker", "desc")?.offset;
                let mut desc = [0u8; 32];
                k.read(worker + desc_off, &mut desc[..24], "worker.desc")?;
                let desc = c_string(&desc);
                if desc.is_empty() {
                    return Ok(None);
                }
                let busy = k.field(worker, "worker", "current_work")? != 0;
                return Ok(Some(format!(
                    "{comm}{}{desc}",
                    if busy { '+' } else { '-' }
                )));
            }
            let full = k.field(kthread, "kthread", "full_name")?;
            if full == 0 {
                return Ok(None);
            }
            Ok(Some(k.read_cstr(
                full,
                PROC_NAME_MAX,
                "kthread.full_name",
            )?))
        };
        let mut name = extra().ok().flatten().unwrap_or_else(|| comm.to_string());
        if name.len() > PROC_NAME_MAX {
            let mut cut = PROC_NAME_MAX;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        name
    }

    /// Every task: each process's leader followed by its other threads.
    pub fn all_tasks(&self, limits: WalkLimits) -> Result<Vec<Task>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for leader in self.processes(limits)? {
            // Every entry must be what the list claims: a leader leads
            // itself, a thread is led by its leader. This catches pointers
            // into the wrong place that would otherwise decode as tasks.
            let group_leader = self.layout.task.group_leader;
            let led_by = |t: u64| group_leader.read(self.k, t, "task_struct.group_leader");
            if led_by(leader)? != leader {
                return Err(IntrospectError::Corrupt(format!(
                    "the task list holds {leader:#x}, which is not a process leader"
                )));
            }
            for t in self.threads(leader, limits)? {
                if led_by(t)? != leader {
                    return Err(IntrospectError::Corrupt(format!(
                        "the thread list of the process at {leader:#x} holds {t:#x}, which is not one of its threads"
                    )));
                }
                if !seen.insert(t) {
                    return Err(IntrospectError::Corrupt(format!(
                        "task_struct at {t:#x} appears twice in the task lists"
                    )));
                }
                if seen.len() > limits.max_tasks {
                    return Err(IntrospectError::Corrupt(format!(
                        "more than {} tasks",
                        limits.max_tasks
                    )));
                }
                out.push(self.task(t)?);
            }
        }
        Ok(out)
    }

    /// The saved user-mode registers of a user task (`pt_regs` at the top of
    /// its kernel stack, found by [`UserRegsFinder`]), or None for a kernel
    /// thread.
    pub fn user_regs(&self, task: &Task) -> Result<Option<UserRegs>> {
        let k = self.k;
        let t = &self.layout.task;
        if task.is_kernel_thread() || t.mm.read(k, task.addr, "task_struct.mm")? == 0 {
            return Ok(None);
        }
        let stack = t.stack.read(k, task.addr, "task_struct.stack")?;
        self.user_regs
            .read(k, stack)
            .map(Some)
            .map_err(|e| match e {
                IntrospectError::Corrupt(why) => {
                    IntrospectError::Corrupt(format!("pid {}: {why}", task.tid))
                }
                e => e,
            })
    }

    /// The task's `mm` (0 for a kernel thread).
    fn mm(&self, task: &Task) -> Result<u64> {
        self.layout
            .task
            .mm
            .read(self.k, task.addr, "task_struct.mm")
    }

    /// The task's user address space (`mm->pgd`, translated to the
    /// physical address CR3 would hold); None for kernel threads.
    pub fn user_space(&self, task: &Task) -> Result<Option<AddressSpace>> {
        let k = self.k;
        let mm = self.mm(task)?;
        if mm == 0 {
            return Ok(None);
        }
        let pgd = self.layout.mm.pgd.read(k, mm, "mm_struct.pgd")?;
        let pa =
            translate(k.memory(), k.space(), VirtAddr(pgd)).map_err(|e| IntrospectError::Read {
                what: format!("mm->pgd of pid {}", task.tid),
                va: pgd,
                source: e.into(),
            })?;
        Ok(Some(AddressSpace {
            cr3: pa.0,
            levels: k.space().levels,
        }))
    }

    /// The command line (`mm->arg_start..arg_end` in the task's own
    /// memory, NUL-separated arguments), at most [`CMDLINE_MAX`] bytes; None
    /// for kernel threads. Pages the task has not faulted in read as an
    /// error, as they would for `/proc/PID/cmdline` only after paging in.
    pub fn cmdline(&self, task: &Task) -> Result<Option<Vec<String>>> {
        let k = self.k;
        let Some(space) = self.user_space(task)? else {
            return Ok(None);
        };
        let mm = self.mm(task)?;
        let start = self
            .layout
            .mm
            .arg_start
            .read(k, mm, "mm_struct.arg_start")?;
        let end = self.layout.mm.arg_end.read(k, mm, "mm_struct.arg_end")?;
        if end < start {
            return Err(IntrospectError::Corrupt(format!(
                "pid {}: arg_end {end:#x} is below arg_start {start:#x}",
                task.tid
            )));
        }
        let len = ((end - start) as usize).min(CMDLINE_MAX);
        let mut buf = vec![0u8; len];
        read_virt(k.memory(), space, VirtAddr(start), &mut buf).map_err(|source| {
            IntrospectError::Read {
                what: format!("the command line of pid {}", task.tid),
                va: start,
                source,
            }
        })?;
        if buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(Some(
            buf.split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        ))
    }

    /// The executable's path (`mm->exe_file`), rebuilt from dentries and
    /// mounts; None for kernel threads.
    pub fn exe_path(&self, task: &Task) -> Result<Option<String>> {
        let mm = self.mm(task)?;
        if mm == 0 {
            return Ok(None);
        }
        let file = self
            .layout
            .mm
            .exe_file
            .read(self.k, mm, "mm_struct.exe_file")?;
        if file == 0 {
            return Ok(None);
        }
        self.file_path(file).map(Some)
    }

    /// The path of the file open as descriptor `fd` of `task` (`pipe:[N]`,
    /// `socket:[N]`, `anon_inode:[N]` for files of the kernel's internal
    /// file systems, as /proc's fd links and strace -y show them); None if
    /// the descriptor is not open or the task has no file table.
    pub fn fd_path(&self, task: &Task, fd: u64) -> Result<Option<String>> {
        fd_path(self.k, task.addr, fd)
    }

    fn file_path(&self, file: u64) -> Result<String> {
        file_path(self.k, file)
    }
}

/// [`TaskReader::fd_path`] for the `task_struct` at `task`, needing only
/// the kernel's types (no task layout): what a tracer asks at every
/// system call of `strace -y`.
pub fn fd_path<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    task: u64,
    fd: u64,
) -> Result<Option<String>> {
    let files = k.field(task, "task_struct", "files")?;
    if files == 0 {
        return Ok(None);
    }
    let fdt = k.field(files, "files_struct", "fdt")?;
    let max_fds = k.field(fdt, "fdtable", "max_fds")?;
    if fd >= max_fds {
        return Ok(None);
    }
    let array = k.field(fdt, "fdtable", "fd")?;
    let file = k.read_u64(array.wrapping_add(8 * fd), "fdtable.fd[]")?;
    if file == 0 {
        return Ok(None);
    }
    file_path(k, file).map(Some)
}

/// The path of `struct file` at `file`, rebuilt from dentries and mounts.
fn file_path<M: PhysMemory + ?Sized>(k: &RunningKernel<'_, M>, file: u64) -> Result<String> {
    let t = k.types();
    if let Some(pseudo) = pseudo_file_name(k, file)? {
        return Ok(pseudo);
    }
    let path_off = t.member("file", "f_path")?.offset;
    let mut dentry = k.field(file + path_off, "path", "dentry")?;
    let vfsmount = k.field(file + path_off, "path", "mnt")?;
    let mnt_in_mount = t.member("mount", "mnt")?.offset;
    let mut mount = vfsmount.wrapping_sub(mnt_in_mount);
    let mut parts = Vec::new();
    for _ in 0..PATH_MAX_COMPONENTS {
        let root = k.field(mount + mnt_in_mount, "vfsmount", "mnt_root")?;
        if dentry == root {
            let parent = k.field(mount, "mount", "mnt_parent")?;
            if parent == mount || parent == 0 {
                parts.reverse();
                return Ok(format!("/{}", parts.join("/")));
            }
            dentry = k.field(mount, "mount", "mnt_mountpoint")?;
            mount = parent;
            continue;
        }
        let parent = k.field(dentry, "dentry", "d_parent")?;
        let name_off = t.member("dentry", "d_name")?.offset;
        let name_ptr = k.field(dentry + name_off, "qstr", "name")?;
        parts.push(k.read_cstr(name_ptr, NAME_MAX + 1, "dentry name")?);
        if parent == dentry {
            parts.reverse();
            return Ok(format!("/{}", parts.join("/")));
        }
        dentry = parent;
    }
    Err(IntrospectError::Corrupt(format!(
        "the path of file {file:#x} has more than {PATH_MAX_COMPONENTS} components"
    )))
}

/// `pipe:[N]` and the like for a file of pipefs, sockfs or
/// anon_inodefs (whose dentries have no path), from its inode's super
/// block type.
fn pseudo_file_name<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    file: u64,
) -> Result<Option<String>> {
    let inode = k.field(file, "file", "f_inode")?;
    if inode == 0 {
        return Ok(None);
    }
    let sb = k.field(inode, "inode", "i_sb")?;
    let fs_type = k.field(sb, "super_block", "s_type")?;
    let name_ptr = k.field(fs_type, "file_system_type", "name")?;
    let fs = k.read_cstr(name_ptr, 32, "file system type name")?;
    let prefix = match fs.as_str() {
        "pipefs" => "pipe",
        "sockfs" => "socket",
        "anon_inodefs" => "anon_inode",
        _ => return Ok(None),
    };
    let ino = k.field(inode, "inode", "i_ino")?;
    Ok(Some(format!("{prefix}:[{ino}]")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters_follow_task_state_index() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(0x2001, 0), 'S', "freezable sleep");
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(0x402, 0), 'I', "TASK_IDLE");
        assert_eq!(state_letter(4, 0), 'T');
        assert_eq!(state_letter(8, 0), 't');
        assert_eq!(state_letter(0x80, 0x20), 'Z', "TASK_DEAD with EXIT_ZOMBIE");
        assert_eq!(state_letter(0x80, 0x10), 'X');
        assert_eq!(state_letter(0x40, 0), 'P');
        assert_eq!(state_letter(0x1000, 0), 'D', "rtlock wait");
    }
}
