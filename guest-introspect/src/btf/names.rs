//! Spelling C type names from BTF (`pid_t`, `struct task_struct *`,
//! `char[16]`, `long (*)(int, ...)`) for [`Member`](super::Member)'s
//! `type_name` and for error messages; bounded in depth, steps and length.

use super::parse::{
    Ty, KIND_ARRAY, KIND_CONST, KIND_ENUM, KIND_ENUM64, KIND_FUNC_PROTO, KIND_FWD, KIND_PTR,
    KIND_RESTRICT, KIND_STRUCT, KIND_TYPE_TAG, KIND_UNION, KIND_VOLATILE,
};
use super::{malformed, BtfError, KernelTypes, Steps, MAX_DEPTH};

/// Length of a type spelling after which it is cut short with `...`.
const MAX_SPELLING: usize = 512;

impl KernelTypes {
    /// C-like spelling of a type, cut short if absurdly long.
    pub(super) fn type_name(&self, id: u32) -> Result<String, BtfError> {
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

    /// The spelling of type `id` at nesting `depth`, one step per type
    /// spelled.
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

    /// A function prototype's return type, `declarator` (empty or `(*)`)
    /// and parameter list; `...` for a trailing void parameter.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::fixtures::Builder;
    use crate::btf::parse::KIND_TYPEDEF;

    #[test]
    fn declarators_nest_as_in_c_and_long_names_are_cut() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let p = b.wrap(KIND_PTR, "", int);
        let pp = b.wrap(KIND_PTR, "", p);
        let cp = b.wrap(KIND_CONST, "", p);
        let a3 = b.array(int, int, 3);
        let a23 = b.array(a3, int, 2);
        let fwd_union = b.raw("u", KIND_FWD, 0, true, 0, &[]);
        let anon = b.composite(KIND_STRUCT, "", 4, &[("a", int, 0, 0)]);
        let long = b.wrap(KIND_TYPEDEF, &"a".repeat(600), int);
        let wide = b.wrap(KIND_TYPEDEF, &format!("x{}", "\u{e9}".repeat(300)), int);
        let kt = KernelTypes::from_btf_bytes(&b.finish()).unwrap();
        let name = |id| kt.type_name(id).unwrap();
        assert_eq!(name(0), "void");
        assert_eq!(name(pp), "int **");
        assert_eq!(name(cp), "int * const");
        assert_eq!(name(a23), "int[2][3]");
        assert_eq!(name(fwd_union), "union u");
        assert_eq!(name(anon), "struct {...}");
        assert_eq!(name(long), format!("{}...", "a".repeat(MAX_SPELLING)));
        // Cut at a character boundary: 'x' then two-byte characters.
        assert_eq!(name(wide), format!("x{}...", "\u{e9}".repeat(255)));
    }
}
