//! Turning a Linux x86-64 kernel file into what the VMM loads.
//!
//! [`load_kernel_image`] accepts an ELF `vmlinux` or a bzImage. For a
//! bzImage it checks the setup header ([`bzimage`]), decompresses the
//! payload on the host ([`decompress`]; the guest's own decompressor would
//! run emulated and take minutes on PVM), parses the resulting ELF
//! ([`payload`]) and the relocation table appended to it ([`relocs`]), and
//! lays the PT_LOAD segments out contiguously ([`image`]). Pure code: no
//! KVM, no I/O.

pub mod bzimage;
mod containers;
pub mod decompress;
pub mod image;
pub mod payload;
pub mod relocs;
mod streams;
#[cfg(test)]
mod testutil;

use thiserror::Error;

pub use bzimage::{BzImageError, SetupHeader};
pub use decompress::{Compression, DecompressError, DEFAULT_MAX_OUTPUT};
pub use payload::{ElfInfo, LoadSegment, PayloadError, START_KERNEL_MAP};
pub use relocs::{apply_kaslr, RelocError, Relocs};

/// Why a file could not be turned into a [`KernelImage`].
#[derive(Debug, Error)]
pub enum LoaderError {
    /// Zero-length file.
    #[error("kernel file is empty")]
    Empty,
    /// A PE/COFF ("MZ") file without the Linux boot header.
    #[error("PE/COFF executable without a Linux boot header (no \"HdrS\" at 0x202): an EFI-only binary, not a bzImage")]
    PeWithoutBootHeader,
    /// Neither ELF nor bzImage.
    #[error("not a Linux kernel (ELF vmlinux or bzImage): first bytes are {first_bytes}{hint}")]
    UnknownFormat {
        /// Hex dump of the first bytes.
        first_bytes: String,
        /// Extra advice, e.g. that the file is a compressed stream.
        hint: String,
    },
    /// The bzImage header is invalid.
    #[error("bzImage: {0}")]
    BzImage(#[from] BzImageError),
    /// The bzImage payload did not decompress.
    #[error("bzImage payload: {0}")]
    Decompress(#[from] DecompressError),
    /// The ELF (given directly or decompressed) is unusable.
    #[error("kernel ELF: {0}")]
    Elf(#[from] PayloadError),
    /// The relocation table after the ELF is malformed or does not fit.
    #[error("relocation table: {0}")]
    Relocs(#[from] RelocError),
    /// A nonzero KASLR offset was asked of a kernel without relocations.
    #[error("cannot relocate by {0:#x}: the kernel has no relocation table (CONFIG_RELOCATABLE off, or a plain vmlinux)")]
    NoRelocs(i64),
}

/// A kernel ready to be copied into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// The bzImage setup header (with raw bytes for `boot_params.hdr`);
    /// `None` for an ELF input.
    pub setup_header: Option<SetupHeader>,
    /// Payload compression; `None` for an ELF input.
    pub compression: Option<Compression>,
    /// Entry points, PT_LOAD segments and ELF end.
    pub elf: ElfInfo,
    /// Physical address where `image` starts (lowest p_paddr).
    pub phys_start: u64,
    /// The segments laid out contiguously, bss zeroed.
    pub image: Vec<u8>,
    /// Relocation table that followed the ELF, if any.
    pub relocs: Option<Relocs>,
}

impl KernelImage {
    /// Physical address one past the end of `image`.
    pub fn phys_end(&self) -> u64 {
        self.phys_start + self.image.len() as u64
    }

    /// Relocates `image` for a kernel virtual base moved by `virt_delta`
    /// (a multiple of the 2 MiB alignment for a real kernel).
    pub fn apply_kaslr(&mut self, virt_delta: i64) -> Result<(), LoaderError> {
        match &self.relocs {
            Some(r) => Ok(apply_kaslr(
                &mut self.image,
                self.phys_start,
                r,
                virt_delta,
            )?),
            None if virt_delta == 0 => Ok(()),
            None => Err(LoaderError::NoRelocs(virt_delta)),
        }
    }
}

/// Parses an ELF `vmlinux` or a bzImage (detected by content) into a
/// [`KernelImage`]; `max_size` caps both the decompressed payload and the
/// laid-out image (use [`DEFAULT_MAX_OUTPUT`] unless you know better).
pub fn load_kernel_image(bytes: &[u8], max_size: usize) -> Result<KernelImage, LoaderError> {
    if bytes.is_empty() {
        return Err(LoaderError::Empty);
    }
    if payload::is_elf(bytes) {
        return from_elf(bytes, None, None, max_size);
    }
    let hdrs_present = bytes.get(0x202..0x206) == Some(b"HdrS");
    let boot_sector = bytes.get(0x1fe..0x200) == Some(&[0x55, 0xaa]);
    if hdrs_present || boot_sector {
        let bz = bzimage::parse_bzimage(bytes)?;
        let out = decompress::decompress(bz.payload, max_size)?;
        if !payload::is_elf(&out.data) {
            return Err(PayloadError::NotElf {
                first_bytes: decompress::hex_prefix(&out.data),
            }
            .into());
        }
        return from_elf(&out.data, Some(bz.header), Some(out.format), max_size);
    }
    if bytes.starts_with(b"MZ") {
        return Err(LoaderError::PeWithoutBootHeader);
    }
    let hint = match Compression::detect(bytes) {
        Some(c) => format!(" (a {c}-compressed stream: decompress it first, or pass the bzImage)"),
        None => String::new(),
    };
    Err(LoaderError::UnknownFormat {
        first_bytes: decompress::hex_prefix(bytes),
        hint,
    })
}

/// The vmlinux ELF inside a kernel file: the file itself for an ELF, the
/// decompressed payload for a bzImage (for symbol and BTF recovery).
pub fn kernel_elf(
    bytes: &[u8],
    max_size: usize,
) -> Result<std::borrow::Cow<'_, [u8]>, LoaderError> {
    if payload::is_elf(bytes) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    if bytes.get(0x202..0x206) != Some(b"HdrS") {
        // Neither ELF nor bzImage: the full loader words the precise error
        // (it cannot succeed on such a file).
        return Err(load_kernel_image(bytes, max_size)
            .err()
            .unwrap_or(LoaderError::Empty));
    }
    let bz = bzimage::parse_bzimage(bytes)?;
    let out = decompress::decompress(bz.payload, max_size)?;
    if !payload::is_elf(&out.data) {
        return Err(PayloadError::NotElf {
            first_bytes: decompress::hex_prefix(&out.data),
        }
        .into());
    }
    Ok(std::borrow::Cow::Owned(out.data))
}

fn from_elf(
    elf_bytes: &[u8],
    setup_header: Option<SetupHeader>,
    compression: Option<Compression>,
    max_size: usize,
) -> Result<KernelImage, LoaderError> {
    let elf = payload::parse_elf(elf_bytes)?;
    let relocs = relocs::parse_relocs(elf_bytes, elf.elf_end)?;
    let loaded = image::build_image(elf_bytes, &elf, max_size)?;
    Ok(KernelImage {
        setup_header,
        compression,
        elf,
        phys_start: loaded.phys_start,
        image: loaded.bytes,
        relocs,
    })
}

#[cfg(test)]
mod tests {
    use super::testutil::{compress_with_tool, fake_bzimage, kernel_payload, test_elf};
    use super::*;

    #[test]
    fn loads_plain_elf() {
        let t = test_elf();
        let k = load_kernel_image(&t.bytes, DEFAULT_MAX_OUTPUT).unwrap();
        assert_eq!((&k.setup_header, k.compression), (&None, None));
        assert_eq!(k.relocs, Some(t.relocs));
        assert_eq!((k.phys_start, k.phys_end()), (0x100_0000, 0x100_1200));
        assert_eq!(k.elf.entry, 0x100_0000);
        let bare = load_kernel_image(&t.bytes[..t.elf_len], DEFAULT_MAX_OUTPUT).unwrap();
        assert_eq!(bare.relocs, None);
        let mut bare2 = bare.clone();
        assert!(matches!(
            bare2.apply_kaslr(0x20_0000),
            Err(LoaderError::NoRelocs(_))
        ));
        bare2.apply_kaslr(0).unwrap();
    }

    #[test]
    fn loads_bzimage_for_each_format() {
        let t = test_elf();
        for format in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Lz4,
            Compression::Zstd,
            Compression::Lzo,
        ] {
            let payload = kernel_payload(format, &t.bytes);
            let img = fake_bzimage(&payload, 0);
            let mut k = load_kernel_image(&img, DEFAULT_MAX_OUTPUT)
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(k.compression, Some(format));
            let h = k.setup_header.as_ref().unwrap();
            assert_eq!(h.payload_length as usize, payload.len());
            assert_eq!(k.relocs.as_ref(), Some(&t.relocs));
            assert_eq!(k.elf.pvh_entry, Some(0x100_0040));
            let before = k.image.clone();
            k.apply_kaslr(0x40_0000).unwrap();
            assert_ne!(k.image, before);
        }
    }

    #[test]
    fn rejects_non_kernels_with_specific_errors() {
        let t = test_elf();
        assert!(matches!(
            load_kernel_image(&[], 1 << 20),
            Err(LoaderError::Empty)
        ));
        let mut pe = vec![0u8; 4096];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c] = 0x80;
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        assert!(matches!(
            load_kernel_image(&pe, 1 << 20),
            Err(LoaderError::PeWithoutBootHeader)
        ));
        assert!(matches!(
            load_kernel_image(b"MZ", 1 << 20),
            Err(LoaderError::PeWithoutBootHeader)
        ));
        let e = load_kernel_image(b"#!/bin/sh\necho hi\n", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("23 21 2f 62"), "{e}");
        let gz = compress_with_tool(Compression::Gzip, &t.bytes);
        let e = load_kernel_image(&gz, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("gzip-compressed"), "{e}");
        assert!(matches!(
            load_kernel_image(&t.bytes[..40], 1 << 20),
            Err(LoaderError::Elf(PayloadError::Truncated { .. }))
        ));
        let mut e32 = t.bytes.clone();
        e32[4] = 1;
        assert!(matches!(
            load_kernel_image(&e32, 1 << 20),
            Err(LoaderError::Elf(PayloadError::Not64Bit(1)))
        ));
        let mut arm = t.bytes.clone();
        arm[18] = 183; // EM_AARCH64
        assert!(matches!(
            load_kernel_image(&arm, 1 << 20),
            Err(LoaderError::Elf(PayloadError::WrongMachine(183)))
        ));
        // A bzImage whose payload is not an ELF, and a truncated bzImage.
        let not_elf = kernel_payload(Compression::Xz, b"hello");
        let e = load_kernel_image(&fake_bzimage(&not_elf, 0), 1 << 20).unwrap_err();
        assert!(
            matches!(e, LoaderError::Elf(PayloadError::NotElf { .. })),
            "{e}"
        );
        let img = fake_bzimage(&not_elf, 0);
        assert!(matches!(
            load_kernel_image(&img[..0x300], 1 << 20),
            Err(LoaderError::BzImage(_))
        ));
        // Payload larger than the cap.
        let big = kernel_payload(Compression::Gzip, &t.bytes);
        let e = load_kernel_image(&fake_bzimage(&big, 0), 100).unwrap_err();
        assert!(
            matches!(e, LoaderError::Decompress(DecompressError::TooLarge { .. })),
            "{e}"
        );
    }

    /// Checks a real kernel built by the project's kernel-config scripts.
    #[test]
    #[ignore = "needs a built kernel in ~/.cache/hvtrace/kernels/*/bzImage"]
    fn real_bzimage() {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let dir = std::path::Path::new(&home).join(".cache/hvtrace/kernels");
        let mut found = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path().join("bzImage");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            found += 1;
            let mut k = load_kernel_image(&bytes, DEFAULT_MAX_OUTPUT)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let h = k.setup_header.as_ref().unwrap();
            eprintln!(
                "{}: protocol {:#06x}, {:?}, {} segments, image {:#x}..{:#x}, entry {:#x}, pvh {:?}, relocs {:?}",
                path.display(),
                h.version,
                k.compression,
                k.elf.segments.len(),
                k.phys_start,
                k.phys_end(),
                k.elf.entry,
                k.elf.pvh_entry,
                k.relocs.as_ref().map(|r| (r.rel32.len(), r.inv32.len(), r.rel64.len()))
            );
            assert!(h.version >= 0x020f && h.has_64bit_entry());
            assert!(k.phys_end() - k.phys_start <= u64::from(h.init_size));
            // The appended table starts right at the ELF end (no leftover).
            let bz = bzimage::parse_bzimage(&bytes).unwrap();
            let raw = decompress::decompress(bz.payload, DEFAULT_MAX_OUTPUT).unwrap();
            assert_eq!(
                raw.size_field,
                Some(raw.data.len() as u32),
                "size field not recognised"
            );
            if let Some(r) = &k.relocs {
                assert_eq!(raw.data.len() - k.elf.elf_end, (r.len() + 3) * 4);
                // Relocated words hold kernel addresses (sign-extended 32-bit ones).
                let at = |a: u64| (a - START_KERNEL_MAP - k.phys_start) as usize;
                let hi32 = r
                    .rel32
                    .iter()
                    .filter(|&&a| k.image[at(a) + 3] & 0x80 != 0)
                    .count();
                assert!(
                    hi32 * 10 >= r.rel32.len() * 9,
                    "{hi32} of {} rel32 targets look like kernel addresses",
                    r.rel32.len()
                );
                let hi64 = r
                    .rel64
                    .iter()
                    .filter(|&&a| k.image[at(a) + 4..at(a) + 8] == [0xff; 4])
                    .count();
                assert!(
                    hi64 * 10 >= r.rel64.len() * 9,
                    "{hi64} of {} rel64 targets",
                    r.rel64.len()
                );
                k.apply_kaslr(0x20_0000).unwrap();
            }
            // The unstripped vmlinux beside it lays out to the same bytes.
            if let Ok(vmlinux) = std::fs::read(path.with_file_name("vmlinux")) {
                let v = load_kernel_image(&vmlinux, DEFAULT_MAX_OUTPUT).unwrap();
                let fresh = load_kernel_image(&bytes, DEFAULT_MAX_OUTPUT).unwrap();
                assert_eq!(
                    (v.phys_start, v.elf.entry, v.elf.pvh_entry),
                    (fresh.phys_start, fresh.elf.entry, fresh.elf.pvh_entry)
                );
                assert_eq!(v.elf.segments, fresh.elf.segments);
                assert!(v.image == fresh.image, "vmlinux and bzImage images differ");
                assert_eq!(v.relocs, None);
            }
        }
        assert!(found > 0, "no bzImage under {}", dir.display());
    }
}
