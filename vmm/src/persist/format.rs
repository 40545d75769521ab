//! The snapshot file format: pure encoding and decoding, no KVM.
//!
//! ```text
//! 0   magic      "HVTSNAP\0"
//! 8   version    u32 LE (FORMAT_VERSION)
//! 12  reserved   u32 (0)
//! 16  state_len  u64 LE
//! 24  state      bincode-encoded machine state (vCPUs, irqchip, PIT, clock, devices)
//! ..  memory     for each RAM region: a bitmap with one bit per 4 KiB page
//!                (set = page stored), then the stored pages in order
//! end crc32      u32 LE over every byte before it
//! ```
//!
//! All-zero pages are not stored, so a freshly booted guest's snapshot is a
//! fraction of its RAM. A file whose magic, version, lengths or checksum do
//! not match is refused before anything is restored.

use std::io::{Read, Write};

/// File magic.
pub const MAGIC: &[u8; 8] = b"HVTSNAP\0";
/// Current format version; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 3;
const PAGE: usize = 4096;

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// I/O error.
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot.
    #[error("not an hvtrace snapshot (bad magic)")]
    BadMagic,
    /// Written by another format version.
    #[error("snapshot format version {found} is not supported (this hvtrace reads version {FORMAT_VERSION})")]
    Version {
        /// Version in the file.
        found: u32,
    },
    /// Shorter than its own lengths say.
    #[error("snapshot is truncated ({0})")]
    Truncated(&'static str),
    /// Checksum mismatch.
    #[error("snapshot is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Stored checksum.
        expected: u32,
        /// Computed checksum.
        found: u32,
    },
    /// The state section does not decode.
    #[error("snapshot state does not decode: {0}")]
    State(String),
    /// The memory section does not match the state's region sizes.
    #[error("snapshot memory section is malformed: {0}")]
    Memory(String),
}

/// Writes a snapshot: `state` (already encoded) and the memory `regions`.
pub fn write_snapshot(
    out: &mut impl Write,
    state: &[u8],
    regions: &[&[u8]],
) -> Result<(), FormatError> {
    let mut w = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(&0u32.to_le_bytes())?;
    w.write_all(&(state.len() as u64).to_le_bytes())?;
    w.write_all(state)?;
    for region in regions {
        let pages = region.len().div_ceil(PAGE);
        let mut bitmap = vec![0u8; pages.div_ceil(8)];
        for (i, page) in region.chunks(PAGE).enumerate() {
            if page.iter().any(|b| *b != 0) {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        w.write_all(&bitmap)?;
        for (i, page) in region.chunks(PAGE).enumerate() {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                w.write_all(page)?;
            }
        }
    }
    let crc = w.crc.clone().finalize();
    w.inner.write_all(&crc.to_le_bytes())?;
    Ok(())
}

/// A snapshot read and verified, memory still in encoded form.
pub struct SnapshotFile {
    /// The encoded machine state.
    pub state: Vec<u8>,
    body: Vec<u8>,
    memory_start: usize,
}

/// Reads a whole snapshot and checks magic, version and checksum.
pub fn read_snapshot(input: &mut impl Read) -> Result<SnapshotFile, FormatError> {
    let mut body = Vec::new();
    input.read_to_end(&mut body)?;
    if body.len() < 8 || &body[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if body.len() < 28 {
        return Err(FormatError::Truncated("header"));
    }
    let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let crc_at = body.len() - 4;
    let expected = u32::from_le_bytes(body[crc_at..].try_into().expect("4 bytes"));
    let found = crc32fast::hash(&body[..crc_at]);
    if found != expected {
        return Err(FormatError::Checksum { expected, found });
    }
    body.truncate(crc_at);
    let state_len = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
    let state_end = 24usize
        .checked_add(usize::try_from(state_len).map_err(|_| FormatError::Truncated("state"))?)
        .filter(|e| *e <= body.len())
        .ok_or(FormatError::Truncated("state"))?;
    let state = body[24..state_end].to_vec();
    Ok(SnapshotFile {
        state,
        body,
        memory_start: state_end,
    })
}

impl SnapshotFile {
    /// Decodes the memory section into `regions` (sized from the state),
    /// which must start zeroed.
    pub fn fill_memory(&self, regions: &mut [&mut [u8]]) -> Result<(), FormatError> {
        let mut off = self.memory_start;
        let body = &self.body;
        for region in regions.iter_mut() {
            let pages = region.len().div_ceil(PAGE);
            let bitmap = body
                .get(off..off + pages.div_ceil(8))
                .ok_or_else(|| FormatError::Memory("bitmap cut short".into()))?;
            off += bitmap.len();
            for i in 0..pages {
                if bitmap[i / 8] & (1 << (i % 8)) == 0 {
                    continue;
                }
                let start = i * PAGE;
                let len = PAGE.min(region.len() - start);
                let src = body
                    .get(off..off + len)
                    .ok_or_else(|| FormatError::Memory("page data cut short".into()))?;
                region[start..start + len].copy_from_slice(src);
                off += len;
            }
        }
        if off != body.len() {
            return Err(FormatError::Memory(format!(
                "{} bytes left over after the last region",
                body.len() - off
            )));
        }
        Ok(())
    }
}

struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let state = b"state bytes".to_vec();
        let mut r1 = vec![0u8; 5 * PAGE];
        r1[PAGE + 7] = 9;
        r1[4 * PAGE] = 1;
        let mut r2 = vec![0u8; 3 * PAGE + 100];
        r2[3 * PAGE + 99] = 5;
        (state, r1, r2)
    }

    fn encode() -> Vec<u8> {
        let (state, r1, r2) = sample();
        let mut out = Vec::new();
        write_snapshot(&mut out, &state, &[&r1, &r2]).unwrap();
        out
    }

    #[test]
    fn round_trips_sparse_memory() {
        let (state, r1, r2) = sample();
        let file = encode();
        // Only 3 non-zero pages are stored.
        assert!(file.len() < 4 * PAGE);
        let snap = read_snapshot(&mut &file[..]).unwrap();
        assert_eq!(snap.state, state);
        let mut a = vec![0u8; r1.len()];
        let mut b = vec![0u8; r2.len()];
        snap.fill_memory(&mut [&mut a, &mut b]).unwrap();
        assert_eq!((a, b), (r1, r2));
    }

    #[test]
    fn refuses_corrupt_truncated_and_foreign_files() {
        let file = encode();
        let mut bad = file.clone();
        bad[40] ^= 1;
        assert!(matches!(
            read_snapshot(&mut &bad[..]),
            Err(FormatError::Checksum { .. })
        ));
        assert!(matches!(
            read_snapshot(&mut &file[..file.len() - 10][..]),
            Err(FormatError::Checksum { .. })
        ));
        assert!(matches!(
            read_snapshot(&mut &b"ELF\x7f....."[..]),
            Err(FormatError::BadMagic)
        ));
        assert!(matches!(
            read_snapshot(&mut &file[..12]),
            Err(FormatError::Truncated(_))
        ));
        let other = FORMAT_VERSION + 1;
        let mut v2 = file.clone();
        v2[8..12].copy_from_slice(&other.to_le_bytes());
        assert!(matches!(
            read_snapshot(&mut &v2[..]),
            Err(FormatError::Version { found }) if found == other
        ));
    }

    #[test]
    fn memory_sized_differently_from_the_file_is_an_error() {
        let file = encode();
        let snap = read_snapshot(&mut &file[..]).unwrap();
        let mut a = vec![0u8; PAGE];
        assert!(matches!(
            snap.fill_memory(&mut [&mut a]),
            Err(FormatError::Memory(_))
        ));
        let mut big = vec![0u8; 64 * PAGE];
        let mut b = vec![0u8; 64 * PAGE];
        assert!(snap.fill_memory(&mut [&mut big, &mut b]).is_err());
    }

    #[test]
    fn lying_state_length_is_truncation_not_a_panic() {
        let mut file = encode();
        file[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let n = file.len() - 4;
        let crc = crc32fast::hash(&file[..n]);
        file[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            read_snapshot(&mut &file[..]),
            Err(FormatError::Truncated(_))
        ));
    }
}
