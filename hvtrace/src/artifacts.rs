//! The default guest kernel and image: built by the project's scripts on
//! first use and cached by content hash (see kernel-config/ and images/).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The source tree this binary was built from (holds the build scripts).
pub fn project_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// Runs a build script that prints one path on stdout; its progress goes
/// to our stderr.
fn run_script(script: &Path, args: &[&str]) -> Result<PathBuf> {
    if !script.exists() {
        bail!(
            "{} is missing: hvtrace builds its default guest from its source tree",
            script.display()
        );
    }
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    if path.is_empty() {
        bail!("{} printed no path", script.display());
    }
    Ok(PathBuf::from(path))
}

/// A guest kernel a user can name with `--kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedKernel {
    /// The minimal 6.1 kernel built from kernel-config/.
    Minimal,
    /// Debian's linux-image-6.1.*-cloud-amd64.
    Debian61,
    /// Debian's linux-image-6.12.*-cloud-amd64 (bookworm-backports).
    Debian612,
}

impl NamedKernel {
    /// Parses a `--kernel` value naming a built-in kernel.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "minimal" | "minimal-6.1" => Some(Self::Minimal),
            "debian-6.1" => Some(Self::Debian61),
            "debian-6.12" => Some(Self::Debian612),
            _ => None,
        }
    }

    /// Command-line words this kernel gets by default on PVM KVM, where its
    /// ring-0 code is emulated. Debian 6.12's jitterentropy RNG
    /// (`jent_mod_init`, built in) hashes with SHA-3 for its start-up
    /// health test: measured here, over 6 minutes of emulated
    /// `keccakf_round` without an end in sight, where hardware takes
    /// milliseconds. The guest's random pool is seeded from other sources
    /// without it.
    pub fn pvm_cmdline(self) -> &'static str {
        match self {
            Self::Debian612 => "initcall_blacklist=jent_mod_init",
            Self::Minimal | Self::Debian61 => "",
        }
    }

    /// The kernel image file, built or fetched on first use.
    pub fn image(self) -> Result<PathBuf> {
        let root = project_root();
        match self {
            // The bzImage, not the vmlinux: only the bzImage carries the
            // relocation table, so only it boots with KASLR, as a user's
            // kernel would (the VMM decompresses it on the host).
            Self::Minimal => {
                Ok(run_script(&root.join("kernel-config/build.sh"), &[])?.join("bzImage"))
            }
            Self::Debian61 => run_script(&root.join("kernel-config/debian.sh"), &["6.1"]),
            Self::Debian612 => run_script(&root.join("kernel-config/debian.sh"), &["6.12"]),
        }
    }
}

/// Resolves `--kernel`: a built-in name or a path.
pub fn kernel(arg: Option<&str>) -> Result<PathBuf> {
    let arg = arg.unwrap_or("minimal");
    match NamedKernel::from_name(arg) {
        Some(k) => k.image(),
        None => Ok(PathBuf::from(arg)),
    }
}

/// The default initramfs.
pub fn default_image() -> Result<PathBuf> {
    run_script(&project_root().join("images/build.sh"), &[])
}
