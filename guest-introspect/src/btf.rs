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

use std::cmp::Ordering;
use std::fmt;

use crate::le::{u16_at as read_u16, u32_at as read_u32};

/// Longest typedef/qualifier/array chain and deepest anonymous-member
/// nesting followed before the BTF is declared malformed (a cycle).
const MAX_DEPTH: u32 = 32;
/// Members visited (or types spelled) by one query before giving up: stops
/// exponential walks through BTF that reuses anonymous types many times.
const MAX_STEPS: u32 = 1 << 18;
/// Length of a type spelling after which it is cut short with `...`.
const MAX_SPELLING: usize = 512;

const HEADER_LEN: usize = 24;
const BTF_MAGIC: u16 = 0xEB9F;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

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

/// The 12-byte common header of one BTF type, plus where its kind-specific
/// data starts.
#[derive(Debug, Clone, Copy)]
struct Ty {
    id: u32,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kflag: bool,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    /// Offset in the type section of the kind-specific data.
    extra: usize,
}

/// A member record of a struct or union.
#[derive(Debug, Clone, Copy)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bit_size: u32,
}

/// Where a member search ended.
#[derive(Debug, Clone, Copy)]
struct Found {
    type_id: u32,
    bit_offset: u64,
    bit_size: u32,
}

/// The outer struct a query is about, for error messages.
struct Outer<'a> {
    id: u32,
    kind: &'static str,
    name: &'a str,
}

/// Size of a kind's data after the common 12-byte header.
fn extra_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        _ => return None,
    })
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
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
        if bytes.len() < HEADER_LEN {
            return Err(malformed(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let hdr = |off| read_u32(bytes, off).unwrap_or(0);
        let magic = read_u16(bytes, 0).unwrap_or(0);
        if magic == BTF_MAGIC.swap_bytes() {
            return Err(malformed("big-endian BTF is not supported"));
        }
        if magic != BTF_MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#06x} (expected {BTF_MAGIC:#06x})"
            )));
        }
        let (version, flags) = (bytes[2], bytes[3]);
        if version != 1 {
            return Err(malformed(format!("unsupported version {version}")));
        }
        if flags != 0 {
            return Err(malformed(format!("unsupported header flags {flags:#x}")));
        }
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (hdr(4), hdr(8), hdr(12), hdr(16), hdr(20));
        let total = bytes.len() as u64;
        if (hdr_len as usize) < HEADER_LEN || u64::from(hdr_len) > total {
            return Err(malformed(format!(
                "header length {hdr_len} is outside {HEADER_LEN}..={total}"
            )));
        }
        let section = |what: &str, off: u32, len: u32| {
            let start = u64::from(hdr_len) + u64::from(off);
            let end = start + u64::from(len);
            if end > total {
                return Err(malformed(format!(
                    "{what} section {start}..{end} runs past the end of the {total}-byte blob"
                )));
            }
            Ok((start as usize, end as usize))
        };
        let (t0, t1) = section("type", type_off, type_len)?;
        let (s0, s1) = section("string", str_off, str_len)?;
        if t0 < t1 && t0 < s1 && s0 < t1 {
            return Err(malformed("type and string sections overlap"));
        }
        if type_off % 4 != 0 {
            return Err(malformed(format!(
                "type section offset {type_off} is not 4-byte aligned"
            )));
        }
        let strs = &bytes[s0..s1];
        if strs.first() != Some(&0) || strs.last() != Some(&0) {
            return Err(malformed(
                "string section does not start and end with a NUL byte",
            ));
        }
        let mut kt = KernelTypes {
            types: bytes[t0..t1].to_vec(),
            strs: strs.to_vec(),
            offsets: Vec::new(),
            composites: Vec::new(),
        };
        kt.index_types()?;
        kt.check_references()?;
        kt.index_composites();
        Ok(kt)
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
        for path in candidates {
            match self.member_in(&outer, path) {
                Ok(m) => return Ok(m),
                Err(e @ BtfError::Malformed(_)) => return Err(e),
                Err(_) => continue,
            }
        }
        Err(BtfError::NoCandidate {
            kind: outer.kind,
            strukt: outer.name.to_string(),
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
        })
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
        let mut out = Vec::new();
        let mut steps = Steps::new();
        self.flatten(outer.id, 0, 0, &mut steps, &mut out)?;
        Ok(out)
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

    // ---- parsing ----------------------------------------------------------

    /// Walks the type section once, recording where each type starts.
    fn index_types(&mut self) -> Result<(), BtfError> {
        let mut off = 0usize;
        let mut offsets = Vec::new();
        while off < self.types.len() {
            let id = offsets.len() + 1;
            let info = read_u32(&self.types, off + 4)
                .ok_or_else(|| malformed(format!("type id {id} at offset {off} is cut short")))?;
            let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
            let extra = extra_len(kind, vlen)
                .ok_or_else(|| malformed(format!("type id {id} has unknown kind {kind}")))?;
            let end = off + 12 + extra;
            if end > self.types.len() {
                return Err(malformed(format!(
                    "type id {id} ({}, {vlen} entries) runs past the end of the type section",
                    kind_name(kind)
                )));
            }
            // The type section is at most 4 GiB, so `off` fits in a u32.
            offsets.push(off as u32);
            off = end;
        }
        self.offsets = offsets;
        Ok(())
    }

    /// Checks every name offset and type id the types refer to, so later
    /// walks only have cycles and depth to worry about.
    fn check_references(&self) -> Result<(), BtfError> {
        let max_id = self.offsets.len() as u64;
        for id in 1..=self.offsets.len() as u32 {
            let t = self.ty(id)?;
            let bad_name = |off: u32| -> Result<(), BtfError> {
                if off as usize >= self.strs.len() {
                    return Err(malformed(format!(
                        "type id {id} refers to string offset {off}, past the {}-byte string section",
                        self.strs.len()
                    )));
                }
                Ok(())
            };
            let bad_ref = |to: u32| -> Result<(), BtfError> {
                if u64::from(to) > max_id {
                    return Err(malformed(format!(
                        "type id {id} ({}) refers to type id {to}, but there are only {max_id} types",
                        kind_name(t.kind)
                    )));
                }
                Ok(())
            };
            bad_name(t.name_off)?;
            let at = |i: usize| read_u32(&self.types, t.extra + i).unwrap_or(0);
            match t.kind {
                KIND_PTR | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FUNC_PROTO | KIND_VAR | KIND_DECL_TAG | KIND_TYPE_TAG => {
                    bad_ref(t.size_type)?
                }
                _ => {}
            }
            let vlen = t.vlen as usize;
            match t.kind {
                KIND_ARRAY => {
                    bad_ref(at(0))?;
                    bad_ref(at(4))?;
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        bad_name(at(12 * i))?;
                        bad_ref(at(12 * i + 4))?;
                    }
                }
                KIND_ENUM => (0..vlen).try_for_each(|i| bad_name(at(8 * i)))?,
                KIND_ENUM64 => (0..vlen).try_for_each(|i| bad_name(at(12 * i)))?,
                KIND_FUNC_PROTO => {
                    for i in 0..vlen {
                        bad_name(at(8 * i))?;
                        bad_ref(at(8 * i + 4))?;
                    }
                }
                KIND_DATASEC => (0..vlen).try_for_each(|i| bad_ref(at(12 * i)))?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Builds the sorted name index of named structs and unions.
    fn index_composites(&mut self) {
        let mut v = Vec::new();
        for (i, &off) in self.offsets.iter().enumerate() {
            let off = off as usize;
            let name_off = read_u32(&self.types, off).unwrap_or(0);
            let kind = (read_u32(&self.types, off + 4).unwrap_or(0) >> 24) & 0x1f;
            if matches!(kind, KIND_STRUCT | KIND_UNION) && name_off != 0 {
                v.push((name_off, i as u32 + 1));
            }
        }
        v.sort_by(|a, b| {
            self.name_bytes(a.0)
                .cmp(self.name_bytes(b.0))
                .then(a.1.cmp(&b.1))
        });
        self.composites = v;
    }

    // ---- low-level access -------------------------------------------------

    /// The NUL-terminated bytes at a string offset (empty if out of range).
    fn name_bytes(&self, off: u32) -> &[u8] {
        let rest = self.strs.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn name(&self, off: u32) -> Result<&str, BtfError> {
        std::str::from_utf8(self.name_bytes(off))
            .map_err(|_| malformed(format!("name at string offset {off} is not UTF-8")))
    }

    fn ty(&self, id: u32) -> Result<Ty, BtfError> {
        if id == 0 {
            return Ok(Ty {
                id,
                name_off: 0,
                kind: 0,
                vlen: 0,
                kflag: false,
                size_type: 0,
                extra: 0,
            });
        }
        let off = *self
            .offsets
            .get(id as usize - 1)
            .ok_or_else(|| malformed(format!("type id {id} does not exist")))?
            as usize;
        let cut = || malformed(format!("type id {id} is cut short"));
        let info = read_u32(&self.types, off + 4).ok_or_else(cut)?;
        Ok(Ty {
            id,
            name_off: read_u32(&self.types, off).ok_or_else(cut)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kflag: info >> 31 == 1,
            size_type: read_u32(&self.types, off + 8).ok_or_else(cut)?,
            extra: off + 12,
        })
    }

    fn extra_u32(&self, t: &Ty, at: usize) -> Result<u32, BtfError> {
        read_u32(&self.types, t.extra + at)
            .ok_or_else(|| malformed(format!("type id {} is cut short", t.id)))
    }

    fn raw_member(&self, t: &Ty, i: u32) -> Result<RawMember, BtfError> {
        let at = 12 * i as usize;
        let offset = self.extra_u32(t, at + 8)?;
        let (bit_offset, bit_size) = if t.kflag {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(RawMember {
            name_off: self.extra_u32(t, at)?,
            type_id: self.extra_u32(t, at + 4)?,
            bit_offset,
            bit_size,
        })
    }

    /// Follows typedefs, qualifiers and type tags to the underlying type.
    fn strip(&self, id: u32) -> Result<Ty, BtfError> {
        let mut t = self.ty(id)?;
        for _ in 0..=MAX_DEPTH {
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    t = self.ty(t.size_type)?
                }
                _ => return Ok(t),
            }
        }
        Err(malformed(format!(
            "typedef/qualifier chain from type id {id} is longer than {MAX_DEPTH} (a cycle?)"
        )))
    }

    /// Size in bytes of a type, as `sizeof` would give it.
    fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        let mut count: u64 = 1;
        let mut cur = id;
        for _ in 0..=MAX_DEPTH {
            let t = self.strip(cur)?;
            let size = match t.kind {
                KIND_ARRAY => {
                    let nelems = self.extra_u32(&t, 8)?;
                    count = count.checked_mul(u64::from(nelems)).ok_or_else(|| {
                        malformed(format!("array type id {} is absurdly large", t.id))
                    })?;
                    cur = self.extra_u32(&t, 0)?;
                    continue;
                }
                KIND_PTR => 8,
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                    u64::from(t.size_type)
                }
                // Incomplete and function types have no size of their own.
                0 | KIND_FWD | KIND_FUNC_PROTO => 0,
                k => {
                    return Err(malformed(format!(
                        "type id {} ({}) cannot be the type of a member",
                        t.id,
                        kind_name(k)
                    )))
                }
            };
            return count
                .checked_mul(size)
                .ok_or_else(|| malformed(format!("type id {id} is absurdly large")));
        }
        Err(malformed(format!(
            "array chain from type id {id} is longer than {MAX_DEPTH} (a cycle?)"
        )))
    }

    /// C-like spelling of a type, cut short if absurdly long.
    fn type_name(&self, id: u32) -> Result<String, BtfError> {
        let mut steps = Steps(MAX_SPELLING as u32);
        let mut s = self.spell(id, 0, &mut steps)?;
        if s.len() > MAX_SPELLING {
            let mut cut = MAX_SPELLING;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        Ok(s)
    }

    fn spell(&self, id: u32, depth: u32, steps: &mut Steps) -> Result<String, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "type id {id} nests deeper than {MAX_DEPTH} (a cycle?)"
            )));
        }
        steps.take()?;
        let t = self.ty(id)?;
        let named = |prefix: &str| -> Result<String, BtfError> {
            let name = self.name(t.name_off)?;
            Ok(match (prefix, name.is_empty()) {
                ("", _) => name.to_string(),
                (p, true) => format!("{p} {{...}}"),
                (p, false) => format!("{p} {name}"),
            })
        };
        Ok(match t.kind {
            0 => "void".to_string(),
            KIND_STRUCT => named("struct")?,
            KIND_UNION => named("union")?,
            KIND_ENUM | KIND_ENUM64 => named("enum")?,
            KIND_FWD if t.kflag => named("union")?,
            KIND_FWD => named("struct")?,
            KIND_PTR => {
                let target = self.ty(t.size_type)?;
                if target.kind == KIND_FUNC_PROTO {
                    self.spell_proto(&target, "(*)", depth + 1, steps)?
                } else {
                    let inner = self.spell(t.size_type, depth + 1, steps)?;
                    if inner.ends_with('*') {
                        inner + "*"
                    } else {
                        inner + " *"
                    }
                }
            }
            KIND_CONST | KIND_VOLATILE | KIND_RESTRICT => {
                let qual = match t.kind {
                    KIND_CONST => "const",
                    KIND_VOLATILE => "volatile",
                    _ => "restrict",
                };
                let inner = self.spell(t.size_type, depth + 1, steps)?;
                if inner.ends_with('*') {
                    format!("{inner} {qual}")
                } else {
                    format!("{qual} {inner}")
                }
            }
            KIND_TYPE_TAG => self.spell(t.size_type, depth + 1, steps)?,
            KIND_ARRAY => {
                let elem = self.extra_u32(&t, 0)?;
                let dim = format!("[{}]", self.extra_u32(&t, 8)?);
                let mut inner = self.spell(elem, depth + 1, steps)?;
                match inner.find('[') {
                    Some(p) => inner.insert_str(p, &dim),
                    None => inner.push_str(&dim),
                }
                inner
            }
            KIND_FUNC_PROTO => self.spell_proto(&t, "", depth + 1, steps)?,
            _ => named("")?,
        })
    }

    fn spell_proto(
        &self,
        t: &Ty,
        declarator: &str,
        depth: u32,
        steps: &mut Steps,
    ) -> Result<String, BtfError> {
        let mut s = self.spell(t.size_type, depth, steps)?;
        s.push_str(&format!(" {declarator}("));
        for i in 0..t.vlen {
            if s.len() > MAX_SPELLING {
                break;
            }
            if i > 0 {
                s.push_str(", ");
            }
            let param = self.extra_u32(t, 8 * i as usize + 4)?;
            if param == 0 && i + 1 == t.vlen {
                s.push_str("...");
            } else {
                s.push_str(&self.spell(param, depth, steps)?);
            }
        }
        s.push(')');
        Ok(s)
    }

    // ---- queries ----------------------------------------------------------

    fn find_composite<'a>(&self, name: &'a str) -> Result<Outer<'a>, BtfError> {
        let name = name
            .strip_prefix("struct ")
            .or_else(|| name.strip_prefix("union "))
            .unwrap_or(name)
            .trim();
        let start = self.composites.partition_point(|&(off, _)| {
            self.name_bytes(off).cmp(name.as_bytes()) == Ordering::Less
        });
        let matches = self.composites[start..]
            .iter()
            .take_while(|&&(off, _)| self.name_bytes(off) == name.as_bytes());
        let mut first = None;
        for &(_, id) in matches {
            let t = self.ty(id)?;
            if t.vlen > 0 {
                first = Some(t);
                break;
            }
            first = first.or(Some(t));
        }
        let t = first.ok_or_else(|| BtfError::NoSuchStruct(name.to_string()))?;
        Ok(Outer {
            id: t.id,
            kind: if t.kind == KIND_UNION {
                "union"
            } else {
                "struct"
            },
            name,
        })
    }

    fn member_in(&self, outer: &Outer<'_>, path: &str) -> Result<Member, BtfError> {
        let parts: Vec<&str> = path.split('.').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(BtfError::BadPath(path.to_string()));
        }
        let mut steps = Steps::new();
        let mut container = outer.id;
        let mut bits: u64 = 0;
        let mut found: Option<Found> = None;
        for (i, part) in parts.iter().enumerate() {
            if let Some(prev) = found {
                // The previous component must be a struct or union to look into.
                let t = self.strip(prev.type_id)?;
                let prefix = parts[..i].join(".");
                match t.kind {
                    KIND_STRUCT | KIND_UNION => container = t.id,
                    KIND_PTR => {
                        return Err(BtfError::PointerMember {
                            kind: outer.kind,
                            strukt: outer.name.to_string(),
                            member: prefix,
                            type_name: self.type_name(prev.type_id)?,
                        })
                    }
                    _ => {
                        return Err(BtfError::NotComposite {
                            kind: outer.kind,
                            strukt: outer.name.to_string(),
                            member: prefix,
                            type_name: self.type_name(prev.type_id)?,
                        })
                    }
                }
            }
            let f = self
                .find_in(container, part, 0, &mut steps)?
                .ok_or_else(|| BtfError::NoSuchMember {
                    kind: outer.kind,
                    strukt: outer.name.to_string(),
                    path: path.to_string(),
                })?;
            bits = bits
                .checked_add(f.bit_offset)
                .ok_or_else(|| malformed("member offset overflows"))?;
            found = Some(f);
        }
        let f = found.ok_or_else(|| BtfError::BadPath(path.to_string()))?;
        let name = parts.last().copied().unwrap_or_default();
        self.make_member(name, f.type_id, bits, f.bit_size)
    }

    /// Bit offset and bitfield width of a member record, including the old
    /// (kind_flag = 0) encoding of bitfields in the int type itself.
    fn member_bits(&self, m: &RawMember) -> Result<(u64, u32), BtfError> {
        let (mut off, mut size) = (u64::from(m.bit_offset), m.bit_size);
        if size == 0 {
            let t = self.ty(m.type_id)?;
            if t.kind == KIND_INT {
                let enc = self.extra_u32(&t, 0)?;
                let (bits, shift) = (enc & 0xff, (enc >> 16) & 0xff);
                if u64::from(bits) != u64::from(t.size_type) * 8 {
                    size = bits;
                    off += u64::from(shift);
                }
            }
        }
        Ok((off, size))
    }

    /// Looks for `name` among the members of composite `id`, descending into
    /// anonymous struct/union members.
    fn find_in(
        &self,
        id: u32,
        name: &str,
        depth: u32,
        steps: &mut Steps,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members of type id {id} nest deeper than {MAX_DEPTH} (a cycle?)"
            )));
        }
        let t = self.ty(id)?;
        for i in 0..t.vlen {
            steps.take()?;
            let m = self.raw_member(&t, i)?;
            let mname = self.name_bytes(m.name_off);
            if mname == name.as_bytes() {
                let (bit_offset, bit_size) = self.member_bits(&m)?;
                return Ok(Some(Found {
                    type_id: m.type_id,
                    bit_offset,
                    bit_size,
                }));
            }
            if mname.is_empty() {
                let inner = self.strip(m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(f) = self.find_in(inner.id, name, depth + 1, steps)? {
                        return Ok(Some(Found {
                            bit_offset: f.bit_offset + u64::from(m.bit_offset),
                            ..f
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    fn flatten(
        &self,
        id: u32,
        base: u64,
        depth: u32,
        steps: &mut Steps,
        out: &mut Vec<Member>,
    ) -> Result<(), BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members of type id {id} nest deeper than {MAX_DEPTH} (a cycle?)"
            )));
        }
        let t = self.ty(id)?;
        for i in 0..t.vlen {
            steps.take()?;
            let m = self.raw_member(&t, i)?;
            let name = self.name(m.name_off)?;
            if name.is_empty() {
                let inner = self.strip(m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    let at = base + u64::from(m.bit_offset);
                    self.flatten(inner.id, at, depth + 1, steps, out)?;
                }
                // An unnamed bitfield is padding: nothing to list.
                continue;
            }
            let (off, bit_size) = self.member_bits(&m)?;
            out.push(self.make_member(name, m.type_id, base + off, bit_size)?);
        }
        Ok(())
    }

    fn make_member(
        &self,
        name: &str,
        type_id: u32,
        bit_offset: u64,
        bit_size: u32,
    ) -> Result<Member, BtfError> {
        Ok(Member {
            name: name.to_string(),
            offset: bit_offset / 8,
            bit_offset,
            bit_size,
            size: self.size_of(type_id)?,
            type_name: self.type_name(type_id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds little-endian BTF blobs by hand.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strs: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                strs: vec![0],
                ..Default::default()
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(name.as_bytes());
            self.strs.push(0);
            off
        }

        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kflag: bool,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.s(name);
            let info = (kind << 24) | vlen | (u32::from(kflag) << 31);
            for w in [name_off, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.count += 1;
            self.count
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, KIND_INT, 0, false, size, &[size * 8])
        }

        fn wrap(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.raw(name, kind, 0, false, target, &[])
        }

        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw("", KIND_ARRAY, 0, false, 0, &[elem, index, n])
        }

        /// Members as `(name, type, bit offset, bitfield bits)`.
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kflag = members.iter().any(|m| m.3 != 0);
            let mut extra = Vec::new();
            for &(n, t, off, bits) in members {
                extra.extend([self.s(n), t, if kflag { (bits << 24) | off } else { off }]);
            }
            self.raw(name, kind, members.len() as u32, kflag, size, &extra)
        }

        fn finish(&self) -> Vec<u8> {
            let mut v = vec![0x9f, 0xeb, 1, 0];
            let tl = self.types.len() as u32;
            for w in [24, 0, tl, tl, self.strs.len() as u32] {
                v.extend_from_slice(&w.to_le_bytes());
            }
            v.extend_from_slice(&self.types);
            v.extend_from_slice(&self.strs);
            v
        }
    }

    /// struct outer {
    ///     unsigned int flags;                      // 0
    ///     union { int x; struct { int y; int z; }; };   // 4
    ///     unsigned int bf1:3, bf2:5;               // bits 96, 99
    ///     struct inner in;                         // 16
    ///     const volatile my_pid pid;               // 24 (my_pid -> pid_t -> int)
    ///     struct outer *next;                      // 32
    ///     char comm[16];                           // 40
    ///     long (*fn)(int, ...);                    // 56
    /// };                                           // size 64
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let fwd = b.wrap(KIND_FWD, "outer", 0);
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        let chr = b.int("char", 1);
        let long = b.int("long", 8);
        let pid_t = b.wrap(KIND_TYPEDEF, "pid_t", int);
        let my_pid = b.wrap(KIND_TYPEDEF, "my_pid", pid_t);
        let vol = b.wrap(KIND_VOLATILE, "", my_pid);
        let cv = b.wrap(KIND_CONST, "", vol);
        let inner = b.composite(
            KIND_STRUCT,
            "inner",
            8,
            &[("a", int, 0, 0), ("b", int, 32, 0)],
        );
        let anon_s = b.composite(KIND_STRUCT, "", 8, &[("y", int, 0, 0), ("z", int, 32, 0)]);
        let anon_u = b.composite(KIND_UNION, "", 8, &[("x", int, 0, 0), ("", anon_s, 0, 0)]);
        let ptr = b.wrap(KIND_PTR, "", fwd);
        let arr = b.array(chr, int, 16);
        let proto = b.raw("", KIND_FUNC_PROTO, 2, false, long, &[0, int, 0, 0]);
        let fnptr = b.wrap(KIND_PTR, "", proto);
        // An empty duplicate before the real definition.
        b.composite(KIND_STRUCT, "outer", 0, &[]);
        b.composite(
            KIND_STRUCT,
            "outer",
            64,
            &[
                ("flags", uint, 0, 0),
                ("", anon_u, 32, 0),
                ("bf1", uint, 96, 3),
                ("bf2", uint, 99, 5),
                ("in", inner, 128, 0),
                ("pid", cv, 192, 0),
                ("next", ptr, 256, 0),
                ("comm", arr, 320, 0),
                ("fn", fnptr, 448, 0),
            ],
        );
        b.finish()
    }

    fn m(name: &str, offset: u64, bit_offset: u64, bit_size: u32, size: u64, ty: &str) -> Member {
        Member {
            name: name.into(),
            offset,
            bit_offset,
            bit_size,
            size,
            type_name: ty.into(),
        }
    }

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

    #[test]
    fn offsets_through_anonymous_unions_bitfields_and_typedefs() {
        let kt = KernelTypes::from_btf_bytes(&sample()).unwrap();
        assert_eq!(kt.type_count(), 18);
        assert_eq!(kt.struct_size("outer").unwrap(), 64);
        assert_eq!(kt.struct_size("struct inner").unwrap(), 8);
        let get = |p| kt.member("outer", p).unwrap();
        assert_eq!(get("flags"), m("flags", 0, 0, 0, 4, "unsigned int"));
        assert_eq!(get("x"), m("x", 4, 32, 0, 4, "int"));
        assert_eq!(get("y"), m("y", 4, 32, 0, 4, "int"));
        assert_eq!(get("z"), m("z", 8, 64, 0, 4, "int"));
        assert_eq!(get("bf1"), m("bf1", 12, 96, 3, 4, "unsigned int"));
        assert_eq!(get("bf2"), m("bf2", 12, 99, 5, 4, "unsigned int"));
        assert_eq!(get("in"), m("in", 16, 128, 0, 8, "struct inner"));
        assert_eq!(get("in.b"), m("b", 20, 160, 0, 4, "int"));
        assert_eq!(get("pid"), m("pid", 24, 192, 0, 4, "const volatile my_pid"));
        assert_eq!(get("next"), m("next", 32, 256, 0, 8, "struct outer *"));
        assert_eq!(get("comm"), m("comm", 40, 320, 0, 16, "char[16]"));
        assert_eq!(get("fn"), m("fn", 56, 448, 0, 8, "long (*)(int, ...)"));

        let names: Vec<String> = kt
            .members("outer")
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        let want = [
            "flags", "x", "y", "z", "bf1", "bf2", "in", "pid", "next", "comm", "fn",
        ];
        assert_eq!(names, want);
        let listed = kt.members("outer").unwrap();
        for m in &listed {
            assert_eq!(*m, get(&m.name));
        }

        assert!(kt.has_member("outer", "in.a"));
        assert!(!kt.has_member("outer", "in.c"));
        assert_eq!(
            kt.member_any("outer", &["nope", "z", "y"]).unwrap().name,
            "z"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let kt = KernelTypes::from_btf_bytes(&sample()).unwrap();
        let err = |s: &str, p: &str| kt.member(s, p).unwrap_err().to_string();
        assert_eq!(err("outer", "foo"), "struct outer has no member `foo`");
        assert_eq!(
            err("outer", "in.foo"),
            "struct outer has no member `in.foo`"
        );
        assert_eq!(
            err("outer", "next.flags"),
            "member `next` of struct outer is a pointer (struct outer *); pointers are not followed"
        );
        assert_eq!(
            err("outer", "comm.x"),
            "member `comm` of struct outer is not a struct or union (char[16])"
        );
        assert_eq!(
            err("nosuch", "x"),
            "no struct or union named `nosuch` in the BTF"
        );
        assert_eq!(err("outer", "in..a"), "invalid member path `in..a`");
        assert_eq!(err("outer", ""), "invalid member path ``");
        assert_eq!(
            kt.member_any("outer", &["__state", "state"])
                .unwrap_err()
                .to_string(),
            "struct outer has none of the members `__state`, `state`"
        );
        assert!(kt.struct_size("pid_t").is_err());
        let e = KernelTypes::from_elf(b"not an elf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ELF"), "{e}");
    }

    #[test]
    fn old_style_bitfields_in_the_int_encoding() {
        // kind_flag = 0: the int type carries the width and a bit shift.
        let mut b = Builder::new();
        let int = b.int("unsigned int", 4);
        let bf = b.raw("unsigned int", KIND_INT, 0, false, 4, &[(2 << 16) | 3]);
        b.composite(KIND_STRUCT, "s", 8, &[("a", int, 0, 0), ("b", bf, 32, 0)]);
        let kt = KernelTypes::from_btf_bytes(&b.finish()).unwrap();
        assert_eq!(
            kt.member("s", "b").unwrap(),
            m("b", 4, 34, 3, 4, "unsigned int")
        );
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

    fn assert_malformed(blob: &[u8], what: &str) {
        match KernelTypes::from_btf_bytes(blob) {
            Err(BtfError::Malformed(m)) => assert!(m.contains(what), "{what}: got `{m}`"),
            other => panic!("{what}: expected malformed, got {other:?}"),
        }
    }

    fn set_u32(blob: &mut [u8], at: usize, v: u32) {
        blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn malformed_headers_and_sections() {
        let good = sample();
        for len in 0..24 {
            assert_malformed(&good[..len], "shorter than");
        }
        let tweak = |at: usize, v: u32| {
            let mut b = good.clone();
            set_u32(&mut b, at, v);
            b
        };
        let mut b = good.clone();
        b[0] = 0;
        assert_malformed(&b, "bad magic");
        let mut b = good.clone();
        b.swap(0, 1);
        assert_malformed(&b, "big-endian");
        let mut b = good.clone();
        b[2] = 2;
        assert_malformed(&b, "version");
        assert_malformed(&tweak(4, 8), "header length");
        assert_malformed(&tweak(4, u32::MAX), "header length");
        assert_malformed(&tweak(12, u32::MAX), "runs past the end");
        assert_malformed(&tweak(16, u32::MAX), "runs past the end");
        assert_malformed(&tweak(20, u32::MAX), "runs past the end");
        assert_malformed(&tweak(8, 2), "overlap");
        // Every truncation fails cleanly (the string section runs short).
        for len in 24..good.len() {
            assert!(
                KernelTypes::from_btf_bytes(&good[..len]).is_err(),
                "len {len}"
            );
        }
        // A string section that is not NUL-terminated.
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] = b'x';
        assert_malformed(&b, "NUL");
    }

    #[test]
    fn malformed_types() {
        // Unknown kind.
        let mut b = Builder::new();
        b.raw("x", 25, 0, false, 0, &[]);
        assert_malformed(&b.finish(), "unknown kind 25");
        // A struct claiming more members than the section holds.
        let mut b = Builder::new();
        b.raw("s", KIND_STRUCT, 0xffff, false, 8, &[0, 0, 0]);
        assert_malformed(&b.finish(), "runs past the end of the type section");
        // A dangling type id.
        let mut b = Builder::new();
        b.wrap(KIND_TYPEDEF, "t", 99);
        assert_malformed(&b.finish(), "refers to type id 99");
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.composite(KIND_STRUCT, "s", 4, &[("a", int, 0, 0), ("b", 1000, 0, 0)]);
        assert_malformed(&b.finish(), "refers to type id 1000");
        // A name offset past the string section.
        let mut b = Builder::new();
        b.raw("", KIND_INT, 0, false, 4, &[32]);
        let mut blob = b.finish();
        set_u32(&mut blob, 24, 5000);
        assert_malformed(&blob, "string offset 5000");
    }

    #[test]
    fn cycles_are_errors() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        // typedef a -> typedef b -> typedef a
        let next = b.count + 2;
        let ta = b.wrap(KIND_TYPEDEF, "a", next);
        b.wrap(KIND_TYPEDEF, "b", ta);
        // A pointer to itself, an array of itself.
        let next = b.count + 1;
        let p = b.wrap(KIND_PTR, "", next);
        let arr = b.array(next + 1, int, 2);
        // An anonymous struct containing itself anonymously.
        let next = b.count + 1;
        let anon = b.composite(KIND_STRUCT, "", 4, &[("", next, 0, 0)]);
        b.composite(
            KIND_STRUCT,
            "s",
            32,
            &[
                ("t", ta, 0, 0),
                ("p", p, 64, 0),
                ("arr", arr, 128, 0),
                ("", anon, 192, 0),
            ],
        );
        let kt = KernelTypes::from_btf_bytes(&b.finish()).unwrap();
        assert_eq!(kt.struct_size("s").unwrap(), 32);
        for path in ["t", "p", "arr", "nope", "t.x"] {
            match kt.member("s", path) {
                Err(BtfError::Malformed(m)) => assert!(m.contains("cycle"), "{path}: {m}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert!(matches!(kt.members("s"), Err(BtfError::Malformed(_))));
        assert!(!kt.has_member("s", "t"));
        assert!(matches!(
            kt.member_any("s", &["t", "p"]),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reused_anonymous_types_cannot_explode() {
        // Five levels of anonymous structs with 1000 anonymous members each:
        // 10^15 paths without a step budget.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let mut t = b.composite(KIND_STRUCT, "", 4, &[("leaf", int, 0, 0)]);
        for _ in 0..5 {
            let members: Vec<(&str, u32, u32, u32)> = (0..1000).map(|_| ("", t, 0, 0)).collect();
            t = b.composite(KIND_STRUCT, "", 4, &members);
        }
        b.composite(KIND_STRUCT, "s", 4, &[("", t, 0, 0)]);
        let kt = KernelTypes::from_btf_bytes(&b.finish()).unwrap();
        let start = std::time::Instant::now();
        assert_eq!(kt.member("s", "leaf").unwrap().offset, 0);
        assert!(matches!(
            kt.member("s", "nope"),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(kt.members("s"), Err(BtfError::Malformed(_))));
        assert!(start.elapsed().as_secs() < 10);
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
