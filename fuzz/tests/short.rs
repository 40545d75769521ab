//! A short run of every fuzz target: part of the test command. Longer runs:
//! `cargo run --release -p hvtrace-fuzz -- all 1000000` (docs/fuzzing.md).

use std::sync::Arc;
use std::time::Duration;

use hvtrace_fuzz::targets::{loader, snapshot, syscalls};
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

/// The loader seeds load: the real bzImage, the synthetic ELF and its
/// bzImage in every compression format, each with its relocations.
#[test]
fn loader_seeds_load() {
    use vmm::loader::{load_kernel_image, Compression};
    let real = load_kernel_image(&seeds::minimal_bzimage(), loader::MAX_SIZE)
        .expect("the minimal bzImage loads");
    assert_eq!(real.compression, Some(Compression::Gzip));
    let synthetic = loader::synthetic_seeds();
    assert_eq!(synthetic.len(), 1 + Compression::ALL.len());
    for (i, s) in synthetic.iter().enumerate() {
        let mut k = load_kernel_image(s, loader::MAX_SIZE)
            .unwrap_or_else(|e| panic!("synthetic seed {i}: {e}"));
        let expected = i.checked_sub(1).map(|c| Compression::ALL[c]);
        assert_eq!(k.compression, expected, "seed {i}");
        assert_eq!(k.relocs.as_ref().map(|r| r.len()), Some(4), "seed {i}");
        assert_eq!(k.elf.pvh_entry, Some(0x100_0020), "seed {i}");
        k.apply_kaslr(0x20_0000).expect("relocates");
    }
}

/// The snapshot seed, written by vmm's own writer, reads back whole.
#[test]
fn snapshot_seed_loads() {
    let file = snapshot::seed_file();
    let dir = std::env::temp_dir().join(format!("hvtrace-fuzz-seedcheck-{}", std::process::id()));
    std::fs::write(&dir, &file).unwrap();
    let s = vmm::persist::load_offline(&dir);
    let _ = std::fs::remove_file(&dir);
    let s = s.unwrap_or_else(|e| panic!("seed snapshot: {e}"));
    assert_eq!(s.state.memory_size, snapshot::SEED_RAM);
    let mut b = [0u8; 100];
    s.ram.read(0x10_0000, &mut b).unwrap();
    assert_eq!(b, [2u8; 100]);
    // The CRC fix-up leaves a well-formed file unchanged.
    assert_eq!(snapshot::with_crc(&file), file);
}

/// The syscall target knows the whole table and its seeds render real
/// strings from the input's memory.
#[test]
fn syscall_seeds_render() {
    let names = syscalls::call_names();
    assert!(names.len() > 100, "only {} call names", names.len());
    for n in ["read", "openat", "execve", "clone", "rt_sigaction"] {
        assert!(names.contains(&n), "{n} missing");
    }
    struct Mem(Vec<u8>);
    let seeds = syscalls::seeds();
    let args = [0xffff_ff9c, syscalls::USER_BASE, 0, 0, 0, 0];
    impl utrace::syscalls::UserMemory for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let at = (addr - syscalls::USER_BASE) as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            true
        }
    }
    let f = utrace::syscalls::Formatter::default();
    let p = f.enter("openat", args, &Mem(seeds[2][97..].to_vec()));
    assert!(f
        .finish(&p, 3, &Mem(Vec::new()))
        .contains("\"/etc/hostname\""));
    syscalls::render(&seeds[0]);
}

fn short(
    name: &str,
    target: impl Fn(&[u8]) + Send + Sync + 'static,
    seeds: Vec<Vec<u8>>,
    iterations: u64,
) {
    if let Err(f) = run(
        name,
        target,
        &seeds,
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
    short("kallsyms", targets::kallsyms(vaddr), vec![region], 200);
}

#[test]
fn fuzz_btf_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    short("btf", targets::btf, vec![btf], 300);
}

#[test]
fn fuzz_paging_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    let guest = targets::TaskGuest::new(&btf, 12);
    short("paging", targets::paging, vec![guest.seed], 3000);
}

#[test]
fn fuzz_task_walker_briefly() {
    let btf = seeds::btf(&seeds::minimal_vmlinux());
    let guest = Arc::new(targets::TaskGuest::new(&btf, 12));
    let seed = guest.seed.clone();
    short("tasks", move |d| guest.walk(d), vec![seed], 3000);
}

#[test]
fn fuzz_loader_briefly() {
    // The real bzImage once (it is slow to decompress), then the synthetic
    // kernel in every format.
    short(
        "loader-real",
        loader::load,
        vec![seeds::minimal_bzimage()],
        1,
    );
    short("loader", loader::load, loader::synthetic_seeds(), 20_000);
}

#[test]
fn fuzz_snapshot_briefly() {
    short(
        "snapshot",
        snapshot::read,
        vec![snapshot::seed_file()],
        20_000,
    );
}

#[test]
fn fuzz_syscalls_briefly() {
    short("syscalls", syscalls::render, syscalls::seeds(), 10_000);
}
