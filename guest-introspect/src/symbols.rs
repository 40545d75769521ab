//! Kernel symbols from a System.map (`address type name` per line).
//!
//! The map is untrusted input: malformed lines are counted and skipped, and
//! a file with no usable symbol is an error.

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Link-time address.
    pub addr: u64,
    /// nm-style type letter (`T`, `t`, `D`, ...).
    pub kind: char,
    /// Name.
    pub name: String,
}

/// Why a symbol file is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SymbolError {
    /// No line parsed as a symbol.
    #[error("no symbols found ({bad_lines} malformed lines): not a System.map")]
    Empty {
        /// Lines that did not parse.
        bad_lines: usize,
    },
}

/// Symbols sorted by address, for address-to-name lookups, with a name
/// index (the first symbol of a name wins, as in `kallsyms_lookup_name`).
#[derive(Debug, Clone, Default)]
pub struct SymbolMap {
    symbols: Vec<Symbol>,
    by_name: std::collections::HashMap<String, u64>,
}

impl SymbolMap {
    /// A map of `symbols` (any order).
    pub fn from_symbols(mut symbols: Vec<Symbol>) -> Self {
        symbols.sort_by_key(|s| s.addr);
        let mut by_name = std::collections::HashMap::with_capacity(symbols.len());
        for s in &symbols {
            by_name.entry(s.name.clone()).or_insert(s.addr);
        }
        Self { symbols, by_name }
    }

    /// Every symbol, by address.
    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    /// Parses System.map text.
    pub fn parse_system_map(text: &str) -> Result<Self, SymbolError> {
        let mut symbols = Vec::new();
        let mut bad_lines = 0;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(a), Some(k), Some(n), None) = (it.next(), it.next(), it.next(), it.next())
            else {
                bad_lines += 1;
                continue;
            };
            let (Ok(addr), Some(kind)) = (u64::from_str_radix(a, 16), k.chars().next()) else {
                bad_lines += 1;
                continue;
            };
            if k.len() != 1 || n.len() > 512 {
                bad_lines += 1;
                continue;
            }
            symbols.push(Symbol {
                addr,
                kind,
                name: n.to_string(),
            });
        }
        if symbols.is_empty() {
            return Err(SymbolError::Empty { bad_lines });
        }
        Ok(Self::from_symbols(symbols))
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The address of `name`, if present.
    pub fn lookup(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// The address of the first symbol above `addr`: where the function at
    /// `addr` ends at the latest (kallsyms and System.map carry no sizes).
    pub fn next_above(&self, addr: u64) -> Option<u64> {
        let i = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols.get(i).map(|s| s.addr)
    }

    /// Every symbol at exactly link-time address `addr` (aliases share one).
    pub fn at(&self, addr: u64) -> &[Symbol] {
        let start = self.symbols.partition_point(|s| s.addr < addr);
        let end = self.symbols.partition_point(|s| s.addr <= addr);
        &self.symbols[start..end]
    }

    /// The text symbol containing link-time address `addr`, with the offset
    /// into it (`name+0x12`); None outside the kernel text. Of several
    /// symbols at one address the one the kernel itself prints is chosen
    /// (see [`alias_rank`]): `__schedule`, not `__sched_text_start`.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let end = self.symbols.partition_point(|s| s.addr <= addr);
        let last = end.checked_sub(1)?;
        let at = self.symbols[last].addr;
        let start = self.symbols[..end].partition_point(|s| s.addr < at);
        let s = self.symbols[start..end]
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| (alias_rank(s), *i))
            .map(|(_, s)| s)?;
        if !matches!(s.kind, 'T' | 't' | 'W' | 'w') || addr - s.addr > 1 << 20 {
            return None;
        }
        Some(format!("{}+{:#x}", s.name, addr - s.addr))
    }
}

/// How `scripts/kallsyms` orders symbols that share an address, the first
/// being the one `kallsyms_lookup` reports: strong before weak, then
/// anything before a linker-script marker (`__start_X`, `__stop_X`,
/// `__end_X`, `__X_start`, `__X_end`), then fewer leading underscores.
pub fn alias_rank(s: &Symbol) -> (bool, bool, usize) {
    let n = &s.name;
    let weak = matches!(s.kind, 'w' | 'W');
    let marker = n.len() >= 8
        && n.starts_with("__")
        && (n[2..].starts_with("start_")
            || n[2..].starts_with("stop_")
            || n[2..].starts_with("end_")
            || n.ends_with("_start")
            || n.ends_with("_end"));
    let underscores = n.bytes().take_while(|&b| b == b'_').count();
    (weak, marker, underscores)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _text\nffffffff81000100 t helper\nffffffff81001000 T do_exit\nffffffff82000000 D init_task\n";

    #[test]
    fn parses_and_symbolizes() {
        let m = SymbolMap::parse_system_map(MAP).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.lookup("do_exit"), Some(0xffffffff81001000));
        assert_eq!(
            m.symbolize(0xffffffff81001005).as_deref(),
            Some("do_exit+0x5")
        );
        assert_eq!(
            m.symbolize(0xffffffff81000104).as_deref(),
            Some("helper+0x4")
        );
        assert_eq!(m.symbolize(0xffffffff82000008), None, "data is not code");
        assert_eq!(m.symbolize(0x1000), None);
        assert_eq!(m.next_above(0xffffffff81000100), Some(0xffffffff81001000));
        assert_eq!(m.next_above(0xffffffff81000104), Some(0xffffffff81001000));
        assert_eq!(m.next_above(0xffffffff82000000), None);
    }

    #[test]
    fn aliases_resolve_as_the_kernel_prints_them() {
        let m = SymbolMap::parse_system_map(
            "ffffffff81a00000 T __sched_text_start\nffffffff81a00000 T __schedule\n\
             ffffffff81b00000 T __cpuidle_text_start\nffffffff81b00000 t default_idle\n\
             ffffffff81c00000 W weak_fn\nffffffff81c00000 T _strong_fn\n",
        )
        .unwrap();
        assert_eq!(
            m.symbolize(0xffffffff81a00010).as_deref(),
            Some("__schedule+0x10")
        );
        assert_eq!(
            m.symbolize(0xffffffff81b00013).as_deref(),
            Some("default_idle+0x13")
        );
        assert_eq!(
            m.symbolize(0xffffffff81c00001).as_deref(),
            Some("_strong_fn+0x1")
        );
        let names: Vec<&str> = m
            .at(0xffffffff81a00000)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["__sched_text_start", "__schedule"]);
        assert!(m.at(0xffffffff81a00001).is_empty());
    }

    #[test]
    fn garbage_is_an_error_and_bad_lines_are_skipped() {
        assert_eq!(
            SymbolMap::parse_system_map("\x7fELF garbage\n\n").unwrap_err(),
            SymbolError::Empty { bad_lines: 2 }
        );
        let m = SymbolMap::parse_system_map("zzzz T x\nffffffff81000000 T ok\nffffffff81 TT y\n")
            .unwrap();
        assert_eq!(m.len(), 1);
    }
}
