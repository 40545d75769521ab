//! `hvtrace symbols` and `hvtrace types`: what hvtrace knows about a kernel
//! file, from the same sources `ps` uses.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use guest_introspect::btf::KernelTypes;

use crate::artifacts;

/// Arguments of `hvtrace symbols`.
#[derive(Args, Debug)]
pub struct SymbolsArgs {
    /// Kernel: `minimal` (default), `debian-6.1`, `debian-6.12`, or a path to a vmlinux/bzImage.
    #[arg(long)]
    pub kernel: Option<String>,
    /// System.map (takes precedence over the kernel's own symbols).
    #[arg(long)]
    pub system_map: Option<PathBuf>,
}

/// Prints every symbol as `address type name`, like System.map; the source
/// used goes to stderr.
pub fn symbols(args: SymbolsArgs) -> Result<i32> {
    let kernel = artifacts::kernel(args.kernel.as_deref())?;
    let bytes = std::fs::read(&kernel)?;
    let elf = vmm::loader::kernel_elf(&bytes, vmm::loader::DEFAULT_MAX_OUTPUT)?;
    let map = args
        .system_map
        .as_ref()
        .map(std::fs::read_to_string)
        .transpose()?;
    let (symbols, source) = guest_introspect::image::symbols_from_files(&elf, map.as_deref())?;
    eprintln!(
        "hvtrace: {} symbols from the {} of {}",
        symbols.len(),
        source.describe(),
        kernel.display()
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in symbols.iter() {
        use std::io::Write;
        if writeln!(out, "{:016x} {} {}", s.addr, s.kind, s.name).is_err() {
            break; // e.g. a closed pipe (`| head`)
        }
    }
    Ok(0)
}

/// Arguments of `hvtrace types`.
#[derive(Args, Debug)]
pub struct TypesArgs {
    /// Kernel: `minimal` (default), `debian-6.1`, `debian-6.12`, or a path to a vmlinux/bzImage.
    #[arg(long)]
    pub kernel: Option<String>,
    /// The struct (or union) to show.
    pub name: String,
    /// Members to show (dotted paths such as `thread_info.flags`) [default: all].
    pub members: Vec<String>,
}

/// Prints member offsets and sizes from the kernel's BTF.
pub fn types(args: TypesArgs) -> Result<i32> {
    let kernel = artifacts::kernel(args.kernel.as_deref())?;
    let bytes = std::fs::read(&kernel)?;
    let elf = vmm::loader::kernel_elf(&bytes, vmm::loader::DEFAULT_MAX_OUTPUT)?;
    let types = KernelTypes::from_elf(&elf)?;
    let members = if args.members.is_empty() {
        types.members(&args.name)?
    } else {
        args.members
            .iter()
            .map(|m| types.member(&args.name, m))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut out = format!(
        "struct {} {{ /* size {} bytes */\n    /* offset  size */\n",
        args.name,
        types.struct_size(&args.name)?
    );
    for m in members {
        let (bits, width) = if m.bit_size > 0 {
            (
                format!(":{}", m.bit_offset - m.offset * 8),
                format!(" : {}", m.bit_size),
            )
        } else {
            (String::new(), String::new())
        };
        out += &format!(
            "    {:>8}{:<3} {:>5}  {} {}{};\n",
            m.offset, bits, m.size, m.type_name, m.name, width
        );
    }
    out += "};\n";
    crate::introspect::emit(&out);
    Ok(0)
}
