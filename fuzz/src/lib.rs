//! Fuzz targets for hvtrace's code that reads untrusted bytes: in
//! guest-introspect the kallsyms decoder, the BTF reader, the page-table
//! walker and the task walker over arbitrary guest memory; in vmm the
//! kernel-file loader (bzImage, the seven decompressors, ELF, relocations)
//! and the snapshot reader; in utrace the syscall-argument formatter over
//! hostile user memory.
//!
//! cargo-fuzz needs a nightly toolchain, which these machines cannot fetch,
//! so the targets run under a small mutation fuzzer of our own
//! ([`Mutator`], [`run`]): seeds from real structures (the minimal kernel's
//! kallsyms region, `.BTF` and bzImage, a snapshot written by vmm's own
//! writer), mutated by bit flips, interesting integers, copied chunks,
//! truncation and growth. A target fails by panicking or by taking longer
//! than its time limit on one input (a [`watchdog`] stops waiting for an
//! input that never returns); [`run`] reports the input (saved to a file)
//! and the iteration. Each target is a function of `&[u8]`, so it also
//! drops into an AFL++ harness (`src/bin/afl_harness.rs`, feature `afl`)
//! or a `libfuzzer_sys::fuzz_target!` body unchanged.

pub mod catalog;
pub mod seeds;
pub mod targets;
pub mod watchdog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use watchdog::{Outcome, Worker};

/// A fast deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Mutates byte strings the way coverage-less fuzzers do.
#[derive(Debug, Clone)]
pub struct Mutator {
    rng: Rng,
    /// Cap on the size of a mutated input.
    pub max_len: usize,
}

/// Integers that tend to break length and offset arithmetic.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x100,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0xffff_ffff_ffff_ffff,
    0xffff_ffff_8100_0000,
    0xffff_8880_0000_0000,
];

impl Mutator {
    /// A mutator with PRNG `seed`.
    pub fn new(seed: u64, max_len: usize) -> Self {
        Self {
            rng: Rng::new(seed),
            max_len,
        }
    }

    /// The PRNG (targets may draw from it to build structured inputs).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Applies 1 to 8 random mutations to `data`.
    pub fn mutate(&mut self, data: &mut Vec<u8>) {
        let rounds = 1 + self.rng.below(8);
        for _ in 0..rounds {
            if data.is_empty() {
                data.push(self.rng.next_u64() as u8);
                continue;
            }
            let len = data.len();
            let at = self.rng.below(len);
            match self.rng.below(7) {
                0 => data[at] ^= 1 << self.rng.below(8),
                1 => data[at] = self.rng.next_u64() as u8,
                2 => {
                    let v = INTERESTING[self.rng.below(INTERESTING.len())];
                    let width = [1usize, 2, 4, 8][self.rng.below(4)];
                    let end = (at + width).min(len);
                    data[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                3 => {
                    // Copy a chunk elsewhere (duplicates structure).
                    let n = 1 + self.rng.below(64.min(len));
                    let from = self.rng.below(len - n + 1);
                    let to = self.rng.below(len - n + 1);
                    data.copy_within(from..from + n, to);
                }
                4 => data.truncate(at.max(1)),
                5 if len < self.max_len => {
                    let n = 1 + self.rng.below(64);
                    let bytes: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    data.splice(at..at, bytes);
                }
                _ => {
                    // A small-delta arithmetic change of a u32.
                    if at + 4 <= len {
                        let v = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                        let d = (self.rng.below(33) as u32).wrapping_sub(16);
                        data[at..at + 4].copy_from_slice(&v.wrapping_add(d).to_le_bytes());
                    }
                }
            }
        }
        data.truncate(self.max_len);
    }
}

/// What a fuzzing run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Iteration at which it happened.
    pub iteration: u64,
    /// Panic message, "took N ms", or "hung: ..." for an input that did
    /// not finish before the deadline.
    pub what: String,
    /// Where the offending input was saved.
    pub input: PathBuf,
}

/// Runs `target` on `iterations` mutants of `seeds` (round robin), with
/// PRNG `seed`; each call must finish within `per_input`. The target runs
/// on a worker thread ([`watchdog`]) and this thread waits at most
/// `per_input` for each input, so one that loops forever ends the run with
/// a "hung" finding (its worker is left behind). Returns the number of
/// inputs run, or the first finding.
pub fn run(
    name: &str,
    target: impl Fn(&[u8]) + Send + Sync + 'static,
    seeds: &[Vec<u8>],
    iterations: u64,
    seed: u64,
    per_input: Duration,
) -> Result<u64, Finding> {
    let max_len = seeds.iter().map(Vec::len).max().unwrap_or(0) * 2 + 4096;
    let mut m = Mutator::new(seed, max_len);
    let mut worker = Worker::spawn(name, target);
    let save = |i: u64, input: &[u8], what: String| {
        let path = std::env::temp_dir().join(format!("hvtrace-fuzz-{name}-{seed}-{i}.bin"));
        let _ = std::fs::write(&path, input);
        Finding {
            iteration: i,
            what,
            input: path,
        }
    };
    for i in 0..iterations {
        let mut input = seeds[(i as usize) % seeds.len().max(1)].clone();
        if i >= seeds.len() as u64 {
            m.mutate(&mut input);
        }
        let input = Arc::new(input);
        match worker.run(Arc::clone(&input), per_input) {
            Outcome::Done(took) if took <= per_input => {}
            Outcome::Done(took) => {
                return Err(save(i, &input, format!("took {} ms", took.as_millis())));
            }
            Outcome::Panicked(msg) => return Err(save(i, &input, format!("panicked: {msg}"))),
            Outcome::Hung => {
                let what = format!(
                    "hung: no result within {} ms (still running)",
                    per_input.as_millis()
                );
                return Err(save(i, &input, what));
            }
        }
    }
    Ok(iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_bounds_and_change_inputs() {
        let mut m = Mutator::new(7, 100);
        let mut changed = 0;
        for _ in 0..1000 {
            let mut d = vec![0u8; 50];
            m.mutate(&mut d);
            assert!(!d.is_empty() && d.len() <= 100);
            changed += usize::from(d != vec![0u8; 50]);
        }
        assert!(changed > 900, "only {changed} of 1000 mutants differ");
    }

    #[test]
    fn a_panicking_target_is_reported_with_its_input() {
        fn boom(d: &[u8]) {
            assert!(d.len() < 3 || d[2] != 0x42, "found it");
        }
        let f = run(
            "boom",
            boom,
            &[vec![0; 8]],
            1_000_000,
            1,
            Duration::from_secs(1),
        )
        .expect_err("the target must be found to panic");
        assert!(f.what.contains("found it"));
        assert_eq!(std::fs::read(&f.input).unwrap()[2], 0x42);
        let _ = std::fs::remove_file(f.input);
    }
}
