//! The guest image's files, read on the host: the uncompressed `newc`
//! cpio archives the guest boots from (its initramfs), so that `hvtrace
//! trace --steps` names functions from the program's own ELF without
//! reading anything out of the guest.
//!
//! The archive is untrusted input as much as guest memory is: every field
//! is checked against the file, and a malformed archive is simply one
//! with fewer files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use utrace::steps::symbols::{ProgramSymbols, SymbolSource};

/// One file of an archive.
struct Entry {
    mode: u32,
    data: std::ops::Range<usize>,
}

/// The files of the archives, by absolute path.
pub struct GuestFiles {
    archives: Vec<Vec<u8>>,
    /// Path to (archive index, entry).
    index: HashMap<String, (usize, Entry)>,
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;

impl GuestFiles {
    /// Indexes the archives at `paths` (a later archive's file replaces an
    /// earlier one's, as the kernel unpacks them in order). One that
    /// cannot be read, or is not an uncompressed newc archive, adds no
    /// files (logged).
    pub fn open(paths: &[PathBuf]) -> Self {
        let mut files = Self {
            archives: Vec::new(),
            index: HashMap::new(),
        };
        for p in paths {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let i = files.archives.len();
                    let n = files.add(i, &bytes);
                    if n == 0 {
                        log::info!("{}: not an uncompressed newc cpio archive", p.display());
                    }
                    files.archives.push(bytes);
                }
                Err(e) => log::info!("{}: {e}", p.display()),
            }
        }
        files
    }

    /// Indexes archive `which` (`vmm`'s newc walker: a malformed member
    /// ends it, with the members before it kept); returns how many
    /// members it had.
    fn add(&mut self, which: usize, b: &[u8]) -> usize {
        let mut n = 0;
        for m in vmm::initrd::cpio_members(b).map_while(Result::ok) {
            if m.is_trailer() {
                continue;
            }
            let name = String::from_utf8_lossy(m.name);
            let path = format!("/{}", name.trim_start_matches("./").trim_start_matches('/'));
            self.index.insert(
                path,
                (
                    which,
                    Entry {
                        mode: m.mode,
                        data: m.data,
                    },
                ),
            );
            n += 1;
        }
        n
    }

    /// The contents of the regular file at `path`, following symbolic
    /// links (at most 16).
    pub fn read(&self, path: &str) -> Option<&[u8]> {
        let mut path = normalize(path)?;
        for _ in 0..16 {
            let (which, e) = self.index.get(&path)?;
            let bytes = self.archives.get(*which)?.get(e.data.clone())?;
            match e.mode & S_IFMT {
                S_IFREG => return Some(bytes),
                S_IFLNK => {
                    let target = std::str::from_utf8(bytes).ok()?;
                    path = if target.starts_with('/') {
                        normalize(target)?
                    } else {
                        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                        normalize(&format!("{dir}/{target}"))?
                    };
                }
                _ => return None,
            }
        }
        None
    }
}

/// `path` made absolute with `.` and `..` resolved (None if relative).
fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Program symbols from the guest image's files, cached by path.
pub struct ImageSymbols {
    files: GuestFiles,
    cache: Mutex<HashMap<String, Option<Arc<ProgramSymbols>>>>,
}

impl ImageSymbols {
    /// Symbols from the archives at `paths`.
    pub fn open(paths: &[PathBuf]) -> Self {
        Self {
            files: GuestFiles::open(paths),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl SymbolSource for ImageSymbols {
    fn symbols(&self, path: &str) -> Option<Arc<ProgramSymbols>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(path.to_string())
            .or_insert_with(|| {
                self.files
                    .read(path)
                    .and_then(ProgramSymbols::from_elf)
                    .map(Arc::new)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc archive of (name, mode, data) entries.
    fn archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |name: &str, mode: u32, data: &[u8]| {
            out.extend_from_slice(
                format!(
                    "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                    1, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
                )
                .as_bytes(),
            );
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (n, m, d) in entries {
            push(n, *m, d);
        }
        push("TRAILER!!!", 0, b"");
        out
    }

    #[test]
    fn files_and_symlinks_are_found_and_garbage_is_empty() {
        let a = archive(&[
            ("usr/bin/prog", 0o100755, b"ELF-ish"),
            ("usr/bin/link", 0o120777, b"prog"),
            ("bin/abs", 0o120777, b"/usr/bin/../bin/link"),
            ("bin/loop", 0o120777, b"/bin/loop"),
        ]);
        let mut f = GuestFiles {
            archives: Vec::new(),
            index: HashMap::new(),
        };
        assert_eq!(f.add(0, &a), 4);
        f.archives.push(a);
        assert_eq!(f.read("/usr/bin/prog"), Some(&b"ELF-ish"[..]));
        assert_eq!(f.read("/usr/bin/link"), Some(&b"ELF-ish"[..]));
        assert_eq!(f.read("/bin/abs"), Some(&b"ELF-ish"[..]));
        assert_eq!(f.read("/bin/loop"), None, "a symlink loop ends");
        assert_eq!(f.read("relative"), None);
        // Truncated and garbage archives add what they can, no panic.
        let mut g = GuestFiles {
            archives: Vec::new(),
            index: HashMap::new(),
        };
        let whole = archive(&[("x", 0o100644, b"data")]);
        for cut in 0..whole.len() {
            g.add(0, &whole[..cut]);
        }
        assert_eq!(g.add(0, b"070701zzzzzzzz"), 0);
    }
}
