//! `hvtrace run` hands the command's output and exit status to the host.

use hvtrace_tests::*;

#[test]
fn command_output_and_exit_status_reach_the_host() {
    require_kvm();
    let out = hvtrace(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "echo hello-$((6*7)); echo to-stderr >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello-42\n");
    assert!(
        stderr(&out).contains("to-stderr"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn guest_syscalls_work_through_the_pvm_fixup() {
    require_kvm();
    // A static C program doing real file I/O, a failing open, and a getpid loop.
    let out = hvtrace(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "hv-fileio && hv-getpid-loop 200",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let s = stdout(&out);
    assert!(
        s.contains("hvtrace-guest"),
        "hv-fileio should echo /etc/hostname: {s}"
    );
    assert!(s.contains("getpid x 200 done"), "{s}");
}
