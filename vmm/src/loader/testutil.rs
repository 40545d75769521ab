//! Test fixtures: host compressors, a synthetic bzImage and a synthetic ELF.

use std::io::Write;
use std::process::{Command, Stdio};

use super::decompress::Compression;
use super::payload::START_KERNEL_MAP;
use super::relocs::Relocs;

/// Deterministic, moderately compressible bytes (text-like runs and noise).
pub fn synthetic_payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(b"mov %rax, 0x10(%rsp); call startup_64\n");
        }
    }
    out.truncate(len);
    out
}

/// The command line the kernel build uses for `format`, and the Debian
/// package that ships the tool.
fn tool_for(format: Compression) -> (&'static str, &'static [&'static str], &'static str) {
    match format {
        Compression::Gzip => ("gzip", &["-n", "-9", "-c"], "gzip"),
        Compression::Bzip2 => ("bzip2", &["-9", "-c"], "bzip2"),
        Compression::Lzma => ("lzma", &["-9", "-c"], "xz-utils"),
        // scripts/xz_wrap.sh (6.1) on x86.
        Compression::Xz => (
            "xz",
            &["--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"],
            "xz-utils",
        ),
        Compression::Lzo => ("lzop", &["-9", "-c"], "lzop"),
        Compression::Lz4 => ("lz4", &["-l", "-9", "-c"], "lz4"),
        Compression::Zstd => ("zstd", &["-22", "--ultra", "-q", "-c"], "zstd"),
    }
}

/// Compresses `data` with the host tool for `format`; panics (fails the
/// test) naming the Debian package if the tool is missing.
pub fn compress_with_tool(format: Compression, data: &[u8]) -> Vec<u8> {
    let (tool, args, package) = tool_for(format);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{tool}` ({e}): install the Debian package `{package}` (apt-get install -y {package})")
        });
    let mut stdin = child.stdin.take().expect("stdin");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait for compressor");
    writer
        .join()
        .expect("writer thread")
        .expect("write to compressor");
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.starts_with(format.magic()),
        "{tool} output lacks the {format} magic"
    );
    out.stdout
}

/// `stream` followed by `size` as 4 little-endian bytes, as the kernel
/// build's size_append does.
pub fn with_size(stream: &[u8], size: usize) -> Vec<u8> {
    let mut v = stream.to_vec();
    v.extend_from_slice(&(size as u32).to_le_bytes());
    v
}

/// What the kernel build embeds for `format`: the compressed stream, plus
/// the 4-byte size for every format but gzip (whose trailer has it).
pub fn kernel_payload(format: Compression, data: &[u8]) -> Vec<u8> {
    let stream = compress_with_tool(format, data);
    match format {
        Compression::Gzip => stream,
        _ => with_size(&stream, data.len()),
    }
}

/// A minimal bzImage (protocol 2.15) whose payload is `payload`, placed
/// 0x3a0 bytes into the protected-mode code; `setup_sects` is stored as is.
pub fn fake_bzimage(payload: &[u8], setup_sects: u8) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        setup_sects as usize
    };
    let setup_size = (sects + 1) * 512;
    let mut v = vec![0u8; setup_size + 0x3a0];
    v[0..2].copy_from_slice(b"MZ");
    v[0x1f1] = setup_sects;
    v[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    v[0x200] = 0xeb;
    v[0x201] = (0x26c - 0x202) as u8;
    v[0x202..0x206].copy_from_slice(b"HdrS");
    v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    v[0x211] = 0x01; // LOADED_HIGH
    v[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    v[0x234] = 1;
    v[0x236..0x238].copy_from_slice(&0x007fu16.to_le_bytes());
    v[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    v[0x248..0x24c].copy_from_slice(&0x3a0u32.to_le_bytes());
    v[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    v[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    v[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// A synthetic vmlinux with an appended relocation table.
pub struct TestElf {
    /// ELF followed by the relocation table.
    pub bytes: Vec<u8>,
    /// Length of the ELF part.
    pub elf_len: usize,
    /// The relocations encoded after it.
    pub relocs: Relocs,
}

fn put(v: &mut [u8], off: usize, val: &[u8]) {
    v[off..off + val.len()].copy_from_slice(val);
}

/// Writes a program header; `f` is [p_offset, p_vaddr, p_paddr, p_filesz, p_memsz].
fn phdr(v: &mut [u8], at: usize, p_type: u32, f: [u64; 5]) {
    put(v, at, &p_type.to_le_bytes());
    put(v, at + 4, &5u32.to_le_bytes());
    for (i, x) in f.iter().chain(&[0x1000]).enumerate() {
        put(v, at + 8 + 8 * i, &x.to_le_bytes());
    }
}

fn shdr(v: &mut [u8], at: usize, sh_type: u32, off: u64, size: u64) {
    put(v, at + 4, &sh_type.to_le_bytes());
    put(v, at + 24, &off.to_le_bytes());
    put(v, at + 32, &size.to_le_bytes());
}

/// Two PT_LOADs (text at phys 0x1000000, 0x100 bytes; data at 0x1001000,
/// 0x80 file bytes + bss to 0x200), a PVH note, 5 section headers, then a
/// 3-list relocation table. Planted values: u32 0x81000100 at image 0x10,
/// i32 -0x100 at 0x20, u64 0xffffffff81000000 at 0x1008.
pub fn test_elf() -> TestElf {
    let elf_len = 0x2a0 + 5 * 64;
    let mut v = vec![0u8; elf_len];
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &0x100_0000u64.to_le_bytes()); // e_entry
    put(&mut v, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut v, 40, &0x2a0u64.to_le_bytes()); // e_shoff
    put(&mut v, 52, &[64, 0, 56, 0, 3, 0, 64, 0, 5, 0, 0, 0]);
    let text_v = START_KERNEL_MAP + 0x100_0000;
    phdr(&mut v, 64, 1, [0x100, text_v, 0x100_0000, 0x100, 0x100]);
    phdr(
        &mut v,
        64 + 56,
        1,
        [0x200, text_v + 0x1000, 0x100_1000, 0x80, 0x200],
    );
    phdr(&mut v, 64 + 112, 4, [0x280, 0, 0, 24, 24]);
    for i in 0..0x180 {
        v[0x100 + i] = (i as u8).wrapping_mul(7) | 1;
    }
    put(&mut v, 0x100 + 0x10, &0x8100_0100u32.to_le_bytes());
    put(&mut v, 0x100 + 0x20, &(-0x100i32).to_le_bytes());
    put(&mut v, 0x200 + 0x08, &text_v.to_le_bytes());
    // PVH note: "Xen", XEN_ELFNOTE_PHYS32_ENTRY, 8-byte descriptor.
    put(&mut v, 0x280, &[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
    put(&mut v, 0x28c, b"Xen\0");
    put(&mut v, 0x290, &0x100_0040u64.to_le_bytes());
    shdr(&mut v, 0x2a0 + 64, 1, 0x100, 0x100);
    shdr(&mut v, 0x2a0 + 128, 1, 0x200, 0x80);
    shdr(&mut v, 0x2a0 + 192, 8, 0x280, 0x180); // .bss: NOBITS, ignored
    shdr(&mut v, 0x2a0 + 256, 7, 0x280, 24);
    let relocs = Relocs {
        rel32: vec![text_v + 0x10, text_v + 0x30],
        inv32: vec![text_v + 0x20],
        rel64: vec![text_v + 0x1008, text_v + 0x1100],
    };
    v.extend_from_slice(&relocs.to_bytes());
    TestElf {
        bytes: v,
        elf_len,
        relocs,
    }
}
