//! Bad input ends with one clear message and a non-zero status, never a hang.

use hvtrace_tests::*;

fn run_with(args: &[&str]) -> (i32, String) {
    let out = hvtrace(args);
    (out.status.code().unwrap_or(-1), stderr(&out))
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
    let (code, err) = run_with(&[
        "run",
        "--no-cache",
        "--kernel",
        p.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is not a bootable x86-64 Linux kernel"),
        "{err}"
    );
    // A real kernel cut in half is refused too.
    let real = std::fs::read(kernel_for_qemu("minimal")).unwrap();
    std::fs::write(&p, &real[..real.len() / 2]).unwrap();
    let (code, err) = run_with(&[
        "run",
        "--no-cache",
        "--kernel",
        p.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is not a bootable x86-64 Linux kernel"),
        "{err}"
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_truncated_initrd_is_refused() {
    require_kvm();
    let img = std::fs::read(default_image()).unwrap();
    let p = temp_path("truncated.cpio");
    std::fs::write(&p, &img[..img.len() - 5000]).unwrap();
    let (code, err) = run_with(&[
        "run",
        "--no-cache",
        "--initrd",
        p.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("initrd is truncated"), "{err}");
    let _ = std::fs::remove_file(&p);
}

#[test]
fn too_little_memory_is_refused() {
    require_kvm();
    let (code, err) = run_with(&["run", "--no-cache", "--memory", "16", "--", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("MiB of guest memory is too little"), "{err}");
    let (code, err) = run_with(&["run", "--no-cache", "--memory", "40", "--", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("MiB of guest memory is too little"), "{err}");
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
    let (code, err) = run_with(&[
        "run",
        "--no-cache",
        "--initrd",
        cpio.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("guest kernel panicked"), "{err}");
    assert!(err.contains("No working init found"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&cpio);
}
