//! The stream formats decoded by crates: gzip (`flate2`), bzip2 (`bzip2`),
//! zstd (`zstd`), and lzma/xz (liblzma via `xz2`, driven directly so that the
//! bytes after the stream are never fed to it). Each decodes exactly one
//! stream and reports how many input bytes it took.

use std::io::Read;

use xz2::stream::{Action, Status, Stream};

use super::decompress::{Compression, DecompressError};

/// Memory limit given to liblzma (dictionary and state), 1 GiB.
const LZMA_MEMLIMIT: u64 = 1 << 30;

/// Decodes one gzip, bzip2, zstd, lzma or xz stream from the start of
/// `input`; returns the output and the input bytes the stream occupied.
pub(super) fn decode(
    format: Compression,
    input: &[u8],
    max_output: usize,
) -> Result<(Vec<u8>, usize), DecompressError> {
    match format {
        Compression::Gzip => {
            let mut dec = flate2::bufread::GzDecoder::new(input);
            let out = read_capped(&mut dec, format, max_output)?;
            Ok((out, input.len() - dec.into_inner().len()))
        }
        Compression::Bzip2 => {
            let mut dec = bzip2::bufread::BzDecoder::new(input);
            let out = read_capped(&mut dec, format, max_output)?;
            Ok((out, input.len() - dec.into_inner().len()))
        }
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| DecompressError::from_io(format, e))?;
            let mut dec = dec.single_frame();
            let out = read_capped(&mut dec, format, max_output)?;
            Ok((out, input.len() - dec.finish().len()))
        }
        Compression::Lzma => {
            let stream = Stream::new_lzma_decoder(LZMA_MEMLIMIT)
                .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
            liblzma_decode(stream, input, format, max_output)
        }
        Compression::Xz => {
            // No LZMA_CONCATENATED: stop at the end of the first stream.
            let stream = Stream::new_stream_decoder(LZMA_MEMLIMIT, 0)
                .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
            liblzma_decode(stream, input, format, max_output)
        }
        Compression::Lzo | Compression::Lz4 => Err(DecompressError::corrupt(
            format,
            "not a stream format (use containers)",
        )),
    }
}

/// Reads `r` to its end, failing once more than `max` bytes come out.
fn read_capped<R: Read>(
    r: &mut R,
    format: Compression,
    max: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    r.take(limit)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::from_io(format, e))?;
    if out.len() > max {
        return Err(DecompressError::TooLarge { format, limit: max });
    }
    Ok(out)
}

/// Drives a liblzma decoder over `input` until its stream ends.
fn liblzma_decode(
    mut stream: Stream,
    input: &[u8],
    format: Compression,
    max: usize,
) -> Result<(Vec<u8>, usize), DecompressError> {
    let initial = input
        .len()
        .saturating_mul(4)
        .max(1 << 16)
        .min(max.saturating_add(1));
    let mut out: Vec<u8> = Vec::with_capacity(initial);
    loop {
        if out.len() > max {
            return Err(DecompressError::TooLarge { format, limit: max });
        }
        if out.len() == out.capacity() {
            let room = max.saturating_add(1) - out.len();
            out.reserve_exact(out.capacity().max(1 << 16).min(room).max(1));
        }
        let pos = usize::try_from(stream.total_in())
            .unwrap_or(usize::MAX)
            .min(input.len());
        let before = out.len();
        let status = stream
            .process_vec(&input[pos..], &mut out, Action::Run)
            .map_err(|e| DecompressError::corrupt(format, e.to_string()))?;
        if out.len() > max {
            return Err(DecompressError::TooLarge { format, limit: max });
        }
        if status == Status::StreamEnd {
            let used = usize::try_from(stream.total_in())
                .unwrap_or(usize::MAX)
                .min(input.len());
            return Ok((out, used));
        }
        let progressed = stream.total_in() != pos as u64 || out.len() != before;
        if !progressed {
            return Err(if pos >= input.len() {
                DecompressError::truncated(format, "input ended before the end of the stream")
            } else {
                DecompressError::corrupt(format, "decoder made no progress")
            });
        }
    }
}
