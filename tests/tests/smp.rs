//! A 2-vCPU guest sees two CPUs and runs work on both; on Debian's kernels
//! (no MP-table parser: the CPUs come from the ACPI MADT) too, and
//! `poweroff` there ends the VM through ACPI.

use hvtrace_tests::*;

#[test]
fn two_vcpu_guest_sees_and_uses_two_cpus() {
    sees_and_uses_two_cpus(&[]);
}

/// Debian's 6.1 finds its second CPU in the MADT.
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_two_vcpu_guest_sees_and_uses_two_cpus() {
    sees_and_uses_two_cpus(&["--kernel", "debian-6.1"]);
}

/// And Debian's 6.12 (whose two vCPUs hung on the paravirt spinlock kick
/// in the nested lane until the VMM stopped offering PV_UNHALT).
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_12_two_vcpu_guest_sees_and_uses_two_cpus() {
    sees_and_uses_two_cpus(&["--kernel", "debian-6.12"]);
}

/// The guest's own count of CPUs (`nproc`, /proc/cpuinfo) is two, and a
/// thread pinned to each of them ran there (hv-cpus).
fn sees_and_uses_two_cpus(guest: &[&str]) {
    require_kvm();
    let mut args = vec!["run", "--cpus", "2"];
    args.extend_from_slice(guest);
    args.extend_from_slice(&[
        "--",
        "/bin/sh",
        "-c",
        "nproc; grep -c ^processor /proc/cpuinfo; hv-cpus",
    ]);
    let out = hvtrace(&args);
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

/// `poweroff -f` in a Debian guest powers the VM off through the ACPI
/// sleep registers: the kernel says "reboot: Power down" (not "System
/// halted", what a kernel without a power-off method prints before parking
/// its CPUs for good), and hvtrace ends at once saying the guest powered
/// off, with the status of an hvtrace failure (the command never returned).
#[test]
#[ignore = "Debian kernel: runs in the hardware-KVM lane (scripts/test.sh)"]
fn debian_6_1_poweroff_ends_the_vm_through_acpi() {
    require_kvm();
    let out = hvtrace(&[
        "run",
        "--kernel",
        "debian-6.1",
        "--cpus",
        "2",
        "--",
        "poweroff",
        "-f",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(err.contains("guest powered off"), "stderr: {err}");
    assert!(err.contains("reboot: Power down"), "stderr: {err}");
}
