//! Recovers the kernel's own symbol table (kallsyms) from a stripped x86-64
//! kernel image: the decompressed vmlinux ELF, or raw guest memory of the
//! loaded kernel, with no System.map.
//!
//! `scripts/kallsyms.c` emits these `.rodata` arrays (every label `.balign 8`):
//!
//! * Linux <= 6.3 ([`KallsymsLayout::OffsetsFirst`]): `kallsyms_offsets`
//!   (i32 each), `kallsyms_relative_base` (u64), `kallsyms_num_syms` (u32),
//!   `kallsyms_names`, `kallsyms_markers` (u32 each), `kallsyms_seqs_of_names`
//!   (3 bytes each; 6.2+, and backported to Debian's 6.1), `kallsyms_token_table`,
//!   `kallsyms_token_index` (256 u16).
//! * Linux >= 6.4 ([`KallsymsLayout::NamesFirst`], e.g. 6.12): `num_syms`,
//!   `names`, `markers`, `token_table`, `token_index`, `offsets`,
//!   `relative_base`, `seqs_of_names`.
//!
//! A name is a length (1 byte, or 2 bytes ULEB128 when >= 0x80) and that many
//! token numbers; each expands through the token table, and the first
//! expanded character is the nm type letter. `markers[k]` is the offset of
//! name `256 * k`. Addresses are `relative_base + (u32)offset`, or with
//! `KALLSYMS_ABSOLUTE_PERCPU` (x86-64 SMP, <= 6.14): an offset >= 0 is an
//! absolute per-cpu address (type `A`) and a negative one means
//! `relative_base - 1 - offset`.
//!
//! Search: the token table is found by its `"0\0" .. "9\0"` run and proven by
//! the 256-entry index after it; the markers array is the first `0, a, b, ..`
//! run (steps of one 256-name block) scanning back from the token table; the
//! names start right after a `num_syms` word whose names walk lands on every
//! marker and ends at the markers; the offsets sit where either layout puts
//! them and must decode to sorted addresses. Everything is bounds-checked and
//! a global work budget caps hostile inputs. Not handled: tables of <= 256
//! symbols, `kallsyms_addresses` (non base-relative) kernels, 7.0's
//! PC-relative offsets, big-endian and 32-bit kernels.

use crate::symbols::Symbol;

/// Which order the kallsyms arrays were emitted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KallsymsLayout {
    /// Linux <= 6.3: offsets and relative base before `kallsyms_num_syms`.
    OffsetsFirst,
    /// Linux >= 6.4: offsets and relative base after `kallsyms_token_index`.
    NamesFirst,
}

/// The decoded kallsyms table.
#[derive(Debug, Clone)]
pub struct KallsymsTable {
    /// Symbols in kallsyms order (sorted by address), with nm type letters
    /// (per-cpu symbols are `A` under `KALLSYMS_ABSOLUTE_PERCPU`).
    pub symbols: Vec<Symbol>,
    /// `kallsyms_relative_base` as stored (the runtime value in KASLR'd memory).
    pub relative_base: u64,
    /// `kallsyms_num_syms`, equal to `symbols.len()`.
    pub num_syms: usize,
    /// Whether offsets used the `KALLSYMS_ABSOLUTE_PERCPU` encoding.
    pub absolute_percpu: bool,
    /// Array order found.
    pub layout: KallsymsLayout,
    /// Virtual address of `kallsyms_token_table`.
    pub token_table_vaddr: u64,
}

/// Why no kallsyms table could be recovered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    /// No `"0\0".."9\0"` run followed by a consistent `kallsyms_token_index`.
    #[error("no kallsyms_token_table found (no \"0\\0\"..\"9\\0\" run with a consistent token index after it)")]
    NoTokenTable,
    /// Search work budget exhausted (hostile input or not a kernel).
    #[error(
        "kallsyms search gave up: work budget exhausted (hostile input or not a kernel image)"
    )]
    Budget,
    /// Token table found, but no markers/names/num_syms consistent with it.
    #[error("kallsyms_token_table at {token_table:#x} but no consistent kallsyms_markers, kallsyms_names and kallsyms_num_syms before it")]
    NoNames {
        /// Virtual address of the token table.
        token_table: u64,
    },
    /// Names decoded, but no offsets table giving sorted addresses.
    #[error("{num_syms} kallsyms names found, but no kallsyms_offsets/kallsyms_relative_base decoding to sorted addresses (6.1 or 6.4+ layout)")]
    NoOffsets {
        /// Number of names.
        num_syms: usize,
    },
    /// A name expanded to something that is not a symbol.
    #[error("kallsyms name {index} does not expand to a type letter and a name")]
    BadName {
        /// Index of the symbol.
        index: usize,
    },
    /// The ELF container is unusable.
    #[error("not a usable ELF64 little-endian kernel image: {0}")]
    BadElf(&'static str),
}

impl KallsymsError {
    /// How far the search got, to report the most useful error.
    fn rank(&self) -> u8 {
        match self {
            Self::BadElf(_) => 0,
            Self::NoTokenTable => 1,
            Self::Budget => 2,
            Self::NoNames { .. } => 3,
            Self::NoOffsets { .. } => 4,
            Self::BadName { .. } => 5,
        }
    }
}

const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// Digit runs examined before giving up.
const MAX_DIGIT_RUNS: usize = 64;
/// Longest token / longest compressed entry (KSYM_NAME_LEN = 512 in 6.1+).
const MAX_TOKEN: usize = 512;
const MAX_ENTRY: usize = 512;
/// Longest expanded `type + name`.
const MAX_NAME: usize = 1024;
/// How far before the token table the markers may start (seqs_of_names is 3n).
const MARKER_SCAN: usize = 64 << 20;
/// Markers candidates tried per token table.
const MAX_MARKER_TRIES: usize = 256;
/// Total elementary steps (words scanned, names walked) per `find_kallsyms`.
const BUDGET: u64 = 40_000_000;

fn spend(budget: &mut u64, n: u64) -> bool {
    *budget = budget.saturating_sub(n);
    *budget > 0
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Misalignment of image offset `off` at virtual address `vaddr + off`.
fn mis(vaddr: u64, off: usize, a: u64) -> usize {
    (vaddr.wrapping_add(off as u64) % a) as usize
}

fn align_down(vaddr: u64, off: usize, a: u64) -> Option<usize> {
    off.checked_sub(mis(vaddr, off, a))
}

fn align_up(vaddr: u64, off: usize, a: u64) -> Option<usize> {
    off.checked_add((a as usize - mis(vaddr, off, a)) % a as usize)
}

/// The 256 tokens: `(start, end)` image offsets, and where table and index sit.
struct Tokens {
    tok: [(usize, usize); 256],
    table: usize,
    index: usize,
}

/// Tries the token table whose `"0\0"` entry is at `pos0`.
fn parse_tokens(img: &[u8], vaddr: u64, pos0: usize) -> Option<Tokens> {
    let mut end = pos0;
    for _ in b'0'..=255u8 {
        let rest = img.get(end..)?;
        let len = rest.iter().take(MAX_TOKEN + 1).position(|&b| b == 0)?;
        end += len + 1;
    }
    // The index follows after <= 7 bytes of alignment padding.
    for index in end..end + 8 {
        if mis(vaddr, index, 2) != 0 || u16_at(img, index) != Some(0) {
            continue;
        }
        let idx = |i: usize| u16_at(img, index + 2 * i).map(usize::from);
        let Some(table) = idx(usize::from(b'0')).and_then(|o| pos0.checked_sub(o)) else {
            continue;
        };
        let mut tok = [(0, 0); 256];
        let ok = (0..256).all(|i| {
            let start = idx(i).map(|o| table + o);
            let next = if i == 255 {
                Some(end)
            } else {
                idx(i + 1).map(|o| table + o)
            };
            match (start, next) {
                (Some(s), Some(n)) if s < n && n <= img.len() => {
                    tok[i] = (s, n - 1);
                    img[n - 1] == 0 && !img[s..n - 1].contains(&0)
                }
                _ => false,
            }
        });
        if ok {
            return Some(Tokens { tok, table, index });
        }
    }
    None
}

/// Length and header size of the compressed name at `p`.
fn entry_len(img: &[u8], p: usize) -> Option<(usize, usize)> {
    let b0 = usize::from(*img.get(p)?);
    let (len, hdr) = if b0 & 0x80 != 0 {
        let b1 = usize::from(*img.get(p + 1)?);
        if b1 & 0x80 != 0 {
            return None;
        }
        ((b0 & 0x7f) | (b1 << 7), 2)
    } else {
        (b0, 1)
    };
    (1..=MAX_ENTRY).contains(&len).then_some((len, hdr))
}

/// Walks `n` names from `start`, checking each marker; returns the end.
fn walk_names(
    img: &[u8],
    start: usize,
    n: usize,
    markers: usize,
    budget: &mut u64,
) -> Option<usize> {
    let mut p = start;
    for i in 0..n {
        if !spend(budget, 1) {
            return None;
        }
        if i & 0xff == 0 && start.checked_add(u32_at(img, markers + 4 * (i >> 8))? as usize)? != p {
            return None;
        }
        let (len, hdr) = entry_len(img, p)?;
        p += hdr + len;
    }
    (p <= img.len()).then_some(p)
}

/// Where the name arrays were found.
struct Names {
    num_syms_at: usize,
    start: usize,
    n: usize,
}

/// Given `m` markers at `markers`, finds `num_syms` and the names before them.
fn try_markers(
    img: &[u8],
    vaddr: u64,
    markers: usize,
    m: usize,
    budget: &mut u64,
) -> Option<Names> {
    let last = u32_at(img, markers + 4 * (m - 1))? as usize;
    let hi = markers.checked_sub(last.checked_add(2)?)?; // latest possible names start
    let lo = markers.saturating_sub(last + 16 + 256 * (MAX_ENTRY + 2));
    let mut q = align_down(vaddr, hi.checked_sub(4)?, 4)?;
    while q >= lo && spend(budget, 1) {
        let v = u32_at(img, q)? as usize;
        if v > 256 * (m - 1) && v <= 256 * m {
            for start in [q + 8, q + 4].into_iter().filter(|&s| s <= hi) {
                let end = walk_names(img, start, v, markers, budget);
                if end.is_some_and(|e| e <= markers && markers - e < 8) {
                    return Some(Names {
                        num_syms_at: q,
                        start,
                        n: v,
                    });
                }
            }
        }
        q = q.checked_sub(4)?;
    }
    None
}

fn marker_step_ok(a: u32, b: u32) -> bool {
    b.checked_sub(a)
        .is_some_and(|d| (512..=256 * (MAX_ENTRY as u32 + 2)).contains(&d))
}

/// Scans back from the token table for a markers array that fits some names.
fn find_names(img: &[u8], vaddr: u64, table: usize, budget: &mut u64) -> Option<Names> {
    let lo = table.saturating_sub(MARKER_SCAN);
    let mut p = align_down(vaddr, table.checked_sub(8)?, 4)?;
    let mut tries = 0;
    while p >= lo && spend(budget, 1) {
        let w = |i: usize| u32_at(img, p + 4 * i);
        if w(0)? == 0 && marker_step_ok(0, w(1)?) {
            let mut r = 2;
            while p + 4 * (r + 1) <= table && marker_step_ok(w(r - 1)?, w(r)?) && spend(budget, 1) {
                r += 1;
            }
            tries += 1;
            if tries > MAX_MARKER_TRIES {
                return None;
            }
            // Data after the last marker (seqs_of_names) may extend the run.
            for m in [r, r - 1] {
                if let Some(found) = try_markers(img, vaddr, p, m, budget) {
                    return Some(found);
                }
            }
        }
        p = p.checked_sub(4)?;
    }
    None
}

/// Decodes `n` offsets at `at` against the relative base at `base_at`.
fn check_offsets(
    img: &[u8],
    at: usize,
    base_at: usize,
    n: usize,
    budget: &mut u64,
) -> Option<(Vec<u64>, u64, bool)> {
    let end = at.checked_add(n.checked_mul(4)?)?;
    let base = u64_at(img, base_at)?;
    if end > base_at || base == 0 || !spend(budget, n as u64) {
        return None;
    }
    let raw = img
        .get(at..end)?
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let percpu = raw.clone().any(|v| v < 0);
    let (mut addrs, mut has_base, mut rises) = (Vec::with_capacity(n), false, 0);
    for v in raw {
        let a = if !percpu {
            has_base |= v == 0;
            base.wrapping_add(u64::from(v as u32))
        } else if v >= 0 {
            v as u64
        } else {
            has_base |= v == -1;
            base.wrapping_sub(1).wrapping_sub(i64::from(v) as u64)
        };
        match addrs.last() {
            Some(&prev) if a < prev => return None,
            Some(&prev) if a > prev => rises += 1,
            _ => {}
        }
        addrs.push(a);
    }
    (has_base && rises >= n / 4).then_some((addrs, base, percpu))
}

/// Expands the name at `p`: (type, name, next offset).
fn decode_name(
    img: &[u8],
    p: usize,
    t: &Tokens,
    buf: &mut Vec<u8>,
) -> Option<(char, String, usize)> {
    let (len, hdr) = entry_len(img, p)?;
    let data = img.get(p + hdr..p + hdr + len)?;
    buf.clear();
    for &c in data {
        let (s, e) = t.tok[usize::from(c)];
        buf.extend_from_slice(img.get(s..e)?);
        if buf.len() > MAX_NAME {
            return None;
        }
    }
    let (&kind, name) = buf.split_first()?;
    if !kind.is_ascii_graphic() || name.is_empty() {
        return None;
    }
    Some((
        char::from(kind),
        String::from_utf8_lossy(name).into_owned(),
        p + hdr + len,
    ))
}

fn decode_at(
    img: &[u8],
    vaddr: u64,
    t: &Tokens,
    budget: &mut u64,
) -> Result<KallsymsTable, KallsymsError> {
    let token_table_vaddr = vaddr.wrapping_add(t.table as u64);
    let names = find_names(img, vaddr, t.table, budget).ok_or(KallsymsError::NoNames {
        token_table: token_table_vaddr,
    })?;
    let n = names.n;
    let mut cands = Vec::new();
    // <= 6.3: offsets, relative_base, num_syms (each `.balign 8`).
    if let Some(base_at) = names.num_syms_at.checked_sub(8) {
        if let Some(at) = base_at
            .checked_sub(4 * n)
            .and_then(|x| align_down(vaddr, x, 8))
        {
            cands.push((at, base_at, KallsymsLayout::OffsetsFirst));
        }
    }
    // >= 6.4: token_index, offsets, relative_base.
    if let Some(at) = align_up(vaddr, t.index + 512, 8) {
        if let Some(base_at) = align_up(vaddr, at + 4 * n, 8) {
            cands.push((at, base_at, KallsymsLayout::NamesFirst));
        }
    }
    let (addrs, relative_base, absolute_percpu, layout) = cands
        .into_iter()
        .find_map(|(at, base_at, l)| {
            check_offsets(img, at, base_at, n, budget).map(|(a, b, p)| (a, b, p, l))
        })
        .ok_or(KallsymsError::NoOffsets { num_syms: n })?;
    let mut symbols = Vec::with_capacity(n);
    let (mut p, mut buf) = (names.start, Vec::new());
    for (index, addr) in addrs.into_iter().enumerate() {
        let (kind, name, next) =
            decode_name(img, p, t, &mut buf).ok_or(KallsymsError::BadName { index })?;
        symbols.push(Symbol { addr, kind, name });
        p = next;
    }
    Ok(KallsymsTable {
        symbols,
        relative_base,
        num_syms: n,
        absolute_percpu,
        layout,
        token_table_vaddr,
    })
}

/// Finds and decodes kallsyms in `image`, the kernel's bytes loaded at
/// virtual address `image_vaddr` (a PT_LOAD segment holding `.rodata`, or raw
/// guest memory of the kernel image). Addresses are as stored: link-time for
/// a vmlinux file, runtime (KASLR-shifted) for guest memory.
pub fn find_kallsyms(image: &[u8], image_vaddr: u64) -> Result<KallsymsTable, KallsymsError> {
    let mut budget = BUDGET;
    let mut best = KallsymsError::NoTokenTable;
    let mut from = 0;
    for _ in 0..MAX_DIGIT_RUNS {
        let Some(pos0) = image.get(from..).and_then(|rest| {
            let mut i = 0;
            while let Some(j) = rest.get(i..)?.iter().position(|&b| b == b'0') {
                if rest[i + j..].starts_with(DIGITS) {
                    return Some(from + i + j);
                }
                i += j + 1;
            }
            None
        }) else {
            break;
        };
        from = pos0 + 1;
        let Some(tokens) = parse_tokens(image, image_vaddr, pos0) else {
            continue;
        };
        match decode_at(image, image_vaddr, &tokens, &mut budget) {
            Ok(table) => return Ok(table),
            Err(e) if e.rank() >= best.rank() => best = e,
            Err(_) => {}
        }
        if budget == 0 {
            return Err(KallsymsError::Budget);
        }
    }
    Err(best)
}

/// Finds kallsyms in a vmlinux ELF64 (little-endian) file by searching each
/// PT_LOAD segment with its virtual address; the ELF symbol table, if any,
/// is not used.
pub fn find_kallsyms_in_elf(elf: &[u8]) -> Result<KallsymsTable, KallsymsError> {
    if !elf.starts_with(b"\x7fELF") {
        return Err(KallsymsError::BadElf("no \\x7fELF magic"));
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(KallsymsError::BadElf("not ELF64 little-endian"));
    }
    let bad = KallsymsError::BadElf("truncated header");
    let phoff = u64_at(elf, 0x20).ok_or(bad.clone())?;
    let phentsize = u16_at(elf, 0x36).ok_or(bad.clone())?;
    let phnum = u16_at(elf, 0x38).ok_or(bad)?;
    if phentsize < 56 {
        return Err(KallsymsError::BadElf("program header entries too small"));
    }
    let mut best = KallsymsError::BadElf("no PT_LOAD segment");
    for i in 0..u64::from(phnum) {
        let ph = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.checked_add(56).is_some_and(|e| e <= elf.len()));
        let Some(ph) = ph else {
            return Err(KallsymsError::BadElf("program headers outside the file"));
        };
        let field = |o: usize| u64_at(elf, ph + o).and_then(|v| usize::try_from(v).ok());
        if u32_at(elf, ph) != Some(1) {
            continue; // not PT_LOAD
        }
        let (Some(off), Some(vaddr), Some(size)) = (field(8), u64_at(elf, ph + 16), field(32))
        else {
            continue;
        };
        let Some(seg) = off.checked_add(size).and_then(|end| elf.get(off..end)) else {
            if best.rank() == 0 {
                best = KallsymsError::BadElf("PT_LOAD segment outside the file");
            }
            continue;
        };
        match find_kallsyms(seg, vaddr) {
            Ok(table) => return Ok(table),
            Err(e) if e.rank() >= best.rank() => best = e,
            Err(_) => {}
        }
    }
    Err(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    const VADDR: u64 = 0xffff_ffff_8180_0000;

    fn filler(img: &mut Vec<u8>, n: usize, seed: &mut u64) {
        for _ in 0..n {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            img.push((*seed >> 33) as u8);
        }
    }

    /// `percpu` absolute per-cpu symbols, then `n` others (pairs share an address).
    fn sample_syms(n: usize, percpu: usize) -> Vec<Symbol> {
        let sym = |addr, kind, name| Symbol { addr, kind, name };
        let mut v: Vec<Symbol> = (0..percpu)
            .map(|i| sym(0x1000 * i as u64, 'A', format!("percpu_var{i}")))
            .collect();
        v.extend((0..n).map(|i| {
            let name = if i == 5 {
                format!("long_{}", "q".repeat(300))
            } else {
                format!("func_{i}")
            };
            sym(
                0xffff_ffff_8100_0000 + 0x40 * (i as u64 & !1),
                ['T', 't', 'D', 'd', 'b', 'R', 'W', '?'][i % 8],
                name,
            )
        }));
        v
    }

    fn raw(s: &Symbol) -> Vec<u8> {
        std::iter::once(s.kind as u8)
            .chain(s.name.bytes())
            .collect()
    }

    /// Parts in memory order and where each starts: the kernel's arrays.
    fn build(
        syms: &[Symbol],
        percpu: bool,
        names_first: bool,
        seqs: bool,
    ) -> (Vec<u8>, Vec<usize>) {
        let mut tok = vec![Vec::new(); 256];
        syms.iter()
            .flat_map(raw)
            .for_each(|b| tok[usize::from(b)] = vec![b]);
        let mut free = (0..256)
            .rev()
            .filter(|&i| tok[i].is_empty())
            .collect::<Vec<_>>()
            .into_iter();
        for m in ["Tfunc_", "func_", "var", "percpu_", "_1", "00"] {
            tok[free.next().unwrap()] = m.as_bytes().to_vec();
        }
        let base = syms
            .iter()
            .find(|s| !(percpu && s.kind == 'A'))
            .unwrap()
            .addr;
        let mut offsets = Vec::new();
        let (mut names, mut markers) = (Vec::new(), Vec::new());
        for (i, s) in syms.iter().enumerate() {
            let v = match (percpu, s.kind) {
                (false, _) => s.addr.wrapping_sub(base) as i64,
                (true, 'A') => s.addr as i64,
                (true, _) => base.wrapping_sub(s.addr) as i64 - 1,
            };
            offsets.extend((v as i32).to_le_bytes());
            if i % 256 == 0 {
                markers.extend((names.len() as u32).to_le_bytes());
            }
            let (r, mut c, mut j) = (raw(s), Vec::new(), 0);
            while j < r.len() {
                let multi = (0..256).filter(|&t| tok[t].len() > 1 && r[j..].starts_with(&tok[t]));
                let t = multi
                    .max_by_key(|&t| tok[t].len())
                    .unwrap_or(usize::from(r[j]));
                c.push(t as u8);
                j += tok[t].len();
            }
            if c.len() < 0x80 {
                names.push(c.len() as u8);
            } else {
                names.extend([(c.len() & 0x7f) as u8 | 0x80, (c.len() >> 7) as u8]);
            }
            names.extend(c);
        }
        let (mut tt, mut ti) = (Vec::new(), Vec::new());
        for t in &tok {
            ti.extend((tt.len() as u16).to_le_bytes());
            tt.extend(t.iter().copied().chain([0]));
        }
        let n = syms.len();
        let sq: Vec<u8> = (0..n)
            .flat_map(|i| ((i * 7919) % n).to_be_bytes()[5..].to_vec())
            .collect();
        let (num, rb) = (
            (n as u32).to_le_bytes().to_vec(),
            base.to_le_bytes().to_vec(),
        );
        let parts = match (names_first, seqs) {
            (true, _) => vec![num, names, markers, tt, ti, offsets, rb, sq],
            (false, true) => vec![offsets, rb, num, names, markers, sq, tt, ti],
            (false, false) => vec![offsets, rb, num, names, markers, tt, ti],
        };
        let (mut img, mut seed, mut starts) = (Vec::new(), 42, Vec::new());
        filler(&mut img, 0x2345, &mut seed);
        for p in parts {
            img.resize(img.len().next_multiple_of(8), 0);
            starts.push(img.len());
            img.extend(p);
        }
        filler(&mut img, 0x1000, &mut seed);
        (img, starts)
    }

    #[test]
    fn synthetic_tables_decode_in_all_layouts() {
        for (percpu, names_first, seqs) in [
            (true, false, true),
            (true, false, false),
            (false, true, true),
            (true, true, true),
        ] {
            let syms = sample_syms(700, if percpu { 40 } else { 0 });
            let (img, starts) = build(&syms, percpu, names_first, seqs);
            let t = find_kallsyms(&img, VADDR)
                .unwrap_or_else(|e| panic!("{percpu} {names_first} {seqs}: {e}"));
            assert_eq!(t.num_syms, syms.len());
            assert_eq!(t.symbols, syms);
            assert_eq!(t.absolute_percpu, percpu);
            assert_eq!(t.relative_base, 0xffff_ffff_8100_0000);
            let layout = if names_first {
                KallsymsLayout::NamesFirst
            } else {
                KallsymsLayout::OffsetsFirst
            };
            assert_eq!(t.layout, layout);
            let tt = if names_first {
                starts[3]
            } else {
                starts[starts.len() - 2]
            };
            assert_eq!(t.token_table_vaddr, VADDR + tt as u64);
        }
    }

    fn elf_with(seg: &[u8], vaddr: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x1000];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let ph = |e: &mut Vec<u8>, i: usize, ty: u32, off: u64, va: u64, sz: u64| {
            let p = 64 + 56 * i;
            e[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            for (o, v) in [(8, off), (16, va), (32, sz)] {
                e[p + o..p + o + 8].copy_from_slice(&v.to_le_bytes());
            }
        };
        ph(&mut e, 0, 4, 0, 0, 16); // PT_NOTE
        ph(&mut e, 1, 1, u64::MAX - 8, 0, 1 << 40); // PT_LOAD outside the file
        ph(&mut e, 2, 1, 0x1000, vaddr, seg.len() as u64);
        e.extend_from_slice(seg);
        e
    }

    #[test]
    fn elf_program_headers_are_walked() {
        let syms = sample_syms(600, 10);
        let (img, _) = build(&syms, true, false, true);
        let t = find_kallsyms_in_elf(&elf_with(&img, VADDR)).unwrap();
        assert_eq!(t.symbols, syms);
        assert!(matches!(
            find_kallsyms_in_elf(b"\x7fELF\x01\x01"),
            Err(KallsymsError::BadElf(_))
        ));
        assert!(matches!(
            find_kallsyms_in_elf(&[0x7f, b'E', b'L', b'F', 2, 1, 0]),
            Err(KallsymsError::BadElf(_))
        ));
        let e = elf_with(&[0u8; 100], VADDR);
        assert_eq!(
            find_kallsyms_in_elf(&e).unwrap_err(),
            KallsymsError::NoTokenTable
        );
        assert!(find_kallsyms_in_elf(&e[..0x50]).is_err());
    }

    fn quick_err(img: &[u8], vaddr: u64) -> KallsymsError {
        let t0 = Instant::now();
        let r = find_kallsyms(img, vaddr);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t0.elapsed()
        );
        r.expect_err("garbage decoded")
    }

    #[test]
    fn hostile_inputs_fail_quickly_without_panicking() {
        assert_eq!(quick_err(&[], 0), KallsymsError::NoTokenTable);
        assert_eq!(
            quick_err(&vec![0u8; 4 << 20], 0),
            KallsymsError::NoTokenTable
        );
        let mut noise = Vec::new();
        filler(&mut noise, 4 << 20, &mut 7);
        quick_err(&noise, VADDR);
        quick_err(&DIGITS.repeat(200_000), VADDR);

        let syms = sample_syms(1000, 20);
        let (img, s) = build(&syms, true, false, true); // offsets rb num names markers seqs tt ti
        let patched = |at: usize, bytes: &[u8]| {
            let mut v = img.clone();
            v[at..at + bytes.len()].copy_from_slice(bytes);
            v
        };
        for n in [0x8000_0000u32, u32::MAX, 0, 1000 + 256] {
            let e = quick_err(&patched(s[2], &n.to_le_bytes()), VADDR);
            assert!(
                matches!(e, KallsymsError::NoNames { .. }),
                "num_syms {n}: {e}"
            );
        }
        for (i, v) in [(200usize, 0xffffu16), (1, 0), (255, 2)] {
            let e = quick_err(&patched(s[7] + 2 * i, &v.to_le_bytes()), VADDR);
            assert_eq!(e, KallsymsError::NoTokenTable, "token index {i}");
        }
        assert!(matches!(
            quick_err(&patched(s[3], &[0xff; 64]), VADDR),
            KallsymsError::NoNames { .. }
        ));
        // Markers going backwards (a cycle) or past the names.
        for m in [0u32, 0x7fff_ffff] {
            quick_err(&patched(s[4] + 4, &m.to_le_bytes()), VADDR);
        }
        let e = quick_err(&patched(s[0] + 40, &[0x55; 64]), VADDR);
        assert_eq!(e, KallsymsError::NoOffsets { num_syms: 1020 });
        let e = quick_err(&patched(s[1], &[0; 8]), VADDR);
        assert_eq!(e, KallsymsError::NoOffsets { num_syms: 1020 });

        // Markers-like runs everywhere before a real token table.
        let mut hostile: Vec<u8> = [0u32, 600, 1200, 1800, 2400, 1100, 1100, 1100]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .cycle()
            .take(16 << 20)
            .collect();
        hostile.extend_from_slice(&patched(s[4] + 4, &[0; 4])[s[6]..]);
        quick_err(&hostile, VADDR);

        // Every truncation, from either end, is handled.
        for cut in (0..img.len()).step_by(img.len() / 97) {
            let _ = find_kallsyms(&img[..cut], VADDR);
            let tail = find_kallsyms(&img[cut..], VADDR + cut as u64);
            assert_eq!(tail.is_ok(), cut <= s[0], "cut {cut}");
        }
    }

    /// What scripts/kallsyms.c (6.1) keeps of a System.map line: it drops
    /// `U`/`u`/`N`/`n` and absolute (`A`/`a`) symbols, its own `kallsyms_*`
    /// arrays, and other-arch stub/thunk patterns; with
    /// KALLSYMS_ABSOLUTE_PERCPU, symbols in [__per_cpu_start, __per_cpu_end]
    /// become `A`. KALLSYMS_ALL=y, so no text-range filter.
    fn kallsyms_view(map: &str, absolute_percpu: bool) -> Vec<(u64, char, String)> {
        let lines: Vec<(u64, char, &str)> = map
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (a, k, n) = (it.next()?, it.next()?, it.next()?);
                Some((u64::from_str_radix(a, 16).ok()?, k.chars().next()?, n))
            })
            .collect();
        let at = |name: &str| lines.iter().find(|l| l.2 == name).map(|l| l.0);
        let pcpu = at("__per_cpu_start").unwrap()..=at("__per_cpu_end").unwrap();
        let ignored = |n: &str, k: char| {
            "UuNnAa".contains(k)
                || n.len() >= 512
                || KALLSYMS_ARRAYS.contains(&n)
                || ["_SDA_BASE_", "_SDA2_BASE_"].contains(&n)
                || [
                    "__efistub_",
                    "__kvm_nvhe_$",
                    "__kvm_nvhe_.L",
                    "__AArch64ADRPThunk_",
                    "__ARMV5PILongThunk_",
                    "__ARMV7PILongThunk_",
                    "__ThumbV7PILongThunk_",
                    "__LA25Thunk_",
                    "__microLA25Thunk_",
                    "__kcfi_typeid_",
                ]
                .iter()
                .any(|p| n.starts_with(p))
                || ["_from_arm", "_from_thumb", "_veneer"]
                    .iter()
                    .any(|s| n.ends_with(s))
                || n.contains(".long_branch.")
                || n.contains(".plt_branch.")
        };
        let mut v: Vec<_> = lines
            .iter()
            .filter(|&&(_, k, n)| !ignored(n, k))
            .map(|&(a, k, n)| {
                (
                    a,
                    if absolute_percpu && pcpu.contains(&a) {
                        'A'
                    } else {
                        k
                    },
                    n.to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    const KALLSYMS_ARRAYS: [&str; 9] = [
        "kallsyms_addresses",
        "kallsyms_offsets",
        "kallsyms_relative_base",
        "kallsyms_num_syms",
        "kallsyms_names",
        "kallsyms_markers",
        "kallsyms_token_table",
        "kallsyms_token_index",
        "kallsyms_seqs_of_names",
    ];

    fn sorted(t: &KallsymsTable) -> Vec<(u64, char, String)> {
        let mut v: Vec<_> = t
            .symbols
            .iter()
            .map(|s| (s.addr, s.kind, s.name.clone()))
            .collect();
        v.sort();
        v
    }

    fn minimal_kernel() -> Option<PathBuf> {
        let dir = PathBuf::from(std::env::var_os("HOME")?).join(".cache/hvtrace/kernels");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("minimal-6.1-"))
            })
            .filter(|p| p.join("vmlinux").is_file() && p.join("System.map").is_file())
            .collect();
        found.sort();
        found.pop()
    }

    #[test]
    fn real_minimal_6_1_kernel_matches_system_map() {
        let Some(dir) = minimal_kernel() else {
            eprintln!("\n!!!!!!!! SKIPPED real-kernel kallsyms test: no ~/.cache/hvtrace/kernels/minimal-6.1-*/vmlinux + System.map !!!!!!!!\n");
            return;
        };
        let elf = std::fs::read(dir.join("vmlinux")).unwrap();
        let map = std::fs::read_to_string(dir.join("System.map")).unwrap();
        let t0 = Instant::now();
        let t = find_kallsyms_in_elf(&elf).unwrap();
        eprintln!(
            "{}: {} kallsyms in {:?}, relative_base {:#x}, {:?}, absolute_percpu {}",
            dir.display(),
            t.num_syms,
            t0.elapsed(),
            t.relative_base,
            t.layout,
            t.absolute_percpu
        );
        assert_eq!(t.symbols.len(), t.num_syms);
        assert!(t.symbols.windows(2).all(|w| w[0].addr <= w[1].addr));
        let (got, want) = (sorted(&t), kallsyms_view(&map, t.absolute_percpu));
        let missing: Vec<_> = want
            .iter()
            .filter(|w| got.binary_search(w).is_err())
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|g| want.binary_search(g).is_err())
            .collect();
        eprintln!(
            "System.map lines {}, expected in kallsyms {}, found {}",
            map.lines().count(),
            want.len(),
            got.len()
        );
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {:?}\nextra {:?}",
            &missing[..missing.len().min(20)],
            &extra[..extra.len().min(20)]
        );
        for k in "TtDdBbRr".chars() {
            let n = want.iter().filter(|w| w.1 == k).count();
            eprintln!("  {k}: {n} in System.map view, all present");
        }
    }

    fn compare_with_finder(vmlinux: &str, listing: &str) {
        let (Ok(elf), Ok(text)) = (std::fs::read(vmlinux), std::fs::read_to_string(listing)) else {
            eprintln!("!!!!!!!! SKIPPED: {vmlinux} or {listing} missing");
            return;
        };
        let t = find_kallsyms_in_elf(&elf).unwrap();
        let mut theirs: Vec<(u64, char, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((
                    u64::from_str_radix(it.next()?, 16).ok()?,
                    it.next()?.chars().next()?,
                    it.next()?.to_string(),
                ))
            })
            .collect();
        theirs.sort();
        let ours = sorted(&t);
        let diff = ours
            .iter()
            .filter(|o| theirs.binary_search(o).is_err())
            .count();
        eprintln!(
            "{vmlinux}: ours {} ({:?}, base {:#x}), kallsyms-finder {}, ours not in theirs {diff}",
            ours.len(),
            t.layout,
            t.relative_base,
            theirs.len()
        );
        assert_eq!(ours.len(), theirs.len());
        assert_eq!(diff, 0);
    }

    #[test]
    #[ignore = "needs /tmp/deb61.vmlinux and /tmp/deb61.kallsyms (temporary files)"]
    fn debian_6_1_matches_kallsyms_finder() {
        compare_with_finder("/tmp/deb61.vmlinux", "/tmp/deb61.kallsyms");
    }

    #[test]
    #[ignore = "needs /tmp/gi-deb612.vmlinux (zstd payload of the Debian 6.12 vmlinuz)"]
    fn debian_6_12_names_first_layout() {
        let Ok(elf) = std::fs::read("/tmp/gi-deb612.vmlinux") else {
            eprintln!("!!!!!!!! SKIPPED: /tmp/gi-deb612.vmlinux missing");
            return;
        };
        let t = find_kallsyms_in_elf(&elf).unwrap();
        eprintln!(
            "6.12: {} symbols, base {:#x}, {:?}, percpu {}",
            t.num_syms, t.relative_base, t.layout, t.absolute_percpu
        );
        assert_eq!(t.layout, KallsymsLayout::NamesFirst);
        assert!(t.num_syms > 50_000);
        let find = |n: &str| {
            t.symbols
                .iter()
                .find(|s| s.name == n)
                .map(|s| (s.addr, s.kind))
        };
        assert_eq!(find("_text"), Some((0xffff_ffff_8100_0000, 'T')));
        assert_eq!(find("start_kernel").map(|s| s.1), Some('T'));
        assert_eq!(find("init_task").map(|s| s.1), Some('D'));
    }
}
