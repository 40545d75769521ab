//! Kernel struct layouts from BTF (BPF Type Format), for untrusted input.
//!
//! This is a small hand-written, zero-copy BTF reader rather than the
//! `btf-rs` crate (2.0.0, evaluated): btf-rs parses correctly and did not
//! panic on malformed input, but its byte-slice backend copies every string
//! and type into hash maps and owned enums up front, so a 24-byte header
//! claiming `str_len = u32::MAX` preallocates 33 MiB before failing and a
//! well-formed 8 MiB section of one-letter strings costs 400 MiB and 3 s,
//! which no header check can prevent (it is also LGPL-2.1, in an Apache-2.0
//! workspace). Here the blob is kept as bytes plus one `u32` offset per type
//! and a sorted struct-name index, every walk is bounded in depth and steps,
//! and malformed input yields [`BtfError::Malformed`], never a panic.
//!
//! The reader is split by job: `parse.rs` checks the blob (header, type
//! records, every reference) and indexes it, `names.rs` spells C type
//! names, and `members.rs` holds the one member walk behind
//! [`KernelTypes::member`], [`KernelTypes::member_any`],
//! [`KernelTypes::has_member`] and [`KernelTypes::members`]. This file holds
//! the public types and entry points and the limits every walk obeys.

use std::fmt;

#[cfg(test)]
mod fixtures;
mod members;
mod names;
mod parse;

use parse::{KIND_ENUM, KIND_ENUM64};

/// Longest typedef/qualifier/array chain and deepest anonymous-member
/// nesting followed before the BTF is declared malformed (a cycle).
const MAX_DEPTH: u32 = 32;
/// Members visited (or types spelled) by one query before giving up: stops
/// exponential walks through BTF that reuses anonymous types many times.
const MAX_STEPS: u32 = 1 << 18;

/// Why BTF could not be read or a type question could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    /// The image is not a 64-bit little-endian ELF file, or its section
    /// headers are damaged.
    #[error("not a usable 64-bit little-endian ELF image: {0}")]
    Elf(String),
    /// The ELF image has no `.BTF` section (kernel built without
    /// `CONFIG_DEBUG_INFO_BTF`).
    #[error("no .BTF section in the ELF image")]
    NoBtfSection,
    /// The BTF data breaks the format (bad header, out-of-range offsets or
    /// ids, cycles, absurd nesting).
    #[error("BTF blob is malformed: {0}")]
    Malformed(String),
    /// No struct or union of that name is defined.
    #[error("no struct or union named `{0}` in the BTF")]
    NoSuchStruct(String),
    /// No enum defines an enumerator of that name.
    #[error("no enumerator `{0}` in the BTF")]
    NoSuchEnumerator(String),
    /// The struct has no member at this path.
    #[error("{kind} {strukt} has no member `{path}`")]
    NoSuchMember {
        /// "struct" or "union".
        kind: &'static str,
        /// The outer struct's name.
        strukt: String,
        /// The member path as asked.
        path: String,
    },
    /// A member path tried to go through a pointer.
    #[error(
        "member `{member}` of {kind} {strukt} is a pointer ({type_name}); \
         pointers are not followed"
    )]
    PointerMember {
        /// "struct" or "union".
        kind: &'static str,
        /// The outer struct's name.
        strukt: String,
        /// The path prefix that ends at the pointer.
        member: String,
        /// The pointer's type spelling.
        type_name: String,
    },
    /// A member path tried to look inside a member that is not a struct or
    /// union.
    #[error("member `{member}` of {kind} {strukt} is not a struct or union ({type_name})")]
    NotComposite {
        /// "struct" or "union".
        kind: &'static str,
        /// The outer struct's name.
        strukt: String,
        /// The path prefix that ends at the non-composite member.
        member: String,
        /// The member's type spelling.
        type_name: String,
    },
    /// None of the candidate member paths exists.
    #[error("{kind} {strukt} has none of the members {}", quoted_list(.candidates))]
    NoCandidate {
        /// "struct" or "union".
        kind: &'static str,
        /// The outer struct's name.
        strukt: String,
        /// Every candidate path tried, in order.
        candidates: Vec<String>,
    },
    /// The member path is empty or has an empty component.
    #[error("invalid member path `{0}`")]
    BadPath(String),
}

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|c| format!("`{c}`")).collect();
    quoted.join(", ")
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// One member of a kernel struct, with its place in the outer struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's name (the last component of the path asked for).
    pub name: String,
    /// Byte offset from the start of the outer struct; for a bitfield, the
    /// byte holding its first bit (`bit_offset / 8`).
    pub offset: u64,
    /// Bit offset from the start of the outer struct.
    pub bit_offset: u64,
    /// Width of a bitfield in bits, 0 for an ordinary member.
    pub bit_size: u32,
    /// Size in bytes of the member's type, after typedefs and qualifiers
    /// (arrays: element size times count; pointers: 8).
    pub size: u64,
    /// C-like spelling of the member's declared type, e.g. `pid_t`,
    /// `struct task_struct *`, `char[16]`.
    pub type_name: String,
}

/// The parsed BTF of one kernel: answers struct sizes and member offsets.
pub struct KernelTypes {
    /// Type section bytes.
    types: Vec<u8>,
    /// String section bytes; starts and ends with NUL.
    strs: Vec<u8>,
    /// Offset in `types` of type id `i + 1` (id 0 is `void`).
    offsets: Vec<u32>,
    /// `(name offset, type id)` of every named struct and union, sorted by
    /// name, then id.
    composites: Vec<(u32, u32)>,
}

impl fmt::Debug for KernelTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelTypes")
            .field("types", &self.offsets.len())
            .field("structs_and_unions", &self.composites.len())
            .field("bytes", &(self.types.len() + self.strs.len()))
            .finish()
    }
}

/// Counts down the work one query may do.
struct Steps(u32);

impl Steps {
    fn new() -> Self {
        Steps(MAX_STEPS)
    }

    fn take(&mut self) -> Result<(), BtfError> {
        self.0 = self.0.checked_sub(1).ok_or_else(|| {
            malformed("walk exceeds its step budget (anonymous or function types reused too often)")
        })?;
        Ok(())
    }
}

impl KernelTypes {
    /// Parses a raw BTF blob (as found between `__start_BTF` and
    /// `__stop_BTF` in kernel memory, or in `/sys/kernel/btf/vmlinux`).
    ///
    /// Only little-endian BTF of version 1 is accepted. The blob is copied;
    /// memory use is about the blob's size plus 4 bytes per type.
    pub fn from_btf_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        Self::parse(bytes)
    }

    /// Parses the `.BTF` section of a vmlinux ELF image (64-bit
    /// little-endian; section headers read by [`crate::elf`], bounds checked).
    pub fn from_elf(elf: &[u8]) -> Result<Self, BtfError> {
        let bad = |m: &str| BtfError::Elf(m.to_string());
        if !crate::elf::is_elf64(elf) {
            return Err(bad("not a 64-bit little-endian ELF"));
        }
        let sections = crate::elf::sections(elf)
            .ok_or_else(|| bad("section headers are malformed or lie outside the file"))?;
        let btf = sections
            .iter()
            .find(|s| s.name == ".BTF")
            .ok_or(BtfError::NoBtfSection)?;
        if btf.kind == crate::elf::SHT_NOBITS {
            return Err(bad("the .BTF section has no contents (SHT_NOBITS)"));
        }
        if btf.flags & crate::elf::SHF_COMPRESSED != 0 {
            return Err(bad(
                "the .BTF section is compressed, which is not supported",
            ));
        }
        let data = elf
            .get(btf.offset..btf.offset.saturating_add(btf.size))
            .ok_or_else(|| bad("the .BTF section runs past the end of the file"))?;
        Self::from_btf_bytes(data)
    }

    /// Number of types in the BTF (type ids `1..=type_count()`; id 0 is the
    /// implicit `void`).
    pub fn type_count(&self) -> usize {
        self.offsets.len()
    }

    /// Size in bytes of `struct name` (or `union name`). A leading
    /// `struct ` or `union ` in `name` is ignored.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let outer = self.find_composite(name)?;
        Ok(u64::from(self.ty(outer.id)?.size_type))
    }

    /// The member at a dot-separated `path` inside `struct struct_name`, e.g.
    /// `"pid"` or `"thread_info.flags"`.
    ///
    /// Members of anonymous structs and unions are found as C finds them,
    /// and offsets add up through nested struct members; pointers are not
    /// followed (`"real_parent.pid"` fails, naming the pointer member).
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Member, BtfError> {
        let outer = self.find_composite(struct_name)?;
        self.member_in(&outer, path)
    }

    /// The first of `candidates` (member paths as for [`Self::member`]) that
    /// exists, for members renamed between kernel versions such as
    /// `["__state", "state"]`. The error lists every candidate.
    pub fn member_any(&self, struct_name: &str, candidates: &[&str]) -> Result<Member, BtfError> {
        let outer = self.find_composite(struct_name)?;
        self.first_member(&outer, candidates)
    }

    /// Whether [`Self::member`] would find `path` in `struct struct_name`.
    pub fn has_member(&self, struct_name: &str, path: &str) -> bool {
        self.member(struct_name, path).is_ok()
    }

    /// The top-level members of `struct struct_name` in declaration order,
    /// with the members of anonymous structs and unions listed in their
    /// place (as pahole shows them), for a `hvtrace types` listing.
    pub fn members(&self, struct_name: &str) -> Result<Vec<Member>, BtfError> {
        let outer = self.find_composite(struct_name)?;
        self.flatten(outer.id)
    }

    /// The value of the enumerator `name` (e.g.
    /// `SYSCALL_WORK_BIT_SYSCALL_TRACEPOINT`), from whichever enum defines
    /// it: kernel flag bits are enums whose order changes between versions.
    /// A linear scan; meant for set-up, not for hot paths.
    pub fn enumerator(&self, name: &str) -> Result<i64, BtfError> {
        for id in 1..=self.offsets.len() as u32 {
            let t = self.ty(id)?;
            let (stride, wide) = match t.kind {
                KIND_ENUM => (8, false),
                KIND_ENUM64 => (12, true),
                _ => continue,
            };
            for i in 0..t.vlen as usize {
                let at = stride * i;
                if self.name_bytes(self.extra_u32(&t, at)?) != name.as_bytes() {
                    continue;
                }
                let lo = self.extra_u32(&t, at + 4)?;
                return Ok(if wide {
                    let hi = self.extra_u32(&t, at + 8)?;
                    ((u64::from(hi) << 32) | u64::from(lo)) as i64
                } else if t.kflag {
                    i64::from(lo as i32)
                } else {
                    i64::from(lo)
                });
            }
        }
        Err(BtfError::NoSuchEnumerator(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{sample, set_u32, Builder};
    use super::*;

    #[test]
    fn enumerators_by_name_in_enum_and_enum64() {
        let mut b = Builder::new();
        let (a, bb, neg) = (b.s("WORK_A"), b.s("WORK_B"), b.s("NEG"));
        b.raw("work_bit", KIND_ENUM, 2, false, 4, &[a, 0, bb, 1]);
        b.raw("", KIND_ENUM, 1, true, 4, &[neg, (-5i32) as u32]);
        let big = b.s("BIG");
        b.raw("wide", KIND_ENUM64, 1, false, 8, &[big, 7, 1]);
        let kt = KernelTypes::from_btf_bytes(&b.finish()).unwrap();
        assert_eq!(kt.enumerator("WORK_B").unwrap(), 1);
        assert_eq!(kt.enumerator("NEG").unwrap(), -5);
        assert_eq!(kt.enumerator("BIG").unwrap(), (1 << 32) | 7);
        assert!(matches!(
            kt.enumerator("WORK_C"),
            Err(BtfError::NoSuchEnumerator(_))
        ));
    }

    fn elf_with(sections: &[(&str, u32, &[u8])]) -> Vec<u8> {
        // Layout: ELF header, section data, shstrtab, section headers.
        let mut names = vec![0u8];
        let mut data = Vec::new();
        let mut hdrs = vec![[0u8; 64]];
        let shdr = |name_off: u32, kind: u32, off: u64, size: u64| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name_off.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h
        };
        for (name, kind, bytes) in sections {
            let name_off = names.len() as u32;
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            hdrs.push(shdr(
                name_off,
                *kind,
                64 + data.len() as u64,
                bytes.len() as u64,
            ));
            data.extend_from_slice(bytes);
        }
        let strtab_name = names.len() as u32;
        names.extend_from_slice(b".shstrtab\0");
        hdrs.push(shdr(
            strtab_name,
            3,
            64 + data.len() as u64,
            names.len() as u64,
        ));
        data.extend_from_slice(&names);
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let shoff = 64 + data.len() as u64;
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&(hdrs.len() as u16).to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&(hdrs.len() as u16 - 1).to_le_bytes());
        elf.extend_from_slice(&data);
        for h in hdrs {
            elf.extend_from_slice(&h);
        }
        elf
    }

    #[test]
    fn btf_section_of_an_elf_image() {
        let btf = sample();
        let elf = elf_with(&[(".text", 1, b"\x90\x90"), (".BTF", 1, &btf)]);
        let kt = KernelTypes::from_elf(&elf).unwrap();
        assert_eq!(kt.member("outer", "comm").unwrap().offset, 40);

        let none = elf_with(&[(".text", 1, b"\x90")]);
        let e = KernelTypes::from_elf(&none).unwrap_err();
        assert_eq!(e.to_string(), "no .BTF section in the ELF image");

        let nobits = elf_with(&[(".BTF", 8, b"")]);
        assert!(matches!(
            KernelTypes::from_elf(&nobits),
            Err(BtfError::Elf(_))
        ));
        // Every truncation of the image fails cleanly.
        for len in 0..elf.len() {
            assert!(KernelTypes::from_elf(&elf[..len]).is_err(), "len {len}");
        }
        // So does a 32-bit or big-endian header.
        for (i, v) in [(4, 1u8), (5, 2u8)] {
            let mut bad = elf.clone();
            bad[i] = v;
            assert!(matches!(KernelTypes::from_elf(&bad), Err(BtfError::Elf(_))));
        }
    }

    /// xorshift64, for reproducible noise.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Asks every question about every struct of a parsed blob; none may panic.
    fn exercise(kt: &KernelTypes) {
        for &(off, _) in kt.composites.iter().take(50) {
            let name = String::from_utf8_lossy(kt.name_bytes(off)).into_owned();
            let _ = kt.struct_size(&name);
            if let Ok(members) = kt.members(&name) {
                for m in members.iter().take(50) {
                    let _ = kt.member(&name, &m.name);
                    let _ = kt.member(&name, &format!("{}.x", m.name));
                }
            }
            let _ = kt.member_any(&name, &["a", "b.c"]);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Pure noise, with and without a plausible header.
        for i in 0..4000 {
            let len = (rng.next() % 400) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i % 2 == 0 && len >= 24 {
                let body = len as u32 - 24;
                let split = (rng.next() as u32 % (body + 1)) & !3;
                v[..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
                set_u32(&mut v, 4, 24);
                set_u32(&mut v, 8, 0);
                set_u32(&mut v, 12, split);
                set_u32(&mut v, 16, split);
                set_u32(&mut v, 20, body - split);
                if body > split {
                    v[24 + split as usize] = 0;
                    v[len - 1] = 0;
                }
            }
            if let Ok(kt) = KernelTypes::from_btf_bytes(&v) {
                exercise(&kt);
            }
            let _ = KernelTypes::from_elf(&v);
        }
        // A valid blob with random bytes flipped in its type section: these
        // often still parse, and then every query must stay well-behaved.
        let good = sample();
        let tl = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        let mut parsed = 0;
        for _ in 0..4000 {
            let mut v = good.clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = 24 + (rng.next() as usize % tl);
                v[at] = rng.next() as u8;
            }
            if let Ok(kt) = KernelTypes::from_btf_bytes(&v) {
                parsed += 1;
                exercise(&kt);
                let _ = kt.members("outer");
                for p in [
                    "flags", "x", "z", "bf2", "in.b", "pid", "next", "comm", "fn",
                ] {
                    let _ = kt.member("outer", p);
                }
            }
        }
        assert!(parsed > 100, "only {parsed} mutated blobs parsed");
    }
}
