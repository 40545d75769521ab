//! `hvtrace trace` against the oracle the guest itself has: Debian's
//! strace, run inside the same guest on the same program.

use hvtrace_tests::strace_log::{line_share, parse, parse_lines, Call};
use hvtrace_tests::*;

/// Calls whose presence depends on timing (a futex wait happens only if
/// the other thread has not finished yet), not on the program.
const TIMING_DEPENDENT: &[&str] = &["futex"];

/// Calls whose strings are random bytes, different in every run: compared
/// by name and result only.
const RANDOM_CONTENT: &[&str] = &["getrandom"];

/// The calls of a trace, random contents dropped.
fn calls(log: &str) -> Vec<Vec<Call>> {
    calls_ignoring(log, TIMING_DEPENDENT)
}

/// [`calls`] without the calls named in `ignore`.
fn calls_ignoring(log: &str, ignore: &[&str]) -> Vec<Vec<Call>> {
    let mut seqs = parse(log, ignore);
    for c in seqs.iter_mut().flatten() {
        if RANDOM_CONTENT.contains(&c.name.as_str()) {
            c.strings.clear();
        }
        // A line with numbers in it (hv-forkexec-loop prints how many ns
        // each iteration took, slower under strace) has a length, and a
        // cut at `-s` 32, that depend on timing: it is compared up to its
        // first number, without the byte count.
        if c.name == "write" && c.strings.iter().any(|s| s.contains('#')) {
            c.ret = "<length>".into();
            for s in &mut c.strings {
                if let Some(at) = s.find('#') {
                    s.truncate(at);
                }
            }
        }
    }
    seqs
}

/// `hvtrace trace -f -o FILE -- program`: its output and the trace.
fn traced(program: &[&str]) -> (std::process::Output, String) {
    traced_on("minimal", program)
}

/// [`traced`] on guest kernel `kernel`.
fn traced_on(kernel: &str, program: &[&str]) -> (std::process::Output, String) {
    traced_with(kernel, &[], program)
}

/// [`traced_on`] with more options for `hvtrace trace` (`-e ...`).
fn traced_with(kernel: &str, options: &[&str], program: &[&str]) -> (std::process::Output, String) {
    let trace = temp_path("trace.txt");
    let t = trace.to_str().unwrap();
    let mut args = vec!["trace", "--kernel", kernel, "-f", "-o", t];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(program);
    let out = hvtrace(&args);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    (out, log)
}

fn hvtrace_trace(kernel: &str, program: &[&str]) -> (String, String) {
    let (out, log) = traced_on(kernel, program);
    assert!(
        out.status.success(),
        "hvtrace trace {program:?} failed: {}",
        stderr(&out)
    );
    (stdout(&out), log)
}

fn guest_strace(kernel: &str, program: &[&str]) -> (String, String) {
    let (out, log) = guest_strace_output(kernel, program);
    assert!(
        out.status.success(),
        "strace {program:?} in the guest failed: {}",
        stderr(&out)
    );
    (stdout(&out), log)
}

/// `strace -f program` in the guest: hvtrace run's output and strace's log.
fn guest_strace_output(kernel: &str, program: &[&str]) -> (std::process::Output, String) {
    guest_strace_with(kernel, &[], program)
}

/// [`guest_strace_output`] with more options for strace.
fn guest_strace_with(
    kernel: &str,
    options: &[&str],
    program: &[&str],
) -> (std::process::Output, String) {
    let mut args = vec!["run", "--kernel", kernel, "--", "strace", "-f"];
    args.extend_from_slice(options);
    args.extend_from_slice(program);
    let out = hvtrace(&args);
    // The command's stderr is strace's log (hvtrace's own lines start
    // with "[hvtrace]").
    let log: String = stderr(&out)
        .lines()
        .filter(|l| !l.starts_with("[hvtrace]"))
        .map(|l| format!("{l}\n"))
        .collect();
    (out, log)
}

fn show(seqs: &[Vec<Call>]) -> String {
    seqs.iter()
        .map(|s| {
            s.iter()
                .map(|c| format!("  {}({}) = {}", c.name, c.strings.join(", "), c.ret))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n  ----\n")
}

/// Asserts that hvtrace and the guest's strace see the same calls of
/// `program` on guest kernel `kernel` (those named in `ignore` aside);
/// returns both logs.
fn assert_same_calls_on(kernel: &str, program: &[&str], ignore: &[&str]) -> (String, String) {
    let (hv_out, hv_log) = hvtrace_trace(kernel, program);
    let (st_out, st_log) = guest_strace(kernel, program);
    let hv = calls_ignoring(&hv_log, ignore);
    let st = calls_ignoring(&st_log, ignore);
    assert!(!st.is_empty(), "strace printed nothing:\n{st_log}");
    assert!(
        hv.iter().map(Vec::len).sum::<usize>() >= 10,
        "hvtrace traced almost nothing:\n{hv_log}"
    );
    assert_eq!(
        hv,
        st,
        "{program:?}: hvtrace trace -f and strace -f in the guest disagree\n\
         --- hvtrace (parsed) ---\n{}\n--- strace (parsed) ---\n{}\n\
         --- hvtrace log ---\n{hv_log}\n--- strace log ---\n{st_log}",
        show(&hv),
        show(&st)
    );
    // Tracing did not change what the program did.
    let lines = |s: &str| s.lines().count();
    assert_eq!(lines(&hv_out), lines(&st_out), "{hv_out}\nvs\n{st_out}");
    (hv_log, st_log)
}

/// The `--- SIGNAME {si_signo=..., si_code=...` part of each signal line.
fn signal_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("--- ").map(|(_, r)| r))
        .map(|r| r.split(", si_pid").next().unwrap_or(r).to_string())
        .collect()
}

/// What the whole-line comparison runs, each under `hvtrace trace -f` and
/// the guest's `strace -f`: every test program that does not print
/// timings, and a busybox shell pipeline with redirections (stdout to a
/// file, stderr to /dev/null, a pipe, stdin from a file).
const LINE_PROGRAMS: &[(&[&str], &[&str])] = &[
    (&["hv-fileio"], TIMING_DEPENDENT),
    (&["hv-forkexec-loop", "2"], TIMING_DEPENDENT),
    (&["hv-threads"], TIMING_DEPENDENT),
    (&["hv-signals"], TIMING_DEPENDENT),
    (&["hv-cpus"], TIMING_DEPENDENT),
    (
        &[
            "/bin/sh",
            "-c",
            "cat /etc/hostname > /tmp/h; ls -l /etc | wc -l; ls /nope 2>/dev/null; cat < /tmp/h",
        ],
        // Where the SIGCHLD of the pipeline's second child lands among
        // the shell's wait4 calls depends on how fast the shell runs
        // (strace slows it; seen on Debian 6.1: two handler returns in a
        // row under strace, a wait4 between them under hvtrace): the
        // handler's rt_sigreturn lines are not compared.
        &["futex", "rt_sigreturn"],
    ),
];

/// The least share of identical lines (in per mille) the whole-line
/// comparison accepts, per kernel. On the minimal kernel every line is
/// identical (439 of 439 when it was raised to 1000), and on Debian's
/// 6.1 in the hardware-KVM lane (421 of 421); each difference that
/// remains elsewhere is listed in docs/limitations.md.
fn line_floor(_kernel: &str) -> usize {
    1000
}

/// Every program of [`LINE_PROGRAMS`] traced by hvtrace and by the
/// guest's strace: the same calls (`assert_same_calls_on`), and the share
/// of whole lines that are identical, addresses and thread ids aside,
/// printed (with each differing pair) and held to [`line_floor`].
fn lines_equal_guest_strace_on(kernel: &str) {
    let (mut same, mut total, mut report) = (0, 0, String::new());
    for &(program, ignore) in LINE_PROGRAMS {
        let (hv_log, st_log) = assert_same_calls_on(kernel, program, ignore);
        if program[0] == "hv-signals" {
            // Signals delivered to the program's handlers, number and code.
            let (hv, st) = (signal_lines(&hv_log), signal_lines(&st_log));
            assert_eq!(hv.len(), 3, "{hv:?}");
            assert_eq!(hv, st);
        }
        let timed = TIMED_PROGRAMS.contains(&program[0]);
        let (hv, st) = (
            whole_lines(&hv_log, ignore, timed),
            whole_lines(&st_log, ignore, timed),
        );
        let (s, t, diffs) = line_share(&hv, &st);
        report += &format!("{program:?}: {s} of {t} lines identical\n");
        for (h, o) in diffs {
            report += &format!("  hvtrace: {h}\n  strace:  {o}\n");
        }
        same += s;
        total += t;
    }
    let per_mille = same * 1000 / total.max(1);
    let figure = format!(
        "{kernel}: {same} of {total} lines identical to the guest's strace ({}.{}%)",
        per_mille / 10,
        per_mille % 10
    );
    eprintln!("{figure}\n{report}");
    assert!(
        per_mille >= line_floor(kernel),
        "{figure}, below the floor of {} per mille\n{report}",
        line_floor(kernel)
    );
}

/// Programs that print how long things took (hv-forkexec-loop: "took N
/// ns", "done, N ns"): their `write` lines differ between any two runs in
/// the durations' digits, so in the length and where `-s` cuts.
const TIMED_PROGRAMS: &[&str] = &["hv-forkexec-loop"];

/// A trace's whole lines per thread, as the calls' comparison pairs them,
/// with what differs between any two runs blanked: random bytes, clock
/// readings, and with `timed` the writes' lengths and their strings from
/// the first duration (a run of 4 digits or more) on.
fn whole_lines(log: &str, ignore: &[&str], timed: bool) -> Vec<Vec<(Call, String)>> {
    let mut seqs = parse_lines(log, ignore);
    for (c, line) in seqs.iter_mut().flatten() {
        if RANDOM_CONTENT.contains(&c.name.as_str()) {
            if let Some(at) = line.find('"') {
                line.truncate(at);
            }
        }
        *line = without_clock_values(line);
        if timed && c.name == "write" {
            *line = without_durations(line);
        }
    }
    seqs
}

/// A `write(fd, "...", n) = n` line with its string cut before the first
/// run of 4 or more digits (`"done, #`) and its length and value `<len>`.
fn without_durations(line: &str) -> String {
    let (Some(open), Some(close)) = (line.find('"'), line.rfind('"')) else {
        return line.to_string();
    };
    let text = &line[open + 1..close.max(open + 1)];
    let mut cut = text.len();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let run = b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
        if run >= 4 {
            cut = i;
            break;
        }
        i += run.max(1);
    }
    let shown = if cut < text.len() {
        format!("{}#", &text[..cut])
    } else {
        text.to_string()
    };
    format!("{}\"{shown}\"..., <len>) = <len>", &line[..open])
}

/// `tv_sec=N, tv_nsec=N` as `tv_sec=?, tv_nsec=?`: a clock's reading.
fn without_clock_values(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("tv_sec=") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "tv_sec=".len()..];
        let secs = after.bytes().take_while(u8::is_ascii_digit).count();
        let tail = &after[secs..];
        match tail.strip_prefix(", tv_nsec=") {
            Some(ns) if secs > 0 => {
                let n = ns.bytes().take_while(u8::is_ascii_digit).count();
                out.push_str("tv_sec=?, tv_nsec=?");
                rest = &ns[n..];
            }
            _ => {
                out.push_str("tv_sec=");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// hvtrace's trace of every program against the guest's strace: the same
/// calls, and (the figure the README quotes) the share of identical lines.
#[test]
fn every_line_matches_the_guests_strace() {
    require_kvm();
    lines_equal_guest_strace_on("minimal");
}

/// A shell that signals itself with a signal whose default action kills
/// it: a terminating one (short-circuited by the kernel, never dequeued),
/// a core-dumping one (dequeued, then fatal) and SIGKILL (no siginfo at
/// all). strace prints the signal (not SIGKILL) and `+++ killed by
/// SIG... +++`; hvtrace must print the same lines, the same calls, and
/// end with the same status.
#[test]
fn fatal_signals_equal_guest_strace() {
    require_kvm();
    fatal_signals_equal_guest_strace_on("minimal");
}

/// The signal and exit lines of a trace, without `[pid N] ` prefixes and
/// from `, si_pid` on (the sender's pid differs under strace).
fn ending_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(|l| match l.strip_prefix("[pid ") {
            Some(r) => r.split_once("] ").map_or(l, |(_, r)| r),
            None => l,
        })
        .filter(|l| l.starts_with("--- ") || l.starts_with("+++ "))
        .map(|l| l.split(", si_pid").next().unwrap_or(l).to_string())
        .collect()
}

fn fatal_signals_equal_guest_strace_on(kernel: &str) {
    for (sig, signo) in [("TERM", 15), ("SEGV", 11), ("KILL", 9)] {
        let script = format!("echo before; kill -{sig} $$; echo after");
        let program = ["/bin/sh", "-c", script.as_str()];
        let (hv_out, hv_log) = traced_on(kernel, &program);
        let (st_out, st_log) = guest_strace_output(kernel, &program);
        let what = format!(
            "SIG{sig}:\n--- hvtrace ---\n{hv_log}\n--- strace ---\n{st_log}\n{}",
            stderr(&hv_out)
        );
        assert_eq!(stdout(&hv_out), "before\n", "{what}");
        assert_eq!(stdout(&st_out), "before\n", "{what}");
        assert_eq!(hv_out.status.code(), Some(128 + signo), "{what}");
        assert_eq!(st_out.status.code(), Some(128 + signo), "{what}");
        let (hv, st) = (ending_lines(&hv_log), ending_lines(&st_log));
        assert_eq!(
            hv.last(),
            Some(&format!("+++ killed by SIG{sig} +++")),
            "{what}"
        );
        let shown = st
            .iter()
            .filter(|l| l.starts_with(&format!("--- SIG{sig} ")))
            .count();
        assert_eq!(shown, usize::from(sig != "KILL"), "{what}");
        assert_eq!(hv, st, "{what}");
        assert_eq!(calls(&hv_log), calls(&st_log), "{what}");
    }
}

/// Debian's 6.1 cloud kernel, KASLR on: the same oracle on every program.
/// Its cold boot takes over half an hour emulated on PVM KVM; the
/// hardware-KVM lane of scripts/test.sh runs this.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_calls_equal_guest_strace() {
    calls_equal_guest_strace_on("debian-6.1");
}

/// The same on Debian's 6.12 (cold boot: 50 min emulated here).
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_calls_equal_guest_strace() {
    calls_equal_guest_strace_on("debian-6.12");
}

/// Calls hvtrace has no hand-written decoder for (`sync`, `syncfs`,
/// `fdatasync`, `ftruncate`, `umount2`), made by busybox, on a kernel that
/// describes every call (`__syscall_meta__*`): each line equals the guest's
/// strace's, as the kernel's declared argument kinds render it
/// (`ftruncate(3, 10) = 0`, not six hex words).
#[test]
fn calls_without_a_decoder_are_shown_as_the_kernel_declares_them() {
    calls_without_a_decoder_on("minimal");
}

/// The same on Debian's 6.1.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_calls_without_a_decoder_are_shown_as_the_kernel_declares_them() {
    calls_without_a_decoder_on("debian-6.1");
}

fn calls_without_a_decoder_on(kernel: &str) {
    require_kvm();
    const DESCRIBED: &[&str] = &["sync", "syncfs", "fdatasync", "ftruncate", "umount2"];
    let program = [
        "/bin/sh",
        "-c",
        "truncate -s 10 /tmp/t; sync; sync -f /tmp/t; sync -d /tmp/t; umount /nope",
    ];
    let (_, hv_log) = traced_on(kernel, &program);
    let (_, st_log) = guest_strace_output(kernel, &program);
    let described = |log: &str| {
        let mut lines: Vec<String> = parse_lines(log, &[])
            .into_iter()
            .flatten()
            .filter(|(c, _)| DESCRIBED.contains(&c.name.as_str()))
            .map(|(_, line)| line)
            .collect();
        lines.sort();
        lines
    };
    let (hv, st) = (described(&hv_log), described(&st_log));
    let made: std::collections::BTreeSet<&str> =
        st.iter().filter_map(|l| l.split('(').next()).collect();
    assert_eq!(
        made.len(),
        DESCRIBED.len(),
        "busybox made {made:?} of {DESCRIBED:?} under the guest's strace:\n{st_log}"
    );
    assert_eq!(
        hv, st,
        "\n--- hvtrace ---\n{hv_log}\n--- strace ---\n{st_log}"
    );
}

fn calls_equal_guest_strace_on(kernel: &str) {
    require_kvm();
    lines_equal_guest_strace_on(kernel);
    fatal_signals_equal_guest_strace_on(kernel);
}

/// `-e trace=` sets in strace's syntax (classes, negation, regular
/// expressions, numbers, `?`), `-e signal=`, `-e status=`, `-Z` and `-qq` choose
/// the same lines as the guest's own strace given the same options, on a
/// shell that opens, reads, maps, forks and execs (and fails to open), and
/// on a program that takes signals.
#[test]
fn trace_signal_and_status_sets_choose_what_the_guests_strace_chooses() {
    require_kvm();
    let shell = ["/bin/sh", "-c", "cat /etc/hostname; ls / >/dev/null"];
    let failing = ["/bin/sh", "-c", "cat /etc/hostname /nonexistent; true"];
    for (options, program) in [
        (&["-e", "trace=%file"][..], &shell[..]),
        (&["-e", "trace=!%desc,%memory,?bogus"], &shell),
        (&["-e", "trace=/^(open|close|exit),%process,0"], &shell),
        (&["-e", "signal=!SIGUSR1"], &["hv-signals"]),
        (&["-e", "status=unfinished,failed"], &failing),
        (&["-Z", "-e", "trace=%file"], &failing),
        (&["-qq"], &shell),
    ] {
        let expr = options.join(" ");
        let (hv_out, hv_log) = traced_with("minimal", options, program);
        let (st_out, st_log) = guest_strace_with("minimal", options, program);
        let what = format!(
            "{expr} {program:?}\n--- hvtrace ---\n{hv_log}\n--- strace ---\n{st_log}\n{}",
            stderr(&hv_out)
        );
        assert!(hv_out.status.success() && st_out.status.success(), "{what}");
        let (hv, st) = (calls(&hv_log), calls(&st_log));
        assert!(hv.iter().any(|s| !s.is_empty()), "nothing traced: {what}");
        assert_eq!(hv, st, "{what}");
        assert_eq!(signal_lines(&hv_log), signal_lines(&st_log), "{what}");
    }
    // What strace refuses, hvtrace refuses with strace's words and its own
    // failure status: a malformed set before booting, a name that is no
    // call of the guest kernel once its table is read.
    for (expr, words) in [
        ("trace=bogus", "invalid system call 'bogus'"),
        ("trace=/(", "/("),
        ("signal=SIGBOGUS", "invalid signal 'SIGBOGUS'"),
    ] {
        let out = hvtrace(&["trace", "-e", expr, "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "-e {expr}: {}", stderr(&out));
        assert!(stderr(&out).contains(words), "-e {expr}: {}", stderr(&out));
    }
}

/// Every `FD<path>` annotation of a trace (`-y`), sorted, with the inode
/// numbers of pipes and sockets blanked (each run makes its own pipes).
fn fd_names(log: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in log.lines() {
        let b = line.as_bytes();
        for (i, _) in line.match_indices('<') {
            let digits = b[..i]
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .count();
            let Some(len) = line[i..].find('>') else {
                continue;
            };
            if digits == 0 {
                continue;
            }
            let mut name = line[i - digits..i + len + 1].to_string();
            if let Some(open) = name.find(":[") {
                name.replace_range(open + 2..name.len() - 2, "N");
            }
            names.push(name);
        }
    }
    names.sort();
    names
}

/// `-y` names each descriptor's file from the guest kernel's own file
/// table (its task's `files`, dentries and mounts), as the guest's `strace
/// -y` names it from /proc: opened files, /dev/null, the FIFOs the output
/// goes through, a descriptor a shell redirection made. (No pipe: strace
/// also names the two descriptors `pipe2` fills in, which hvtrace shows as
/// a pointer.)
#[test]
fn descriptors_are_named_as_the_guests_strace_y_names_them() {
    require_kvm();
    let program = [
        "/bin/sh",
        "-c",
        "cat /etc/hostname; exec 3</etc/hostname; ls / >/dev/null; cat <&3",
    ];
    let (hv_out, hv_log) = traced_with("minimal", &["-y"], &program);
    let (st_out, st_log) = guest_strace_with("minimal", &["-y"], &program);
    let what = format!(
        "--- hvtrace ---\n{hv_log}\n--- strace ---\n{st_log}\n{}",
        stderr(&hv_out)
    );
    assert!(hv_out.status.success() && st_out.status.success(), "{what}");
    let (hv, st) = (fd_names(&hv_log), fd_names(&st_log));
    for expected in ["</etc/hostname>", "</dev/null>"] {
        assert!(
            st.iter().any(|n| n.ends_with(expected)),
            "the guest's strace shows {expected}: {what}"
        );
    }
    assert_eq!(hv, st, "{what}");
}

/// `-ff -o PREFIX` writes each process's trace to `PREFIX.PID`, as the
/// guest's `strace -ff -o` does: as many files, each one process's calls
/// without `[pid N]` prefixes, the same calls in them.
#[test]
fn ff_writes_each_process_to_its_own_file_as_the_guests_strace_does() {
    require_kvm();
    let script = "cat /etc/hostname; ls / >/dev/null";
    let dir = temp_path("ff");
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("trace");
    let p = prefix.to_str().unwrap();
    let out = hvtrace(&["trace", "-ff", "-o", p, "--", "/bin/sh", "-c", script]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ours = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let tid = name.strip_prefix("trace.").unwrap_or_default();
        assert!(tid.parse::<u32>().is_ok(), "an unexpected file {name}");
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(!log.contains("[pid "), "{name}:\n{log}");
        ours.push((calls(&log), log));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let guest = format!(
        "strace -ff -o /tmp/st /bin/sh -c '{script}' >/dev/null && \
         for f in /tmp/st.*; do echo \"== $f\"; cat \"$f\"; done"
    );
    let out = hvtrace(&["run", "--", "/bin/sh", "-c", &guest]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut theirs = Vec::new();
    for file in stdout(&out).split("== /tmp/st.").skip(1) {
        let log = file.split_once('\n').map_or("", |(_, rest)| rest);
        theirs.push((calls(log), log.to_string()));
    }
    ours.sort();
    theirs.sort();
    let show = |v: &[(Vec<Vec<hvtrace_tests::strace_log::Call>>, String)]| {
        v.iter()
            .map(|(_, log)| log.as_str())
            .collect::<Vec<_>>()
            .join("\n======\n")
    };
    // sh and cat (busybox's sh runs `ls` in itself, as a no-fork applet).
    assert!(theirs.len() >= 2, "one file per process: {}", show(&theirs));
    assert_eq!(
        ours.iter().map(|(c, _)| c).collect::<Vec<_>>(),
        theirs.iter().map(|(c, _)| c).collect::<Vec<_>>(),
        "--- hvtrace's files ---\n{}\n--- strace's ---\n{}",
        show(&ours),
        show(&theirs)
    );
}

/// Where a `-f` trace's `[pid N]` prefixes start and end: (lines before
/// the first clone with a prefix, whether the line after the first clone
/// returning a child has one, whether the last line has one).
fn prefix_span(log: &str) -> (usize, bool, bool) {
    let log = hvtrace_tests::strace_log::without_attach_notes(log);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let is_clone = |l: &str| {
        let call = l.split_once("] ").map_or(l, |(_, r)| r);
        let call = call.strip_prefix("<... ").unwrap_or(call);
        ["clone", "clone3", "fork", "vfork"].iter().any(|c| {
            call.starts_with(&format!("{c}(")) || call.starts_with(&format!("{c} resumed>"))
        })
    };
    let first_clone = lines
        .iter()
        .position(|l| is_clone(l))
        .unwrap_or(lines.len());
    let before = lines[..first_clone]
        .iter()
        .filter(|l| l.starts_with("[pid "))
        .count();
    // The clone's line that returns the child's id (its whole line or its
    // resumption).
    let returned = lines.iter().position(|l| {
        is_clone(l)
            && l.rsplit_once(" = ")
                .is_some_and(|(_, r)| r.trim().parse::<u32>().is_ok_and(|n| n > 0))
    });
    let after = returned
        .and_then(|i| lines.get(i + 1))
        .is_some_and(|l| l.starts_with("[pid "));
    let last = lines.last().is_some_and(|l| l.starts_with("[pid "));
    (before, after, last)
}

/// `[pid N]` prefixes start at the clone, as the guest's `strace -f`
/// (writing to stderr) starts them: none before the first fork, the line
/// after the fork returns the child's id has one even when the parent
/// prints it before the child has printed anything, and once the child has
/// exited the parent's lines are bare again.
#[test]
fn pid_prefixes_start_at_the_clone_as_the_guests_strace_starts_them() {
    require_kvm();
    let program = ["/bin/sh", "-c", "/bin/true; echo hi"];
    let mut args = vec!["trace", "-f", "--"];
    args.extend_from_slice(&program);
    let hv = hvtrace(&args);
    assert!(hv.status.success(), "{}", stderr(&hv));
    let hv_log: String = stderr(&hv)
        .lines()
        .filter(|l| !l.starts_with("[hvtrace]"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (st, st_log) = guest_strace_output("minimal", &program);
    assert!(st.status.success(), "{}", stderr(&st));
    let what = format!("--- hvtrace ---\n{hv_log}\n--- strace ---\n{st_log}");
    assert_eq!(prefix_span(&st_log), (0, true, false), "the oracle: {what}");
    assert_eq!(prefix_span(&hv_log), prefix_span(&st_log), "{what}");
}

#[test]
fn the_trace_names_the_exec_and_a_failing_open_as_strace_would() {
    require_kvm();
    let (out, log) = traced(&["/bin/sh", "-c", "cat /etc/hostname /nonexistent; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hvtrace-guest\n");
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(
            r#"execve("/bin/sh", ["/bin/sh", "-c", "cat /etc/hostname /nonexistent; "..."#
        ),
        "first line: {first}\n{log}"
    );
    assert!(
        log.contains(r#"openat(AT_FDCWD, "/nonexistent", O_RDONLY|O_LARGEFILE) = -1 ENOENT (No such file or directory)"#)
            || log.contains(r#"openat(AT_FDCWD, "/nonexistent", O_RDONLY) = -1 ENOENT (No such file or directory)"#),
        "{log}"
    );
    assert!(log.contains("+++ exited with 3 +++"), "{log}");
}

#[test]
fn the_guest_does_not_see_a_tracer() {
    require_kvm();
    // /proc/self/status of a traced process: TracerPid stays what the
    // guest set (0: nothing in the guest ptraces it).
    let trace = temp_path("tracerpid.txt");
    let out = hvtrace(&[
        "trace",
        "-o",
        trace.to_str().unwrap(),
        "--",
        "grep",
        "TracerPid",
        "/proc/self/status",
    ]);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "TracerPid:\t0");
    assert!(
        log.contains(r#"openat(AT_FDCWD, "/proc/self/status""#),
        "{log}"
    );
}

/// As with strace, a call is on screen while it blocks: the start of
/// hv-sleeper's nanosleep line is in the trace (the file's unterminated
/// last line) before the call returns, and the line is completed, from
/// that start, when it does.
#[test]
fn a_blocked_call_is_shown_while_it_blocks() {
    require_kvm();
    let trace = temp_path("blocked.txt");
    let child = std::process::Command::new(hvtrace_bin())
        .args([
            "trace",
            "-o",
            trace.to_str().unwrap(),
            "--",
            "hv-sleeper",
            "4",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hvtrace trace");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let mut shown = None;
    while std::time::Instant::now() < deadline {
        let log = std::fs::read_to_string(&trace).unwrap_or_default();
        let open = log.rsplit('\n').next().unwrap_or_default();
        if open.starts_with("nanosleep(") {
            shown = Some(open.to_string());
            break;
        }
        if log.contains("+++ exited") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("woke"), "{}", stdout(&out));
    let shown = shown.unwrap_or_else(|| panic!("nanosleep never shown while blocked:\n{log}"));
    let done = log
        .lines()
        .find(|l| l.starts_with("nanosleep("))
        .unwrap_or_default();
    assert!(
        done.starts_with(&shown) && done.ends_with(") = 0") && done.len() > shown.len(),
        "shown while blocked: {shown:?}\ncompleted: {done:?}\n{log}"
    );
}

#[test]
fn guest_ptrace_keeps_working_on_a_thread_hvtrace_traces() {
    require_kvm();
    // strace in the guest traces hv-fileio while hvtrace traces both.
    let trace = temp_path("both.txt");
    let out = hvtrace(&[
        "trace",
        "-f",
        "-o",
        trace.to_str().unwrap(),
        "--",
        "strace",
        "hv-fileio",
    ]);
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}", stderr(&out));
    let guest_strace = stderr(&out);
    let open = r#"openat(AT_FDCWD, "/etc/hostname", O_RDONLY|O_CLOEXEC) = 3"#;
    assert!(
        guest_strace.contains(open),
        "the guest's strace lost its trace:\n{guest_strace}"
    );
    assert!(
        log.contains("ptrace("),
        "hvtrace should see strace's ptrace calls:\n{log}"
    );
    // hv-fileio's openat is usually split by the guest strace's own calls
    // (its ptrace stop comes between entry and exit): compared joined.
    let opened = parse(&log, &[])
        .iter()
        .skip(1)
        .flatten()
        .any(|c| c.name == "openat" && c.strings == [r#""/etc/hostname""#] && c.ret == "3");
    assert!(opened, "hvtrace should see hv-fileio's calls too:\n{log}");
    assert!(stdout(&out).contains("fileio done"), "{}", stdout(&out));
}

/// The rows of a `strace -c` table: call name -> (calls, errors).
fn count_table(text: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    let rule = "------ ----------- ----------- --------- --------- ----------------";
    let mut rows = std::collections::BTreeMap::new();
    let mut in_body = false;
    for line in text.lines() {
        if line == rule {
            if in_body {
                break;
            }
            in_body = true;
            continue;
        }
        if !in_body {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (calls, errors) = match f.len() {
            5 => (f[3], "0"),
            6 => (f[3], f[4]),
            _ => panic!("not a table row: {line:?}\n{text}"),
        };
        rows.insert(
            f[f.len() - 1].to_string(),
            (calls.parse().unwrap(), errors.parse().unwrap()),
        );
    }
    rows
}

/// `hvtrace trace -c` counts what the guest's own `strace -c` counts on
/// the same program: the same calls, with the same numbers of calls and
/// errors (the times are each tracer's own), and prints no trace lines.
#[test]
fn the_call_count_table_equals_the_guests_strace_c() {
    require_kvm();
    let program = ["hv-fileio"];
    let table = temp_path("count.txt");
    let t = table.to_str().unwrap();
    let out = hvtrace(&["trace", "-c", "-S", "calls", "-o", t, "--", program[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("hvtrace-guest"),
        "the program ran: {}",
        stdout(&out)
    );
    let ours = std::fs::read_to_string(&table).unwrap();
    let _ = std::fs::remove_file(&table);
    assert!(
        ours.starts_with("% time     seconds  usecs/call     calls    errors syscall\n"),
        "-c prints the table only:\n{ours}"
    );
    let (_, theirs) = guest_strace_output("minimal", &["-c", "-S", "calls", program[0]]);
    let (ours, theirs) = (count_table(&ours), count_table(&theirs));
    assert!(theirs.get("openat").is_some_and(|r| r.1 >= 1), "{theirs:?}");
    assert_eq!(
        ours, theirs,
        "hvtrace -c and the guest's strace -c disagree"
    );
}

/// A trace whose reader is slow does not stall the guest: with hvtrace's
/// stderr a pipe nobody reads (its 64 KiB fill after a few thousand
/// lines), the traced program still runs to its end, and once the reader
/// comes back every line is there.
#[test]
fn a_reader_that_does_not_read_does_not_stall_the_traced_program() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    require_kvm();
    let calls = 10_000;
    let mut child = Command::new(hvtrace_bin())
        .args(["trace", "--", "hv-getpid-loop", &calls.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let done = format!("getpid x {calls} done");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&done) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("the program never finished while the trace was not read");
            }
        }
    }
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{log}");
    let getpids = log.lines().filter(|l| l.starts_with("getpid() = ")).count();
    assert_eq!(
        getpids,
        calls + 1,
        "every call's line arrived (the loop's, and one for the pid it prints)"
    );
    assert!(
        log.contains("+++ exited with 0 +++"),
        "{}",
        &log[log.len().saturating_sub(500)..]
    );
}

/// `-ttt` starts every line with the epoch time of its event: within the
/// run, never decreasing; `-tt` with the time of day to the microsecond,
/// the same as the host's clock says (to the minute), as strace prints them.
#[test]
fn time_stamps_start_every_line_in_order_within_the_run() {
    require_kvm();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let stamped = |flag: &str| {
        let file = temp_path("stamped.txt");
        let f = file.to_str().unwrap();
        let out = hvtrace(&["trace", flag, "-o", f, "--", "hv-fileio"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let log = std::fs::read_to_string(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        log
    };
    let before = now();
    let log = stamped("-ttt");
    let after = now();
    let mut last = before;
    for line in log.lines() {
        let (t, rest) = line.split_once(' ').unwrap();
        let t: f64 = t.parse().unwrap_or_else(|_| panic!("no stamp: {line:?}"));
        assert!(
            t >= last && t <= after,
            "{t} not in {last}..{after}: {line}"
        );
        assert!(!rest.is_empty());
        last = t;
    }
    assert!(log.lines().count() >= 10, "{log}");
    let hm = || {
        let out = std::process::Command::new("date")
            .arg("+%H:%M")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let hm_before = hm();
    let log = stamped("-tt");
    let hm_after = hm();
    for line in log.lines() {
        let stamp = &line[..16];
        let shape_ok = stamp.char_indices().all(|(i, c)| match i {
            2 | 5 => c == ':',
            8 => c == '.',
            15 => c == ' ',
            _ => c.is_ascii_digit(),
        });
        assert!(shape_ok, "not HH:MM:SS.uuuuuu: {line:?}");
    }
    let first = &log[..5];
    assert!(
        first == hm_before || first == hm_after,
        "the trace's first line says {first}, the host's clock {hm_before}..{hm_after}"
    );
}
