//! The kernel-file loader (vmm's `loader`): what a user's malformed kernel
//! file reaches. The input is the file; the target runs
//! [`load_kernel_image`] (content detection, bzImage header, the seven
//! decompressors, ELF, relocation table, image layout), then relocates the
//! result by a KASLR offset taken from the input, runs [`kernel_elf`] (the
//! symbol-recovery path) on small inputs, and [`decompress`] on the input
//! as a bare compressed stream.

use std::io::Write;

use vmm::loader::decompress::decompress;
use vmm::loader::{kernel_elf, load_kernel_image, Compression, Relocs, START_KERNEL_MAP};

/// Cap on decompressed payload and image size: well above the minimal
/// kernel and small enough that a bomb costs little.
pub const MAX_SIZE: usize = 64 << 20;

/// Loads `data` as a kernel file; only a panic or a hang is a failure.
pub fn load(data: &[u8]) {
    if let Ok(mut k) = load_kernel_image(data, MAX_SIZE) {
        // A 2 MiB multiple in [-256, 254] MiB, or an odd one when the byte is odd.
        let b = i64::from(data[data.len() - 1]);
        let delta = ((b - 128) << 21) | (b & 1) << 12;
        let _ = k.apply_kaslr(delta);
        let _ = k.phys_end();
    }
    if data.len() < (1 << 20) {
        let _ = kernel_elf(data, MAX_SIZE);
    }
    let _ = decompress(data, MAX_SIZE);
}

/// Physical load address of the synthetic kernel's text.
const PHYS: u64 = 0x100_0000;

fn put(v: &mut [u8], at: usize, bytes: &[u8]) {
    v[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A small x86-64 kernel ELF as the kernel build makes it, followed by its
/// relocation table: text and data PT_LOADs (data with bss), a PVH entry
/// note, section headers, and one relocation of each kind.
pub fn synthetic_vmlinux() -> Vec<u8> {
    // Layout: ELF header, 3 program headers, text at 0x100 (0x200 bytes),
    // data at 0x300 (0x100 bytes, 0x800 in memory), note at 0x400,
    // 4 section headers at 0x420.
    let mut v = vec![0u8; 0x420 + 4 * 64];
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &PHYS.to_le_bytes()); // e_entry
    put(&mut v, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut v, 40, &0x420u64.to_le_bytes()); // e_shoff
    put(&mut v, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut v, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut v, 56, &3u16.to_le_bytes()); // e_phnum
    put(&mut v, 58, &64u16.to_le_bytes()); // e_shentsize
    put(&mut v, 60, &4u16.to_le_bytes()); // e_shnum
    let text = START_KERNEL_MAP + PHYS;
    // (type, flags, offset, vaddr, paddr, filesz, memsz)
    let phdrs: [(u32, u32, u64, u64, u64, u64, u64); 3] = [
        (1, 5, 0x100, text, PHYS, 0x200, 0x200),
        (1, 6, 0x300, text + 0x1000, PHYS + 0x1000, 0x100, 0x800),
        (4, 4, 0x400, 0, 0, 24, 24),
    ];
    for (i, (ty, fl, off, va, pa, fs, ms)) in phdrs.into_iter().enumerate() {
        let at = 64 + i * 56;
        put(&mut v, at, &ty.to_le_bytes());
        put(&mut v, at + 4, &fl.to_le_bytes());
        for (k, x) in [off, va, pa, fs, ms, 0x1000].into_iter().enumerate() {
            put(&mut v, at + 8 + 8 * k, &x.to_le_bytes());
        }
    }
    for (i, b) in v[0x100..0x400].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) ^ 0x5a;
    }
    put(&mut v, 0x110, &((text + 0x40) as u32).to_le_bytes());
    put(&mut v, 0x120, &(-0x80i32).to_le_bytes());
    put(&mut v, 0x308, &(text + 0x10).to_le_bytes());
    // Xen PVH note: namesz 4, descsz 8, type 18 (PHYS32_ENTRY), "Xen".
    put(&mut v, 0x400, &[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
    put(&mut v, 0x40c, b"Xen\0");
    put(&mut v, 0x410, &(PHYS + 0x20).to_le_bytes());
    // Section headers: null, .text, .data, .bss (NOBITS).
    for (i, (ty, off, size)) in [
        (1u32, 0x100u64, 0x200u64),
        (1, 0x300, 0x100),
        (8, 0x400, 0x700),
    ]
    .into_iter()
    .enumerate()
    {
        let at = 0x420 + (i + 1) * 64;
        put(&mut v, at + 4, &ty.to_le_bytes());
        put(&mut v, at + 24, &off.to_le_bytes());
        put(&mut v, at + 32, &size.to_le_bytes());
    }
    let relocs = Relocs {
        rel32: vec![text + 0x10, text + 0x30],
        inv32: vec![text + 0x20],
        rel64: vec![text + 0x1008],
    };
    v.extend_from_slice(&relocs.to_bytes());
    v
}

/// A bzImage (boot protocol 2.15, 64-bit entry, relocatable) around
/// `payload`, placed right after the setup sectors.
pub fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let setup_len = (usize::from(setup_sects) + 1) * 512;
    let mut v = vec![0u8; setup_len];
    put(&mut v, 0, b"MZ");
    v[0x1f1] = setup_sects;
    put(&mut v, 0x1fe, &[0x55, 0xaa]);
    v[0x200] = 0xeb; // jump over the header
    v[0x201] = (0x26c - 0x202) as u8; // header end
    put(&mut v, 0x202, b"HdrS");
    put(&mut v, 0x206, &0x020fu16.to_le_bytes());
    v[0x211] = 0x01; // LOADED_HIGH
    put(&mut v, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    v[0x234] = 1; // relocatable
    put(&mut v, 0x236, &0x7fu16.to_le_bytes()); // xloadflags
    put(&mut v, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut v, 0x248, &0u32.to_le_bytes()); // payload_offset
    put(&mut v, 0x24c, &(payload.len() as u32).to_le_bytes());
    put(&mut v, 0x258, &PHYS.to_le_bytes()); // pref_address
    put(&mut v, 0x260, &0x40_0000u32.to_le_bytes()); // init_size
    v.extend_from_slice(payload);
    v
}

/// `data` compressed as the kernel build does for `format`: the stream,
/// then (except after gzip) the uncompressed size as a 4-byte LE number.
pub fn kernel_payload(format: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = match format {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).expect("gzip");
            return e.finish().expect("gzip");
        }
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
            e.write_all(data).expect("bzip2");
            e.finish().expect("bzip2")
        }
        Compression::Lzma => {
            let opts = xz2::stream::LzmaOptions::new_preset(6).expect("lzma preset");
            let stream = xz2::stream::Stream::new_lzma_encoder(&opts).expect("lzma");
            let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
            e.write_all(data).expect("lzma");
            e.finish().expect("lzma")
        }
        Compression::Xz => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).expect("xz");
            e.finish().expect("xz")
        }
        Compression::Zstd => zstd::encode_all(data, 19).expect("zstd"),
        Compression::Lz4 => {
            let block = lz4_flex::block::compress(data);
            let mut v = 0x184c_2102u32.to_le_bytes().to_vec();
            v.extend_from_slice(&(block.len() as u32).to_le_bytes());
            v.extend_from_slice(&block);
            v
        }
        Compression::Lzo => lzop(data),
    };
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// An lzop file (format 0x1040, method LZO1X-1, adler32 of the data) of
/// one block holding `data`.
fn lzop(data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
    let mut header = Vec::new();
    header.extend_from_slice(&0x1040u16.to_be_bytes()); // format version
    header.extend_from_slice(&0x2080u16.to_be_bytes()); // library version
    header.extend_from_slice(&0x0940u16.to_be_bytes()); // needed to extract
    header.extend_from_slice(&[1, 5]); // method LZO1X-1, level
    header.extend_from_slice(&1u32.to_be_bytes()); // F_ADLER32_D
    header.extend_from_slice(&0o100644u32.to_be_bytes()); // mode
    header.extend_from_slice(&[0; 8]); // mtime low, high
    header.push(0); // no file name
    v.extend_from_slice(&header);
    v.extend_from_slice(&adler32(&header).to_be_bytes());
    let packed = lzo1x::compress(data, lzo1x::CompressLevel::default());
    let block = if packed.len() < data.len() {
        &packed[..]
    } else {
        data
    };
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(&(block.len() as u32).to_be_bytes());
    v.extend_from_slice(&adler32(data).to_be_bytes());
    v.extend_from_slice(block);
    v.extend_from_slice(&0u32.to_be_bytes()); // end of blocks
    v
}

/// Adler-32 as lzop stores it.
fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// The synthetic kernel as a plain ELF and as a bzImage in each of the
/// seven compression formats (the real bzImage is added by the caller).
pub fn synthetic_seeds() -> Vec<Vec<u8>> {
    let elf = synthetic_vmlinux();
    let mut seeds = vec![elf.clone()];
    seeds.extend(
        Compression::ALL
            .into_iter()
            .map(|c| bzimage(&kernel_payload(c, &elf))),
    );
    seeds
}
