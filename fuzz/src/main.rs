//! Long fuzzing runs: `cargo run --release -p hvtrace-fuzz -- TARGET
//! [ITERATIONS] [SEED]`, TARGET one of kallsyms, btf, paging, tasks, all.
//! Prints inputs per second; on a finding, the saved input and exits 1.

use std::time::{Duration, Instant};

use hvtrace_fuzz::{run, seeds, targets};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    let iterations: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let vmlinux = seeds::minimal_vmlinux();
    let btf = seeds::btf(&vmlinux);
    let (region, vaddr) = seeds::kallsyms_region(&vmlinux);
    let guest = targets::TaskGuest::new(&btf, 12);
    let limit = Duration::from_secs(2);
    let mut failed = false;
    let mut go = |name: &str, target: &dyn Fn(&[u8]), seed_input: &[Vec<u8>]| {
        if which != "all" && which != name {
            return;
        }
        let t = Instant::now();
        match run(name, target, seed_input, iterations, seed, limit) {
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
    };
    go("kallsyms", &targets::kallsyms(vaddr), &[region]);
    go("btf", &targets::btf, std::slice::from_ref(&btf));
    go(
        "paging",
        &targets::paging,
        std::slice::from_ref(&guest.seed),
    );
    go(
        "tasks",
        &|d| guest.walk(d),
        std::slice::from_ref(&guest.seed),
    );
    std::process::exit(i32::from(failed));
}
