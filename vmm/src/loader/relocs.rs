//! The x86-64 kernel relocation table appended to `vmlinux.bin` (made by
//! arch/x86/tools/relocs, consumed by arch/x86/boot/compressed/misc.c), and
//! applying it for a KASLR virtual offset on the host.
//!
//! Layout, as u32 little-endian words after the ELF: `0, rel64..., 0,
//! inv32..., 0, rel32...` up to the end of the buffer, so it is read
//! backwards from the end. Each word is a kernel virtual address truncated
//! to 32 bits and sign-extended back. Kernels whose relocs tool no longer
//! emits the inverse-32 list (`0, rel64..., 0, rel32...`) are recognised
//! because the second terminator then sits right at the end of the ELF.

use thiserror::Error;

use super::payload::START_KERNEL_MAP;

/// Why a relocation table is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RelocError {
    /// The table ends (reaching the ELF) before a list's 0 terminator.
    #[error("relocation table after the ELF ({len} bytes) ends before the 0 terminator of the {list} list")]
    Unterminated {
        /// Which list lacked its terminator.
        list: &'static str,
        /// Bytes between the ELF end and the end of the buffer.
        len: usize,
    },
    /// The ELF end lies past the buffer.
    #[error("ELF end {elf_end} is past the end of the {len}-byte payload")]
    BadElfEnd {
        /// Claimed ELF end.
        elf_end: usize,
        /// Buffer length.
        len: usize,
    },
    /// A relocation points outside the loaded image.
    #[error("{kind} relocation at {addr:#x} lies outside the kernel image (phys {start:#x}, {len} bytes)")]
    OutOfImage {
        /// "32-bit", "inverse 32-bit" or "64-bit".
        kind: &'static str,
        /// The relocation's virtual address.
        addr: u64,
        /// Physical start of the image.
        start: u64,
        /// Image length.
        len: usize,
    },
}

/// The three relocation lists, as sign-extended kernel virtual addresses,
/// each in table order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relocs {
    /// 32-bit absolute relocations: `u32 += delta`.
    pub rel32: Vec<u64>,
    /// Inverse 32-bit relocations: `i32 -= delta`.
    pub inv32: Vec<u64>,
    /// 64-bit absolute relocations: `u64 += delta`.
    pub rel64: Vec<u64>,
}

impl Relocs {
    /// Total number of relocation entries.
    pub fn len(&self) -> usize {
        self.rel32.len() + self.inv32.len() + self.rel64.len()
    }

    /// Whether all three lists are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serialises in the kernel's 3-list format (what follows the ELF).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut words = vec![0u32];
        words.extend(self.rel64.iter().map(|&a| a as u32));
        words.push(0);
        words.extend(self.inv32.iter().map(|&a| a as u32));
        words.push(0);
        words.extend(self.rel32.iter().map(|&a| a as u32));
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

fn sign_extend(word: u32) -> u64 {
    word as i32 as i64 as u64
}

/// Parses the relocation table in `buf[elf_end..]`, reading backwards from
/// the end of `buf`; `Ok(None)` if nothing follows the ELF.
pub fn parse_relocs(buf: &[u8], elf_end: usize) -> Result<Option<Relocs>, RelocError> {
    if elf_end > buf.len() {
        return Err(RelocError::BadElfEnd {
            elf_end,
            len: buf.len(),
        });
    }
    if buf.len() == elf_end {
        return Ok(None);
    }
    // Cursor: the end of the next word to read, moving backwards.
    let mut end = buf.len();
    let mut rel32 = read_list(buf, elf_end, &mut end, "32-bit")?;
    let second = read_list(buf, elf_end, &mut end, "inverse 32-bit")?;
    let mut relocs = if end == elf_end {
        // Two-list format: the second list was the 64-bit one.
        Relocs {
            rel32: Vec::new(),
            inv32: Vec::new(),
            rel64: second,
        }
    } else {
        let rel64 = read_list(buf, elf_end, &mut end, "64-bit")?;
        Relocs {
            rel32: Vec::new(),
            inv32: second,
            rel64,
        }
    };
    let leftover = end - elf_end;
    if leftover != 0 {
        log::warn!("{leftover} unexplained bytes between the ELF end and the relocation table");
    }
    // Lists were collected backwards; restore table order.
    rel32.reverse();
    relocs.inv32.reverse();
    relocs.rel64.reverse();
    relocs.rel32 = rel32;
    Ok(Some(relocs))
}

/// Reads words backwards from `*end` until a 0 word; never below `elf_end`.
fn read_list(
    buf: &[u8],
    elf_end: usize,
    end: &mut usize,
    list: &'static str,
) -> Result<Vec<u64>, RelocError> {
    let mut out = Vec::new();
    loop {
        if *end < elf_end + 4 {
            return Err(RelocError::Unterminated {
                list,
                len: buf.len() - elf_end,
            });
        }
        let e = *end;
        let word = u32::from_le_bytes([buf[e - 4], buf[e - 3], buf[e - 2], buf[e - 1]]);
        *end -= 4;
        if word == 0 {
            return Ok(out);
        }
        out.push(sign_extend(word));
    }
}

/// Byte offset in an image of relocation `addr` of `width` bytes, if inside.
fn location(addr: u64, image_phys_start: u64, width: usize, image_len: usize) -> Option<usize> {
    let off = addr
        .checked_sub(START_KERNEL_MAP)?
        .checked_sub(image_phys_start)?;
    let off = usize::try_from(off).ok()?;
    (off.checked_add(width)? <= image_len).then_some(off)
}

/// Applies `relocs` for a kernel whose virtual base moves by `virt_delta`
/// bytes. `image` is the kernel loaded contiguously from physical address
/// `image_phys_start` (see [`super::image::build_image`]); relocation `a`
/// lives at `a - START_KERNEL_MAP - image_phys_start`. Every location is
/// checked first, so on error `image` is unchanged.
pub fn apply_kaslr(
    image: &mut [u8],
    image_phys_start: u64,
    relocs: &Relocs,
    virt_delta: i64,
) -> Result<(), RelocError> {
    let lists: [(&'static str, &[u64], usize); 3] = [
        ("32-bit", &relocs.rel32, 4),
        ("inverse 32-bit", &relocs.inv32, 4),
        ("64-bit", &relocs.rel64, 8),
    ];
    for (kind, list, width) in lists {
        for &addr in list {
            if location(addr, image_phys_start, width, image.len()).is_none() {
                return Err(RelocError::OutOfImage {
                    kind,
                    addr,
                    start: image_phys_start,
                    len: image.len(),
                });
            }
        }
    }
    let delta = virt_delta as u64;
    let at = |addr| location(addr, image_phys_start, 8, usize::MAX).unwrap_or(0);
    for &addr in &relocs.rel32 {
        let o = at(addr);
        let v = u32::from_le_bytes([image[o], image[o + 1], image[o + 2], image[o + 3]]);
        image[o..o + 4].copy_from_slice(&v.wrapping_add(delta as u32).to_le_bytes());
    }
    for &addr in &relocs.inv32 {
        let o = at(addr);
        let v = i32::from_le_bytes([image[o], image[o + 1], image[o + 2], image[o + 3]]);
        image[o..o + 4].copy_from_slice(&v.wrapping_sub(delta as i32).to_le_bytes());
    }
    for &addr in &relocs.rel64 {
        let o = at(addr);
        let mut b = [0u8; 8];
        b.copy_from_slice(&image[o..o + 8]);
        image[o..o + 8].copy_from_slice(&u64::from_le_bytes(b).wrapping_add(delta).to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::image::build_image;
    use super::super::payload::parse_elf;
    use super::super::testutil::{test_elf, TestElf};
    use super::*;

    #[test]
    fn parses_appended_table() {
        let TestElf {
            bytes,
            elf_len,
            relocs,
        } = test_elf();
        assert_eq!(parse_relocs(&bytes, elf_len).unwrap(), Some(relocs.clone()));
        assert_eq!(parse_relocs(&bytes[..elf_len], elf_len).unwrap(), None);
        assert_eq!(relocs.len(), 5);
        // Two-list (newer kernel) format: 0, rel64..., 0, rel32...
        let mut two = bytes[..elf_len].to_vec();
        for w in [0u32, 0x8100_1008, 0, 0x8100_0010] {
            two.extend_from_slice(&w.to_le_bytes());
        }
        let r = parse_relocs(&two, elf_len).unwrap().unwrap();
        assert_eq!(
            (r.rel32, r.inv32, r.rel64),
            (
                vec![0xffff_ffff_8100_0010],
                vec![],
                vec![0xffff_ffff_8100_1008]
            )
        );
    }

    #[test]
    fn unterminated_tables_are_errors() {
        let TestElf { bytes, elf_len, .. } = test_elf();
        // Drop the leading terminator of the 64-bit list.
        let mut v = bytes[..elf_len].to_vec();
        v.extend_from_slice(&bytes[elf_len + 4..]);
        assert!(matches!(
            parse_relocs(&v, elf_len),
            Err(RelocError::Unterminated { list: "64-bit", .. })
        ));
        let mut v = bytes[..elf_len].to_vec();
        v.extend_from_slice(&0x8100_0010u32.to_le_bytes());
        assert!(matches!(
            parse_relocs(&v, elf_len),
            Err(RelocError::Unterminated { list: "32-bit", .. })
        ));
        assert!(matches!(
            parse_relocs(&v, v.len() + 1),
            Err(RelocError::BadElfEnd { .. })
        ));
    }

    #[test]
    fn apply_kaslr_changes_exactly_the_right_bytes() {
        let TestElf {
            bytes,
            elf_len,
            relocs,
        } = test_elf();
        let info = parse_elf(&bytes).unwrap();
        let orig = build_image(&bytes[..elf_len], &info, 1 << 20).unwrap();
        let delta: i64 = 0x3a00_0000;
        let mut img = orig.bytes.clone();
        apply_kaslr(&mut img, orig.phys_start, &relocs, delta).unwrap();
        let mut expect = orig.bytes.clone();
        let rd32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        for a in &relocs.rel32 {
            let o = (a - START_KERNEL_MAP - orig.phys_start) as usize;
            expect[o..o + 4].copy_from_slice(
                &rd32(&orig.bytes, o)
                    .wrapping_add(delta as u32)
                    .to_le_bytes(),
            );
        }
        for a in &relocs.inv32 {
            let o = (a - START_KERNEL_MAP - orig.phys_start) as usize;
            expect[o..o + 4].copy_from_slice(
                &rd32(&orig.bytes, o)
                    .wrapping_sub(delta as u32)
                    .to_le_bytes(),
            );
        }
        for a in &relocs.rel64 {
            let o = (a - START_KERNEL_MAP - orig.phys_start) as usize;
            let v = u64::from_le_bytes(orig.bytes[o..o + 8].try_into().unwrap());
            expect[o..o + 8].copy_from_slice(&v.wrapping_add(delta as u64).to_le_bytes());
        }
        assert_eq!(img, expect);
        // Spot-check concrete values planted by test_elf.
        assert_eq!(rd32(&img, 0x10), 0x8100_0100u32.wrapping_add(0x3a00_0000));
        assert_eq!(rd32(&img, 0x20) as i32, -0x100 - 0x3a00_0000);
        assert_eq!(
            &img[0x1008..0x1010],
            &(0xffff_ffff_8100_0000u64 + 0x3a00_0000).to_le_bytes()
        );
        let changed = img.iter().zip(&orig.bytes).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed <= relocs.len() * 8);
        // A negative delta undoes it.
        apply_kaslr(&mut img, orig.phys_start, &relocs, -delta).unwrap();
        assert_eq!(img, orig.bytes);
    }

    #[test]
    fn out_of_image_relocations_are_errors() {
        let TestElf { bytes, elf_len, .. } = test_elf();
        let info = parse_elf(&bytes).unwrap();
        let orig = build_image(&bytes[..elf_len], &info, 1 << 20).unwrap();
        let end = START_KERNEL_MAP + orig.phys_start + orig.bytes.len() as u64;
        let cases = [
            Relocs {
                rel32: vec![end - 3],
                ..Default::default()
            },
            Relocs {
                inv32: vec![end],
                ..Default::default()
            },
            Relocs {
                rel64: vec![end - 4],
                ..Default::default()
            },
            Relocs {
                rel64: vec![START_KERNEL_MAP + orig.phys_start - 1],
                ..Default::default()
            },
            Relocs {
                rel32: vec![0x1000],
                ..Default::default()
            },
            Relocs {
                rel32: vec![u64::MAX],
                ..Default::default()
            },
        ];
        for r in cases {
            let mut img = orig.bytes.clone();
            assert!(
                matches!(
                    apply_kaslr(&mut img, orig.phys_start, &r, 0x20_0000),
                    Err(RelocError::OutOfImage { .. })
                ),
                "{r:?}"
            );
            assert_eq!(img, orig.bytes, "image touched on error");
        }
        let mut img = orig.bytes.clone();
        let last = Relocs {
            rel64: vec![end - 8],
            rel32: vec![end - 4],
            ..Default::default()
        };
        apply_kaslr(&mut img, orig.phys_start, &last, 1).unwrap();
    }
}
