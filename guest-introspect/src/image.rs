//! What hvtrace knows about one kernel build: its symbols (from the best
//! source at hand), its BTF types and its banner.
//!
//! Symbol precedence, one rule for every command: a System.map the user
//! names, then the ELF symbol table of a vmlinux that has one, then kallsyms
//! recovered from the image, then kallsyms recovered from the running
//! guest's memory. [`SymbolSource`] says which was used. Types come from the
//! image's `.BTF` section, or from the `__start_BTF`..`__stop_BTF` blob in
//! guest memory.

use crate::btf::{BtfError, KernelTypes};
use crate::elf;
use crate::kallsyms::{find_kallsyms, find_kallsyms_in_elf, KallsymsError};
use crate::kernel::{c_string, idt_handler, VcpuView};
use crate::memory::{PhysMemory, VirtAddr};
use crate::paging::{read_virt, translate};
use crate::symbols::{SymbolError, SymbolMap};

/// Where a kernel's symbols came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SymbolSource {
    /// A System.map file.
    SystemMap,
    /// The `.symtab` of a vmlinux ELF.
    ElfSymtab,
    /// kallsyms recovered from the kernel image file.
    KallsymsImage,
    /// kallsyms recovered from the running guest's memory.
    KallsymsMemory,
}

impl SymbolSource {
    /// Human-readable name.
    pub fn describe(self) -> &'static str {
        match self {
            Self::SystemMap => "System.map",
            Self::ElfSymtab => "vmlinux ELF symbol table",
            Self::KallsymsImage => "kallsyms recovered from the kernel image",
            Self::KallsymsMemory => "kallsyms recovered from guest memory",
        }
    }
}

/// Why a kernel's symbols or types could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The System.map is unusable.
    #[error("System.map: {0}")]
    SystemMap(#[from] SymbolError),
    /// No symbol source worked.
    #[error("no symbols: the image has no .symtab and kallsyms recovery failed: {0}")]
    Kallsyms(#[from] KallsymsError),
    /// BTF problem.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// Guest memory does not hold a recognisable kernel.
    #[error("cannot find the kernel in guest memory: {0}")]
    Memory(String),
}

/// Symbols, types and banner of one kernel build.
pub struct KernelInfo {
    /// Symbols at link-time addresses (runtime ones for
    /// [`SymbolSource::KallsymsMemory`]).
    pub symbols: SymbolMap,
    /// Which source the symbols came from.
    pub symbol_source: SymbolSource,
    /// BTF types.
    pub types: KernelTypes,
    /// `linux_banner` of the image, when known.
    pub banner: Option<String>,
    /// How far `symbols` lie from link-time addresses: 0 for symbols from
    /// files; for symbols recovered from guest memory (already at runtime
    /// addresses) the runtime `_text` minus [`DEFAULT_START_KERNEL`], so
    /// that the KASLR offset can still be reported.
    pub symbols_shift: i64,
}

/// Link-time `_text` of an x86-64 kernel built with the default
/// `CONFIG_PHYSICAL_START` (16 MiB), as Debian's and hvtrace's are.
pub const DEFAULT_START_KERNEL: u64 = 0xffff_ffff_8100_0000;

/// Finds the `Linux version ...` banner string in an image.
pub fn find_banner(image: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"Linux version ";
    let mut from = 0;
    while let Some(p) = image
        .get(from..)?
        .windows(NEEDLE.len())
        .position(|w| w == NEEDLE)
    {
        let start = from + p;
        let s = c_string(&image[start..image.len().min(start + 512)]);
        // linux_banner ends in a newline; format strings have '%'.
        if s.ends_with('\n') && !s.contains('%') {
            return Some(s);
        }
        from = start + 1;
    }
    None
}

/// Symbols from the files a user has, by the precedence rule.
pub fn symbols_from_files(
    elf_image: &[u8],
    system_map: Option<&str>,
) -> Result<(SymbolMap, SymbolSource), ImageError> {
    if let Some(text) = system_map {
        return Ok((SymbolMap::parse_system_map(text)?, SymbolSource::SystemMap));
    }
    let symtab = elf::symtab(elf_image);
    if !symtab.is_empty() {
        return Ok((SymbolMap::from_symbols(symtab), SymbolSource::ElfSymtab));
    }
    let table = find_kallsyms_in_elf(elf_image)?;
    Ok((
        SymbolMap::from_symbols(table.symbols),
        SymbolSource::KallsymsImage,
    ))
}

impl KernelInfo {
    /// Loads a kernel's information from its (decompressed) vmlinux ELF and
    /// an optional System.map.
    pub fn from_files(elf_image: &[u8], system_map: Option<&str>) -> Result<Self, ImageError> {
        let (symbols, symbol_source) = symbols_from_files(elf_image, system_map)?;
        // The banner the image's own linux_banner symbol points to (6.1 has
        // a second, placeholder banner); a text search if that fails. A
        // System.map is what is being checked, so it is not trusted here.
        let own = match symbol_source {
            SymbolSource::SystemMap => symbols_from_files(elf_image, None).ok().map(|(m, _)| m),
            _ => None,
        };
        let banner = own
            .as_ref()
            .unwrap_or(&symbols)
            .lookup("linux_banner")
            .and_then(|va| elf::bytes_at_vaddr(elf_image, va, 512))
            .map(c_string)
            .filter(|b| b.starts_with("Linux version "))
            .or_else(|| find_banner(elf_image));
        Ok(Self {
            symbols,
            symbol_source,
            types: KernelTypes::from_elf(elf_image)?,
            banner,
            symbols_shift: 0,
        })
    }

    /// Recovers a kernel's information from a running guest alone: the
    /// kernel image is the mapped run of 2 MiB pages around the page-fault
    /// handler; kallsyms and the BTF blob are found in it.
    pub fn from_memory(
        mem: &(impl PhysMemory + ?Sized),
        vcpu: &VcpuView,
    ) -> Result<Self, ImageError> {
        vcpu.in_kernel_space(|space| Self::from_memory_in(mem, vcpu, space))
    }

    fn from_memory_in(
        mem: &(impl PhysMemory + ?Sized),
        vcpu: &VcpuView,
        space: crate::paging::AddressSpace,
    ) -> Result<Self, ImageError> {
        const STEP: u64 = 2 << 20;
        const MAX_IMAGE: u64 = 512 << 20;
        let handler = idt_handler(mem, space, vcpu.idt_base, 14)
            .map_err(|e| ImageError::Memory(format!("no IDT: {e}")))?;
        let mapped = |va: u64| translate(mem, space, VirtAddr(va)).is_ok();
        let mut start = handler & !(STEP - 1);
        while start > crate::kernel::START_KERNEL_MAP
            && mapped(start - STEP)
            && handler - start < MAX_IMAGE
        {
            start -= STEP;
        }
        let mut end = start;
        while end - start < MAX_IMAGE && mapped(end) {
            end += STEP;
        }
        // Read page by page; holes (freed init memory) stay zero.
        let mut image = vec![0u8; (end - start) as usize];
        for (i, page) in image.chunks_mut(4096).enumerate() {
            let _ = read_virt(mem, space, VirtAddr(start + i as u64 * 4096), page);
        }
        let table = find_kallsyms(&image, start)?;
        let symbols = SymbolMap::from_symbols(table.symbols);
        let btf_range = symbols
            .lookup("__start_BTF")
            .zip(symbols.lookup("__stop_BTF"))
            .ok_or_else(|| ImageError::Memory("no __start_BTF/__stop_BTF symbols".into()))?;
        let (lo, hi) = btf_range;
        let blob = lo
            .checked_sub(start)
            .zip(hi.checked_sub(start))
            .and_then(|(a, b)| image.get(a as usize..b as usize))
            .ok_or_else(|| ImageError::Memory("BTF blob outside the kernel image".into()))?;
        let types = KernelTypes::from_btf_bytes(blob)?;
        let text = symbols.lookup("_text").unwrap_or(start);
        Ok(Self {
            symbols_shift: text.wrapping_sub(DEFAULT_START_KERNEL) as i64,
            // The banner in memory is the running kernel's by definition.
            banner: None,
            symbols,
            symbol_source: SymbolSource::KallsymsMemory,
            types,
        })
    }
}
