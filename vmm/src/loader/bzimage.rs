//! bzImage parsing (x86 boot protocol >= 2.08, Documentation/arch/x86/boot.rst).
//!
//! Offsets below are file offsets, which equal offsets into `boot_params`
//! for the setup header. Every read is bounds-checked.

use thiserror::Error;

/// File offset of the setup header (`boot_params.hdr`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Size of `struct setup_header` in `boot_params` as of protocol 2.15
/// (0x1f1..0x26c); the VMM copies at most this many raw bytes.
pub const SETUP_HEADER_MAX_LEN: usize = 0x26c - SETUP_HEADER_OFFSET;
/// `loadflags` bit: protected-mode code is loaded at 0x100000 (bzImage).
pub const LOADED_HIGH: u8 = 0x01;
/// `xloadflags` bit: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 0x0001;
/// Oldest boot protocol accepted (first with `payload_offset`).
pub const MIN_PROTOCOL: u16 = 0x0208;

/// Why a file is not an acceptable bzImage.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BzImageError {
    /// Too short to hold the fixed part of the setup header.
    #[error("file is {len} bytes, too short for a bzImage setup header (need at least {need})")]
    TooShort {
        /// File length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// No 0xAA55 at 0x1fe.
    #[error("no boot-sector signature 0xaa55 at offset 0x1fe (found {found:#06x})")]
    NoBootSignature {
        /// Value found.
        found: u16,
    },
    /// No "HdrS" at 0x202.
    #[error("no \"HdrS\" magic at offset 0x202: not a Linux boot image (found {found:02x?})")]
    NoHdrS {
        /// Bytes found.
        found: [u8; 4],
    },
    /// Protocol older than 2.08.
    #[error("boot protocol {}.{:02} is older than 2.08 (no payload fields)", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    /// LOADED_HIGH is clear: a zImage.
    #[error("loadflags {0:#04x} lacks LOADED_HIGH: a zImage, not a bzImage")]
    NotBzImage(u8),
    /// The header (per the jump at 0x200) does not fit the file or is too
    /// short for the fields its protocol version defines.
    #[error("setup header ends at {end:#x} (jump byte at 0x201), but {why}")]
    BadHeaderEnd {
        /// End offset from 0x202 + byte at 0x201.
        end: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The real-mode setup sectors run past the end of the file.
    #[error("setup code ({setup_sects} sectors, {size} bytes) is longer than the {len}-byte file")]
    SetupTruncated {
        /// Effective setup_sects.
        setup_sects: u8,
        /// Setup size in bytes.
        size: usize,
        /// File length.
        len: usize,
    },
    /// payload_offset/payload_length point outside the file.
    #[error("payload at file offset {start:#x}, {length} bytes, runs past the {len}-byte file")]
    PayloadOutOfBounds {
        /// File offset of the payload.
        start: usize,
        /// payload_length.
        length: u32,
        /// File length.
        len: usize,
    },
    /// payload_length is zero.
    #[error("payload_length is 0: no compressed kernel in this bzImage")]
    EmptyPayload,
}

/// The parsed setup header of a bzImage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupHeader {
    /// Real-mode setup sectors (0x1f1), with 0 already turned into 4.
    pub setup_sects: u8,
    /// Boot protocol version (0x206), e.g. 0x020f.
    pub version: u16,
    /// loadflags (0x211).
    pub loadflags: u8,
    /// kernel_alignment (0x230).
    pub kernel_alignment: u32,
    /// relocatable_kernel (0x234), nonzero if relocatable.
    pub relocatable_kernel: u8,
    /// xloadflags (0x236); 0 before protocol 2.12.
    pub xloadflags: u16,
    /// cmdline_size (0x238): longest command line, without the NUL.
    pub cmdline_size: u32,
    /// payload_offset (0x248), from the start of the protected-mode code.
    pub payload_offset: u32,
    /// payload_length (0x24c), including the kernel's 4-byte size trailer.
    pub payload_length: u32,
    /// pref_address (0x258); 0 before protocol 2.10.
    pub pref_address: u64,
    /// init_size (0x260): memory the kernel needs from its load address
    /// during boot; 0 before protocol 2.10.
    pub init_size: u32,
    /// Raw header bytes, file offsets `0x1f1 .. 0x202 + byte[0x201]`; copy
    /// `raw[..min(len, SETUP_HEADER_MAX_LEN)]` into `boot_params.hdr`.
    pub raw: Vec<u8>,
}

impl SetupHeader {
    /// Size in bytes of the real-mode part, (setup_sects + 1) * 512; the
    /// protected-mode code starts at this file offset.
    pub fn setup_size(&self) -> usize {
        (usize::from(self.setup_sects) + 1) * 512
    }

    /// Whether the kernel advertises a 64-bit entry point (XLF_KERNEL_64).
    pub fn has_64bit_entry(&self) -> bool {
        self.xloadflags & XLF_KERNEL_64 != 0
    }
}

/// A parsed bzImage: header plus the compressed payload it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The setup header.
    pub header: SetupHeader,
    /// The payload (compressed stream plus 4-byte size), borrowed from the file.
    pub payload: &'a [u8],
}

fn le<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// Whether `bytes` carries both bzImage signatures (0xAA55 and "HdrS").
pub fn looks_like_bzimage(bytes: &[u8]) -> bool {
    bytes.len() >= 0x206 && bytes[0x1fe..0x200] == [0x55, 0xaa] && &bytes[0x202..0x206] == b"HdrS"
}

/// Parses and validates a bzImage; see [`BzImageError`] for what is checked.
pub fn parse_bzimage(bytes: &[u8]) -> Result<BzImage<'_>, BzImageError> {
    let len = bytes.len();
    // Everything up to and including the version field.
    if len < 0x208 {
        return Err(BzImageError::TooShort { len, need: 0x208 });
    }
    let sig = u16::from_le_bytes(le(bytes, 0x1fe));
    if sig != 0xaa55 {
        return Err(BzImageError::NoBootSignature { found: sig });
    }
    let magic: [u8; 4] = le(bytes, 0x202);
    if &magic != b"HdrS" {
        return Err(BzImageError::NoHdrS { found: magic });
    }
    let version = u16::from_le_bytes(le(bytes, 0x206));
    if version < MIN_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld(version));
    }
    let end = 0x202 + usize::from(bytes[0x201]);
    // Fields through payload_length (2.08), through init_size (2.10).
    let need = if version >= 0x020a { 0x264 } else { 0x250 };
    if end < need {
        return Err(BzImageError::BadHeaderEnd {
            end,
            why: format!("protocol {version:#06x} defines fields up to {need:#x}"),
        });
    }
    if end > len {
        return Err(BzImageError::BadHeaderEnd {
            end,
            why: format!("the file has only {len} bytes"),
        });
    }
    let u32_at = |off| u32::from_le_bytes(le(bytes, off));
    let new = version >= 0x020a;
    let header = SetupHeader {
        setup_sects: match bytes[0x1f1] {
            0 => 4,
            n => n,
        },
        version,
        loadflags: bytes[0x211],
        kernel_alignment: u32_at(0x230),
        relocatable_kernel: bytes[0x234],
        xloadflags: if version >= 0x020c {
            u16::from_le_bytes(le(bytes, 0x236))
        } else {
            0
        },
        cmdline_size: u32_at(0x238),
        payload_offset: u32_at(0x248),
        payload_length: u32_at(0x24c),
        pref_address: if new {
            u64::from_le_bytes(le(bytes, 0x258))
        } else {
            0
        },
        init_size: if new { u32_at(0x260) } else { 0 },
        raw: bytes[SETUP_HEADER_OFFSET..end].to_vec(),
    };
    if header.loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotBzImage(header.loadflags));
    }
    let setup_size = header.setup_size();
    if setup_size > len {
        return Err(BzImageError::SetupTruncated {
            setup_sects: header.setup_sects,
            size: setup_size,
            len,
        });
    }
    if header.payload_length == 0 {
        return Err(BzImageError::EmptyPayload);
    }
    let start = setup_size.saturating_add(header.payload_offset as usize);
    let stop = start.saturating_add(header.payload_length as usize);
    if stop > len {
        return Err(BzImageError::PayloadOutOfBounds {
            start,
            length: header.payload_length,
            len,
        });
    }
    Ok(BzImage {
        payload: &bytes[start..stop],
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::fake_bzimage;
    use super::*;

    #[test]
    fn parses_synthetic_bzimage() {
        let payload = b"compressed-bytes\x10\x00\x00\x00";
        let img = fake_bzimage(payload, 0);
        let bz = parse_bzimage(&img).unwrap();
        assert_eq!(bz.payload, payload);
        let h = &bz.header;
        assert_eq!(h.setup_sects, 4, "0 means 4");
        assert_eq!(h.setup_size(), 5 * 512);
        assert_eq!(h.version, 0x020f);
        assert_eq!(h.kernel_alignment, 0x20_0000);
        assert_eq!(h.relocatable_kernel, 1);
        assert!(h.has_64bit_entry());
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(h.payload_offset, 0x3a0);
        assert_eq!(h.payload_length as usize, payload.len());
        assert_eq!(h.pref_address, 0x100_0000);
        assert_eq!(h.init_size, 0x200_0000);
        assert_eq!(h.raw.len(), SETUP_HEADER_MAX_LEN);
        assert_eq!(&h.raw[0x202 - SETUP_HEADER_OFFSET..][..4], b"HdrS");
        assert!(looks_like_bzimage(&img));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let img = fake_bzimage(b"0123456789abcdef", 0);
        for cut in 0..img.len() {
            assert!(parse_bzimage(&img[..cut]).is_err(), "accepted {cut} bytes");
        }
        assert_eq!(
            parse_bzimage(&img[..0x100]),
            Err(BzImageError::TooShort {
                len: 0x100,
                need: 0x208
            })
        );
        assert!(matches!(
            parse_bzimage(&img[..img.len() - 1]),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        assert!(matches!(
            parse_bzimage(&img[..0x250]),
            Err(BzImageError::BadHeaderEnd { .. })
        ));
        assert!(matches!(
            parse_bzimage(&img[..0x800]),
            Err(BzImageError::SetupTruncated { .. })
        ));
    }

    #[test]
    fn garbage_headers_are_errors() {
        let good = fake_bzimage(b"0123456789abcdef", 2);
        let patch = |off: usize, val: &[u8]| {
            let mut v = good.clone();
            v[off..off + val.len()].copy_from_slice(val);
            parse_bzimage(&v).map(|bz| bz.header)
        };
        assert!(parse_bzimage(&good).is_ok());
        assert_eq!(
            patch(0x1fe, &[0, 0]),
            Err(BzImageError::NoBootSignature { found: 0 })
        );
        assert_eq!(
            patch(0x202, b"HdrZ"),
            Err(BzImageError::NoHdrS { found: *b"HdrZ" })
        );
        assert_eq!(
            patch(0x206, &[0x04, 0x02]),
            Err(BzImageError::ProtocolTooOld(0x0204))
        );
        assert_eq!(patch(0x211, &[0]), Err(BzImageError::NotBzImage(0)));
        assert!(matches!(
            patch(0x201, &[0x10]),
            Err(BzImageError::BadHeaderEnd { .. })
        ));
        assert_eq!(patch(0x24c, &[0, 0, 0, 0]), Err(BzImageError::EmptyPayload));
        assert!(matches!(
            patch(0x248, &[0xff, 0xff, 0xff, 0xff]),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        assert!(matches!(
            patch(0x24c, &[0xff, 0xff, 0xff, 0xff]),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        assert!(matches!(
            patch(0x1f1, &[0xff]),
            Err(BzImageError::SetupTruncated { .. })
        ));
        // Protocol 2.08: only fields through 0x250 are needed and read.
        let old = patch(0x206, &[0x08, 0x02]).unwrap();
        assert_eq!((old.init_size, old.pref_address, old.xloadflags), (0, 0, 0));
        let msg = patch(0x206, &[0x04, 0x02]).unwrap_err().to_string();
        assert!(msg.contains("2.04"), "{msg}");
    }
}
