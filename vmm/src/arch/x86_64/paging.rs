//! The identity-mapped page tables a vCPU starts with in long mode.
//!
//! The 64-bit boot protocol needs the kernel, `boot_params` and the command
//! line identity mapped; we map the first [`IDENTITY_MAP_GIB`] GiB with
//! 2 MiB pages. The kernel replaces these tables early in `startup_64`.

use super::layout::{IDENTITY_MAP_GIB, PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The page tables as `(guest-physical address, bytes)` chunks to write.
pub fn identity_map_tables() -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPTE_START | PRESENT_RW).to_le_bytes());
    out.push((PML4_START, pml4));
    let mut pdpt = vec![0u8; 4096];
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 4096;
        let off = (gib * 8) as usize;
        pdpt[off..off + 8].copy_from_slice(&(pd | PRESENT_RW).to_le_bytes());
        let mut pde = vec![0u8; 4096];
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            let off = (i * 8) as usize;
            pde[off..off + 8].copy_from_slice(&(phys | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        out.push((pd, pde));
    }
    out.push((PDPTE_START, pdpt));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables the way the MMU would, for an identity check.
    fn translate(tables: &[(u64, Vec<u8>)], va: u64) -> Option<u64> {
        let read = |base: u64, idx: u64| -> u64 {
            let (_, t) = tables.iter().find(|(a, _)| *a == base).unwrap();
            u64::from_le_bytes(
                t[(idx * 8) as usize..(idx * 8 + 8) as usize]
                    .try_into()
                    .unwrap(),
            )
        };
        let e4 = read(PML4_START, (va >> 39) & 511);
        if e4 & 1 == 0 {
            return None;
        }
        let e3 = read(e4 & !0xfff, (va >> 30) & 511);
        if e3 & 1 == 0 {
            return None;
        }
        let e2 = read(e3 & !0xfff, (va >> 21) & 511);
        if e2 & 1 == 0 {
            return None;
        }
        assert!(e2 & PAGE_SIZE_2M != 0);
        Some((e2 & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_identity_up_to_4gib() {
        let t = identity_map_tables();
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, 0xffff_ffff] {
            assert_eq!(translate(&t, va), Some(va));
        }
        assert_eq!(translate(&t, 0x1_0000_0000), None);
    }
}
