//! The two container formats whose framing the crates do not parse: lzop
//! (CONFIG_KERNEL_LZO, `lzop -9`) and the legacy lz4 frame (CONFIG_KERNEL_LZ4,
//! `lz4 -l`). Blocks are decoded with `lzo1x::decompress` and
//! `lz4_flex::block::decompress_into`; errors are [`DecompressError`]s.

use super::decompress::{Compression, DecompressError};

/// Magic at the start of an lzop file.
pub const LZOP_MAGIC: [u8; 9] = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

// lzop header flags (lzop's conf.h).
const F_ADLER32_D: u32 = 0x0000_0001;
const F_ADLER32_C: u32 = 0x0000_0002;
const F_H_EXTRA_FIELD: u32 = 0x0000_0040;
const F_CRC32_D: u32 = 0x0000_0100;
const F_CRC32_C: u32 = 0x0000_0200;
const F_MULTIPART: u32 = 0x0000_0400;
const F_H_FILTER: u32 = 0x0000_0800;
const F_H_CRC32: u32 = 0x0000_1000;
/// Newest lzop format version we know (lzop 1.04).
const LZOP_VERSION: u16 = 0x1040;
/// lzop itself refuses blocks larger than 64 MiB.
const LZOP_MAX_BLOCK: usize = 64 << 20;

/// Magic of the legacy lz4 frame (0x184C2102, little endian).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Every legacy lz4 block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// LZ4_compressBound(8 MiB).
const LZ4_MAX_CHUNK: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

/// Bounds-checked reader over a byte slice.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    format: Compression,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], format: Compression) -> Self {
        Cursor {
            data,
            pos: 0,
            format,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecompressError> {
        if n > self.remaining() {
            return Err(DecompressError::truncated(
                self.format,
                format!(
                    "{what} needs {n} bytes at offset {}, only {} left",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecompressError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecompressError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn be16(&mut self, what: &str) -> Result<u16, DecompressError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn be32(&mut self, what: &str) -> Result<u32, DecompressError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn le32(&mut self, what: &str) -> Result<u32, DecompressError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
}

/// Adler-32 as lzop computes it (initial value 1).
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// CRC-32 (IEEE, as in gzip/lzop).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

fn check_sum(
    stored: Option<u32>,
    computed: impl FnOnce() -> u32,
    what: &str,
    block: usize,
) -> Result<(), DecompressError> {
    match stored {
        Some(s) if s != computed() => Err(DecompressError::corrupt(
            Compression::Lzo,
            format!("block {block}: {what} checksum mismatch"),
        )),
        _ => Ok(()),
    }
}

/// Decodes an lzop file; returns the output and the bytes the file occupied.
pub(super) fn lzop(input: &[u8], max: usize) -> Result<(Vec<u8>, usize), DecompressError> {
    let fmt = Compression::Lzo;
    let bad = |detail: String| DecompressError::corrupt(fmt, detail);
    let mut c = Cursor::new(input, fmt);
    if c.take(LZOP_MAGIC.len(), "magic")? != LZOP_MAGIC {
        return Err(bad("bad lzop magic".into()));
    }
    let header_start = c.pos;
    let version = c.be16("header version")?;
    if version < 0x0900 {
        return Err(bad(format!("lzop format version {version:#x} is too old")));
    }
    let _lib_version = c.be16("library version")?;
    if version >= 0x0940 {
        let needed = c.be16("version needed to extract")?;
        if needed > LZOP_VERSION {
            return Err(bad(format!("needs lzop version {needed:#x} to extract")));
        }
    }
    let method = c.u8("method")?;
    if !(1..=3).contains(&method) {
        return Err(bad(format!(
            "unsupported lzop method {method} (only LZO1X methods 1-3)"
        )));
    }
    if version >= 0x0940 {
        let _level = c.u8("level")?;
    }
    let flags = c.be32("flags")?;
    for (flag, name) in [
        (F_H_FILTER, "filter"),
        (F_H_EXTRA_FIELD, "extra field"),
        (F_MULTIPART, "multipart"),
    ] {
        if flags & flag != 0 {
            return Err(bad(format!("unsupported lzop header feature: {name}")));
        }
    }
    let _mode = c.be32("mode")?;
    let _mtime_low = c.be32("mtime")?;
    if version >= 0x0940 {
        let _mtime_high = c.be32("mtime high")?;
    }
    let name_len = usize::from(c.u8("name length")?);
    c.take(name_len, "file name")?;
    let header = &input[header_start..c.pos];
    let stored = c.be32("header checksum")?;
    let computed = if flags & F_H_CRC32 != 0 {
        crc32(header)
    } else {
        adler32(header)
    };
    if stored != computed {
        return Err(bad(format!(
            "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }

    let mut out = Vec::new();
    for block in 0usize.. {
        let dst_len = c.be32("block size")? as usize;
        if dst_len == 0 {
            break;
        }
        if dst_len > LZOP_MAX_BLOCK {
            return Err(bad(format!(
                "block {block}: size {dst_len} exceeds lzop's 64 MiB limit"
            )));
        }
        let src_len = c.be32("compressed block size")? as usize;
        if src_len == 0 || src_len > dst_len {
            return Err(bad(format!(
                "block {block}: compressed size {src_len} invalid for {dst_len} bytes"
            )));
        }
        let stored_flag =
            |f: u32, c: &mut Cursor, what: &str| -> Result<Option<u32>, DecompressError> {
                if flags & f != 0 {
                    c.be32(what).map(Some)
                } else {
                    Ok(None)
                }
            };
        let d_adler = stored_flag(F_ADLER32_D, &mut c, "checksum")?;
        let d_crc = stored_flag(F_CRC32_D, &mut c, "checksum")?;
        let packed = src_len < dst_len;
        let c_adler = if packed {
            stored_flag(F_ADLER32_C, &mut c, "checksum")?
        } else {
            None
        };
        let c_crc = if packed {
            stored_flag(F_CRC32_C, &mut c, "checksum")?
        } else {
            None
        };
        let src = c.take(src_len, "block data")?;
        check_sum(c_adler, || adler32(src), "compressed adler32", block)?;
        check_sum(c_crc, || crc32(src), "compressed crc32", block)?;
        if out.len().saturating_add(dst_len) > max {
            return Err(DecompressError::TooLarge {
                format: fmt,
                limit: max,
            });
        }
        let start = out.len();
        out.resize(start + dst_len, 0);
        let dst = &mut out[start..];
        if packed {
            lzo1x::decompress(src, dst).map_err(|e| bad(format!("block {block}: lzo1x: {e}")))?;
        } else {
            dst.copy_from_slice(src);
        }
        check_sum(d_adler, || adler32(dst), "adler32", block)?;
        check_sum(d_crc, || crc32(dst), "crc32", block)?;
    }
    Ok((out, c.pos))
}

/// Decodes a legacy lz4 frame. The format has no end marker: blocks run to
/// the end of the input, except that exactly 4 remaining bytes (the
/// kernel's size field) end it; 1-3 stray bytes are a truncated block
/// header; a second legacy magic is skipped.
pub(super) fn lz4_legacy(input: &[u8], max: usize) -> Result<(Vec<u8>, usize), DecompressError> {
    let fmt = Compression::Lz4;
    let mut c = Cursor::new(input, fmt);
    if c.le32("magic")? != LZ4_LEGACY_MAGIC {
        return Err(DecompressError::corrupt(
            fmt,
            "not a legacy lz4 frame (lz4 -l)",
        ));
    }
    let mut out = Vec::new();
    let mut scratch = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut block = 0usize;
    while c.remaining() > 4 {
        let size = c.le32("block size")?;
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = size as usize;
        if size == 0 || size > LZ4_MAX_CHUNK {
            return Err(DecompressError::corrupt(
                fmt,
                format!("block {block}: invalid compressed size {size}"),
            ));
        }
        let src = c.take(size, "block data")?;
        let n = lz4_flex::block::decompress_into(src, &mut scratch)
            .map_err(|e| DecompressError::corrupt(fmt, format!("block {block}: {e}")))?;
        if out.len().saturating_add(n) > max {
            return Err(DecompressError::TooLarge {
                format: fmt,
                limit: max,
            });
        }
        out.extend_from_slice(&scratch[..n]);
        block += 1;
    }
    if (1..4).contains(&c.remaining()) {
        return Err(DecompressError::truncated(
            fmt,
            format!("{} stray bytes: a partial block header", c.remaining()),
        ));
    }
    Ok((out, c.pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_known_value() {
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(adler32(&[]), 1);
        let big = vec![0xffu8; 100_000];
        // Reference computed without chunking, in u64.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65_521;
            b = (b + a) % 65_521;
        }
        assert_eq!(adler32(&big), ((b << 16) | a) as u32);
    }

    #[test]
    fn lzop_header_errors_are_specific() {
        let payload = super::super::testutil::synthetic_payload(5000);
        let good = super::super::testutil::compress_with_tool(Compression::Lzo, &payload);
        assert_eq!(lzop(&good, 1 << 20).unwrap().0, payload);
        let mut bad_sum = good.clone();
        bad_sum[12] ^= 0x01; // library version: covered by the header checksum
        let err = lzop(&bad_sum, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("header checksum"), "{err}");
        let mut bad_method = good.clone();
        bad_method[15] = 9;
        assert!(lzop(&bad_method, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("method"));
        assert!(matches!(
            lzop(&good[..20], 1 << 20),
            Err(DecompressError::Truncated { .. })
        ));
        // Corrupt a byte of block data: caught by the checksum or by lzo1x.
        let mut bad_data = good.clone();
        let n = bad_data.len();
        bad_data[n - 10] ^= 0x55;
        assert!(lzop(&bad_data, 1 << 20).is_err());
    }

    #[test]
    fn lz4_legacy_rejects_bad_blocks() {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        v.extend_from_slice(&((LZ4_MAX_CHUNK + 1) as u32).to_le_bytes());
        v.extend_from_slice(&[0u8; 8]);
        assert!(lz4_legacy(&v, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("invalid compressed size"));
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        v.extend_from_slice(&100u32.to_le_bytes());
        v.extend_from_slice(&[0u8; 8]);
        assert!(matches!(
            lz4_legacy(&v, 1 << 20),
            Err(DecompressError::Truncated { .. })
        ));
        // Magic alone (empty input to lz4 -l) decodes to nothing.
        assert_eq!(
            lz4_legacy(&LZ4_LEGACY_MAGIC.to_le_bytes(), 10).unwrap(),
            (vec![], 4)
        );
    }
}
