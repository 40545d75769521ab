//! The watchdog: an input that never returns fails the run within its
//! deadline, and the input is saved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hvtrace_fuzz::run;

/// Set once the test has its finding, so the stuck worker can stop
/// spinning (the fuzzer itself never does this: for it the loop is endless).
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Loops until released on any input whose byte 3 is 0x99.
fn spins(d: &[u8]) {
    if d.get(3) == Some(&0x99) {
        while !RELEASE.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    }
}

#[test]
fn an_endless_input_fails_the_run_and_is_saved() {
    let t = Instant::now();
    let f = run(
        "spin",
        spins,
        &[vec![0; 16]],
        u64::MAX, // without the watchdog, the run would never end
        3,
        Duration::from_secs(1),
    )
    .expect_err("the endless input must be found");
    let waited = t.elapsed();
    RELEASE.store(true, Ordering::Relaxed);
    assert!(f.what.starts_with("hung"), "{}", f.what);
    assert!(waited < Duration::from_secs(10), "took {waited:?}");
    let saved = std::fs::read(&f.input).expect("the hung input is saved");
    assert_eq!(saved.get(3), Some(&0x99), "saved input: {saved:?}");
    let _ = std::fs::remove_file(&f.input);
}
