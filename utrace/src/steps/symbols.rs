//! A program's function symbols, for `address <symbol+offset>` in
//! instruction lines: the text symbols of its ELF file (the host's copy
//! of the guest image's binary), nearest below an address.

use std::sync::Arc;

/// The text symbols of one program, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct ProgramSymbols {
    /// (address, name), ascending.
    functions: Vec<(u64, String)>,
    /// The end of the program's text: addresses past it have no symbol.
    text_end: u64,
    /// The file, for the bytes of an instruction the guest has not paged
    /// in yet (a block's first line is printed before it runs).
    file: Arc<[u8]>,
}

impl ProgramSymbols {
    /// The text symbols of the ELF file `elf` (static or non-PIE
    /// executables: link-time addresses are run-time ones). None if it is
    /// not an ELF64 executable with a symbol table, or is position
    /// independent (its load address is not known here).
    pub fn from_elf(elf: &[u8]) -> Option<Self> {
        if !guest_introspect::elf::is_elf64(elf) {
            return None;
        }
        // e_type at 16: ET_EXEC (2) only.
        if elf.get(16..18) != Some(&[2, 0][..]) {
            return None;
        }
        let mut functions: Vec<(u64, String)> = guest_introspect::elf::symtab(elf)
            .into_iter()
            .filter(|s| matches!(s.kind, 'T' | 't' | 'W' | 'w') && s.addr != 0)
            .map(|s| (s.addr, s.name))
            .collect();
        if functions.is_empty() {
            return None;
        }
        functions.sort();
        functions.dedup_by_key(|f| f.0);
        let text_end = guest_introspect::elf::sections(elf)
            .unwrap_or_default()
            .iter()
            .filter(|s| s.flags & 0x4 != 0) // SHF_EXECINSTR
            .map(|s| s.addr.saturating_add(s.size as u64))
            .max()
            .unwrap_or(u64::MAX);
        Some(Self {
            functions,
            text_end,
            file: Arc::from(elf),
        })
    }

    /// Up to `len` bytes of the program's file at run-time address `addr`.
    pub fn bytes_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        guest_introspect::elf::bytes_at_vaddr(&self.file, addr, len)
    }

    /// The function `addr` lies in and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        if addr >= self.text_end {
            return None;
        }
        let i = self.functions.partition_point(|f| f.0 <= addr);
        let (start, name) = self.functions.get(i.checked_sub(1)?)?;
        Some((name.as_str(), addr - start))
    }
}

/// Finds a program's symbols by its path in the guest.
pub trait SymbolSource: Send + Sync {
    /// The symbols of the program at `path` in the guest, if known.
    fn symbols(&self, path: &str) -> Option<Arc<ProgramSymbols>>;
}

/// A source that knows no program.
pub struct NoSymbols;

impl SymbolSource for NoSymbols {
    fn symbols(&self, _path: &str) -> Option<Arc<ProgramSymbols>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_symbol_below_within_the_text() {
        let s = ProgramSymbols {
            functions: vec![(0x1000, "_start".into()), (0x1010, "loop".into())],
            text_end: 0x1020,
            file: Arc::from(&b""[..]),
        };
        assert_eq!(s.lookup(0x1000), Some(("_start", 0)));
        assert_eq!(s.lookup(0x100f), Some(("_start", 0xf)));
        assert_eq!(s.lookup(0x1014), Some(("loop", 4)));
        assert_eq!(s.lookup(0xfff), None);
        assert_eq!(s.lookup(0x1020), None);
    }

    #[test]
    fn garbage_is_no_program() {
        assert!(ProgramSymbols::from_elf(b"not an elf").is_none());
        assert!(ProgramSymbols::from_elf(&[0x7f, b'E', b'L', b'F', 2, 1]).is_none());
    }
}
