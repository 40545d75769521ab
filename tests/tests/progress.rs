//! What a user sees while hvtrace prepares a guest: on a terminal a status
//! line redrawn in place (checked through a pseudo-terminal, as a user's
//! terminal would receive it), plain timestamped phase lines otherwise,
//! nothing with `-q`, and a failed build naming the log that holds its
//! whole output.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use hvtrace_tests::*;

/// Runs hvtrace with `args`, its stdout and stderr a pseudo-terminal of
/// 100 columns; everything the terminal received, and the exit status.
fn on_a_terminal(args: &[&str]) -> (String, Option<i32>) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into `master` and `slave`
    // (both live across the call); the name buffer and termios are NULL
    // (not wanted) and `ws` is read only.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned
    // by nothing else: each is closed once, by its OwnedFd.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = Command::new(hvtrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start hvtrace");
    let reader = std::thread::spawn(move || {
        let mut f = File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last writer (hvtrace) has closed the terminal.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = child.wait().unwrap();
    (reader.join().unwrap(), status.code())
}

/// A cold boot on a terminal: a status line redrawn in place with the
/// elapsed time, each phase in turn (starting the guest, unpacking its
/// initramfs, running /init, saving the snapshot) and the console's last
/// line, no wider than the terminal; cleared before the command's output,
/// which follows intact.
#[test]
fn a_cold_boot_shows_a_status_line_on_a_terminal() {
    require_kvm();
    let (screen, code) = on_a_terminal(&["run", "--no-cache", "--", "echo", "command output"]);
    assert_eq!(code, Some(0), "{screen}");
    let redraws: Vec<&str> = screen.split("\r\x1b[K").skip(1).collect();
    assert!(redraws.len() >= 5, "no status line redrawn: {screen:?}");
    let status: Vec<&str> = redraws
        .iter()
        .filter_map(|r| r.strip_prefix("[hvtrace] "))
        .collect();
    for phase in [
        "starting the guest",
        "unpacking the guest's initramfs",
        "running the guest's /init",
        "saving a snapshot",
    ] {
        assert!(
            status.iter().any(|s| s.contains(phase)),
            "phase {phase:?} never shown: {status:?}"
        );
    }
    // The elapsed time leads every status line (`12.3s` or `1m05s`) and
    // grows; the console's last line follows the phase.
    let seconds: Vec<f64> = status
        .iter()
        .filter_map(|s| s.split(' ').next())
        .filter_map(|t| match t.split_once('m') {
            Some((m, s)) => {
                Some(m.parse::<f64>().ok()? * 60.0 + s.trim_end_matches('s').parse::<f64>().ok()?)
            }
            None => t.strip_suffix('s')?.parse().ok(),
        })
        .collect();
    assert_eq!(
        seconds.len(),
        status.len(),
        "a status line without its time: {status:?}"
    );
    assert!(
        seconds.windows(2).all(|w| w[0] <= w[1]),
        "time went back: {seconds:?}"
    );
    assert!(seconds.last().unwrap() > &1.0, "{seconds:?}");
    assert!(
        status.iter().any(|s| s.contains("| [") && s.contains(']')),
        "no console line shown: {status:?}"
    );
    assert!(
        redraws
            .iter()
            .all(|r| r.lines().next().unwrap_or("").chars().count() < 100),
        "a status line wider than the terminal"
    );
    // Cleared, then the note that stays, then the command's output.
    let after = redraws.last().unwrap();
    let note = after.find("guest booted in").expect("the boot note");
    let output = after.find("command output").expect("the command's output");
    assert!(note < output, "{after:?}");
}

/// Not on a terminal: one `[hvtrace] +N.Ns phase` line per phase, no
/// escape sequences; `-q` prints none of hvtrace's own lines.
#[test]
fn phase_lines_off_a_terminal_and_none_with_q() {
    require_kvm();
    let out = hvtrace(&["run", "--", "echo", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        !err.contains('\x1b'),
        "escape sequences off a terminal: {err:?}"
    );
    let restoring = err
        .lines()
        .find(|l| l.contains("restoring the cached snapshot"))
        .unwrap_or_else(|| panic!("no phase line: {err}"));
    let stamp = restoring
        .strip_prefix("[hvtrace] +")
        .and_then(|r| r.split_once("s "))
        .map(|(t, _)| t);
    assert!(
        stamp.is_some_and(|t| t.parse::<f64>().is_ok()),
        "not a timestamped phase line: {restoring:?}"
    );
    assert_eq!(stdout(&out), "hi\n");
    let quiet = hvtrace(&["run", "-q", "--", "echo", "hi"]);
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert_eq!(stdout(&quiet), "hi\n");
    assert!(
        !stderr(&quiet).contains("[hvtrace]"),
        "-q printed: {}",
        stderr(&quiet)
    );
}

/// A build script that fails: hvtrace fails (125), names the log file
/// holding the script's whole output and shows how it ended; the log
/// holds the script's own words.
#[test]
fn a_failed_build_names_its_log() {
    let out = Command::new(hvtrace_bin())
        .args(["run", "--", "true"])
        .env("HVTRACE_IMAGE_SEPARATE_PROGS", "7")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let err = stderr(&out);
    let log = err
        .split("its whole output is in ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no log named: {err}"));
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(
        text.contains("HVTRACE_IMAGE_SEPARATE_PROGS must be 0 or 1"),
        "{text}"
    );
    assert!(err.contains("must be 0 or 1"), "the end not shown: {err}");
    let _ = std::fs::remove_file(log);
}
