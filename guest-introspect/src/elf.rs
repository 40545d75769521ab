//! Just enough ELF64 (little-endian) to find a vmlinux's sections and read
//! its symbol table. Bounded: every offset and count is checked against the
//! file, so a malformed or hostile file gives `None`/an error, not a panic.

use crate::le::{u16_at, u32_at, u64_at};
use crate::symbols::Symbol;

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Name from the section-name string table.
    pub name: String,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addr`.
    pub addr: u64,
    /// File offset.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
    /// `sh_link`.
    pub link: u32,
    /// `sh_entsize`.
    pub entsize: u64,
}

const SHT_SYMTAB: u32 = 2;
/// `sh_type` of a section with no file contents (.bss).
pub const SHT_NOBITS: u32 = 8;
/// `sh_flags` bit of a compressed section.
pub const SHF_COMPRESSED: u64 = 0x800;
/// More sections than any kernel has.
const MAX_SECTIONS: usize = 1 << 16;

/// Whether `b` starts like an ELF64 little-endian file.
pub fn is_elf64(b: &[u8]) -> bool {
    b.starts_with(b"\x7fELF") && b.get(4..6) == Some(&[2, 1][..])
}

fn c_str_at(b: &[u8], o: usize) -> Option<&str> {
    let rest = b.get(o..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// The section headers of an ELF64 LE file; None if the headers are
/// missing or out of bounds.
pub fn sections(elf: &[u8]) -> Option<Vec<Section>> {
    if !is_elf64(elf) {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let entsize = usize::from(u16_at(elf, 0x3a)?);
    let count = usize::from(u16_at(elf, 0x3c)?);
    let strndx = usize::from(u16_at(elf, 0x3e)?);
    if entsize < 64 || count == 0 || count > MAX_SECTIONS || strndx >= count {
        return None;
    }
    let header = |i: usize| -> Option<Section> {
        let h = shoff.checked_add(i.checked_mul(entsize)?)?;
        elf.get(h..h.checked_add(64)?)?;
        Some(Section {
            name: String::new(),
            kind: u32_at(elf, h + 4)?,
            flags: u64_at(elf, h + 8)?,
            addr: u64_at(elf, h + 0x10)?,
            offset: usize::try_from(u64_at(elf, h + 0x18)?).ok()?,
            size: usize::try_from(u64_at(elf, h + 0x20)?).ok()?,
            link: u32_at(elf, h + 0x28)?,
            entsize: u64_at(elf, h + 0x38)?,
        })
    };
    let name_offset = |i: usize| u32_at(elf, shoff + i * entsize);
    let strtab = header(strndx)?;
    let names = elf.get(strtab.offset..strtab.offset.checked_add(strtab.size)?)?;
    (0..count)
        .map(|i| {
            let mut s = header(i)?;
            if s.kind != SHT_NOBITS {
                elf.get(s.offset..s.offset.checked_add(s.size)?)?;
            }
            s.name = c_str_at(names, name_offset(i)? as usize)
                .unwrap_or("")
                .to_string();
            Some(s)
        })
        .collect()
}

/// The bytes of the section called `name`.
pub fn section_bytes<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let s = sections(elf)?.into_iter().find(|s| s.name == name)?;
    if s.kind == SHT_NOBITS {
        return None;
    }
    elf.get(s.offset..s.offset + s.size)
}

/// The defined, named symbols of `.symtab` with nm-like type letters
/// (`T`/`t` text, `D`/`d` data, `B`/`b` bss, `R`/`r` read-only, `A`
/// absolute); empty for a stripped file.
pub fn symtab(elf: &[u8]) -> Vec<Symbol> {
    let Some(secs) = sections(elf) else {
        return Vec::new();
    };
    let Some(tab) = secs.iter().find(|s| s.kind == SHT_SYMTAB) else {
        return Vec::new();
    };
    let Some(strtab) = secs.get(tab.link as usize) else {
        return Vec::new();
    };
    let (Some(syms), Some(strs)) = (
        elf.get(tab.offset..tab.offset + tab.size),
        elf.get(strtab.offset..strtab.offset.saturating_add(strtab.size)),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in syms.chunks_exact(24) {
        let (Some(name), Some(value)) = (u32_at(e, 0), u64_at(e, 8)) else {
            continue;
        };
        let info = e[4];
        let shndx = u16_at(e, 6).unwrap_or(0);
        let bind_global = info >> 4 != 0;
        let typ = info & 0xf;
        // Skip undefined, file and section symbols.
        if shndx == 0 || typ == 3 || typ == 4 {
            continue;
        }
        let Some(name) = c_str_at(strs, name as usize).filter(|n| !n.is_empty()) else {
            continue;
        };
        let letter = if shndx == 0xfff1 {
            'a'
        } else {
            match secs.get(usize::from(shndx)) {
                Some(s) if s.name.starts_with(".text") || s.name.starts_with(".init.text") => 't',
                Some(s) if s.kind == SHT_NOBITS => 'b',
                Some(s) if s.name.starts_with(".rodata") => 'r',
                _ => 'd',
            }
        };
        let kind = if bind_global {
            letter.to_ascii_uppercase()
        } else {
            letter
        };
        out.push(Symbol {
            addr: value,
            kind,
            name: name.to_string(),
        });
    }
    out
}

/// The bytes of the file that a PT_LOAD segment maps at virtual `vaddr`
/// (up to `len`, cut at the segment's end); None if no segment maps it.
pub fn bytes_at_vaddr(elf: &[u8], vaddr: u64, len: usize) -> Option<&[u8]> {
    if !is_elf64(elf) {
        return None;
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let entsize = usize::from(u16_at(elf, 0x36)?);
    let count = usize::from(u16_at(elf, 0x38)?);
    if entsize < 56 {
        return None;
    }
    for i in 0..count {
        let h = phoff.checked_add(i.checked_mul(entsize)?)?;
        if u32_at(elf, h)? != 1 {
            continue;
        }
        let offset = u64_at(elf, h + 8)?;
        let start = u64_at(elf, h + 0x10)?;
        let filesz = u64_at(elf, h + 0x20)?;
        if vaddr < start || vaddr - start >= filesz {
            continue;
        }
        let from = usize::try_from(offset.checked_add(vaddr - start)?).ok()?;
        let avail = usize::try_from(filesz - (vaddr - start)).ok()?;
        return elf.get(from..from.checked_add(len.min(avail))?);
    }
    None
}
