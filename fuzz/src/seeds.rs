//! Seed inputs taken from the project's real minimal kernel, so mutants
//! start from structures the decoders accept and go deep into them (the
//! seeds of the vmm and utrace targets are built in their modules).

use std::path::PathBuf;
use std::process::Command;

use guest_introspect::elf;
use guest_introspect::kallsyms::find_kallsyms_in_elf;

/// The minimal kernel's directory (built or cached by
/// kernel-config/build.sh).
pub fn minimal_kernel_dir() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel-config/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run kernel-config/build.sh");
    assert!(out.status.success(), "kernel-config/build.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The minimal kernel's vmlinux.
pub fn minimal_vmlinux() -> Vec<u8> {
    std::fs::read(minimal_kernel_dir().join("vmlinux")).expect("read vmlinux")
}

/// The part of the image holding the kallsyms arrays, and the link-time
/// address it starts at: the bytes from 1 MiB before
/// `kallsyms_token_table` to 64 KiB after it (the minimal kernel's offsets,
/// names, markers and sequence arrays all lie in that range).
pub fn kallsyms_region(vmlinux: &[u8]) -> (Vec<u8>, u64) {
    let table = find_kallsyms_in_elf(vmlinux).expect("kallsyms in the minimal kernel");
    let start = table.token_table_vaddr - (1 << 20);
    let bytes = elf::bytes_at_vaddr(vmlinux, start, (1 << 20) + (64 << 10))
        .expect("kallsyms region in a PT_LOAD segment");
    (bytes.to_vec(), start)
}

/// The minimal kernel's `.BTF` section.
pub fn btf(vmlinux: &[u8]) -> Vec<u8> {
    elf::section_bytes(vmlinux, ".BTF")
        .expect(".BTF in the minimal kernel")
        .to_vec()
}

/// The minimal kernel's bzImage (gzip payload), beside its vmlinux.
pub fn minimal_bzimage() -> Vec<u8> {
    std::fs::read(minimal_kernel_dir().join("bzImage")).expect("read bzImage")
}
