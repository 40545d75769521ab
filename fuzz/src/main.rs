//! Long fuzzing runs: `cargo run --release -p hvtrace-fuzz -- TARGET
//! [ITERATIONS] [SEED]`, TARGET one of kallsyms, btf, paging, tasks,
//! loader, snapshot, syscalls, all. Prints inputs per second; on a finding
//! (a panic, or an input slower than the limit or hung), the saved input
//! and exits 1.
//!
//! `-- seeds TARGET DIR` writes the target's AFL++ seeds to DIR and the kernel
//! parts the harness needs to DIR/../kernel (for fuzz/afl.sh).

use std::path::Path;
use std::time::{Duration, Instant};

use hvtrace_fuzz::catalog::{self, Kernel, NAMES};
use hvtrace_fuzz::run;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    if which == "seeds" {
        let (Some(name), Some(dir)) = (args.get(2), args.get(3)) else {
            eprintln!("usage: hvtrace-fuzz seeds TARGET DIR");
            std::process::exit(2);
        };
        write_seeds(name, Path::new(dir));
        return;
    }
    if which != "all" && !NAMES.contains(&which) {
        eprintln!("unknown target {which}: one of {}, all", NAMES.join(", "));
        std::process::exit(2);
    }
    let iterations: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let kernel = Kernel::minimal();
    let limit = Duration::from_secs(2);
    let mut failed = false;
    for name in NAMES.into_iter().filter(|n| which == "all" || which == *n) {
        let (target, seeds) = catalog::entry(name, &kernel).expect("known target");
        let t = Instant::now();
        match run(name, move |d| target(d), &seeds, iterations, seed, limit) {
            Ok(n) => println!(
                "{name}: {n} inputs, no finding ({:.0} inputs/s)",
                n as f64 / t.elapsed().as_secs_f64()
            ),
            Err(f) => {
                println!(
                    "{name}: FINDING at iteration {}: {} (input saved to {})",
                    f.iteration,
                    f.what,
                    f.input.display()
                );
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}

/// Writes `name`'s AFL++ seeds ([`catalog::afl_entry`]) as DIR/seed-N and
/// the kernel parts to DIR/../kernel.
fn write_seeds(name: &str, dir: &Path) {
    let kernel = Kernel::minimal();
    let Some((_, seeds)) = catalog::afl_entry(name, &kernel) else {
        eprintln!("unknown target {name}: one of {}", NAMES.join(", "));
        std::process::exit(2);
    };
    std::fs::create_dir_all(dir).expect("create seed directory");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).expect("write seed");
    }
    let parts = dir.parent().unwrap_or(dir).join("kernel");
    kernel.save(&parts).expect("write kernel parts");
    println!(
        "{} seeds in {}, kernel parts in {}",
        seeds.len(),
        dir.display(),
        parts.display()
    );
}
