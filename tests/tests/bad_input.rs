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
