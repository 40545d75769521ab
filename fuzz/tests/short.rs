//! A short run of every fuzz target: part of the test command. Longer runs:
//! `cargo run --release -p hvtrace-fuzz -- all 1000000` (docs/fuzzing.md).

use std::time::Duration;

use hvtrace_fuzz::{run, seeds, targets};

/// Seeds must be accepted unmutated, or mutants would not go deep.
#[test]
fn seeds_are_well_formed() {
    let vmlinux = seeds::minimal_vmlinux();
    let (region, vaddr) = seeds::kallsyms_region(&vmlinux);
    let table = guest_introspect::kallsyms::find_kallsyms(&region, vaddr)
        .expect("the kallsyms seed decodes");
    assert!(table.num_syms > 20_000);
    let btf = seeds::btf(&vmlinux);
    let guest = targets::TaskGuest::new(&btf, 12);
    // init_task is not listed; 12 processes of 1..3 threads each.
    assert_eq!(guest.count(&guest.seed), Ok(24));
}

fn short(name: &str, target: &dyn Fn(&[u8]), seed: Vec<u8>, iterations: u64) {
    if let Err(f) = run(
        name,
        target,
        &[seed],
        iterations,
        0x5eed,
        Duration::from_secs(5),
    ) {
        panic!(
            "{name}: iteration {}: {} (input saved to {})",
            f.iteration,
            f.what,
            f.input.display()
        );
    }
}

#[test]
fn fuzz_kallsyms_briefly() {
    let vmlinux = seeds::minimal_vmlinux();
    let (region, vaddr) = seeds::kallsyms_region(&vmlinux);
    short("kallsyms", &targets::kallsyms(vaddr), region, 200);
}

#[test]
fn fuzz_btf_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    short("btf", &targets::btf, btf, 300);
}

#[test]
fn fuzz_paging_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    let guest = targets::TaskGuest::new(&btf, 12);
    short("paging", &targets::paging, guest.seed.clone(), 3000);
}

#[test]
fn fuzz_task_walker_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    let guest = targets::TaskGuest::new(&btf, 12);
    short("tasks", &|d| guest.walk(d), guest.seed.clone(), 3000);
}
