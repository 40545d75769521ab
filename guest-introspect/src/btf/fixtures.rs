//! Hand-built BTF blobs and expected values shared by the unit tests of the
//! `btf` modules.

use super::parse::{
    KIND_ARRAY, KIND_CONST, KIND_FUNC_PROTO, KIND_FWD, KIND_INT, KIND_PTR, KIND_STRUCT,
    KIND_TYPEDEF, KIND_UNION, KIND_VOLATILE,
};
use super::Member;

/// Builds little-endian BTF blobs by hand.
#[derive(Default)]
pub(super) struct Builder {
    types: Vec<u8>,
    strs: Vec<u8>,
    pub(super) count: u32,
}

impl Builder {
    pub(super) fn new() -> Self {
        Builder {
            strs: vec![0],
            ..Default::default()
        }
    }

    pub(super) fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strs.len() as u32;
        self.strs.extend_from_slice(name.as_bytes());
        self.strs.push(0);
        off
    }

    pub(super) fn raw(
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

    pub(super) fn int(&mut self, name: &str, size: u32) -> u32 {
        self.raw(name, KIND_INT, 0, false, size, &[size * 8])
    }

    pub(super) fn wrap(&mut self, kind: u32, name: &str, target: u32) -> u32 {
        self.raw(name, kind, 0, false, target, &[])
    }

    pub(super) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        self.raw("", KIND_ARRAY, 0, false, 0, &[elem, index, n])
    }

    /// Members as `(name, type, bit offset, bitfield bits)`.
    pub(super) fn composite(
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

    pub(super) fn finish(&self) -> Vec<u8> {
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
pub(super) fn sample() -> Vec<u8> {
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

/// The [`Member`] expected, field by field.
pub(super) fn m(
    name: &str,
    offset: u64,
    bit_offset: u64,
    bit_size: u32,
    size: u64,
    ty: &str,
) -> Member {
    Member {
        name: name.into(),
        offset,
        bit_offset,
        bit_size,
        size,
        type_name: ty.into(),
    }
}

/// Overwrites the little-endian `u32` at `at`.
pub(super) fn set_u32(blob: &mut [u8], at: usize, v: u32) {
    blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
