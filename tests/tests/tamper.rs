//! `hvtrace trace -e inject=` and `-e fault=` against the guest's own
//! strace with the same expression, on the same program in the same
//! guest: the program prints the same and exits the same way, and both
//! tracers mark the same calls `(INJECTED)` with the same result.

use hvtrace_tests::*;

/// The program's stdout, its stderr (hvtrace's own lines and the guest
/// strace's log left out), its exit status, and the tracer's lines that
/// end in `(INJECTED)`, each cut to its call name and what follows ` = `.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    stdout: String,
    stderr: String,
    status: Option<i32>,
    injected: Vec<String>,
}

/// `name = result (INJECTED)` of every tampered call in `log`.
fn injected_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.ends_with("(INJECTED)"))
        .map(|l| {
            // Without strace's `[pid N] ` or `N ` (-f with -o) prefix.
            let l = match l.strip_prefix("[pid ") {
                Some(r) => r.split_once("] ").map_or(r, |(_, rest)| rest),
                None => l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' '),
            };
            let name = l.split('(').next().unwrap_or_default();
            let result = l.rsplit_once(" = ").map_or("", |(_, r)| r);
            format!("{name} = {result}")
        })
        .collect()
}

const STRACE_TAG: &str = "STRACE: ";

fn program_stderr(out: &std::process::Output) -> String {
    stderr(out)
        .lines()
        .filter(|l| !l.starts_with("[hvtrace]") && !l.starts_with(STRACE_TAG))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The program under `hvtrace trace -e EXPR`.
fn under_hvtrace(expr: &str, program: &str) -> Outcome {
    let trace = temp_path("tamper.txt");
    let out = hvtrace(&[
        "trace",
        "-f",
        "-e",
        expr,
        "-o",
        trace.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        program,
    ]);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    Outcome {
        stdout: stdout(&out),
        stderr: program_stderr(&out),
        status: out.status.code(),
        injected: injected_lines(&log),
    }
}

/// The program under the guest's `strace -f -e EXPR`, its log tagged onto
/// stderr after the program ends.
fn under_guest_strace(expr: &str, program: &str) -> Outcome {
    let script = format!(
        "strace -f -o /tmp/s.log -e '{expr}' /bin/sh -c '{program}'; rc=$?; \
         sed 's/^/{STRACE_TAG}/' /tmp/s.log >&2; exit $rc"
    );
    let out = hvtrace(&["run", "--", "/bin/sh", "-c", &script]);
    let log: String = stderr(&out)
        .lines()
        .filter_map(|l| l.strip_prefix(STRACE_TAG))
        .map(|l| format!("{l}\n"))
        .collect();
    Outcome {
        stdout: stdout(&out),
        stderr: program_stderr(&out),
        status: out.status.code(),
        injected: injected_lines(&log),
    }
}

fn same_as_guest_strace(expr: &str, program: &str) -> Outcome {
    let ours = under_hvtrace(expr, program);
    let theirs = under_guest_strace(expr, program);
    assert_eq!(ours, theirs, "-e {expr} on {program:?}");
    ours
}

#[test]
fn injected_errors_and_values_match_the_guests_strace() {
    require_kvm();
    // The second open of the file fails; cat reports it and exits 1.
    let o = same_as_guest_strace(
        "inject=openat:error=EACCES:when=2",
        "cat /etc/hostname /etc/hostname",
    );
    assert_eq!(o.stdout, "hvtrace-guest\n");
    assert_eq!(o.status, Some(1));
    assert_eq!(
        o.injected,
        ["openat = -1 EACCES (Permission denied) (INJECTED)"]
    );
    // A success value: the shell believes its pid is 4242.
    let o = same_as_guest_strace("inject=getpid:retval=4242", "echo $$");
    assert_eq!(o.stdout, "4242\n");
    // fault= defaults to ENOSYS, on every invocation.
    let o = same_as_guest_strace("fault=openat", "cat /etc/hostname; echo rc=$?");
    assert!(o.stdout.ends_with("rc=1\n"), "{o:?}");
    assert!(!o.injected.is_empty());
    assert!(o
        .injected
        .iter()
        .all(|l| l == "openat = -1 ENOSYS (Function not implemented) (INJECTED)"));
}

#[test]
fn injected_signals_match_the_guests_strace() {
    require_kvm();
    // Sent at the call's entry and delivered on its way back: the shell's
    // trap runs (the call itself is not changed).
    let o = same_as_guest_strace(
        "inject=kill:signal=SIGUSR1",
        "trap \"echo caught USR1\" USR1; kill -0 $$; echo after",
    );
    assert!(o.stdout.contains("caught USR1"), "{o:?}");
    assert!(o.stdout.contains("after"), "{o:?}");
    assert!(o.injected.is_empty(), "{o:?}");
    // A signal together with an error: both happen.
    let o = same_as_guest_strace(
        "inject=kill:signal=SIGUSR2:error=EPERM",
        "trap \"echo caught USR2\" USR2; kill -0 1; echo after $?",
    );
    assert!(o.stdout.contains("caught USR2"), "{o:?}");
    assert!(o.stdout.contains("after 1"), "{o:?}");
    assert_eq!(
        o.injected,
        ["kill = -1 EPERM (Operation not permitted) (INJECTED)"]
    );
}

#[test]
fn bad_tamper_expressions_are_refused_before_the_guest_starts() {
    for (expr, why) in [
        ("inject=openat", "one of error=, retval= or signal="),
        ("inject=openat:error=EWHAT", "no such errno"),
        ("inject=openat:signal=SIGNOPE", "not a signal"),
        ("fault=openat:signal=SIGUSR1", "not supported"),
        ("inject=openat:error=ENOENT:when=0", "first[..last]"),
        ("fault=%file", "not a system call name"),
    ] {
        let out = hvtrace(&["trace", "-e", expr, "--", "true"]);
        assert_ne!(out.status.code(), Some(0), "-e {expr}");
        assert!(stderr(&out).contains(why), "-e {expr}: {}", stderr(&out));
        assert!(
            !stderr(&out).lines().any(|l| l.starts_with("[hvtrace]")),
            "-e {expr}: refused only after the guest was prepared: {}",
            stderr(&out)
        );
    }
}
