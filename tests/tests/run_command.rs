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

/// The command's output travels through the output window (the guest
/// image's relay and one exit per 64 KiB): every byte arrives, in order,
/// before the exit status. The oracles are the host's own copy of the
/// image's busybox binary (every byte value) and the host's `seq`.
#[test]
fn binary_and_bulk_output_arrive_byte_for_byte_before_the_exit_status() {
    require_kvm();
    let out = hvtrace(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "cat /bin/busybox; seq 1 3 >&2; seq 1 50000; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    let mut want = std::fs::read("/bin/busybox").expect("the host's busybox (the image's copy)");
    let seq = std::process::Command::new("seq")
        .args(["1", "50000"])
        .output()
        .expect("seq on the host");
    want.extend_from_slice(&seq.stdout);
    assert_eq!(out.stdout.len(), want.len(), "bytes that reached the host");
    assert!(
        out.stdout == want,
        "the guest's stdout differs from busybox + seq"
    );
    assert!(
        stderr(&out).contains("1\n2\n3\n"),
        "stderr: {}",
        stderr(&out)
    );
}

/// A relay that died (here killed on purpose) leaves the UARTs in charge:
/// the command that killed it still ends, and the next one's output
/// arrives through ttyS2 as before the window existed.
#[test]
fn a_killed_output_relay_falls_back_to_the_uart() {
    let mut guest = InProcessGuest::restore_default();
    let run = |guest: &mut InProcessGuest, script: &str| {
        let argv: Vec<String> = ["/bin/sh", "-c", script].map(String::from).to_vec();
        guest.run_with_limit(&argv, std::time::Duration::from_secs(300), script)
    };
    let window =
        "readlink /proc/self/fd/1; ls -l /proc/$(cat /run/hvtrace/pid)/fd | grep -c /dev/mem";
    assert_eq!(run(&mut guest, window), 0);
    assert_eq!(run(&mut guest, "kill -9 $(cat /run/hvtrace/pid)"), 0);
    assert_eq!(
        run(&mut guest, "echo via-uart; readlink /proc/self/fd/1"),
        0
    );
    assert_eq!(
        guest.stdout(),
        "/run/hvtrace/out\n2\nvia-uart\n/dev/ttyS2\n",
        "stdout was the relay's FIFO, the relay held /dev/mem twice (doorbell \
         and window); after it died, stdout is ttyS2"
    );
}

/// One `--report` figure of a run's stderr.
fn report_figure(out: &std::process::Output, name: &str) -> u64 {
    let err = stderr(out);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("hvtrace-report "))
        .unwrap_or_else(|| panic!("no report in: {err}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// On PVM KVM the VMM performs the guest kernel's user copies (its
/// `rep movsb`, vmm/src/trap/pvm_copy.rs). What programs read and write
/// is the same as with the guest's own copies
/// (`HVTRACE_PVM_GUEST_COPIES=1`), and the host's md5sum of its busybox
/// (the image's copy) is the oracle for bytes that crossed a pipe into a
/// fresh 1 MiB buffer, whose every page is first touched by a copy: a
/// fault the guest kernel handles before the VMM goes on.
#[test]
fn user_copies_done_by_the_vmm_match_the_guests_own() {
    require_kvm();
    let script = "dd if=/bin/busybox bs=1M 2>/dev/null | md5sum; md5sum </bin/busybox; \
                  dd if=/bin/busybox bs=1000 count=3 skip=7 2>/dev/null | od -A x -t x1 | tail -4; \
                  ls -l /bin | wc -l; wc -c /proc/self/maps /proc/cpuinfo | tail -1";
    let run = |guest_copies: &str| {
        let mut cmd = std::process::Command::new(hvtrace_bin());
        cmd.env("HVTRACE_PVM_GUEST_COPIES", guest_copies)
            .args(["run", "--report", "--", "/bin/sh", "-c", script]);
        let out = output_within(&mut cmd, command_limit(), script);
        assert!(out.status.success(), "stderr: {}", stderr(&out));
        out
    };
    let by_vmm = run("0");
    let by_guest = run("1");
    let host = std::process::Command::new("md5sum")
        .arg("/bin/busybox")
        .output()
        .expect("md5sum on the host");
    let host_sum = stdout(&host).split_whitespace().next().unwrap().to_string();
    let lines: Vec<String> = stdout(&by_vmm).lines().map(str::to_string).collect();
    assert!(lines.len() > 4, "{lines:?}");
    assert!(
        lines[0].starts_with(&host_sum),
        "{} vs {host_sum}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&host_sum),
        "{} vs {host_sum}",
        lines[1]
    );
    assert_eq!(stdout(&by_vmm), stdout(&by_guest));
    if vmm::kvm_kind::KvmKind::detect() == vmm::kvm_kind::KvmKind::Pvm {
        assert!(report_figure(&by_vmm, "kernel_copy_bytes") > 2 * 1024 * 1024);
        assert!(report_figure(&by_vmm, "kernel_copy_faults") > 0);
        assert_eq!(report_figure(&by_guest, "kernel_copies"), 0);
    }
}
