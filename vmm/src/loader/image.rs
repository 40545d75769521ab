//! Laying a kernel ELF's PT_LOAD segments out as one contiguous buffer,
//! the way they sit in guest physical memory.

use super::payload::{table, ElfInfo, PayloadError};

/// The kernel laid out contiguously in physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    /// Physical address of `bytes[0]` (lowest PT_LOAD p_paddr).
    pub phys_start: u64,
    /// Covers [min p_paddr, max p_paddr + p_memsz): file bytes copied, the
    /// rest (bss, gaps) zero.
    pub bytes: Vec<u8>,
}

/// Lays the PT_LOAD segments of `elf` out contiguously from the lowest
/// p_paddr; refuses images spanning more than `max_size` bytes.
pub fn build_image(
    bytes: &[u8],
    elf: &ElfInfo,
    max_size: usize,
) -> Result<LoadedImage, PayloadError> {
    let start = elf
        .segments
        .iter()
        .map(|s| s.paddr)
        .min()
        .ok_or(PayloadError::NoLoadSegments)?;
    // parse_elf rejected overflowing paddr + memsz.
    let end = elf
        .segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(start);
    let size = end - start;
    if size > max_size as u64 {
        return Err(PayloadError::ImageTooLarge {
            size,
            max: max_size,
        });
    }
    let mut image = vec![0u8; size as usize];
    for (index, seg) in elf.segments.iter().enumerate() {
        let src = table(bytes, "segment contents", seg.offset, 1, seg.filesz).map_err(|e| {
            PayloadError::BadSegment {
                index,
                why: e.to_string(),
            }
        })?;
        let at = (seg.paddr - start) as usize;
        image[at..at + src.len()].copy_from_slice(src);
    }
    Ok(LoadedImage {
        phys_start: start,
        bytes: image,
    })
}

#[cfg(test)]
mod tests {
    use super::super::payload::parse_elf;
    use super::super::testutil::{test_elf, TestElf};
    use super::*;

    #[test]
    fn lays_out_two_segments_with_gap_and_bss() {
        let TestElf { bytes, .. } = test_elf();
        let info = parse_elf(&bytes).unwrap();
        let (a, b) = (info.segments[0], info.segments[1]);
        let img = build_image(&bytes, &info, 1 << 20).unwrap();
        assert_eq!(img.phys_start, 0x100_0000);
        assert_eq!(img.bytes.len(), 0x1200);
        assert_eq!(&img.bytes[..0x100], &bytes[a.offset as usize..][..0x100]);
        assert!(
            img.bytes[0x100..0x1000].iter().all(|&x| x == 0),
            "gap is zero"
        );
        assert_eq!(
            &img.bytes[0x1000..0x1080],
            &bytes[b.offset as usize..][..0x80]
        );
        assert!(img.bytes[0x1080..].iter().all(|&x| x == 0), "bss is zero");
        assert_eq!(
            build_image(&bytes, &info, 0x11ff),
            Err(PayloadError::ImageTooLarge {
                size: 0x1200,
                max: 0x11ff
            })
        );
    }
}
