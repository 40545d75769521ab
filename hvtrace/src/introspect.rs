//! `ps` and `inspect` over any guest: a live VM (the `boot` process answers
//! socket requests with these) or a snapshot file. Decoding lives in
//! guest-introspect; this module picks the kernel information source,
//! gathers vCPU state and shapes the JSON replies and the text output.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use guest_introspect::image::KernelInfo;
use guest_introspect::kernel::{RunningKernel, VcpuView};
use guest_introspect::memory::PhysMemory;
use guest_introspect::pt_regs::Reg;
use guest_introspect::tasks::{TaskReader, UserRegs, WalkLimits};
use serde_json::{json, Value};

/// Where a kernel's symbols and types come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// A kernel file (vmlinux or bzImage) and optionally its System.map.
    Files {
        /// vmlinux or bzImage.
        kernel: PathBuf,
        /// System.map, which then takes precedence for symbols.
        system_map: Option<PathBuf>,
    },
    /// The running guest's memory alone (kallsyms and BTF found in it).
    Memory,
}

/// What introspection needs of a vCPU, from KVM's special registers.
pub use vmm::trap::vcpu_view;

/// Loads a kernel file's information.
pub fn info_from_files(kernel: &Path, system_map: Option<&Path>) -> Result<KernelInfo> {
    let bytes =
        std::fs::read(kernel).with_context(|| format!("cannot read {}", kernel.display()))?;
    let elf = vmm::loader::kernel_elf(&bytes, vmm::loader::DEFAULT_MAX_OUTPUT)
        .with_context(|| format!("{}", kernel.display()))?;
    let map = system_map
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    KernelInfo::from_files(&elf, map.as_deref()).with_context(|| format!("{}", kernel.display()))
}

/// A kernel file's information being loaded on a thread of its own
/// (decompressing the image, its symbols, its BTF: ~70 ms for the minimal
/// kernel), so that the work overlaps what the caller does meanwhile: a
/// restore before tracing, or the wait for a control socket's first
/// `ps`.
pub struct InfoPreload {
    source: KernelSource,
    loading: std::thread::JoinHandle<Result<KernelInfo>>,
}

impl InfoPreload {
    /// Starts loading `source` if it is a kernel file (guest memory is
    /// read with the VM paused, on request).
    pub fn start(source: &KernelSource) -> Option<Self> {
        let KernelSource::Files { kernel, system_map } = source else {
            return None;
        };
        let (kernel, system_map) = (kernel.clone(), system_map.clone());
        let loading = std::thread::Builder::new()
            .name("kernel-info".into())
            .spawn(move || info_from_files(&kernel, system_map.as_deref()))
            .ok()?;
        Some(Self {
            source: source.clone(),
            loading,
        })
    }

    /// What is being loaded.
    pub fn source(&self) -> &KernelSource {
        &self.source
    }

    /// The loaded information (waiting for it if need be).
    pub fn wait(self) -> Result<KernelInfo> {
        self.loading
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the kernel information panicked")))
    }
}

/// Loads kernel information from `source`, reading guest memory if asked.
pub fn load_info(
    source: &KernelSource,
    mem: &(impl PhysMemory + ?Sized),
    vcpu: &VcpuView,
) -> Result<KernelInfo> {
    match source {
        KernelSource::Files { kernel, system_map } => {
            info_from_files(kernel, system_map.as_deref())
        }
        KernelSource::Memory => KernelInfo::from_memory(mem, vcpu)
            .context("recovering symbols and types from guest memory"),
    }
}

/// The running kernel in `mem`, located through the first vCPU.
pub(crate) fn attach<'a, M: PhysMemory + ?Sized>(
    mem: &'a M,
    vcpus: &[VcpuView],
    info: &'a KernelInfo,
) -> Result<RunningKernel<'a, M>> {
    let Some(v0) = vcpus.first() else {
        bail!("the guest has no vCPU state");
    };
    Ok(RunningKernel::attach(
        mem,
        v0,
        &info.symbols,
        &info.types,
        info.banner.as_deref(),
    )?)
}

fn kernel_facts<M: PhysMemory + ?Sized>(k: &RunningKernel<'_, M>, info: &KernelInfo) -> Value {
    let p = k.placement();
    json!({
        "banner": k.banner().trim_end(),
        "symbols": info.symbol_source.describe(),
        "symbol_count": info.symbols.len(),
        "btf_types": info.types.type_count(),
        "text": format!("{:#x}", p.text),
        "text_phys": format!("{:#x}", p.text_phys),
        "kaslr_offset": format!("{:#x}", p.virt_offset.wrapping_add(info.symbols_shift)),
    })
}

/// Every task of the guest, with facts about the kernel, as JSON.
pub fn ps_json(
    mem: &(impl PhysMemory + ?Sized),
    vcpus: &[VcpuView],
    info: &KernelInfo,
) -> Result<Value> {
    let k = attach(mem, vcpus, info)?;
    let reader = TaskReader::new(&k)?;
    let tasks = reader.all_tasks(WalkLimits::default())?;
    Ok(json!({ "kernel": kernel_facts(&k, info), "tasks": tasks }))
}

/// SHA-256 of the running kernel's text (`_text`..`_etext`) as guest
/// memory holds it now (with any `int3` planted in it).
pub fn text_hash_json(
    mem: &(impl PhysMemory + ?Sized),
    vcpus: &[VcpuView],
    info: &KernelInfo,
) -> Result<Value> {
    use sha2::Digest;
    let k = attach(mem, vcpus, info)?;
    let (start, end) = (k.symbol("_text")?, k.symbol("_etext")?);
    if end <= start || end - start > 256 << 20 {
        bail!("kernel text {start:#x}..{end:#x} is implausible");
    }
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        k.read(at, &mut buf[..n], "kernel text")?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(json!({ "sha256": digest, "bytes": end - start }))
}

/// Each utrace event's site in the running kernel, with its runtime address.
pub fn sites_json(
    mem: &(impl PhysMemory + ?Sized),
    vcpus: &[VcpuView],
    info: &KernelInfo,
) -> Result<Value> {
    let k = attach(mem, vcpus, info)?;
    let mut sites = Vec::new();
    let mut errors = Vec::new();
    for r in utrace::sites::resolve_all(&info.symbols) {
        match r {
            Ok(site) => {
                let mut v = serde_json::to_value(&site)?;
                v["runtime"] = json!(format!("{:#x}", k.runtime(site.addr)));
                sites.push(v);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    // Where the tracer puts each trap on this kernel (QUIESCE's are set
    // only once an engine asks for it), found by disassembling the text.
    let layout = utrace::hv::layout::TraceLayout::resolve(&k)?;
    let mut all = utrace::sites::Site::TRACED.to_vec();
    all.push(utrace::sites::Site::Quiesce);
    let (traps, trap_errors) = utrace::hv::placement::plan(&k, &info.symbols, &layout, &all);
    errors.extend(trap_errors);
    Ok(json!({
        "kernel": kernel_facts(&k, info),
        "sites": sites,
        "traps": traps,
        "errors": errors,
    }))
}

/// Most bytes of `mm->saved_auxv` read (the kernel's is 52 words; a
/// hostile BTF cannot make the read larger).
const AUXV_MAX: u64 = 4096;

/// The auxiliary vector the kernel gave the task at `task` at its exec
/// (`mm->saved_auxv`, what `/proc/PID/auxv` shows), up to and with its
/// AT_NULL entry; None for a kernel thread.
fn saved_auxv<M: PhysMemory + ?Sized>(
    k: &RunningKernel<'_, M>,
    info: &KernelInfo,
    task: u64,
) -> Result<Option<Vec<u8>>> {
    let mm_off = info.types.member("task_struct", "mm")?.offset;
    let auxv = info.types.member("mm_struct", "saved_auxv")?;
    let mut word = [0u8; 8];
    k.read(task.wrapping_add(mm_off), &mut word, "task_struct.mm")?;
    let mm = u64::from_le_bytes(word);
    if mm == 0 {
        return Ok(None);
    }
    let mut bytes = vec![0u8; auxv.size.min(AUXV_MAX) as usize];
    k.read(
        mm.wrapping_add(auxv.offset),
        &mut bytes,
        "mm_struct.saved_auxv",
    )?;
    // Pairs of (type, value) words, ending at AT_NULL (type 0).
    let end = bytes
        .chunks_exact(16)
        .position(|pair| pair[..8] == [0; 8])
        .map_or(bytes.len() / 16 * 16, |i| 16 * (i + 1));
    bytes.truncate(end);
    Ok(Some(bytes))
}

/// Details of the task with thread id `tid`, as JSON.
pub fn inspect_json(
    mem: &(impl PhysMemory + ?Sized),
    vcpus: &[VcpuView],
    info: &KernelInfo,
    tid: i32,
) -> Result<Value> {
    let k = attach(mem, vcpus, info)?;
    let reader = TaskReader::new(&k)?;
    let task = reader
        .all_tasks(WalkLimits::default())?
        .into_iter()
        .find(|t| t.tid == tid)
        .with_context(|| format!("no task with pid {tid} in the guest"))?;
    let regs = reader.user_regs(&task)?;
    let exe = reader.exe_path(&task)?;
    // A page of the arguments that was never touched is not in memory yet;
    // that is not an error of the request, so it shows as null.
    let cmdline = reader.cmdline(&task).ok().flatten();
    let auxv = saved_auxv(&k, info, task.addr)
        .ok()
        .flatten()
        .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>());
    let regs_json = regs.as_ref().map(|r: &UserRegs| {
        let m: serde_json::Map<String, Value> = Reg::NAMES
            .iter()
            .zip(r.values)
            .map(|(n, v)| (n.to_string(), json!(format!("{v:#x}"))))
            .collect();
        Value::Object(m)
    });
    let syscall = regs.as_ref().and_then(|r| r.syscall()).map(|(nr, args)| {
        json!({"nr": nr, "args": args.iter().map(|a| format!("{a:#x}")).collect::<Vec<_>>()})
    });
    Ok(json!({
        "kernel": kernel_facts(&k, info),
        "task": task,
        "exe": exe,
        "cmdline": cmdline,
        "auxv": auxv,
        "user_regs": regs_json,
        "syscall": syscall,
    }))
}

/// Writes `text` to stdout; a closed pipe (`hvtrace ps | head`) ends the
/// process quietly instead of panicking. (SIGPIPE stays ignored: the VMM
/// must survive clients that disconnect from its socket.)
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("hvtrace: cannot write output: {e}");
        std::process::exit(125);
    }
}

/// Formats a `ps` reply the way `ps -eLo pid,tid,ppid,stat,comm` prints.
pub fn format_ps(reply: &Value) -> String {
    let mut out = format!(
        "{:>5} {:>5} {:>5} {:<4} COMMAND\n",
        "PID", "TID", "PPID", "STAT"
    );
    for t in reply["tasks"].as_array().into_iter().flatten() {
        let held = if t["stopped_by"] == "hvtrace" {
            "  (stopped by hvtrace)"
        } else {
            ""
        };
        out += &format!(
            "{:>5} {:>5} {:>5} {:<4} {}{held}\n",
            t["pid"].as_i64().unwrap_or(-1),
            t["tid"].as_i64().unwrap_or(-1),
            t["ppid"].as_i64().unwrap_or(-1),
            t["state"].as_str().unwrap_or("?"),
            t["name"].as_str().unwrap_or("")
        );
    }
    out
}

/// Formats an `inspect` reply as `key: value` lines.
pub fn format_inspect(reply: &Value) -> String {
    let t = &reply["task"];
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let hex = |v: &Value| format!("{:#x}", v.as_u64().unwrap_or(0));
    let mut lines = vec![
        format!("pid:          {}", s(&t["pid"])),
        format!("tid:          {}", s(&t["tid"])),
        format!("ppid:         {}", s(&t["ppid"])),
        format!("comm:         {}", s(&t["comm"])),
        format!("name:         {}", s(&t["name"])),
        format!(
            "state:        {} (__state {}, exit_state {})",
            s(&t["state"]),
            hex(&t["state_raw"]),
            hex(&t["exit_state"])
        ),
        format!("flags:        {}", hex(&t["flags"])),
        format!(
            "uid/gid:      {} / {} (euid {})",
            s(&t["uid"]),
            s(&t["gid"]),
            s(&t["euid"])
        ),
        format!("thread flags: {}", hex(&t["ti_flags"])),
        match t["syscall_work"].as_u64() {
            Some(w) => format!("syscall_work: {w:#x}"),
            None => "syscall_work: - (not in this kernel)".to_string(),
        },
        format!("cpu:          {}", s(&t["cpu"])),
        format!("exe:          {}", s(&reply["exe"])),
        format!(
            "cmdline:      {}",
            reply["cmdline"]
                .as_array()
                .map(|a| a
                    .iter()
                    .map(|x| x.as_str().unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_else(|| "-".into())
        ),
    ];
    if let Some(sc) = reply["syscall"].as_object() {
        let args: Vec<String> = sc["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap_or("?").to_string())
            .collect();
        lines.push(format!("syscall:      {} ({})", sc["nr"], args.join(", ")));
    }
    if let Some(regs) = reply["user_regs"].as_object() {
        lines.push("user registers:".into());
        for n in Reg::NAMES {
            lines.push(format!("  {:<8} {}", n, regs[n].as_str().unwrap_or("?")));
        }
    }
    lines.join("\n") + "\n"
}
