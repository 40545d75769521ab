//! The Linux `boot_params` structure ("zero page") and the e820 memory map.
//!
//! Offsets are those of `arch/x86/include/uapi/asm/bootparam.h` and
//! Documentation/x86/zero-page.rst. The page is built as bytes so it can be
//! checked without a VM.

use super::layout::{EBDA_END, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START, MPTABLE_START};

/// Size of `struct boot_params`.
pub const BOOT_PARAMS_SIZE: usize = 4096;
const E820_ENTRIES_OFF: usize = 0x1e8;
const E820_TABLE_OFF: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const HDR_OFF: usize = 0x1f1;
const EXT_RAMDISK_IMAGE_OFF: usize = 0x0c0;
const EXT_RAMDISK_SIZE_OFF: usize = 0x0c4;
const EXT_CMD_LINE_PTR_OFF: usize = 0x0c8;
const BOOT_FLAG_OFF: usize = 0x1fe;
const HEADER_MAGIC_OFF: usize = 0x202;
const VERSION_OFF: usize = 0x206;
const TYPE_OF_LOADER_OFF: usize = 0x210;
const LOADFLAGS_OFF: usize = 0x211;
const RAMDISK_IMAGE_OFF: usize = 0x218;
const RAMDISK_SIZE_OFF: usize = 0x21c;
const CMD_LINE_PTR_OFF: usize = 0x228;
const KERNEL_ALIGNMENT_OFF: usize = 0x230;
const CMDLINE_SIZE_OFF: usize = 0x238;

/// `loadflags`: the protected-mode kernel is loaded at 0x100000 or above.
pub const LOADED_HIGH: u8 = 0x01;
/// `loadflags`: the boot loader randomized the kernel's placement (KASLR).
pub const KASLR_FLAG: u8 = 0x02;
/// `loadflags`: do not reload segment registers in the 32-bit entry.
pub const KEEP_SEGMENTS: u8 = 0x40;

/// e820 range types the VMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (not RAM for the kernel).
    Reserved = 2,
}

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte of the range.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The RAM ranges backing `mem_size` bytes of guest memory: everything below
/// the 32-bit MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// The e820 map the guest sees for `mem_size` bytes of RAM: low memory up to
/// the MP table, a reserved MP table, and RAM from 1 MiB on.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: MPTABLE_START,
            size: EBDA_END - MPTABLE_START,
            kind: E820Type::Reserved,
        },
    ];
    for (start, size) in ram_ranges(mem_size) {
        let start_hi = start.max(HIMEM_START);
        let end = start + size;
        if end > start_hi {
            map.push(E820Entry {
                addr: start_hi,
                size: end - start_hi,
                kind: E820Type::Ram,
            });
        }
    }
    map
}

/// What the kernel needs to find in `boot_params`.
#[derive(Debug, Clone, Default)]
pub struct BootParamsConfig<'a> {
    /// The image's own setup header bytes (from offset 0x1f1), if it has one.
    pub setup_header: Option<&'a [u8]>,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Guest-physical address and size of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Whether the VMM randomized the kernel's placement.
    pub kaslr: bool,
    /// The e820 map.
    pub e820: Vec<E820Entry>,
}

fn put_u32(page: &mut [u8], off: usize, v: u32) {
    page[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Builds the zero page. An image without a setup header (a plain ELF
/// vmlinux) gets a minimal header that announces boot protocol 2.15.
pub fn build_boot_params(cfg: &BootParamsConfig<'_>) -> Vec<u8> {
    let mut page = vec![0u8; BOOT_PARAMS_SIZE];
    match cfg.setup_header {
        Some(hdr) => {
            let n = hdr.len().min(BOOT_PARAMS_SIZE - HDR_OFF);
            page[HDR_OFF..HDR_OFF + n].copy_from_slice(&hdr[..n]);
        }
        None => {
            page[BOOT_FLAG_OFF..BOOT_FLAG_OFF + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
            page[HEADER_MAGIC_OFF..HEADER_MAGIC_OFF + 4].copy_from_slice(b"HdrS");
            page[VERSION_OFF..VERSION_OFF + 2].copy_from_slice(&0x020fu16.to_le_bytes());
            put_u32(&mut page, KERNEL_ALIGNMENT_OFF, 0x20_0000);
            put_u32(&mut page, CMDLINE_SIZE_OFF, 2047);
        }
    }
    page[TYPE_OF_LOADER_OFF] = 0xff; // "undefined" boot loader
    page[LOADFLAGS_OFF] |= LOADED_HIGH | KEEP_SEGMENTS;
    if cfg.kaslr {
        page[LOADFLAGS_OFF] |= KASLR_FLAG;
    } else {
        page[LOADFLAGS_OFF] &= !KASLR_FLAG;
    }
    put_u32(&mut page, CMD_LINE_PTR_OFF, cfg.cmdline_addr as u32);
    put_u32(
        &mut page,
        EXT_CMD_LINE_PTR_OFF,
        (cfg.cmdline_addr >> 32) as u32,
    );
    if let Some((addr, size)) = cfg.initrd {
        put_u32(&mut page, RAMDISK_IMAGE_OFF, addr as u32);
        put_u32(&mut page, RAMDISK_SIZE_OFF, size as u32);
        put_u32(&mut page, EXT_RAMDISK_IMAGE_OFF, (addr >> 32) as u32);
        put_u32(&mut page, EXT_RAMDISK_SIZE_OFF, (size >> 32) as u32);
    }
    let n = cfg.e820.len().min(E820_MAX_ENTRIES);
    page[E820_ENTRIES_OFF] = n as u8;
    for (i, e) in cfg.e820.iter().take(n).enumerate() {
        let off = E820_TABLE_OFF + i * 20;
        page[off..off + 8].copy_from_slice(&e.addr.to_le_bytes());
        page[off + 8..off + 16].copy_from_slice(&e.size.to_le_bytes());
        put_u32(&mut page, off + 16, e.kind as u32);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_high_ram_range() {
        let m = e820_map(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820Type::Ram
            }
        );
        assert_eq!(m[1].kind, E820Type::Reserved);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let m = e820_map(4 << 30);
        let last = m.last().unwrap();
        assert_eq!(last.addr, MMIO_HOLE_END);
        assert_eq!(last.size, (4u64 << 30) - MMIO_HOLE_START);
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn zero_page_fields_land_at_documented_offsets() {
        let p = build_boot_params(&BootParamsConfig {
            setup_header: None,
            cmdline_addr: 0x20000,
            initrd: Some((0x7000_0000, 0x1234)),
            kaslr: true,
            e820: e820_map(128 << 20),
        });
        assert_eq!(&p[0x202..0x206], b"HdrS");
        assert_eq!(
            u32::from_le_bytes(p[0x228..0x22c].try_into().unwrap()),
            0x20000
        );
        assert_eq!(
            u32::from_le_bytes(p[0x218..0x21c].try_into().unwrap()),
            0x7000_0000
        );
        assert_eq!(
            u32::from_le_bytes(p[0x21c..0x220].try_into().unwrap()),
            0x1234
        );
        assert_eq!(p[0x211] & KASLR_FLAG, KASLR_FLAG);
        assert_eq!(p[0x1e8], 3);
        assert_eq!(
            u32::from_le_bytes(p[0x2d0 + 16..0x2d0 + 20].try_into().unwrap()),
            1
        );
    }

    #[test]
    fn image_header_is_copied_and_kaslr_flag_cleared() {
        let mut hdr = vec![0u8; 0x80];
        hdr[0x211 - 0x1f1] = KASLR_FLAG;
        hdr[0x202 - 0x1f1..0x206 - 0x1f1].copy_from_slice(b"HdrS");
        let p = build_boot_params(&BootParamsConfig {
            setup_header: Some(&hdr),
            ..Default::default()
        });
        assert_eq!(&p[0x202..0x206], b"HdrS");
        assert_eq!(p[0x211] & KASLR_FLAG, 0);
        assert_eq!(p[0x210], 0xff);
    }
}
