//! AFL++ harness (feature `afl`, built by `cargo afl build`; see
//! fuzz/afl.sh): `afl-harness TARGET KERNEL_DIR`, KERNEL_DIR holding the
//! kernel parts `hvtrace-fuzz seeds` wrote. AFL++ feeds inputs in
//! persistent mode; a panic aborts the process, which AFL++ records as a
//! crash, and its own per-input timeout records a hang. Targets whose seed
//! is over AFL++'s 1 MiB input limit take patches of it
//! ([`catalog::afl_entry`]).

use std::path::Path;

use hvtrace_fuzz::catalog::{self, Kernel, NAMES};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: afl-harness TARGET KERNEL_DIR ({})",
            NAMES.join(", ")
        );
        std::process::exit(2);
    };
    let kernel = Kernel::load(Path::new(dir)).expect("read the kernel parts");
    let (target, _) = catalog::afl_entry(name, &kernel).expect("known target");
    // A panic ends the process (AFL++ counts it as a crash), so no state
    // leaks from a half-run input into the next.
    let target = std::panic::AssertUnwindSafe(target);
    afl::fuzz!(|data: &[u8]| {
        (*target)(data);
    });
}
