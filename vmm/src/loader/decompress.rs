//! Host-side decompression of a bzImage payload.
//!
//! The kernel build compresses `vmlinux.bin` (plus its relocation table) with
//! one of seven formats and appends the uncompressed size as a 4-byte little
//! endian number (except after gzip, whose own trailer ends with the size).
//! [`decompress`] detects the format by its magic, decodes exactly one
//! stream, tolerates bytes after it, and when exactly four bytes follow the
//! stream treats them as that size field and checks it. Output is
//! capped so a decompression bomb is an error, not an out-of-memory kill.
//!
//! The decoders live in `streams.rs` (gzip, bzip2, zstd, lzma, xz, backed
//! by crates) and `containers.rs` (lzop and legacy lz4, whose framing is
//! parsed here).

use std::fmt;
use std::io;

use thiserror::Error;

use super::{containers, streams};

/// Default cap on decompressed output: 512 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 512 << 20;

/// A compression format a bzImage payload may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (`1f 8b`), CONFIG_KERNEL_GZIP.
    Gzip,
    /// bzip2 (`BZh`), CONFIG_KERNEL_BZIP2.
    Bzip2,
    /// Legacy `.lzma` ("alone") format (`5d 00 00`), CONFIG_KERNEL_LZMA.
    Lzma,
    /// xz (`fd 37 7a 58 5a 00`), CONFIG_KERNEL_XZ.
    Xz,
    /// lzop container of LZO1X blocks (`89 4c 5a 4f ...`), CONFIG_KERNEL_LZO.
    Lzo,
    /// lz4 legacy frame format (`02 21 4c 18`), CONFIG_KERNEL_LZ4.
    Lz4,
    /// zstd (`28 b5 2f fd`), CONFIG_KERNEL_ZSTD.
    Zstd,
}

impl Compression {
    /// All formats, in detection order.
    pub const ALL: [Compression; 7] = [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lzo,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// Short lower-case name ("gzip", "xz", ...).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// The magic bytes that start a stream of this format.
    pub fn magic(self) -> &'static [u8] {
        match self {
            Compression::Gzip => &[0x1f, 0x8b],
            Compression::Bzip2 => b"BZh",
            Compression::Lzma => &[0x5d, 0x00, 0x00],
            Compression::Xz => &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
            Compression::Lzo => &containers::LZOP_MAGIC,
            Compression::Lz4 => &[0x02, 0x21, 0x4c, 0x18],
            Compression::Zstd => &[0x28, 0xb5, 0x2f, 0xfd],
        }
    }

    /// Detects the format from the first bytes of `data`.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        Compression::ALL
            .into_iter()
            .find(|c| data.starts_with(c.magic()))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a payload could not be decompressed.
#[derive(Debug, Error)]
pub enum DecompressError {
    /// The input has no bytes at all.
    #[error("compressed payload is empty")]
    Empty,
    /// No known magic at the start of the input.
    #[error("unknown compression format: first bytes are {first_bytes}")]
    UnknownFormat {
        /// Hex dump of up to 8 leading bytes.
        first_bytes: String,
    },
    /// The stream ends before its end marker.
    #[error("{format} stream is truncated: {detail}")]
    Truncated {
        /// Format being decoded.
        format: Compression,
        /// What was missing.
        detail: String,
    },
    /// The stream is malformed or fails a checksum.
    #[error("{format} stream is corrupt: {detail}")]
    Corrupt {
        /// Format being decoded.
        format: Compression,
        /// What the decoder reported.
        detail: String,
    },
    /// The output would exceed the cap.
    #[error(
        "{format} output exceeds the cap of {limit} bytes (decompression bomb, or cap too small)"
    )]
    TooLarge {
        /// Format being decoded.
        format: Compression,
        /// The cap in bytes.
        limit: usize,
    },
    /// The appended 4-byte size disagrees with the output.
    #[error("{format} stream decompressed to {actual} bytes but the appended size field says {expected}")]
    SizeMismatch {
        /// Format being decoded.
        format: Compression,
        /// Size from the 4-byte trailer.
        expected: u32,
        /// Bytes actually produced.
        actual: usize,
    },
}

impl DecompressError {
    pub(super) fn truncated(format: Compression, detail: impl Into<String>) -> Self {
        DecompressError::Truncated {
            format,
            detail: detail.into(),
        }
    }

    pub(super) fn corrupt(format: Compression, detail: impl Into<String>) -> Self {
        DecompressError::Corrupt {
            format,
            detail: detail.into(),
        }
    }

    pub(super) fn from_io(format: Compression, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            DecompressError::truncated(format, e.to_string())
        } else {
            DecompressError::corrupt(format, e.to_string())
        }
    }
}

/// Hex dump of up to 8 leading bytes, for error messages.
pub(super) fn hex_prefix(data: &[u8]) -> String {
    let shown: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
    if shown.is_empty() {
        "(none)".to_string()
    } else {
        shown.join(" ")
    }
}

/// A decompressed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decompressed {
    /// Detected format.
    pub format: Compression,
    /// Decompressed bytes.
    pub data: Vec<u8>,
    /// Input bytes taken by the compressed stream itself.
    pub consumed: usize,
    /// The kernel's size field, already checked against `data.len()`: the 4
    /// bytes after the stream when exactly 4 follow it, else for gzip the
    /// stream's own ISIZE (the kernel appends no size after gzip).
    pub size_field: Option<u32>,
}

/// Detects the format of `input`, decompresses one stream of at most
/// `max_output` bytes, and checks the appended 4-byte size if present.
pub fn decompress(input: &[u8], max_output: usize) -> Result<Decompressed, DecompressError> {
    if input.is_empty() {
        return Err(DecompressError::Empty);
    }
    let format = Compression::detect(input).ok_or_else(|| DecompressError::UnknownFormat {
        first_bytes: hex_prefix(input),
    })?;
    let (data, consumed) = decompress_as(format, input, max_output)?;
    let trailing = input.get(consumed..).unwrap_or_default();
    let field = match <[u8; 4]>::try_from(trailing) {
        Ok(field) => Some(field),
        Err(_) => {
            if !trailing.is_empty() {
                log::debug!(
                    "{format}: ignoring {} bytes after the stream",
                    trailing.len()
                );
            }
            // gzip streams carry the size themselves (ISIZE, the last 4
            // bytes), so the kernel appends nothing after them.
            (format == Compression::Gzip)
                .then(|| {
                    consumed
                        .checked_sub(4)
                        .and_then(|at| input.get(at..consumed))
                })
                .flatten()
                .and_then(|isize| <[u8; 4]>::try_from(isize).ok())
        }
    };
    let size_field = field.map(u32::from_le_bytes);
    if let Some(expected) = size_field {
        // Compare modulo 2^32, as gzip's ISIZE is defined.
        if expected != data.len() as u32 || data.len() > u32::MAX as usize {
            return Err(DecompressError::SizeMismatch {
                format,
                expected,
                actual: data.len(),
            });
        }
    }
    Ok(Decompressed {
        format,
        data,
        consumed,
        size_field,
    })
}

/// Decodes one `format` stream from the start of `input`; returns the output
/// (at most `max_output` bytes) and the number of input bytes the stream
/// occupied.
pub fn decompress_as(
    format: Compression,
    input: &[u8],
    max_output: usize,
) -> Result<(Vec<u8>, usize), DecompressError> {
    match format {
        Compression::Lzo => containers::lzop(input, max_output),
        Compression::Lz4 => containers::lz4_legacy(input, max_output),
        _ => streams::decode(format, input, max_output),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{
        compress_with_tool, kernel_payload, synthetic_payload, with_size,
    };
    use super::*;

    fn check_round_trip(format: Compression, payload: &[u8]) {
        let stream = compress_with_tool(format, payload);
        let input = kernel_payload(format, payload);
        let got =
            decompress(&input, DEFAULT_MAX_OUTPUT).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(got.format, format);
        assert_eq!(got.consumed, stream.len(), "{format}: stream length");
        assert_eq!(got.size_field, Some(payload.len() as u32), "{format}");
        assert!(got.data == payload, "{format}: output differs from input");
        // With an explicit size field, without one, and with other trailing
        // bytes: still fine.
        let sized = decompress(&with_size(&stream, payload.len()), DEFAULT_MAX_OUTPUT).unwrap();
        assert_eq!(sized.size_field, Some(payload.len() as u32), "{format}");
        assert_eq!(
            decompress(&stream, DEFAULT_MAX_OUTPUT).unwrap().data.len(),
            payload.len()
        );
        // Legacy lz4 has no end marker, so only it cannot skip padding.
        if format != Compression::Lz4 {
            let mut padded = stream.clone();
            padded.extend_from_slice(&[0u8; 7]);
            let got = decompress(&padded, DEFAULT_MAX_OUTPUT).unwrap();
            assert_eq!(got.data.len(), payload.len(), "{format}");
            assert_eq!(
                got.size_field.is_some(),
                format == Compression::Gzip,
                "{format}"
            );
        }
    }

    macro_rules! round_trip_tests {
        ($($name:ident => $fmt:expr),* $(,)?) => {$(
            #[test]
            fn $name() {
                check_round_trip($fmt, &synthetic_payload(300 * 1024 + 17));
            }
        )*};
    }

    round_trip_tests! {
        round_trip_gzip => Compression::Gzip,
        round_trip_bzip2 => Compression::Bzip2,
        round_trip_lzma => Compression::Lzma,
        round_trip_xz => Compression::Xz,
        round_trip_lzo => Compression::Lzo,
        round_trip_lz4 => Compression::Lz4,
        round_trip_zstd => Compression::Zstd,
    }

    #[test]
    fn lz4_multi_block_and_lzo_stored_blocks() {
        // > 8 MiB forces several legacy lz4 blocks; random data makes lzop
        // store blocks uncompressed.
        let payload = synthetic_payload(9 << 20);
        check_round_trip(Compression::Lz4, &payload);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..600_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert!(
            compress_with_tool(Compression::Lzo, &noise).len() > noise.len(),
            "lzop did not store blocks"
        );
        check_round_trip(Compression::Lzo, &noise);
    }

    #[test]
    fn truncated_streams_are_errors() {
        let payload = synthetic_payload(200 * 1024);
        for format in Compression::ALL {
            let stream = compress_with_tool(format, &payload);
            for cut in [stream.len() / 2, stream.len() - 1, format.magic().len() + 1] {
                match decompress(&stream[..cut], DEFAULT_MAX_OUTPUT) {
                    Err(DecompressError::Truncated { .. } | DecompressError::Corrupt { .. }) => {}
                    other => panic!(
                        "{format} cut at {cut}/{}: expected an error, got {other:?}",
                        stream.len()
                    ),
                }
            }
        }
    }

    #[test]
    fn wrong_size_field_is_an_error() {
        let payload = synthetic_payload(10_000);
        for format in Compression::ALL {
            let input = with_size(&compress_with_tool(format, &payload), payload.len() + 1);
            match decompress(&input, DEFAULT_MAX_OUTPUT) {
                Err(DecompressError::SizeMismatch {
                    expected: 10_001,
                    actual: 10_000,
                    ..
                }) => {}
                other => panic!("{format}: expected a size mismatch, got {other:?}"),
            }
        }
    }

    #[test]
    fn bombs_exceed_the_cap() {
        let zeros = vec![0u8; 4 << 20];
        for format in Compression::ALL {
            let input = kernel_payload(format, &zeros);
            match decompress(&input, 1 << 20) {
                Err(DecompressError::TooLarge { limit, .. }) => assert_eq!(limit, 1 << 20),
                other => panic!("{format}: expected TooLarge, got {other:?}"),
            }
            // Exactly at the cap is allowed.
            assert_eq!(
                decompress(&input, 4 << 20).unwrap().data.len(),
                4 << 20,
                "{format}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(decompress(&[], 100), Err(DecompressError::Empty)));
        let err = decompress(b"\x7fELF\x02\x01\x01\x00rest", 100).unwrap_err();
        assert!(err.to_string().contains("7f 45 4c 46 02 01 01 00"), "{err}");
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_246_822_519) >> 7) as u8)
            .collect();
        for format in Compression::ALL {
            let mut input = format.magic().to_vec();
            input.extend_from_slice(&noise);
            assert!(
                decompress(&input, 1 << 20).is_err(),
                "{format}: garbage after the magic accepted"
            );
        }
    }
}
