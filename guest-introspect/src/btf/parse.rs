//! Reading the BTF blob: the header and the two sections, the type
//! records, the indexes built once at load (where each type starts; named
//! structs and unions sorted by name) and the checks that make later walks
//! safe: every name offset and type id in range, typedef, qualifier and
//! array chains bounded so that a cycle is an error.

use std::cmp::Ordering;

use super::{malformed, BtfError, KernelTypes, MAX_DEPTH};
use crate::le::{u16_at as read_u16, u32_at as read_u32};

const HEADER_LEN: usize = 24;
const BTF_MAGIC: u16 = 0xEB9F;

/// BTF kinds (`BTF_KIND_*` in the kernel's `include/uapi/linux/btf.h`).
pub(super) const KIND_INT: u32 = 1;
pub(super) const KIND_PTR: u32 = 2;
pub(super) const KIND_ARRAY: u32 = 3;
pub(super) const KIND_STRUCT: u32 = 4;
pub(super) const KIND_UNION: u32 = 5;
pub(super) const KIND_ENUM: u32 = 6;
pub(super) const KIND_FWD: u32 = 7;
pub(super) const KIND_TYPEDEF: u32 = 8;
pub(super) const KIND_VOLATILE: u32 = 9;
pub(super) const KIND_CONST: u32 = 10;
pub(super) const KIND_RESTRICT: u32 = 11;
pub(super) const KIND_FUNC: u32 = 12;
pub(super) const KIND_FUNC_PROTO: u32 = 13;
pub(super) const KIND_VAR: u32 = 14;
pub(super) const KIND_DATASEC: u32 = 15;
pub(super) const KIND_FLOAT: u32 = 16;
pub(super) const KIND_DECL_TAG: u32 = 17;
pub(super) const KIND_TYPE_TAG: u32 = 18;
pub(super) const KIND_ENUM64: u32 = 19;

/// The 12-byte common header of one BTF type, plus where its kind-specific
/// data starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ty {
    pub(super) id: u32,
    pub(super) name_off: u32,
    pub(super) kind: u32,
    pub(super) vlen: u32,
    pub(super) kflag: bool,
    /// `size` or `type`, depending on the kind.
    pub(super) size_type: u32,
    /// Offset in the type section of the kind-specific data.
    pub(super) extra: usize,
}

/// A member record of a struct or union.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawMember {
    pub(super) name_off: u32,
    pub(super) type_id: u32,
    pub(super) bit_offset: u32,
    pub(super) bit_size: u32,
}

/// The outer struct a query is about, for error messages.
pub(super) struct Outer<'a> {
    pub(super) id: u32,
    pub(super) kind: &'static str,
    pub(super) name: &'a str,
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

impl KernelTypes {
    /// Checks the header and sections of a raw BTF blob, copies the type
    /// and string sections, then indexes and checks every type.
    pub(super) fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
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
    pub(super) fn name_bytes(&self, off: u32) -> &[u8] {
        let rest = self.strs.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The name at a string offset, which must be UTF-8.
    pub(super) fn name(&self, off: u32) -> Result<&str, BtfError> {
        std::str::from_utf8(self.name_bytes(off))
            .map_err(|_| malformed(format!("name at string offset {off} is not UTF-8")))
    }

    /// The common header of type `id` (id 0 is `void`).
    pub(super) fn ty(&self, id: u32) -> Result<Ty, BtfError> {
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

    /// The `u32` at byte `at` of a type's kind-specific data.
    pub(super) fn extra_u32(&self, t: &Ty, at: usize) -> Result<u32, BtfError> {
        read_u32(&self.types, t.extra + at)
            .ok_or_else(|| malformed(format!("type id {} is cut short", t.id)))
    }

    /// Member record `i` of struct or union `t`, bitfield width unpacked
    /// when `kind_flag` is set.
    pub(super) fn raw_member(&self, t: &Ty, i: u32) -> Result<RawMember, BtfError> {
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
    pub(super) fn strip(&self, id: u32) -> Result<Ty, BtfError> {
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
    pub(super) fn size_of(&self, id: u32) -> Result<u64, BtfError> {
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

    // ---- look-up by name --------------------------------------------------

    /// The struct or union called `name` (a leading `struct ` or `union `
    /// ignored): the first definition with members, else the first one.
    pub(super) fn find_composite<'a>(&self, name: &'a str) -> Result<Outer<'a>, BtfError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::fixtures::{sample, set_u32, Builder};

    fn assert_malformed(blob: &[u8], what: &str) {
        match KernelTypes::from_btf_bytes(blob) {
            Err(BtfError::Malformed(m)) => assert!(m.contains(what), "{what}: got `{m}`"),
            other => panic!("{what}: expected malformed, got {other:?}"),
        }
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
}
