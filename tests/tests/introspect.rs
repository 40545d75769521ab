//! Introspection against oracles the project did not write: the guest's own
//! /proc (read by `hv-procs` inside the guest at the same instant),
//! `pahole` for types (guest-introspect's own tests), and the kernel's
//! System.map for symbols.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvtrace_tests::*;
use serde_json::Value;

/// One task as (pid, tid, ppid, state, comm).
type Row = (i64, i64, i64, String, String);

/// A guest running `hv-procs` with a control socket, stopped at its
/// "ready" line; shut down when dropped.
struct ProcsGuest {
    _vm: ApiVm,
    sock: PathBuf,
    /// Tasks as the guest's /proc listed them, by tid.
    guest: BTreeMap<i64, Row>,
    /// hv-procs's pid, the fd and count of the read() it blocks in.
    ready: (i64, u64, u64),
    exe: String,
    /// Other lines the guest printed before hv-procs was ready.
    other: Vec<String>,
    /// The guest has more than one vCPU: other tasks may run while hv-procs
    /// reads /proc and while hvtrace reads the task list.
    smp: bool,
}

fn start_procs_guest(extra: &[&str], children: u32, threads: u32) -> ProcsGuest {
    start_procs_guest_after("", extra, children, threads)
}

/// Like [`start_procs_guest`], running the shell commands `before` first
/// (hv-procs then replaces the shell, keeping its pid).
fn start_procs_guest_after(
    before: &str,
    extra: &[&str],
    children: u32,
    threads: u32,
) -> ProcsGuest {
    require_kvm();
    let sock = temp_path(&format!("vm-{children}-{threads}.sock"));
    let mut args: Vec<String> = vec![
        "run".into(),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    if before.is_empty() {
        args.extend(["hv-procs".into(), children.to_string(), threads.to_string()]);
    } else {
        args.extend([
            "/bin/sh".into(),
            "-c".into(),
            format!("{before}; exec hv-procs {children} {threads}"),
        ]);
    }
    let mut child = Command::new(hvtrace_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hvtrace run");
    let mut guest = BTreeMap::new();
    let mut exe = String::new();
    let mut ready = None;
    let mut other = Vec::new();
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        let line = line.expect("guest output");
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["exe:", path] => exe = path.to_string(),
            ["task", pid, tid, ppid, state, comm @ ..] => {
                let n = |s: &str| s.parse::<i64>().unwrap();
                guest.insert(
                    n(tid),
                    (n(pid), n(tid), n(ppid), state.to_string(), comm.join(" ")),
                );
            }
            ["hv-procs:", "ready", pid, fd, count] => {
                ready = Some((
                    pid.parse().unwrap(),
                    fd.parse().unwrap(),
                    count.parse().unwrap(),
                ));
                break;
            }
            _ => other.push(line.clone()),
        }
    }
    let ready = ready.unwrap_or_else(|| {
        let status = child.wait();
        panic!("hv-procs never became ready (hvtrace: {status:?})")
    });
    ProcsGuest {
        _vm: ApiVm::new(child, sock.clone()),
        sock,
        guest,
        ready,
        exe,
        other,
        smp: extra.windows(2).any(|w| w[0] == "--cpus" && w[1] != "1"),
    }
}

fn hvtrace_json(args: &[&str]) -> Value {
    let out = hvtrace(args);
    assert!(
        out.status.success(),
        "hvtrace {args:?} failed: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn rows(reply: &Value) -> BTreeMap<i64, Row> {
    reply["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            let tid = t["tid"].as_i64().unwrap();
            (
                tid,
                (
                    t["pid"].as_i64().unwrap(),
                    tid,
                    t["ppid"].as_i64().unwrap(),
                    t["state"].as_str().unwrap().to_string(),
                    t["name"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The same tasks with the same pids, tids, ppids, names and states, except
/// what legitimately changes between the guest's listing and ours: the state
/// of hv-procs's main thread (it ran while it read /proc) and of the output
/// relay `hv-output` (it runs to move that very listing to the host), and
/// the work a workqueue worker last ran (the `-events` in
/// `kworker/0:1-events`; idle workers pick up periodic work at any time).
/// With several vCPUs (`smp`), a kernel thread (a child of kthreadd, pid 2)
/// woken by its timer may be running on another CPU in one listing and
/// asleep in the other (seen: `rcu_preempt` R in the guest's, I in ours):
/// then its state may differ, as long as one side says R; everything else
/// about it must still match. A workqueue worker (`kworker/...`, a child
/// of kthreadd) found in one listing only is no difference either: the
/// kernel's worker pools start workers when work queues up and retire
/// idle ones, on their own, between the two listings (seen on Debian 6.12
/// with two vCPUs: `kworker/1:2` started after the guest read /proc).
fn assert_same_tasks(
    guest: &BTreeMap<i64, Row>,
    host: &BTreeMap<i64, Row>,
    reporter: i64,
    smp: bool,
) {
    let strip = |m: &BTreeMap<i64, Row>| -> BTreeMap<i64, Row> {
        m.iter()
            .map(|(k, r)| {
                let mut r = r.clone();
                if *k == reporter || r.4 == "hv-output" {
                    r.3 = "-".into();
                }
                if r.4.starts_with("kworker/") {
                    if let Some(cut) = r.4.find(['-', '+']) {
                        r.4.truncate(cut);
                    }
                }
                (*k, r)
            })
            .collect()
    };
    let (mut g, mut h) = (strip(guest), strip(host));
    let is_worker = |r: &Row| r.2 == 2 && r.4.starts_with("kworker/");
    let came_or_went = |a: &BTreeMap<i64, Row>, b: &BTreeMap<i64, Row>| -> Vec<i64> {
        a.iter()
            .filter(|(k, r)| is_worker(r) && !b.contains_key(k))
            .map(|(k, _)| *k)
            .collect()
    };
    for k in came_or_went(&g, &h) {
        g.remove(&k);
    }
    for k in came_or_went(&h, &g) {
        h.remove(&k);
    }
    if smp {
        for (tid, gr) in g.iter_mut() {
            if let Some(hr) = h.get_mut(tid) {
                let transient = gr.2 == 2 && (gr.3 == "R" || hr.3 == "R");
                if transient && gr.3 != hr.3 {
                    (gr.3, hr.3) = ("R|sleep".into(), "R|sleep".into());
                }
            }
        }
    }
    let only_guest: Vec<_> = g.iter().filter(|(k, v)| h.get(k) != Some(v)).collect();
    let only_host: Vec<_> = h.iter().filter(|(k, v)| g.get(k) != Some(v)).collect();
    assert!(
        only_guest.is_empty() && only_host.is_empty(),
        "guest /proc and hvtrace ps differ\nonly in the guest: {only_guest:#?}\nonly in hvtrace: {only_host:#?}"
    );
}

/// `hvtrace ps` of the running guest `g` equals what its /proc listed
/// (a few dozen tasks at least), and the KASLR offset found from the vCPU
/// state is the non-zero one the VMM chose; the `ps` reply.
fn live_ps_matches(g: &ProcsGuest) -> Value {
    assert!(
        g.guest.len() >= 30,
        "hv-procs listed too few tasks: {:?}",
        g.guest
    );
    let sock = g.sock.display().to_string();
    let live = hvtrace_json(&["ps", "--api-sock", &sock, "--json"]);
    assert_same_tasks(&g.guest, &rows(&live), g.ready.0, g.smp);
    let ping = api_call(&g.sock, r#"{"v":1,"op":"ping"}"#).unwrap();
    assert_eq!(
        live["kernel"]["kaslr_offset"], ping["placement"]["virt_offset"],
        "detected vs applied KASLR offset"
    );
    assert_ne!(
        ping["placement"]["virt_offset"], "0x0",
        "the guest runs with KASLR"
    );
    live
}

/// `hvtrace inspect` of hv-procs's main thread, blocked in
/// read(fd, buf, count) (`ready` = (pid, fd, count)): asserts the syscall
/// number and arguments in its saved user registers; the whole reply.
fn inspect_blocked_read(sock: &str, ready: (i64, u64, u64)) -> Value {
    let (pid, fd, count) = ready;
    let insp = hvtrace_json(&[
        "inspect",
        "--api-sock",
        sock,
        "--pid",
        &pid.to_string(),
        "--json",
    ]);
    let sc = &insp["syscall"];
    assert_eq!(sc["nr"], 0, "read is x86-64 syscall 0: {insp:#}");
    let arg = |i: usize| {
        u64::from_str_radix(sc["args"][i].as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    assert_eq!(
        (arg(0), arg(2)),
        (fd, count),
        "read's fd and count: {insp:#}"
    );
    insp
}

#[test]
fn ps_matches_the_guests_own_proc_and_inspect_shows_the_blocked_read() {
    let g = start_procs_guest(&[], 20, 10);
    let sock = g.sock.display().to_string();
    let pid = g.ready.0;
    let live = live_ps_matches(&g);
    assert_eq!(
        live["kernel"]["symbols"], "kallsyms recovered from the kernel image",
        "the minimal kernel boots from its stripped bzImage"
    );
    // Its vmlinux (with an ELF symbol table) describes the same kernel.
    let vmlinux = script_path("kernel-config/build.sh", &[]).join("vmlinux");
    let elf = hvtrace_json(&[
        "ps",
        "--api-sock",
        &sock,
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(elf["kernel"]["symbols"], "vmlinux ELF symbol table");
    assert_same_tasks(&g.guest, &rows(&elf), pid, g.smp);

    // The same from guest memory alone (kallsyms + BTF found in the guest).
    let snap = g.sock.with_extension("snap");
    let snapshot = hvtrace(&[
        "snapshot",
        "--api-sock",
        &sock,
        "-o",
        snap.to_str().unwrap(),
    ]);
    assert!(snapshot.status.success(), "{}", stderr(&snapshot));
    let offline = hvtrace_json(&["ps", "--snapshot", snap.to_str().unwrap(), "--json"]);
    assert_eq!(
        offline["kernel"]["symbols"],
        "kallsyms recovered from guest memory"
    );
    assert_same_tasks(&g.guest, &rows(&offline), pid, g.smp);
    assert_eq!(
        offline["kernel"]["kaslr_offset"], live["kernel"]["kaslr_offset"],
        "both sources place the kernel at the same address"
    );

    let insp = inspect_blocked_read(&sock, g.ready);
    assert_eq!(
        insp["exe"].as_str(),
        Some(g.exe.as_str()),
        "exe as /proc/self/exe says"
    );
    assert_eq!(insp["task"]["uid"], 0);
    // Read from the task's own address space (its mm->pgd).
    assert_eq!(
        insp["cmdline"],
        serde_json::json!(["hv-procs", "20", "10"]),
        "{insp:#}"
    );
    let _ = std::fs::remove_file(snap);
}

/// The same live oracle on Debian's 6.1 cloud kernel (KASLR on, symbols
/// from the kallsyms in its vmlinuz, types from its BTF), with two vCPUs
/// (found in the ACPI MADT): each CPU's current task is read from its own
/// per-CPU area. Its cold boot takes over half an hour emulated on PVM KVM;
/// the hardware-KVM lane of scripts/test.sh runs this.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_ps_of_a_two_cpu_guest_matches_the_guests_own_proc() {
    debian_ps_matches("debian-6.1", "2");
}

/// The same on Debian's 6.12, also with two vCPUs.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_ps_of_a_two_cpu_guest_matches_the_guests_own_proc() {
    debian_ps_matches("debian-6.12", "2");
}

fn debian_ps_matches(kernel: &str, cpus: &str) {
    let g = start_procs_guest(&["--kernel", kernel, "--cpus", cpus], 20, 10);
    let _ = live_ps_matches(&g);
    let _ = inspect_blocked_read(&g.sock.display().to_string(), g.ready);
}

#[test]
fn a_wrong_system_map_is_refused() {
    // A System.map of "another build": the text is where it was, but
    // everything after it moved by a page (as when a rebuild changes the
    // text size), so linux_banner is not where the map says.
    let dir = script_path("kernel-config/build.sh", &[]);
    let map = std::fs::read_to_string(dir.join("System.map")).unwrap();
    let etext = map
        .lines()
        .find(|l| l.ends_with(" _etext"))
        .and_then(|l| u64::from_str_radix(&l[..16], 16).ok())
        .expect("_etext in System.map");
    let shifted: String = map
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, k, n) = (w.next()?, w.next()?, w.next()?);
            let a = u64::from_str_radix(a, 16).ok()?;
            let a = if a > etext { a + 4096 } else { a };
            Some(format!("{a:016x} {k} {n}\n"))
        })
        .collect();
    let g = start_procs_guest(&[], 2, 1);
    let bad = temp_path("bad-System.map");
    std::fs::write(&bad, shifted).unwrap();
    let kernel = dir.join("vmlinux");
    let out = hvtrace(&[
        "ps",
        "--api-sock",
        g.sock.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--system-map",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a wrong System.map was accepted");
    assert!(
        stderr(&out).contains("does not match the running kernel"),
        "unclear error: {}",
        stderr(&out)
    );
    // The right one is accepted, and reports its source.
    let good = hvtrace_json(&[
        "ps",
        "--api-sock",
        g.sock.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--system-map",
        dir.join("System.map").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(good["kernel"]["symbols"], "System.map");
    let _ = std::fs::remove_file(bad);
}

/// Writes `value` at kernel virtual `va` of a snapshot's memory.
fn poke(
    snap: &vmm::persist::OfflineSnapshot,
    space: guest_introspect::paging::AddressSpace,
    va: u64,
    value: u64,
) {
    let pa = guest_introspect::paging::translate(
        &snap.ram,
        space,
        guest_introspect::memory::VirtAddr(va),
    )
    .expect("address maps");
    snap.ram.write(pa.0, &value.to_le_bytes()).expect("write");
}

/// Runs `hvtrace ps` on a corrupted snapshot: it must fail, quickly, with a
/// message that says what is wrong.
fn assert_ps_refuses(snap: &Path, expect: &str) {
    let t = Instant::now();
    let out = hvtrace(&["ps", "--snapshot", snap.to_str().unwrap()]);
    let took = t.elapsed();
    assert!(
        !out.status.success(),
        "ps accepted a corrupt task list:\n{}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains(expect),
        "expected an error about {expect:?}, got: {err}"
    );
    assert!(
        took < Duration::from_secs(60),
        "ps took {took:?} on a corrupt guest"
    );
}

#[test]
fn hostile_task_lists_end_with_a_clear_error() {
    use guest_introspect::image::KernelInfo;
    use guest_introspect::kernel::{RunningKernel, VcpuView};
    use guest_introspect::tasks::{TaskReader, WalkLimits};

    let g = start_procs_guest(&[], 4, 1);
    let good = temp_path("hostile.snap");
    let out = hvtrace(&[
        "snapshot",
        "--api-sock",
        g.sock.to_str().unwrap(),
        "-o",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(g);

    // Find two processes' task-list nodes with the library itself.
    let snap = vmm::persist::load_offline(&good).unwrap();
    let s = &snap.state.vcpus[0].sregs;
    let vcpu = VcpuView {
        cr3: s.cr3,
        cr4: s.cr4,
        idt_base: s.idt.base,
        idt_limit: s.idt.limit,
    };
    let info = KernelInfo::from_memory(&snap.ram, &vcpu).unwrap();
    let k = RunningKernel::attach(&snap.ram, &vcpu, &info.symbols, &info.types, None).unwrap();
    let procs = TaskReader::new(&k)
        .unwrap()
        .processes(WalkLimits::default())
        .unwrap();
    assert!(procs.len() > 10);
    let tasks_off = info.types.member("task_struct", "tasks").unwrap().offset;
    let (early, late) = (procs[3] + tasks_off, procs[procs.len() - 2] + tasks_off);
    let late_next = k.read_u64(late, "late.next").unwrap();
    let space = k.space();
    drop(k);

    // A cycle that never returns to init_task: late.next = early.
    poke(&snap, space, late, early);
    let cyclic = temp_path("hostile-cycle.snap");
    vmm::persist::save_offline(&snap, &cyclic).unwrap();
    assert_ps_refuses(&cyclic, "cycle");

    // A wild pointer: late.next points nowhere.
    poke(&snap, space, late, 0xdead_0000_0000_0000);
    let wild = temp_path("hostile-wild.snap");
    vmm::persist::save_offline(&snap, &wild).unwrap();
    assert_ps_refuses(&wild, "cannot read the task list");

    // A process whose thread ring points into itself at an odd offset.
    // The list hvtrace walks: signal->thread_head where the kernel has it.
    let t = &info.types;
    let ring_name = if t.has_member("signal_struct", "thread_head") {
        "thread_node"
    } else {
        "thread_group"
    };
    let ring = t.member("task_struct", ring_name).unwrap().offset;
    poke(&snap, space, late, late_next); // the process list is sound again
    poke(&snap, space, procs[5] + ring, procs[5] + ring + 8);
    let odd = temp_path("hostile-odd.snap");
    vmm::persist::save_offline(&snap, &odd).unwrap();
    assert_ps_refuses(&odd, "thread");

    for f in [good, cyclic, wild, odd] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn sites_are_where_the_guests_own_kallsyms_says() {
    // The guest's /proc/kallsyms (root sees real, KASLR-shifted addresses)
    // is printed first, only the lines of the candidate functions (the whole
    // file takes minutes through an emulated serial port); hvtrace resolves
    // the sites from outside.
    let names: Vec<&str> = utrace::sites::SITES
        .iter()
        .flat_map(|s| s.candidates.iter().map(|c| c.function))
        .collect();
    let names = names.join("|");
    let grep = format!("grep -E ' ({names})(\\.[a-z]+\\.[0-9]+)?$' /proc/kallsyms");
    let g = start_procs_guest_after(&grep, &[], 2, 1);
    let kallsyms: std::collections::HashMap<String, u64> = g
        .other
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, k, n) = (w.next()?, w.next()?, w.next()?);
            ("Tt".contains(k)).then_some(())?;
            Some((n.to_string(), u64::from_str_radix(a, 16).ok()?))
        })
        .collect();
    assert!(
        kallsyms.len() >= 10,
        "the guest printed its kallsyms: {:?}",
        g.other
    );
    let v = hvtrace_json(&["sites", "--api-sock", g.sock.to_str().unwrap(), "--json"]);
    let sites = v["sites"].as_array().unwrap();
    let mut events: Vec<&str> = sites.iter().map(|s| s["event"].as_str().unwrap()).collect();
    events.dedup();
    assert_eq!(events.len(), utrace::sites::SITES.len(), "{v:#}");
    // The traps lie in those functions, at the offsets hvtrace found by
    // disassembly; QUIESCE has one per copy of the return-to-user loop
    // (one here: every return goes through exit_to_user_mode_prepare).
    let traps = v["traps"].as_array().unwrap();
    for t in traps {
        let name = t["symbol"].as_str().unwrap();
        let (va, offset) = (t["va"].as_u64().unwrap(), t["offset"].as_u64().unwrap());
        assert_eq!(kallsyms.get(name).map(|a| a + offset), Some(va), "{t:#}");
    }
    let quiesce: Vec<&str> = traps
        .iter()
        .filter(|t| t["event_name"] == "QUIESCE")
        .map(|t| t["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(quiesce, ["exit_to_user_mode_prepare"], "{v:#}");
    for s in sites {
        let name = s["symbol"].as_str().unwrap();
        let runtime =
            u64::from_str_radix(s["runtime"].as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap();
        assert_eq!(
            kallsyms.get(name),
            Some(&runtime),
            "{name}: hvtrace {runtime:#x}"
        );
    }
}
