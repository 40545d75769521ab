//! SINGLESTEP and BLOCKSTEP of guest user threads (`hvtrace trace --steps`),
//! against oracles the project did not write: the guest kernel's own
//! `PTRACE_SINGLESTEP` (driven by `hv-stepcount` in the guest, which prints
//! the program counter at every stop) and binutils' `objdump`/`nm` on the
//! host copy of the stepped program (built from the same source with the
//! same command as the image's).
//!
//! The stepped programs are assembly with no C library (`images/programs/
//! hv-step-*.S`), so every instruction they run is in their source and the
//! counts are exact.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvtrace_tests::*;
use utrace::context::ThreadContext;
use utrace::engine::Engine;
use utrace::hv::{EngineSpec, Tracer};
use utrace::{EngineOps, EventMask, ResumeAction};

/// What the guest kernel's ptrace stepping saw: the program counter at
/// the exec stop and, for every SIGTRAP stop after it, its kind (`trace`,
/// `brkpt`, `notify`) and program counter; and the summary line.
struct PtraceSteps {
    exec: u64,
    stops: Vec<(String, u64)>,
    summary: String,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {s}"))
}

/// `hv-stepcount step -v PROGRAM ARGS` in the guest (nothing of hvtrace's
/// attached).
fn ptrace_steps(program: &[&str]) -> PtraceSteps {
    ptrace_steps_on("minimal", program)
}

/// [`ptrace_steps`] on guest kernel `kernel`.
fn ptrace_steps_on(kernel: &str, program: &[&str]) -> PtraceSteps {
    let mut args = vec![
        "run",
        "--kernel",
        kernel,
        "--",
        "hv-stepcount",
        "step",
        "-v",
    ];
    args.extend_from_slice(program);
    let out = hvtrace(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    parse_ptrace_steps(&stdout(&out))
}

fn parse_ptrace_steps(text: &str) -> PtraceSteps {
    let mut exec = None;
    let mut stops = Vec::new();
    let mut summary = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("exec"), Some(pc)) => exec = Some(hex(pc)),
            (Some(kind @ ("trace" | "brkpt" | "notify" | "other")), Some(pc))
                if pc.starts_with("0x") =>
            {
                stops.push((kind.to_string(), hex(pc)))
            }
            (Some("stops"), _) => summary = line.to_string(),
            _ => {}
        }
    }
    PtraceSteps {
        exec: exec.unwrap_or_else(|| panic!("no exec stop in:\n{text}")),
        stops,
        summary,
    }
}

impl PtraceSteps {
    /// The instructions the program ran, in order: the one at each stop's
    /// previous program counter, except before a `notify` stop (the kernel
    /// moved the thread to a handler; the instruction there had not run),
    /// and the last one (its `exit_group`, after which no stop comes).
    fn executed(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut pc = self.exec;
        for (kind, next) in &self.stops {
            if kind != "notify" {
                out.push(pc);
            }
            pc = *next;
        }
        out.push(pc);
        out
    }
}

/// `hvtrace trace --steps EXTRA -o FILE -- PROGRAM`: its output and the
/// trace.
fn hv_steps(extra: &[&str], program: &[&str]) -> (std::process::Output, String) {
    hv_steps_on("minimal", extra, program)
}

/// [`hv_steps`] on guest kernel `kernel`.
fn hv_steps_on(kernel: &str, extra: &[&str], program: &[&str]) -> (std::process::Output, String) {
    let trace = temp_path("steps.txt");
    let mut args = vec!["trace", "--kernel", kernel, "--steps"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", trace.to_str().unwrap(), "--"]);
    args.extend_from_slice(program);
    let out = hvtrace(&args);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}\n{log}", stderr(&out));
    (out, log)
}

/// The instruction (or block) lines of a trace: address, the rest.
fn step_lines(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let (head, rest) = l.split_once(":\t")?;
            let addr = head.split(' ').next()?;
            let a = u64::from_str_radix(addr, 16).ok()?;
            Some((a, format!("{head}:\t{rest}")))
        })
        .collect()
}

/// `--- steps: I instructions, B blocks, S system calls ---`.
fn totals(log: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with("--- steps: "))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

/// One instruction as objdump shows it.
#[derive(Debug, Clone)]
struct Insn {
    len: u64,
    mnemonic: String,
}

/// The host copy of `hv-step-NAME`, built as images/build.sh builds it.
fn host_binary(name: &str) -> PathBuf {
    let src = root().join(format!("images/programs/{name}.S"));
    let out = temp_path(name);
    let st = Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc {}", src.display());
    out
}

/// objdump's disassembly of `binary`'s text, by address.
fn objdump(binary: &PathBuf) -> BTreeMap<u64, Insn> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-j", ".text"])
        .arg(binary)
        .output()
        .expect("objdump");
    assert!(out.status.success());
    let mut addrs: Vec<(u64, String)> = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((a, rest)) = l.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        let mnemonic = rest.split_whitespace().next().unwrap_or("").to_string();
        addrs.push((a, mnemonic));
    }
    // Lengths from the next address (the text ends with the last one's
    // padding at worst: it is never a branch in these programs).
    let mut map = BTreeMap::new();
    for (i, (a, m)) in addrs.iter().enumerate() {
        let len = addrs.get(i + 1).map_or(1, |n| n.0 - a);
        map.insert(
            *a,
            Insn {
                len,
                mnemonic: m.clone(),
            },
        );
    }
    map
}

/// `nm`'s address of `symbol` in `binary`.
fn nm(binary: &PathBuf, symbol: &str) -> u64 {
    let out = Command::new("nm").arg(binary).output().expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[2] == symbol).then(|| hex(w[0]))
        })
        .unwrap_or_else(|| panic!("no {symbol} in {}", binary.display()))
}

fn is_branch(m: &str) -> bool {
    m.starts_with('j') || m.starts_with("call") || m.starts_with("ret") || m.starts_with("loop")
}

fn is_unconditional(m: &str) -> bool {
    m.starts_with("jmp") || m.starts_with("call") || m.starts_with("ret")
}

#[test]
fn single_steps_are_the_instructions_the_guest_kernels_ptrace_steps() {
    require_kvm();
    single_steps_equal_ptrace_on("minimal");
}

// Debian's own kernels: in the hardware-KVM lane of scripts/test.sh, as
// their first boots on PVM KVM take half an hour and more.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_single_steps_and_blocks_equal_ptrace() {
    require_kvm();
    single_steps_equal_ptrace_on("debian-6.1");
    blocks_equal_ptrace_on("debian-6.1");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_single_steps_and_blocks_equal_ptrace() {
    require_kvm();
    single_steps_equal_ptrace_on("debian-6.12");
    blocks_equal_ptrace_on("debian-6.12");
}

fn single_steps_equal_ptrace_on(kernel: &str) {
    for (name, program) in [
        ("hv-step-loop", vec!["/usr/bin/hv-step-loop"]),
        ("hv-step-calls", vec!["/usr/bin/hv-step-calls"]),
        ("hv-step-signal", vec!["/usr/bin/hv-step-signal"]),
    ] {
        let oracle = ptrace_steps_on(kernel, &program);
        let expected = oracle.executed();
        let (_, log) = hv_steps_on(kernel, &[], &program);
        let lines = step_lines(&log);
        let got: Vec<u64> = lines.iter().map(|l| l.0).collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "{name}: hvtrace printed {} instructions, the guest's ptrace stepped {} ({})\n{log}",
            got.len(),
            expected.len(),
            oracle.summary
        );
        assert_eq!(
            got, expected,
            "{name}: a different instruction sequence\n{log}"
        );
        // Each line: the symbol from the program's ELF, objdump's mnemonic.
        let bin = host_binary(name);
        let dis = objdump(&bin);
        let start = nm(&bin, "_start");
        for (addr, line) in &lines {
            let insn = dis
                .get(addr)
                .unwrap_or_else(|| panic!("{addr:#x} is no instruction:\n{line}"));
            let text = line.split_once(":\t").unwrap().1;
            assert_eq!(
                text.split_whitespace().next().unwrap(),
                insn.mnemonic,
                "{name}: {line}"
            );
            if *addr == start {
                assert!(line.contains(" <_start>:"), "{line}");
            }
        }
        assert!(
            log.contains("exit_group(0)"),
            "{name}: no system-call lines:\n{log}"
        );
    }
}

#[test]
fn system_call_lines_follow_the_syscall_instruction_that_made_them() {
    require_kvm();
    let (out, log) = hv_steps(&[], &["/usr/bin/hv-step-calls"]);
    assert!(stdout(&out).contains("calls"), "{}", stdout(&out));
    let lines: Vec<&str> = log.lines().collect();
    let write = lines
        .iter()
        .position(|l| l.starts_with("write(1, \"calls\\n\", 6) = 6"))
        .unwrap_or_else(|| panic!("no write line:\n{log}"));
    assert!(lines[write - 1].ends_with(":\tsyscall"), "{log}");
    assert!(lines[write + 1].contains(":\tmov"), "{log}");
    // Intel syntax on request.
    let (_, intel) = hv_steps(&["--intel"], &["/usr/bin/hv-step-loop"]);
    let first = step_lines(&intel)[0].1.clone();
    assert!(first.ends_with("mov rcx,[rsp]"), "{first}");
}

#[test]
fn a_loop_runs_a_times_n_plus_b_instructions_read_from_its_disassembly() {
    require_kvm();
    let bin = host_binary("hv-step-loop");
    let dis = objdump(&bin);
    let (start, head, end) = (
        nm(&bin, "_start"),
        nm(&bin, "loop_head"),
        nm(&bin, "loop_end"),
    );
    let count = |from: u64, to: u64| dis.range(from..to).count() as u64;
    let a = count(head, end);
    let b = count(start, head)
        + dis
            .range(end..)
            .take_while(|(_, i)| i.mnemonic != "syscall")
            .count() as u64
        + 1;
    // Taken branches per iteration, and the blocks besides them: the first
    // block, less the loop's last (not taken) branch.
    let c = dis
        .range(head..end)
        .filter(|(_, i)| is_branch(&i.mnemonic))
        .count() as u64;
    let d = 1 - c;
    for (args, n) in [(vec![], 100u64), (vec!["x", "y"], 300)] {
        let mut program = vec!["/usr/bin/hv-step-loop"];
        program.extend(args.iter());
        let (_, log) = hv_steps(&["--summary", "--quiet-steps"], &program);
        let (insns, blocks, syscalls) = totals(&log);
        assert_eq!(insns, a * n + b, "N={n}: a={a} b={b}\n{log}");
        assert_eq!(blocks, c * n + d, "N={n}: c={c} d={d}\n{log}");
        assert_eq!(syscalls, 1, "{log}");
        assert!(log.contains("loop_head"), "per-function rows:\n{log}");
        let (_, log) = hv_steps(&["--blocks", "--summary"], &program);
        let (insns, blocks, _) = totals(&log);
        assert_eq!(blocks, c * n + d, "--blocks, N={n}\n{log}");
        assert_eq!(
            insns,
            a * n + b,
            "--blocks counts instructions too, N={n}\n{log}"
        );
        let heads = step_lines(&log).iter().filter(|l| l.0 == head).count() as u64;
        assert_eq!(
            heads,
            n - 1,
            "a loop of N iterations shows its head N-1 times\n{log}"
        );
    }
}

#[test]
fn blocks_start_where_the_guest_kernels_ptrace_steps_branch() {
    require_kvm();
    blocks_equal_ptrace_on("minimal");
}

fn blocks_equal_ptrace_on(kernel: &str) {
    for name in ["hv-step-calls", "hv-step-signal"] {
        let program = format!("/usr/bin/{name}");
        let oracle = ptrace_steps_on(kernel, &[&program]);
        let dis = objdump(&host_binary(name));
        // Block heads: the entry; after a taken branch, its target; after
        // a system call, the next instruction; a handler's first one.
        let mut expected = vec![oracle.exec];
        let mut pc = oracle.exec;
        for (kind, next) in &oracle.stops {
            let insn = &dis[&pc];
            let head = kind == "notify"
                || insn.mnemonic == "syscall"
                || (is_branch(&insn.mnemonic)
                    && (is_unconditional(&insn.mnemonic) || *next != pc + insn.len));
            if head {
                expected.push(*next);
            }
            pc = *next;
        }
        let (_, log) = hv_steps_on(kernel, &["--blocks"], &[&program]);
        let got: Vec<u64> = step_lines(&log).iter().map(|l| l.0).collect();
        assert_eq!(got, expected, "{name}:\n{log}");
    }
}

#[test]
fn the_guests_own_strace_and_ptrace_stepping_work_while_hvtrace_steps_a_shell() {
    require_kvm();
    let unstepped = ptrace_steps(&["/usr/bin/hv-step-calls"]).summary;
    // hvtrace steps the shell (not its children: no -f); meanwhile the
    // guest's strace and hv-stepcount ptrace its children, stepping one.
    let script = "strace -o /tmp/s /usr/bin/hv-step-calls && \
                  hv-stepcount step /usr/bin/hv-step-calls && \
                  grep -c 'write(1, \"calls' /tmp/s";
    let (out, log) = hv_steps(&["--summary", "--quiet-steps"], &["sh", "-c", script]);
    let text = stdout(&out);
    assert!(
        text.contains(&unstepped),
        "the guest's stepper was disturbed:\n{text}\nexpected {unstepped}"
    );
    assert!(
        text.lines().any(|l| l.trim() == "1"),
        "the guest's strace lost the write:\n{text}"
    );
    let (insns, _, syscalls) = totals(&log);
    assert!(
        insns > 1000 && syscalls > 3,
        "the shell was not stepped:\n{log}"
    );
    // The children were not stepped (no -f) and never saw a SIGTRAP: they
    // ran to their ends (the shell's && chain).
    assert!(!log.contains("SIGTRAP"), "{log}");
}

/// Votes SINGLESTEP at every report until told to stop; counts steps and
/// tells the test the thread id at exec.
struct Stepper {
    steps: AtomicU64,
    exec: Mutex<Option<Sender<i32>>>,
    bad: Mutex<Vec<String>>,
}

impl EngineOps for Stepper {
    fn report_quiesce(
        &self,
        _a: ResumeAction,
        _e: &Engine,
        thread: &ThreadContext,
        _ev: EventMask,
    ) -> ResumeAction {
        if let Some(step) = thread.step {
            self.steps.fetch_add(1, Ordering::Relaxed);
            let regs = thread.regs().expect("a step report has the registers");
            if regs.get(guest_introspect::pt_regs::Reg::Ip) != step.ip {
                self.bad.lock().unwrap().push(format!("{step:?}"));
            }
        }
        ResumeAction::SingleStep
    }
    fn report_exec(
        &self,
        _a: ResumeAction,
        _e: &Engine,
        t: &ThreadContext,
        _f: &str,
    ) -> ResumeAction {
        if let Some(tx) = self.exec.lock().unwrap().take() {
            let _ = tx.send(t.tid);
        }
        ResumeAction::SingleStep
    }
}

#[test]
fn a_thread_detached_mid_step_runs_on_and_nothing_is_left_behind() {
    require_kvm();
    let mut g = InProcessGuest::restore_default();
    let tracer = Tracer::install(g.session.vm(), g.info.clone()).unwrap();
    tracer.ensure_step_site(g.session.vm()).unwrap();
    let step_traps: Vec<_> = tracer
        .traps()
        .into_iter()
        .filter(|p| p.site == utrace::sites::Site::Step)
        .collect();
    assert_eq!(step_traps.len(), 1, "one STEP trap, at send_sigtrap");
    let (tx, rx) = channel();
    let stepper = Arc::new(Stepper {
        steps: AtomicU64::new(0),
        exec: Mutex::new(Some(tx)),
        bad: Mutex::new(Vec::new()),
    });
    let cmd: Vec<String> = ["hv-spin", "3"].iter().map(|s| s.to_string()).collect();
    tracer
        .trace_next_exec(
            g.session.vm(),
            cmd.clone(),
            EngineSpec {
                ops: stepper.clone(),
                events: EventMask(EventMask::QUIESCE.0 | EventMask::EXEC.0),
                follow: false,
                data: None,
            },
        )
        .unwrap();
    g.session.start_exec(&cmd).unwrap();
    let tid = rx.recv_timeout(Duration::from_secs(120)).expect("exec");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stepper.steps.load(Ordering::Relaxed) < 3000 {
        assert!(
            Instant::now() < deadline,
            "only {} steps",
            stepper.steps.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Detached mid-step, from outside: the thread is in user mode with TF.
    let engine = tracer.engines(tid).remove(0);
    tracer
        .control(g.session.vm(), tid, &engine, ResumeAction::Detach)
        .unwrap();
    let steps_then = stepper.steps.load(Ordering::Relaxed);
    // The STEP trap goes once the thread's last TF is cleared.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tracer.release_step_site(g.session.vm()).unwrap() {
        assert!(Instant::now() < deadline, "the STEP trap stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !tracer
            .traps()
            .iter()
            .any(|p| p.site == utrace::sites::Site::Step),
        "the STEP trap stayed in the tracer's list"
    );
    // The kernel's own instruction is back where the trap was.
    let vm = g.session.vm();
    vm.pause_all().unwrap();
    let space = vm.vcpu_sregs(0).unwrap().view.kernel_space();
    for p in &step_traps {
        let mut bytes = [0u8; 15];
        guest_introspect::paging::read_virt(
            vm.ram(),
            space,
            guest_introspect::memory::VirtAddr(p.va),
            &mut bytes,
        )
        .unwrap();
        let insn =
            iced_x86::Decoder::with_ip(64, &bytes, p.va, iced_x86::DecoderOptions::NONE).decode();
        assert_eq!(
            format!("{insn}"),
            p.instruction,
            "at {}+{:#x}",
            p.symbol,
            p.offset
        );
    }
    vm.resume_all().unwrap();
    let code = g.wait_exit();
    let out = g.stdout();
    assert_eq!(code, 0, "hv-spin did not end normally (a SIGTRAP?):\n{out}");
    assert!(out.contains("spin done"), "{out}");
    assert_eq!(
        stepper.steps.load(Ordering::Relaxed),
        steps_then,
        "steps after the detach"
    );
    assert!(
        stepper.bad.lock().unwrap().is_empty(),
        "{:?}",
        stepper.bad.lock().unwrap()
    );
    tracer.remove(g.session.vm()).unwrap();
    g.session.shutdown();
}

/// `hvtrace run --api-sock SOCK -- COMMAND` in the background, and the
/// first task of the guest's `ps` with name `comm` once it shows up.
fn serve(command: &[&str], comm: &str) -> (ApiVm, PathBuf, serde_json::Value) {
    let sock = temp_path("steps.sock");
    let child = Command::new(hvtrace_bin())
        .args(["run", "--api-sock", sock.to_str().unwrap(), "--"])
        .args(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hvtrace run");
    let vm = ApiVm::new(child, sock.clone());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "no {comm} in the guest's ps");
        if let Ok(v) = api_call(&sock, r#"{"v":1,"op":"ps"}"#) {
            let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
            if let Some(t) = tasks.into_iter().find(|t| t["comm"] == comm) {
                return (vm, sock, t);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn attach_steps_a_running_process_through_its_exec() {
    require_kvm();
    let oracle = ptrace_steps(&["/usr/bin/hv-step-loop"]).executed();
    // The shell, while its `sleep` runs.
    let (mut vm, sock, sleep) = serve(
        &["sh", "-c", "sleep 3; exec /usr/bin/hv-step-loop"],
        "sleep",
    );
    let pid = sleep["ppid"].as_i64().expect("ppid");
    let trace = temp_path("attach-steps.txt");
    let out = hvtrace(&[
        "attach",
        "--api-sock",
        sock.to_str().unwrap(),
        "-p",
        &pid.to_string(),
        "--steps",
        "-o",
        trace.to_str().unwrap(),
    ]);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}\n{log}", stderr(&out));
    let exec = log
        .lines()
        .position(|l| l.starts_with("execve(\"/usr/bin/hv-step-loop\""))
        .unwrap_or_else(|| panic!("no exec line:\n{log}"));
    // The shell stepped before its exec (busybox, no symbols) ...
    assert!(
        step_lines(&log.lines().take(exec).collect::<Vec<_>>().join("\n")).len() > 100,
        "{log}"
    );
    // ... and the new program from its first instruction, as the guest's
    // own ptrace steps it, with its symbols.
    let after: Vec<&str> = log.lines().skip(exec + 1).collect();
    let lines = step_lines(&after.join("\n"));
    let got: Vec<u64> = lines.iter().map(|l| l.0).collect();
    assert_eq!(got, oracle, "{log}");
    assert!(lines[0].1.contains("<_start>"), "{}", lines[0].1);
    assert!(log.contains("+++ exited with 0 +++"), "{log}");
    let child = vm.take_child();
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
}

/// objdump of the image's copy of `path` (extracted with cpio).
fn objdump_guest_file(path: &str) -> BTreeMap<u64, (Insn, String)> {
    let image = default_image();
    let dir = temp_path("cpio");
    std::fs::create_dir_all(&dir).unwrap();
    let rel = path.trim_start_matches('/');
    let st = Command::new("cpio")
        .args(["-i", "--quiet", "-d", rel])
        .current_dir(&dir)
        .stdin(std::fs::File::open(&image).unwrap())
        .status()
        .expect("cpio");
    assert!(st.success());
    let file = dir.join(rel);
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&file)
        .output()
        .expect("objdump");
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows: Vec<(u64, String)> = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((a, rest)) = l.trim_start().split_once(":\t") else {
            continue;
        };
        if let Ok(a) = u64::from_str_radix(a, 16) {
            rows.push((a, rest.to_string()));
        }
    }
    let mut map = BTreeMap::new();
    for (i, (a, text)) in rows.iter().enumerate() {
        let len = rows.get(i + 1).map_or(1, |n| n.0.saturating_sub(*a));
        // The mnemonic and its first operand, past any prefix.
        let words: Vec<&str> = text
            .split_whitespace()
            .skip_while(|w| {
                matches!(
                    *w,
                    "addr32"
                        | "data16"
                        | "bnd"
                        | "notrack"
                        | "rep"
                        | "repz"
                        | "repnz"
                        | "lock"
                        | "cs"
                        | "ds"
                )
            })
            .collect();
        let mnemonic = words.first().copied().unwrap_or("").to_string();
        let operand = words.get(1).copied().unwrap_or("").to_string();
        map.insert(*a, (Insn { len, mnemonic }, operand));
    }
    map
}

#[test]
fn hvtrace_step_moves_a_stopped_thread_one_instruction_at_a_time() {
    require_kvm();
    // hv-spin is a symlink to the multi-call hv-tests.
    let dis = objdump_guest_file("/usr/bin/hv-tests");
    let (mut vm, sock, spin) = serve(&["hv-spin", "4"], "hv-spin");
    let s = sock.to_str().unwrap();
    let pid = spin["pid"].as_i64().unwrap();
    let p = pid.to_string();
    let out = hvtrace(&["stop", "--api-sock", s, "-p", &p]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ip_of = |v: &serde_json::Value| hex(v["regs"]["ip"].as_str().expect("ip"));
    let regs = |args: &[&str]| -> serde_json::Value {
        let out = hvtrace(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(stdout(&out).trim()).unwrap()
    };
    let mut ip = ip_of(&regs(&["regs", "--api-sock", s, "-t", &p, "--json"]));
    let mut stepped = 0;
    while stepped < 25 {
        let v = regs(&["step", "--api-sock", s, "-t", &p, "--json"]);
        assert_eq!(v["steps"], 1, "{v}");
        let next = ip_of(&v);
        assert_eq!(hex(v["ip"].as_str().unwrap()), next, "{v}");
        if let Some((insn, text)) = dis.get(&ip) {
            let fallthrough = ip + insn.len;
            let target = u64::from_str_radix(text, 16).ok();
            assert!(
                next == fallthrough || Some(next) == target || is_branch(&insn.mnemonic),
                "one step from {ip:#x} ({text}) went to {next:#x}"
            );
            if !is_branch(&insn.mnemonic) && insn.mnemonic != "syscall" {
                assert_eq!(next, fallthrough, "{ip:#x}: {text}");
            }
            stepped += 1;
        } else {
            // vDSO code (the clock read): not in the program's file.
            assert!(next != ip || stepped > 0, "no progress at {ip:#x}");
            stepped += 1;
        }
        ip = next;
    }
    // Ten more at once, then blocks: the thread stays held in between.
    let v = regs(&["step", "--api-sock", s, "-t", &p, "-n", "10", "--json"]);
    assert_eq!(v["steps"], 10, "{v}");
    let v = regs(&["step", "--api-sock", s, "-t", &p, "--blocks", "--json"]);
    assert_eq!(v["steps"], 1, "{v}");
    let out = hvtrace(&["cont", "--api-sock", s, "-p", &p]);
    assert!(out.status.success(), "{}", stderr(&out));
    let child = vm.take_child();
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(stdout(&run).contains("spin done"), "{}", stdout(&run));
}
