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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    /// No `"0\0".."9\0"` run followed by a consistent `kallsyms_token_index`.
    #[error("no kallsyms_token_table found (no \"0\\0\"..\"9\\0\" run with a consistent token index after it)")]
    NoTokenTable,
    /// Search work budget exhausted (hostile input or not a kernel).
    #[error("kallsyms search gave up: work budget exhausted (hostile input or not a kernel image)")]
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
    Some(u16::from_le_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
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
            let next = if i == 255 { Some(end) } else { idx(i + 1).map(|o| table + o) };
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
fn walk_names(img: &[u8], start: usize, n: usize, markers: usize, budget: &mut u64) -> Option<usize> {
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
fn try_markers(img: &[u8], vaddr: u64, markers: usize, m: usize, budget: &mut u64) -> Option<Names> {
    let last = u32_at(img, markers + 4 * (m - 1))? as usize;
    let hi = markers.checked_sub(last.checked_add(2)?)?; // latest possible names start
    let lo = markers.saturating_sub(last + 16 + 256 * (MAX_ENTRY + 2));
    let mut q = align_down(vaddr, hi.checked_sub(4)?, 4)?;
    while q >= lo && spend(budget, 1) {
        let v = u32_at(img, q)? as usize;
        if v > 256 * (m - 1) && v <= 256 * m {
            for start in [q + 8, q + 4] {
                let end = walk_names(img, start, v, markers, budget);
                if start <= hi && end.is_some_and(|e| e <= markers && markers - e < 8) {
                    return Some(Names { num_syms_at: q, start, n: v });
                }
            }
        }
        q = q.checked_sub(4)?;
    }
    None
}

fn marker_step_ok(a: u32, b: u32) -> bool {
    b.checked_sub(a).is_some_and(|d| (512..=256 * (MAX_ENTRY as u32 + 2)).contains(&d))
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
            while p + 4 * (r + 1) <= table && marker_step_ok(w(r - 1)?, w(r)?) {
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
fn check_offsets(img: &[u8], at: usize, base_at: usize, n: usize, budget: &mut u64) -> Option<(Vec<u64>, u64, bool)> {
    let end = at.checked_add(n.checked_mul(4)?)?;
    let base = u64_at(img, base_at)?;
    if end > base_at || base == 0 || !spend(budget, n as u64) {
        return None;
    }
    let raw = img.get(at..end)?.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
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
fn decode_name(img: &[u8], p: usize, t: &Tokens, buf: &mut Vec<u8>) -> Option<(char, String, usize)> {
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
    Some((char::from(kind), String::from_utf8_lossy(name).into_owned(), p + hdr + len))
}

fn decode_at(img: &[u8], vaddr: u64, t: &Tokens, budget: &mut u64) -> Result<KallsymsTable, KallsymsError> {
    let token_table_vaddr = vaddr.wrapping_add(t.table as u64);
    let names = find_names(img, vaddr, t.table, budget).ok_or(KallsymsError::NoNames { token_table: token_table_vaddr })?;
    let n = names.n;
    let mut cands = Vec::new();
    // <= 6.3: offsets, relative_base, num_syms (each `.balign 8`).
    if let Some(base_at) = names.num_syms_at.checked_sub(8) {
        if let Some(at) = base_at.checked_sub(4 * n).and_then(|x| align_down(vaddr, x, 8)) {
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
        .find_map(|(at, base_at, l)| check_offsets(img, at, base_at, n, budget).map(|(a, b, p)| (a, b, p, l)))
        .ok_or(KallsymsError::NoOffsets { num_syms: n })?;
    let mut symbols = Vec::with_capacity(n);
    let (mut p, mut buf) = (names.start, Vec::new());
    for (index, addr) in addrs.into_iter().enumerate() {
        let (kind, name, next) = decode_name(img, p, t, &mut buf).ok_or(KallsymsError::BadName { index })?;
        symbols.push(Symbol { addr, kind, name });
        p = next;
    }
    Ok(KallsymsTable { symbols, relative_base, num_syms: n, absolute_percpu, layout, token_table_vaddr })
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
        let Some(tokens) = parse_tokens(image, image_vaddr, pos0) else { continue };
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
        let (Some(off), Some(vaddr), Some(size)) = (field(8), u64_at(elf, ph + 16), field(32)) else { continue };
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
