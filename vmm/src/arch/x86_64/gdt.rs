//! The boot GDT: the selectors the 64-bit boot protocol requires.
//!
//! Documentation/x86/boot.rst: CS must be `__BOOT_CS` (0x10) and DS/ES/SS
//! `__BOOT_DS` (0x18), both 4 GiB flat segments.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the (unused but loaded) task state segment.
pub const BOOT_TSS: u16 = 0x20;

/// Builds one 8-byte GDT descriptor from its flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code64, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, 4 KiB granular
    gdt_entry(0x808b, 0, 0xfffff), // TSS: busy 64-bit TSS
];

/// Expands a GDT descriptor into the segment register form KVM wants.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let mut limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    if granularity == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode_ring0() {
        let s = kvm_segment_from_gdt(BOOT_GDT[2], BOOT_CS);
        assert_eq!((s.l, s.db, s.dpl, s.present, s.s), (1, 0, 0, 1, 1));
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segment_is_flat_writable() {
        let s = kvm_segment_from_gdt(BOOT_GDT[3], BOOT_DS);
        assert_eq!((s.db, s.g, s.type_, s.base), (1, 1, 3, 0));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x008b, 0x1234_5678, 0x6_7890); // byte granular
        let s = kvm_segment_from_gdt(e, 0x20);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x6_7890);
        assert_eq!(s.unusable, 0);
    }
}
