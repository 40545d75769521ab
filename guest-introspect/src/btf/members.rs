//! Member look-ups: the one walk over a struct's members (anonymous
//! structs and unions entered in place, as C name look-up sees them) and
//! everything built on it: dotted member paths for `member`, `member_any`
//! and `has_member`, and the flat listing for `members`.

use super::parse::{Outer, RawMember, Ty, KIND_INT, KIND_PTR, KIND_STRUCT, KIND_UNION};
use super::{malformed, BtfError, KernelTypes, Member, Steps, MAX_DEPTH};

/// Where a member search ended.
#[derive(Debug, Clone, Copy)]
struct Found {
    type_id: u32,
    bit_offset: u64,
    bit_size: u32,
}

/// A named member met by [`MemberWalk`], placed in the walked struct.
struct Visited<'k> {
    /// The member's name as stored: compared as bytes, not yet checked to
    /// be UTF-8.
    name: &'k [u8],
    /// The member record; its bit offset counts from `base`.
    raw: RawMember,
    /// Bit offset, in the walked struct, of the struct or union that
    /// declares the member: 0 for a direct member, the sum of the
    /// enclosing anonymous members' offsets otherwise.
    base: u64,
}

/// One struct or union on the walk's stack.
struct Frame {
    ty: Ty,
    /// Index of the next member record to visit.
    next: u32,
    /// Bit offset of this struct or union in the walked one.
    base: u64,
}

/// The one member walk: every named member of a struct or union in
/// declaration order, with the members of anonymous struct and union
/// members visited in their place, depth first (C's name look-up order and
/// pahole's listing). Unnamed members of other types (padding bitfields)
/// are skipped. Each member record visited takes one step of the query's
/// [`Steps`]; anonymous nesting deeper than [`MAX_DEPTH`] is an error (a
/// cycle). The first error ends the walk.
///
/// [`KernelTypes::find_in`] stops at the first member of the name asked
/// for; [`KernelTypes::flatten`] lists them all. They replace two recursive
/// walks that visited, charged steps, checked depth and added up offsets
/// the same way; they differed only in what they did with a member, which
/// the callers still do as before:
/// * the path search compares names as bytes, so it finds a member even if
///   another member's name is not UTF-8; the listing turns each name into
///   text and fails with [`BtfError::Malformed`] on such a name;
/// * the path search stops at the first match, so a later member of the
///   same name is never seen (nor its cost paid); the listing has both;
/// * the listing sizes and spells every member, so a cyclic member type
///   fails `members` but fails `member` only for that member or a path
///   through it.
struct MemberWalk<'k, 's> {
    kt: &'k KernelTypes,
    steps: &'s mut Steps,
    /// The walked struct at the bottom, the innermost anonymous member
    /// being walked on top. A frame is popped only when the walk comes back
    /// to it with no members left, so the height is the nesting depth the
    /// old recursion checked.
    stack: Vec<Frame>,
}

impl<'k> MemberWalk<'k, '_> {
    /// Pushes struct or union `id`, which starts `base` bits into the
    /// walked struct.
    fn enter(&mut self, id: u32, base: u64) -> Result<(), BtfError> {
        let depth = self.stack.len() as u32;
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members of type id {id} nest deeper than {MAX_DEPTH} (a cycle?)"
            )));
        }
        let ty = self.kt.ty(id)?;
        self.stack.push(Frame { ty, next: 0, base });
        Ok(())
    }

    /// The next named member, or `None` when every member has been seen.
    fn advance(&mut self) -> Result<Option<Visited<'k>>, BtfError> {
        let kt = self.kt;
        while let Some(frame) = self.stack.last_mut() {
            if frame.next >= frame.ty.vlen {
                self.stack.pop();
                continue;
            }
            let (ty, i, base) = (frame.ty, frame.next, frame.base);
            frame.next += 1;
            self.steps.take()?;
            let m = kt.raw_member(&ty, i)?;
            let name = kt.name_bytes(m.name_off);
            if !name.is_empty() {
                return Ok(Some(Visited { name, raw: m, base }));
            }
            let inner = kt.strip(m.type_id)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                // At most MAX_DEPTH + 1 offsets, each below 2^32: no overflow.
                self.enter(inner.id, base + u64::from(m.bit_offset))?;
            }
            // An unnamed member of any other type is padding: nothing to visit.
        }
        Ok(None)
    }
}

impl<'k> Iterator for MemberWalk<'k, '_> {
    type Item = Result<Visited<'k>, BtfError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.advance();
        if next.is_err() {
            self.stack.clear();
        }
        next.transpose()
    }
}

impl KernelTypes {
    /// The member at dotted `path` inside `outer` (see
    /// [`KernelTypes::member`]); one step budget covers the whole path.
    pub(super) fn member_in(&self, outer: &Outer<'_>, path: &str) -> Result<Member, BtfError> {
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
            let f = self.find_in(container, part, &mut steps)?.ok_or_else(|| {
                BtfError::NoSuchMember {
                    kind: outer.kind,
                    strukt: outer.name.to_string(),
                    path: path.to_string(),
                }
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

    /// The first of `candidates` that [`Self::member_in`] finds, for
    /// [`KernelTypes::member_any`]: malformed BTF ends the search, any other
    /// error tries the next candidate.
    pub(super) fn first_member(
        &self,
        outer: &Outer<'_>,
        candidates: &[&str],
    ) -> Result<Member, BtfError> {
        for path in candidates {
            match self.member_in(outer, path) {
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

    /// Every named member of struct or union `id` in declaration order,
    /// anonymous members' members in their place, for
    /// [`KernelTypes::members`].
    pub(super) fn flatten(&self, id: u32) -> Result<Vec<Member>, BtfError> {
        let mut steps = Steps::new();
        let mut out = Vec::new();
        for visited in self.walk(id, &mut steps)? {
            let v = visited?;
            let name = self.name(v.raw.name_off)?;
            let (bit_offset, bit_size) = self.member_bits(&v.raw)?;
            out.push(self.make_member(name, v.raw.type_id, v.base + bit_offset, bit_size)?);
        }
        Ok(out)
    }

    /// The first member called `name` in struct or union `id`, as C finds
    /// it: declaration order, anonymous members searched in place.
    fn find_in(&self, id: u32, name: &str, steps: &mut Steps) -> Result<Option<Found>, BtfError> {
        for visited in self.walk(id, steps)? {
            let v = visited?;
            if v.name == name.as_bytes() {
                let (bit_offset, bit_size) = self.member_bits(&v.raw)?;
                return Ok(Some(Found {
                    type_id: v.raw.type_id,
                    bit_offset: v.base + bit_offset,
                    bit_size,
                }));
            }
        }
        Ok(None)
    }

    /// The member walk over struct or union `id` (see [`MemberWalk`]).
    fn walk<'s>(&self, id: u32, steps: &'s mut Steps) -> Result<MemberWalk<'_, 's>, BtfError> {
        let mut walk = MemberWalk {
            kt: self,
            steps,
            stack: Vec::new(),
        };
        walk.enter(id, 0)?;
        Ok(walk)
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

    /// A [`Member`] for the record found, its size and type spelled.
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
    use crate::btf::fixtures::{m, sample, Builder};
    use crate::btf::parse::{KIND_INT, KIND_PTR, KIND_STRUCT, KIND_TYPEDEF};
    use crate::btf::{BtfError, KernelTypes};

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
}
