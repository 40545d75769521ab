//! Bad input ends with one clear message and a non-zero status, never a hang.

use hvtrace_tests::*;

/// Runs hvtrace and checks it failed with a message containing `needle`.
fn expect_refusal(args: &[&str], needle: &str) {
    let out = hvtrace(args);
    let err = stderr(&out);
    assert_ne!(
        out.status.code(),
        Some(0),
        "hvtrace {args:?} should fail; stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "hvtrace {args:?}: expected {needle:?} in: {err}"
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    require_kvm();
    let p = temp_path("not-a-kernel");
    std::fs::write(
        &p,
        b"#!/bin/sh\necho this is a shell script, not a kernel\n",
    )
    .unwrap();
    let refused = "is not a bootable x86-64 Linux kernel";
    expect_refusal(
        &[
            "run",
            "--no-cache",
            "--kernel",
            p.to_str().unwrap(),
            "--",
            "true",
        ],
        refused,
    );
    // A real kernel cut in half is refused too.
    let real = std::fs::read(kernel_for_qemu("minimal")).unwrap();
    std::fs::write(&p, &real[..real.len() / 2]).unwrap();
    expect_refusal(
        &[
            "run",
            "--no-cache",
            "--kernel",
            p.to_str().unwrap(),
            "--",
            "true",
        ],
        refused,
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_truncated_initrd_is_refused() {
    require_kvm();
    let img = std::fs::read(default_image()).unwrap();
    let p = temp_path("truncated.cpio");
    std::fs::write(&p, &img[..img.len() - 5000]).unwrap();
    expect_refusal(
        &[
            "run",
            "--no-cache",
            "--initrd",
            p.to_str().unwrap(),
            "--",
            "true",
        ],
        "initrd is truncated",
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn too_little_memory_is_refused() {
    require_kvm();
    let too_little = "MiB of guest memory is too little";
    // Below the floor, and too small for the kernel and image to fit.
    expect_refusal(
        &["run", "--no-cache", "--memory", "16", "--", "true"],
        too_little,
    );
    expect_refusal(
        &["run", "--no-cache", "--memory", "40", "--", "true"],
        too_little,
    );
}

#[test]
fn missing_kvm_device_is_reported() {
    let out = std::process::Command::new(hvtrace_bin())
        .args(["run", "--no-cache", "--", "true"])
        .env("HVTRACE_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("cannot open /nonexistent/kvm"), "{err}");
}

#[test]
fn a_kernel_that_panics_is_reported_with_its_panic_line() {
    require_kvm();
    // An initrd whose /init is not executable: the kernel finds no init and
    // panics. A tiny archive keeps the (emulated) boot short.
    let dir = temp_path("badinit");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("init"), b"not an executable").unwrap();
    let cpio = temp_path("badinit.cpio");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && echo init | cpio -o -H newc > {} 2>/dev/null",
            dir.display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let args = [
        "run",
        "--no-cache",
        "--initrd",
        cpio.to_str().unwrap(),
        "--",
        "true",
    ];
    let out = hvtrace(&args);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    // The kernel's own words, as the console printed them.
    assert!(err.contains("guest kernel panicked"), "{err}");
    assert!(err.contains("No working init found"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&cpio);
}

/// Runs hvtrace and checks it failed with status 125 (hvtrace's own
/// failure, as `env` and `timeout` use it) and a message with `needle`.
fn expect_hvtrace_failure(args: &[&str], needle: &str) {
    let out = hvtrace(args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(125),
        "hvtrace {args:?} should exit 125; stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "hvtrace {args:?}: expected {needle:?} in: {err}"
    );
}

#[test]
fn usage_errors_exit_125_not_a_status_the_guest_command_could_have() {
    // Each is a mistake a user makes at the prompt; clap's own status (2)
    // would read as the guest command's exit status 2.
    expect_hvtrace_failure(&["run", "--no-such-flag", "--", "true"], "--no-such-flag");
    expect_hvtrace_failure(&["no-such-command"], "no-such-command");
    expect_hvtrace_failure(&["run", "--cpus", "many", "--", "true"], "many");
    expect_hvtrace_failure(&["run"], "COMMAND");
    // Help is not a failure.
    let out = hvtrace(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Usage"), "{}", stdout(&out));
}

#[test]
fn string_limits_are_bounded() {
    // `-s` sizes a read of guest memory per string argument: a huge value
    // (a typo, or an overflow of `N + 1`) is refused before anything runs.
    for (value, needle) in [
        ("99999999999", "above the largest accepted, 1048576"),
        ("18446744073709551615", "above the largest accepted"),
        ("-1", "-1"),
    ] {
        expect_hvtrace_failure(&["trace", "-s", value, "--", "true"], needle);
        expect_hvtrace_failure(
            &[
                "attach",
                "--api-sock",
                "/nonexistent",
                "-p",
                "1",
                "-s",
                value,
            ],
            needle,
        );
    }
}

#[test]
fn an_api_socket_path_that_is_a_file_is_refused_and_left_alone() {
    // `--api-sock` names a path hvtrace creates; an existing regular file,
    // directory or symbolic link there is a mistake, not a stale socket.
    let dir = temp_path("api-sock-refusal");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("notes.txt");
    std::fs::write(&file, "a user's notes\n").unwrap();
    let link = dir.join("link.sock");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for path in [&file, &dir, &link] {
        let p = path.to_str().unwrap();
        expect_hvtrace_failure(&["boot", "--api-sock", p], "is not a socket");
        expect_hvtrace_failure(&["run", "--api-sock", p, "--", "true"], "is not a socket");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a user's notes\n");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_dir_all(&dir).unwrap();
}
