//! `hvtrace gdbserver`: Debian's gdb on the host debugs a process inside
//! the guest. The oracle is the same gdb debugging the same static binary
//! natively on the host (ptrace): the values, backtraces and stops it
//! prints, and the program's own output, must be the same. The guest's own
//! /proc is the oracle for its threads, and the program's bytes in the
//! guest image for what a session leaves behind.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hvtrace_tests::{default_image, hvtrace_bin, require_kvm, root, temp_path, ApiVm};

/// The debugging target, in the guest at this path.
const DEMO: &str = "/usr/bin/hv-gdb-demo";

/// The guest image's copy of `path` (the exact bytes the guest runs).
fn image_file(path: &str) -> Vec<u8> {
    let image = std::fs::read(default_image()).expect("the guest image");
    let want = path.trim_start_matches('/');
    let found = vmm::initrd::cpio_members(&image)
        .map_while(Result::ok)
        .find(|m| m.name == want.as_bytes())
        .map(|m| image[m.data].to_vec());
    found.unwrap_or_else(|| panic!("{path} is not in the guest image"))
}

/// The demo binary on the host, for the native reference run.
fn host_demo() -> PathBuf {
    let out = temp_path("hv-gdb-demo");
    std::fs::write(&out, image_file(DEMO)).unwrap();
    let mut perm = std::fs::metadata(&out).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&out, perm).unwrap();
    out
}

/// The entry point of ELF file `path`, as binutils' readelf reads it.
fn elf_entry(path: &Path) -> u64 {
    let out = Command::new("readelf")
        .arg("-h")
        .arg(path)
        .output()
        .expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("Entry point address:"))
        .expect("readelf's entry point");
    let hex = line.rsplit("0x").next().unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// gdb in batch mode with `commands`, from images/ (where the demo's
/// debug information finds its source); its stdout.
fn gdb(args: &[&str], commands: &[&str]) -> String {
    let script = temp_path("gdb-script");
    let mut text = String::from("set pagination off\nset confirm off\nset width 0\n");
    for c in commands {
        text.push_str(c);
        text.push('\n');
    }
    std::fs::write(&script, text).unwrap();
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-x"])
        .arg(&script)
        .args(args)
        .current_dir(root().join("images"))
        .stdin(Stdio::null())
        .output()
        .expect("run gdb (Debian's gdb: scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "--- gdb {args:?} stdout:\n{stdout}--- stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The lines of a gdb session a user reads for its results: stops,
/// printed values, backtrace frames, source lines stepped to, the exit;
/// stack addresses and process ids blanked (they differ between runs).
fn results(gdb_out: &str) -> Vec<String> {
    let mut v = Vec::new();
    for l in gdb_out.lines() {
        let keep = l.starts_with("Breakpoint ")
            || l.starts_with("Temporary breakpoint ")
            || l.starts_with("Run till exit")
            || l.starts_with("Value returned")
            || l.starts_with("=> ")
            || l.starts_with("rip ")
            || l.starts_with("0x")
            || l.starts_with('$')
            || l.starts_with('#')
            || l.starts_with("Program received signal")
            || l.starts_with("Program terminated")
            || l.contains("exited with code")
            || l.contains("exited normally")
            || l.split('\t')
                .next()
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if keep {
            v.push(blank_stack_addresses(l));
        }
    }
    v
}

/// `0x7ff...` (stack) addresses and `process N` blanked.
fn blank_stack_addresses(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("0x7ff") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        let n = tail.chars().take_while(|c| c.is_ascii_hexdigit()).count();
        out.push_str("0xSTACK");
        rest = &tail[n..];
    }
    out.push_str(rest);
    match out.find("(process ") {
        Some(i) => {
            let end = out[i..].find(')').map_or(out.len(), |e| i + e);
            format!("{}(process N{}", &out[..i], &out[end..])
        }
        None => out,
    }
}

/// The program's own lines (rounds, workers, signals) in `text`, sorted
/// (a pipe and a console interleave them differently with gdb's).
fn program_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| {
            [
                "round ",
                "done: ",
                "worker ",
                "got signal",
                "stopped spinning",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// `hvtrace gdbserver --listen SOCK -- argv`, once it listens.
struct Server {
    child: Child,
    sock: PathBuf,
    stdout: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(argv: &[&str]) -> Self {
        Self::start_on("minimal", argv)
    }

    /// On guest kernel `kernel` (`minimal`, `debian-6.1`, `debian-6.12`).
    fn start_on(kernel: &str, argv: &[&str]) -> Self {
        require_kvm();
        // The cached snapshot first (a cold boot, once per image).
        let out = Command::new(hvtrace_bin())
            .args(["run", "--kernel", kernel, "--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sock = temp_path("gdb.sock");
        let mut child = Command::new(hvtrace_bin())
            .args(["gdbserver", "--kernel", kernel, "--listen"])
            .arg(&sock)
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hvtrace gdbserver");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        wait_line(&stderr, Duration::from_secs(300), |l| {
            l.starts_with("Listening on")
        });
        std::thread::spawn(move || {
            while let Ok(l) = stderr.recv() {
                eprintln!("gdbserver: {l}");
            }
        });
        Self {
            child,
            sock,
            stdout,
        }
    }

    /// Waits for hvtrace's end: its exit status and what the guest printed.
    fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "hvtrace gdbserver did not end");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out: Vec<String> = self.stdout.try_iter().collect();
        (status.code().unwrap_or(-1), out.join("\n"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reader's lines, on a channel.
fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `rx` satisfying `want`.
fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    limit: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if want(&l) => return l,
            Ok(l) => eprintln!("> {l}"),
            Err(e) => panic!("no such line within {limit:?}: {e}"),
        }
    }
}

fn target(sock: &Path) -> String {
    format!("target remote {}", sock.display())
}

/// The session a developer has with a program: break in a function,
/// print arguments, a backtrace, step over lines, change a local and see
/// the program's output change, finish, step and next single
/// instructions, a temporary breakpoint, until, continue to the next hit
/// and to the end.
const SESSION: [&str; 22] = [
    "break scale",
    "print value",
    "print factor",
    "backtrace",
    "next",
    "print product",
    "set var product = 1000",
    "next",
    "print result",
    "finish",
    "next",
    "stepi",
    "x/i $pc",
    "nexti",
    "info registers rip",
    "tbreak accumulate",
    "continue",
    "until 38",
    "continue",
    "print value",
    "delete",
    "continue",
];

#[test]
fn a_gdb_session_prints_what_native_gdb_prints() {
    session_matches_native_on("minimal");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_gdb_session_prints_what_native_gdb_prints() {
    session_matches_native_on("debian-6.1");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_gdb_session_prints_what_native_gdb_prints() {
    session_matches_native_on("debian-6.12");
}

fn session_matches_native_on(kernel: &str) {
    let native_bin = host_demo();
    let mut native = vec!["break scale", "run"];
    native.extend(&SESSION[1..]);
    let native_out = gdb(&[native_bin.to_str().unwrap()], &native);

    let server = Server::start_on(kernel, &[DEMO]);
    let t = target(&server.sock);
    let mut remote = vec![
        "set remotetimeout 30",
        t.as_str(),
        "break scale",
        "continue",
    ];
    remote.extend(&SESSION[1..]);
    let remote_out = gdb(&[], &remote);
    let (status, guest_out) = server.finish();

    let want = results(&native_out);
    assert!(
        want.iter()
            .any(|l| l.starts_with("Breakpoint 1, scale (value=10, factor=3)")),
        "the native reference session did not run: {native_out}"
    );
    // Connected, gdb finds the program at its first instruction: the ELF
    // entry point (readelf's), as `gdbserver PROG` leaves it.
    let mut got = results(&remote_out);
    let first = got.remove(0);
    assert_eq!(
        first,
        format!("{:#018x} in _start ()", elf_entry(&native_bin))
    );
    assert_eq!(got, want, "gdb's results differ from native gdb's");
    // The changed local reached the program: its output is native's.
    assert_eq!(program_lines(&guest_out), program_lines(&native_out));
    assert!(guest_out.contains("round 0: scale=1001"), "{guest_out}");
    assert_eq!(
        status, 7,
        "hvtrace gdbserver exits with the program's status"
    );
    // gdb found the program by itself (exec-file + vFile), no local copy.
    assert!(
        remote_out.contains("scale (value=10, factor=3) at"),
        "no symbols: {remote_out}"
    );
}

/// `text` with every hexadecimal number blanked.
fn blank_hex(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("0x") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        let n = tail.chars().take_while(|c| c.is_ascii_hexdigit()).count();
        out.push_str("0xN");
        rest = &tail[n..];
    }
    out.push_str(rest);
    out
}

#[test]
fn a_dynamic_programs_libraries_are_found_as_ldd_lists_them() {
    // strace in the guest image is Debian's, with the host's libraries
    // at the host's paths (images/build.sh), so the host's ldd and gdb
    // are the oracles: the libraries, and the frames at a libc function.
    let script = [
        "set breakpoint pending on",
        "break write",
        "START",
        "info sharedlibrary",
        "backtrace 3",
        "kill",
    ];
    let with = |start: &str| -> Vec<String> {
        script
            .iter()
            .map(|c| {
                if *c == "START" {
                    start.to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let native = with("run");
    let native: Vec<&str> = native.iter().map(String::as_str).collect();
    let native_out = gdb(&["--args", "/usr/bin/strace", "-V"], &native);

    let server = Server::start(&["/usr/bin/strace", "-V"]);
    let t = target(&server.sock);
    let mut remote = vec!["set remotetimeout 30".to_string(), t];
    remote.extend(with("continue"));
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    let remote_out = gdb(&[], &remote);
    drop(server);

    let libs = |out: &str| -> BTreeSet<String> {
        out.lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter(|w| w.contains(".so") && !w.starts_with("linux-vdso"))
            .map(|w| w.rsplit('/').next().unwrap().to_string())
            .collect()
    };
    let ldd = Command::new("ldd")
        .arg("/usr/bin/strace")
        .output()
        .expect("ldd");
    let want: BTreeSet<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.contains(".so") && !w.starts_with("linux-vdso"))
        .map(|w| w.rsplit('/').next().unwrap().to_string())
        .collect();
    assert!(want.contains("libc.so.6"), "ldd: {want:?}");
    assert_eq!(
        libs(&remote_out),
        want,
        "gdb's libraries in the guest are not ldd's"
    );
    // The same frames as native gdb's at libc's write (addresses aside).
    // Function names only: the arguments differ where stdout's buffering
    // does (a console in the guest, a pipe on the host).
    let frames = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with('#'))
            .filter_map(|l| {
                let l = blank_hex(l);
                let call = l.split(" (").next()?;
                Some(call.rsplit(' ').next()?.to_string())
            })
            .collect()
    };
    let want = frames(&native_out);
    assert_eq!(
        want.first().map(String::as_str),
        Some("__GI___libc_write"),
        "{native_out}"
    );
    assert!(want.len() >= 3, "{native_out}");
    assert_eq!(frames(&remote_out), want);
}

#[test]
fn every_thread_the_guests_proc_lists_is_a_gdb_thread() {
    threads_match_proc_on("minimal");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_every_thread_the_guests_proc_lists_is_a_gdb_thread() {
    threads_match_proc_on("debian-6.1");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_every_thread_the_guests_proc_lists_is_a_gdb_thread() {
    threads_match_proc_on("debian-6.12");
}

fn threads_match_proc_on(kernel: &str) {
    let server = Server::start_on(kernel, &[DEMO, "threads", "3"]);
    let t = target(&server.sock);
    let out = gdb(
        &[],
        &[
            "set remotetimeout 30",
            &t,
            "break checkpoint",
            "continue",
            "info threads",
            "thread 2",
            "backtrace 1",
            "thread 1",
            "backtrace 1",
            "delete",
            "continue",
        ],
    );
    let (status, guest_out) = server.finish();
    assert_eq!(status, 0, "{guest_out}");
    let tasks: BTreeSet<u64> = guest_out
        .lines()
        .find_map(|l| l.strip_prefix("tasks:"))
        .expect("the program lists /proc/self/task")
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(tasks.len(), 4, "{guest_out}");
    // `info threads`: one line per thread, "Thread P.T" or "Thread T".
    let listed: BTreeSet<u64> = out
        .lines()
        .filter_map(|l| {
            // The table's rows: "* 1    Thread 1.34  ...", "  2    Thread 1.35 ...".
            let row = l.trim_start().trim_start_matches('*').trim_start();
            if !row.starts_with(|c: char| c.is_ascii_digit()) {
                return None;
            }
            let at = row.find("Thread ")?;
            let id = row[at + 7..].split_whitespace().next()?;
            id.rsplit('.').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        listed, tasks,
        "gdb's threads are not the guest's /proc/PID/task"
    );
    assert!(
        out.contains("[Switching to thread 2"),
        "thread 2 not selected: {out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("#0  checkpoint ()")),
        "thread 1 is not stopped in checkpoint: {out}"
    );
    // All-stop: the workers had not passed their barrier when the main
    // thread stopped, and all ran to their end after.
    assert_eq!(guest_out.matches("worker ").count(), 3, "{guest_out}");
}

/// A VM `hvtrace run --api-sock` serves while `script` runs in its shell,
/// which prints `A=PID` for the process to debug: the VM, its socket, its
/// stdout lines and that pid.
fn serve_script(script: &str) -> (ApiVm, PathBuf, std::sync::mpsc::Receiver<String>, String) {
    require_kvm();
    let sock = temp_path("gdb-api.sock");
    let mut child = Command::new(hvtrace_bin())
        .args(["run", "--api-sock"])
        .arg(&sock)
        .args(["--", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hvtrace run");
    let stdout = lines_of(child.stdout.take().unwrap());
    let vm = ApiVm::new(child, sock.clone());
    let a = wait_line(&stdout, Duration::from_secs(300), |l| l.starts_with("A="))[2..].to_string();
    (vm, sock, stdout, a)
}

/// `hvtrace gdbserver -p PID` on the VM at `sock`, listening on a new
/// socket named after `name`, once it listens: the process, the socket
/// and its stderr lines.
fn attach_server(
    sock: &Path,
    pid: &str,
    name: &str,
) -> (Child, PathBuf, std::sync::mpsc::Receiver<String>) {
    let gdbsock = temp_path(name);
    let mut server = Command::new(hvtrace_bin())
        .args(["gdbserver", "--api-sock"])
        .arg(sock)
        .args(["-p", pid, "--listen"])
        .arg(&gdbsock)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hvtrace gdbserver");
    let errs = lines_of(server.stderr.take().unwrap());
    wait_line(&errs, Duration::from_secs(60), |l| {
        l.starts_with("Listening on")
    });
    (server, gdbsock, errs)
}

#[test]
fn a_signal_stops_in_gdb_and_is_passed_on_and_breakpoints_stay_in_one_process() {
    // A waits for SIGUSR1; meanwhile B, the same binary, calls scale()
    // (where gdb has a breakpoint in A) three times, then A is signalled.
    let script = format!(
        "{DEMO} usr1 & a=$!; echo A=$a; sleep 12; {DEMO}; echo B=$?; kill -USR1 $a; wait $a; echo A-status=$?; md5sum {DEMO}"
    );
    let (vm, sock, stdout, a) = serve_script(&script);
    let (mut server, gdbsock, _errs) = attach_server(&sock, &a, "gdb.sock");
    let t = target(&gdbsock);
    let out = gdb(
        &[],
        &[
            "set remotetimeout 30",
            &t,
            "break scale",
            "continue",
            "continue",
        ],
    );
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lines.iter().any(|l: &String| l.contains(DEMO)) {
        let left = deadline.saturating_duration_since(Instant::now());
        lines.push(stdout.recv_timeout(left).expect("the guest script's end"));
    }
    let _ = server.wait();
    drop(vm);
    let text = lines.join("\n");
    // gdb saw the signal as ptrace shows it, and passed it on.
    assert!(
        out.contains("Program received signal SIGUSR1"),
        "no SIGUSR1 stop: {out}"
    );
    assert!(out.contains("exited normally"), "{out}");
    assert!(
        text.contains("got signal 10"),
        "the handler did not run: {text}"
    );
    assert!(text.contains("A-status=0"), "{text}");
    // B ran through scale() untouched by A's breakpoint.
    assert!(
        text.contains("B=7"),
        "the second process was disturbed: {text}"
    );
    assert!(!out.contains("Breakpoint 1, scale"), "{out}");
    // The program's file in the guest is the image's, byte for byte.
    let md5 = Command::new("md5sum")
        .arg(host_demo())
        .output()
        .expect("md5sum");
    let want = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&want) && l.contains(DEMO)),
        "{DEMO} changed in the guest (want md5 {want}): {text}"
    );
}

#[test]
fn detach_and_a_killed_gdb_leave_the_process_running_to_its_end() {
    let script = format!("{DEMO} spin & a=$!; echo A=$a; wait $a; echo A-status=$?");
    let (vm, sock, stdout, a) = serve_script(&script);
    let serve = |n: &str| attach_server(&sock, &a, n);

    // 1. A gdb killed while the program runs with a breakpoint inserted
    // (at the spin loop's exit, never reached while `stop` is 0).
    let (mut s1, g1, errs1) = serve("gdb1.sock");
    let script1 = temp_path("gdb-script");
    let continuing = temp_path("continuing");
    std::fs::write(
        &script1,
        format!(
            "set remotetimeout 30\ntarget remote {}\nbreak hv-gdb-demo.c:{}\nshell touch {}\ncontinue\n",
            g1.display(),
            line_of("printf(\"stopped spinning"),
            continuing.display()
        ),
    )
    .unwrap();
    let mut g = Command::new("gdb")
        .args(["-nx", "-q", "-x"])
        .arg(&script1)
        .current_dir(root().join("images"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gdb");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !continuing.exists() {
        assert!(Instant::now() < deadline, "gdb never got to `continue`");
        std::thread::sleep(Duration::from_millis(50));
    }
    // `continue` inserts the breakpoint and resumes the program.
    std::thread::sleep(Duration::from_millis(1500));
    g.kill().unwrap();
    let _ = g.wait();
    wait_line(&errs1, Duration::from_secs(30), |l| {
        l.contains("Detached from process")
    });
    assert!(s1.wait().unwrap().success());

    // 2. Another gdb: the program still spins (it was left running, and
    // no int3 of the first session is in its memory); this one ends it,
    // while `hvtrace attach` traces the same process beside the stub.
    let mut tracer = Command::new(hvtrace_bin())
        .args(["attach", "--api-sock"])
        .arg(&sock)
        .args(["-p", &a])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hvtrace attach");
    let trace = lines_of(tracer.stderr.take().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let (mut s2, g2, _errs2) = serve("gdb2.sock");
    let t = target(&g2);
    let bp_line = line_of("printf(\"stopped spinning");
    let out = gdb(
        &[],
        &[
            "set remotetimeout 30",
            &t,
            "print stop",
            &format!("info line {bp_line}"),
            "x/1bx $_",
            "set var stop = 1",
            "detach",
        ],
    );
    assert!(out.contains("$1 = 0"), "{out}");
    // No int3 of the first session left where its breakpoint was.
    let byte = out
        .lines()
        .find(|l| l.starts_with("0x") && l.contains(":\t0x"))
        .unwrap_or_else(|| panic!("no x output: {out}"));
    assert!(
        !byte.ends_with("0xcc"),
        "a breakpoint byte was left: {byte}"
    );
    assert!(s2.wait().unwrap().success());
    let end = wait_line(&stdout, Duration::from_secs(60), |l| {
        l.starts_with("A-status=")
    });
    assert_eq!(end, "A-status=0");
    // The tracer saw the program's end as strace shows it.
    wait_line(&trace, Duration::from_secs(30), |l| {
        // stdout is unbuffered: printf writes the text, then the newline.
        l == "write(1, \"stopped spinning\", 16) = 16"
    });
    wait_line(&trace, Duration::from_secs(30), |l| {
        l == "+++ exited with 0 +++"
    });
    let _ = tracer.wait();
    drop(vm);
}

/// The line number of the first line of the demo's source containing
/// `text`.
fn line_of(text: &str) -> usize {
    let src = std::fs::read_to_string(root().join("images/programs/debug/hv-gdb-demo.c")).unwrap();
    src.lines()
        .position(|l| l.contains(text))
        .expect("the line")
        + 1
}

#[test]
fn hostile_packets_get_error_replies_and_ctrl_c_stops_the_process() {
    let server = Server::start(&[DEMO, "spin"]);
    let mut s = std::os::unix::net::UnixStream::connect(&server.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut packets: Vec<Vec<u8>> = vec![
        b"m0,ffffffffffffffff".to_vec(),
        b"mffffffffffffffff,10".to_vec(),
        b"m1ffffffffffffffff0,10".to_vec(),
        b"M0,4:zzzz".to_vec(),
        b"Gzz".to_vec(),
        b"G00".to_vec(),
        b"Hgffffffff".to_vec(),
        b"vCont;s:999999".to_vec(),
        b"Z0,0,1".to_vec(),
        b"qXfer:exec-file:read::ffffffffffffffff,ffff".to_vec(),
        b"vFile:open:2f6574632f736861646f77,0,0".to_vec(),
        b"vFile:pread:63,10000000,0".to_vec(),
        b"P99999=00".to_vec(),
    ];
    for _ in 0..200 {
        let n = (next() % 64) as usize;
        let body: Vec<u8> = (0..n)
            // Queries, reads and malformed commands; no resume or write
            // (those could legitimately run or change the program).
            .map(|_| b"0123456789abdef,:;mgpqzvH"[(next() % 25) as usize])
            .collect();
        packets.push(body);
    }
    for p in &packets {
        send(&mut s, p);
        assert!(
            read_reply(&mut s).is_some(),
            "no reply to {:?}",
            String::from_utf8_lossy(p)
        );
    }
    // Still a working session: a stop reason, then Ctrl-C while running.
    send(&mut s, b"?");
    let r = read_reply(&mut s).expect("a reply to ?");
    assert!(r.starts_with('T') || r.starts_with('S'), "{r}");
    send(&mut s, b"vCont;c");
    std::thread::sleep(Duration::from_millis(1500));
    std::io::Write::write_all(&mut s, &[0x03]).unwrap();
    let r = read_reply(&mut s).expect("a stop after Ctrl-C");
    assert!(r.starts_with("T02"), "not a SIGINT stop: {r}");
    // The program was running (spinning) and is held now: end its loop
    // by writing its `stop` flag, and detach.
    let stop = nm(&host_demo(), "stop");
    send(&mut s, format!("M{stop:x},4:01000000").as_bytes());
    assert_eq!(read_reply(&mut s).as_deref(), Some("OK"));
    send(&mut s, b"D");
    assert_eq!(read_reply(&mut s).as_deref(), Some("OK"));
    drop(s);
    let (status, out) = server.finish();
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("stopped spinning"), "{out}");
}

/// The address of `symbol` in `binary`, by binutils' nm.
fn nm(binary: &Path, symbol: &str) -> u64 {
    let out = Command::new("nm").arg(binary).output().expect("nm");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(symbol))
        .unwrap_or_else(|| panic!("no {symbol} in nm's output"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

/// Sends packet `body` with its checksum.
fn send(s: &mut std::os::unix::net::UnixStream, body: &[u8]) {
    let sum: u8 = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let mut frame = vec![b'$'];
    frame.extend_from_slice(body);
    frame.extend_from_slice(format!("#{sum:02x}").as_bytes());
    std::io::Write::write_all(s, &frame).unwrap();
}

/// One reply packet's body (acknowledging it), None on a read error.
fn read_reply(s: &mut std::os::unix::net::UnixStream) -> Option<String> {
    let mut byte = [0u8];
    // Skip the '+' acknowledgement(s) to our packet.
    loop {
        s.read_exact(&mut byte).ok()?;
        if byte[0] == b'$' {
            break;
        }
    }
    let mut body = Vec::new();
    loop {
        s.read_exact(&mut byte).ok()?;
        if byte[0] == b'#' {
            break;
        }
        body.push(byte[0]);
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).ok()?;
    std::io::Write::write_all(s, b"+").ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}
