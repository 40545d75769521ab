//! The decompressed payload: an ELF64 x86-64 `vmlinux` (possibly stripped).
//!
//! [`super::image::build_image`] lays the parsed segments out in memory.
//!
//! This is a small hand-written reader of the ELF header, program headers
//! and section headers (for the end of the file) rather than `object` or
//! `goblin`: only those three fixed-layout tables are needed, the input is
//! untrusted so every offset is checked here anyway, and it adds no
//! dependency. It also reads the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)
//! from PT_NOTE segments, which the VMM uses to boot without the decompressor.

use thiserror::Error;

/// `__START_KERNEL_map`: virtual base of the x86-64 kernel mapping.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const SHT_NOBITS: u32 = 8;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SHDR_SIZE: usize = 64;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a payload is not a usable x86-64 kernel ELF.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PayloadError {
    /// No ELF magic.
    #[error("not an ELF file (first bytes: {first_bytes})")]
    NotElf {
        /// Hex dump of the first bytes.
        first_bytes: String,
    },
    /// A header or table runs past the end of the data.
    #[error("truncated ELF: {what} needs bytes up to offset {need}, but the file has {len}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// End offset it needs.
        need: u64,
        /// Bytes available.
        len: usize,
    },
    /// ELFCLASS32 (or another class).
    #[error(
        "ELF class {0} is not ELFCLASS64: 32-bit kernels are not supported, need an x86-64 vmlinux"
    )]
    Not64Bit(u8),
    /// Big-endian or unknown data encoding.
    #[error("ELF data encoding {0} is not little-endian")]
    NotLittleEndian(u8),
    /// Another architecture.
    #[error("ELF machine {0} is not x86-64 (62)")]
    WrongMachine(u16),
    /// Not ET_EXEC/ET_DYN (e.g. a relocatable object).
    #[error("ELF type {0} is not an executable")]
    WrongType(u16),
    /// A malformed header field.
    #[error("malformed ELF header: {0}")]
    BadHeader(String),
    /// No PT_LOAD with a nonzero size.
    #[error("ELF has no loadable (PT_LOAD) segment")]
    NoLoadSegments,
    /// A PT_LOAD segment is inconsistent.
    #[error("PT_LOAD segment {index}: {why}")]
    BadSegment {
        /// Index among program headers.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The loaded image would exceed the size cap.
    #[error("kernel image spans {size} bytes of physical memory, more than the cap of {max}")]
    ImageTooLarge {
        /// Span of the image.
        size: u64,
        /// The cap.
        max: usize,
    },
}

/// One PT_LOAD program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// Physical load address (p_paddr).
    pub paddr: u64,
    /// Virtual address (p_vaddr).
    pub vaddr: u64,
    /// File offset (p_offset).
    pub offset: u64,
    /// Bytes in the file (p_filesz).
    pub filesz: u64,
    /// Bytes in memory (p_memsz); the rest past filesz is zeroed.
    pub memsz: u64,
    /// Permission flags (p_flags: 1 = X, 2 = W, 4 = R).
    pub flags: u32,
}

/// What the VMM needs from the kernel ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// e_entry (for vmlinux, the physical address of startup_64).
    pub entry: u64,
    /// PVH 32-bit entry (physical) from XEN_ELFNOTE_PHYS32_ENTRY, if present.
    pub pvh_entry: Option<u64>,
    /// PT_LOAD segments with nonzero p_memsz, in header order.
    pub segments: Vec<LoadSegment>,
    /// End of the ELF file proper: the furthest of the headers, the section
    /// header table, non-NOBITS sections and segment file ranges. Whatever
    /// follows it is the relocation table.
    pub elf_end: usize,
}

/// Whether `bytes` starts with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn field<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(field(b, off))
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(field(b, off))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(field(b, off))
}

/// Returns `bytes[off .. off + count * entsize]` or a Truncated error.
pub(super) fn table<'a>(
    bytes: &'a [u8],
    what: &'static str,
    off: u64,
    count: u64,
    entsize: u64,
) -> Result<&'a [u8], PayloadError> {
    let len = bytes.len();
    let end = count.checked_mul(entsize).and_then(|s| s.checked_add(off));
    match end {
        Some(end) if end <= len as u64 => Ok(&bytes[off as usize..end as usize]),
        _ => Err(PayloadError::Truncated {
            what,
            need: end.unwrap_or(u64::MAX),
            len,
        }),
    }
}

/// Parses the ELF header, program headers and section headers.
pub fn parse_elf(bytes: &[u8]) -> Result<ElfInfo, PayloadError> {
    if !is_elf(bytes) {
        return Err(PayloadError::NotElf {
            first_bytes: super::decompress::hex_prefix(bytes),
        });
    }
    let len = bytes.len();
    if len < 6 {
        return Err(PayloadError::Truncated {
            what: "ELF identification",
            need: 6,
            len,
        });
    }
    if bytes[4] != 2 {
        return Err(PayloadError::Not64Bit(bytes[4]));
    }
    if bytes[5] != 1 {
        return Err(PayloadError::NotLittleEndian(bytes[5]));
    }
    let eh = table(bytes, "ELF header", 0, 1, EHDR_SIZE as u64)?;
    let machine = u16_at(eh, 18);
    if machine != EM_X86_64 {
        return Err(PayloadError::WrongMachine(machine));
    }
    let e_type = u16_at(eh, 16);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(PayloadError::WrongType(e_type));
    }
    let (entry, phoff, shoff) = (u64_at(eh, 24), u64_at(eh, 32), u64_at(eh, 40));
    let (phentsize, phnum) = (u16_at(eh, 54), u16_at(eh, 56));
    let (shentsize, mut shnum) = (u16_at(eh, 58), u16_at(eh, 60) as u64);
    if phnum == 0xffff {
        return Err(PayloadError::BadHeader(
            "extended program header numbering (PN_XNUM) not supported".into(),
        ));
    }
    if phnum > 0 && usize::from(phentsize) != PHDR_SIZE {
        return Err(PayloadError::BadHeader(format!(
            "e_phentsize {phentsize}, expected {PHDR_SIZE}"
        )));
    }
    let phdrs = table(
        bytes,
        "program header table",
        phoff,
        phnum.into(),
        PHDR_SIZE as u64,
    )?;
    let mut elf_end = EHDR_SIZE as u64;
    if phnum > 0 {
        elf_end = elf_end.max(phoff + phnum as u64 * PHDR_SIZE as u64);
    }
    if shoff != 0 {
        if usize::from(shentsize) != SHDR_SIZE {
            return Err(PayloadError::BadHeader(format!(
                "e_shentsize {shentsize}, expected {SHDR_SIZE}"
            )));
        }
        if shnum == 0 {
            // Extended numbering: the count is in section 0's sh_size.
            shnum = u64_at(
                table(bytes, "section header 0", shoff, 1, SHDR_SIZE as u64)?,
                32,
            );
        }
        let shdrs = table(
            bytes,
            "section header table",
            shoff,
            shnum,
            SHDR_SIZE as u64,
        )?;
        elf_end = elf_end.max(shoff + shnum * SHDR_SIZE as u64);
        for sh in shdrs.chunks_exact(SHDR_SIZE) {
            if u32_at(sh, 4) != SHT_NOBITS && u32_at(sh, 4) != 0 {
                let (off, size) = (u64_at(sh, 24), u64_at(sh, 32));
                elf_end =
                    elf_end.max(table(bytes, "section contents", off, 1, size)?.len() as u64 + off);
            }
        }
    }
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for (index, ph) in phdrs.chunks_exact(PHDR_SIZE).enumerate() {
        let p_type = u32_at(ph, 0);
        let seg = LoadSegment {
            flags: u32_at(ph, 4),
            offset: u64_at(ph, 8),
            vaddr: u64_at(ph, 16),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        let bad = |why: String| PayloadError::BadSegment { index, why };
        let file = table(bytes, "segment contents", seg.offset, 1, seg.filesz).map_err(|_| {
            bad(format!(
                "file range {:#x}+{:#x} past the {len}-byte file",
                seg.offset, seg.filesz
            ))
        })?;
        elf_end = elf_end.max(seg.offset + seg.filesz);
        if p_type == PT_NOTE {
            pvh_entry = pvh_entry.or(find_pvh_note(file));
            continue;
        }
        if seg.filesz > seg.memsz {
            return Err(bad(format!(
                "p_filesz {:#x} > p_memsz {:#x}",
                seg.filesz, seg.memsz
            )));
        }
        if seg.paddr.checked_add(seg.memsz).is_none() || seg.vaddr.checked_add(seg.memsz).is_none()
        {
            return Err(bad("address + p_memsz overflows".into()));
        }
        if seg.memsz > 0 {
            segments.push(seg);
        }
    }
    if segments.is_empty() {
        return Err(PayloadError::NoLoadSegments);
    }
    Ok(ElfInfo {
        entry,
        pvh_entry,
        segments,
        elf_end: elf_end as usize,
    })
}

/// Finds XEN_ELFNOTE_PHYS32_ENTRY ("Xen", type 18) in a note segment.
fn find_pvh_note(mut notes: &[u8]) -> Option<u64> {
    let pad = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let (namesz, descsz, ntype) = (
            u32_at(notes, 0) as usize,
            u32_at(notes, 4) as usize,
            u32_at(notes, 8),
        );
        let desc_off = pad(namesz)?.checked_add(12)?;
        let next = pad(descsz)?.checked_add(desc_off)?;
        let name = notes.get(12..12 + namesz)?;
        let desc = notes.get(desc_off..desc_off.checked_add(descsz)?)?;
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            return match descsz {
                4 => Some(u32_at(desc, 0).into()),
                8 => Some(u64_at(desc, 0)),
                _ => None,
            };
        }
        notes = notes.get(next..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{test_elf, TestElf};
    use super::*;

    #[test]
    fn parses_two_segment_elf() {
        let TestElf { bytes, elf_len, .. } = test_elf();
        let info = parse_elf(&bytes).unwrap();
        assert_eq!(info.entry, 0x100_0000);
        assert_eq!(info.pvh_entry, Some(0x100_0040));
        assert_eq!(info.elf_end, elf_len);
        assert_eq!(info.segments.len(), 2);
        let (a, b) = (info.segments[0], info.segments[1]);
        assert_eq!(
            (a.paddr, a.vaddr, a.filesz, a.memsz),
            (0x100_0000, 0xffff_ffff_8100_0000, 0x100, 0x100)
        );
        assert_eq!(
            (b.paddr, b.vaddr, b.filesz, b.memsz),
            (0x100_1000, 0xffff_ffff_8100_1000, 0x80, 0x200)
        );
    }

    #[test]
    fn rejects_bad_elves() {
        let TestElf { bytes, elf_len, .. } = test_elf();
        let patch = |off: usize, val: &[u8]| {
            let mut v = bytes.clone();
            v[off..off + val.len()].copy_from_slice(val);
            parse_elf(&v)
        };
        assert_eq!(patch(4, &[1]), Err(PayloadError::Not64Bit(1)));
        assert_eq!(patch(5, &[2]), Err(PayloadError::NotLittleEndian(2)));
        assert_eq!(patch(18, &[3, 0]), Err(PayloadError::WrongMachine(3)));
        assert_eq!(patch(16, &[1, 0]), Err(PayloadError::WrongType(1)));
        assert!(matches!(
            patch(54, &[32, 0]),
            Err(PayloadError::BadHeader(_))
        ));
        assert!(matches!(
            patch(32, &[0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(PayloadError::Truncated { .. })
        ));
        // p_filesz of the first phdr (at 64) made huge, then larger than memsz.
        assert!(matches!(
            patch(64 + 32, &[0xff; 8]),
            Err(PayloadError::BadSegment { index: 0, .. })
        ));
        assert!(matches!(
            patch(64 + 32, &[0x00, 0x02]),
            Err(PayloadError::BadSegment { index: 0, .. })
        ));
        // Turn both PT_LOADs into PT_NULL.
        let mut v = bytes.clone();
        v[64] = 0;
        v[64 + PHDR_SIZE] = 0;
        assert_eq!(parse_elf(&v), Err(PayloadError::NoLoadSegments));
        assert!(matches!(
            parse_elf(b"MZ\x90\x00"),
            Err(PayloadError::NotElf { .. })
        ));
        for cut in 0..elf_len {
            assert!(
                parse_elf(&bytes[..cut]).is_err(),
                "accepted ELF cut to {cut} bytes"
            );
        }
    }

    #[test]
    fn note_parser_handles_garbage() {
        assert_eq!(find_pvh_note(&[0xff; 40]), None);
        assert_eq!(find_pvh_note(&[]), None);
        let mut n = vec![4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0];
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&0x1234u32.to_le_bytes());
        assert_eq!(find_pvh_note(&n), Some(0x1234));
        assert_eq!(find_pvh_note(&n[..n.len() - 1]), None);
    }
}
