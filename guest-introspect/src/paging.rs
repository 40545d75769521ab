//! x86-64 page-table walks: 4- and 5-level paging, 1 GiB and 2 MiB pages,
//! and reads of virtual ranges that cross pages.
//!
//! Page tables live in guest memory and are therefore untrusted: a walk has
//! at most five steps, and every entry it follows is range checked by the
//! memory source.

use crate::memory::{PhysAddr, PhysMemory, PhysReadError, VirtAddr};

/// Address bits 12..51 of a page-table entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-table entry bit: the entry maps something.
pub const PRESENT: u64 = 1;
/// Page-table entry bit: writes allowed (with CR0.WP, for the kernel too).
pub const WRITABLE: u64 = 1 << 1;
/// Page-table entry bit: a 1 GiB or 2 MiB page (levels 3 and 2).
pub const PAGE_SIZE_BIT: u64 = 1 << 7;
/// CR4 bit that selects 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;

/// Paging mode of an address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingLevels {
    /// PML4 at the top (CR4.LA57 clear).
    Four,
    /// PML5 at the top (CR4.LA57 set).
    Five,
}

impl PagingLevels {
    /// The paging mode a vCPU with this CR4 uses.
    pub fn from_cr4(cr4: u64) -> Self {
        if cr4 & CR4_LA57 != 0 {
            Self::Five
        } else {
            Self::Four
        }
    }
}

/// An address space: the top-level table and its paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// CR3 (PCID and flag bits are ignored).
    pub cr3: u64,
    /// 4- or 5-level paging.
    pub levels: PagingLevels,
}

/// Why a virtual address did not translate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The entry at `level` (4 = PML4, 1 = PTE) is not present.
    #[error("{va} is not mapped (no present entry at level {level})")]
    NotPresent {
        /// The address being translated.
        va: VirtAddr,
        /// Level at which the walk stopped.
        level: u8,
    },
    /// A page-table page is outside guest RAM.
    #[error("page table of {va} lies outside guest RAM: {source}")]
    TableOutsideRam {
        /// The address being translated.
        va: VirtAddr,
        /// The failed physical read.
        source: PhysReadError,
    },
}

/// Translates `va` in `space` to a guest-physical address.
pub fn translate(
    mem: &(impl PhysMemory + ?Sized),
    space: AddressSpace,
    va: VirtAddr,
) -> Result<PhysAddr, TranslateError> {
    translate_access(mem, space, va).map(|(pa, _)| pa)
}

/// Whether a mapping may be written: every level's R/W bit is set (with
/// CR0.WP, which Linux always sets, this binds the kernel too, so a
/// copy-on-write page reads as not writable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageAccess {
    /// All R/W bits on the walk are set.
    pub writable: bool,
}

/// Translates `va` and reports whether the mapping is writable.
pub fn translate_access(
    mem: &(impl PhysMemory + ?Sized),
    space: AddressSpace,
    va: VirtAddr,
) -> Result<(PhysAddr, PageAccess), TranslateError> {
    let top: u8 = match space.levels {
        PagingLevels::Four => 4,
        PagingLevels::Five => 5,
    };
    let mut table = space.cr3 & ADDR_MASK;
    let mut writable = true;
    for level in (1..=top).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (va.0 >> shift) & 0x1ff;
        let entry = mem
            .read_phys_u64(PhysAddr(table + index * 8))
            .map_err(|source| TranslateError::TableOutsideRam { va, source })?;
        if entry & PRESENT == 0 {
            return Err(TranslateError::NotPresent { va, level });
        }
        writable &= entry & WRITABLE != 0;
        let large = (2..=3).contains(&level) && entry & PAGE_SIZE_BIT != 0;
        if large || level == 1 {
            let page_mask = (1u64 << shift) - 1;
            let pa = PhysAddr((entry & ADDR_MASK & !page_mask) | (va.0 & page_mask));
            return Ok((pa, PageAccess { writable }));
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the level-1 entry always returns")
}

/// Reading virtual memory failed: translation or the physical read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtReadError {
    /// Some page of the range is not mapped.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    /// A mapped page is not guest RAM.
    #[error(transparent)]
    Phys(#[from] PhysReadError),
}

/// Fills `buf` from virtual `va`, page by page (ranges may cross pages that
/// are not physically contiguous).
pub fn read_virt(
    mem: &(impl PhysMemory + ?Sized),
    space: AddressSpace,
    va: VirtAddr,
    buf: &mut [u8],
) -> Result<(), VirtReadError> {
    let mut done = 0usize;
    while done < buf.len() {
        let cur = va.0.wrapping_add(done as u64);
        let in_page = (0x1000 - (cur & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        let pa = translate(mem, space, VirtAddr(cur))?;
        mem.read_phys(pa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny guest: page tables built by hand in a byte vector.
    struct Guest(Vec<u8>);

    impl Guest {
        fn new() -> Self {
            Guest(vec![0u8; 0x40_0000])
        }
        fn set(&mut self, table: u64, index: u64, value: u64) {
            let off = (table + index * 8) as usize;
            self.0[off..off + 8].copy_from_slice(&value.to_le_bytes());
        }
    }

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    fn four_level() -> (Guest, AddressSpace) {
        let mut g = Guest::new();
        let va: u64 = 0xffff_8880_0000_0000;
        g.set(PML4, (va >> 39) & 511, PDPT | 3);
        g.set(PDPT, 0, PD | 3);
        g.set(PD, 0, PT | 3);
        g.set(PT, 0, 0x10_0000 | 3);
        g.set(PT, 1, 0x30_0000 | 3);
        g.set(PD, 1, 0x20_0000 | 3 | PAGE_SIZE_BIT);
        g.set(PDPT, 1, 0x4000_0000 | 3 | PAGE_SIZE_BIT);
        (
            g,
            AddressSpace {
                cr3: PML4,
                levels: PagingLevels::Four,
            },
        )
    }

    #[test]
    fn walks_4k_2m_and_1g_pages() {
        let (g, s) = four_level();
        let base = 0xffff_8880_0000_0000u64;
        assert_eq!(
            translate(&g.0[..], s, VirtAddr(base + 0x123)),
            Ok(PhysAddr(0x10_0123))
        );
        assert_eq!(
            translate(&g.0[..], s, VirtAddr(base + 0x1000)),
            Ok(PhysAddr(0x30_0000))
        );
        assert_eq!(
            translate(&g.0[..], s, VirtAddr(base + 0x20_0000 + 0x1_2345)),
            Ok(PhysAddr(0x21_2345))
        );
        assert_eq!(
            translate(&g.0[..], s, VirtAddr(base + 0x4000_0000 + 0x77)),
            Ok(PhysAddr(0x4000_0077))
        );
    }

    #[test]
    fn missing_entries_and_wild_tables_are_errors() {
        let (mut g, s) = four_level();
        let base = 0xffff_8880_0000_0000u64;
        assert!(matches!(
            translate(&g.0[..], s, VirtAddr(base + 0x2000)),
            Err(TranslateError::NotPresent { level: 1, .. })
        ));
        assert!(matches!(
            translate(&g.0[..], s, VirtAddr(0x1000)),
            Err(TranslateError::NotPresent { level: 4, .. })
        ));
        g.set(PD, 2, 0xdead_0000_0000 | 3);
        assert!(matches!(
            translate(&g.0[..], s, VirtAddr(base + 0x40_0000)),
            Err(TranslateError::TableOutsideRam { .. })
        ));
    }

    #[test]
    fn five_level_walk_uses_pml5() {
        let mut g = Guest::new();
        let pml5 = 0x5000;
        let va: u64 = 0xff11_0000_0000_1000;
        g.set(pml5, (va >> 48) & 511, PML4 | 3);
        g.set(PML4, (va >> 39) & 511, PDPT | 3);
        g.set(PDPT, (va >> 30) & 511, PD | 3);
        g.set(PD, (va >> 21) & 511, PT | 3);
        g.set(PT, (va >> 12) & 511, 0x12_3000 | 3);
        let s = AddressSpace {
            cr3: pml5,
            levels: PagingLevels::from_cr4(CR4_LA57),
        };
        assert_eq!(
            translate(&g.0[..], s, VirtAddr(va + 5)),
            Ok(PhysAddr(0x12_3005))
        );
    }

    #[test]
    fn reads_cross_page_boundaries() {
        let (mut g, s) = four_level();
        g.0[0x10_0ffe..0x10_1000].copy_from_slice(&[1, 2]);
        g.0[0x30_0000..0x30_0002].copy_from_slice(&[3, 4]);
        let mut buf = [0u8; 4];
        read_virt(&g.0[..], s, VirtAddr(0xffff_8880_0000_0ffe), &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
    }

    #[test]
    fn a_read_only_entry_at_any_level_makes_the_page_read_only() {
        let (mut g, s) = four_level();
        let base = 0xffff_8880_0000_0000u64;
        let access = |g: &Guest, va| translate_access(&g.0[..], s, VirtAddr(va)).unwrap().1;
        assert!(access(&g, base).writable);
        g.set(PT, 0, 0x10_0000 | 1); // present, read-only PTE (copy-on-write)
        assert!(!access(&g, base).writable);
        assert!(access(&g, base + 0x1000).writable);
        g.set(PD, 0, PT | 1); // read-only page directory entry
        assert!(!access(&g, base + 0x1000).writable);
        assert!(access(&g, base + 0x20_0000).writable);
    }
}
