//! Snapshot a booted guest through the control socket, restore it twice in
//! fresh processes, run a different command in each; a damaged snapshot is
//! refused with a clear message.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvtrace_tests::*;

#[test]
fn snapshot_restores_twice_into_fresh_processes() {
    require_kvm();
    // Make sure the default guest's run snapshot exists, so `boot --restore`
    // starts from a booted guest instead of spending minutes booting.
    let warm = hvtrace(&["run", "--", "true"]);
    assert!(warm.status.success(), "{}", stderr(&warm));
    let sock = temp_path("vm.sock");
    let snap = temp_path("booted.snap");
    let found = hvtrace(&["cached-snapshot"]);
    assert!(found.status.success(), "{}", stderr(&found));
    let cached = stdout(&found).trim().to_string();
    let mut vm = Command::new(hvtrace_bin())
        .args(["boot", "--api-sock"])
        .arg(&sock)
        .arg("--restore")
        .arg(&cached)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "control socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = hvtrace(&[
        "snapshot",
        "--api-sock",
        sock.to_str().unwrap(),
        "-o",
        snap.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "snapshot: {}", stderr(&out));
    let _ = std::process::Command::new("kill")
        .arg(vm.id().to_string())
        .status();
    let _ = vm.wait();

    let a = hvtrace(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "echo first; echo $((40+2))",
    ]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), "first\n42\n");
    let b = hvtrace(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "echo second; exit 7",
    ]);
    assert_eq!(b.status.code(), Some(7), "{}", stderr(&b));
    assert_eq!(stdout(&b), "second\n");

    // One flipped byte: refused, not restored.
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = temp_path("corrupt.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let c = hvtrace(&["run", "--restore", bad.to_str().unwrap(), "--", "true"]);
    assert!(!c.status.success());
    assert!(stderr(&c).contains("snapshot is corrupt"), "{}", stderr(&c));
    for p in [&snap, &bad] {
        let _ = std::fs::remove_file(p);
    }
}
