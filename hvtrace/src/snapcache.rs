//! The snapshot cache of `hvtrace run`: one snapshot per guest definition,
//! taken when the guest's init first waits for a command, keyed by a hash of
//! everything that shapes the guest so a stale one is never served.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use vmm::builder::{Kaslr, VmConfig};
use vmm::kvm_kind::KvmKind;

/// Cache root (`$HVTRACE_CACHE`, else `$XDG_CACHE_HOME/hvtrace`, else `~/.cache/hvtrace`).
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HVTRACE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("hvtrace");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/hvtrace")
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(())
}

/// The cache key of a guest: kernel and initrd contents, the effective
/// command line (with what the KVM kind adds), the KVM features the kind
/// hides from the guest, memory, vCPUs, KASLR mode,
/// KVM kind, the host CPU's XSAVE layout (a guest kernel keeps the layout
/// of the CPU it booted on), and this hvtrace's version, snapshot format
/// and machine revision.
pub fn key(config: &VmConfig, kind: KvmKind) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "hvtrace {} snapshot-format {} machine {}\n",
        env!("CARGO_PKG_VERSION"),
        vmm::persist::format::FORMAT_VERSION,
        vmm::builder::MACHINE_REVISION,
    ));
    // What the VMM adds to the command line on this KVM kind is part of
    // the guest too.
    h.update(format!(
        "kind-cmdline {} | {}\n",
        kind.guest_cmdline_defaults(),
        kind.guest_cmdline()
    ));
    // So are the KVM features it hides from the guest's CPUID.
    h.update(format!(
        "hidden-kvm-features {:#x}\n",
        kind.hidden_kvm_features()
    ));
    h.update(format!(
        "xsave-layout {:?}\n",
        vmm::arch::x86_64::xsave::Layout::host()
    ));
    hash_file(&mut h, &config.kernel)?;
    for i in &config.initrds {
        h.update(b"initrd\n");
        hash_file(&mut h, i)?;
    }
    let kaslr = match config.kaslr {
        Kaslr::Auto => "auto".to_string(),
        Kaslr::Off => "off".to_string(),
        Kaslr::Seed(s) => format!("seed {s}"),
    };
    h.update(format!(
        "cmdline {}\nmem {}\ncpus {}\nkaslr {kaslr}\nkind {kind:?}\n",
        config.cmdline, config.memory_mib, config.cpus
    ));
    let d = h.finalize();
    Ok(d.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// Where the snapshot for `key` lives.
pub fn path(key: &str) -> PathBuf {
    cache_root().join("snapshots").join(format!("{key}.snap"))
}
