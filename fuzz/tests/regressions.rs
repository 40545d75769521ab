//! Inputs that once hung or crashed a target (fuzz/regressions/, named
//! TARGET-WHAT.bin; docs/fuzzing.md has the story of each), replayed
//! through their target: each must finish, without a panic, within a
//! few seconds.

use std::sync::mpsc;
use std::time::Duration;

use hvtrace_fuzz::targets;

#[test]
fn every_saved_finding_now_passes_its_target() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let input = std::fs::read(&path).expect("a saved input");
        let target: fn(&[u8]) = match name.split('-').next() {
            Some("syscalls") => targets::syscalls::render,
            _ => panic!("{name}: no target of that name"),
        };
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| target(&input));
            let _ = done.send(outcome.is_ok());
        });
        match finished.recv_timeout(Duration::from_secs(10)) {
            Ok(true) => replayed += 1,
            Ok(false) => panic!("{name} panicked its target"),
            Err(_) => panic!("{name} hung its target (10 s)"),
        }
    }
    assert_eq!(replayed, 5, "every saved input replayed");
}
