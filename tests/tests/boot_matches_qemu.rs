//! Each supported kernel boots under hvtrace to its init, runs a command,
//! and prints exactly what the same kernel and image print under QEMU (TCG).

use std::time::Duration;

use hvtrace_tests::*;

const PROBE: &str =
    "uname -srvm; cat /proc/version; echo sum=$((6*7)); ls /usr/bin | head -n 3; cat /etc/hostname";

fn check_kernel(name: &str) {
    require_kvm();
    let out = hvtrace(&["run", "--kernel", name, "--", "/bin/sh", "-c", PROBE]);
    assert!(out.status.success(), "hvtrace run failed: {}", stderr(&out));
    let ours = stdout(&out);
    let oracle = qemu_run(
        &kernel_for_qemu(name),
        &default_image(),
        1,
        &["/bin/sh", "-c", PROBE],
        Duration::from_secs(600),
    );
    assert_eq!(oracle.status, 0);
    assert!(ours.contains("sum=42"), "hvtrace output: {ours}");
    assert_eq!(ours, oracle.stdout, "hvtrace and QEMU disagree");
}

#[test]
fn minimal_kernel_output_matches_qemu() {
    check_kernel("minimal");
}

// Debian's kernels boot for most of an hour emulated on PVM KVM, too long
// for CI's 90 minutes there; the hardware-KVM lane (scripts/hw-kvm/tests.sh,
// part of every scripts/test.sh) runs these two.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_output_matches_qemu() {
    check_kernel("debian-6.1");
}

#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_output_matches_qemu() {
    check_kernel("debian-6.12");
}
