//! A 2-vCPU guest sees two CPUs and runs work on both.

use hvtrace_tests::*;

#[test]
fn two_vcpu_guest_sees_and_uses_two_cpus() {
    require_kvm();
    let out = hvtrace(&[
        "run",
        "--cpus",
        "2",
        "--",
        "/bin/sh",
        "-c",
        "nproc; grep -c ^processor /proc/cpuinfo; hv-cpus",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let s = stdout(&out);
    let mut lines = s.lines();
    assert_eq!(lines.next(), Some("2"), "nproc: {s}");
    assert_eq!(lines.next(), Some("2"), "/proc/cpuinfo: {s}");
    assert!(
        s.contains("cpu 0 ran") && s.contains("cpu 1 ran"),
        "hv-cpus: {s}"
    );
}
