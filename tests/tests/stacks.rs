//! `hvtrace stacks` against the guest's own view of its kernel stacks, and
//! a guest kernel crash ending the run with its report and status 123.

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};

use hvtrace_tests::*;
use serde_json::Value;

/// Exit status of hvtrace when the guest kernel crashed (README).
const GUEST_KERNEL_CRASHED: i32 = 123;

/// `hvtrace run --api-sock` of a shell script whose stdout is read line by
/// line; shut down when dropped.
struct SocketGuest {
    vm: ApiVm,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl SocketGuest {
    fn start(script: &str) -> Self {
        require_kvm();
        let sock = temp_path("stacks.sock");
        let mut child = Command::new(hvtrace_bin())
            .args([
                "run",
                "--api-sock",
                sock.to_str().unwrap(),
                "--",
                "/bin/sh",
                "-c",
                script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hvtrace run");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            vm: ApiVm::new(child, sock),
            lines,
        }
    }

    /// Lines of the command's stdout up to (without) the line `end`.
    fn read_until(&mut self, end: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.lines.by_ref() {
            let l = l.expect("guest stdout");
            if l == end {
                return out;
            }
            out.push(l);
        }
        panic!("the guest's output ended before `{end}`: {out:?}");
    }
}

/// Function names of `/proc/PID/stack` lines (`[<0>] do_nanosleep+0x6d/0x130`).
fn proc_stack_functions(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split("] ").nth(1))
        .map(|f| f.split('/').next().unwrap_or(f).to_string())
        .collect()
}

/// The frames of task `tid` in a `stacks` reply, as `function+0xoff`.
fn hvtrace_frames(reply: &Value, tid: i64) -> Vec<String> {
    let t = reply["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["tid"] == tid))
        .unwrap_or_else(|| panic!("no task {tid} in {reply}"));
    assert!(t["error"].is_null(), "{t}");
    t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// `want` appears in `have` in order (hvtrace's scan may show a stale
/// frame between two real ones, as the kernel's `?` lines do).
fn is_subsequence(want: &[String], have: &[String]) -> bool {
    let mut it = have.iter();
    want.iter().all(|w| it.any(|h| h == w))
}

#[test]
fn blocked_tasks_stacks_match_the_guests_proc_stack() {
    let script = "hv-sleeper 300 >/dev/null & s=$!; hv-sleeper --read >/dev/null & r=$!; \
                  sleep 3; echo $s $r; cat /proc/$s/stack; echo ===; cat /proc/$r/stack; echo ===; \
                  readlink /proc/$r/fd/0; echo ===; wait";
    let mut g = SocketGuest::start(script);
    let pids = g.read_until("===");
    let (sleeper, reader): (i64, i64) = {
        let ids: Vec<i64> = pids[0].split(' ').map(|p| p.parse().unwrap()).collect();
        (ids[0], ids[1])
    };
    let sleeper_proc = proc_stack_functions(&pids[1..]);
    let reader_proc = proc_stack_functions(&g.read_until("==="));
    let reader_fd0 = g.read_until("===").join("");
    assert!(
        sleeper_proc
            .iter()
            .any(|f| f.starts_with("hrtimer_nanosleep")),
        "the guest's own /proc stack of a nanosleep: {sleeper_proc:?}"
    );
    assert!(
        reader_proc.iter().any(|f| f.starts_with("pipe_read")),
        "the guest's own /proc stack of a pipe read: {reader_proc:?}"
    );

    let out = hvtrace(&[
        "stacks",
        "--api-sock",
        g.vm.sock.to_str().unwrap(),
        "-a",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    for (tid, want) in [(sleeper, &sleeper_proc), (reader, &reader_proc)] {
        let have = hvtrace_frames(&reply, tid);
        // Offsets included: the same return addresses, not only names.
        let want_full: Vec<String> = want.clone();
        assert!(
            is_subsequence(&want_full, &have),
            "pid {tid}: the guest's /proc/{tid}/stack {want_full:?} is not in hvtrace's {have:?}"
        );
    }
    // The vCPU section names a task and a place for each vCPU.
    let vcpus = reply["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 1);
    assert!(vcpus[0]["task"]["comm"].is_string(), "{}", vcpus[0]);

    // Text output: each task headed by pid and comm, frames as function+0xoff.
    let text = stdout(&hvtrace(&[
        "stacks",
        "--api-sock",
        g.vm.sock.to_str().unwrap(),
        "-a",
    ]));
    let header = format!("pid {sleeper} tid {sleeper} hv-sleeper (S)");
    let block: Vec<&str> = text
        .split("\n\n")
        .find(|b| b.starts_with(&header))
        .unwrap_or_else(|| panic!("no `{header}` block in:\n{text}"))
        .lines()
        .collect();
    assert!(
        block[1..]
            .iter()
            .any(|l| l.trim().starts_with("hrtimer_nanosleep+0x")),
        "{block:?}"
    );
    // What the reader waits on: its descriptor 0, the pipe (as the guest's
    // own /proc/PID/fd/0 link names it).
    assert!(reader_fd0.starts_with("pipe:["), "{reader_fd0}");
    let header = format!("pid {reader} tid {reader} hv-sleeper (S) in read(0<{reader_fd0}>, ");
    assert!(text.contains(&header), "no `{header}` in:\n{text}");
}

/// A crash report ends the run with the report and its own status.
fn assert_crash_ends_the_run(script: &str, kind: &str, marker: &str) {
    require_kvm();
    let out = hvtrace(&["run", "--", "/bin/sh", "-c", script]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(GUEST_KERNEL_CRASHED),
        "stderr: {err}"
    );
    assert!(err.contains(kind), "stderr: {err}");
    assert!(err.contains(marker), "stderr: {err}");
}

#[test]
fn a_kernel_oops_ends_the_run_with_its_report() {
    // LKDTM's EXCEPTION: a NULL dereference in the kernel, an oops that
    // kills the writing shell; the guest would run on without its command.
    assert_crash_ends_the_run(
        "mount -t debugfs none /sys/kernel/debug; echo EXCEPTION > /sys/kernel/debug/provoke-crash/DIRECT; sleep 600",
        "guest kernel oopsed",
        "lkdtm",
    );
}

#[test]
fn a_kernel_panic_ends_the_run_with_its_report() {
    assert_crash_ends_the_run(
        "echo c > /proc/sysrq-trigger; sleep 600",
        "guest kernel panicked",
        "sysrq triggered crash",
    );
}

/// A quiet guest is described once, with the blocked task and its stack,
/// and the command still finishes normally.
#[test]
fn a_quiet_guest_is_described_once() {
    require_kvm();
    let out = hvtrace(&["run", "--stall-report", "5", "--", "hv-sleeper", "20"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    // Once per silence: the 20 s sleep is one (with the 5 s threshold,
    // repeated reports would come every few seconds); the seconds of
    // emulated fork and exec before the program's first line may be
    // another.
    let reports = err.matches("the guest has been silent for").count();
    assert!((1..=2).contains(&reports), "{reports} reports: {err}");
    let pid = stdout(&out)
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.trim_end_matches(',').parse::<i64>().ok())
        .expect("hv-sleeper prints its pid");
    let header = format!("pid {pid} tid {pid} hv-sleeper (S) in nanosleep(");
    let blocks: Vec<&str> = err
        .split("\n\n")
        .filter(|b| b.starts_with(&header))
        .collect();
    assert_eq!(blocks.len(), 1, "the sleep was reported once: {err}");
    let block = blocks[0];
    assert!(block.contains("hrtimer_nanosleep+0x"), "{block}");
    // The vCPU is idle (halted) nearly all of the time, but may be caught
    // in a timer tick; either way its line says so.
    assert!(
        err.contains("vCPU 0: halted, interrupts on") || err.contains("vCPU 0: running"),
        "{err}"
    );
}
