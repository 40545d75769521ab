//! The default guest kernel and image: built by the project's scripts on
//! first use and cached by content hash (see kernel-config/ and images/).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// The source tree this binary was built from (holds the build scripts).
pub fn project_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// Where a build script's whole stderr (apt's and make's output among
/// it) is kept while it runs: `<cache>/logs/<dir>-<script>-<pid>.log`
/// (one per hvtrace process: tests run many at once), removed when the
/// script succeeds.
fn script_log(script: &Path) -> PathBuf {
    let dir = script
        .parent()
        .and_then(Path::file_name)
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = script
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::snapcache::cache_root()
        .join("logs")
        .join(format!("{dir}-{stem}-{}.log", std::process::id()))
}

/// The path a build script printed, remembered for the rest of the
/// process: one `hvtrace run` asks for its kernel and image several times
/// (the snapshot key, the stall reporter, the tracer's symbols), and each
/// run of a script, even one that only finds its cached result, costs a
/// few dozen milliseconds of processes (measured: 2 runs of each script in
/// `run`, 3 in `trace`, before this). Scripts are deterministic for one
/// process: their inputs are the checkout and the installed packages.
fn run_script(script: &Path, args: &[&str]) -> Result<PathBuf> {
    type Key = (PathBuf, Vec<String>);
    static DONE: Mutex<BTreeMap<Key, PathBuf>> = Mutex::new(BTreeMap::new());
    let key = (
        script.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    if let Some(path) = DONE.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(path.clone());
    }
    // Not held while the script runs: a build takes minutes, and two
    // threads asking at once at worst both run it (the scripts are
    // idempotent and publish their results atomically).
    let path = run_script_now(script, args)?;
    DONE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, path.clone());
    Ok(path)
}

/// Runs a build script that prints one path on stdout. Its `[hvtrace]
/// ...` lines are progress phases (printed as before when no progress
/// display runs); everything it writes to stderr goes to its log file
/// ([`script_log`]), which a failure names, with its last lines.
fn run_script_now(script: &Path, args: &[&str]) -> Result<PathBuf> {
    if !script.exists() {
        bail!(
            "{} is missing: hvtrace builds its default guest from its source tree",
            script.display()
        );
    }
    let log_path = script_log(script);
    let log = log_path
        .parent()
        .and_then(|d| std::fs::create_dir_all(d).ok())
        .and_then(|()| std::fs::File::create(&log_path).ok());
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stderr = child.stderr.take().context("the script's stderr")?;
    let forward_all = log.is_none();
    let relay = std::thread::spawn(move || relay_script_stderr(stderr, log, forward_all));
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let _ = relay.join();
    if !out.status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        bail!(
            "{} failed ({}); its whole output is in {}; it ended with:\n{tail}",
            script.display(),
            out.status,
            log_path.display()
        );
    }
    let _ = std::fs::remove_file(&log_path);
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

/// Copies a build script's stderr into `log` (to our stderr when there is
/// no log), its `[hvtrace] ...` lines to the progress display.
fn relay_script_stderr(
    stderr: impl std::io::Read,
    mut log: Option<std::fs::File>,
    forward_all: bool,
) {
    use std::io::{BufRead, Write};
    for line in std::io::BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        if let Some(log) = &mut log {
            let _ = writeln!(log, "{line}");
        }
        match (line.strip_prefix("[hvtrace] "), crate::progress::current()) {
            (Some(what), Some(p)) => p.set_phase(what),
            (Some(_), None) => eprintln!("{line}"),
            (None, _) if forward_all => eprintln!("{line}"),
            (None, _) => {}
        }
    }
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
