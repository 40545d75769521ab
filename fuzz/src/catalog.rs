//! Every fuzz target by name, with its seeds: what the mutation fuzzer's
//! binary, the short tests and the AFL++ harness share.

use std::path::Path;
use std::sync::Arc;

use crate::{seeds, targets};

/// The target names, in the order `all` runs them.
pub const NAMES: [&str; 7] = [
    "kallsyms", "btf", "paging", "tasks", "loader", "snapshot", "syscalls",
];

/// A target function, shareable with a worker thread.
pub type Target = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What the targets need from the real minimal kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Its `.BTF` section.
    pub btf: Vec<u8>,
    /// The bytes around its kallsyms arrays ([`seeds::kallsyms_region`]).
    pub kallsyms: Vec<u8>,
    /// The link-time address where `kallsyms` starts.
    pub kallsyms_vaddr: u64,
    /// Its bzImage.
    pub bzimage: Vec<u8>,
}

impl Kernel {
    /// Reads the minimal kernel (building it if it is not cached).
    pub fn minimal() -> Self {
        let vmlinux = seeds::minimal_vmlinux();
        let (kallsyms, kallsyms_vaddr) = seeds::kallsyms_region(&vmlinux);
        Self {
            btf: seeds::btf(&vmlinux),
            kallsyms,
            kallsyms_vaddr,
            bzimage: seeds::minimal_bzimage(),
        }
    }

    /// Saves the parts to `dir` (so a harness can start without vmlinux).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("btf"), &self.btf)?;
        std::fs::write(dir.join("kallsyms"), &self.kallsyms)?;
        std::fs::write(dir.join("kallsyms.vaddr"), self.kallsyms_vaddr.to_string())?;
        std::fs::write(dir.join("bzImage"), &self.bzimage)
    }

    /// Reads what [`Kernel::save`] wrote.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let vaddr = std::fs::read_to_string(dir.join("kallsyms.vaddr"))?;
        Ok(Self {
            btf: std::fs::read(dir.join("btf"))?,
            kallsyms: std::fs::read(dir.join("kallsyms"))?,
            kallsyms_vaddr: vaddr.trim().parse().map_err(std::io::Error::other)?,
            bzimage: std::fs::read(dir.join("bzImage"))?,
        })
    }
}

/// Target `name` and its seeds, or None for an unknown name.
pub fn entry(name: &str, kernel: &Kernel) -> Option<(Target, Vec<Vec<u8>>)> {
    let guest = || Arc::new(targets::TaskGuest::new(&kernel.btf, 12));
    Some(match name {
        "kallsyms" => (
            Arc::new(targets::kallsyms(kernel.kallsyms_vaddr)),
            vec![kernel.kallsyms.clone()],
        ),
        "btf" => (Arc::new(targets::btf), vec![kernel.btf.clone()]),
        "paging" => (Arc::new(targets::paging), vec![guest().seed.clone()]),
        "tasks" => {
            let g = guest();
            let seed = g.seed.clone();
            (Arc::new(move |d: &[u8]| g.walk(d)), vec![seed])
        }
        "loader" => {
            let mut s = vec![kernel.bzimage.clone()];
            s.extend(targets::loader::synthetic_seeds());
            (Arc::new(targets::loader::load), s)
        }
        "snapshot" => (
            Arc::new(targets::snapshot::read),
            vec![targets::snapshot::seed_file()],
        ),
        "syscalls" => (
            Arc::new(targets::syscalls::render),
            targets::syscalls::seeds(),
        ),
        _ => return None,
    })
}

/// The largest input AFL++ reads (a bigger seed is cut short).
pub const AFL_MAX_INPUT: usize = 1 << 20;

/// `base` patched by `patch`: its first 4 bytes (LE) are an offset into
/// `base` (modulo its length), the next 4 a length to cut the result to
/// (0: no cut), the rest the bytes written at the offset (growing `base`
/// if they run past its end).
pub fn overlay(base: &[u8], patch: &[u8]) -> Vec<u8> {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        for (k, x) in b.iter_mut().enumerate() {
            *x = patch.get(i + k).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b) as usize
    };
    let at = word(0) % base.len().max(1);
    let bytes = patch.get(8..).unwrap_or_default();
    let mut v = base.to_vec();
    if v.len() < at + bytes.len() {
        v.resize(at + bytes.len(), 0);
    }
    v[at..at + bytes.len()].copy_from_slice(bytes);
    if word(4) != 0 {
        v.truncate(word(4));
    }
    v
}

/// Target `name` as AFL++ runs it, and its seeds. A target whose only
/// seed is larger than [`AFL_MAX_INPUT`] (btf, kallsyms) takes
/// [`overlay`] patches of that seed instead of whole inputs; its seeds
/// are then 16 patches that leave the seed unchanged, spread over it.
pub fn afl_entry(name: &str, kernel: &Kernel) -> Option<(Target, Vec<Vec<u8>>)> {
    let (target, seeds) = entry(name, kernel)?;
    let [base] = &seeds[..] else {
        return Some((target, seeds));
    };
    if base.len() <= AFL_MAX_INPUT {
        return Some((target, seeds));
    }
    let base = base.clone();
    let patches = (0..16)
        .map(|i| {
            let at = base.len() / 16 * i;
            let mut p = (at as u32).to_le_bytes().to_vec();
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&base[at..(at + 256).min(base.len())]);
            p
        })
        .collect();
    Some((
        Arc::new(move |d: &[u8]| target(&overlay(&base, d))),
        patches,
    ))
}

#[cfg(test)]
mod tests {
    use super::overlay;

    #[test]
    fn overlay_patches_grows_and_cuts() {
        let base = [1u8, 2, 3, 4, 5];
        assert_eq!(overlay(&base, &[]), base);
        assert_eq!(
            overlay(&base, &[1, 0, 0, 0, 0, 0, 0, 0, 9]),
            [1, 9, 3, 4, 5]
        );
        assert_eq!(
            overlay(&base, &[8, 0, 0, 0, 0, 0, 0, 0, 9, 9]),
            [1, 2, 3, 9, 9]
        );
        assert_eq!(
            overlay(&base, &[4, 0, 0, 0, 0, 0, 0, 0, 7, 7]),
            [1, 2, 3, 4, 7, 7]
        );
        assert_eq!(overlay(&base, &[0, 0, 0, 0, 2, 0, 0, 0]), [1, 2]);
    }
}
