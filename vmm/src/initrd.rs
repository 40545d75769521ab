//! Initial ramdisks: host-side gunzip and a structural check of the cpio
//! archive, so a truncated or corrupt initrd is refused before boot instead
//! of ending in a kernel panic minutes later (kernel code is emulated on PVM).

use std::io::Read;

/// Why an initrd is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitrdError {
    /// Empty file.
    #[error("initrd is empty")]
    Empty,
    /// The gzip stream is corrupt or truncated.
    #[error("initrd gzip stream is corrupt or truncated: {0}")]
    Gzip(String),
    /// The cpio archive ends early or is malformed.
    #[error("initrd is truncated or not a newc cpio archive: {0}")]
    Cpio(String),
    /// Larger than the cap.
    #[error("initrd is larger than {0} MiB once decompressed")]
    TooLarge(usize),
}

const NEWC_MAGIC: &[u8] = b"070701";
const CRC_MAGIC: &[u8] = b"070702";
const HEADER_LEN: usize = 110;

/// Returns the initrd ready to load: gzip is decompressed on the host (the
/// guest's own gunzip would run emulated), other formats are passed through
/// for the kernel to handle, and newc cpio archives are checked whole.
pub fn prepare_initrd(bytes: Vec<u8>, max_size: usize) -> Result<Vec<u8>, InitrdError> {
    if bytes.is_empty() {
        return Err(InitrdError::Empty);
    }
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let mut d = flate2::read::MultiGzDecoder::new(&bytes[..]).take(max_size as u64 + 1);
        d.read_to_end(&mut out)
            .map_err(|e| InitrdError::Gzip(e.to_string()))?;
        if out.len() > max_size {
            return Err(InitrdError::TooLarge(max_size >> 20));
        }
        out
    } else {
        bytes
    };
    if data.starts_with(NEWC_MAGIC) || data.starts_with(CRC_MAGIC) {
        check_cpio(&data)?;
    }
    Ok(data)
}

fn hex_field(h: &[u8], index: usize) -> Result<usize, InitrdError> {
    let start = 6 + index * 8;
    let s = std::str::from_utf8(&h[start..start + 8])
        .map_err(|_| InitrdError::Cpio("non-ASCII header".into()))?;
    usize::from_str_radix(s, 16).map_err(|_| InitrdError::Cpio(format!("bad header field {s:?}")))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One member of a newc cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioMember<'a> {
    /// Its name, without the terminating NUL (`TRAILER!!!` for an
    /// archive's end).
    pub name: &'a [u8],
    /// `c_mode`: file type and permissions.
    pub mode: u32,
    /// Where its contents lie in the archive.
    pub data: std::ops::Range<usize>,
}

impl CpioMember<'_> {
    /// Whether it is an archive's `TRAILER!!!` entry.
    pub fn is_trailer(&self) -> bool {
        self.name == b"TRAILER!!!"
    }
}

/// The members of one or more concatenated newc archives, trailers
/// included, in order; zero padding between archives is skipped. A
/// malformed or truncated member ends the walk with its error.
pub fn cpio_members(data: &[u8]) -> impl Iterator<Item = Result<CpioMember<'_>, InitrdError>> {
    let mut off = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        while !failed && data.get(off) == Some(&0) {
            off += 1; // padding between concatenated archives
        }
        if failed || off >= data.len() {
            return None;
        }
        let member = next_member(data, off);
        match &member {
            Ok((_, end)) => off = align4(*end),
            Err(_) => failed = true,
        }
        Some(member.map(|(m, _)| m))
    })
}

/// The member whose header is at `off`, and where its contents end.
fn next_member(data: &[u8], off: usize) -> Result<(CpioMember<'_>, usize), InitrdError> {
    let h = data
        .get(off..off + HEADER_LEN)
        .ok_or_else(|| InitrdError::Cpio(format!("header at byte {off} is cut off")))?;
    if &h[..6] != NEWC_MAGIC && &h[..6] != CRC_MAGIC {
        return Err(InitrdError::Cpio(format!("no cpio header at byte {off}")));
    }
    let mode = hex_field(h, 1)?;
    let filesize = hex_field(h, 6)?;
    let namesize = hex_field(h, 11)?;
    let name_start = off + HEADER_LEN;
    let name = data
        .get(name_start..name_start + namesize)
        .ok_or_else(|| InitrdError::Cpio(format!("name of member at byte {off} is cut off")))?;
    let name = name.strip_suffix(&[0]).unwrap_or(name);
    let data_start = align4(name_start + namesize);
    let data_end = data_start
        .checked_add(filesize)
        .ok_or_else(|| InitrdError::Cpio("size overflow".into()))?;
    if data_end > data.len() {
        let n = String::from_utf8_lossy(name).into_owned();
        return Err(InitrdError::Cpio(format!(
            "member {n:?} needs {filesize} bytes but the file ends first"
        )));
    }
    let member = CpioMember {
        name,
        mode: mode as u32,
        data: data_start..data_end,
    };
    Ok((member, data_end))
}

/// Walks every member of one or more concatenated newc archives up to their
/// `TRAILER!!!` entries; zero padding between archives is allowed.
pub fn check_cpio(data: &[u8]) -> Result<usize, InitrdError> {
    let mut members = 0usize;
    let mut saw_trailer = false;
    for m in cpio_members(data) {
        saw_trailer = m?.is_trailer();
        if !saw_trailer {
            members += 1;
        }
    }
    if !saw_trailer {
        return Err(InitrdError::Cpio(
            "archive has no TRAILER!!! entry (truncated)".into(),
        ));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn member(name: &str, body: &[u8]) -> Vec<u8> {
        let mut v =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1, 0o100644, 0, 0, 1, 0, body.len(), 0, 0, 0, 0, name.len() + 1, 0
        )
            .into_bytes();
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(body);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn archive() -> Vec<u8> {
        let mut a = member("init", b"#!/bin/sh\necho hi\n");
        a.extend(member("TRAILER!!!", b""));
        a
    }

    #[test]
    fn accepts_whole_and_concatenated_archives() {
        assert_eq!(check_cpio(&archive()), Ok(1));
        let mut two = archive();
        two.extend_from_slice(&[0; 512]);
        two.extend(archive());
        assert_eq!(check_cpio(&two), Ok(2));
    }

    #[test]
    fn rejects_truncated_archives() {
        let a = archive();
        for cut in [10, 120, a.len() - 20] {
            assert!(
                matches!(
                    prepare_initrd(a[..cut].to_vec(), 1 << 20),
                    Err(InitrdError::Cpio(_))
                ),
                "cut {cut}"
            );
        }
        assert_eq!(prepare_initrd(vec![], 1 << 20), Err(InitrdError::Empty));
    }

    #[test]
    fn gunzips_on_the_host_and_checks_the_result() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&archive()).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(prepare_initrd(gz.clone(), 1 << 20).unwrap(), archive());
        assert!(matches!(
            prepare_initrd(gz[..gz.len() / 2].to_vec(), 1 << 20),
            Err(InitrdError::Gzip(_))
        ));
        assert!(matches!(
            prepare_initrd(gz, 16),
            Err(InitrdError::TooLarge(_))
        ));
    }

    #[test]
    fn passes_other_formats_through() {
        let xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2];
        assert_eq!(prepare_initrd(xz.clone(), 1 << 20).unwrap(), xz);
    }
}
