//! What every vCPU and task of a guest is doing, read from outside: the
//! answer of `hvtrace stacks` and of the stall report a session prints when
//! its guest stops making progress. The unwinding itself is
//! guest-introspect's (`stacks.rs`); this module gathers the vCPUs' state
//! and shapes the reply and its text.

use anyhow::Result;
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::VcpuView;
use guest_introspect::memory::PhysMemory;
use guest_introspect::stacks::{Frame, StackReader};
use guest_introspect::tasks::{TaskReader, WalkLimits};
use serde_json::{json, Value};
use vmm::machine::RunningVm;

use std::path::PathBuf;

use vmm::session::StallDescriber;

use crate::introspect::{self, KernelSource};

/// System calls whose first argument is a file descriptor the call may
/// block on.
const FD_FIRST_CALLS: &[&str] = &[
    "read", "write", "readv", "writev", "pread64", "pwrite64", "ioctl", "recvfrom", "recvmsg",
    "sendto", "sendmsg", "accept", "accept4", "connect", "flock", "fsync", "splice",
];

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// One paused vCPU: its registers and run state, as vmm reads them.
pub use vmm::machine::VcpuState as CpuState;

/// Whether the vCPU runs kernel code (privilege level 0).
fn in_kernel(c: &CpuState) -> bool {
    c.sregs.cs & 3 == 0
}

/// The state of every vCPU of `vm`, which must be paused.
pub fn cpu_states(vm: &RunningVm) -> Result<Vec<CpuState>> {
    (0..vm.vcpu_count())
        .map(|id| Ok(vm.vcpu_state(id)?))
        .collect()
}

fn frames_json(frames: &[Frame]) -> Value {
    json!(frames
        .iter()
        .map(|f| json!({"addr": format!("{:#x}", f.addr), "symbol": f.symbol}))
        .collect::<Vec<_>>())
}

/// Every vCPU (what it runs, its kernel stack) and, with `all_tasks`,
/// every task's kernel stack, as JSON.
pub fn stacks_json(
    mem: &(impl PhysMemory + ?Sized),
    cpus: &[CpuState],
    info: &KernelInfo,
    all_tasks: bool,
) -> Result<Value> {
    let views: Vec<VcpuView> = cpus.iter().map(|c| c.sregs.view).collect();
    let k = introspect::attach(mem, &views, info)?;
    let tasks = TaskReader::new(&k)?;
    let stacks = StackReader::new(&k)?;
    let all = tasks.all_tasks(WalkLimits::default())?;
    let current = k.current_tasks().unwrap_or_default();
    // System-call names from the guest's own sys_call_table, when readable.
    let table = utrace::syscalls::table::SyscallTable::read(&k).ok();
    // A CPU's idle task (pid 0, `swapper/N`) is on no task list: read it
    // where the CPU's `current` points.
    let task_json = |addr: u64| {
        all.iter()
            .find(|t| t.addr == addr)
            .cloned()
            .or_else(|| tasks.task(addr).ok())
            .map(|t| json!({"pid": t.pid, "tid": t.tid, "comm": t.comm, "state": t.state.to_string()}))
    };
    let mut vcpus = Vec::new();
    for (i, c) in cpus.iter().enumerate() {
        let frames = if in_kernel(c) {
            stacks.running(c.regs.rip, c.regs.rsp)
        } else {
            Vec::new()
        };
        vcpus.push(json!({
            "vcpu": i,
            "halted": c.halted,
            "interrupts": c.regs.rflags & RFLAGS_IF != 0,
            "mode": if in_kernel(c) { "kernel" } else { "user" },
            "rip": format!("{:#x}", c.regs.rip),
            "symbol": if in_kernel(c) { stacks.symbolize(c.regs.rip) } else { None },
            "task": current.get(i).and_then(|&a| task_json(a)),
            "frames": frames_json(&frames),
        }));
    }
    let mut task_stacks = Vec::new();
    if all_tasks {
        for t in &all {
            // A task current on a vCPU is shown with that vCPU; its saved
            // stack pointer is stale while it runs.
            let running = t.cpu.is_some();
            // An exited task (zombie) has given its stack back.
            let (frames, error) = if running || t.exit_state != 0 {
                (Vec::new(), None)
            } else {
                match stacks.sleeping_task(t) {
                    Ok(f) => (f, None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                }
            };
            let syscall = tasks
                .user_regs(t)
                .ok()
                .flatten()
                .and_then(|r| r.syscall())
                .map(|(nr, args)| {
                    let name = table.as_ref().and_then(|t| t.name(nr));
                    // What a blocked call waits on: the file behind its
                    // descriptor (a tty, a pipe, a socket).
                    let fd_path = name
                        .filter(|n| FD_FIRST_CALLS.contains(n))
                        .and_then(|_| tasks.fd_path(t, args[0]).ok().flatten());
                    json!({
                        "nr": nr,
                        "name": name,
                        "args": args.iter().map(|a| format!("{a:#x}")).collect::<Vec<_>>(),
                        "fd_path": fd_path,
                    })
                });
            task_stacks.push(json!({
                "pid": t.pid,
                "tid": t.tid,
                "comm": t.comm,
                "state": t.state.to_string(),
                "running_on": t.cpu,
                "syscall": syscall,
                "frames": frames_json(&frames),
                "error": error,
            }));
        }
    }
    Ok(json!({"vcpus": vcpus, "tasks": task_stacks}))
}

fn frame_lines(out: &mut String, frames: &Value) {
    for f in frames.as_array().into_iter().flatten() {
        let line = f["symbol"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| f["addr"].as_str().unwrap_or("?").to_string());
        out.push_str(&format!("    {line}\n"));
    }
}

/// A `stacks` reply as text: a block per vCPU, then one per task, each
/// frame a `function+0xoff` line.
pub fn format_stacks(reply: &Value) -> String {
    let mut out = String::new();
    for v in reply["vcpus"].as_array().into_iter().flatten() {
        let what = if v["halted"].as_bool() == Some(true) {
            "halted"
        } else {
            "running"
        };
        let irq = if v["interrupts"].as_bool() == Some(true) {
            "interrupts on"
        } else {
            "interrupts off"
        };
        let at = v["symbol"].as_str().map(str::to_string).unwrap_or_else(|| {
            format!(
                "{} ({} mode)",
                v["rip"].as_str().unwrap_or("?"),
                v["mode"].as_str().unwrap_or("?")
            )
        });
        let task = match v["task"].as_object() {
            Some(t) => format!(
                "pid {} {} ({})",
                t["tid"],
                t["comm"].as_str().unwrap_or("?"),
                t["state"].as_str().unwrap_or("?")
            ),
            None => "task unknown".to_string(),
        };
        out.push_str(&format!(
            "vCPU {}: {what}, {irq}, at {at}; {task}\n",
            v["vcpu"]
        ));
        frame_lines(&mut out, &v["frames"]);
    }
    for t in reply["tasks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\npid {} tid {} {} ({})",
            t["pid"],
            t["tid"],
            t["comm"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?")
        ));
        if let Some(sc) = t["syscall"].as_object() {
            let mut args: Vec<String> = sc["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap_or("?").to_string())
                .collect();
            if let (Some(path), Some(first)) = (sc["fd_path"].as_str(), args.first_mut()) {
                // strace -y's notation: the descriptor in decimal.
                let fd = u64::from_str_radix(first.trim_start_matches("0x"), 16).unwrap_or(0);
                *first = format!("{fd}<{path}>");
            }
            match sc["name"].as_str() {
                Some(name) => out.push_str(&format!(" in {name}({})", args.join(", "))),
                None => out.push_str(&format!(
                    " in system call {} ({})",
                    sc["nr"],
                    args.join(", ")
                )),
            }
        }
        if let Some(cpu) = t["running_on"].as_u64() {
            out.push_str(&format!(", running on vCPU {cpu}"));
        }
        out.push('\n');
        if let Some(e) = t["error"].as_str() {
            out.push_str(&format!("    (stack unreadable: {e})\n"));
        }
        frame_lines(&mut out, &t["frames"]);
    }
    out
}

/// A describer for [`vmm::session::Session::report_stalls_after`]: every
/// vCPU's and task's kernel stack, with symbols and types from `kernel`
/// (or, without it, recovered from guest memory), loaded on first use.
pub fn stall_describer(kernel: Option<PathBuf>) -> StallDescriber {
    let mut info: Option<KernelInfo> = None;
    Box::new(move |vm: &RunningVm| {
        if let Err(e) = vm.pause_all() {
            return format!("(cannot pause the guest to look at it: {e})");
        }
        let report = (|| -> Result<Value> {
            let cpus = cpu_states(vm)?;
            if info.is_none() {
                let source = match &kernel {
                    Some(k) => KernelSource::Files {
                        kernel: k.clone(),
                        system_map: None,
                    },
                    None => KernelSource::Memory,
                };
                info = Some(introspect::load_info(
                    &source,
                    vm.ram(),
                    &cpus[0].sregs.view,
                )?);
            }
            stacks_json(vm.ram(), &cpus, info.as_ref().expect("loaded above"), true)
        })();
        let _ = vm.resume_all();
        match report {
            Ok(r) => format_stacks(&r),
            Err(e) => format!("(cannot read the guest's stacks: {e:#})"),
        }
    })
}
