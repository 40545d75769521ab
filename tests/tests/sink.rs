//! `--sink nats://...`: traced events published to a real NATS JetStream
//! server (Debian's `nats-server -js`, started by each test on a free
//! loopback port with its own store, and killed at the end), read back
//! with `hvtrace events`. The oracle is the same run's own trace file
//! (`-o FILE`): what comes back from the server must be it, line for line,
//! and every event's sequence number must be there exactly once.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hvtrace_tests::*;
use serde_json::Value;

/// A `nats-server -js` on 127.0.0.1, killed (and its store removed) when
/// dropped.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    jetstream: bool,
}

impl Nats {
    fn start() -> Nats {
        Nats::start_with(true)
    }

    /// A server with or without JetStream.
    fn start_with(jetstream: bool) -> Nats {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut n = Nats {
            child: None,
            port,
            dir: temp_path("nats"),
            jetstream,
        };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again: same port, same store) and waits until
    /// it serves.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.join("store"));
        }
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is installed by scripts/setup.sh (Debian's nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("Server is ready") {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the server `signal` (`STOP`, `CONT`).
    fn signal(&self, signal: &str) {
        let c = self.child.as_ref().expect("running");
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(c.id().to_string())
            .status();
    }

    /// Stops the server with `signal` (`TERM`, `KILL`) and waits for it
    /// to end.
    fn stop(&mut self, signal: &str) {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(c.id().to_string())
            .status();
        let _ = c.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop("KILL");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs hvtrace with `args`, killing it after `limit`.
fn hvtrace_within(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(hvtrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hvtrace");
    wait_within(child, limit, &format!("hvtrace {args:?}"))
}

/// Waits for `child` (its output read meanwhile: a full pipe would stall
/// it), killing it and failing after `limit`.
fn wait_within(child: Child, limit: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("the child's output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "{what} still running after {limit:?}\nstderr:\n{}",
                stderr(&out)
            );
        }
    }
}

/// `hvtrace events --sink URL [--vm VM] [more]`: its stdout (it must succeed).
fn events(url: &str, vm: Option<&str>, more: &[&str]) -> String {
    let mut args = vec!["events", "--sink", url];
    if let Some(vm) = vm {
        args.extend(["--vm", vm]);
    }
    args.extend_from_slice(more);
    let out = hvtrace_within(&args, Duration::from_secs(120));
    let err = stderr(&out);
    assert!(out.status.success(), "hvtrace {args:?} failed: {err}");
    // It says so when a VM's stream holds a sequence number twice or
    // lacks one.
    assert!(
        !err.contains(" again (") && !err.contains(" are missing"),
        "hvtrace {args:?}: the stream is not every event once:\n{err}"
    );
    stdout(&out)
}

/// The messages of one VM, as JSON.
fn messages(url: &str, vm: &str) -> Vec<Value> {
    events(url, Some(vm), &["--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `hvtrace-report` line of a run's stderr.
fn report(err: &str) -> Value {
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("hvtrace-report "))
        .unwrap_or_else(|| panic!("no report in:\n{err}"));
    serde_json::from_str(line).unwrap()
}

/// Asserts that VM `vm`'s messages are numbered 1..=N, each once, and
/// carry what a consumer needs; returns N.
fn assert_complete(url: &str, vm: &str) -> usize {
    let msgs = messages(url, vm);
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=msgs.len() as u64).collect();
    if seqs != want {
        let mut seen = std::collections::BTreeMap::new();
        for s in &seqs {
            *seen.entry(*s).or_insert(0) += 1;
        }
        let dup: Vec<_> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| s)
            .collect();
        let max = seqs.iter().max().copied().unwrap_or(0);
        let missing: Vec<u64> = (1..=max).filter(|s| !seen.contains_key(s)).collect();
        panic!(
            "VM {vm}: {} messages, duplicated seqs {dup:?}, missing seqs {missing:?}",
            seqs.len()
        );
    }
    for m in &msgs {
        assert_eq!(m["vm"], vm, "{m}");
        for k in ["host", "time", "kind", "tid", "tgid", "pid"] {
            assert!(!m[k].is_null(), "no {k} in {m}");
        }
        assert!(m["time"].as_str().unwrap().ends_with('Z'), "{m}");
        if m["kind"] == "syscall" {
            assert!(m["syscall"].is_string() && m["line"].is_string(), "{m}");
            // Arguments, unless the call started before an attach.
            let resumed = m["line"].as_str().unwrap().starts_with("<... ");
            assert!(resumed || m["args"].is_array(), "no args in {m}");
        }
    }
    msgs.len()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn events_read_back_from_jetstream_equal_the_trace_file_line_for_line() {
    require_kvm();
    let nats = Nats::start();
    let url = nats.url();
    let file = temp_path("sink-trace.txt");
    // Forks and waits under -f: lines interrupted by other processes'
    // (`<unfinished ...>` / `<... resumed>`) must come back as they were.
    let out = hvtrace_within(
        &[
            "trace",
            "-f",
            "-o",
            file.to_str().unwrap(),
            "--report",
            "--sink",
            &url,
            "--vm-id",
            "vm-a",
            "--",
            "hv-forkexec-loop",
            "2",
        ],
        Duration::from_secs(600),
    );
    let trace = read(&file);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        trace.contains("<unfinished ...>") && trace.contains(" resumed>"),
        "the workload should interleave processes:\n{trace}"
    );
    let back = events(&url, Some("vm-a"), &[]);
    assert_eq!(
        back, trace,
        "hvtrace events differs from the trace file\n--- events ---\n{back}\n--- -o file ---\n{trace}"
    );
    let n = assert_complete(&url, "vm-a");
    let r = report(&stderr(&out));
    assert_eq!(r["sink_published"].as_u64(), Some(n as u64), "{r}");
    assert_eq!(r["sink_dropped"].as_u64(), Some(0), "{r}");
    assert_eq!(r["sink_undelivered"].as_u64(), Some(0), "{r}");
    // Subjects name the kind: the exits alone, one per process.
    let exits = events(&url, Some("vm-a"), &["--kind", "exit"]);
    let ended = trace.lines().filter(|l| l.contains("+++ exited")).count();
    assert_eq!(exits.lines().count(), ended, "{exits}");
    assert!(
        exits.lines().all(|l| l.contains("+++ exited with ")),
        "{exits}"
    );
}

#[test]
fn a_server_killed_mid_trace_and_restarted_gets_every_event_exactly_once() {
    require_kvm();
    let mut nats = Nats::start();
    // A small memory queue, so the outage goes through the spill file.
    let spill_dir = temp_path("spill");
    let url = format!("{}?queue=64&spill_dir={}", nats.url(), spill_dir.display());
    let file = temp_path("sink-outage.txt");
    let calls = 30_000;
    let child = Command::new(hvtrace_bin())
        .args(["trace", "-o", file.to_str().unwrap(), "--report"])
        .args(["--sink", &url, "--vm-id", "vm-o", "--"])
        .args(["hv-getpid-loop", &calls.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the loop is being traced, the server is frozen (SIGSTOP) for
    // longer than an acknowledgment may take, so what the sink sent
    // meanwhile sits unread in the server's socket, then killed
    // (SIGKILL), which loses all of it: only the sink's resends can bring
    // those events into the stream. Restarted 1 s later.
    let deadline = Instant::now() + Duration::from_secs(300);
    while read(&file).matches("getpid()").count() < 500 {
        assert!(Instant::now() < deadline, "the trace never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    nats.signal("STOP");
    let stopped_at = read(&file).matches("getpid()").count();
    std::thread::sleep(Duration::from_secs(7));
    nats.stop("KILL");
    let during = read(&file).matches("getpid()").count();
    std::thread::sleep(Duration::from_secs(1));
    nats.restart();
    let out = wait_within(child, Duration::from_secs(600), "hvtrace trace");
    let trace = read(&file);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    // The guest was not held up by the outage: it ran on meanwhile.
    assert!(
        during > stopped_at + 100,
        "the traced loop stalled while the server was away ({stopped_at} -> {during} calls)"
    );
    assert!(
        stdout(&out).contains(&format!("getpid x {calls} done")),
        "{}",
        stdout(&out)
    );
    let r = report(&stderr(&out));
    assert!(
        r["sink_spilled"].as_u64() > Some(0),
        "the outage should have gone through the spill file: {r}"
    );
    assert!(
        r["sink_resent"].as_u64() > Some(0),
        "messages sent to the frozen server should have been sent again: {r}"
    );
    assert_eq!(r["sink_dropped"].as_u64(), Some(0), "{r}");
    assert_eq!(r["sink_undelivered"].as_u64(), Some(0), "{r}");
    let spill_left = std::fs::read_dir(&spill_dir).map_or(0, |d| d.count());
    let _ = std::fs::remove_dir_all(&spill_dir);
    assert_eq!(spill_left, 0, "a drained spill file is removed");
    let n = assert_complete(&nats.url(), "vm-o");
    assert_eq!(r["sink_published"].as_u64(), Some(n as u64), "{r}");
    let back = events(&nats.url(), Some("vm-o"), &[]);
    assert!(
        back == trace,
        "events after the outage differ from the trace file"
    );
    assert_eq!(back.matches("getpid()").count(), calls + 1);
}

/// The server gone at the end of a trace and not back within `linger`:
/// the undelivered events are kept in a file, said on stderr, and
/// `hvtrace sink-replay` publishes them once the server is back.
#[test]
fn events_undelivered_at_the_end_are_kept_and_published_by_sink_replay() {
    require_kvm();
    let mut nats = Nats::start();
    let spill_dir = temp_path("spill");
    let url = format!("{}?linger=1s&spill_dir={}", nats.url(), spill_dir.display());
    let file = temp_path("sink-late.txt");
    let child = Command::new(hvtrace_bin())
        .args(["trace", "-o", file.to_str().unwrap(), "--report"])
        .args(["--sink", &url, "--vm-id", "vm-l", "--"])
        .args(["hv-getpid-loop", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while read(&file).matches("getpid()").count() < 200 {
        assert!(Instant::now() < deadline, "the trace never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    nats.stop("TERM");
    let out = wait_within(child, Duration::from_secs(600), "hvtrace trace");
    let trace = read(&file);
    let _ = std::fs::remove_file(&file);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout(&out).contains("getpid x 3000 done"),
        "{}",
        stdout(&out)
    );
    let r = report(&err);
    let left = r["sink_undelivered"].as_u64().unwrap();
    assert!(left > 0, "{r}");
    let kept = err
        .lines()
        .find_map(|l| l.split_once(" kept in ").map(|(_, p)| p))
        .and_then(|p| p.split(" (").next())
        .unwrap_or_else(|| panic!("no kept file named in:\n{err}"));
    assert!(
        err.contains(&format!("{left} events were not delivered")),
        "{err}"
    );
    nats.restart();
    let replay = hvtrace_within(
        &["sink-replay", "--sink", &nats.url(), kept],
        Duration::from_secs(120),
    );
    assert!(replay.status.success(), "{}", stderr(&replay));
    assert!(!Path::new(kept).exists(), "{kept} left after its replay");
    let _ = std::fs::remove_dir_all(&spill_dir);
    let n = assert_complete(&nats.url(), "vm-l");
    assert_eq!(
        r["sink_published"].as_u64().unwrap() + left,
        n as u64,
        "{r}"
    );
    assert_eq!(events(&nats.url(), Some("vm-l"), &[]), trace);
}

/// A VM running `hv-getpid-loop N` with a control socket (`hvtrace run`
/// with `options` too).
fn loop_vm(calls: u32, options: &[&str]) -> (ApiVm, i64) {
    let sock = temp_path("sink.sock");
    let child = Command::new(hvtrace_bin())
        .args(["run", "--api-sock", sock.to_str().unwrap()])
        .args(options)
        .arg("--")
        .args(["hv-getpid-loop", &calls.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hvtrace run");
    let vm = ApiVm::new(child, sock.clone());
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(v) = api_call(&sock, r#"{"v":1,"op":"ps"}"#) {
            if let Some(t) = v["tasks"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["comm"] == "hv-getpid-loop"))
            {
                return (vm, t["pid"].as_i64().unwrap());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("hv-getpid-loop did not show up in ps");
}

/// One VM traced from its start (`trace`) and one attached to (`attach`),
/// at the same time, into the same stream: both complete and each is
/// read back alone, equal to its own trace file.
#[test]
fn two_vms_at_once_in_one_stream_are_read_back_apart() {
    require_kvm();
    let nats = Nats::start();
    let url = nats.url();
    let (mut vm_b, pid) = loop_vm(30_000, &[]);
    let (file_a, file_b) = (temp_path("sink-a.txt"), temp_path("sink-b.txt"));
    let attach = Command::new(hvtrace_bin())
        .args(["attach", "--api-sock", vm_b.sock.to_str().unwrap()])
        .args(["-p", &pid.to_string(), "-o", file_b.to_str().unwrap()])
        .args(["--sink", &url, "--vm-id", "vm-b", "--report"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let a = hvtrace_within(
        &[
            "trace",
            "-f",
            "-o",
            file_a.to_str().unwrap(),
            "--sink",
            &url,
            "--vm-id",
            "vm-a",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/hostname; hv-getpid-loop 2000",
        ],
        Duration::from_secs(600),
    );
    let b = wait_within(attach, Duration::from_secs(600), "hvtrace attach");
    let run = wait_within(vm_b.take_child(), Duration::from_secs(600), "hvtrace run");
    let (trace_a, trace_b) = (read(&file_a), read(&file_b));
    let _ = (std::fs::remove_file(&file_a), std::fs::remove_file(&file_b));
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stdout(&a).contains("getpid x 2000 done"), "{}", stdout(&a));
    assert!(
        stdout(&run).contains("getpid x 30000 done"),
        "{}",
        stdout(&run)
    );
    assert!(trace_b.contains("+++ exited with 0 +++"), "{trace_b}");
    assert_eq!(events(&url, Some("vm-a"), &[]), trace_a);
    assert_eq!(events(&url, Some("vm-b"), &[]), trace_b);
    let (na, nb) = (assert_complete(&url, "vm-a"), assert_complete(&url, "vm-b"));
    assert_eq!(
        report(&stderr(&b))["sink_published"].as_u64(),
        Some(nb as u64)
    );
    // Read together, every line is tagged with its VM.
    let all = events(&url, None, &[]);
    let tagged = |vm: &str| {
        all.lines()
            .filter(|l| l.starts_with(&format!("[{vm}] ")))
            .count()
    };
    assert_eq!(
        (tagged("vm-a"), tagged("vm-b")),
        (trace_a.lines().count(), trace_b.lines().count())
    );
    assert!(na > 2000 && nb > 1000, "{na} {nb}");
}

/// `hvtrace run --api-sock S --sink URL`: what a plain `hvtrace attach`
/// traces through the VM's socket is published by the VM itself, and
/// `run --report` counts it.
#[test]
fn a_vm_publishes_what_is_traced_through_its_control_socket() {
    require_kvm();
    let nats = Nats::start();
    let url = nats.url();
    let (mut vm, pid) = loop_vm(5_000, &["--sink", &url, "--vm-id", "vm-c", "--report"]);
    let file = temp_path("sink-c.txt");
    let attach = hvtrace_within(
        &[
            "attach",
            "--api-sock",
            vm.sock.to_str().unwrap(),
            "-p",
            &pid.to_string(),
            "-o",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(600),
    );
    let run = wait_within(vm.take_child(), Duration::from_secs(600), "hvtrace run");
    let trace = read(&file);
    let _ = std::fs::remove_file(&file);
    assert!(attach.status.success(), "{}", stderr(&attach));
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(trace.contains("+++ exited with 0 +++"), "{trace}");
    assert_eq!(events(&url, Some("vm-c"), &[]), trace);
    let n = assert_complete(&url, "vm-c");
    let r = report(&stderr(&run));
    assert_eq!(r["sink_published"].as_u64(), Some(n as u64), "{r}");
    assert_eq!(r["sink_dropped"].as_u64(), Some(0), "{r}");
}

/// Bad sinks are refused before anything runs: hvtrace's failure status,
/// a message naming the problem, and the guest command never started (so
/// no event of it could be lost).
#[test]
fn bad_sinks_are_refused_before_the_guest_runs() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let plain = Nats::start_with(false);
    let unreachable = format!("nats://127.0.0.1:{closed}");
    let no_js = plain.url();
    for (sink, vm, why) in [
        (unreachable.as_str(), "x", "cannot reach the event sink"),
        (no_js.as_str(), "x", "is JetStream enabled"),
        ("http://127.0.0.1:4222", "x", "is not a nats:// URL"),
        ("nats://127.0.0.1:70000", "x", "bad host or port"),
        (
            "nats://127.0.0.1:4222/fleet.*",
            "x",
            "has the character '*'",
        ),
        ("nats://127.0.0.1:4222/fleet..eu", "x", "empty name"),
        (
            "nats://127.0.0.1:4222?max_age=forever",
            "x",
            "is not a duration",
        ),
        ("nats://127.0.0.1:4222", "web.1", "--vm-id"),
    ] {
        let out = hvtrace_within(
            &["trace", "--sink", sink, "--vm-id", vm, "--", "echo", "ran"],
            Duration::from_secs(60),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{sink}: {err}");
        assert!(err.contains(why), "{sink}: expected `{why}` in:\n{err}");
        assert_eq!(stdout(&out), "", "{sink}: the guest command ran");
    }
    // The consumer says the same of a sink it cannot read.
    let out = hvtrace_within(&["events", "--sink", &unreachable], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the event sink"));
    let js = Nats::start();
    let out = hvtrace_within(&["events", "--sink", &js.url()], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no stream HVTRACE"),
        "{}",
        stderr(&out)
    );
    let out = hvtrace_within(
        &[
            "attach",
            "--api-sock",
            "/nonexistent",
            "-p",
            "1",
            "--sink",
            "nats://h:1/a b",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has the character ' '"),
        "{}",
        stderr(&out)
    );
}
